import { describe, expect, it } from "@effect/vitest"
import * as CircuitBreaker from "@gateway/core/CircuitBreaker"
import { Effect, Ref, Schema, TestClock } from "effect"

const config = (fields: ConstructorParameters<typeof CircuitBreaker.CircuitBreakerConfig>[0] = {}) =>
  CircuitBreaker.CircuitBreakerConfig.make(fields)

/** A breaker on backend `b1` that records its transitions as `from>to:Reason`. */
const setup = (fields: ConstructorParameters<typeof CircuitBreaker.CircuitBreakerConfig>[0] = {}) =>
  Effect.gen(function* () {
    const log = yield* Ref.make<Array<CircuitBreaker.Transition>>([])
    const breaker = yield* CircuitBreaker.make({
      backend: "b1",
      config: config(fields),
      onTransition: (t) => Ref.update(log, (ts) => [...ts, t])
    })
    const transitions = Ref.get(log).pipe(
      Effect.map((ts) => ts.map((t) => `${t.from}>${t.to}:${t.reason._tag}`))
    )
    return { breaker, log, transitions }
  })

const failTimes = (breaker: CircuitBreaker.CircuitBreaker, n: number) =>
  Effect.repeatN(
    Effect.flatMap(breaker.acquire, (p) => p.fail),
    n - 1
  )
const succeedTimes = (breaker: CircuitBreaker.CircuitBreaker, n: number) =>
  Effect.repeatN(
    Effect.flatMap(breaker.acquire, (p) => p.succeed),
    n - 1
  )
const stateOf = (breaker: CircuitBreaker.CircuitBreaker) => Effect.map(breaker.state, (s) => s.state)

