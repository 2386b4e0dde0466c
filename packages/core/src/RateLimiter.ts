/**
 * Admission: before a request goes anywhere, reserve its worst case against every limit of its
 * key and tenant — requests and tokens per minute, concurrent requests, the spend budget — in one
 * atomic decision of the limiter store; after it, settle to what it really used, off the
 * response path. The answer carries OpenAI's `x-ratelimit-*` headers.
 *
 * When the shared store (Redis) cannot be reached, the configured policy decides: `fail_open`
 * admits against a local bucket of the same limits on this replica (a guard, not exactness),
 * `fail_closed` refuses with a 503. Either way the request never waits long: after a failure the
 * store is skipped for a second before it is tried again, and the outage is logged and counted.
 * A reservation the store failed to answer may still be applied once it does: it is cancelled in
 * the background (retried for a while), so it never holds a slot or a charge for nothing.
 */
import { Errors } from "@gateway/domain"
import { Clock, Context, Effect, FiberSet, Layer, Queue, Ref, Schedule } from "effect"
import type { Principal } from "./Auth.js"
import * as LimiterStore from "./LimiterStore.js"
import * as MemoryLimiterStore from "./MemoryLimiterStore.js"

/** A request's worst case (before) or actual use (after). */
export interface Usage {
  readonly tokens: number
  readonly costMicroUsd: number
}

/** An admitted request's hold on its limits. */
export interface Admission {
  /** `x-ratelimit-*` headers for the response (empty when the key has no such limits). */
  readonly headers: Readonly<Record<string, string>>
  /**
   * Gives back what the request did not use and frees its concurrency slot, in the background.
   * Only the first call counts, so every exit path may call it.
   */
  readonly settle: (actual: Usage) => void
}

export interface Status {
  /** `redis` or `memory`. */
  readonly store: string
  /** The shared store is being skipped after a failure. */
  readonly degraded: boolean
  /** Admissions the shared store failed (each served or refused by the policy). */
  readonly storeFailures: number
  readonly refused: {
    readonly requests: number
    readonly tokens: number
    readonly concurrent: number
    readonly budget: number
  }
}

export type Refusal = Errors.RateLimited | Errors.QuotaExceeded | Errors.ServiceUnavailable

export class RateLimiter extends Context.Tag("@gateway/core/RateLimiter")<
  RateLimiter,
  {
    /** Whether admitting this caller needs a token and cost estimate (it has such limits). */
    readonly needsEstimate: (principal: Principal | undefined) => boolean
    readonly admit: (
      principal: Principal | undefined,
      estimate: Usage,
      leaseTtlMs: number
    ) => Effect.Effect<Admission, Refusal>
    readonly status: Effect.Effect<Status>
  }
>() {}

export interface Options {
  readonly failure: "fail_open" | "fail_closed"
  /** How long the shared store is skipped after it failed. */
  readonly backoffMs?: number | undefined
}

const noHeaders: Readonly<Record<string, string>> = {}

/** Nothing to hold and nothing to give back. */
const unlimited: Admission = { headers: noHeaders, settle: () => {} }

/** A duration as OpenAI writes it in `x-ratelimit-reset-*`: `20ms`, `1s`, `6m0s`, `1h2m3s`. */
export const formatReset = (ms: number): string => {
  if (Math.ceil(ms) < 1000) return `${Math.max(0, Math.ceil(ms))}ms`
  const total = Math.ceil(ms / 1000)
  const h = Math.floor(total / 3600)
  const m = Math.floor((total % 3600) / 60)
  const s = total % 60
  return h > 0 ? `${h}h${m}m${s}s` : m > 0 ? `${m}m${s}s` : `${s}s`
}

const minute = 60_000

/** What a client refused for concurrency is told to wait. */
const concurrencyRetryMs = 1_000

