import { describe, expect, it } from "@effect/vitest"
import type { Principal } from "@gateway/core/Auth"
import type { KeyRecord, TenantRecord } from "@gateway/core/KeyRegistry"
import * as LimiterStore from "@gateway/core/LimiterStore"
import * as MemoryLimiterStore from "@gateway/core/MemoryLimiterStore"
import * as RateLimiter from "@gateway/core/RateLimiter"
import { Ids, type Tenancy } from "@gateway/domain"
import { Effect, Layer, TestClock } from "effect"

type Store = LimiterStore.LimiterStore["Type"]

const LEASE_TTL = 30_000

const keyRecord = (keyId: string, limits: Tenancy.Limits, tenantId: string): KeyRecord => ({
  keyId: Ids.KeyId.make(keyId),
  tenantId: Ids.TenantId.make(tenantId),
  name: `${keyId} key`,
  hash: "0".repeat(64),
  prefix: "gw-abcd",
  models: null,
  limits,
  scopes: [],
  metadata: {},
  policy: null,
  createdAt: new Date(0),
  revoked: null,
  version: 1
})

const tenantRecord = (tenantId: string, limits: Tenancy.Limits): TenantRecord => ({
  tenantId: Ids.TenantId.make(tenantId),
  name: tenantId,
  limits,
  metadata: {},
  policy: null,
  createdAt: new Date(0),
  version: 1
})

/** A caller with its key's limits and, when given, its tenant's. */
const principal = (
  keyLimits: Tenancy.Limits,
  tenantLimits?: Tenancy.Limits,
  keyId = "key_1",
  tenantId = "acme"
): Principal => ({
  keyId: Ids.KeyId.make(keyId),
  tenantId: Ids.TenantId.make(tenantId),
  keyName: `${keyId} key`,
  key: keyRecord(keyId, keyLimits, tenantId),
  tenant: tenantLimits === undefined ? undefined : tenantRecord(tenantId, tenantLimits)
})

/**
 * Wraps a store, counting calls and noting the leases reserved and cancelled; `reserve` and
 * `cancel` fail with `LimiterStoreUnavailable` while `down`.
 */
const spy = (inner: Store | undefined, state: { down: boolean } = { down: false }) => {
  const calls = { reserve: 0, settle: 0, cancel: 0 }
  const leases = { reserved: [] as Array<string>, cancelled: [] as Array<string> }
  const unavailable = new LimiterStore.LimiterStoreUnavailable({ detail: "connect ECONNREFUSED" })
  const store: Store = {
    kind: "redis",
    reserve: (request) =>
      Effect.suspend(() => {
        calls.reserve++
        leases.reserved.push(request.leaseId)
        return state.down || inner === undefined ? Effect.fail(unavailable) : inner.reserve(request)
      }),
    settle: (request) =>
      Effect.suspend(() => {
        calls.settle++
        return inner === undefined ? Effect.fail(unavailable) : inner.settle(request)
      }),
    settleAll: (requests) =>
      Effect.suspend(() => {
        calls.settle += requests.length
        return inner === undefined ? Effect.fail(unavailable) : inner.settleAll(requests)
      }),
    cancel: (request) =>
      Effect.suspend(() => {
        calls.cancel++
        leases.cancelled.push(request.leaseId)
        return state.down || inner === undefined ? Effect.fail(unavailable) : inner.cancel(request)
      })
  }
  return { store, calls, leases, state }
}

const limiterOn = (options: RateLimiter.Options, store: Layer.Layer<LimiterStore.LimiterStore>) =>
  RateLimiter.layer(options).pipe(Layer.provide(store))

const onMemory = limiterOn({ failure: "fail_open" }, MemoryLimiterStore.layer)

const admit = (who: Principal | undefined, tokens = 0, costMicroUsd = 0) =>
  Effect.flatMap(RateLimiter.RateLimiter, (limiter) =>
    limiter.admit(who, { tokens, costMicroUsd }, LEASE_TTL)
  )

const status = Effect.flatMap(RateLimiter.RateLimiter, (limiter) => limiter.status)