describe("CircuitBreaker", () => {
  it("config: snake_case keys with defaults", () => {
    const decode = Schema.decodeUnknownSync(CircuitBreaker.CircuitBreakerConfig)
    expect({ ...decode({}) }).toEqual({
      consecutiveFailures: 5,
      failureRate: 0.5,
      windowMs: 10_000,
      minimumRequests: 20,
      cooldownMs: 30_000,
      cooldownFactor: 2,
      maxCooldownMs: 300_000,
      halfOpenProbes: 1,
      successesToClose: 2
    })
    const custom = decode({ consecutive_failures: 3, failure_rate: 0.25, half_open_probes: 2 })
    expect([custom.consecutiveFailures, custom.failureRate, custom.halfOpenProbes]).toEqual([3, 0.25, 2])
    expect(() => decode({ failure_rate: 1.5 })).toThrow(/failure_rate/)
  })

  it.effect("opens after N consecutive failures; N-1 keep it closed and a success resets the count", () =>
    Effect.gen(function* () {
      const { breaker, log } = yield* setup({ consecutiveFailures: 3 })
      yield* failTimes(breaker, 2)
      expect((yield* breaker.state).consecutiveFailures).toBe(2)
      yield* succeedTimes(breaker, 1)
      expect((yield* breaker.state).consecutiveFailures).toBe(0)
      yield* failTimes(breaker, 2)
      expect(yield* stateOf(breaker)).toBe("closed")
      yield* failTimes(breaker, 1)
      expect(yield* stateOf(breaker)).toBe("open")
      const [opened] = yield* Ref.get(log)
      expect(opened).toEqual({
        backend: "b1",
        from: "closed",
        to: "open",
        reason: { _tag: "ConsecutiveFailures", failures: 3, cooldownMs: 30_000 },
        at: 0
      })
    })
  )

  it.effect(
    "opens on the failure rate over the window, not below minimumRequests, old outcomes slide out",
    () =>
      Effect.gen(function* () {
        const { breaker, transitions } = yield* setup({
          consecutiveFailures: 100,
          minimumRequests: 10,
          failureRate: 0.5,
          windowMs: 10_000
        })
        // 6 failures at t=0: a rate of 1, but below minimumRequests.
        yield* failTimes(breaker, 6)
        expect(yield* breaker.state).toMatchObject({ state: "closed", windowRequests: 6, windowFailures: 6 })
        // They slide out after the window.
        yield* TestClock.adjust("10 seconds")
        expect(yield* breaker.state).toMatchObject({ state: "closed", windowRequests: 0 })
        // 6 successes, 4 failures: 10 calls at 0.4 stay closed (with the old ones it would be 10/16).
        yield* succeedTimes(breaker, 6)
        yield* failTimes(breaker, 4)
        expect(yield* breaker.state).toMatchObject({ state: "closed", windowRequests: 10, windowFailures: 4 })
        // One more: 5 of 11 < 0.5; another: 6 of 12 = 0.5 opens.
        yield* failTimes(breaker, 1)
        expect(yield* stateOf(breaker)).toBe("closed")
        yield* failTimes(breaker, 1)
        expect(yield* stateOf(breaker)).toBe("open")
        expect(yield* transitions).toEqual(["closed>open:FailureRate"])
      })
  )

  it.effect("open fails fast with the time left in the cooldown", () =>
    Effect.gen(function* () {
      const { breaker } = yield* setup({ consecutiveFailures: 1, cooldownMs: 30_000 })
      yield* failTimes(breaker, 1)
      yield* TestClock.adjust("12 seconds")
      const error = yield* Effect.flip(breaker.acquire)
      expect(error).toBeInstanceOf(CircuitBreaker.BreakerOpen)
      expect(error).toMatchObject({ _tag: "BreakerOpen", backend: "b1", state: "open", retryAfterMs: 18_000 })
      expect(yield* breaker.state).toMatchObject({ state: "open", since: 0, retryAfterMs: 18_000, opens: 1 })
    })
  )

  it.effect("turns half-open when the cooldown is over", () =>
    Effect.gen(function* () {
      const { breaker, transitions } = yield* setup({ consecutiveFailures: 1, cooldownMs: 1_000 })
      yield* failTimes(breaker, 1)
      yield* TestClock.adjust(999)
      expect((yield* Effect.flip(breaker.acquire)).retryAfterMs).toBe(1)
      yield* TestClock.adjust(1)
      yield* breaker.acquire
      expect(yield* breaker.state).toMatchObject({ state: "half_open", since: 1_000, probesInFlight: 1 })
      expect(yield* transitions).toEqual([
        "closed>open:ConsecutiveFailures",
        "open>half_open:CooldownElapsed"
      ])
    })
  )

  it.effect("half-open admits at most halfOpenProbes probes at once", () =>
    Effect.gen(function* () {
      const { breaker } = yield* setup({ consecutiveFailures: 1, cooldownMs: 1_000, halfOpenProbes: 2 })
      yield* failTimes(breaker, 1)
      yield* TestClock.adjust(1_000)
      const first = yield* breaker.acquire
      yield* breaker.acquire
      const refused = yield* Effect.flip(breaker.acquire)
      expect(refused).toMatchObject({ state: "half_open", retryAfterMs: 0 })
      yield* first.release
      const third = yield* Effect.either(breaker.acquire)
      expect(third._tag).toBe("Right")
      expect((yield* Effect.flip(breaker.acquire))._tag).toBe("BreakerOpen")
    })
  )

  it.effect("closes after successesToClose successful probes, with a fresh count and window", () =>
    Effect.gen(function* () {
      const { breaker, log } = yield* setup({
        consecutiveFailures: 2,
        cooldownMs: 1_000,
        successesToClose: 2,
        minimumRequests: 3,
        failureRate: 0.5
      })
      yield* succeedTimes(breaker, 1)
      yield* failTimes(breaker, 2)
      yield* TestClock.adjust(1_000)
      yield* succeedTimes(breaker, 1)
      expect(yield* breaker.state).toMatchObject({ state: "half_open", probeSuccesses: 1 })
      yield* succeedTimes(breaker, 1)
      expect(yield* breaker.state).toMatchObject({
        state: "closed",
        since: 1_000,
        consecutiveFailures: 0,
        windowRequests: 0,
        opens: 0
      })
      expect((yield* Ref.get(log)).at(-1)?.reason).toEqual({ _tag: "ProbesSucceeded", successes: 2 })
      // The outcomes from before the open are gone: with them, this failure would make 3 of 4.
      yield* failTimes(breaker, 1)
      expect(yield* breaker.state).toMatchObject({
        state: "closed",
        consecutiveFailures: 1,
        windowRequests: 1
      })
      yield* succeedTimes(breaker, 1)
      yield* failTimes(breaker, 1)
      expect(yield* stateOf(breaker)).toBe("open")
      expect((yield* Ref.get(log)).at(-1)?.reason).toEqual({
        _tag: "FailureRate",
        failures: 2,
        requests: 3,
        cooldownMs: 1_000
      })
    })
  )

  it.effect("a probe failure re-opens with a longer cooldown, capped; closing resets the growth", () =>
    Effect.gen(function* () {
      const { breaker, log } = yield* setup({
        consecutiveFailures: 1,
        cooldownMs: 1_000,
        cooldownFactor: 2,
        maxCooldownMs: 3_000,
        successesToClose: 1
      })
      const retryAfter = Effect.map(Effect.flip(breaker.acquire), (e) => e.retryAfterMs)
      yield* failTimes(breaker, 1)
      expect(yield* retryAfter).toBe(1_000)
      yield* TestClock.adjust(1_000)
      yield* failTimes(breaker, 1)
      expect(yield* retryAfter).toBe(2_000)
      yield* TestClock.adjust(1_999)
      expect(yield* retryAfter).toBe(1)
      yield* TestClock.adjust(1)
      yield* failTimes(breaker, 1)
      expect(yield* retryAfter).toBe(3_000)
      yield* TestClock.adjust(3_000)
      yield* failTimes(breaker, 1)
      expect(yield* retryAfter).toBe(3_000)
      expect((yield* breaker.state).opens).toBe(4)
      expect((yield* Ref.get(log)).filter((t) => t.to === "open").map((t) => t.reason)).toEqual([
        { _tag: "ConsecutiveFailures", failures: 1, cooldownMs: 1_000 },
        { _tag: "ProbeFailed", cooldownMs: 2_000 },
        { _tag: "ProbeFailed", cooldownMs: 3_000 },
        { _tag: "ProbeFailed", cooldownMs: 3_000 }
      ])
      yield* TestClock.adjust(3_000)
      yield* succeedTimes(breaker, 1)
      expect(yield* stateOf(breaker)).toBe("closed")
      yield* failTimes(breaker, 1)
      expect(yield* retryAfter).toBe(1_000)
    })
  )

  it.effect("a permit from before the open is not a probe", () =>
    Effect.gen(function* () {
      const { breaker, transitions } = yield* setup({ consecutiveFailures: 2, cooldownMs: 1_000 })
      const slowSuccess = yield* breaker.acquire
      const slowFailure = yield* breaker.acquire
      yield* failTimes(breaker, 2)
      yield* TestClock.adjust(1_000)
      const probe = yield* breaker.acquire
      yield* slowSuccess.succeed
      yield* slowFailure.fail
      expect(yield* breaker.state).toMatchObject({ state: "half_open", probesInFlight: 1, probeSuccesses: 0 })
      // The probe slot is still taken by the real probe.
      expect((yield* Effect.flip(breaker.acquire)).state).toBe("half_open")
      yield* probe.succeed
      expect(yield* breaker.state).toMatchObject({ state: "half_open", probesInFlight: 0, probeSuccesses: 1 })
      expect(yield* transitions).toEqual([
        "closed>open:ConsecutiveFailures",
        "open>half_open:CooldownElapsed"
      ])
    })
  )

  it.effect("a probe from an earlier half-open, or a call from before a re-close, counts for nothing", () =>
    Effect.gen(function* () {
      const { breaker, transitions } = yield* setup({
        consecutiveFailures: 1,
        cooldownMs: 1_000,
        halfOpenProbes: 2,
        successesToClose: 1
      })
      const beforeOpen = yield* breaker.acquire
      yield* failTimes(breaker, 1)
      yield* TestClock.adjust(1_000)
      const oldProbe = yield* breaker.acquire
      yield* failTimes(breaker, 1)
      yield* TestClock.adjust(2_000)
      const probe = yield* breaker.acquire
      yield* oldProbe.succeed
      expect(yield* breaker.state).toMatchObject({ state: "half_open", probesInFlight: 1, probeSuccesses: 0 })
      yield* probe.succeed
      expect(yield* stateOf(breaker)).toBe("closed")
      yield* beforeOpen.fail
      expect(yield* breaker.state).toMatchObject({ state: "closed", consecutiveFailures: 0 })
      expect(yield* transitions).toHaveLength(5)
    })
  )

  it.effect("release counts as neither success nor failure, and a permit counts only once", () =>
    Effect.gen(function* () {
      const { breaker } = yield* setup({ consecutiveFailures: 3, cooldownMs: 1_000 })
      yield* failTimes(breaker, 2)
      yield* Effect.flatMap(breaker.acquire, (p) => p.release)
      expect(yield* breaker.state).toMatchObject({
        state: "closed",
        consecutiveFailures: 2,
        windowRequests: 2
      })
      const twice = yield* breaker.acquire
      yield* twice.succeed
      yield* twice.fail
      yield* twice.fail
      expect(yield* breaker.state).toMatchObject({
        state: "closed",
        consecutiveFailures: 0,
        windowRequests: 3
      })
      yield* failTimes(breaker, 3)
      yield* TestClock.adjust(1_000)
      // A released probe frees its slot without moving towards closed.
      yield* Effect.flatMap(breaker.acquire, (p) => p.release)
      expect(yield* breaker.state).toMatchObject({ state: "half_open", probesInFlight: 0, probeSuccesses: 0 })
      yield* succeedTimes(breaker, 1)
      expect(yield* breaker.state).toMatchObject({ state: "half_open", probeSuccesses: 1 })
    })
  )

  it.effect("reports every transition in order, with its reason and time", () =>
    Effect.gen(function* () {
      const { breaker, log, transitions } = yield* setup({
        consecutiveFailures: 1,
        cooldownMs: 1_000,
        successesToClose: 1
      })
      yield* failTimes(breaker, 1)
      yield* TestClock.adjust(1_000)
      yield* failTimes(breaker, 1)
      yield* TestClock.adjust(2_000)
      expect(yield* stateOf(breaker)).toBe("half_open")
      yield* succeedTimes(breaker, 1)
      expect(yield* transitions).toEqual([
        "closed>open:ConsecutiveFailures",
        "open>half_open:CooldownElapsed",
        "half_open>open:ProbeFailed",
        "open>half_open:CooldownElapsed",
        "half_open>closed:ProbesSucceeded"
      ])
      expect((yield* Ref.get(log)).map((t) => t.at)).toEqual([0, 1_000, 1_000, 3_000, 3_000])
    })
  )

  it.effect("a failing onTransition does not fail the call", () =>
    Effect.gen(function* () {
      const breaker = yield* CircuitBreaker.make({
        backend: "b1",
        config: config({ consecutiveFailures: 1 }),
        onTransition: () => Effect.die("recorder down")
      })
      yield* failTimes(breaker, 1)
      expect(yield* stateOf(breaker)).toBe("open")
    })
  )
})
