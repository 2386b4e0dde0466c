/**
 * Traces end to end. A real gateway process exports its spans over OTLP/HTTP to a receiver in
 * this test that keeps them in memory; the simulated backend sits behind a recording proxy that
 * shows the `traceparent` it was sent. One request, streamed through the `auto` policy with the
 * client's own `traceparent`, must give one server span continuing the client's trace, with
 * children for auth, route (and classify under it), limit, the attempt (a client span whose
 * context the backend received) and settle; the GenAI attributes on the request span; the trace
 * id on its events and its log lines. Without an exporter the gateway makes no spans and passes
 * the client's `traceparent` to the backend as it came.
 */
import { describe, expect, layer } from "@effect/vitest"
import { createGatewayClient } from "@gateway/client"
import type { RpcSchemas } from "@gateway/domain"
import { Context, Effect, Layer } from "effect"
import * as EventLog from "./support/EventLog.js"
import * as Http from "./support/Http.js"
import * as OtlpReceiver from "./support/OtlpReceiver.js"
import * as Processes from "./support/Processes.js"
import * as RecordingProxy from "./support/RecordingProxy.js"

const outputTokens = 6
const tiers = { simple: "small", moderate: "small", complex: "large" }

const config = (urls: { readonly small: string; readonly large: string }) => ({
  server: { host: "127.0.0.1" },
  pool: Processes.singleAttempt,
  models: [
    { name: "small", backends: [{ id: "small-1", url: urls.small }] },
    { name: "large", backends: [{ id: "large-1", url: urls.large }] }
  ],
  routing: { policies: [{ name: "auto", tiers }] }
})

/** A W3C `traceparent` a client would send, with fresh random ids. */
const clientTrace = () => {
  const hex = (bytes: number) =>
    Array.from(crypto.getRandomValues(new Uint8Array(bytes)), (b) => b.toString(16).padStart(2, "0")).join("")
  const traceId = hex(16)
  const spanId = hex(8)
  return { traceId, spanId, header: `00-${traceId}-${spanId}-01` }
}

const parseTraceparent = (value: unknown) => {
  const match = /^00-([0-9a-f]{32})-([0-9a-f]{16})-0[01]$/.exec(String(value))
  return match === null ? undefined : { traceId: match[1]!, parentId: match[2]! }
}

class Stack extends Context.Tag("test/Tracing/Stack")<
  Stack,
  {
    readonly traced: Processes.Gateway
    readonly untraced: Processes.Gateway
    readonly receiver: OtlpReceiver.OtlpReceiver
    readonly proxy: RecordingProxy.RecordingProxy
    readonly log: EventLog.EventLog
  }
>() {
  static readonly layer = Layer.scoped(
    Stack,
    Effect.gen(function* () {
      // Two different ports (a port just released could be handed out twice).
      const ports = yield* Effect.all({ small: Processes.freePort, large: Processes.freePort }).pipe(
        Effect.repeat({ until: (p) => p.small !== p.large })
      )
      const [small, large] = yield* Effect.all(
        [
          Processes.startSim({
            port: ports.small,
            model: "small",
            ttftMs: 5,
            itlMs: 1,
            outputTokens,
            seed: 1
          }),
          Processes.startSim({
            port: ports.large,
            model: "large",
            ttftMs: 5,
            itlMs: 1,
            outputTokens,
            seed: 2
          })
        ],
        { concurrency: "unbounded" }
      )
      // Both gateways reach `small` through the proxy, which keeps what the backend was sent.
      const proxy = yield* RecordingProxy.make(small.url)
      const receiver = yield* OtlpReceiver.make
      const urls = { small: proxy.url, large: large.url }
      // One after the other: each takes a free port when it starts.
      const traced = yield* Processes.startGateway(config(urls), {
        OTEL_EXPORTER_OTLP_ENDPOINT: receiver.url,
        OTEL_SERVICE_NAME: "gateway-under-test",
        // Export within a tenth of a second rather than the default 5 s.
        OTEL_BSP_SCHEDULE_DELAY: "100"
      })
      const untraced = yield* Processes.startGateway(config(urls))
      const log = yield* EventLog.make(traced.databaseUrl)
      return { traced, untraced, receiver, proxy, log }
    })
  )
}

