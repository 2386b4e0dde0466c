/**
 * A circuit breaker for one backend replica: closed → open after repeated failures (in a row, or
 * a failure rate over a sliding window), open fails fast for a cooldown that grows with each
 * re-open, then half-open lets a few probes decide between closed and open again.
 *
 * Time comes from Effect's `Clock` (tests drive it with `TestClock`). The state belongs to the
 * breaker instance and is changed only inside its own synchronous steps, so every decision is
 * atomic and `acquire` in the closed state costs a clock read and an allocation.
 */
import { GatewayConfig } from "@gateway/domain"
import { Effect, Schema } from "effect"

/** The `circuit_breaker` section of the config file; every key has a default. */
export const CircuitBreakerConfig = GatewayConfig.CircuitBreakerConfig
export type CircuitBreakerConfig = GatewayConfig.CircuitBreakerConfig

export type State = "closed" | "open" | "half_open"

/** The breaker refused a call without making it; `retryAfterMs` is 0 when half-open probes are busy. */
export class BreakerOpen extends Schema.TaggedError<BreakerOpen>()("BreakerOpen", {
  backend: Schema.String,
  state: Schema.Literal("open", "half_open"),
  retryAfterMs: Schema.Number
}) {
  override get message() {
    return this.state === "open"
      ? `Backend ${this.backend} is unavailable (circuit open), retry in ${this.retryAfterMs} ms.`
      : `Backend ${this.backend} is unavailable (circuit half-open, probing).`
  }
}

/** Why the breaker changed state; opening reasons carry the cooldown they start. */
export type TransitionReason =
  | { readonly _tag: "ConsecutiveFailures"; readonly failures: number; readonly cooldownMs: number }
  | {
      readonly _tag: "FailureRate"
      readonly failures: number
      readonly requests: number
      readonly cooldownMs: number
    }
  | { readonly _tag: "ProbeFailed"; readonly cooldownMs: number }
  | { readonly _tag: "CooldownElapsed" }
  | { readonly _tag: "ProbesSucceeded"; readonly successes: number }

export interface Transition {
  readonly backend: string
  readonly from: State
  readonly to: State
  readonly reason: TransitionReason
  /** Epoch milliseconds (Effect `Clock`). */
  readonly at: number
}

/** What `GET /admin/backends` shows of a breaker. */
export interface Snapshot {
  readonly backend: string
  readonly state: State
  /** Epoch milliseconds when the current state began. */
  readonly since: number
  readonly consecutiveFailures: number
  /** Calls and failures in the sliding window (closed state only; cleared on every transition). */
  readonly windowRequests: number
  readonly windowFailures: number
  /** Opens in a row without closing in between; the cooldown grows with it. */
  readonly opens: number
  /** While open: the time left until half-open, else 0. */
  readonly retryAfterMs: number
  readonly probesInFlight: number
  readonly probeSuccesses: number
}

/**
 * The right to make one call. Complete it exactly once: `succeed`, `fail`, or `release` when the
 * outcome says nothing about the backend (e.g. the client went away). Later completions are ignored,
 * and so is a permit issued before the breaker last changed state.
 */
export interface Permit {
  readonly succeed: Effect.Effect<void>
  readonly fail: Effect.Effect<void>
  readonly release: Effect.Effect<void>
}

export interface CircuitBreaker {
  readonly backend: string
  /** A permit to call the backend, or `BreakerOpen` at once when the breaker refuses. */
  readonly acquire: Effect.Effect<Permit, BreakerOpen>
  readonly state: Effect.Effect<Snapshot>
  /**
   * Whether `acquire` would give a permit now (closed, cooldown over, or a probe slot free),
   * without changing anything: what a balancer filters its candidates by.
   */
  readonly unsafeAvailable: () => boolean
  /** While open: the time left until half-open, in ms; else 0. */
  readonly unsafeRetryAfterMs: () => number
}

type Outcome = "success" | "failure" | "release"

