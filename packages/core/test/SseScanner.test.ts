import { describe, expect, it } from "@effect/vitest"
import { SseScanner } from "@gateway/core"

const chunk = (delta: Record<string, unknown>, finish: string | null = null) =>
  `data: ${JSON.stringify({ id: "c", object: "chat.completion.chunk", choices: [{ index: 0, delta, finish_reason: finish }] })}\n\n`

const encode = (text: string) => new TextEncoder().encode(text)

describe("SseScanner", () => {
  it("counts content chunks, not the empty role chunk, and reads the finish reason and usage", () => {
    const scanner = new SseScanner.SseScanner()
    scanner.push(encode(chunk({ role: "assistant", content: "" })))
    scanner.push(encode(chunk({ content: "Hello" }) + chunk({ content: ' wörld "quoted"' })))
    scanner.push(encode(chunk({}, "length")))
    scanner.push(
      encode(
        `data: ${JSON.stringify({ id: "c", choices: [], usage: { prompt_tokens: 7, completion_tokens: 2, total_tokens: 9 } })}\n\n`
      )
    )
    expect(scanner.contentChunks).toBe(2)
    expect(scanner.finishReason).toBe("length")
    expect(scanner.usage).toEqual({ prompt_tokens: 7, completion_tokens: 2, total_tokens: 9 })
    expect(scanner.firstContentAt).toBeTypeOf("number")
  })

  it("reads lines split across chunks", () => {
    const scanner = new SseScanner.SseScanner()
    const usage = `data: ${JSON.stringify({ choices: [], usage: { prompt_tokens: 3, completion_tokens: 1, total_tokens: 4 } })}\n\n`
    const text = chunk({ content: "a" }) + usage
    for (let i = 0; i < text.length; i += 7) scanner.push(encode(text.slice(i, i + 7)))
    expect(scanner.contentChunks).toBe(1)
    expect(scanner.usage?.total_tokens).toBe(4)
  })

  it("leaves usage unknown when the backend sends none", () => {
    const scanner = new SseScanner.SseScanner()
    scanner.push(encode(chunk({ content: "x" }) + "data: [DONE]\n\n"))
    expect(scanner.usage).toBeUndefined()
    expect(scanner.contentChunks).toBe(1)
  })
})

describe("SseScanner error events", () => {
  it("notes an error event inside the stream, in vLLM's shape and in OpenAI's", () => {
    const vllm = new SseScanner.SseScanner()
    vllm.push(encode(chunk({ content: "Hel" })))
    expect(vllm.error).toBeUndefined()
    vllm.push(
      encode(
        'data: {"object":"error","message":"CUDA out of memory","type":"InternalServerError","code":500}\n\n'
      )
    )
    expect(vllm.error).toBe("CUDA out of memory")

    const openai = new SseScanner.SseScanner()
    openai.push(encode('data: {"error":{"message":"The server had an error","type":"server_error"}}\n\n'))
    expect(openai.error).toBe("The server had an error")
  })

  it("does not take content that mentions an error for an error event", () => {
    const scanner = new SseScanner.SseScanner()
    scanner.push(encode(chunk({ content: 'data: {"error" is what the log said' })))
    scanner.push(encode(chunk({ content: "an error occurred" })))
    expect(scanner.error).toBeUndefined()
  })
})

describe("UsageFilter", () => {
  const usageOnly = `data: ${JSON.stringify({ id: "c", choices: [], usage: { prompt_tokens: 7, completion_tokens: 2, total_tokens: 9 } })}\n\n`
  const text = (bytes: Uint8Array) => Buffer.from(bytes).toString("utf8")

  it("drops the usage-only event and keeps every other byte as it was", () => {
    const filter = new SseScanner.UsageFilter()
    const before =
      chunk({ role: "assistant", content: "" }) + chunk({ content: "wörld ✓" }) + chunk({}, "stop")
    const after = "data: [DONE]\n\n"
    const out = filter.push(encode(before + usageOnly + after))
    expect(Buffer.from(out).equals(Buffer.from(encode(before + after)))).toBe(true)
    expect(filter.flush()).toHaveLength(0)
  })

  it("keeps a chunk that carries usage alongside its choices", () => {
    const filter = new SseScanner.UsageFilter()
    const last = `data: ${JSON.stringify({ id: "c", choices: [{ index: 0, delta: {}, finish_reason: "stop" }], usage: { prompt_tokens: 1, completion_tokens: 1, total_tokens: 2 } })}\n\n`
    expect(text(filter.push(encode(chunk({ content: "a" }) + last)))).toBe(chunk({ content: "a" }) + last)
  })

  it("holds back an event split across reads and releases it complete", () => {
    const filter = new SseScanner.UsageFilter()
    const first = chunk({ content: "one" })
    const second = chunk({ content: "two" })
    const cut = 10
    expect(text(filter.push(encode(first + second.slice(0, cut))))).toBe(first)
    expect(text(filter.push(encode(second.slice(cut))))).toBe(second)
    // A usage-only event split the same way is dropped whole.
    expect(filter.push(encode(usageOnly.slice(0, 20)))).toHaveLength(0)
    expect(filter.push(encode(usageOnly.slice(20)))).toHaveLength(0)
    expect(text(filter.push(encode("data: [DONE]\n\n")))).toBe("data: [DONE]\n\n")
  })

  it("gives back what it holds on flush, once", () => {
    const filter = new SseScanner.UsageFilter()
    expect(filter.push(encode('data: {"choices":[{"delta":{"content":"cut o'))).toHaveLength(0)
    expect(text(filter.flush())).toBe('data: {"choices":[{"delta":{"content":"cut o')
    expect(filter.flush()).toHaveLength(0)
  })

  it("passes a CRLF-framed stream through unchanged", () => {
    const filter = new SseScanner.UsageFilter()
    const crlf = (event: string) => event.replace(/\n\n$/, "\r\n\r\n")
    const stream = [
      crlf(chunk({ content: "a" })).slice(0, 12),
      crlf(chunk({ content: "a" })).slice(12) + crlf(chunk({ content: "b" })),
      crlf(usageOnly),
      "data: [DONE]\r\n\r\n"
    ]
    const out = stream.map((part) => text(filter.push(encode(part)))).join("") + text(filter.flush())
    expect(out).toBe(stream.join(""))
  })
})

describe("SseScanner.completionText", () => {
  it("reassembles the answer's text when no usage came, across split reads", () => {
    const scanner = new SseScanner.SseScanner()
    const body = encode(
      chunk({ role: "assistant", content: "" }) +
        chunk({ reasoning_content: "Thinking. " }) +
        chunk({ content: "Hello, " }) +
        chunk({ content: "wörld" }) +
        chunk({}, "stop") +
        "data: [DONE]\n\n"
    )
    // Cut inside the two bytes of "ö".
    const at = Buffer.from(body).indexOf(Buffer.from("ö")) + 1
    scanner.push(body.subarray(0, at))
    scanner.push(body.subarray(at))
    expect(scanner.completionText()).toBe("Thinking. Hello, wörld")
  })

  it("is empty once the backend reported usage (nothing to estimate)", () => {
    const scanner = new SseScanner.SseScanner()
    scanner.push(encode(chunk({ content: "Hello" })))
    scanner.push(
      encode(
        `data: ${JSON.stringify({ choices: [], usage: { prompt_tokens: 1, completion_tokens: 1, total_tokens: 2 } })}\n\n`
      )
    )
    expect(scanner.usage?.completion_tokens).toBe(1)
    expect(scanner.completionText()).toBe("")
  })
})
