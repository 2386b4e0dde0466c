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

// Each pattern is global: matches are counted (up to a cap) with `exec`. Every pattern runs in
// time linear in the text: no unbounded repetition is followed by something that can fail after
// it (`[ \t]*` rather than `\s*` at a line start, which would run across every blank line after).
const fence = /```/g
/** A line that starts like code (a keyword); at most one match per line by construction. */
const codeStart =
  /^[ \t]*(?:def |class |function\b|import |from \S+ import|return\b|const |let |var |#include|public |private |fn |func |package |SELECT\b|INSERT\b|CREATE TABLE)/gm
/** A line that ends or goes on like code: `;` or `{` at its end, `=>`, `) {`, or `):` at its end. */
const codeRest = /[;{][ \t]*$|=>|\)[ \t]*\{|\)[ \t]*:[ \t]*$/gm
/** Inline LaTeX (`$x^2$`, not `$5 or $10`), LaTeX commands, an operator between numbers, math symbols. */
const mathPattern =
  /\$[^\s$](?:[^$\n]{0,200}[^\s$])?\$|\\(?:frac|sum|int|sqrt|begin|cdot|times|le|ge)\b|\d[ \t]*[+*/^=<>][ \t]*\(?\d|\d[ \t]+-[ \t]+\d|[∑∫√≤≥≠±∞]/g
/** Reasoning cues (group 1) and constraint words (the rest), in one pass over the text. */
const cueWords =
  /\b(?:(explain|why|step[- ]by[- ]step|prove|proof|derive|compare|contrast|design|architect(?:ure)?|analy[sz]e|analysis|trade-?offs?|evaluate|optimi[sz]e|justify|implications?|pros and cons|critique|reason(?:ing)?|in depth|think through)|must|should|at least|at most|no more than|without|exactly|only|ensure|make sure|do not|don't|avoid|required?)\b/gi
/** List items, each a constraint. */
const listItem = /^[ \t]*(?:\d{1,3}[.)]|[-*•])[ \t]+/gm

/** Reasoning cues and constraint words in `text`, each up to its cap. */
const cues = (text: string, reasoningCap: number, constraintCap: number) => {
  cueWords.lastIndex = 0
  let reasoning = 0
  let constraints = 0
  while (reasoning < reasoningCap || constraints < constraintCap) {
    const match = cueWords.exec(text)
    if (match === null) break
    if (match[1] !== undefined) {
      if (reasoning < reasoningCap) reasoning++
    } else if (constraints < constraintCap) constraints++
  }
  return { reasoning, constraints }
}

/** Matches of `pattern` in `text`, up to `cap`; with `perLine`, at most one per line. */
const count = (pattern: RegExp, text: string, cap: number, perLine = false): number => {
  pattern.lastIndex = 0
  let n = 0
  while (n < cap) {
    const match = pattern.exec(text)
    if (match === null) break
    n++
    if (match[0].length === 0) pattern.lastIndex++
    if (perLine) {
      const end = text.indexOf("\n", match.index + match[0].length)
      if (end === -1) break
      pattern.lastIndex = end + 1
    }
  }
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
  const codeCap = cap(scales.code)
  const constraintCap = cap(scales.constraints)
  const words = cues(scanned, cap(scales.reasoning), constraintCap)
  return {
    lastTurnTokens: tokensOf(last === undefined ? 0 : lengthOf(last)),
    contextTokens: tokensOf(contextChars),
    turns,
    systemTokens: tokensOf(systemChars),
    // Lines that look like code, by their start or by their end (a line may show both).
    code:
      Math.ceil(fences / 2) +
      Math.max(count(codeStart, scanned, codeCap), count(codeRest, scanned, codeCap, true)),
    math: count(mathPattern, scanned, cap(scales.math)),
    reasoning: words.reasoning,
    questions,
    constraints: Math.min(constraintCap, words.constraints + count(listItem, scanned, constraintCap)),
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