/** The sliding window is kept in this many buckets, so it slides in steps of `window / 10`. */
const WINDOW_BUCKETS = 10

class PermitImpl implements Permit {
  done = false
  constructor(
    readonly generation: number,
    readonly probe: boolean,
    private readonly complete: (permit: PermitImpl, outcome: Outcome) => Effect.Effect<void>
  ) {}
  get succeed() {
    return this.complete(this, "success")
  }
  get fail() {
    return this.complete(this, "failure")
  }
  get release() {
    return this.complete(this, "release")
  }
}

/**
 * A breaker for `backend`. `onTransition` is called for every change of state, in order, before the
 * call that caused it returns; a failing callback is logged, never passed on. The move from open to
 * half-open happens (and is reported) on the first `acquire` or `state` after the cooldown.
 */
export const make = (options: {
  readonly backend: string
  readonly config?: CircuitBreakerConfig | undefined
  readonly onTransition?: ((transition: Transition) => Effect.Effect<void>) | undefined
}): Effect.Effect<CircuitBreaker> =>
  Effect.gen(function* () {
    const clock = yield* Effect.clock
    const backend = options.backend
    const config = options.config ?? CircuitBreakerConfig.make({})
    const onTransition = options.onTransition
    const maxCooldownMs = Math.max(config.maxCooldownMs, config.cooldownMs)
    const bucketMs = Math.max(1, Math.ceil(config.windowMs / WINDOW_BUCKETS))

    let state: State = "closed"
    let since = clock.unsafeCurrentTimeMillis()
    /** Bumped on every transition; a permit from another generation is stale. */
    let generation = 0
    let consecutiveFailures = 0
    let opens = 0
    let openUntil = 0
    let probesInFlight = 0
    let probeSuccesses = 0
    const bucketIndex = new Float64Array(WINDOW_BUCKETS).fill(Number.NEGATIVE_INFINITY)
    const bucketRequests = new Float64Array(WINDOW_BUCKETS)
    const bucketFailures = new Float64Array(WINDOW_BUCKETS)
    const pending: Array<Transition> = []

    const windowTotals = (now: number) => {
      const current = Math.floor(now / bucketMs)
      let requests = 0
      let failures = 0
      for (let i = 0; i < WINDOW_BUCKETS; i++) {
        if (bucketIndex[i]! > current - WINDOW_BUCKETS) {
          requests += bucketRequests[i]!
          failures += bucketFailures[i]!
        }
      }
      return { requests, failures }
    }

    const record = (now: number, failed: boolean) => {
      const index = Math.floor(now / bucketMs)
      const slot = index % WINDOW_BUCKETS
      if (bucketIndex[slot] !== index) {
        bucketIndex[slot] = index
        bucketRequests[slot] = 0
        bucketFailures[slot] = 0
      }
      bucketRequests[slot]! += 1
      if (failed) bucketFailures[slot]! += 1
    }

    const transition = (now: number, to: State, reason: TransitionReason) => {
      const from = state
      state = to
      since = now
      generation++
      consecutiveFailures = 0
      probesInFlight = 0
      probeSuccesses = 0
      bucketIndex.fill(Number.NEGATIVE_INFINITY)
      if (onTransition !== undefined) pending.push({ backend, from, to, reason, at: now })
    }

    const nextCooldown = () => Math.min(config.cooldownMs * config.cooldownFactor ** opens, maxCooldownMs)

    const open = (now: number, reason: (cooldownMs: number) => TransitionReason) => {
      const cooldownMs = nextCooldown()
      transition(now, "open", reason(cooldownMs))
      opens++
      openUntil = now + cooldownMs
    }

    /** Open → half-open once the cooldown is over. */
    const advance = (now: number) => {
      if (state === "open" && now >= openUntil) transition(now, "half_open", { _tag: "CooldownElapsed" })
    }

    const lock = Effect.unsafeMakeSemaphore(1)
    const drain: Effect.Effect<void> = Effect.suspend(() => {
      const next = pending.shift()
      return next === undefined
        ? Effect.void
        : onTransition!(next).pipe(
            Effect.catchAllCause((cause) =>
              Effect.logWarning("CircuitBreaker: onTransition failed", cause).pipe(
                Effect.annotateLogs({ backend })
              )
            ),
            Effect.zipRight(drain)
          )
    })
    /** Reports the pending transitions, in order (whoever holds the lock reports everyone's). */
    const report = Effect.uninterruptible(lock.withPermits(1)(drain))
    const reported = <A, E>(result: Effect.Effect<A, E>): Effect.Effect<A, E> =>
      pending.length === 0 ? result : Effect.zipRight(report, result)

    const complete = (permit: PermitImpl, outcome: Outcome): Effect.Effect<void> =>
      Effect.suspend(() => {
        if (permit.done) return Effect.void
        permit.done = true
        if (permit.generation !== generation) return Effect.void
        const now = clock.unsafeCurrentTimeMillis()
        if (state === "closed") {
          if (outcome === "release") return Effect.void
          record(now, outcome === "failure")
          if (outcome === "success") {
            consecutiveFailures = 0
            return Effect.void
          }
          consecutiveFailures++
          if (consecutiveFailures >= config.consecutiveFailures) {
            const failures = consecutiveFailures
            open(now, (cooldownMs) => ({ _tag: "ConsecutiveFailures", failures, cooldownMs }))
          } else {
            const { requests, failures } = windowTotals(now)
            if (requests >= config.minimumRequests && failures >= config.failureRate * requests) {
              open(now, (cooldownMs) => ({ _tag: "FailureRate", failures, requests, cooldownMs }))
            }
          }
        } else if (state === "half_open" && permit.probe) {
          probesInFlight--
          if (outcome === "success") {
            probeSuccesses++
            if (probeSuccesses >= config.successesToClose) {
              opens = 0
              transition(now, "closed", { _tag: "ProbesSucceeded", successes: probeSuccesses })
            }
          } else if (outcome === "failure") {
            open(now, (cooldownMs) => ({ _tag: "ProbeFailed", cooldownMs }))
          }
        }
        return reported(Effect.void)
      })

    const acquire: Effect.Effect<Permit, BreakerOpen> = Effect.suspend(() => {
      if (state === "closed") return Effect.succeed(new PermitImpl(generation, false, complete))
      const now = clock.unsafeCurrentTimeMillis()
      advance(now)
      let result: Effect.Effect<Permit, BreakerOpen>
      if (state === "open") {
        result = Effect.fail(new BreakerOpen({ backend, state: "open", retryAfterMs: openUntil - now }))
      } else if (probesInFlight < config.halfOpenProbes) {
        probesInFlight++
        result = Effect.succeed(new PermitImpl(generation, true, complete))
      } else {
        result = Effect.fail(new BreakerOpen({ backend, state: "half_open", retryAfterMs: 0 }))
      }
      return reported(result)
    })

    const snapshot: Effect.Effect<Snapshot> = Effect.suspend(() => {
      const now = clock.unsafeCurrentTimeMillis()
      advance(now)
      const window = state === "closed" ? windowTotals(now) : { requests: 0, failures: 0 }
      return reported(
        Effect.succeed<Snapshot>({
          backend,
          state,
          since,
          consecutiveFailures,
          windowRequests: window.requests,
          windowFailures: window.failures,
          opens,
          retryAfterMs: state === "open" ? openUntil - now : 0,
          probesInFlight,
          probeSuccesses
        })
      )
    })

    const unsafeAvailable = () =>
      state === "closed" ||
      (state === "open"
        ? clock.unsafeCurrentTimeMillis() >= openUntil
        : probesInFlight < config.halfOpenProbes)

    const unsafeRetryAfterMs = () =>
      state === "open" ? Math.max(0, openUntil - clock.unsafeCurrentTimeMillis()) : 0

    return { backend, acquire, state: snapshot, unsafeAvailable, unsafeRetryAfterMs } satisfies CircuitBreaker
  })