/** The checks a caller's limits ask for, with the request's estimate as the cost. */
const checksOf = (principal: Principal, estimate: Usage): Array<LimiterStore.Check> => {
  const checks: Array<LimiterStore.Check> = []
  const add = (scope: LimiterStore.Scope, id: string, limits: Principal["key"]["limits"]) => {
    // The subject in braces: one Redis Cluster slot per key or tenant.
    const base = `{${scope === "key" ? "k" : "t"}:${id}}`
    if (limits.requestsPerMinute !== undefined) {
      checks.push({
        kind: "rate",
        key: `${base}:rpm`,
        limit: "requests",
        scope,
        capacity: limits.requestsPerMinute,
        windowMs: minute,
        cost: 1
      })
    }
    if (limits.tokensPerMinute !== undefined) {
      checks.push({
        kind: "rate",
        key: `${base}:tpm`,
        limit: "tokens",
        scope,
        capacity: limits.tokensPerMinute,
        windowMs: minute,
        // A reservation larger than the bucket could never pass: it waits for a full bucket.
        cost: Math.min(Math.max(0, Math.ceil(estimate.tokens)), limits.tokensPerMinute)
      })
    }
    if (limits.concurrentRequests !== undefined) {
      checks.push({ kind: "concurrency", key: `${base}:conc`, scope, capacity: limits.concurrentRequests })
    }
    if (limits.budget !== undefined) {
      checks.push({
        kind: "budget",
        key: `${base}:spend`,
        scope,
        capacity: limits.budget.amountMicroUsd,
        period: limits.budget.period,
        cost: Math.max(0, Math.ceil(estimate.costMicroUsd))
      })
    }
  }
  add("key", principal.keyId, principal.key.limits)
  if (principal.tenant !== undefined) add("tenant", principal.tenantId, principal.tenant.limits)
  return checks
}

const hasLimits = (principal: Principal) => {
  const k = principal.key.limits
  const t = principal.tenant?.limits
  return (
    k.requestsPerMinute !== undefined ||
    k.tokensPerMinute !== undefined ||
    k.concurrentRequests !== undefined ||
    k.budget !== undefined ||
    (t !== undefined &&
      (t.requestsPerMinute !== undefined ||
        t.tokensPerMinute !== undefined ||
        t.concurrentRequests !== undefined ||
        t.budget !== undefined))
  )
}

const needsEstimate = (principal: Principal | undefined) => {
  if (principal === undefined) return false
  const k = principal.key.limits
  const t = principal.tenant?.limits
  return (
    k.tokensPerMinute !== undefined ||
    k.budget !== undefined ||
    t?.tokensPerMinute !== undefined ||
    t?.budget !== undefined
  )
}

/** The `x-ratelimit-*` headers, from the first requests and tokens buckets (the key's before the tenant's). */
const headersOf = (
  checks: ReadonlyArray<LimiterStore.Check>,
  states: ReadonlyArray<LimiterStore.CheckState>
) => {
  let requests = -1
  let tokens = -1
  for (let i = 0; i < checks.length; i++) {
    const check = checks[i]!
    if (check.kind !== "rate") continue
    if (check.limit === "requests") {
      if (requests === -1) requests = i
    } else if (tokens === -1) tokens = i
  }
  const headers: Record<string, string> = {}
  if (requests !== -1) {
    headers["x-ratelimit-limit-requests"] = String(checks[requests]!.capacity)
    headers["x-ratelimit-remaining-requests"] = String(Math.max(0, Math.floor(states[requests]!.remaining)))
    headers["x-ratelimit-reset-requests"] = formatReset(states[requests]!.resetMs)
  }
  if (tokens !== -1) {
    headers["x-ratelimit-limit-tokens"] = String(checks[tokens]!.capacity)
    headers["x-ratelimit-remaining-tokens"] = String(Math.max(0, Math.floor(states[tokens]!.remaining)))
    headers["x-ratelimit-reset-tokens"] = formatReset(states[tokens]!.resetMs)
  }
  return headers
}

const refusalOf = (
  check: LimiterStore.Check,
  retryAfterMs: number
): Errors.RateLimited | Errors.QuotaExceeded =>
  check.kind === "budget"
    ? new Errors.QuotaExceeded({
        scope: check.scope,
        budgetMicroUsd: check.capacity,
        period: check.period,
        retryAfterMs
      })
    : new Errors.RateLimited({
        limit: check.kind === "concurrency" ? "concurrent" : check.limit,
        scope: check.scope,
        capacity: check.capacity,
        requested: check.kind === "concurrency" ? 1 : check.cost,
        // A slot frees when a running request ends, long before the store's lease would expire.
        retryAfterMs: check.kind === "concurrency" ? Math.min(retryAfterMs, concurrencyRetryMs) : retryAfterMs
      })

