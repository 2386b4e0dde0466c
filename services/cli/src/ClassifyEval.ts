/**
 * `classify eval`: the classifier and a policy against a labelled set of requests (JSON lines,
 * `{"messages": [...], "label": "simple|moderate|complex"}` or `{"prompt": "..."}` unlabelled):
 * accuracy and confusion over the labelled lines, each model's share of all of them, what the set
 * costs under the policy against everything on its complex model, and the worst misroutes.
 */
import { FileSystem } from "@effect/platform"
import * as Classifier from "@gateway/core/Classifier"
import { OpenAi, Routing } from "@gateway/domain"
import { Effect, Either, ParseResult, Schema } from "effect"
import * as RoutingOptions from "./RoutingOptions.js"

/** One line of the set. */
export interface Sample {
  /** 1-based, as an editor shows it. */
  readonly line: number
  readonly request: OpenAi.ChatCompletionRequest
  /** Absent on an unlabelled line. */
  readonly label: Routing.Tier | undefined
  /** The last user turn, for excerpts. */
  readonly text: string
}

/** The set cannot be read, or a line of it is not a sample. */
export class EvalFileError extends Schema.TaggedError<EvalFileError>()("EvalFileError", {
  path: Schema.String,
  reason: Schema.Literal("Unreadable", "Malformed", "Empty"),
  detail: Schema.String
}) {
  override get message() {
    return `${this.path}: ${this.detail}`
  }
}

const isTier = (value: unknown): value is Routing.Tier =>
  typeof value === "string" && (Routing.tiers as ReadonlyArray<string>).includes(value)

const lastUserText = (request: OpenAi.ChatCompletionRequest) => {
  for (let i = request.messages.length - 1; i >= 0; i--) {
    const message = request.messages[i]!
    if (message.role !== "user") continue
    if (typeof message.content === "string") return message.content
    return message.content
      .map((part) => (part.type === "text" ? (part as { text: string }).text : ""))
      .join(" ")
  }
  return ""
}

const firstIssue = (error: ParseResult.ParseError) => {
  const [issue] = ParseResult.ArrayFormatter.formatErrorSync(error)
  if (issue === undefined) return error.message
  return issue.path.length === 0 ? issue.message : `at ${issue.path.join(".")}: ${issue.message}`
}

/** One line as a sample of a request naming `policy`, or why it is not one. */
export const parseLine = (text: string, line: number, policy: string): Either.Either<Sample, string> => {
  let value: unknown
  try {
    value = JSON.parse(text)
  } catch (cause) {
    return Either.left(`not JSON (${cause instanceof Error ? cause.message : String(cause)})`)
  }
  if (typeof value !== "object" || value === null || Array.isArray(value)) {
    return Either.left("not a JSON object")
  }
  const { label, prompt, ...rest } = value as Record<string, unknown>
  if (label !== undefined && !isTier(label)) {
    return Either.left(`"label" must be "simple", "moderate" or "complex", not ${JSON.stringify(label)}`)
  }
  let body: unknown
  if (prompt !== undefined) {
    if ("messages" in rest) return Either.left(`has both "prompt" and "messages"; give one`)
    if (typeof prompt !== "string" || prompt.length === 0) {
      return Either.left(`"prompt" must be a non-empty string`)
    }
    body = { ...rest, model: policy, messages: [{ role: "user", content: prompt }] }
  } else if ("messages" in rest) {
    body = { ...rest, model: policy }
  } else {
    return Either.left(`needs "messages" (a chat request's messages) or "prompt" (a string)`)
  }
  return Either.match(OpenAi.decodeChatCompletionRequest(body), {
    onLeft: (error) => Either.left(`not a chat request: ${firstIssue(error)}`),
    onRight: (request) => Either.right({ line, request, label, text: lastUserText(request) })
  })
}

/** At most this many malformed lines are listed. */
const maxProblems = 5

