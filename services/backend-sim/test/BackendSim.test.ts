import { describe, expect, it, layer } from "@effect/vitest"
import * as Effect from "effect/Effect"
import { BackendSim } from "../src/index.js"

const messages = [{ role: "user", content: "Say something about gateways." }]

const chat = (url: string, body: Record<string, unknown>, init: RequestInit = {}): Promise<Response> =>
  fetch(`${url}/v1/chat/completions`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ model: "any", messages, ...body }),
    ...init
  })

interface SseResult {
  readonly chunks: ReadonlyArray<any>
  readonly done: boolean
  readonly broken: boolean
}

/** Reads an SSE body to its end (or until the connection breaks) and parses its `data:` events. */
const readSse = async (res: Response): Promise<SseResult> => {
  const decoder = new TextDecoder()
  const reader = res.body!.getReader()
  let text = ""
  let broken = false
  try {
    for (;;) {
      const { done, value } = await reader.read()
      if (done) break
      text += decoder.decode(value, { stream: true })
    }
  } catch {
    broken = true
  }
  const data = text
    .split("\n\n")
    .filter((event) => event.startsWith("data: "))
    .map((event) => event.slice("data: ".length))
  const done = data.at(-1) === "[DONE]"
  return { chunks: data.filter((d) => d !== "[DONE]").map((d) => JSON.parse(d)), done, broken }
}

const contentOf = (chunks: ReadonlyArray<any>): string =>
  chunks.map((c) => c.choices[0]?.delta?.content ?? "").join("")

/** Polls `check` every few ms until it passes (returns its value) or `timeoutMs` runs out. */
const eventually = async <A>(check: () => Promise<A | undefined>, timeoutMs = 2000): Promise<A> => {
  const deadline = Date.now() + timeoutMs
  for (;;) {
    const value = await check()
    if (value !== undefined) return value
    if (Date.now() > deadline) throw new Error("condition not reached in time")
    await new Promise((resolve) => setTimeout(resolve, 5))
  }
}

const withSim = async <A>(
  options: Parameters<typeof BackendSim.start>[0],
  f: (sim: BackendSim.Handle) => Promise<A>
): Promise<A> => {
  const sim = await BackendSim.start(options)
  try {
    return await f(sim)
  } finally {
    await sim.close()
  }
}

