import { PassThrough, type Readable } from "node:stream"
import { describe, expect, it } from "@effect/vitest"
import { SseRelay, Upstream } from "@gateway/core"
import { vi } from "vitest"

const collect = (stream: Readable) =>
  new Promise<string>((resolve, reject) => {
    let text = ""
    stream.on("data", (chunk: Buffer) => {
      text += chunk.toString()
    })
    stream.once("end", () => resolve(text))
    stream.once("error", reject)
  })

const breakEvent = new TextEncoder().encode('data: {"error":{"message":"broken"}}\n\n')

describe("SseRelay", () => {
  it("forwards every chunk in order and ends when the source ends", async () => {
    const source = new PassThrough()
    const out = SseRelay.relay(source, { onBreak: () => breakEvent })
    const text = collect(out)
    source.write("data: 1\n\n")
    source.write("data: 2\n\n")
    source.end("data: [DONE]\n\n")
    expect(await text).toBe("data: 1\n\ndata: 2\n\ndata: [DONE]\n\n")
  })

  it("does not take an answer that writes 'data: [DONE]' in its content for the end", async () => {
    const source = new PassThrough()
    let ends = 0
    const out = SseRelay.relay(source, {
      onBreak: () => breakEvent,
      beforeEnd: async () => {
        ends++
        return undefined
      }
    })
    const text = collect(out)
    const quoting = 'data: {"choices":[{"delta":{"content":"say data: [DONE] now"}}]}\n\n'
    source.write(quoting)
    source.write("data: 2\n\n")
    source.end("data: [DONE]\n\n")
    expect(await text).toBe(`${quoting}data: 2\n\ndata: [DONE]\n\n`)
    expect(ends).toBe(1)
  })

  it("ends without [DONE] when the end hook cannot run, instead of hanging", async () => {
    const source = new PassThrough()
    const out = SseRelay.relay(source, {
      onBreak: () => breakEvent,
      beforeEnd: () => Promise.reject(new Error("the runtime is shutting down"))
    })
    const text = collect(out)
    source.write("data: 1\n\n")
    source.end("data: [DONE]\n\n")
    expect(await text).toBe("data: 1\n\n")
  })

  it("ends cleanly when the break hook cannot run", async () => {
    const source = new PassThrough()
    const out = SseRelay.relay(source, { onBreak: () => Promise.reject(new Error("gone")) })
    const text = collect(out)
    source.write("data: 1\n\n")
    source.destroy(new Error("backend broke off"))
    expect(await text).toBe("data: 1\n\n")
  })

  it("passes each chunk on as soon as it arrives", async () => {
    const source = new PassThrough()
    const out = SseRelay.relay(source, { onBreak: () => breakEvent })
    const first = new Promise<string>((resolve) =>
      out.once("data", (chunk: Buffer) => resolve(chunk.toString()))
    )
    source.write("data: first\n\n")
    expect(await first).toBe("data: first\n\n")
    source.end()
  })

  it("ends with the break event, not an error, when the source breaks", async () => {
    const source = new PassThrough()
    let cause: unknown
    const out = SseRelay.relay(source, {
      onBreak: (c) => {
        cause = c
        return breakEvent
      }
    })
    const text = collect(out)
    source.write("data: 1\n\n")
    source.destroy(new Error("other side closed"))
    expect(await text).toBe('data: 1\n\ndata: {"error":{"message":"broken"}}\n\n')
    expect((cause as Error).message).toBe("other side closed")
  })

  it("destroys the source when the client side goes away", async () => {
    const source = new PassThrough()
    const out = SseRelay.relay(source, { onBreak: () => breakEvent })
    out.resume()
    source.write("data: 1\n\n")
    const closed = new Promise<void>((resolve) => source.once("close", () => resolve()))
    out.destroy()
    await closed
    expect(source.destroyed).toBe(true)
  })

  it("applies back-pressure: a slow reader pauses the source", async () => {
    const source = new PassThrough({ highWaterMark: 16 })
    const out = SseRelay.relay(source, { onBreak: () => breakEvent })
    const big = "x".repeat(64 * 1024)
    for (let i = 0; i < 8; i++) source.write(big)
    await new Promise((resolve) => setImmediate(resolve))
    expect(source.isPaused()).toBe(true)
    const text = collect(out)
    source.end()
    expect((await text).length).toBe(8 * big.length)
  })

  it("holds [DONE] back until the answer is recorded, then sends it", async () => {
    const source = new PassThrough()
    let release: (instead: Uint8Array | undefined) => void = () => {}
    const recorded = new Promise<Uint8Array | undefined>((resolve) => {
      release = resolve
    })
    const out = SseRelay.relay(source, { onBreak: () => breakEvent, beforeEnd: () => recorded })
    let text = ""
    out.on("data", (chunk: Buffer) => {
      text += chunk.toString()
    })
    const ended = new Promise<void>((resolve) => out.once("end", () => resolve()))
    source.write("data: 1\n\ndata: [DONE]\n\n")
    source.end()
    await new Promise((resolve) => setTimeout(resolve, 20))
    expect(text).toBe("data: 1\n\n")
    release(undefined)
    await ended
    expect(text).toBe("data: 1\n\ndata: [DONE]\n\n")
  })

  it("ends with the replacement event instead of [DONE] when the answer could not be recorded", async () => {
    const source = new PassThrough()
    const unrecorded = new TextEncoder().encode('data: {"error":{"message":"not recorded"}}\n\n')
    const out = SseRelay.relay(source, { onBreak: () => breakEvent, beforeEnd: async () => unrecorded })
    const text = collect(out)
    source.end("data: 1\n\ndata: [DONE]\n\n")
    expect(await text).toBe('data: 1\n\ndata: {"error":{"message":"not recorded"}}\n\n')
  })
})

