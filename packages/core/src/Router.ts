/**
 * Where a request goes before any replica is picked: the model it names, or — when it names a
 * routing policy (`"model": "auto"`) — the model of the tier the classifier gives it. A policy in
 * shadow mode classifies without acting (its `complex` model answers), and policies that observe a
 * concrete model classify that model's requests without acting. Every decision is returned for
 * the record (`RequestClassified`).
 */
import { Errors, type OpenAi, type Routing } from "@gateway/domain"
import { Effect, Either } from "effect"
import { BackendPool, type ModelPool } from "./BackendPool.js"
import * as Classifier from "./Classifier.js"
import { Settings } from "./Settings.js"

/** One policy's decision on a request. */
export interface Decision {
  readonly policy: string
  readonly classification: Routing.Classification
  /** The model of the tier. */
  readonly model: string
  /** Whether the request goes there (not in shadow mode, not an observed request). */
  readonly acted: boolean
}

export interface Route {
  /** The model whose replicas get the first attempt. */
  readonly primary: ModelPool
  /** The decision that chose it, when a policy did. */
  readonly decision: Decision | undefined
  /** Decisions recorded without acting (policies observing the requested model). */
  readonly observed: ReadonlyArray<Decision>
}

const none: ReadonlyArray<Decision> = []

export class Router extends Effect.Service<Router>()("@gateway/core/Router", {
  effect: Effect.gen(function* () {
    const settings = yield* Settings
    const pool = yield* BackendPool
    const { classifier, policies } = settings.routing
    const byName = new Map(policies.map((p) => [p.name as string, p]))
    const observers = new Map<string, Array<Routing.PolicyConfig>>()
    for (const policy of policies) {
      for (const model of policy.observe) {
        const list = observers.get(model) ?? []
        list.push(policy)
        observers.set(model, list)
      }
    }

    const decide = (
      policy: Routing.PolicyConfig,
      body: OpenAi.ChatCompletionRequest,
      acting: boolean
    ): Decision => {
      const classification = Classifier.classify(body, classifier)
      return {
        policy: policy.name,
        classification,
        model: policy.tiers[classification.tier],
        acted: acting && !policy.shadow
      }
    }

    /** The route of `body`, or `ModelNotFound` when it names neither a model nor a policy. */
    const routeNow = (body: OpenAi.ChatCompletionRequest): Either.Either<Route, Errors.ModelNotFound> => {
      const policy = byName.get(body.model)
      if (policy !== undefined) {
        const decision = decide(policy, body, true)
        // In shadow mode the policy's complex model answers: what the request would get unrouted.
        const primary = pool.model(decision.acted ? decision.model : policy.tiers.complex)
        return primary === undefined
          ? Either.left(new Errors.ModelNotFound({ model: body.model }))
          : Either.right({ primary, decision, observed: none })
      }
      const primary = pool.model(body.model)
      if (primary === undefined) return Either.left(new Errors.ModelNotFound({ model: body.model }))
      const watching = observers.get(body.model)
      return Either.right({
        primary,
        decision: undefined,
        observed: watching === undefined ? none : watching.map((p) => decide(p, body, false))
      })
    }

    /**
     * The route of `body`: its model, or its policy's choice; `ModelNotFound` when it names
     * neither. An Effect because a policy may ask a model for a second opinion.
     */
    const route = (body: OpenAi.ChatCompletionRequest): Effect.Effect<Route, Errors.ModelNotFound> =>
      routeNow(body)

    return { route } as const
  })
}) {}
