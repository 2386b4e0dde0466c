/**
 * The complexity classifier: a request → `{ tier, score, features }`. Pure, deterministic and
 * cheap (microseconds: it runs on the request path). Sizes are estimated from characters, the
 * text features are counted in the last user turn (its first `scanChars` characters), and the
 * score is the weighted mean of the features, each saturating at its scale.
 */
import type { OpenAi, Routing } from "@gateway/domain"

/** Characters per token, for size estimates (English prose and code average about 4). */
const CHARS_PER_TOKEN = 4

/** Only the start of a very long last turn is scanned for cues: every feature saturates long before. */
const scanChars = 16_384

const tokensOf = (chars: number) => Math.ceil(chars / CHARS_PER_TOKEN)

type Content = OpenAi.Message["content"]

/** The characters of a message's text (parts other than text do not count). */
const lengthOf = (content: Content): number => {
  if (typeof content === "string") return content.length
  if (content === null || content === undefined) return 0
  let n = 0
  for (const part of content) if (part.type === "text") n += (part as { text: string }).text.length
  return n
}

const textOf = (content: Content): string => {
  if (typeof content === "string") return content
  if (content === null || content === undefined) return ""
  let text = ""
  for (const part of content) if (part.type === "text") text += `${(part as { text: string }).text}\n`
  return text
}

// Each pattern is global: matches are counted (up to a cap) with `exec`.
const fence = /```/g
const codeLine =
  /^\s*(?:def |class |function\b|import |from \S+ import|return\b|const |let |var |#include|public |private |fn |func |package |SELECT\b|INSERT\b|CREATE TABLE)|[;{]\s*$|=>|\w+\([^)\n]*\)\s*[{:]/gm
const mathPattern =
  /\$[^$\n]+\$|\\(?:frac|sum|int|sqrt|begin|cdot|times|le|ge)\b|\d\s*[-+*/^=<>]\s*\(?\d|[∑∫√≤≥≠±∞]/g
const reasoningPattern =
  /\b(?:explain|why|step[- ]by[- ]step|prove|proof|derive|compare|contrast|design|architect(?:ure)?|analy[sz]e|analysis|trade-?offs?|evaluate|optimi[sz]e|justify|implications?|pros and cons|critique|reason(?:ing)?|in depth|think through)\b/gi
const constraintPattern =
  /\b(?:must|should|at least|at most|no more than|without|exactly|only|ensure|make sure|do not|don't|avoid|required?)\b|^\s*(?:\d+[.)]|[-*•])\s+/gim

const count = (pattern: RegExp, text: string, cap: number): number => {
  pattern.lastIndex = 0
  let n = 0
  while (n < cap && pattern.exec(text) !== null) n++
  return n
}

/** What the classifier measures of `request` (see `Routing.Features`). */
export const features = (request: OpenAi.ChatCompletionRequest, scales: Routing.Scales): Routing.Features => {
  let contextChars = 0
  let systemChars = 0
  let turns = 0
  let last: Content | undefined
  for (const message of request.messages) {
    const chars = lengthOf(message.content)
    contextChars += chars
    switch (message.role) {
      case "system":
      case "developer":
        systemChars += chars
        break
      case "user":
        turns++
        last = message.content
        break
      case "assistant":
        turns++
        break
    }
  }
  const lastText = last === undefined ? "" : textOf(last)
  const scanned = lastText.length > scanChars ? lastText.slice(0, scanChars) : lastText
  // Counts stop at twice the scale: beyond it they change nothing, and the scan stops early.
  const cap = (scale: number) => Math.max(1, Math.ceil(scale * 2))
  const fences = count(fence, scanned, cap(scales.code) * 2)
  let questions = 0
  for (
    let i = scanned.indexOf("?");
    i !== -1 && questions < cap(scales.questions);
    i = scanned.indexOf("?", i + 1)
  ) {
    questions++
  }
  const responseFormat = request.response_format
  return {
    lastTurnTokens: tokensOf(lastText.length),
    contextTokens: tokensOf(contextChars),
    turns,
    systemTokens: tokensOf(systemChars),
    code: Math.ceil(fences / 2) + count(codeLine, scanned, cap(scales.code)),
    math: count(mathPattern, scanned, cap(scales.math)),
    reasoning: count(reasoningPattern, scanned, cap(scales.reasoning)),
    questions,
    constraints: count(constraintPattern, scanned, cap(scales.constraints)),
    outputTokens: request.max_completion_tokens ?? request.max_tokens ?? 0,
    tools: request.tools?.length ?? 0,
    jsonSchema:
      responseFormat !== null && responseFormat !== undefined && responseFormat.type === "json_schema"
  }
}

const featureNames = [
  "lastTurnTokens",
  "contextTokens",
  "turns",
  "systemTokens",
  "code",
  "math",
  "reasoning",
  "questions",
  "constraints",
  "outputTokens",
  "tools",
  "jsonSchema"
] as const satisfies ReadonlyArray<keyof Routing.Features>

/** The weighted mean of the features, each as a share of its scale (at most 1): 0 to 1. */
export const score = (f: Routing.Features, config: Routing.ClassifierConfig): number => {
  let sum = 0
  let total = 0
  for (const name of featureNames) {
    const weight = config.weights[name]
    if (weight === 0) continue
    const raw = f[name]
    const value = typeof raw === "boolean" ? (raw ? 1 : 0) : raw
    const scale = config.scales[name]
    sum += weight * (scale > 0 ? Math.min(1, value / scale) : value > 0 ? 1 : 0)
    total += weight
  }
  return total === 0 ? 0 : Math.round((sum / total) * 10_000) / 10_000
}

/** The tier of a score, by the thresholds. */
export const tierOf = (value: number, config: Routing.ClassifierConfig): Routing.Tier =>
  value >= config.thresholds.complex ? "complex" : value >= config.thresholds.moderate ? "moderate" : "simple"

/** Classifies `request`: its features, score and tier. */
export const classify = (
  request: OpenAi.ChatCompletionRequest,
  config: Routing.ClassifierConfig
): Routing.Classification => {
  const f = features(request, config.scales)
  const s = score(f, config)
  return { tier: tierOf(s, config), score: s, features: f }
}