describe("SseRelay draining and filtering", () => {
  const tick = () => new Promise((resolve) => setImmediate(resolve))
  const wait = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms))
  const usage = 'data: {"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":3,"total_tokens":8}}\n\n'

  /** A relay whose client reads one chunk and then goes away. */
  const disconnecting = async (drainMs: number) => {
    const source = new PassThrough()
    const seen: Array<string> = []
    const calls: Array<string> = []
    const out = SseRelay.relay(source, {
      onBreak: () => breakEvent,
      onChunk: (chunk) => seen.push(Buffer.from(chunk).toString()),
      onDisconnect: () => calls.push("disconnect"),
      onClientGone: (midAnswer) => calls.push(`gone:${midAnswer}`),
      drainMs
    })
    const first = new Promise<void>((resolve) => out.once("data", () => resolve()))
    source.write("data: 1\n\n")
    await first
    out.destroy()
    return { source, seen, calls }
  }

  it("keeps reading the backend after the client left mid-answer, until the answer ends", async () => {
    const { source, seen, calls } = await disconnecting(10_000)
    expect(calls).toEqual(["disconnect"])
    source.write("data: 2\n\n")
    source.write(usage)
    await tick()
    expect(seen).toEqual(["data: 1\n\n", "data: 2\n\n", usage])
    expect(calls).toEqual(["disconnect"])
    expect(source.destroyed).toBe(false)
    source.end()
    await tick()
    expect(calls).toEqual(["disconnect", "gone:true"])
    expect(source.destroyed).toBe(true)
  })

  it("stops draining at [DONE], without waiting for the body to end", async () => {
    const { source, seen, calls } = await disconnecting(10_000)
    source.write(`${usage}data: [DONE]\n\n`)
    await tick()
    expect(seen).toEqual(["data: 1\n\n", usage])
    expect(calls).toEqual(["disconnect", "gone:true"])
    expect(source.destroyed).toBe(true)
  })

  it("gives up draining after drainMs and destroys the source", async () => {
    const { source, calls } = await disconnecting(40)
    await wait(5)
    expect(source.destroyed).toBe(false)
    expect(calls).toEqual(["disconnect"])
    await new Promise<void>((resolve) => source.once("close", () => resolve()))
    expect(calls).toEqual(["disconnect", "gone:true"])
    // Ending later changes nothing.
    await tick()
    expect(calls).toEqual(["disconnect", "gone:true"])
  })

  it("without drainMs, stops at once when the client leaves", async () => {
    const { source, calls } = await disconnecting(0)
    expect(calls).toEqual(["disconnect", "gone:true"])
    expect(source.destroyed).toBe(true)
  })

  it("forwards what the filter makes of the bytes, its held-back part before the final [DONE]", async () => {
    const source = new PassThrough()
    const seen: Array<string> = []
    const out = SseRelay.relay(source, {
      onBreak: () => breakEvent,
      onChunk: (chunk) => seen.push(Buffer.from(chunk).toString()),
      filter: {
        push: (chunk) => new TextEncoder().encode(Buffer.from(chunk).toString().replace("secret", "******")),
        flush: () => new TextEncoder().encode("data: held\n\n")
      }
    })
    const text = collect(out)
    source.write("data: secret\n\n")
    source.end("data: [DONE]\n\n")
    expect(await text).toBe("data: ******\n\ndata: held\n\ndata: [DONE]\n\n")
    // The hooks see what the backend sent.
    expect(seen).toEqual(["data: secret\n\n"])
  })
})

describe("SseRelay idle timeout", () => {
  const turn = () => new Promise<void>((resolve) => setImmediate(resolve))

  it("breaks off a backend silent for longer than idleMs, with the break event", async () => {
    vi.useFakeTimers({ toFake: ["setTimeout", "clearTimeout"] })
    try {
      const source = new PassThrough()
      let cause: unknown
      const out = SseRelay.relay(source, {
        idleMs: 1000,
        onBreak: (c) => {
          cause = c
          return breakEvent
        }
      })
      const text = collect(out)
      source.write("data: 1\n\n")
      await turn()
      vi.advanceTimersByTime(900)
      // A chunk restarts the wait.
      source.write("data: 2\n\n")
      await turn()
      vi.advanceTimersByTime(900)
      expect(cause).toBeUndefined()
      vi.advanceTimersByTime(200)
      expect(await text).toBe(`data: 1\n\ndata: 2\n\n${new TextDecoder().decode(breakEvent)}`)
      expect(cause).toBeInstanceOf(Upstream.StreamIdle)
      expect((cause as Upstream.StreamIdle).idleMs).toBe(1000)
      expect(source.destroyed).toBe(true)
    } finally {
      vi.useRealTimers()
    }
  })

  it("does not count a pause the client's back-pressure causes", async () => {
    vi.useFakeTimers({ toFake: ["setTimeout", "clearTimeout"] })
    try {
      const source = new PassThrough()
      let broken = false
      const out = SseRelay.relay(source, {
        idleMs: 1000,
        onBreak: () => {
          broken = true
          return breakEvent
        }
      })
      // Nobody reads: once the relay's buffer is full the backend is paused.
      out.pause()
      const event = `data: ${"x".repeat(1000)}\n\n`
      for (let i = 0; i < 64; i++) source.write(event)
      await turn()
      expect(source.isPaused()).toBe(true)
      vi.advanceTimersByTime(5000)
      expect(broken).toBe(false)
      const text = collect(out)
      out.resume()
      source.end("data: [DONE]\n\n")
      expect((await text).endsWith("data: [DONE]\n\n")).toBe(true)
      expect(broken).toBe(false)
    } finally {
      vi.useRealTimers()
    }
  })
})
