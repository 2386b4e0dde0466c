/**
 * What a client gets over plain HTTP when something is wrong: its own request, the model name,
 * the body size, or the backend (down, failing, hanging, breaking off a stream). Every error has
 * the OpenAI shape, a JSON content type and an `x-request-id`, and none of them hurts the gateway.
 */
import { expect, layer } from "@effect/vitest"
import { Context, Effect, Layer } from "effect"
import { contentChunks, expectOpenAiError, messages, postChat, readSse } from "./support/Http.js"
import * as Processes from "./support/Processes.js"

const maxBodyBytes = 1024
/** `impatient` waits this long for the backend's response headers. */
const firstByteMs = 300
/** `short-lived` allows this long for a whole answer. */
const totalMs = 600

class Stack extends Context.Tag("test/ErrorPaths/Stack")<
  Stack,
  { readonly sim: Processes.Sim; readonly gateway: Processes.Gateway }
>() {
  static readonly layer = Layer.scoped(
    Stack,
    Effect.gen(function* () {
      const simPort = yield* Processes.freePort
      const simUrl = `http://127.0.0.1:${simPort}`
      // Nothing listens there: connections are refused.
      const deadPort = yield* Processes.freePort
      const [sim, gateway] = yield* Effect.all(
        [
          Processes.startSim({
            port: simPort,
            model: "small",
            ttftMs: 5,
            itlMs: 2,
            outputTokens: 8,
            seed: 1
          }),
          Processes.startGateway({
            server: { host: "127.0.0.1", max_body_bytes: maxBodyBytes },
            pool: Processes.singleAttempt,
            timeouts: { connect_ms: 1000, first_byte_ms: 5000, total_ms: 20_000 },
            // A client gone mid-stream: its answer is read for this long (for its usage), then dropped.
            metering: { drain_after_disconnect_ms: 300 },
            models: [
              { name: "small", backends: [{ id: "small-1", url: simUrl }] },
              {
                name: "impatient",
                timeouts: { first_byte_ms: firstByteMs },
                backends: [{ id: "impatient-1", url: simUrl }]
              },
              {
                name: "short-lived",
                timeouts: { total_ms: totalMs },
                backends: [{ id: "short-lived-1", url: simUrl }]
              },
              { name: "down", backends: [{ id: "down-1", url: `http://127.0.0.1:${deadPort}` }] }
            ]
          })
        ],
        { concurrency: "unbounded" }
      )
      return { sim, gateway }
    })
  )
}

const elapsedSince = (start: number) => performance.now() - start

/** A chat request of about 4 KB, four times `max_body_bytes`. */
const oversized = JSON.stringify({ model: "small", messages: [{ role: "user", content: "x".repeat(4096) }] })

/**
 * POSTs `body` in 512-byte chunks without a content-length (`transfer-encoding: chunked`): the
 * response, or the code of the connection error that came instead.
 */
const postChunked = (baseUrl: string, body: string): Effect.Effect<Response | { readonly code: string }> =>
  Effect.promise(() => {
    const bytes = new TextEncoder().encode(body)
    const init = {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: new ReadableStream<Uint8Array>({
        start(controller) {
          for (let i = 0; i < bytes.length; i += 512) controller.enqueue(bytes.subarray(i, i + 512))
          controller.close()
        }
      }),
      duplex: "half"
    }
    return fetch(`${baseUrl}/v1/chat/completions`, init as RequestInit).catch((error: unknown) => ({
      code: String((error as { cause?: { code?: unknown } }).cause?.code ?? error)
    }))
  })

/**
 * Starts a long stream on `small` (500 tokens 20 ms apart), reads until its first content token
 * and hangs up. Needs a scope: the simulator's pace is restored when it closes.
 */
const abandonStream = (requestId: string) =>
  Effect.gen(function* () {
    const { gateway, sim } = yield* Stack
    yield* sim.withConfig({ itlMs: 20, outputTokens: 500 })
    const controller = new AbortController()
    const res = yield* postChat(
      gateway.url,
      { model: "small", messages, stream: true },
      { headers: { "x-request-id": requestId }, signal: controller.signal }
    )
    expect(res.status).toBe(200)
    yield* Effect.promise(async () => {
      const reader = res.body!.getReader()
      const decoder = new TextDecoder()
      let text = ""
      while (!/"content":"[^"]/.test(text)) {
        const { done, value } = await reader.read()
        if (done) throw new Error("the stream ended before any content")
        text += decoder.decode(value, { stream: true })
      }
      controller.abort()
    })
  })

