/**
 * The second opinion on a request's complexity: the question put to a small model (a short
 * instruction, the request's last user turn, a strict JSON answer of a few tokens) and the
 * reading of its answer, where anything but `{"tier": "simple"|"moderate"|"complex"}` is nonsense.
 */
import type { OpenAi, Routing } from "@gateway/domain"

/** The last user turn is cut to this many characters: the small model needs the gist, fast. */
const maxChars = 2_000

const instruction =
  'Rate how hard it is to answer the user\'s request well. Answer with JSON only, exactly {"tier":"simple"}, {"tier":"moderate"} or {"tier":"complex"}. simple: greetings, small talk, short facts, one-step tasks. moderate: explanations, short writing or code, a few steps. complex: design, multi-step reasoning, proofs, long or tricky code, many constraints.'

const lastUserText = (body: OpenAi.ChatCompletionRequest): string => {
  for (let i = body.messages.length - 1; i >= 0; i--) {
    const message = body.messages[i]!
    if (message.role !== "user") continue
    const content = message.content
    if (typeof content === "string") return content
    return content.map((part) => (part.type === "text" ? (part as { text: string }).text : "")).join("\n")
  }
  return ""
}

/** The question for `model` about `body`. */
export const request = (model: string, body: OpenAi.ChatCompletionRequest): OpenAi.ChatCompletionRequest => ({
  model,
  messages: [
    { role: "system", content: instruction },
    { role: "user", content: lastUserText(body).slice(0, maxChars) }
  ],
  max_tokens: 12,
  temperature: 0,
  stream: false,
  response_format: { type: "json_object" }
})

const tiers: ReadonlySet<string> = new Set(["simple", "moderate", "complex"])
const decoder = new TextDecoder()

/** The tier in a chat completion's answer, or `undefined` when the answer is anything else. */
export const tierOf = (body: Uint8Array): Routing.Tier | undefined => {
  try {
    const completion = JSON.parse(decoder.decode(body)) as {
      choices?: ReadonlyArray<{ message?: { content?: unknown } }>
    }
    const content = completion.choices?.[0]?.message?.content
    if (typeof content !== "string") return undefined
    const answer = JSON.parse(content.trim()) as { tier?: unknown }
    return typeof answer === "object" &&
      answer !== null &&
      typeof answer.tier === "string" &&
      tiers.has(answer.tier)
      ? (answer.tier as Routing.Tier)
      : undefined
  } catch {
    return undefined
  }
}