/** The samples of a JSON-lines text (blank lines skipped), or every malformed line (up to 5). */
export const parse = (
  path: string,
  text: string,
  policy: string
): Either.Either<ReadonlyArray<Sample>, EvalFileError> => {
  const samples: Array<Sample> = []
  const problems: Array<string> = []
  text.split(/\r?\n/).forEach((content, i) => {
    if (content.trim().length === 0) return
    Either.match(parseLine(content, i + 1, policy), {
      onLeft: (why) => problems.push(`line ${i + 1}: ${why}`),
      onRight: (sample) => samples.push(sample)
    })
  })
  if (problems.length > 0) {
    const more = problems.length - maxProblems
    return Either.left(
      new EvalFileError({
        path,
        reason: "Malformed",
        detail: [
          `${problems.length} malformed line${problems.length === 1 ? "" : "s"}`,
          ...problems.slice(0, maxProblems).map((p) => `  ${p}`),
          ...(more > 0 ? [`  … and ${more} more`] : [])
        ].join("\n")
      })
    )
  }
  if (samples.length === 0) {
    return Either.left(
      new EvalFileError({ path, reason: "Empty", detail: "no requests (the file is empty)" })
    )
  }
  return Either.right(samples)
}

/** Reads and parses the set at `path`. */
export const read = (
  path: string,
  policy: string
): Effect.Effect<ReadonlyArray<Sample>, EvalFileError, FileSystem.FileSystem> =>
  Effect.gen(function* () {
    const fs = yield* FileSystem.FileSystem
    const text = yield* fs.readFileString(path).pipe(
      Effect.mapError(
        (error) =>
          new EvalFileError({
            path,
            reason: "Unreadable",
            detail:
              error._tag === "SystemError" && error.reason === "NotFound"
                ? "no such file"
                : `cannot read it (${error.message})`
          })
      )
    )
    return yield* parse(path, text, policy)
  })

// ---------------------------------------------------------------------------------------------
// Evaluation
// ---------------------------------------------------------------------------------------------

export interface Options {
  readonly classifier: Routing.ClassifierConfig
  readonly policy: Routing.PolicyConfig
  /** The config's prices, by model. */
  readonly prices: ReadonlyMap<string, RoutingOptions.Price>
  /** Completion tokens assumed for every request. */
  readonly outputTokens: number
  /** Prompt tokens of a request. */
  readonly countPrompt: (request: OpenAi.ChatCompletionRequest) => number
}

export interface Misroute {
  readonly line: number
  readonly label: Routing.Tier
  readonly tier: Routing.Tier
  readonly score: number
  /** Where the policy sent it. */
  readonly model: string
  /** Where its label's tier goes. */
  readonly labelModel: string
  /** Labelled complex, sent to the simple tier's model: the worst kind. */
  readonly complexToSimple: boolean
  readonly excerpt: string
}

export interface Cost {
  readonly promptTokens: number
  readonly completionTokens: number
  /** Under the policy. */
  readonly policyMicroUsd: number
  /** Everything on the policy's complex model. */
  readonly baselineMicroUsd: number
  readonly savedMicroUsd: number
  /** Of the baseline; `null` when the baseline costs nothing. */
  readonly savedPercent: number | null
}

export interface Outcome {
  readonly policy: string
  readonly tiers: Routing.PolicyConfig["tiers"]
  readonly requests: number
  readonly labelled: number
  /** Labelled requests whose tier is their label. */
  readonly correct: number
  /** `confusion[label][tier]`: labelled requests by label and predicted tier. */
  readonly confusion: Record<Routing.Tier, Record<Routing.Tier, number>>
  /** Requests per model the policy sends to, in tier order. */
  readonly models: ReadonlyArray<{
    readonly model: string
    readonly tiers: ReadonlyArray<Routing.Tier>
    readonly requests: number
  }>
  /** `null` when a model of the policy has no price: the models without one are in `unpriced`. */
  readonly cost: Cost | null
  readonly unpriced: ReadonlyArray<string>
  /** Labelled requests sent to another model than their label's tier: all of them, worst first. */
  readonly misroutes: ReadonlyArray<Misroute>
  /**
   * Requests whose score is in the second opinion's band, where the gateway would ask its model
   * (not asked here: the evaluation is of the heuristic alone); `null` when none is configured.
   */
  readonly inSecondOpinionBand: number | null
}

