/**
 * How the simulator answers an injected error: `errorMode: "status"` (the default) with the error
 * status, `errorMode: "event"` as vLLM does when generation fails in a stream — HTTP 200 and one
 * error event — while a non-streaming request still gets the status.
 */
import { describe, expect, it } from "@effect/vitest"
import * as SimServer from "../src/SimServer.js"

const messages = [{ role: "user", content: "Say something about gateways." }]

const chat = (url: string, body: Record<string, unknown>): Promise<Response> =>
  fetch(`${url}/v1/chat/completions`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ model: "any", messages, ...body })
  })

const withSim = async <A>(
  options: Parameters<typeof SimServer.start>[0],
  f: (sim: SimServer.SimServer) => Promise<A>
): Promise<A> => {
  const sim = await SimServer.start(options)
  try {
    return await f(sim)
  } finally {
    await sim.close()
  }
}

/** The OpenAI error body of an error status. */
const expectStatusError = async (res: Response, status: number, type: string) => {
  expect(res.status).toBe(status)
  expect(res.headers.get("content-type")).toMatch(/^application\/json/)
  expect(await res.json()).toEqual({
    error: {
      message: expect.stringContaining(`status ${status}`),
      type,
      param: null,
      code: expect.any(String)
    }
  })
}

describe("BackendSim errorMode", () => {
  it("event: a stream gets 200 and a single error event, without [DONE]", async () => {
    await withSim({ errorRate: 1, errorStatus: 503, errorMode: "event" }, async (sim) => {
      const res = await chat(sim.url, { stream: true })
      expect(res.status).toBe(200)
      expect(res.headers.get("content-type")).toMatch(/^text\/event-stream/)
      const text = await res.text()
      const events = text.split("\n\n").filter((e) => e !== "")
      expect(events).toHaveLength(1)
      expect(events[0]!.startsWith("data: ")).toBe(true)
      expect(JSON.parse(events[0]!.slice("data: ".length))).toEqual({
        object: "error",
        message: "Simulated backend error (status 503)",
        type: "server_error",
        param: null,
        code: 503
      })
      expect(text).not.toContain("[DONE]")
      expect(sim.stats()).toMatchObject({ requests: 1, errorsInjected: 1, completed: 0, running: 0 })
    })
  })

  it("event: a non-streaming request gets the error status and an OpenAI error body", async () => {
    await withSim({ errorRate: 1, errorStatus: 503, errorMode: "event" }, async (sim) => {
      const res = await chat(sim.url, {})
      expect(res.headers.get("retry-after")).toBe("1")
      await expectStatusError(res, 503, "server_error")
      expect(sim.stats().errorsInjected).toBe(1)
    })
  })

  it("event: a client-error status names its type and code in the event", async () => {
    await withSim({ errorRate: 1, errorStatus: 400, errorMode: "event" }, async (sim) => {
      const text = await (await chat(sim.url, { stream: true })).text()
      expect(JSON.parse(text.slice("data: ".length))).toMatchObject({
        object: "error",
        type: "invalid_request_error",
        code: 400
      })
      await expectStatusError(await chat(sim.url, { stream: false }), 400, "invalid_request_error")
    })
  })

  it("status (the default): streaming and non-streaming requests both get the status", async () => {
    for (const options of [
      { errorRate: 1, errorStatus: 502 },
      { errorRate: 1, errorStatus: 502, errorMode: "status" as const }
    ]) {
      await withSim(options, async (sim) => {
        expect(sim.options().errorMode).toBe("status")
        await expectStatusError(await chat(sim.url, { stream: true }), 502, "server_error")
        await expectStatusError(await chat(sim.url, {}), 502, "server_error")
        expect(sim.stats().errorsInjected).toBe(2)
      })
    }
  })

  it("the mode can change at runtime; without errors a stream is untouched", async () => {
    await withSim({ ttftMs: 0, itlMs: 0, outputTokens: 3 }, async (sim) => {
      await sim.update({ errorMode: "event" })
      const clean = await (await chat(sim.url, { stream: true })).text()
      expect(clean.endsWith("data: [DONE]\n\n")).toBe(true)
      expect(clean).not.toContain('"object":"error"')

      await sim.update({ errorRate: 1, errorStatus: 500 })
      const res = await chat(sim.url, { stream: true })
      expect(res.status).toBe(200)
      expect(await res.text()).toMatch(/^data: \{"object":"error",.*"code":500\}\n\n$/)

      await sim.update({ errorMode: "status" })
      await expectStatusError(await chat(sim.url, { stream: true }), 500, "server_error")
      await expect(sim.update({ errorMode: "silent" as never })).rejects.toMatchObject({
        _tag: "BackendSimError",
        reason: "InvalidOptions"
      })
    })
  })
})
