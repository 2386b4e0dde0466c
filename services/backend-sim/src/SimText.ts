/**
 * The simulator's notion of text: a rough, deterministic prompt-token estimate and generated content
 * made of words from a small list (one word ≈ one token).
 */
import type { Prng } from "./Prng.js"

/** Plain lowercase ASCII words, so they can be put into JSON strings without escaping. */
export const words: ReadonlyArray<string> = (
  "the model token stream gateway request answer quick simple result batch queue latency " +
  "first next value system data signal route backend fast slow cache prompt reply of and to " +
  "in is a with for on that this it as we can will more less each every one two three time " +
  "work load node edge path state event log trace span metric limit rate window"
).split(" ")

/** Per-message overhead of the chat template, in tokens. */
const tokensPerMessage = 4
/** Tokens that prime the assistant's reply. */
const replyPriming = 3

const textLength = (content: unknown): number => {
  if (typeof content === "string") return content.length
  if (Array.isArray(content)) {
    let length = 0
    for (const part of content) {
      if (
        part !== null &&
        typeof part === "object" &&
        typeof (part as { text?: unknown }).text === "string"
      ) {
        length += (part as { text: string }).text.length
      }
    }
    return length
  }
  return 0
}

/** Estimated prompt tokens of chat `messages`: ceil(chars / 4) plus a few per message; deterministic. */
export const promptTokens = (messages: ReadonlyArray<unknown>): number => {
  let chars = 0
  for (const message of messages) {
    if (message !== null && typeof message === "object") {
      const m = message as { content?: unknown; name?: unknown }
      chars += textLength(m.content)
      if (typeof m.name === "string") chars += m.name.length
    }
  }
  return Math.ceil(chars / 4) + tokensPerMessage * messages.length + replyPriming
}

/** Indices into `words` for `count` tokens drawn from `prng`. */
export const drawWords = (prng: Prng, count: number): Array<number> => {
  const picks = new Array<number>(count)
  for (let i = 0; i < count; i++) picks[i] = Math.floor(prng.next() * words.length)
  return picks
}

/** The text of token `index` of a completion: words are separated by a leading space. */
export const tokenText = (word: number, index: number): string =>
  index === 0 ? words[word]! : ` ${words[word]!}`
