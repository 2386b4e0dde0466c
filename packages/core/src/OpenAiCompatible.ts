/**
 * The adapter for OpenAI-compatible servers (vLLM, TGI, Ollama, OpenAI itself): the request goes
 * out as is (only `model` rewritten when the backend knows it by another name) and the answer
 * comes back byte for byte, so streaming adds no parsing or re-chunking delay.
 *
 * It talks to undici directly rather than through `HttpClient`: this is the hottest I/O on the
 * request path, and undici's own timers and abort signal do here what would otherwise cost a
 * fiber race, a URL parse and two spans per attempt.
 */
import * as Undici from "@effect/platform-node/Undici"
import { Errors } from "@gateway/domain"
import { Effect, Layer, Option, Redacted } from "effect"
import type { Target } from "./Models.js"
import { Settings } from "./Settings.js"
import { type ChatRequest, type ChatResponse, type ProbeResult, StreamIdle, Upstream } from "./Upstream.js"

const encoder = new TextEncoder()

/** The body to send: the client's own bytes unless the backend's model name differs. */
const outgoingBody = (request: ChatRequest): Uint8Array =>
  request.body.model === request.target.upstreamModel
    ? request.raw
    : encoder.encode(JSON.stringify({ ...request.body, model: request.target.upstreamModel }))

const codeOf = (cause: unknown): unknown => (cause as { code?: unknown } | undefined)?.code

const describe = (cause: unknown): string => {
  if (cause instanceof Error) {
    const code = codeOf(cause)
    const inner = (cause as { cause?: unknown }).cause
    const base = typeof code === "string" ? `${code}: ${cause.message}` : cause.message
    return inner instanceof Error && inner.message !== cause.message ? `${base} (${describe(inner)})` : base
  }
  return String(cause)
}

const timeoutCodes = new Set(["UND_ERR_CONNECT_TIMEOUT"])

/** Abort reasons of the attempt's own timers (undici's timers are too coarse below a second). */
class FirstByteTimeout extends Error {}
class TotalTimeout extends Error {}

/** A transport failure before or while reading the answer, as a typed `BackendError`. */
const failure = (target: Target, cause: unknown, phase: "request" | "body"): Errors.BackendError => {
  const backend = target.backend.id
  const code = codeOf(cause)
  if (
    cause instanceof TotalTimeout ||
    cause instanceof FirstByteTimeout ||
    cause instanceof StreamIdle ||
    (typeof code === "string" && timeoutCodes.has(code))
  ) {
    const detail =
      cause instanceof TotalTimeout
        ? `no complete answer within ${target.timeouts.totalMs} ms`
        : cause instanceof FirstByteTimeout
          ? `no first token within ${target.timeouts.firstByteMs} ms`
          : cause instanceof StreamIdle
            ? `no chunk for ${cause.idleMs} ms`
            : describe(cause)
    return new Errors.BackendError({ reason: "Timeout", backend, detail })
  }
  return new Errors.BackendError({
    reason: phase === "request" ? "Connect" : "StreamBroken",
    backend,
    detail: describe(cause)
  })
}

/** Reads a whole body; the attempt's timer bounds the time it takes. */
const readAll = (body: Undici.Dispatcher.ResponseData["body"]): Promise<Uint8Array> =>
  new Promise((resolve, reject) => {
    const chunks: Array<Buffer> = []
    let size = 0
    body.on("data", (chunk: Buffer) => {
      chunks.push(chunk)
      size += chunk.length
    })
    body.once("end", () => resolve(chunks.length === 1 ? chunks[0]! : Buffer.concat(chunks, size)))
    body.once("error", reject)
  })

/** An error answer from the backend, keeping its OpenAI error body when it sent one. */
const httpError = async (
  target: Target,
  response: Undici.Dispatcher.ResponseData
): Promise<Errors.BackendError> => {
  let upstream: unknown
  try {
    const text = await response.body.text()
    try {
      upstream = JSON.parse(text)
    } catch {
      upstream = text.slice(0, 2000)
    }
  } catch {
    // The error status is what matters; an unreadable error body is left out.
  }
  const retryAfter = response.headers["retry-after"]
  return new Errors.BackendError({
    reason: "Http",
    backend: target.backend.id,
    status: response.statusCode,
    detail: `HTTP ${response.statusCode}`,
    upstream,
    ...(typeof retryAfter === "string" ? { retryAfter } : {})
  })
}

const errorMarker = Buffer.from('"error"')

const ignore = () => {}

/**
 * The error a stream's first chunk reports instead of an answer (vLLM writes
 * `data: {"object":"error",…}`, others `data: {"error":{…}}`), or `undefined` for an answer.
 * Parsed only when the chunk names an error at all.
 */
const streamError = (target: Target, chunk: Buffer): Errors.BackendError | undefined => {
  if (chunk.indexOf(errorMarker) === -1) return undefined
  const text = chunk.toString("utf8")
  const start = text.startsWith("data:") ? 0 : text.indexOf("\ndata:") + 1
  if (start === 0 && !text.startsWith("data:")) return undefined
  const lineEnd = text.indexOf("\n", start)
  let event: unknown
  try {
    event = JSON.parse(text.slice(start + 5, lineEnd === -1 ? undefined : lineEnd))
  } catch {
    return undefined
  }
  if (typeof event !== "object" || event === null) return undefined
  const e = event as { error?: unknown; object?: unknown; message?: unknown }
  const reported =
    typeof e.error === "object" && e.error !== null
      ? (e.error as { message?: unknown })
      : e.object === "error"
        ? e
        : undefined
  if (reported === undefined) return undefined
  return new Errors.BackendError({
    reason: "StreamError",
    backend: target.backend.id,
    detail: typeof reported.message === "string" ? reported.message.slice(0, 500) : "error event",
    upstream: event
  })
}

