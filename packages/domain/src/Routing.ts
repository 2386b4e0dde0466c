/**
 * Complexity-based routing: the classifier's features, weights and tier thresholds, and the
 * routing policies that map a tier to a model. A request naming a policy (`"model": "auto"`) is
 * classified and sent to its tier's model; one naming a concrete model bypasses the classifier.
 * Keys are snake_case in the config file, camelCase in code.
 */
import { Schema } from "effect"
import { ModelName } from "./Ids.js"

const snake = <S extends Schema.Schema.Any>(key: string, schema: S) =>
  Schema.optional(schema).pipe(Schema.fromKey(key))
const snakeWithDefault = <S extends Schema.Schema.AnyNoContext>(
  key: string,
  schema: S,
  value: () => Schema.Schema.Type<S>
) => Schema.optionalWith(schema, { default: value }).pipe(Schema.fromKey(key))

const Weight = Schema.Number.pipe(Schema.nonNegative(), Schema.finite())
const Unit = Schema.Number.pipe(Schema.between(0, 1))

export const Tier = Schema.Literal("simple", "moderate", "complex")
export type Tier = typeof Tier.Type

export const tiers: ReadonlyArray<Tier> = ["simple", "moderate", "complex"]

/**
 * What the classifier measures of a request. Sizes are in tokens, estimated from characters
 * (about 4 per token: the classifier must cost microseconds, a tokenizer would not).
 */
export const Features = Schema.Struct({
  /** The last user message. */
  lastTurnTokens: Schema.NonNegativeInt,
  /** Every message. */
  contextTokens: Schema.NonNegativeInt,
  /** Messages from the user and the assistant. */
  turns: Schema.NonNegativeInt,
  /** System and developer messages. */
  systemTokens: Schema.NonNegativeInt,
  /** Code in the last user turn: fences, and lines that look like code. */
  code: Schema.NonNegativeInt,
  /** Math in the last user turn: equations, operators between numbers, LaTeX. */
  math: Schema.NonNegativeInt,
  /** Reasoning cues in the last user turn: explain why, step by step, prove, compare, design … */
  reasoning: Schema.NonNegativeInt,
  /** Question marks in the last user turn. */
  questions: Schema.NonNegativeInt,
  /** Constraints in the last user turn: must, should, at least, without, exactly, list items … */
  constraints: Schema.NonNegativeInt,
  /** `max_completion_tokens` / `max_tokens`, 0 when the request sets none. */
  outputTokens: Schema.NonNegativeInt,
  /** Tools offered. */
  tools: Schema.NonNegativeInt,
  /** A `json_schema` response format. */
  jsonSchema: Schema.Boolean
}).annotations({ identifier: "Features" })
export type Features = typeof Features.Type

/** How much each feature weighs, and the value at which it counts fully (it saturates there). */
const featureKnobs = <D extends Record<string, number>>(defaults: D) =>
  Schema.Struct(
    Object.fromEntries(
      Object.entries(defaults).map(([key, value]) => [
        key,
        snakeWithDefault(
          key.replace(/[A-Z]/g, (c) => `_${c.toLowerCase()}`),
          Weight,
          () => value
        )
      ])
    ) as { [K in keyof D]: Schema.PropertySignature<":", number, never, "?:", number | undefined, true> }
  )

/** Default weights: what makes a request complex, relative to each other (they are normalised). */
export const defaultWeights = {
  lastTurnTokens: 1.5,
  contextTokens: 1,
  turns: 0.5,
  systemTokens: 0.25,
  code: 2,
  math: 1.5,
  reasoning: 2.5,
  questions: 1,
  constraints: 1.25,
  outputTokens: 1,
  tools: 0.75,
  jsonSchema: 0.5
}

/** Default saturation points: a feature at or above its scale counts fully. */
export const defaultScales = {
  lastTurnTokens: 400,
  contextTokens: 4000,
  turns: 12,
  systemTokens: 1000,
  code: 3,
  math: 4,
  reasoning: 3,
  questions: 4,
  constraints: 5,
  outputTokens: 2000,
  tools: 4,
  jsonSchema: 1
}

