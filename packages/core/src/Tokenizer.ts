/**
 * Token counts with a real BPE tokenizer (`o200k_base`, GPT-4o's, via gpt-tokenizer): what the
 * limiter reserves for a prompt before the backend has said anything, and what usage is billed
 * at when a backend reports none. Other models' tokenizers differ by a few percent; the backend's
 * own count, when it gives one, always wins.
 */
import type { OpenAi } from "@gateway/domain"
import { countTokens } from "gpt-tokenizer/encoding/o200k_base"

/**
 * BPE's cost grows with the square of a run without spaces (a 200 KB one takes seconds): texts are
 * counted in slices of this many characters, cut at a space where there is one nearby.
 */
const slice = 512
/** Beyond this many characters the rest is extrapolated from what was counted: bounded work per text. */
const countedUpTo = 65_536

/** Tokens of a piece of text (slices cost a token or so at each cut: an estimate, never a hang). */
export const countText = (text: string): number => {
  if (text.length <= slice) return text.length === 0 ? 0 : countTokens(text)
  const end = Math.min(text.length, countedUpTo)
  let tokens = 0
  let at = 0
  while (at < end) {
    let cut = Math.min(at + slice, end)
    if (cut < end) {
      const space = text.lastIndexOf(" ", cut)
      if (space > at + slice / 2) cut = space
    }
    tokens += countTokens(text.slice(at, cut))
    at = cut
  }
  return end === text.length ? tokens : Math.ceil((tokens * text.length) / end)
}

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
    if (text.length > cachedUpTo) return countText(text)
    const known = recent.get(text)
    if (known !== undefined) return known
    const tokens = countText(text)
    if (recent.size >= limit) recent.clear()
    recent.set(text, tokens)
    return tokens
  }
  return { countPrompt: (body: OpenAi.ChatCompletionRequest) => countPrompt(body, count) } as const
}