/** Lets background fibers run until `done` holds (or for a while), and a few turns more. */
const turns = (done: () => boolean = () => false) =>
  Effect.gen(function* () {
    for (let i = 0; i < 1000 && !done(); i++) yield* Effect.yieldNow()
    for (let i = 0; i < 50; i++) yield* Effect.yieldNow()
  })

/** One turn of the event loop: settlements gathered during a turn are flushed at its end. */
const loopTurn = Effect.promise(() => new Promise<void>((resolve) => setImmediate(resolve)))

/** Lets the background settlement run until the store has seen `n` settlements. */
const settlements = (calls: { readonly settle: number }, n: number) =>
  Effect.gen(function* () {
    for (let i = 0; i < 100 && calls.settle < n; i++) {
      yield* loopTurn
      yield* Effect.yieldNow()
    }
    // More turns, so that a settlement that should not happen had its chance to.
    for (let i = 0; i < 5; i++) {
      yield* loopTurn
      yield* Effect.yieldNow()
    }
  })

describe("formatReset", () => {
  it("writes durations as OpenAI does in x-ratelimit-reset-*", () => {
    expect(RateLimiter.formatReset(20)).toBe("20ms")
    expect(RateLimiter.formatReset(0)).toBe("0ms")
    // Just under a second rounds up to a second, written in seconds.
    expect(RateLimiter.formatReset(999.5)).toBe("1s")
    expect(RateLimiter.formatReset(-5)).toBe("0ms")
    expect(RateLimiter.formatReset(999)).toBe("999ms")
    expect(RateLimiter.formatReset(1000)).toBe("1s")
    expect(RateLimiter.formatReset(1500)).toBe("2s")
    expect(RateLimiter.formatReset(59_000)).toBe("59s")
    expect(RateLimiter.formatReset(60_000)).toBe("1m0s")
    expect(RateLimiter.formatReset(360_000)).toBe("6m0s")
    expect(RateLimiter.formatReset(3_600_000)).toBe("1h0m0s")
    expect(RateLimiter.formatReset(3_723_000)).toBe("1h2m3s")
  })
})