export const make = (dispatcher: Undici.Dispatcher) => {
  const chat = (request: ChatRequest): Effect.Effect<ChatResponse, Errors.BackendError> => {
    const { target } = request
    const stream = request.body.stream === true
    const headers: Record<string, string> = {
      "content-type": "application/json",
      accept: stream ? "text/event-stream" : "application/json",
      "x-request-id": request.clientRequestId ?? request.requestId,
      "x-gateway-request-id": request.requestId
    }
    if (Option.isSome(target.apiKey)) headers.authorization = `Bearer ${Redacted.value(target.apiKey.value)}`
    if (request.traceparent !== undefined) headers.traceparent = request.traceparent

    return Effect.async<ChatResponse, Errors.BackendError>((resume, interrupted) => {
      const controller = new AbortController()
      const onInterrupt = () => controller.abort()
      interrupted.addEventListener("abort", onInterrupt, { once: true })
      const timer = setTimeout(() => controller.abort(new TotalTimeout()), target.timeouts.totalMs)
      const headersTimer = setTimeout(
        () => controller.abort(new FirstByteTimeout()),
        target.timeouts.firstByteMs
      )
      const done = () => {
        clearTimeout(timer)
        clearTimeout(headersTimer)
        interrupted.removeEventListener("abort", onInterrupt)
      }

      dispatcher
        .request({
          origin: target.origin,
          path: target.chatPath,
          method: "POST",
          headers,
          body: outgoingBody(request),
          signal: controller.signal,
          // The attempt's own timers bound headers and total time.
          headersTimeout: 0,
          bodyTimeout: 0
        })
        .then(
          async (response) => {
            if (response.statusCode < 200 || response.statusCode >= 300) {
              clearTimeout(headersTimer)
              const error = await httpError(target, response)
              done()
              return resume(Effect.fail(error))
            }
            if (!stream) {
              clearTimeout(headersTimer)
              try {
                const body = await readAll(response.body)
                done()
                resume(Effect.succeed({ _tag: "Complete", status: response.statusCode, body }))
              } catch (cause) {
                done()
                resume(Effect.fail(failure(target, controller.signal.reason ?? cause, "body")))
              }
              return
            }
            // The first event decides: an answer commits the attempt, an error event fails it
            // (still retryable), and the time-to-first-token timer runs until then.
            const body = response.body
            const settled = () => {
              body.off("data", onFirst)
              body.off("end", onEnd)
              body.off("error", onError)
              clearTimeout(headersTimer)
            }
            const onFirst = (chunk: Buffer) => {
              body.pause()
              settled()
              // From here on a break nobody reads yet (the fiber has not resumed, or the body is
              // dropped) must not become an unhandled 'error' event; the relay adds its own.
              body.on("error", ignore)
              const error = streamError(target, chunk)
              if (error !== undefined) {
                done()
                body.destroy()
                return resume(Effect.fail(error))
              }
              body.unshift(chunk)
              body.once("close", done)
              resume(
                Effect.succeed({
                  _tag: "Streaming",
                  body,
                  failure: (cause) => failure(target, controller.signal.reason ?? cause, "body")
                })
              )
            }
            const onEnd = () => {
              settled()
              done()
              resume(
                Effect.fail(
                  new Errors.BackendError({
                    reason: "Protocol",
                    backend: target.backend.id,
                    detail: "the stream ended before its first event"
                  })
                )
              )
            }
            const onError = (cause: unknown) => {
              settled()
              done()
              resume(Effect.fail(failure(target, controller.signal.reason ?? cause, "body")))
            }
            body.on("data", onFirst)
            body.once("end", onEnd)
            body.once("error", onError)
          },
          (cause) => {
            done()
            resume(Effect.fail(failure(target, controller.signal.reason ?? cause, "request")))
          }
        )
    })
  }

  const probe = (
    target: Target,
    path: string,
    timeoutMs: number
  ): Effect.Effect<ProbeResult, Errors.BackendError> => {
    const headers: Record<string, string> = { accept: "application/json, text/plain" }
    if (Option.isSome(target.apiKey)) headers.authorization = `Bearer ${Redacted.value(target.apiKey.value)}`
    return Effect.tryPromise({
      try: async (signal) => {
        const timeout = AbortSignal.timeout(timeoutMs)
        const response = await dispatcher.request({
          origin: target.origin,
          path,
          method: "GET",
          headers,
          signal: AbortSignal.any([signal, timeout]),
          headersTimeout: 0,
          bodyTimeout: 0
        })
        return { status: response.statusCode, body: await response.body.text() }
      },
      catch: (cause) =>
        (cause as { name?: unknown } | undefined)?.name === "TimeoutError"
          ? new Errors.BackendError({
              reason: "Timeout",
              backend: target.backend.id,
              detail: `no answer to GET ${path} within ${timeoutMs} ms`
            })
          : failure(target, cause, "request")
    })
  }

  return Upstream.of({ chat, probe })
}

/** Keep-alive connection pool to the backends, with the connect timeout from the config. */
export const layer: Layer.Layer<Upstream, never, Settings> = Layer.scoped(
  Upstream,
  Effect.gen(function* () {
    const config = yield* Settings
    const agent = yield* Effect.acquireRelease(
      Effect.sync(
        () =>
          new Undici.Agent({
            connect: { timeout: config.timeouts.connectMs },
            keepAliveTimeout: 30_000,
            connections: 1024
          })
      ),
      (agent) => Effect.promise(() => agent.destroy())
    )
    return make(agent)
  })
)
