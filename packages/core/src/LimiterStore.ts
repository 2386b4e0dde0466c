/**
 * Where the rate limiter's buckets live: one port, two stores that pass the same contract suite —
 * Redis (shared by every replica; each decision is one atomic Lua script on Redis's clock) and
 * memory (the embedded default, and each replica's guard while Redis is away).
 *
 * A request names every bucket it must pass; `reserve` admits it only if all of them have room,
 * and then takes from all of them at once (all or nothing). `settle` gives back what the request
 * did not use (or takes what it used beyond its reservation) and frees its concurrency slot.
 * `cancel` undoes a reservation its caller gave up on (the reserve failed or timed out, but may
 * still have been applied, or be applied later).
 */
import type { Effect } from "effect"
import { Context, Schema } from "effect"

/** Whose limit a check enforces. */
export type Scope = "key" | "tenant"

/**
 * A token bucket holding up to `capacity`, refilled continuously at `capacity` per `windowMs`
 * (so a limit of 60 per minute refills one a second); a request takes `cost` from it.
 */
export interface RateCheck {
  readonly kind: "rate"
  readonly key: string
  readonly limit: "requests" | "tokens"
  readonly scope: Scope
  readonly capacity: number
  readonly windowMs: number
  /** At most `capacity` (a larger reservation could never be admitted). */
  readonly cost: number
}

/** At most `capacity` requests at once; a slot is held until settled or `leaseTtlMs` has passed. */
export interface ConcurrencyCheck {
  readonly kind: "concurrency"
  readonly key: string
  readonly scope: Scope
  readonly capacity: number
}

/**
 * At most `capacity` (micro-USD) spent per calendar `period` (UTC). The store appends the period
 * to `key` (e.g. `…:2026-11`) and returns the key it used, for `settle`.
 */
export interface BudgetCheck {
  readonly kind: "budget"
  readonly key: string
  readonly scope: Scope
  readonly capacity: number
  readonly period: "day" | "month"
  readonly cost: number
}

export type Check = RateCheck | ConcurrencyCheck | BudgetCheck

export interface ReserveRequest {
  /** Unique per request: names its concurrency slots. */
  readonly leaseId: string
  readonly checks: ReadonlyArray<Check>
  /** How long a concurrency slot outlives a replica that never settles (a crash). */
  readonly leaseTtlMs: number
}

/** A check's state after the decision, for the `x-ratelimit-*` headers. */
export interface CheckState {
  /** What is left (whole units, rounded down; never below 0). */
  readonly remaining: number
  /**
   * Milliseconds until the bucket is full again (rate), or until the period ends (budget);
   * 0 for concurrency.
   */
  readonly resetMs: number
}

export type Decision =
  | {
      readonly admitted: true
      /** One per check, in order. */
      readonly states: ReadonlyArray<CheckState>
      /** One per check, in order: the key the store used (budget keys carry their period). */
      readonly keys: ReadonlyArray<string>
    }
  | {
      readonly admitted: false
      /** The index of the first check that had no room. */
      readonly failed: number
      /** When that check would have room for this request. */
      readonly retryAfterMs: number
      readonly states: ReadonlyArray<CheckState>
      /**
       * The reservation had been cancelled before it arrived: nothing was checked or taken
       * (`failed` and `retryAfterMs` are 0, every state is zero).
       */
      readonly cancelled?: true
    }

export interface SettleRequest {
  readonly leaseId: string
  /** The checks as reserved. */
  readonly checks: ReadonlyArray<Check>
  /** `Decision.keys` of the admission. */
  readonly keys: ReadonlyArray<string>
  /**
   * Per check, in order, what the request actually used (for concurrency, ignored). The
   * difference to the reserved `cost` is given back (a refill never goes past `capacity`) or,
   * when it used more, taken (a bucket may go below zero: later requests wait for it).
   */
  readonly actual: ReadonlyArray<number>
}

/** The store could not be reached or did not answer in time. */
export class LimiterStoreUnavailable extends Schema.TaggedError<LimiterStoreUnavailable>()(
  "LimiterStoreUnavailable",
  { detail: Schema.String }
) {}

export class LimiterStore extends Context.Tag("@gateway/core/LimiterStore")<
  LimiterStore,
  {
    /** `memory` or `redis`, for logs and status. */
    readonly kind: string
    readonly reserve: (request: ReserveRequest) => Effect.Effect<Decision, LimiterStoreUnavailable>
    /** Idempotent: a lease is settled once (a retried settle changes nothing). */
    readonly settle: (request: SettleRequest) => Effect.Effect<void, LimiterStoreUnavailable>
    /** Many settlements in one go (one round trip for Redis); as idempotent as `settle`. */
    readonly settleAll: (
      requests: ReadonlyArray<SettleRequest>
    ) => Effect.Effect<void, LimiterStoreUnavailable>
    /**
     * The caller gave up on this reservation (its reserve failed or timed out): if the store applied
     * it, everything it took is given back; if not yet, it never will be (that reserve refuses).
     * Idempotent; after a `settle` of the same lease it changes nothing.
     */
    readonly cancel: (request: ReserveRequest) => Effect.Effect<void, LimiterStoreUnavailable>
  }
>() {}