/** Retries of settlements the store could not take (a failover): they free slots and refund budgets. */
const settleRetry = Schedule.exponential("50 millis").pipe(
  Schedule.union(Schedule.spaced("2 seconds")),
  Schedule.jittered,
  // Settlements are idempotent: worth retrying through a failover, up to about a lease's life.
  Schedule.upTo("2 minutes")
)

/**
 * Retries of a cancel: the store just failed, so it may be away a while; the same backoff, capped
 * at 2 s a try, for up to 30 s (a reservation it took meanwhile would otherwise hold for its lease).
 */
const cancelRetry = Schedule.exponential("50 millis").pipe(
  Schedule.union(Schedule.spaced("2 seconds")),
  Schedule.jittered,
  Schedule.upTo("30 seconds")
)

/** Background cancels at once: each may wait out an outage, apart from the settlements. */
const cancelWorkers = 64

/**
 * The limiter on `shared` (Redis, or memory when that is all there is), with a memory store of its
 * own as the fail-open guard. Settlements run on a background worker in the layer's scope.
 */
export const make = (options: Options) =>
  Effect.gen(function* () {
    const shared = yield* LimiterStore.LimiterStore
    const guard = yield* MemoryLimiterStore.make
    const backoffMs = options.backoffMs ?? 1000
    const failures = yield* Ref.make(0)
    const refused = { requests: 0, tokens: 0, concurrent: 0, budget: 0 }
    /** Until when the shared store is skipped (epoch ms); 0 while it is healthy. */
    let downUntil = 0

    /** One store's share of a batch, in one call (a pipeline for Redis); settles are idempotent. */
    const settleBatch = (
      store: LimiterStore.LimiterStore["Type"],
      requests: ReadonlyArray<LimiterStore.SettleRequest>
    ) =>
      store.settleAll(requests).pipe(
        Effect.retry(settleRetry),
        Effect.catchAll((error) =>
          Effect.logWarning("rate-limit settlements were lost; their slots expire with their leases", {
            store: store.kind,
            settlements: requests.length,
            error: error.detail
          })
        )
      )
    // Settlements gather during one turn of the event loop and go as one batch on a fiber of the
    // layer's scope: no fiber, queue hand-off or wake-up per request.
    const runFork = yield* FiberSet.makeRuntime<never, void, never>()
    let toShared: Array<LimiterStore.SettleRequest> = []
    let toGuard: Array<LimiterStore.SettleRequest> = []
    let flushing = false
    const flush = () => {
      flushing = false
      const sharedBatch = toShared
      const guardBatch = toGuard
      toShared = []
      toGuard = []
      const sharedDone = sharedBatch.length === 0 ? Effect.void : settleBatch(shared, sharedBatch)
      runFork(
        guardBatch.length === 0 ? sharedDone : Effect.zipRight(settleBatch(guard, guardBatch), sharedDone)
      )
    }
    const settleLater = (store: LimiterStore.LimiterStore["Type"], request: LimiterStore.SettleRequest) => {
      ;(store === shared ? toShared : toGuard).push(request)
      if (!flushing) {
        flushing = true
        setImmediate(flush)
      }
    }

    // Reserves the shared store failed (or that were interrupted) may still be applied when it
    // answers again: each is cancelled, on workers of their own so settlements never wait on them.
    const cancels = yield* Queue.dropping<LimiterStore.ReserveRequest>(65_536)
    const cancelOne = (request: LimiterStore.ReserveRequest) =>
      shared.cancel(request).pipe(
        Effect.retry(cancelRetry),
        Effect.catchAll((error) =>
          Effect.logWarning(
            "a failed rate-limit reservation could not be cancelled; it expires with its lease",
            {
              store: shared.kind,
              error: error.detail
            }
          )
        )
      )
    for (let i = 0; i < cancelWorkers; i++) {
      yield* Queue.take(cancels).pipe(Effect.flatMap(cancelOne), Effect.forever, Effect.forkScoped)
    }
    const cancelLater = (request: LimiterStore.ReserveRequest) =>
      Effect.sync(() => Queue.unsafeOffer(cancels, request))

    const count = (check: LimiterStore.Check) => {
      if (check.kind === "budget") refused.budget++
      else if (check.kind === "concurrency") refused.concurrent++
      else refused[check.limit]++
    }

    const decide = (
      store: LimiterStore.LimiterStore["Type"],
      request: LimiterStore.ReserveRequest,
      decision: LimiterStore.Decision
    ): Effect.Effect<Admission, Errors.RateLimited | Errors.QuotaExceeded> => {
      if (!decision.admitted) {
        const check = request.checks[decision.failed]!
        count(check)
        return Effect.fail(refusalOf(check, decision.retryAfterMs))
      }
      let settled = false
      const keys = decision.keys
      return Effect.succeed({
        headers: headersOf(request.checks, decision.states),
        settle: (actual) => {
          if (settled) return
          settled = true
          const used = request.checks.map((check) =>
            check.kind === "rate"
              ? check.limit === "requests"
                ? 1
                : Math.max(0, Math.ceil(actual.tokens))
              : check.kind === "budget"
                ? Math.max(0, Math.ceil(actual.costMicroUsd))
                : 0
          )
          settleLater(store, { leaseId: request.leaseId, checks: request.checks, keys, actual: used })
        }
      })
    }

    const onStoreFailure = (
      request: LimiterStore.ReserveRequest,
      error: LimiterStore.LimiterStoreUnavailable
    ) =>
      Effect.gen(function* () {
        const now = yield* Clock.currentTimeMillis
        const first = downUntil === 0
        downUntil = now + backoffMs
        yield* cancelLater(request)
        yield* Ref.update(failures, (n) => n + 1)
        if (first) {
          yield* Effect.logError("rate limiter store unavailable", {
            store: shared.kind,
            policy: options.failure,
            error: error.detail
          })
        }
        return yield* admitLocally(request)
      })

    const admitLocally = (request: LimiterStore.ReserveRequest) =>
      options.failure === "fail_closed"
        ? Effect.fail(
            new Errors.ServiceUnavailable({
              message: "Rate limits cannot be checked right now; please retry shortly."
            })
          )
        : Effect.flatMap(guard.reserve(request), (decision) => decide(guard, request, decision)).pipe(
            // The memory store does not fail; if it ever did, refusing is the safe side.
            Effect.catchTag("LimiterStoreUnavailable", () =>
              Effect.fail(
                new Errors.ServiceUnavailable({ message: "Rate limits cannot be checked right now." })
              )
            )
          )

    const admit = (
      principal: Principal | undefined,
      estimate: Usage,
      leaseTtlMs: number
    ): Effect.Effect<Admission, Refusal> => {
      if (principal === undefined || !hasLimits(principal)) return Effect.succeed(unlimited)
      const request: LimiterStore.ReserveRequest = {
        leaseId: crypto.randomUUID(),
        checks: checksOf(principal, estimate),
        leaseTtlMs
      }
      return Effect.flatMap(Clock.currentTimeMillis, (now) => {
        if (downUntil !== 0 && now < downUntil) return admitLocally(request)
        return shared.reserve(request).pipe(
          Effect.onInterrupt(() => cancelLater(request)),
          Effect.matchEffect({
            onFailure: (error) => onStoreFailure(request, error),
            onSuccess: (decision) => {
              if (downUntil === 0) return decide(shared, request, decision)
              downUntil = 0
              return Effect.zipRight(
                Effect.logInfo("rate limiter store is back", { store: shared.kind }),
                decide(shared, request, decision)
              )
            }
          })
        )
      })
    }

    return RateLimiter.of({
      needsEstimate,
      admit,
      status: Effect.map(Ref.get(failures), (storeFailures) => ({
        store: shared.kind,
        degraded: downUntil !== 0,
        storeFailures,
        refused: { ...refused }
      }))
    })
  })

export const layer = (options: Options): Layer.Layer<RateLimiter, never, LimiterStore.LimiterStore> =>
  Layer.scoped(RateLimiter, make(options))

/** No limits at all (auth off). */
export const layerDisabled: Layer.Layer<RateLimiter> = Layer.succeed(
  RateLimiter,
  RateLimiter.of({
    needsEstimate: () => false,
    admit: () => Effect.succeed(unlimited),
    status: Effect.succeed({
      store: "none",
      degraded: false,
      storeFailures: 0,
      refused: { requests: 0, tokens: 0, concurrent: 0, budget: 0 }
    })
  })
)
