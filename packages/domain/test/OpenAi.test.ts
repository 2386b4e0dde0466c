import { describe, expect, it } from "@effect/vitest"
import { OpenAi } from "@gateway/domain"
import { Either, ParseResult, Schema } from "effect"

const decode = OpenAi.decodeChatCompletionRequest

const firstIssue = (input: unknown) => {
  const result = decode(input)
  if (Either.isRight(result)) throw new Error("expected a decoding failure")
  return ParseResult.ArrayFormatter.formatErrorSync(result.left)[0]!
}

describe("ChatCompletionRequest", () => {
  it("accepts a minimal request", () => {
    const result = decode({ model: "m", messages: [{ role: "user", content: "hi" }] })
    expect(Either.isRight(result)).toBe(true)
  })

  it("keeps unknown fields, top-level and nested, for the backend", () => {
    const input = {
      model: "m",
      messages: [{ role: "user", content: "hi", vendor_hint: 1 }],
      top_k: 5,
      chat_template_kwargs: { enable_thinking: false },
      stream_options: { include_usage: true, continuous_usage_stats: true }
    }
    const decoded = Either.getOrThrow(decode(input)) as Record<string, unknown>
    expect(decoded.top_k).toBe(5)
    expect(decoded.chat_template_kwargs).toEqual({ enable_thinking: false })
    expect(decoded.stream_options).toEqual({ include_usage: true, continuous_usage_stats: true })
    expect((decoded.messages as Array<Record<string, unknown>>)[0]!.vendor_hint).toBe(1)
  })

  it("accepts the full OpenAI parameter set, nulls included", () => {
    const result = decode({
      model: "gpt-4o",
      messages: [
        { role: "developer", content: "be brief" },
        { role: "system", content: [{ type: "text", text: "sys" }] },
        {
          role: "user",
          content: [
            { type: "text", text: "what is this?" },
            { type: "image_url", image_url: { url: "data:image/png;base64,AAA", detail: "low" } },
            { type: "input_audio", input_audio: { data: "AAA", format: "wav" } },
            { type: "video_url", video_url: { url: "https://x/v.mp4" } }
          ]
        },
        {
          role: "assistant",
          content: null,
          tool_calls: [{ id: "call_1", type: "function", function: { name: "lookup", arguments: "{}" } }]
        },
        { role: "tool", tool_call_id: "call_1", content: "42" }
      ],
      temperature: 0.2,
      top_p: null,
      n: 1,
      max_tokens: 100,
      max_completion_tokens: 100,
      stop: ["\n\n"],
      stream: true,
      stream_options: { include_usage: true },
      presence_penalty: 0,
      frequency_penalty: 0.5,
      logit_bias: { "50256": -100 },
      logprobs: true,
      top_logprobs: 3,
      seed: 7,
      user: "u-1",
      tools: [{ type: "function", function: { name: "lookup", parameters: { type: "object" } } }],
      tool_choice: { type: "function", function: { name: "lookup" } },
      parallel_tool_calls: false,
      response_format: {
        type: "json_schema",
        json_schema: { name: "answer", schema: { type: "object" }, strict: true }
      },
      metadata: { team: "search" }
    })
    expect(Either.isRight(result)).toBe(true)
  })

  it("names the field that is wrong", () => {
    expect(firstIssue({ model: "m", messages: [{ role: "bot", content: "x" }] }).path).toEqual([
      "messages",
      0,
      "role"
    ])
    expect(
      firstIssue({ model: "m", messages: [{ role: "user", content: "x" }], temperature: "hot" }).path
    ).toEqual(["temperature"])
    expect(
      firstIssue({ model: "m", messages: [{ role: "user", content: "x" }], temperature: 3 }).path
    ).toEqual(["temperature"])
    expect(firstIssue({ model: "m", messages: [{ role: "user", content: "x" }], n: 0 }).path).toEqual(["n"])
    expect(firstIssue({ model: "m", messages: [{ role: "tool", content: "x" }] }).path).toEqual([
      "messages",
      0,
      "tool_call_id"
    ])
  })

  it("requires a model and at least one message", () => {
    expect(firstIssue({ messages: [{ role: "user", content: "x" }] })).toMatchObject({
      _tag: "Missing",
      path: ["model"]
    })
    expect(firstIssue({ model: "m" })).toMatchObject({ _tag: "Missing", path: ["messages"] })
    expect(firstIssue({ model: "m", messages: [] }).path).toEqual(["messages"])
    expect(firstIssue({ model: "", messages: [{ role: "user", content: "x" }] }).path).toEqual(["model"])
  })

  it("rejects a known content part with missing fields instead of passing it as unknown", () => {
    const issue = firstIssue({ model: "m", messages: [{ role: "user", content: [{ type: "text" }] }] })
    expect(issue.path.slice(0, 3)).toEqual(["messages", 0, "content"])
  })
})

describe("responses", () => {
  const completion = {
    id: "chatcmpl-1",
    object: "chat.completion",
    created: 1,
    model: "m",
    choices: [{ index: 0, message: { role: "assistant", content: "hi" }, finish_reason: "stop" }],
    usage: { prompt_tokens: 3, completion_tokens: 1, total_tokens: 4 }
  }

  it("decodes a chat completion and a usage-only stream chunk", () => {
    expect(Schema.decodeUnknownSync(OpenAi.ChatCompletion)(completion).usage?.total_tokens).toBe(4)
    const chunk = Schema.decodeUnknownSync(OpenAi.ChatCompletionChunk)({
      id: "chatcmpl-1",
      object: "chat.completion.chunk",
      created: 1,
      model: "m",
      choices: [],
      usage: { prompt_tokens: 3, completion_tokens: 1, total_tokens: 4 }
    })
    expect(chunk.choices).toHaveLength(0)
  })

  it("decodes the OpenAI error body", () => {
    const body = {
      error: { message: "nope", type: "invalid_request_error", param: null, code: "model_not_found" }
    }
    expect(Schema.decodeUnknownSync(OpenAi.ErrorBody)(body)).toEqual(body)
  })
})
