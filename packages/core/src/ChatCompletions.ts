/**
 * `POST /v1/chat/completions`: read and validate the body, resolve the model to a replica, make
 * the attempt, and answer with the backend's JSON or forward its SSE stream chunk by chunk.
 */
import { type HttpServerRequest, HttpServerResponse } from "@effect/platform"
import { Errors, Events, OpenAi } from "@gateway/domain"
import { Effect, Either, ParseResult, Runtime } from "effect"
import type { RequestInfo } from "./CurrentRequest.js"
import * as ErrorResponse from "./ErrorResponse.js"
import { Meter } from "./Meter.js"
import { Models } from "./Models.js"
import { Recorder } from "./Recorder.js"
import * as RequestBody from "./RequestBody.js"
import { Settings } from "./Settings.js"
import * as SseRelay from "./SseRelay.js"
import { SseScanner } from "./SseScanner.js"
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

/** Why a request was turned away, as the `RequestRejected` event names it. */
const rejection = (error: Errors.GatewayError): Events.RejectionReason | undefined => {
  switch (error._tag) {
    case "InvalidRequest":
      return "invalid_request"
    case "PayloadTooLarge":
      return "payload_too_large"
    case "ModelNotFound":
      return "model_not_found"
    case "ServiceUnavailable":
      return "unavailable"
    default:
      return undefined
  }
}

/** Usage and finish reason from a whole JSON answer; `undefined` where the backend gave none. */
const summarize = (body: Uint8Array) => {
  try {
    const parsed = JSON.parse(decoder.decode(body)) as {
      usage?: OpenAi.Usage | null
      choices?: ReadonlyArray<{ finish_reason?: string | null; message?: { content?: string | null } }>
    }
    const choice = parsed.choices?.[0]
    return {
      usage: parsed.usage ?? undefined,
      finishReason: choice?.finish_reason ?? null,
      contentChars: choice?.message?.content?.length ?? 0
    }
  } catch {
    return { usage: undefined, finishReason: null, contentChars: 0 }
  }
}

/** A rough token count (about four bytes a token) until a real tokenizer is wired in. */
const estimateTokens = (bytes: number) => Math.ceil(bytes / 4)

const elapsed = (since: number) => Math.round((performance.now() - since) * 100) / 100

const attemptError = (error: Errors.BackendError): Events.AttemptError => ({
  reason: error.reason,
  message: error.detail,
  ...(error.status === undefined ? {} : { status: error.status })
})

