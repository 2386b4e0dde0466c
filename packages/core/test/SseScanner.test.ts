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
