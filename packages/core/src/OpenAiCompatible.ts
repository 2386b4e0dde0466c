/**
 * The adapter for OpenAI-compatible servers (vLLM, TGI, Ollama, OpenAI itself): the request goes
 * out as is (only `model` rewritten when the backend knows it by another name) and the answer
 * comes back byte for byte, so streaming adds no parsing or re-chunking delay.
 */
import { HttpClient, HttpClientRequest, type HttpClientResponse } from "@effect/platform"
import { NodeHttpClient } from "@effect/platform-node"
import * as Undici from "@effect/platform-node/Undici"
import { Errors } from "@gateway/domain"
import { Duration, Effect, Layer, Option, Redacted, Stream } from "effect"
import { Settings } from "./Settings.js"
import { type ChatRequest, type ChatResponse, Upstream } from "./Upstream.js"

const encoder = new TextEncoder()

/** The body to send: the client's own bytes unless the backend's model name differs. */
const outgoingBody = (request: ChatRequest): Uint8Array =>
  request.body.model === request.target.upstreamModel
    ? request.raw
    : encoder.encode(JSON.stringify({ ...request.body, model: request.target.upstreamModel }))

const transportReason = (cause: unknown): "Connect" | "Timeout" => {
  const code = (cause as { code?: unknown; cause?: { code?: unknown } } | undefined)?.code
  return code === "UND_ERR_CONNECT_TIMEOUT" ? "Timeout" : "Connect"
}

const describe = (cause: unknown): string => {
  if (cause instanceof Error) {
    const code = (cause as { code?: unknown }).code
    const inner = (cause as { cause?: unknown }).cause
    const base = typeof code === "string" ? `${code}: ${cause.message}` : cause.message
    return inner instanceof Error && inner.message !== cause.message ? `${base} (${describe(inner)})` : base
  }
  return String(cause)
}

/** An error answer from the backend, keeping its OpenAI error body when it sent one. */
const httpError = (backend: string, response: HttpClientResponse.HttpClientResponse) =>
  response.text.pipe(
    Effect.timeout("5 seconds"),
    Effect.option,
    Effect.flatMap((text) => {
      let upstream: unknown
      if (Option.isSome(text)) {
        try {
          upstream = JSON.parse(text.value)
        } catch {
          upstream = text.value.slice(0, 2000)
        }
      }
      return Effect.fail(
        new Errors.BackendError({
          reason: "Http",
          backend,
          status: response.status,
          detail: `HTTP ${response.status}`,
          upstream
        })
      )
    })
  )

export const make = Effect.gen(function* () {
  const client = yield* HttpClient.HttpClient

  const chat = (request: ChatRequest): Effect.Effect<ChatResponse, Errors.BackendError> => {
    const { target } = request
    const backend = target.backend.id
    const stream = request.body.stream === true
    let outgoing = HttpClientRequest.post(target.chatUrl).pipe(
      HttpClientRequest.setHeaders({
        accept: stream ? "text/event-stream" : "application/json",
        "x-request-id": request.requestId
      }),
      HttpClientRequest.bodyUint8Array(outgoingBody(request), "application/json")
    )
    if (Option.isSome(target.apiKey)) {
      outgoing = HttpClientRequest.bearerToken(outgoing, Redacted.value(target.apiKey.value))
    }
    const timeout = (what: string, ms: number) =>
      new Errors.BackendError({ reason: "Timeout", backend, detail: `no ${what} within ${ms} ms` })

    const response = client.execute(outgoing).pipe(
      Effect.catchTag("RequestError", (error) =>
        Effect.fail(
          new Errors.BackendError({
            reason: transportReason(error.cause),
            backend,
            detail: describe(error.cause)
          })
        )
      ),
      Effect.catchTag("ResponseError", (error) =>
        Effect.fail(new Errors.BackendError({ reason: "Protocol", backend, detail: describe(error.cause) }))
      ),
      Effect.timeoutFail({
        duration: Duration.millis(target.timeouts.firstByteMs),
        onTimeout: () => timeout("response headers", target.timeouts.firstByteMs)
      }),
      Effect.flatMap((response) =>
        response.status >= 200 && response.status < 300
          ? Effect.succeed(response)
          : httpError(backend, response)
      )
    )

    if (!stream) {
      return response.pipe(
        Effect.flatMap((response) =>
          response.arrayBuffer.pipe(
            Effect.map(
              (body): ChatResponse => ({
                _tag: "Complete",
                status: response.status,
                body: new Uint8Array(body)
              })
            ),
            Effect.mapError(
              (error) =>
                new Errors.BackendError({ reason: "StreamBroken", backend, detail: describe(error.cause) })
            )
          )
        ),
        Effect.timeoutFail({
          duration: Duration.millis(target.timeouts.totalMs),
          onTimeout: () => timeout("complete answer", target.timeouts.totalMs)
        })
      )
    }

    return response.pipe(
      Effect.map(
        (response): ChatResponse => ({
          _tag: "Streaming",
          body: response.stream.pipe(
            Stream.mapError(
              (error) =>
                new Errors.BackendError({ reason: "StreamBroken", backend, detail: describe(error.cause) })
            ),
            Stream.interruptWhen(
              Effect.sleep(Duration.millis(target.timeouts.totalMs)).pipe(
                Effect.zipRight(Effect.fail(timeout("end of stream", target.timeouts.totalMs)))
              )
            )
          )
        })
      )
    )
  }

  return Upstream.of({ chat })
})

/** Keep-alive connection pool to the backends, with the connect timeout from the config. */
const dispatcher = Layer.scoped(
  NodeHttpClient.Dispatcher,
  Effect.gen(function* () {
    const config = yield* Settings
    return yield* Effect.acquireRelease(
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
  })
)

export const layer: Layer.Layer<Upstream, never, Settings> = Layer.effect(Upstream, make).pipe(
  Layer.provide(NodeHttpClient.layerUndiciWithoutDispatcher),
  Layer.provide(dispatcher)
)
