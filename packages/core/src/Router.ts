/**
 * Where a request goes before any replica is picked: the model it names, or — when it names a
 * routing policy (`"model": "auto"`) — the model of the tier the classifier gives it. A policy in
 * shadow mode classifies without acting (its `complex` model answers), and policies that observe a
 * concrete model classify that model's requests without acting. Every decision is returned for
 * the record (`RequestClassified`).
 */
import { Errors, type Ids, type OpenAi, type Routing } from "@gateway/domain"
import { Cause, Duration, Effect, Either, Exit, Option } from "effect"
import type { Principal } from "./Auth.js"
import { BackendPool, type ModelPool } from "./BackendPool.js"
import * as Classifier from "./Classifier.js"
import * as SecondOpinion from "./SecondOpinion.js"
import { Settings } from "./Settings.js"
import * as Tracing from "./Tracing.js"
import { Upstream } from "./Upstream.js"

const encoder = new TextEncoder()

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
    const upstream = yield* Upstream
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

    const second = classifier.secondOpinion
    /**
     * The classification, revised by the second-opinion model when the score is in its band and
     * it answers in time with a tier; anything else (timeout, error, nonsense) keeps it as it is.
     */
    const reconsider = (
      body: OpenAi.ChatCompletionRequest,
      classification: Routing.Classification,
      requestId: Ids.RequestId
    ): Effect.Effect<Routing.Classification> => {
      if (second === undefined) return Effect.succeed(classification)
      const [low, high] = second.band
      if (classification.score < low || classification.score > high) return Effect.succeed(classification)
      const target = pool.model(second.model)
      if (target === undefined) return Effect.succeed(classification)
      return Effect.gen(function* () {
        const replica = yield* target.pick()
        if (replica === undefined) return classification
        const lease = yield* replica.begin()
        const question = SecondOpinion.request(target.entry.config.name, body)
        const answer = yield* upstream
          .chat({
            requestId,
            clientRequestId: undefined,
            target: replica.target,
            body: question,
            raw: encoder.encode(JSON.stringify(question))
          })
          .pipe(
            Effect.timeout(Duration.millis(second.timeoutMs)),
            Effect.onExit((exit) =>
              Exit.isSuccess(exit)
                ? lease.succeed
                : Option.match(Cause.failureOption(exit.cause), {
                    // Too slow for the budget, or interrupted: says nothing about the backend.
                    onNone: () => lease.release,
                    onSome: (error) =>
                      error instanceof Errors.BackendError ? lease.fail(error) : lease.release
                  })
            )
          )
        const tier = answer._tag === "Complete" ? SecondOpinion.tierOf(answer.body) : undefined
        return tier === undefined ? classification : { ...classification, tier, secondOpinion: tier }
      }).pipe(
        Effect.catchAll((error) =>
          Effect.as(Effect.logDebug("second opinion not taken", String(error)), classification)
        )
      )
    }

    /** The route of `body`, or `ModelNotFound` when it names neither a model nor a policy. */
    const routeNow = (
      body: OpenAi.ChatCompletionRequest,
      principal: Principal | undefined
    ): Either.Either<Route, Errors.ModelNotFound> => {
      const named = byName.get(body.model)
      // A policy name means the caller's bound policy, when its key (or else its tenant) has one.
      const bound =
        named === undefined ? undefined : (principal?.key.policy ?? principal?.tenant?.policy ?? null)
      const policy = bound === null || bound === undefined ? named : (byName.get(bound) ?? named)
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
    const routeUntraced = (
      body: OpenAi.ChatCompletionRequest,
      requestId: Ids.RequestId,
      principal?: Principal | undefined
    ): Effect.Effect<Route, Errors.ModelNotFound> => {
      const now = routeNow(body, principal)
      if (second === undefined || Either.isLeft(now) || now.right.decision === undefined) return now
      const found = now.right
      const decision = found.decision!
      return Effect.map(reconsider(body, decision.classification, requestId), (classification): Route => {
        if (classification === decision.classification) return found
        const policy = byName.get(decision.policy)!
        const revised: Decision = { ...decision, classification, model: policy.tiers[classification.tier] }
        if (!revised.acted) return { ...found, decision: revised }
        return { ...found, decision: revised, primary: pool.model(revised.model) ?? found.primary }
      })
    }

    /** `route` in a `gateway.route` span, with a `gateway.classify` child when a policy decides. */
    const routeTraced = (
      body: OpenAi.ChatCompletionRequest,
      requestId: Ids.RequestId,
      principal?: Principal | undefined
    ): Effect.Effect<Route, Errors.ModelNotFound> => {
      const routed = Effect.suspend(() => routeUntraced(body, requestId, principal))
      const classifies = byName.has(body.model) || observers.has(body.model)
      return (
        classifies
          ? routed.pipe(
              Effect.tap(({ decision }) =>
                decision === undefined
                  ? Effect.void
                  : Effect.annotateCurrentSpan({
                      "gateway.policy": decision.policy,
                      "gateway.tier": decision.classification.tier,
                      "gateway.score": decision.classification.score,
                      "gateway.acted": decision.acted,
                      ...(decision.classification.secondOpinion === undefined
                        ? {}
                        : { "gateway.second_opinion": decision.classification.secondOpinion })
                    })
              ),
              Tracing.spanned(true, "gateway.classify")
            )
          : routed
      ).pipe(
        Effect.tap(({ primary }) =>
          Effect.annotateCurrentSpan({ "gen_ai.request.model": body.model, "gateway.model": primary.name })
        ),
        Tracing.spanned(true, "gateway.route")
      )
    }

    const traced = yield* Tracing.enabled
    return { route: traced ? routeTraced : routeUntraced } as const
  })
}) {}