layer(Stack.layer, { excludeTestServices: true })("error answers of the gateway", (it) => {
  it.effect("malformed JSON is a 400 invalid_json", () =>
    Effect.gen(function* () {
      const { gateway } = yield* Stack
      const res = yield* postChat(gateway.url, '{"model": "small", "messages": [')
      const error = yield* expectOpenAiError(res, { status: 400, code: "invalid_json", param: null })
      expect(error.type).toBe("invalid_request_error")
    })
  )

  it.effect("a body that is JSON but not an object is a 400", () =>
    Effect.gen(function* () {
      const { gateway } = yield* Stack
      const res = yield* postChat(gateway.url, "[1, 2, 3]")
      yield* expectOpenAiError(res, { status: 400, code: "invalid_request", param: null })
    })
  )

  const schemaCases = [
    {
      name: "temperature of the wrong type",
      patch: { temperature: "hot" },
      param: "temperature",
      code: "invalid_value"
    },
    {
      name: "temperature out of range",
      patch: { temperature: 3 },
      param: "temperature",
      code: "invalid_value"
    },
    { name: "an empty messages array", patch: { messages: [] }, param: "messages", code: "invalid_value" },
    {
      name: "missing messages",
      patch: { messages: undefined },
      param: "messages",
      code: "missing_required_parameter"
    },
    {
      name: "missing model",
      patch: { model: undefined },
      param: "model",
      code: "missing_required_parameter"
    },
    {
      name: "an unknown role",
      patch: { messages: [{ role: "robot", content: "hi" }] },
      param: "messages.[0].role",
      code: "invalid_value"
    },
    {
      name: "a bad second message",
      patch: { messages: [...messages, { role: "user", content: 42 }] },
      param: "messages.[1].content",
      code: "invalid_value"
    },
    { name: "max_tokens of 0", patch: { max_tokens: 0 }, param: "max_tokens", code: "invalid_value" },
    { name: "stream not a boolean", patch: { stream: "yes" }, param: "stream", code: "invalid_value" }
  ]

  it.effect.each(schemaCases)("$name is a 400 naming '$param', and never reaches the backend", (c) =>
    Effect.gen(function* () {
      const { gateway, sim } = yield* Stack
      const before = yield* sim.stats
      const res = yield* postChat(gateway.url, { model: "small", messages, ...c.patch })
      const error = yield* expectOpenAiError(res, { status: 400, code: c.code, param: c.param })
      expect(error.type).toBe("invalid_request_error")
      const after = yield* sim.stats
      expect(after.requests + after.badRequests).toBe(before.requests + before.badRequests)
    })
  )

  it.effect("an unknown model is a 404 model_not_found", () =>
    Effect.gen(function* () {
      const { gateway } = yield* Stack
      const res = yield* postChat(gateway.url, { model: "no-such-model", messages })
      const error = yield* expectOpenAiError(res, { status: 404, code: "model_not_found", param: "model" })
      expect(error.message).toContain("no-such-model")
      const retrieve = yield* Effect.promise(() => fetch(`${gateway.url}/v1/models/no-such-model`))
      yield* expectOpenAiError(retrieve, { status: 404, code: "model_not_found" })
    })
  )

  it.effect("a body over max_body_bytes with a content-length is a 413 request_too_large", () =>
    Effect.gen(function* () {
      const { gateway } = yield* Stack
      const res = yield* postChat(gateway.url, oversized)
      yield* expectOpenAiError(res, { status: 413, code: "request_too_large" })
    })
  )

  it.effect("a chunked body over max_body_bytes always gets its 413 and never reaches the backend", () =>
    Effect.gen(function* () {
      const { gateway, sim } = yield* Stack
      const before = yield* sim.stats
      for (let i = 0; i < 50; i++) {
        const outcome = yield* postChunked(gateway.url, oversized)
        expect(outcome).toBeInstanceOf(Response)
        yield* expectOpenAiError(outcome as Response, { status: 413, code: "request_too_large" })
      }
      const after = yield* sim.stats
      expect(after.requests + after.badRequests).toBe(before.requests + before.badRequests)
    })
  )

  it.effect("a backend that refuses connections is a 502 backend_unavailable, streamed or not", () =>
    Effect.gen(function* () {
      const { gateway } = yield* Stack
      for (const stream of [false, true]) {
        const start = performance.now()
        const res = yield* postChat(
          gateway.url,
          { model: "down", messages, stream },
          { headers: { "x-request-id": `e2e-down-${stream}` } }
        )
        const error = yield* expectOpenAiError(res, { status: 502, code: "backend_unavailable" })
        expect(error.type).toBe("api_error")
        expect(elapsedSince(start)).toBeLessThan(2000)
        const line = yield* gateway.accessLog(`e2e-down-${stream}`)
        expect(line).toMatchObject({ status: 502, model: "down", backend: "down-1", stream })
      }
    })
  )

  it.scoped("a backend's HTTP error comes back with its status and OpenAI error body", () =>
    Effect.gen(function* () {
      const { gateway, sim } = yield* Stack
      for (const { status, stream, type, code } of [
        { status: 500, stream: false, type: "server_error", code: "injected_error" },
        { status: 429, stream: true, type: "requests", code: "rate_limit_exceeded" }
      ]) {
        yield* sim.withConfig({ errorRate: 1, errorStatus: status })
        const res = yield* postChat(
          gateway.url,
          { model: "small", messages, stream },
          { headers: { "x-request-id": `e2e-backend-${status}` } }
        )
        const error = yield* expectOpenAiError(res, { status, code, param: null })
        expect(error).toEqual({
          message: `Simulated backend error (status ${status})`,
          type,
          param: null,
          code
        })
      }
    })
  )

  it.scoped("a backend that never answers is a 504 backend_timeout, and the gateway lets go of it", () =>
    Effect.gen(function* () {
      const { gateway, sim } = yield* Stack
      yield* sim.withConfig({ hangRate: 1 })
      yield* Effect.forEach(
        [false, true],
        (stream) =>
          Effect.gen(function* () {
            const start = performance.now()
            const res = yield* postChat(gateway.url, { model: "impatient", messages, stream })
            const error = yield* expectOpenAiError(res, { status: 504, code: "backend_timeout" })
            expect(error.type).toBe("timeout_error")
            const elapsed = elapsedSince(start)
            expect(elapsed).toBeGreaterThanOrEqual(firstByteMs - 20)
            // Bounded, whatever the timer resolution (total_ms is 20 s here).
            expect(elapsed).toBeLessThan(3000)
          }),
        { concurrency: "unbounded" }
      )
      // The backend no longer holds the requests the gateway gave up on.
      yield* Processes.eventually(
        "the backend has no hanging request left",
        Effect.map(sim.stats, (s) => (s.hanging === 0 ? true : undefined))
      )
    })
  )

  it.scoped("a backend that never answers is a 504 within first_byte_ms (+250 ms)", () =>
    Effect.gen(function* () {
      const { gateway, sim } = yield* Stack
      yield* sim.withConfig({ hangRate: 1 })
      const start = performance.now()
      const res = yield* postChat(gateway.url, { model: "impatient", messages })
      expect(res.status).toBe(504)
      expect(elapsedSince(start)).toBeLessThan(firstByteMs + 250)
    })
  )

  it.scoped("a stream longer than total_ms ends with a backend_timeout event and no [DONE]", () =>
    Effect.gen(function* () {
      const { gateway, sim } = yield* Stack
      // 100 tokens 50 ms apart: 5 s, well over the 600 ms allowed.
      yield* sim.withConfig({ itlMs: 50, outputTokens: 100 })
      const start = performance.now()
      const res = yield* postChat(gateway.url, { model: "short-lived", messages, stream: true })
      expect(res.status).toBe(200)
      expect(res.headers.get("content-type")).toMatch(/^text\/event-stream/)
      const { events, done } = yield* readSse(res)
      expect(elapsedSince(start)).toBeLessThan(3000)
      expect(done).toBe(false)
      expect(contentChunks(events).length).toBeGreaterThan(0)
      expect(contentChunks(events).length).toBeLessThan(100)
      expect(events.at(-1)).toMatchObject({ error: { code: "backend_timeout" } })
    })
  )

  it.scoped("a stream the backend breaks off ends with one backend_stream_broken event and no [DONE]", () =>
    Effect.gen(function* () {
      const { gateway, sim } = yield* Stack
      yield* sim.withConfig({ breakAfterChunks: 3 })
      const requestId = "e2e-broken-stream"
      const res = yield* postChat(
        gateway.url,
        { model: "small", messages, stream: true },
        { headers: { "x-request-id": requestId } }
      )
      expect(res.status).toBe(200)
      expect(res.headers.get("x-request-id")).toBe(requestId)
      const { events, done } = yield* readSse(res)
      expect(done).toBe(false)
      expect(contentChunks(events)).toHaveLength(3)
      const errors = events.filter((e) => e.error !== undefined)
      expect(errors).toHaveLength(1)
      expect(events.at(-1)).toBe(errors[0])
      expect(errors[0].error).toMatchObject({ code: "backend_stream_broken", message: expect.any(String) })
      const line = yield* gateway.accessLog(requestId)
      expect(line).toMatchObject({ status: 200, stream: true, backend: "small-1" })
      expect(line.error).toEqual(expect.any(String))
    })
  )

  it.scoped(
    "a client that goes away mid-stream makes the gateway abort the backend request after the drain bound",
    () =>
      Effect.gen(function* () {
        const { sim } = yield* Stack
        const before = yield* sim.stats
        yield* abandonStream("e2e-client-gone")
        const after = yield* Processes.eventually(
          "the backend saw the request aborted",
          Effect.map(sim.stats, (s) => (s.aborted > before.aborted && s.running === 0 ? s : undefined))
        )
        expect(after.aborted).toBe(before.aborted + 1)
        expect(after.completed).toBe(before.completed)
      })
  )

  it.scoped("a stream the client abandoned is logged with status 499", () =>
    Effect.gen(function* () {
      const { gateway } = yield* Stack
      yield* abandonStream("e2e-client-gone-log")
      const line = yield* gateway.accessLog("e2e-client-gone-log")
      expect(line).toMatchObject({ stream: true, status: 499 })
    })
  )

  it.scoped("a client that gives up before the answer makes the gateway drop the backend request", () =>
    Effect.gen(function* () {
      const { gateway, sim } = yield* Stack
      yield* sim.withConfig({ hangRate: 1 })
      const before = yield* sim.stats
      const controller = new AbortController()
      const answer = yield* postChat(
        gateway.url,
        { model: "impatient", messages },
        { signal: controller.signal }
      ).pipe(Effect.fork)
      yield* Processes.eventually(
        "the backend holds the request",
        Effect.map(sim.stats, (s) => (s.hanging === before.hanging + 1 ? true : undefined))
      )
      controller.abort()
      yield* Effect.ignore(answer.await)
      // Well before first_byte_ms would end it anyway.
      yield* Processes.eventually(
        "the backend saw the request aborted",
        Effect.map(sim.stats, (s) => (s.hanging === before.hanging ? true : undefined)),
        "250 millis"
      )
    })
  )

  it.scoped("a non-streamed request whose client went away is still logged", () =>
    Effect.gen(function* () {
      const { gateway, sim } = yield* Stack
      yield* sim.withConfig({ ttftMs: 300 })
      const requestId = "e2e-gone-before-answer"
      const controller = new AbortController()
      const answer = yield* postChat(
        gateway.url,
        { model: "small", messages },
        { headers: { "x-request-id": requestId }, signal: controller.signal }
      ).pipe(Effect.fork)
      yield* Processes.eventually(
        "the backend works on the request",
        Effect.map(sim.stats, (s) => (s.running === 1 ? true : undefined))
      )
      controller.abort()
      yield* Effect.ignore(answer.await)
      const line = yield* gateway.accessLog(requestId, "1 second")
      expect(line.status).toBe(499)
    })
  )

  it.effect("an unknown route or method is a 404 unknown_url", () =>
    Effect.gen(function* () {
      const { gateway } = yield* Stack
      const unknownPath = yield* Effect.promise(() => fetch(`${gateway.url}/v1/nothing-here`))
      yield* expectOpenAiError(unknownPath, { status: 404, code: "unknown_url" })
      const wrongMethod = yield* Effect.promise(() => fetch(`${gateway.url}/v1/chat/completions`))
      yield* expectOpenAiError(wrongMethod, { status: 404, code: "unknown_url" })
    })
  )

  it.effect("after all of that the gateway still runs, is healthy, and never answered 500", () =>
    Effect.gen(function* () {
      const { gateway } = yield* Stack
      expect(gateway.child.exitCode()).toBeUndefined()
      const health = yield* Effect.promise(() => fetch(`${gateway.url}/health`))
      expect(health.status).toBe(200)
      const ready = yield* Effect.promise(() => fetch(`${gateway.url}/ready`))
      expect(ready.status).toBe(200)
      const requests = gateway.logs().filter((l) => l.msg === "request")
      expect(requests.length).toBeGreaterThan(20)
      // The one 500 passed on from the backend on purpose aside.
      expect(requests.filter((l) => l.status === 500 && l.client_request_id !== "e2e-backend-500")).toEqual(
        []
      )
      expect(gateway.logs().filter((l) => l.level === "error" || l.level === "fatal")).toEqual([])
      expect(gateway.child.stderr).toEqual([])
    })
  )
})