/** How far `score` is from the scores of `label`'s tier: how confidently wrong the classifier was. */
const distanceFromLabel = (
  score: number,
  label: Routing.Tier,
  thresholds: Routing.ClassifierConfig["thresholds"]
) =>
  label === "simple"
    ? score - thresholds.moderate
    : label === "complex"
      ? thresholds.complex - score
      : score < thresholds.moderate
        ? thresholds.moderate - score
        : score - thresholds.complex

const emptyRow = (): Record<Routing.Tier, number> => ({ simple: 0, moderate: 0, complex: 0 })

export const evaluate = (samples: ReadonlyArray<Sample>, options: Options): Outcome => {
  const { classifier, policy, prices, outputTokens } = options
  const confusion = { simple: emptyRow(), moderate: emptyRow(), complex: emptyRow() }
  const modelOrder = Array.from(new Set(Routing.tiers.map((t) => policy.tiers[t] as string)))
  const perModel = new Map(modelOrder.map((m) => [m, 0]))
  const unpriced = modelOrder.filter((m) => !prices.has(m))
  const priceOf = (model: string, promptTokens: number) => {
    const price = prices.get(model)
    return price === undefined
      ? 0
      : promptTokens * price.inputPerMillionUsd + outputTokens * price.outputPerMillionUsd
  }
  const misroutes: Array<Misroute & { readonly distance: number }> = []
  const band = classifier.secondOpinion?.band
  let inBand = 0
  let labelled = 0
  let correct = 0
  let promptTokens = 0
  let policyCost = 0
  let baselineCost = 0
  for (const sample of samples) {
    const { tier, score } = Classifier.classify(sample.request, classifier)
    const model = policy.tiers[tier] as string
    if (band !== undefined && score >= band[0] && score <= band[1]) inBand++
    perModel.set(model, (perModel.get(model) ?? 0) + 1)
    const tokens = options.countPrompt(sample.request)
    promptTokens += tokens
    policyCost += priceOf(model, tokens)
    baselineCost += priceOf(policy.tiers.complex, tokens)
    const label = sample.label
    if (label === undefined) continue
    labelled++
    confusion[label][tier]++
    if (tier === label) correct++
    const labelModel = policy.tiers[label] as string
    if (model !== labelModel) {
      misroutes.push({
        line: sample.line,
        label,
        tier,
        score,
        model,
        labelModel,
        complexToSimple: label === "complex" && model === policy.tiers.simple,
        excerpt: RoutingOptions.excerpt(sample.text),
        distance: distanceFromLabel(score, label, classifier.thresholds)
      })
    }
  }
  // The worst first: complex sent to the simple model, most confidently (lowest score) first;
  // then the rest, furthest from their label's scores first.
  misroutes.sort((a, b) =>
    a.complexToSimple !== b.complexToSimple
      ? a.complexToSimple
        ? -1
        : 1
      : a.complexToSimple
        ? a.score - b.score || a.line - b.line
        : b.distance - a.distance || a.line - b.line
  )
  const saved = baselineCost - policyCost
  return {
    policy: policy.name,
    tiers: policy.tiers,
    requests: samples.length,
    labelled,
    correct,
    confusion,
    models: modelOrder.map((model) => ({
      model,
      tiers: Routing.tiers.filter((t) => policy.tiers[t] === model),
      requests: perModel.get(model) ?? 0
    })),
    cost:
      unpriced.length > 0
        ? null
        : {
            promptTokens,
            completionTokens: outputTokens * samples.length,
            policyMicroUsd: policyCost,
            baselineMicroUsd: baselineCost,
            savedMicroUsd: saved,
            savedPercent: baselineCost === 0 ? null : (100 * saved) / baselineCost
          },
    unpriced,
    misroutes: misroutes.map(({ distance: _, ...misroute }) => misroute),
    inSecondOpinionBand: band === undefined ? null : inBand
  }
}

