/**
 * Token counts with a real BPE tokenizer (`o200k_base`, GPT-4o's, via gpt-tokenizer): what the
 * limiter reserves for a prompt before the backend has said anything, and what usage is billed
 * at when a backend reports none. Other models' tokenizers differ by a few percent; the backend's
 * own count, when it gives one, always wins.
 */
import type { OpenAi } from "@gateway/domain"
import { countTokens } from "gpt-tokenizer/encoding/o200k_base"

/** Tokens of a piece of text. */
export const countText = (text: string): number => (text.length === 0 ? 0 : countTokens(text))

/** Framing of each message (role, separators), and the priming of the reply (OpenAI's numbers). */
const perMessage = 3
const perName = 1
const replyPriming = 3

const contentTokens = (content: unknown, count: (text: string) => number): number => {
  if (typeof content === "string") return count(content)
  if (!Array.isArray(content)) return 0
  let tokens = 0
  for (const part of content as ReadonlyArray<{ type?: unknown; text?: unknown; refusal?: unknown }>) {
    if (typeof part.text === "string") tokens += count(part.text)
    else if (typeof part.refusal === "string") tokens += count(part.refusal)
    // An image or audio part: its cost depends on the model; count a typical tile.
    else tokens += 85
  }
  return tokens
}

/** Prompt tokens of a chat request: the messages, their framing, and any tool definitions. */
export const countPrompt = (
  body: OpenAi.ChatCompletionRequest,
  count: (text: string) => number = countText
): number => {
  let tokens = replyPriming
  for (const message of body.messages) {
    tokens += perMessage + contentTokens(message.content, count)
    if ("name" in message && typeof message.name === "string") tokens += perName + countText(message.name)
    if ("tool_calls" in message && message.tool_calls != null) {
      for (const call of message.tool_calls)
        tokens += countText(call.function.name) + countText(call.function.arguments)
    }
  }
  if (body.tools != null && body.tools.length > 0) tokens += count(JSON.stringify(body.tools))
  return tokens
}

/** The most completion tokens a request can produce: its own cap, else `fallback`, per choice. */
export const maxCompletion = (body: OpenAi.ChatCompletionRequest, fallback: number): number =>
  (body.max_completion_tokens ?? body.max_tokens ?? fallback) * (body.n ?? 1)

/** Longer texts are counted each time: a cache of them would hold too much memory. */
const cachedUpTo = 16_384

/**
 * A prompt counter that remembers recent message texts: system prompts and conversation prefixes
 * come back request after request, and a map lookup is far cheaper than encoding them again.
 * Bounded to `limit` texts; it starts over when full. One per service, owned by it.
 */
export const makeCounter = (limit = 4096) => {
  const recent = new Map<string, number>()
  const count = (text: string): number => {
    if (text.length === 0) return 0
    if (text.length > cachedUpTo) return countTokens(text)
    const known = recent.get(text)
    if (known !== undefined) return known
    const tokens = countTokens(text)
    if (recent.size >= limit) recent.clear()
    recent.set(text, tokens)
    return tokens
  }
  return { countPrompt: (body: OpenAi.ChatCompletionRequest) => countPrompt(body, count) } as const
}
