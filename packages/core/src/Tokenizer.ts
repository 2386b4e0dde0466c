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

const contentTokens = (content: unknown): number => {
  if (typeof content === "string") return countText(content)
  if (!Array.isArray(content)) return 0
  let tokens = 0
  for (const part of content as ReadonlyArray<{ type?: unknown; text?: unknown; refusal?: unknown }>) {
    if (typeof part.text === "string") tokens += countText(part.text)
    else if (typeof part.refusal === "string") tokens += countText(part.refusal)
    // An image or audio part: its cost depends on the model; count a typical tile.
    else tokens += 85
  }
  return tokens
}

/** Prompt tokens of a chat request: the messages, their framing, and any tool definitions. */
export const countPrompt = (body: OpenAi.ChatCompletionRequest): number => {
  let tokens = replyPriming
  for (const message of body.messages) {
    tokens += perMessage + contentTokens(message.content)
    if ("name" in message && typeof message.name === "string") tokens += perName + countText(message.name)
    if ("tool_calls" in message && message.tool_calls != null) {
      for (const call of message.tool_calls)
        tokens += countText(call.function.name) + countText(call.function.arguments)
    }
  }
  if (body.tools != null && body.tools.length > 0) tokens += countText(JSON.stringify(body.tools))
  return tokens
}

/** The most completion tokens a request can produce: its own cap, else `fallback`, per choice. */
export const maxCompletion = (body: OpenAi.ChatCompletionRequest, fallback: number): number =>
  (body.max_completion_tokens ?? body.max_tokens ?? fallback) * (body.n ?? 1)