describe("RateLimiter", () => {
  it.effect("admits a caller without limits with no headers and reserves nothing", () =>
    Effect.gen(function* () {
      const { store, calls } = spy(yield* MemoryLimiterStore.make)
      yield* Effect.gen(function* () {
        const anonymous = yield* admit(undefined, 1_000_000)
        const unlimited = yield* admit(principal({}, {}), 1_000_000)
        expect(anonymous.headers).toEqual({})
        expect(unlimited.headers).toEqual({})
        unlimited.settle({ tokens: 10, costMicroUsd: 0 })
        yield* settlements(calls, 1)
        expect(calls).toEqual({ reserve: 0, settle: 0, cancel: 0 })
      }).pipe(
        Effect.provide(limiterOn({ failure: "fail_open" }, Layer.succeed(LimiterStore.LimiterStore, store)))
      )
    })
  )

  it.effect("answers with OpenAI's x-ratelimit-* headers for rpm and tpm limits", () =>
    Effect.gen(function* () {
      const who = principal({ requestsPerMinute: 10, tokensPerMinute: 2000 })
      const first = yield* admit(who, 100)
      expect(first.headers).toEqual({
        "x-ratelimit-limit-requests": "10",
        "x-ratelimit-remaining-requests": "9",
        "x-ratelimit-reset-requests": "6s",
        "x-ratelimit-limit-tokens": "2000",
        "x-ratelimit-remaining-tokens": "1900",
        "x-ratelimit-reset-tokens": "3s"
      })
      const second = yield* admit(who, 300)
      expect(second.headers["x-ratelimit-remaining-requests"]).toBe("8")
      expect(second.headers["x-ratelimit-reset-requests"]).toBe("12s")
      expect(second.headers["x-ratelimit-remaining-tokens"]).toBe("1600")
      expect(second.headers["x-ratelimit-reset-tokens"]).toBe("12s")
    }).pipe(Effect.provide(onMemory))
  )

  it.effect("refuses past the rpm limit with RateLimited saying which limit and when to retry", () =>
    Effect.gen(function* () {
      const who = principal({ requestsPerMinute: 2 })
      yield* admit(who)
      yield* admit(who)
      const refusal = yield* Effect.flip(admit(who))
      expect(refusal).toMatchObject({
        _tag: "RateLimited",
        limit: "requests",
        scope: "key",
        capacity: 2,
        requested: 1,
        // One request comes back every 30 s at 2 per minute.
        retryAfterMs: 30_000
      })
      expect((yield* status).refused).toEqual({ requests: 1, tokens: 0, concurrent: 0, budget: 0 })
      yield* TestClock.adjust(30_000)
      yield* admit(who)
    }).pipe(Effect.provide(onMemory))
  )

  it.effect("refuses a spend beyond the budget with QuotaExceeded until the period ends", () =>
    Effect.gen(function* () {
      const who = principal({ budget: { amountMicroUsd: 1_000_000, period: "month" } })
      const admitted = yield* admit(who, 10, 600_000)
      expect(admitted.headers).toEqual({})
      const refusal = yield* Effect.flip(admit(who, 10, 600_000))
      // The TestClock starts at 1970-01-01T00:00Z: the month ends on February 1st.
      expect(refusal).toMatchObject({
        _tag: "QuotaExceeded",
        scope: "key",
        budgetMicroUsd: 1_000_000,
        period: "month",
        retryAfterMs: Date.UTC(1970, 1, 1)
      })
      expect((yield* status).refused.budget).toBe(1)
      yield* admit(who, 10, 400_000)
    }).pipe(Effect.provide(onMemory))
  )

  it.effect("applies the tenant's limit across its keys, even when the key has room", () =>
    Effect.gen(function* () {
      const tenantLimits = { requestsPerMinute: 1 }
      const first = yield* admit(principal({ requestsPerMinute: 10 }, tenantLimits, "key_a"))
      // The key's bucket comes first in the headers.
      expect(first.headers["x-ratelimit-limit-requests"]).toBe("10")
      const refusal = yield* Effect.flip(admit(principal({ requestsPerMinute: 10 }, tenantLimits, "key_b")))
      expect(refusal).toMatchObject({ _tag: "RateLimited", limit: "requests", scope: "tenant", capacity: 1 })
      // Another tenant's key is not held back by it.
      yield* admit(principal({ requestsPerMinute: 10 }, tenantLimits, "key_c", "other"))
    }).pipe(Effect.provide(onMemory))
  )

  it.effect("admits a tenant-budget caller only within the tenant's budget", () =>
    Effect.gen(function* () {
      const tenantLimits = { budget: { amountMicroUsd: 100, period: "day" as const } }
      yield* admit(principal({}, tenantLimits, "key_a"), 0, 100)
      const refusal = yield* Effect.flip(admit(principal({}, tenantLimits, "key_b"), 0, 1))
      expect(refusal).toMatchObject({ _tag: "QuotaExceeded", scope: "tenant", period: "day" })
    }).pipe(Effect.provide(onMemory))
  )

  it.effect("clamps a reservation larger than the tpm limit: admitted on a full bucket", () =>
    Effect.gen(function* () {
      const who = principal({ tokensPerMinute: 1000 })
      const admitted = yield* admit(who, 5000)
      expect(admitted.headers["x-ratelimit-remaining-tokens"]).toBe("0")
      expect(admitted.headers["x-ratelimit-reset-tokens"]).toBe("1m0s")
      const refusal = yield* Effect.flip(admit(who, 5000))
      expect(refusal).toMatchObject({
        _tag: "RateLimited",
        limit: "tokens",
        requested: 1000,
        capacity: 1000,
        retryAfterMs: 60_000
      })
      yield* TestClock.adjust(60_000)
      yield* admit(who, 5000)
    }).pipe(Effect.provide(onMemory))
  )

  it.effect("settle gives back unused tokens, and only the first settle counts", () =>
    Effect.gen(function* () {
      const { store, calls } = spy(yield* MemoryLimiterStore.make)
      yield* Effect.gen(function* () {
        const who = principal({ tokensPerMinute: 1000 })
        const admitted = yield* admit(who, 400)
        expect(admitted.headers["x-ratelimit-remaining-tokens"]).toBe("600")
        // Used 300 of 400: 100 come back, once.
        admitted.settle({ tokens: 300, costMicroUsd: 0 })
        admitted.settle({ tokens: 300, costMicroUsd: 0 })
        admitted.settle({ tokens: 300, costMicroUsd: 0 })
        yield* settlements(calls, 1)
        expect(calls.settle).toBe(1)
        const next = yield* admit(who, 0)
        expect(next.headers["x-ratelimit-remaining-tokens"]).toBe("700")
      }).pipe(
        Effect.provide(limiterOn({ failure: "fail_open" }, Layer.succeed(LimiterStore.LimiterStore, store)))
      )
    })
  )

  it.effect("settle frees the concurrency slot, once", () =>
    Effect.gen(function* () {
      const { store, calls } = spy(yield* MemoryLimiterStore.make)
      yield* Effect.gen(function* () {
        const who = principal({ concurrentRequests: 1 })
        const first = yield* admit(who)
        expect(first.headers).toEqual({})
        const busy = yield* Effect.flip(admit(who))
        expect(busy).toMatchObject({
          _tag: "RateLimited",
          limit: "concurrent",
          scope: "key",
          capacity: 1,
          // A slot may be settled any moment: not the lease expiry, but soon.
          retryAfterMs: 1000
        })
        for (let i = 0; i < 3; i++) first.settle({ tokens: 0, costMicroUsd: 0 })
        yield* settlements(calls, 1)
        expect(calls.settle).toBe(1)
        yield* admit(who)
        // The second request holds the slot now.
        expect(yield* Effect.flip(admit(who))).toMatchObject({ _tag: "RateLimited", limit: "concurrent" })
        expect((yield* status).refused.concurrent).toBe(2)
      }).pipe(
        Effect.provide(limiterOn({ failure: "fail_open" }, Layer.succeed(LimiterStore.LimiterStore, store)))
      )
    })
  )

  it.effect("fail_open: admits against the local guard during an outage, its limits still enforced", () =>
    Effect.gen(function* () {
      const { store } = spy(undefined)
      yield* Effect.gen(function* () {
        const who = principal({ requestsPerMinute: 2 })
        const first = yield* admit(who)
        expect(first.headers["x-ratelimit-remaining-requests"]).toBe("1")
        yield* admit(who)
        const refusal = yield* Effect.flip(admit(who))
        expect(refusal).toMatchObject({ _tag: "RateLimited", limit: "requests", scope: "key" })
        const now = yield* status
        expect(now.degraded).toBe(true)
        expect(now.store).toBe("redis")
        expect(now.storeFailures).toBe(1)
      }).pipe(
        Effect.provide(limiterOn({ failure: "fail_open" }, Layer.succeed(LimiterStore.LimiterStore, store)))
      )
    })
  )

  it.effect("skips the failed store for backoffMs, then tries it again", () =>
    Effect.gen(function* () {
      const { store, calls, state } = spy(yield* MemoryLimiterStore.make, { down: true })
      const backoffMs = 5000
      yield* Effect.gen(function* () {
        const who = principal({ requestsPerMinute: 100 })
        yield* admit(who)
        expect(calls.reserve).toBe(1)
        yield* admit(who)
        yield* TestClock.adjust(backoffMs - 1)
        yield* admit(who)
        expect(calls.reserve).toBe(1)
        yield* TestClock.adjust(1)
        yield* admit(who)
        expect(calls.reserve).toBe(2)
        expect((yield* status).storeFailures).toBe(2)
        // The store is back: the next try after the backoff uses it and the limiter recovers.
        state.down = false
        yield* TestClock.adjust(backoffMs)
        yield* admit(who)
        expect(calls.reserve).toBe(3)
        const now = yield* status
        expect(now.degraded).toBe(false)
        expect(now.storeFailures).toBe(2)
        yield* admit(who)
        expect(calls.reserve).toBe(4)
      }).pipe(
        Effect.provide(
          limiterOn({ failure: "fail_open", backoffMs }, Layer.succeed(LimiterStore.LimiterStore, store))
        )
      )
    })
  )

  it.effect("fail_closed: refuses limited callers with ServiceUnavailable during an outage", () =>
    Effect.gen(function* () {
      const { store, calls } = spy(undefined)
      yield* Effect.gen(function* () {
        const who = principal({ requestsPerMinute: 100 })
        expect(yield* Effect.flip(admit(who))).toMatchObject({ _tag: "ServiceUnavailable" })
        expect(yield* Effect.flip(admit(who))).toMatchObject({ _tag: "ServiceUnavailable" })
        expect(calls.reserve).toBe(1)
        // A caller without limits needs no store.
        yield* admit(principal({}))
        const now = yield* status
        expect(now.degraded).toBe(true)
        expect(now.storeFailures).toBe(1)
      }).pipe(
        Effect.provide(limiterOn({ failure: "fail_closed" }, Layer.succeed(LimiterStore.LimiterStore, store)))
      )
    })
  )

  it.effect("needs a token and cost estimate only for tpm or budget limits", () =>
    Effect.gen(function* () {
      const limiter = yield* RateLimiter.RateLimiter
      const budget = { amountMicroUsd: 1, period: "month" as const }
      expect(limiter.needsEstimate(undefined)).toBe(false)
      expect(limiter.needsEstimate(principal({}))).toBe(false)
      expect(limiter.needsEstimate(principal({ requestsPerMinute: 1, concurrentRequests: 1 }))).toBe(false)
      expect(limiter.needsEstimate(principal({}, { requestsPerMinute: 1 }))).toBe(false)
      expect(limiter.needsEstimate(principal({ tokensPerMinute: 1 }))).toBe(true)
      expect(limiter.needsEstimate(principal({ budget }))).toBe(true)
      expect(limiter.needsEstimate(principal({}, { tokensPerMinute: 1 }))).toBe(true)
      expect(limiter.needsEstimate(principal({}, { budget }))).toBe(true)
    }).pipe(Effect.provide(onMemory))
  )

  for (const failure of ["fail_open", "fail_closed"] as const) {
    it.effect(
      `${failure}: a reserve the shared store failed is cancelled in the background, retried a while`,
      () =>
        Effect.gen(function* () {
          const { store, calls, leases, state } = spy(yield* MemoryLimiterStore.make, { down: true })
          yield* Effect.gen(function* () {
            const who = principal({ concurrentRequests: 1 })
            // The answer does not wait for the cancel (its retries sleep on the TestClock, which stands still).
            const outcome = yield* Effect.either(admit(who))
            expect(outcome._tag).toBe(failure === "fail_open" ? "Right" : "Left")
            yield* turns(() => calls.cancel >= 1)
            expect(leases.reserved).toHaveLength(1)
            expect(leases.cancelled).toEqual(leases.reserved)

            // Still down: tried again with backoff; once the store is back, the cancel gets through.
            for (let i = 0; i < 10; i++) yield* Effect.zipRight(TestClock.adjust(100), turns())
            expect(calls.cancel).toBeGreaterThan(2)
            state.down = false
            for (let i = 0; i < 30; i++) yield* Effect.zipRight(TestClock.adjust(100), turns())
            const done = calls.cancel
            for (let i = 0; i < 60; i++) yield* Effect.zipRight(TestClock.adjust(1_000), turns())
            expect(calls.cancel).toBe(done)
            expect(new Set(leases.cancelled)).toEqual(new Set(leases.reserved))

            // A store that stays away is given up on after about 30 s.
            state.down = true
            yield* TestClock.adjust(1_000)
            yield* Effect.either(admit(who))
            for (let i = 0; i < 40; i++) yield* Effect.zipRight(TestClock.adjust(1_000), turns())
            const gaveUp = calls.cancel
            expect(gaveUp).toBeGreaterThan(done + 5)
            for (let i = 0; i < 60; i++) yield* Effect.zipRight(TestClock.adjust(1_000), turns())
            expect(calls.cancel).toBe(gaveUp)
            expect(leases.reserved).toHaveLength(2)
            expect(new Set(leases.cancelled)).toEqual(new Set(leases.reserved))
          }).pipe(
            Effect.provide(
              limiterOn({ failure, backoffMs: 1_000 }, Layer.succeed(LimiterStore.LimiterStore, store))
            )
          )
        })
    )
  }
})