/** Misroutes listed, at most. */
export const maxMisroutes = 10

/** The outcome as an operator reads it. */
export const render = (
  outcome: Outcome,
  source: { readonly path: string; readonly outputTokens: number }
) => {
  const { tiers } = outcome
  const lines: Array<string> = [
    `${source.path}: ${outcome.requests} request${outcome.requests === 1 ? "" : "s"}, ${outcome.labelled} labelled; ` +
      `policy ${outcome.policy} (${RoutingOptions.tiersText(outcome)})`,
    "",
    outcome.labelled === 0
      ? "accuracy  - (no labelled requests)"
      : `accuracy  ${outcome.correct}/${outcome.labelled} = ${RoutingOptions.percent(outcome.correct, outcome.labelled)}`,
    ""
  ]
  if (outcome.labelled > 0) {
    const total = (label: Routing.Tier) => Routing.tiers.reduce((n, t) => n + outcome.confusion[label][t], 0)
    lines.push(
      ...RoutingOptions.table(
        ["label \\ predicted", ...Routing.tiers, "total"],
        Routing.tiers.map((label) => [
          label,
          ...Routing.tiers.map((t) => String(outcome.confusion[label][t])),
          String(total(label))
        ]),
        1
      ),
      ""
    )
  }
  lines.push(
    ...RoutingOptions.table(
      ["model", "tiers", "requests", "share"],
      outcome.models.map((m) => [
        m.model,
        m.tiers.join(", "),
        String(m.requests),
        RoutingOptions.percent(m.requests, outcome.requests)
      ]),
      2
    ),
    ""
  )
  const cost = outcome.cost
  if (cost === null) {
    lines.push(`cost: not computed, no pricing in the config for ${outcome.unpriced.join(", ")}`)
  } else {
    const all = `all on ${tiers.complex}`
    const under = `under ${outcome.policy}`
    const width = Math.max(all.length, under.length, "saved".length)
    lines.push(
      `cost (${cost.promptTokens} prompt tokens counted with o200k_base, ${source.outputTokens} completion tokens assumed per request)`,
      `  ${under.padEnd(width)}  ${RoutingOptions.usd(cost.policyMicroUsd)}`,
      `  ${all.padEnd(width)}  ${RoutingOptions.usd(cost.baselineMicroUsd)}`,
      `  ${"saved".padEnd(width)}  ${RoutingOptions.usd(cost.savedMicroUsd)}` +
        (cost.savedPercent === null ? "" : ` (${cost.savedPercent.toFixed(1)}%)`)
    )
  }
  if (outcome.inSecondOpinionBand !== null && outcome.inSecondOpinionBand > 0) {
    lines.push(
      "",
      `${outcome.inSecondOpinionBand} request${outcome.inSecondOpinionBand === 1 ? "" : "s"} scored in the second ` +
        "opinion's band, where the gateway asks a model; this evaluates the heuristic alone."
    )
  }
  if (outcome.labelled === 0) return lines
  const misroutes = outcome.misroutes
  if (misroutes.length === 0) {
    return [...lines, "", "misroutes: none (every labelled request went to its label's model)"]
  }
  const shown = misroutes.slice(0, maxMisroutes)
  return [
    ...lines,
    "",
    `misroutes: ${misroutes.length} of ${outcome.labelled} labelled requests went to another model than their label's, ` +
      `worst first${misroutes.length > shown.length ? ` (the first ${shown.length})` : ""}`,
    ...RoutingOptions.table(
      ["line", "label", "tier", "model", "score", "prompt"],
      shown.map((m) => [
        String(m.line),
        m.label,
        m.tier,
        m.model,
        m.score.toFixed(4),
        JSON.stringify(m.excerpt)
      ]),
      99
    ).map((line) => `  ${line}`)
  ]
}