export const Weights = featureKnobs(defaultWeights)
export type Weights = typeof Weights.Type
export const Scales = featureKnobs(defaultScales)
export type Scales = typeof Scales.Type

/**
 * The optional second opinion for the uncertain middle: when the score falls inside `band`, a
 * small model is asked to classify (a short prompt, a strict JSON answer, `timeout_ms`); when it
 * does not answer in time or answers nonsense, the heuristic decision stands.
 */
export class SecondOpinionConfig extends Schema.Class<SecondOpinionConfig>("SecondOpinionConfig")({
  model: ModelName,
  band: Schema.Tuple(Unit, Unit).pipe(
    Schema.filter(([low, high]) => low <= high || "band must be [low, high] with low ≤ high")
  ),
  timeoutMs: snakeWithDefault("timeout_ms", Schema.Int.pipe(Schema.between(1, 60_000)), () => 300)
}) {}

/** The classifier: feature weights and scales, and the score thresholds between tiers. */
export class ClassifierConfig extends Schema.Class<ClassifierConfig>("ClassifierConfig")({
  weights: Schema.optionalWith(Weights, { default: () => Schema.decodeSync(Weights)({}) }),
  scales: Schema.optionalWith(Scales, { default: () => Schema.decodeSync(Scales)({}) }),
  /**
   * Scores at or above `moderate` (and below `complex`) are moderate; at or above `complex`,
   * complex. The defaults separate the labelled set `services/cli/test/fixtures/classify.jsonl`
   * best under the default weights (`pnpm cli classify eval` on it: 17 of 19).
   */
  thresholds: Schema.optionalWith(
    Schema.Struct({
      moderate: snakeWithDefault("moderate", Unit, () => 0.05),
      complex: snakeWithDefault("complex", Unit, () => 0.23)
    }).pipe(
      Schema.filter(
        (t) => t.moderate <= t.complex || "thresholds.moderate must not exceed thresholds.complex"
      )
    ),
    { default: () => ({ moderate: 0.05, complex: 0.23 }) }
  ),
  secondOpinion: snake("second_opinion", SecondOpinionConfig)
}) {}

/** A routing policy: a model alias clients name, and the model each tier goes to. */
export class PolicyConfig extends Schema.Class<PolicyConfig>("PolicyConfig")({
  /** What clients send as `model` (e.g. `auto`, `auto-cheap`); must not be a model's name. */
  name: ModelName,
  tiers: Schema.Struct({ simple: ModelName, moderate: ModelName, complex: ModelName }),
  /**
   * Classify and record without acting: requests naming the policy go to its `complex` model
   * (what they would get without routing), and the record says where the policy would have
   * sent them.
   */
  shadow: Schema.optionalWith(Schema.Boolean, { default: () => false }),
  /**
   * Concrete models whose requests this policy classifies and records, without acting (shadow
   * mode on traffic that names a model): what routing would do before anyone sends `auto`.
   */
  observe: Schema.optionalWith(Schema.Array(ModelName), { default: () => [] })
}) {}

/** The `routing` section. */
export class RoutingConfig extends Schema.Class<RoutingConfig>("RoutingConfig")({
  classifier: Schema.optionalWith(ClassifierConfig, { default: () => ClassifierConfig.make({}) }),
  policies: Schema.optionalWith(Schema.Array(PolicyConfig), { default: () => [] })
}) {}

/** What the classifier decided, and why. */
export const Classification = Schema.Struct({
  tier: Tier,
  /** 0 (trivial) to 1 (as complex as the features go). */
  score: Schema.Number,
  features: Features,
  /** The second opinion's tier, when one was asked and answered. */
  secondOpinion: Schema.optional(Tier)
}).annotations({ identifier: "Classification" })
export type Classification = typeof Classification.Type
