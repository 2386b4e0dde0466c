/**
 * `classify explain`: what the classifier makes of one prompt — each feature with its scale,
 * weight and share of the score, the score against the thresholds, the tier — and the model the
 * policy would send it to.
 */
import * as Classifier from "@gateway/core/Classifier"
import type { OpenAi, Routing } from "@gateway/domain"
import * as AdminOptions from "./AdminOptions.js"
import * as RoutingOptions from "./RoutingOptions.js"

export interface FeatureLine {
  readonly name: keyof Routing.Features
  readonly value: number | boolean
  readonly scale: number
  readonly weight: number
  /** What the feature adds to the score: its weight × its share of its scale, over all weights. */
  readonly contribution: number
}

export interface Explanation {
  readonly policy: string
  readonly tiers: Routing.PolicyConfig["tiers"]
  readonly shadow: boolean
  readonly tier: Routing.Tier
  readonly score: number
  readonly thresholds: Routing.ClassifierConfig["thresholds"]
  /** The model of the tier: where the policy sends the request. */
  readonly model: string
  /** The model that would answer: the tier's, or in shadow mode the policy's complex model. */
  readonly answeredBy: string
  readonly features: ReadonlyArray<FeatureLine>
  /** The configured second opinion, and whether this score is in its band (the gateway would ask). */
  readonly secondOpinion: {
    readonly model: string
    readonly band: readonly [number, number]
    readonly asked: boolean
  } | null
}

/** A one-message chat request of `prompt`, as a client naming the policy sends it. */
export const requestOf = (prompt: string, policy: string): OpenAi.ChatCompletionRequest => ({
  model: policy,
  messages: [{ role: "user", content: prompt }]
})

export const explain = (
  request: OpenAi.ChatCompletionRequest,
  classifier: Routing.ClassifierConfig,
  policy: Routing.PolicyConfig
): Explanation => {
  const { tier, score, features } = Classifier.classify(request, classifier)
  const names = Object.keys(features) as Array<keyof Routing.Features>
  const total = names.reduce((sum, name) => sum + classifier.weights[name], 0)
  const lines = names.map((name): FeatureLine => {
    const value = features[name]
    const scale = classifier.scales[name]
    const weight = classifier.weights[name]
    const n = typeof value === "boolean" ? (value ? 1 : 0) : value
    const share = scale > 0 ? Math.min(1, n / scale) : n > 0 ? 1 : 0
    return {
      name,
      value,
      scale,
      weight,
      contribution: total === 0 ? 0 : Math.round(((weight * share) / total) * 10_000) / 10_000
    }
  })
  const model = policy.tiers[tier]
  const second = classifier.secondOpinion
  return {
    policy: policy.name,
    tiers: policy.tiers,
    shadow: policy.shadow,
    tier,
    score,
    thresholds: classifier.thresholds,
    model,
    answeredBy: policy.shadow ? policy.tiers.complex : model,
    features: lines,
    secondOpinion:
      second === undefined
        ? null
        : {
            model: second.model,
            band: second.band,
            asked: score >= second.band[0] && score <= second.band[1]
          }
  }
}

/** The explanation as an operator reads it. */
export const render = (e: Explanation): ReadonlyArray<string> => {
  const decision = e.shadow ? `${e.model} (shadow mode: recorded only; ${e.answeredBy} answers)` : e.model
  const rows = e.features.map((f) => [
    f.name,
    typeof f.value === "boolean" ? (f.value ? "yes" : "no") : String(f.value),
    String(f.scale),
    String(f.weight),
    f.contribution.toFixed(4)
  ])
  return [
    ...AdminOptions.fields([
      ["policy", `${e.policy} (${RoutingOptions.tiersText(e)})`],
      [
        "score",
        `${e.score.toFixed(4)} (moderate from ${e.thresholds.moderate}, complex from ${e.thresholds.complex})`
      ],
      ["tier", e.tier],
      ["decision", decision],
      ...(e.secondOpinion === null
        ? []
        : [
            [
              "second opinion",
              e.secondOpinion.asked
                ? `the score is in [${e.secondOpinion.band.join(", ")}]: the gateway asks ${e.secondOpinion.model}, ` +
                  "whose tier, if it answers in time, replaces this one (not asked here)"
                : `not asked (the score is outside [${e.secondOpinion.band.join(", ")}])`
            ] as const
          ])
    ]),
    "",
    ...RoutingOptions.table(["feature", "value", "scale", "weight", "adds"], rows, 1)
  ]
}