export class ChatCompletions extends Effect.Service<ChatCompletions>()("@gateway/core/ChatCompletions", {
  effect: Effect.gen(function* () {
    const models = yield* Models
    const upstream = yield* Upstream
    const recorder = yield* Recorder
    const meter = yield* Meter
    const { maxBodyBytes } = (yield* Settings).server

    const handle = (
      request: HttpServerRequest.HttpServerRequest,
      info: RequestInfo
    ): Effect.Effect<HttpServerResponse.HttpServerResponse, Errors.GatewayError> => {
      const recording = recorder.start(info.requestId, info.clientRequestId)
      return Effect.gen(function* () {
        // Serve nothing that could not be put on the books.
        if (!(yield* recorder.accepting)) return yield* unrecorded()
        const raw = yield* RequestBody.read(request, maxBodyBytes)
        const body = yield* Either.flatMap(parseJson(raw), validate)
        const stream = body.stream === true
        info.model = body.model
        info.stream = stream
        const target = yield* models.resolve(body.model)
        const backend = target.backend.id
        const model = target.model.name
        info.backend = backend
        yield* recording.record(
          new Events.RequestReceived(
            {
              model: body.model,
              stream,
              endpoint: "chat.completions",
              ...(typeof body.user === "string" ? { user: body.user } : {}),
              payload: recording.payload(raw, body)
            },
            true
          ),
          new Events.RequestRouted(
            { model, backend, upstreamModel: target.upstreamModel, why: "round_robin" },
            true
          ),
          new Events.AttemptStarted({ attempt: 1, backend, model }, true)
        )

        const failed = (error: Errors.BackendError, afterFirstByte: boolean) => {
          const rendered = ErrorResponse.render(error)
          return [
            new Events.AttemptFailed(
              { attempt: 1, backend, error: attemptError(error), retryable: error.retryable, afterFirstByte },
              true
            ),
            new Events.RequestFailed(
              {
                status: afterFirstByte ? 200 : rendered.status,
                error: {
                  code: String(rendered.body.error.code ?? "backend_error"),
                  message: error.message,
                  reason: error.reason
                },
                attempts: 1,
                lastBackend: backend
              },
              true
            )
          ] as const
        }
        const cancelled = (tokensDelivered: number, afterFirstByte: boolean) =>
          new Events.RequestCancelled(
            { tokensDelivered, latencyMs: elapsed(info.startedAt), afterFirstByte },
            true
          )

        const answer = yield* upstream
          .chat({ requestId: info.requestId, clientRequestId: info.clientRequestId, target, body, raw })
          .pipe(
            Effect.tapError((error) =>
              recording
                .finish(...failed(error, false))
                .pipe(
                  Effect.catchAll((e) => Effect.logWarning("could not record a failed request", e.message))
                )
            ),
            Effect.onInterrupt(() => recording.record(cancelled(0, false)))
          )

        if (answer._tag === "Complete") {
          const summary = summarize(answer.body)
          const promptTokens = summary.usage?.prompt_tokens ?? estimateTokens(raw.length)
          const completionTokens = summary.usage?.completion_tokens ?? estimateTokens(summary.contentChars)
          yield* recording
            .finish(
              new Events.RequestCompleted(
                {
                  model,
                  backend,
                  promptTokens,
                  completionTokens,
                  usageSource: summary.usage === undefined ? "estimated" : "backend",
                  cost: meter.cost(model, promptTokens, completionTokens),
                  latencyMs: elapsed(info.startedAt),
                  ttftMs: null,
                  finishReason: summary.finishReason,
                  cached: false,
                  stream: false,
                  status: answer.status
                },
                true
              )
            )
            .pipe(Effect.mapError(unrecorded))
          return HttpServerResponse.uint8Array(answer.body, {
            status: answer.status,
            contentType: "application/json",
            headers: { "x-gateway-backend": backend }
          })
        }

        const scanner = new SseScanner()
        /** Tokens of the streamed answer and their cost, once it is complete. */
        const usageOf = (scanned: SseScanner, requestBytes: number) => {
          const promptTokens = scanned.usage?.prompt_tokens ?? estimateTokens(requestBytes)
          const completionTokens = scanned.usage?.completion_tokens ?? scanned.contentChunks
          return { promptTokens, completionTokens, cost: meter.cost(model, promptTokens, completionTokens) }
        }
        const runtime = yield* Effect.runtime<never>()
        const run = Runtime.runPromise(runtime)
        const relayed = SseRelay.relay(answer.body, {
          onChunk: (chunk) => scanner.push(chunk),
          // The answer is complete: it goes on the books before the client gets [DONE].
          beforeEnd: () =>
            run(
              recording
                .finish(
                  new Events.RequestCompleted(
                    {
                      model,
                      backend,
                      ...usageOf(scanner, raw.length),
                      usageSource: scanner.usage === undefined ? "estimated" : "backend",
                      latencyMs: elapsed(info.startedAt),
                      ttftMs:
                        scanner.firstContentAt === undefined
                          ? null
                          : Math.round((scanner.firstContentAt - info.startedAt) * 100) / 100,
                      finishReason: scanner.finishReason,
                      cached: false,
                      stream: true,
                      status: 200
                    },
                    true
                  )
                )
                .pipe(
                  Effect.as(undefined),
                  Effect.catchAll((error) => {
                    info.error = `the completed answer could not be recorded: ${error.message}`
                    return Effect.succeed(ErrorResponse.toSseEvent(ErrorResponse.render(unrecorded())))
                  })
                )
            ),
          onBreak: (cause) => {
            // The backend broke off after the headers: the request failed; that is recorded
            // before the client's stream ends, as any terminal event is.
            const error = answer.failure(cause)
            info.error = error.message
            const event = ErrorResponse.toSseEvent(ErrorResponse.render(error))
            return run(recording.finish(...failed(error, true)).pipe(Effect.ignore, Effect.as(event)))
          },
          onClientGone: (midAnswer) => {
            info.clientClosed = true
            if (midAnswer)
              void run(recording.record(cancelled(scanner.contentChunks, scanner.contentChunks > 0)))
          }
        })
        return HttpServerResponse.raw(relayed, {
          contentType: "text/event-stream",
          headers: { ...sseHeaders, "x-gateway-backend": backend }
        })
      }).pipe(
        Effect.tapError((error) => {
          const reason = rejection(error)
          if (reason === undefined) return Effect.void
          const { status, body } = ErrorResponse.render(error)
          return recording.record(
            new Events.RequestRejected({ reason, status, message: body.error.message }, true)
          )
        }),
        Effect.withSpan("ChatCompletions.handle")
      )
    }

    return { handle } as const
  })
}) {}

/** The answer exists but could not be put on the books: the client must not get it. */
const unrecorded = () =>
  new Errors.ServiceUnavailable({ message: "The gateway could not record the request; please retry." })
