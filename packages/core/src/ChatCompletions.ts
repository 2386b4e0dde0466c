/**
 * `POST /v1/chat/completions`: read and validate the body, resolve the model to a replica, make
 * the attempt, and answer with the backend's JSON or forward its SSE stream chunk by chunk.
 */
import { type HttpServerRequest, HttpServerResponse } from "@effect/platform"
import { Errors, OpenAi } from "@gateway/domain"
import { Effect, Either, ParseResult } from "effect"
import type { RequestInfo } from "./CurrentRequest.js"
import * as ErrorResponse from "./ErrorResponse.js"
import { Models } from "./Models.js"
import * as RequestBody from "./RequestBody.js"
import { Settings } from "./Settings.js"
import * as SseRelay from "./SseRelay.js"
import { Upstream } from "./Upstream.js"

const decoder = new TextDecoder()

/** Field path as OpenAI writes it: `messages.[0].content`. */
const paramOf = (path: ReadonlyArray<PropertyKey>): string | null =>
  path.length === 0 ? null : path.map((key) => (typeof key === "number" ? `[${key}]` : String(key))).join(".")

const parseJson = (raw: Uint8Array): Either.Either<unknown, Errors.InvalidRequest> => {
  try {
    return Either.right(JSON.parse(decoder.decode(raw)))
  } catch (cause) {
    return Either.left(
      new Errors.InvalidRequest({
        message: `We could not parse the JSON body of your request (${(cause as Error).message}). The API expects a JSON object.`,
        param: null,
        code: "invalid_json"
      })
    )
  }
}

const validate = (json: unknown): Either.Either<OpenAi.ChatCompletionRequest, Errors.InvalidRequest> => {
  if (typeof json !== "object" || json === null || Array.isArray(json)) {
    return Either.left(
      new Errors.InvalidRequest({
        message: "The request body must be a JSON object.",
        param: null,
        code: "invalid_request"
      })
    )
  }
  return Either.mapLeft(OpenAi.decodeChatCompletionRequest(json), (error) => {
    const issue = ParseResult.ArrayFormatter.formatErrorSync(error)[0]
    const param = issue === undefined ? null : paramOf(issue.path)
    const problem = issue?.message ?? "invalid request"
    return new Errors.InvalidRequest({
      message: param === null ? `Invalid request: ${problem}` : `Invalid value for '${param}': ${problem}`,
      param,
      code: issue?._tag === "Missing" ? "missing_required_parameter" : "invalid_value"
    })
  })
}

const sseHeaders = { "cache-control": "no-cache", "x-accel-buffering": "no" }

export class ChatCompletions extends Effect.Service<ChatCompletions>()("@gateway/core/ChatCompletions", {
  effect: Effect.gen(function* () {
    const models = yield* Models
    const upstream = yield* Upstream
    const { maxBodyBytes } = (yield* Settings).server

    const handle = (
      request: HttpServerRequest.HttpServerRequest,
      info: RequestInfo
    ): Effect.Effect<HttpServerResponse.HttpServerResponse, Errors.GatewayError> =>
      Effect.gen(function* () {
        const raw = yield* RequestBody.read(request, maxBodyBytes)
        const body = yield* Either.flatMap(parseJson(raw), validate)
        info.model = body.model
        info.stream = body.stream === true
        const target = yield* models.resolve(body.model)
        info.backend = target.backend.id
        const answer = yield* upstream.chat({ requestId: info.requestId, target, body, raw })
        if (answer._tag === "Complete") {
          return HttpServerResponse.uint8Array(answer.body, {
            status: answer.status,
            contentType: "application/json",
            headers: { "x-gateway-backend": target.backend.id }
          })
        }
        const relayed = SseRelay.relay(
          answer.body,
          (cause) => {
            // Headers are gone: end the stream with an OpenAI error event, and no [DONE].
            const error = answer.failure(cause)
            info.error = error.message
            return ErrorResponse.toSseEvent(ErrorResponse.render(error))
          },
          () => {
            info.clientClosed = true
          }
        )
        return HttpServerResponse.raw(relayed, {
          contentType: "text/event-stream",
          headers: { ...sseHeaders, "x-gateway-backend": target.backend.id }
        })
      }).pipe(Effect.withSpan("ChatCompletions.handle"))

    return { handle } as const
  })
}) {}