/** The one request the proxy saw with this `x-request-id`. */
const backendSaw = (proxy: RecordingProxy.RecordingProxy, requestId: string) =>
  Processes.eventually(
    `the backend request of ${requestId}`,
    Effect.sync(() => proxy.requests.find((r) => r.headers["x-request-id"] === requestId))
  )

/** The events of the gateway's request `requestId`, once its RequestCompleted is in the log. */
const completedEvents = (log: EventLog.EventLog, requestId: string) =>
  Processes.eventually(
    `the events of request ${requestId}`,
    Effect.map(
      log.query<{ type: string; metadata: any }>(
        `SELECT type, metadata FROM events WHERE stream_id = $1 ORDER BY stream_version`,
        [`request-${requestId}`]
      ),
      (rows) => (rows.some((r) => r.type === "RequestCompleted") ? rows : undefined)
    )
  )

/**
 * Sends a sampled request and waits for its server span: whatever earlier requests exported has
 * arrived by then, so what is missing was never sent.
 */
const exportedSoFar = (gateway: Processes.Gateway, receiver: OtlpReceiver.OtlpReceiver) =>
  Effect.gen(function* () {
    const marker = clientTrace()
    const after = yield* Http.postChat(
      gateway.url,
      { model: "small", messages: Http.messages },
      { headers: { traceparent: marker.header } }
    )
    yield* Effect.promise(() => after.json())
    yield* Processes.eventually(
      "the later sampled request's spans",
      Effect.sync(
        () => receiver.spans().some((s) => s.traceId === marker.traceId && s.kind === 2) || undefined
      ),
      "10 seconds"
    )
  })