layer(BackendSim.layer({ model: "sim-test", ttftMs: 2, itlMs: 1, outputTokens: 8 }), {
  excludeTestServices: true
})("a running simulator", (it) => {
  it.effect("answers a chat completion with the OpenAI shape and usage", () =>
    Effect.gen(function* () {
      const sim = yield* BackendSim.BackendSim
      const res = yield* Effect.promise(() => chat(sim.url, {}))
      expect(res.status).toBe(200)
      const body: any = yield* Effect.promise(() => res.json())
      expect(body).toMatchObject({
        object: "chat.completion",
        model: "sim-test",
        choices: [{ index: 0, message: { role: "assistant" }, finish_reason: "stop" }]
      })
      expect(body.id).toMatch(/^chatcmpl-/)
      expect(typeof body.created).toBe("number")
      expect(body.choices[0].message.content.split(" ")).toHaveLength(8)
      expect(body.usage.completion_tokens).toBe(8)
      expect(body.usage.prompt_tokens).toBeGreaterThan(0)
      expect(body.usage.total_tokens).toBe(body.usage.prompt_tokens + 8)
    })
  )

  it.effect("streams one chunk per token, then the finish chunk, usage only when asked, then [DONE]", () =>
    Effect.gen(function* () {
      const sim = yield* BackendSim.BackendSim
      const withUsage = yield* Effect.promise(async () => {
        const res = await chat(sim.url, { stream: true, stream_options: { include_usage: true } })
        expect(res.headers.get("content-type")).toMatch(/^text\/event-stream/)
        return readSse(res)
      })
      expect(withUsage.done).toBe(true)
      const [role, ...rest] = withUsage.chunks
      expect(role.choices[0].delta).toEqual({ role: "assistant", content: "" })
      const content = rest.filter((c) => c.choices[0]?.delta?.content !== undefined)
      expect(content).toHaveLength(8)
      const finish = rest.find((c) => c.choices[0]?.finish_reason != null)
      expect(finish.choices[0]).toMatchObject({ delta: {}, finish_reason: "stop" })
      const usage = withUsage.chunks.at(-1)
      expect(usage.choices).toEqual([])
      expect(usage.usage.completion_tokens).toBe(8)
      for (const chunk of withUsage.chunks) {
        expect(chunk).toMatchObject({ object: "chat.completion.chunk", id: role.id, model: "sim-test" })
      }

      const withoutUsage = yield* Effect.promise(async () => readSse(await chat(sim.url, { stream: true })))
      expect(withoutUsage.done).toBe(true)
      expect(withoutUsage.chunks.some((c) => c.usage !== undefined)).toBe(false)
      expect(withoutUsage.chunks.at(-1).choices[0].finish_reason).toBe("stop")
    })
  )

  it.effect("stops at max_tokens / max_completion_tokens with finish_reason length", () =>
    Effect.gen(function* () {
      const sim = yield* BackendSim.BackendSim
      const body: any = yield* Effect.promise(async () => (await chat(sim.url, { max_tokens: 3 })).json())
      expect(body.choices[0].finish_reason).toBe("length")
      expect(body.usage.completion_tokens).toBe(3)
      const streamed = yield* Effect.promise(async () =>
        readSse(await chat(sim.url, { stream: true, max_completion_tokens: 2, max_tokens: 50 }))
      )
      expect(contentOf(streamed.chunks).split(" ")).toHaveLength(2)
      expect(streamed.chunks.at(-1).choices[0].finish_reason).toBe("length")
      const roomy: any = yield* Effect.promise(async () => (await chat(sim.url, { max_tokens: 100 })).json())
      expect(roomy.choices[0].finish_reason).toBe("stop")
    })
  )

  it.effect("rejects bad requests and unknown routes with OpenAI error bodies", () =>
    Effect.gen(function* () {
      const sim = yield* BackendSim.BackendSim
      const badJson = yield* Effect.promise(() =>
        fetch(`${sim.url}/v1/chat/completions`, { method: "POST", body: "{not json" })
      )
      expect(badJson.status).toBe(400)
      const noMessages = yield* Effect.promise(() => chat(sim.url, { messages: undefined }))
      expect(noMessages.status).toBe(400)
      expect(yield* Effect.promise(() => noMessages.json())).toEqual({
        error: { message: expect.any(String), type: "invalid_request_error", param: "messages", code: null }
      })
      const missing = yield* Effect.promise(() => fetch(`${sim.url}/v1/embeddings`, { method: "POST" }))
      expect(missing.status).toBe(404)
      expect(((yield* Effect.promise(() => missing.json())) as any).error.type).toBe("invalid_request_error")
    })
  )

  it.effect("serves /v1/models, /health and vLLM-style /metrics", () =>
    Effect.gen(function* () {
      const sim = yield* BackendSim.BackendSim
      const models: any = yield* Effect.promise(async () => (await fetch(`${sim.url}/v1/models`)).json())
      expect(models).toMatchObject({ object: "list", data: [{ id: "sim-test", object: "model" }] })
      const health = yield* Effect.promise(() => fetch(`${sim.url}/health`))
      expect(health.status).toBe(200)
      expect(yield* Effect.promise(() => health.json())).toEqual({ status: "ok" })
      const before = yield* sim.stats
      const metrics = yield* Effect.promise(async () => (await fetch(`${sim.url}/metrics`)).text())
      expect(metrics).toContain('vllm:num_requests_running{model_name="sim-test"} 0')
      expect(metrics).toContain('vllm:num_requests_waiting{model_name="sim-test"} 0')
      expect(metrics).toContain(
        `vllm:generation_tokens_total{model_name="sim-test"} ${before.completionTokens}`
      )
      expect(metrics).toContain(`sim_requests_total{model_name="sim-test"} ${before.requests}`)
    })
  )
})

