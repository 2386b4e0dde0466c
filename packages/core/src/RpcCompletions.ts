/**
 * The completion calls of the internal RPC API: `ChatCompletion` (the chunks as typed values, as
 * they arrive) and `ChatCompletionOnce`, both through `ChatCompletions.complete` — the HTTP
 * endpoint's own pipeline (the caller's key, its limits, routing, attempts, recording and the
 * durability rule: the terminal event is on the books before the last chunk is delivered).
 *
 * A caller that interrupts the stream is a client going away: the backend's answer is drained
 * for its usage and the request is recorded as cancelled, as over HTTP.
 */
import type { Headers } from "@effect/platform"
import { NodeStream } from "@effect/platform-node"
import { Errors, Ids, OpenAi, RpcApi, type RpcSchemas } from "@gateway/domain"
import { Cause, Chunk, Effect, Either, Option, Schema, Stream } from "effect"
import { Auth, type Principal } from "./Auth.js"
import { ChatCompletions } from "./ChatCompletions.js"
import { accessFields, type RequestInfo } from "./CurrentRequest.js"
import * as ErrorResponse from "./ErrorResponse.js"
import { Metrics } from "./Metrics.js"
import { callerOf } from "./RpcHandlers.js"
import * as Tracing from "./Tracing.js"

const encoder = new TextEncoder()
const decoder = new TextDecoder()

const noKey = new Errors.Unauthorized({
  message: "A completion needs an API key of a tenant to bill: the admin key has none."
})

/** What an OpenAI error event in a stream says, when a data line is one. */
const errorOf = (event: unknown): string | undefined => {
  if (typeof event !== "object" || event === null || !("error" in event)) return undefined
  const error = (event as { error: unknown }).error
  return typeof error === "object" && error !== null && "message" in error
    ? String((error as { message: unknown }).message)
    : JSON.stringify(error)
}

const decodeChunk = Schema.decodeUnknownEither(OpenAi.ChatCompletionChunk)
const decodeCompletion = Schema.decodeUnknownEither(OpenAi.ChatCompletion)

/**
 * An SSE body (`data: {chunk}\n\n` … `data: [DONE]`) as its chunks. An error event or an end
 * without `[DONE]` fails the stream with the backend error the HTTP client would have seen.
 */
export const sseChunks = (
  body: Stream.Stream<Uint8Array, Errors.BackendError>,
  backend: string
): Stream.Stream<OpenAi.ChatCompletionChunk, Errors.BackendError> => {
  const broken = (detail: string) => new Errors.BackendError({ reason: "StreamBroken", backend, detail })
  let pending = ""
  let done = false
  const events = (text: string) => {
    pending += text
    const out: Array<string> = []
    let end = pending.indexOf("\n\n")
    while (end !== -1) {
      out.push(pending.slice(0, end))
      pending = pending.slice(end + 2)
      end = pending.indexOf("\n\n")
    }
    return out
  }
  const parse = (
    event: string
  ): Either.Either<OpenAi.ChatCompletionChunk | undefined, Errors.BackendError> => {
    const data = event
      .split("\n")
      .filter((line) => line.startsWith("data:"))
      .map((line) => line.slice(5).trimStart())
      .join("\n")
    if (data.length === 0) return Either.right(undefined)
    if (data === "[DONE]") {
      done = true
      return Either.right(undefined)
    }
    let json: unknown
    try {
      json = JSON.parse(data)
    } catch {
      return Either.left(broken(`not JSON: ${data.slice(0, 200)}`))
    }
    const error = errorOf(json)
    if (error !== undefined) {
      return Either.left(new Errors.BackendError({ reason: "StreamError", backend, detail: error }))
    }
    return Either.mapLeft(decodeChunk(json), (e) =>
      broken(`not a chat.completion.chunk: ${e.message.slice(0, 300)}`)
    )
  }
  return body.pipe(
    Stream.mapChunksEffect((bytes) =>
      Effect.gen(function* () {
        const out: Array<OpenAi.ChatCompletionChunk> = []
        for (const piece of bytes) {
          for (const event of events(decoder.decode(piece, { stream: true }))) {
            const chunk = yield* parse(event)
            if (chunk !== undefined) out.push(chunk)
          }
        }
        return Chunk.unsafeFromArray(out)
      })
    ),
    Stream.concat(
      Stream.suspend(() => (done ? Stream.empty : Stream.fail(broken("the stream ended before [DONE]"))))
    )
  )
}

