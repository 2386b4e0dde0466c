import { describe, expect, it } from "@effect/vitest"
import * as Tokenizer from "@gateway/core/Tokenizer"
import type { OpenAi } from "@gateway/domain"
import { countTokens } from "gpt-tokenizer/encoding/o200k_base"

const request = (
  messages: OpenAi.ChatCompletionRequest["messages"],
  rest: Partial<OpenAi.ChatCompletionRequest> = {}
): OpenAi.ChatCompletionRequest => ({ model: "m", messages, ...rest })

const user = (content: string) => ({ role: "user" as const, content })

describe("Tokenizer.countText", () => {
  it("counts with o200k_base (GPT-4o's tokenizer)", () => {
    expect(Tokenizer.countText("")).toBe(0)
    expect(Tokenizer.countText("hello world")).toBe(2)
    expect(Tokenizer.countText("Hello, world!")).toBe(4)
    expect(Tokenizer.countText("The quick brown fox jumps over the lazy dog.")).toBe(10)
    // cl100k_base (GPT-4's) would count 7 and 8 here.
    expect(Tokenizer.countText("Привет, мир!")).toBe(5)
    expect(Tokenizer.countText("日本語のテキスト")).toBe(6)
  })
})

describe("Tokenizer.countText on long texts", () => {
  // Whole-text BPE takes seconds on a long run without spaces (24 s for 200 KB): a request could
  // stall the gateway. Sliced counting returns at once (well within the test's timeout).
  it("counts a 4 MB run without spaces, and long prose close to its whole-text count", () => {
    const run = Tokenizer.countText("a".repeat(4_000_000))
    expect(run).toBeGreaterThan(100_000)
    expect(run).toBeLessThan(4_000_000)
    const sentence = "The quick brown fox jumps over the lazy dog. "
    const prose = sentence.repeat(2_000)
    // Prose has spaces: whole-text BPE is fast on it, and the reference.
    const exact = countTokens(prose)
    expect(Math.abs(Tokenizer.countText(prose) - exact) / exact).toBeLessThan(0.01)
  })
})

describe("Tokenizer.countPrompt", () => {
  it("adds 3 per message and 3 to prime the reply", () => {
    expect(Tokenizer.countPrompt(request([user("hello world")]))).toBe(3 + 3 + 2)
    expect(
      Tokenizer.countPrompt(
        request([{ role: "system", content: "You are a helpful assistant." }, user("hello world")])
      )
    ).toBe(3 + (3 + 6) + (3 + 2))
  })

  it("counts a message's name, one more for its framing", () => {
    expect(Tokenizer.countPrompt(request([{ role: "user", content: "hello world", name: "alice" }]))).toBe(
      3 + 3 + 2 + (1 + 1)
    )
  })

  it("counts text parts, and 85 for an image part", () => {
    const body = request([
      {
        role: "user",
        content: [
          { type: "text", text: "hello world" },
          { type: "image_url", image_url: { url: "https://example.com/cat.png" } }
        ]
      }
    ])
    expect(Tokenizer.countPrompt(body)).toBe(3 + 3 + 2 + 85)
  })

  it("counts an assistant's tool calls and the tool definitions", () => {
    const tools: OpenAi.ChatCompletionRequest["tools"] = [
      {
        type: "function",
        function: {
          name: "get_weather",
          parameters: { type: "object", properties: { city: { type: "string" } } }
        }
      }
    ]
    const withTools = request([user("hello world")], { tools })
    expect(Tokenizer.countPrompt(withTools)).toBe(3 + 3 + 2 + Tokenizer.countText(JSON.stringify(tools)))
    expect(Tokenizer.countPrompt(withTools)).toBeGreaterThan(3 + 3 + 2 + 20)
    const withCall = request([
      user("hello world"),
      {
        role: "assistant",
        content: null,
        tool_calls: [
          { id: "c1", type: "function", function: { name: "get_weather", arguments: '{"city":"Paris"}' } }
        ]
      }
    ])
    expect(Tokenizer.countPrompt(withCall)).toBe(3 + (3 + 2) + (3 + 2 + 5))
  })
})

describe("Tokenizer.maxCompletion", () => {
  it("takes max_completion_tokens over max_tokens over the fallback, per choice", () => {
    const base = [user("hi")]
    expect(Tokenizer.maxCompletion(request(base), 4096)).toBe(4096)
    expect(Tokenizer.maxCompletion(request(base, { max_tokens: 100 }), 4096)).toBe(100)
    expect(Tokenizer.maxCompletion(request(base, { max_tokens: 100, max_completion_tokens: 50 }), 4096)).toBe(
      50
    )
    expect(Tokenizer.maxCompletion(request(base, { max_tokens: null }), 4096)).toBe(4096)
    expect(Tokenizer.maxCompletion(request(base, { max_tokens: 100, n: 3 }), 4096)).toBe(300)
    expect(Tokenizer.maxCompletion(request(base, { n: 2 }), 10)).toBe(20)
  })
})