describe("BackendSim faults and controls", () => {
  it("gives the same content and fault decisions for the same seed, and other content for another", async () => {
    const run = (seed: number) =>
      withSim({ seed, ttftMs: 0, itlMs: 0, errorRate: 0.5 }, async (sim) => {
        const out: Array<string> = []
        for (let i = 0; i < 16; i++) {
          const res = await chat(sim.url, {})
          out.push(
            res.status === 200 ? ((await res.json()) as any).choices[0].message.content : `${res.status}`
          )
        }
        return out
      })
    const [a, b, c] = await Promise.all([run(42), run(42), run(43)])
    expect(a).toEqual(b)
    expect(a).not.toEqual(c)
    expect(a).toContain("500")
    expect(a.some((x) => x !== "500")).toBe(true)
  })

  it("runs at most `capacity` requests and queues the rest FIFO", async () => {
    await withSim({ capacity: 2, ttftMs: 150, itlMs: 0 }, async (sim) => {
      const responses = Array.from({ length: 5 }, () => chat(sim.url, {}))
      const metrics = await eventually(async () => {
        const text = await (await fetch(`${sim.url}/metrics`)).text()
        return /num_requests_running\{[^}]*\} 2\n/.test(text) &&
          /num_requests_waiting\{[^}]*\} 3\n/.test(text)
          ? text
          : undefined
      })
      expect(metrics).toBeDefined()
      expect((await Promise.all(responses)).map((r) => r.status)).toEqual([200, 200, 200, 200, 200])
      expect(sim.stats()).toMatchObject({ running: 0, waiting: 0, peakRunning: 2, completed: 5 })
    })
  })

  it("injects errors with the configured status and an OpenAI error body", async () => {
    await withSim({ errorRate: 1, errorStatus: 503 }, async (sim) => {
      const res = await chat(sim.url, { stream: true })
      expect(res.status).toBe(503)
      expect(await res.json()).toEqual({
        error: { message: expect.any(String), type: "server_error", param: null, code: "injected_error" }
      })
      expect(sim.stats().errorsInjected).toBe(1)
    })
  })

  it("breaks a stream after N content chunks: the client sees a truncated stream without [DONE]", async () => {
    for (const itlMs of [0, 2]) {
      await withSim({ ttftMs: 1, itlMs, outputTokens: 10, breakAfterChunks: 3 }, async (sim) => {
        const result = await readSse(await chat(sim.url, { stream: true }))
        expect(result.broken).toBe(true)
        expect(result.done).toBe(false)
        expect(contentOf(result.chunks).split(" ")).toHaveLength(3)
        expect(sim.stats().breaksInjected).toBe(1)
        // Non-streaming requests are not affected.
        expect((await chat(sim.url, {})).status).toBe(200)
      })
    }
  })

  it("refuses connections while asked to, then serves again on the same port", async () => {
    await withSim({ refuseConnections: true, ttftMs: 0, itlMs: 0 }, async (sim) => {
      const refused = await chat(sim.url, {}).then(
        () => undefined,
        (error: any) => error.cause?.code
      )
      expect(refused).toBe("ECONNREFUSED")
      await sim.setRefusing(false)
      expect((await chat(sim.url, {})).status).toBe(200)
      expect(sim.url).toBe(`http://127.0.0.1:${sim.port}`)
      await sim.setRefusing(true)
      const again = await chat(sim.url, {}).then(
        () => undefined,
        (error: any) => error.cause?.code
      )
      expect(again).toBe("ECONNREFUSED")
    })
  })

  it("lets in-flight streams finish when it starts refusing, without keeping their connections", async () => {
    await withSim({ ttftMs: 40, itlMs: 2, outputTokens: 4 }, async (sim) => {
      const inFlight = await chat(sim.url, { stream: true })
      await sim.setRefusing(true)
      const result = await readSse(inFlight)
      expect(result.done).toBe(true)
      const next = await chat(sim.url, {}).then(
        (res) => res.status,
        (error: any) => error.cause?.code
      )
      expect(next).toBe("ECONNREFUSED")
    })
  })

  it("counts a client that goes away mid-stream as aborted and stops generating for it", async () => {
    await withSim({ ttftMs: 1, itlMs: 10, outputTokens: 200 }, async (sim) => {
      const controller = new AbortController()
      const res = await chat(sim.url, { stream: true }, { signal: controller.signal })
      const reader = res.body!.getReader()
      await reader.read()
      controller.abort()
      const stats = await eventually(async () => {
        const s = sim.stats()
        return s.aborted === 1 && s.running === 0 ? s : undefined
      })
      await new Promise((resolve) => setTimeout(resolve, 40))
      expect(sim.stats().completionTokens).toBe(stats.completionTokens)
      expect(stats.completionTokens).toBeLessThan(200)
      expect(stats.completed).toBe(0)
    })
  })

  it("keeps a hung request open until the client gives up", async () => {
    await withSim({ hangRate: 1 }, async (sim) => {
      const outcome = await chat(sim.url, {}, { signal: AbortSignal.timeout(100) }).then(
        () => "answered",
        (error: any) => error.name
      )
      expect(outcome).toBe("TimeoutError")
      await eventually(async () =>
        sim.stats().aborted === 1 && sim.stats().hanging === 0 ? true : undefined
      )
    })
  })

  it("delays the first token of slow requests", async () => {
    await withSim({ ttftMs: 1, itlMs: 0, slowFirstTokenRate: 1, slowFirstTokenMs: 150 }, async (sim) => {
      const started = Date.now()
      expect((await chat(sim.url, {})).status).toBe(200)
      expect(Date.now() - started).toBeGreaterThanOrEqual(145)
    })
  })

  it("derives the completion length from the prompt in prompt mode, clamped to maxOutputTokens", async () => {
    await withSim({ ttftMs: 0, itlMs: 0, outputMode: "prompt", outputRatio: 0.5 }, async (sim) => {
      const body: any = await (
        await chat(sim.url, { messages: [{ role: "user", content: "x".repeat(400) }] })
      ).json()
      expect(body.usage.completion_tokens).toBe(Math.ceil(body.usage.prompt_tokens * 0.5))
      await sim.update({ maxOutputTokens: 10 })
      const clamped: any = await (
        await chat(sim.url, { messages: [{ role: "user", content: "x".repeat(400) }] })
      ).json()
      expect(clamped.usage.completion_tokens).toBe(10)
    })
  })

  it("applies POST /sim/config at runtime: a backend can fail, then heal", async () => {
    await withSim({ ttftMs: 0, itlMs: 0 }, async (sim) => {
      const configure = (patch: unknown) =>
        fetch(`${sim.url}/sim/config`, { method: "POST", body: JSON.stringify(patch) })
      expect((await configure({ errorRate: 1, errorStatus: 429 })).status).toBe(200)
      expect((await chat(sim.url, {})).status).toBe(429)
      expect((await configure({ errorRate: 0, outputTokens: 4 })).status).toBe(200)
      const body: any = await (await chat(sim.url, {})).json()
      expect(body.usage.completion_tokens).toBe(4)
      const invalid = await configure({ errorRate: 2 })
      expect(invalid.status).toBe(400)
      expect(((await invalid.json()) as any).error.message).toContain("errorRate")
      const stats: any = await (await fetch(`${sim.url}/sim/stats`)).json()
      expect(stats).toMatchObject({ requests: 2, completed: 1, errorsInjected: 1 })
    })
  })

  it.scopedLive("make fails with a typed error when the port is taken", () =>
    Effect.gen(function* () {
      const first = yield* BackendSim.make()
      const error = yield* Effect.flip(BackendSim.make({ port: first.port }))
      expect(error._tag).toBe("BackendSimError")
      expect(error.reason).toBe("Listen")
      const invalid = yield* Effect.flip(BackendSim.make({ capacity: 0 }))
      expect(invalid.reason).toBe("InvalidOptions")
    })
  )
})