/** The handlers of `ChatCompletion` and `ChatCompletionOnce`. */
export const layer = RpcApi.CompletionRpcs.toLayer(
  Effect.gen(function* () {
    const auth = yield* Auth
    const chat = yield* ChatCompletions
    const metrics = yield* Metrics

    /**
     * Counts the completion in the metrics and logs its access line once it is over, as the HTTP
     * endpoint does: internal traffic is traffic (`path` names the RPC).
     */
    const observe = (info: RequestInfo, rpc: string, headers: Headers.Headers) => {
      metrics.started()
      let over = false
      let spans: Tracing.Spans | undefined
      return {
        /**
         * Inside the call's span (`Rpc.<name>`, traced): its ids go on the request's events and
         * log lines, and at the end what the completion turned out to be goes on the span.
         */
        enter: Effect.map(Tracing.currentSpans, (current) => {
          if (current?.span.sampled === true) {
            spans = current
            info.traceId = current.span.traceId
            info.spanId = current.span.spanId
          } else if (current !== undefined) {
            // Not sampled: the call's span is never exported; the client's trace (if any) is
            // what the request's logs and events can name.
            info.traceId = Tracing.clientTraceId(headers.traceparent)
          }
        }),
        end: (status: number) =>
          Effect.suspend(() => {
            if (over) return Effect.void
            over = true
            const latencyMs = performance.now() - info.startedAt
            metrics.finished(info, status, latencyMs)
            if (spans !== undefined) Tracing.annotate(spans.span, spans.otel, info)
            return Effect.logInfo(
              "request",
              accessFields(info, { method: "RPC", path: rpc }, status, latencyMs)
            )
          })
      }
    }
    const statusOf = (error: unknown) =>
      typeof error === "object" && error !== null && "_tag" in error
        ? ErrorResponse.render(error as Errors.GatewayError).status
        : 500

    /**
     * A copy of the error with the request's id, so the caller can find its events or dead letter
     * (a copy: some errors are shared constants; `message` is not enumerable, hence descriptors).
     */
    const withRequestId =
      (requestId: string) =>
      <E extends object>(error: E): E =>
        "_tag" in error
          ? Object.defineProperties(Object.create(Object.getPrototypeOf(error)), {
              ...Object.getOwnPropertyDescriptors(error),
              requestId: { value: requestId, enumerable: true, writable: false, configurable: true }
            })
          : error

    /** The key to bill: an `internal` (or `admin`) scoped key; with auth off, nobody. */
    const principalOf = (
      headers: Headers.Headers
    ): Either.Either<Principal | undefined, Errors.Unauthorized | Errors.Forbidden> => {
      if (!auth.enabled) return Either.right(undefined)
      return Either.flatMap(callerOf(auth, headers), (caller) =>
        caller._tag === "Service"
          ? Either.right(caller.principal)
          : Either.flatMap(auth.authenticate(headers), (p) =>
              p === undefined ? Either.left(noKey) : Either.right(p)
            )
      )
    }

    const run = (
      request: OpenAi.ChatCompletionRequest,
      stream: boolean,
      headers: Headers.Headers,
      info: RequestInfo
    ) =>
      Effect.gen(function* () {
        const principal = yield* principalOf(headers)
        if (principal !== undefined) {
          info.keyId = principal.keyId
          info.keyName = principal.keyName
          info.tenantId = principal.tenantId
        }
        const body = encoder.encode(JSON.stringify({ ...request, stream }))
        return yield* chat.complete({ principal, body, info })
      })

    const newInfo = (headers: Headers.Headers): RequestInfo => ({
      requestId: Ids.newRequestId(),
      clientRequestId: Ids.clientRequestId(headers["x-request-id"]),
      startedAt: performance.now()
    })

    return {
      ChatCompletion: (request, { headers }) => {
        const info = newInfo(headers)
        const observed = observe(info, "ChatCompletion", headers)
        let status = 200
        return Stream.unwrap(
          Effect.map(Effect.zipRight(observed.enter, run(request, true, headers, info)), (answer) => {
            const backend = answer.headers["x-gateway-backend"] ?? "unknown"
            if (answer._tag === "Whole") {
              // A backend that answered a stream request with JSON: one chunk would lie.
              return Stream.fail(
                new Errors.BackendError({
                  reason: "Protocol",
                  backend,
                  detail: "the backend answered a stream request with a whole answer"
                })
              )
            }
            return sseChunks(
              NodeStream.fromReadable<Errors.BackendError, Uint8Array>(
                () => answer.body,
                (cause) => new Errors.BackendError({ reason: "StreamBroken", backend, detail: String(cause) })
              ),
              backend
            )
          })
        ).pipe(
          // The first chunk names the request; every later one is the backend's as it came.
          Stream.mapAccum(true, (first, chunk): readonly [boolean, RpcSchemas.CompletionChunk] => [
            false,
            first ? { ...chunk, gateway_request_id: info.requestId } : chunk
          ]),
          Stream.tapError((error) =>
            Effect.sync(() => {
              status = statusOf(error)
            })
          ),
          Stream.mapError(withRequestId(info.requestId)),
          // Interrupted by the caller before the end: a client going away (499, as over HTTP).
          Stream.ensuringWith((exit) =>
            observed.end(exit._tag === "Failure" && Cause.isInterruptedOnly(exit.cause) ? 499 : status)
          )
        )
      },

      ChatCompletionOnce: (request, { headers }) => {
        const info = newInfo(headers)
        const observed = observe(info, "ChatCompletionOnce", headers)
        return Effect.flatMap(
          Effect.zipRight(observed.enter, run(request, false, headers, info)),
          (answer) => {
            const backend = answer.headers["x-gateway-backend"] ?? "unknown"
            const protocol = (detail: string) =>
              new Errors.BackendError({ reason: "Protocol", backend, detail })
            if (answer._tag === "Stream") {
              answer.body.destroy()
              return Effect.fail(protocol("the backend streamed an answer to a whole request"))
            }
            let json: unknown
            try {
              json = JSON.parse(decoder.decode(answer.body))
            } catch {
              return Effect.fail(protocol("the answer is not JSON"))
            }
            return Either.match(decodeCompletion(json), {
              onLeft: (e) => Either.left(protocol(`not a chat.completion: ${e.message.slice(0, 300)}`)),
              onRight: (completion) => Either.right({ ...completion, gateway_request_id: info.requestId })
            })
          }
        ).pipe(
          Effect.onExit((exit) =>
            observed.end(
              exit._tag === "Success"
                ? 200
                : Option.match(Cause.failureOption(exit.cause), { onNone: () => 499, onSome: statusOf })
            )
          ),
          Effect.mapError(withRequestId(info.requestId))
        )
      }
    }
  })
)