layer(Stack.layer, { excludeTestServices: true, timeout: 60_000 })("Tracing", (it) => {
  describe("with an OTLP endpoint", () => {
    it.effect("one streamed request is one trace: the client's, through the gateway, to the backend", () =>
      Effect.gen(function* () {
        const { traced, receiver, proxy, log } = yield* Stack
        const client = clientTrace()
        const requestId = `trace-${crypto.randomUUID()}`
        const res = yield* Http.postChat(
          traced.url,
          { model: "auto", stream: true, messages: [{ role: "user", content: "Hi there!" }] },
          { headers: { traceparent: client.header, "x-request-id": requestId } }
        )
        expect(res.status).toBe(200)
        const { done } = yield* Http.readSse(res)
        expect(done).toBe(true)

        // The request span ends after the stream; wait for it and its children to be exported.
        const spans = yield* Processes.eventually(
          "the request's spans",
          Effect.sync(() => {
            const ofTrace = receiver.spans().filter((s) => s.traceId === client.traceId)
            return ofTrace.some((s) => s.kind === 2) && ofTrace.some((s) => s.name === "gateway.settle")
              ? ofTrace
              : undefined
          }),
          "10 seconds"
        )
        const server = spans.filter((s) => s.kind === 2)
        expect(server).toHaveLength(1)
        const root = server[0]!
        expect(root.name).toBe("POST /v1/chat/completions")
        expect(root.parentSpanId).toBe(client.spanId)
        expect(root.resource["service.name"]).toBe("gateway-under-test")

        const children = spans.filter((s) => s.parentSpanId === root.spanId).map((s) => s.name)
        expect(children.sort()).toEqual(
          ["gateway.attempt", "gateway.auth", "gateway.limit", "gateway.route", "gateway.settle"].sort()
        )
        const route = spans.find((s) => s.name === "gateway.route")!
        const classify = spans.find((s) => s.name === "gateway.classify")!
        expect(classify.parentSpanId).toBe(route.spanId)
        expect(classify.attributes).toMatchObject({
          "gateway.policy": "auto",
          "gateway.tier": "simple",
          "gateway.acted": true
        })
        expect(route.attributes).toMatchObject({ "gen_ai.request.model": "auto", "gateway.model": "small" })

        // The GenAI semantic conventions on the request span, once the stream is over.
        expect(root.attributes).toMatchObject({
          "gen_ai.operation.name": "chat",
          "gen_ai.request.model": "auto",
          "gen_ai.response.model": "small",
          "gen_ai.usage.output_tokens": outputTokens,
          "gen_ai.response.finish_reasons": ["stop"],
          "gateway.tier": "simple",
          "gateway.backend": "small-1",
          "gateway.stream": true,
          "http.response.status_code": 200
        })
        expect(root.attributes["gen_ai.usage.input_tokens"]).toBeGreaterThan(0)
        expect(root.attributes["gen_ai.server.time_to_first_token"]).toBeGreaterThan(0)
        // Gateway keys never become attributes.
        expect(Object.keys(root.attributes).some((k) => k.includes("authorization"))).toBe(false)

        // The backend got the attempt's span as its parent, in the client's trace.
        const attempt = spans.find((s) => s.name === "gateway.attempt")!
        expect(attempt.kind).toBe(3)
        expect(attempt.attributes).toMatchObject({ "gateway.backend": "small-1", "gateway.attempt": 1 })
        const sent = parseTraceparent((yield* backendSaw(proxy, requestId)).headers.traceparent)
        expect(sent).toEqual({ traceId: client.traceId, parentId: attempt.spanId })

        // The request's events and its access-log line carry the trace.
        const line = yield* traced.accessLog(requestId)
        expect(line.trace_id).toBe(client.traceId)
        expect(line.span_id).toBe(root.spanId)
        const gatewayId = line.request_id as string
        const events = yield* completedEvents(log, gatewayId)
        for (const event of events) {
          expect(event.metadata.traceId).toBe(client.traceId)
          expect(event.metadata.spanId).toBe(root.spanId)
        }
      })
    )

    it.effect("a request without a traceparent starts a trace the backend continues", () =>
      Effect.gen(function* () {
        const { traced, receiver, proxy } = yield* Stack
        const requestId = `trace-${crypto.randomUUID()}`
        const res = yield* Http.postChat(
          traced.url,
          { model: "small", messages: Http.messages },
          { headers: { "x-request-id": requestId } }
        )
        expect(res.status).toBe(200)
        yield* Effect.promise(() => res.json())
        const sent = parseTraceparent((yield* backendSaw(proxy, requestId)).headers.traceparent)
        expect(sent).toBeDefined()
        const spans = yield* Processes.eventually(
          "the new trace's spans",
          Effect.sync(() => {
            const ofTrace = receiver.spans().filter((s) => s.traceId === sent!.traceId)
            return ofTrace.some((s) => s.kind === 2) && ofTrace.some((s) => s.name === "gateway.settle")
              ? ofTrace
              : undefined
          }),
          "10 seconds"
        )
        const root = spans.find((s) => s.kind === 2)!
        expect(root.parentSpanId).toBeUndefined()
        expect(root.attributes).toMatchObject({
          "gen_ai.request.model": "small",
          "gen_ai.response.model": "small",
          "gen_ai.usage.output_tokens": outputTokens,
          "gateway.stream": false
        })
        // A concrete model is not classified.
        expect(spans.some((s) => s.name === "gateway.classify")).toBe(false)
        expect(spans.find((s) => s.name === "gateway.attempt")!.spanId).toBe(sent!.parentId)
      })
    )

    it.effect("a rejected request is a span with the error, and health probes are not traced", () =>
      Effect.gen(function* () {
        const { traced, receiver } = yield* Stack
        const client = clientTrace()
        const res = yield* Http.postChat(
          traced.url,
          { model: "no-such-model", messages: Http.messages },
          { headers: { traceparent: client.header } }
        )
        expect(res.status).toBe(404)
        yield* Effect.promise(() => fetch(`${traced.url}/health`).then((r) => r.text()))
        const root = yield* Processes.eventually(
          "the rejected request's span",
          Effect.sync(() => receiver.spans().find((s) => s.traceId === client.traceId && s.kind === 2)),
          "10 seconds"
        )
        expect(root.attributes["http.response.status_code"]).toBe(404)
        expect(root.attributes["gateway.rejection"] ?? root.attributes["error.type"]).toBeDefined()
        expect(receiver.spans().some((s) => s.name.endsWith("/health"))).toBe(false)
        // Traces start at requests only: no background query or batch of its own.
        const strays = receiver.spans().filter((s) => s.kind !== 2 && s.parentSpanId === undefined)
        expect(strays.map((s) => s.name)).toEqual([])
        expect(receiver.spans().some((s) => s.name.startsWith("sql."))).toBe(false)
      })
    )

    it.effect("a client's unsampled trace is followed: nothing exported, the backend told the same", () =>
      Effect.gen(function* () {
        const { traced, receiver, proxy, log } = yield* Stack
        const client = clientTrace()
        const unsampled = `00-${client.traceId}-${client.spanId}-00`
        const requestId = `trace-${crypto.randomUUID()}`
        const res = yield* Http.postChat(
          traced.url,
          { model: "small", messages: Http.messages },
          { headers: { traceparent: unsampled, "x-request-id": requestId } }
        )
        expect(res.status).toBe(200)
        yield* Effect.promise(() => res.json())
        // Not traced here: the client's own context goes on as it came.
        expect((yield* backendSaw(proxy, requestId)).headers.traceparent).toBe(unsampled)
        // Its trace id still marks the access line and the events (no span of the gateway's).
        const line = yield* traced.accessLog(requestId)
        expect(line.trace_id).toBe(client.traceId)
        expect(line.span_id).toBeUndefined()
        const events = yield* completedEvents(log, line.request_id as string)
        expect(events.map((e) => e.metadata.traceId)).toEqual(events.map(() => client.traceId))
        // Once a later sampled request is exported, so would these spans be, if any.
        yield* exportedSoFar(traced, receiver)
        expect(receiver.spans().filter((s) => s.traceId === client.traceId)).toEqual([])
      })
    )

    it.effect("an RPC completion's call span carries the GenAI attributes; its events carry the span", () =>
      Effect.gen(function* () {
        const { traced, receiver, log } = yield* Stack
        // Keys are off on this gateway: any bearer will do.
        const client = createGatewayClient({ url: traced.url, key: "unused" })
        const answer = yield* Effect.promise(() =>
          client.chat.create({ model: "small", messages: [{ role: "user", content: "Hello there" }] })
        )
        const chunks = yield* Effect.promise(async () => {
          const out: Array<RpcSchemas.CompletionChunk> = []
          for await (const chunk of client.chat.stream({
            model: "small",
            messages: [{ role: "user", content: "Hello again" }]
          }))
            out.push(chunk)
          return out
        })
        yield* Effect.promise(() => client.close())
        const calls = [
          { name: "Rpc.ChatCompletionOnce", requestId: answer.gateway_request_id!, stream: false },
          { name: "Rpc.ChatCompletion", requestId: chunks[0]!.gateway_request_id!, stream: true }
        ]
        for (const call of calls) {
          const span = yield* Processes.eventually(
            `the ${call.name} span`,
            Effect.sync(() =>
              receiver
                .spans()
                .find((s) => s.name === call.name && s.attributes["gateway.request_id"] === call.requestId)
            ),
            "10 seconds"
          )
          expect(span.attributes).toMatchObject({
            "gen_ai.operation.name": "chat",
            "gen_ai.request.model": "small",
            "gen_ai.response.model": "small",
            "gen_ai.usage.output_tokens": outputTokens,
            "gen_ai.response.finish_reasons": ["stop"],
            "gateway.backend": "small-1",
            "gateway.stream": call.stream
          })
          // Under the HTTP request's span, over its own steps.
          const parent = yield* Processes.eventually(
            `the parent of ${call.name}`,
            Effect.sync(() => receiver.spans().find((s) => s.spanId === span.parentSpanId)),
            "10 seconds"
          )
          expect(parent.name).toBe("POST /rpc")
          const children = receiver.spans().filter((s) => s.parentSpanId === span.spanId)
          expect(children.map((s) => s.name)).toContain("gateway.attempt")
          // The completion's events name the call's span, as an HTTP request's name its own.
          const events = yield* completedEvents(log, call.requestId)
          for (const event of events) {
            expect(event.metadata).toMatchObject({ traceId: span.traceId, spanId: span.spanId })
          }
        }
      })
    )

    it.effect(
      "an RPC call under a client's unsampled trace: nothing exported, the client's trace id on its line and events",
      () =>
        Effect.gen(function* () {
          const { traced, receiver, log } = yield* Stack
          const client = clientTrace()
          // The RPC protocol by hand (NDJSON), as a client whose own trace is not sampled sends it.
          const message = {
            _tag: "Request",
            id: "1",
            tag: "ChatCompletionOnce",
            payload: { model: "small", messages: Http.messages },
            traceId: client.traceId,
            spanId: client.spanId,
            sampled: false,
            headers: []
          }
          const res = yield* Effect.promise(() =>
            fetch(`${traced.url}/rpc`, {
              method: "POST",
              headers: {
                "content-type": "application/ndjson",
                traceparent: `00-${client.traceId}-${client.spanId}-00`
              },
              body: `${JSON.stringify(message)}\n`
            })
          )
          expect(res.status).toBe(200)
          const exit = JSON.parse((yield* Effect.promise(() => res.text())).trim())
          expect(exit).toMatchObject({ _tag: "Exit", exit: { _tag: "Success" } })
          const requestId: string = exit.exit.value.gateway_request_id
          const line = yield* Processes.eventually(
            "the RPC call's access line",
            Effect.sync(() => traced.logs().find((l) => l.msg === "request" && l.request_id === requestId)),
            "3 seconds"
          )
          expect(line).toMatchObject({ method: "RPC", path: "ChatCompletionOnce", trace_id: client.traceId })
          expect(line.span_id).toBeUndefined()
          const events = yield* completedEvents(log, requestId)
          for (const event of events) {
            expect(event.metadata.traceId).toBe(client.traceId)
            expect(event.metadata.spanId ?? null).toBeNull()
          }
          // Once a later sampled request is exported, so would these spans be, if any.
          yield* exportedSoFar(traced, receiver)
          expect(receiver.spans().filter((s) => s.attributes["gateway.request_id"] === requestId)).toEqual([])
          expect(receiver.spans().filter((s) => s.traceId === client.traceId)).toEqual([])
        })
    )
  })

  describe("without an exporter", () => {
    it.effect("the client's traceparent reaches the backend unchanged; a malformed one does not", () =>
      Effect.gen(function* () {
        const { untraced, proxy } = yield* Stack
        const client = clientTrace()
        const requestId = `plain-${crypto.randomUUID()}`
        const res = yield* Http.postChat(
          untraced.url,
          { model: "small", messages: Http.messages },
          { headers: { traceparent: client.header, "x-request-id": requestId } }
        )
        expect(res.status).toBe(200)
        yield* Effect.promise(() => res.json())
        expect((yield* backendSaw(proxy, requestId)).headers.traceparent).toBe(client.header)
        const line = yield* untraced.accessLog(requestId)
        expect(line.trace_id).toBeUndefined()

        const junkId = `plain-${crypto.randomUUID()}`
        const junk = yield* Http.postChat(
          untraced.url,
          { model: "small", messages: Http.messages },
          { headers: { traceparent: "not-a-trace", "x-request-id": junkId } }
        )
        expect(junk.status).toBe(200)
        yield* Effect.promise(() => junk.json())
        expect((yield* backendSaw(proxy, junkId)).headers.traceparent).toBeUndefined()
      })
    )
  })
})
