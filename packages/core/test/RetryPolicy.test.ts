import { describe, expect, it } from "@effect/vitest"
import * as RetryPolicy from "@gateway/core/RetryPolicy"
import { Errors } from "@gateway/domain"
import { Clock, Effect, Exit, Fiber, Random, Schema, TestClock } from "effect"

const config = (fields: Partial<Record<string, unknown>> = {}) =>
  Schema.decodeUnknownSync(RetryPolicy.RetryConfig)({ jitter: false, ...fields })

const unavailable = (fields: Partial<ConstructorParameters<typeof Errors.BackendError>[0]> = {}) =>
  new Errors.BackendError({ reason: "Http", backend: "vllm-a", status: 503, detail: "overloaded", ...fields })

/**
 * Runs an attempt that fails with `errors[n]` (the last one again once past the end) or succeeds
 * when `errors[n]` is `null`, under `policy`; returns when each attempt started (from the first),
 * the delays between them and how it ended.
 */
const run = (
  policy: RetryPolicy.RetryConfig,
  errors: ReadonlyArray<unknown>,
  options: { attemptMs?: number; seed?: number } = {}
) =>
  Effect.gen(function* () {
    const origin = yield* Clock.currentTimeMillis
    const starts: Array<number> = []
    const attempt = Effect.gen(function* () {
      starts.push((yield* Clock.currentTimeMillis) - origin)
      if (options.attemptMs !== undefined) yield* Effect.sleep(options.attemptMs)
      const error = errors[Math.min(starts.length - 1, errors.length - 1)]
      if (error === null) return "ok"
      return yield* Effect.fail(error)
    })
    const fiber = yield* attempt.pipe(
      RetryPolicy.retry(policy),
      Effect.withRandom(Random.make(options.seed ?? 0)),
      Effect.exit,
      Effect.fork
    )
    yield* TestClock.adjust("10 minutes")
    const exit = yield* Fiber.join(fiber)
    const delays = starts.slice(1).map((start, i) => start - starts[i]! - (options.attemptMs ?? 0))
    return { starts, delays, exit }
  })

describe("RetryPolicy config", () => {
  it("has the documented defaults and reads snake_case keys", () => {
    const defaults = Schema.decodeUnknownSync(RetryPolicy.RetryConfig)({})
    expect({ ...defaults }).toEqual({
      maxAttempts: 3,
      baseDelayMs: 50,
      maxDelayMs: 2000,
      deadlineMs: 30_000,
      jitter: true
    })
    expect({ ...RetryPolicy.defaultConfig }).toEqual({ ...defaults })
    expect(config({ max_attempts: 5, base_delay_ms: 10 }).maxAttempts).toBe(5)
    expect(() => config({ max_attempts: 0 })).toThrow(/max_attempts/)
  })
})

describe("RetryPolicy", () => {
  it.effect("backs off exponentially from the base delay, capped at the maximum", () =>
    Effect.gen(function* () {
      const { delays, exit } = yield* run(config({ max_attempts: 7, max_delay_ms: 300 }), [unavailable()])
      expect(delays).toEqual([50, 100, 200, 300, 300, 300])
      expect(Exit.isFailure(exit)).toBe(true)
    })
  )

  it.effect("makes no more than max_attempts attempts in all", () =>
    Effect.gen(function* () {
      const failing = yield* run(RetryPolicy.defaultConfig, [unavailable()])
      expect(failing.starts).toHaveLength(3)
      expect(failing.exit).toStrictEqual(Exit.fail(unavailable()))
      // Succeeding on the last allowed attempt is a success.
      const third = yield* run(config(), [unavailable(), unavailable(), null])
      expect(third.exit).toStrictEqual(Exit.succeed("ok"))
      const once = yield* run(config({ max_attempts: 1 }), [unavailable()])
      expect(once.starts).toEqual([0])
    })
  )

  it.effect("starts no retry after the deadline, counted from the first attempt's start", () =>
    Effect.gen(function* () {
      // Backoff 1000, 2000, 4000: retries at 1000 and 3000; the next would begin at 7000 > 5000.
      const backoff = yield* run(
        config({ max_attempts: 10, base_delay_ms: 1000, max_delay_ms: 10_000, deadline_ms: 5000 }),
        [unavailable()]
      )
      expect(backoff.starts).toEqual([0, 1000, 3000])
      // The attempts' own time counts: 1 s each, so the third retry (at 3350) would be too late.
      const slow = yield* run(config({ max_attempts: 10, deadline_ms: 3000 }), [unavailable()], {
        attemptMs: 1000
      })
      expect(slow.starts).toEqual([0, 1050, 2150])
      // A retry exactly at the deadline is still made.
      const edge = yield* run(config({ max_attempts: 10, base_delay_ms: 1000, deadline_ms: 3000 }), [
        unavailable()
      ])
      expect(edge.starts).toEqual([0, 1000, 3000])
    })
  )

  it.effect("keeps jittered delays within [½, 1] × the backoff", () =>
    Effect.gen(function* () {
      const policy = config({ jitter: true, max_attempts: 8, base_delay_ms: 100, max_delay_ms: 1000 })
      const nominal = [100, 200, 400, 800, 1000, 1000, 1000]
      for (const seed of [1, 2, 3, 4, 5]) {
        const { delays } = yield* run(policy, [unavailable()], { seed })
        expect(delays).toHaveLength(7)
        delays.forEach((delay, i) => {
          expect(delay).toBeGreaterThanOrEqual(nominal[i]! / 2)
          expect(delay).toBeLessThanOrEqual(nominal[i]!)
        })
        // The jitter is real: not every delay is the nominal one.
        expect(delays).not.toEqual(nominal)
      }
      // Seeded, it is reproducible.
      const again = yield* run(policy, [unavailable()], { seed: 7 })
      expect((yield* run(policy, [unavailable()], { seed: 7 })).delays).toEqual(again.delays)
    })
  )

  it.effect("does not retry errors that another attempt would not fix", () =>
    Effect.gen(function* () {
      const badRequest = unavailable({ status: 400, detail: "bad request" })
      const refused = yield* run(config(), [badRequest])
      expect(refused.starts).toEqual([0])
      expect(refused.exit).toStrictEqual(Exit.fail(badRequest))
      expect((yield* run(config(), [new Error("not a backend error")])).starts).toEqual([0])
      // Retryable first, then not: stops at the second.
      expect((yield* run(config({ max_attempts: 5 }), [unavailable(), badRequest])).starts).toEqual([0, 50])
    })
  )

  it("classifies backend errors", () => {
    expect(RetryPolicy.retryable(unavailable({ status: 429 }))).toBe(true)
    expect(RetryPolicy.retryable(unavailable({ status: 502 }))).toBe(true)
    expect(RetryPolicy.retryable(unavailable({ reason: "Connect", status: undefined }))).toBe(true)
    expect(RetryPolicy.retryable(unavailable({ reason: "Timeout", status: undefined }))).toBe(true)
    expect(RetryPolicy.retryable(unavailable({ status: 400 }))).toBe(false)
    expect(RetryPolicy.retryable(unavailable({ status: 404 }))).toBe(false)
    expect(RetryPolicy.retryable(new Errors.ModelNotFound({ model: "x" }))).toBe(false)
  })

  it.effect("waits at least as long as the backend's retry-after", () =>
    Effect.gen(function* () {
      const tooMany = unavailable({ status: 429, retryAfter: "2" })
      // 2 s instead of 50 ms, then back to the backoff (100 ms) once the backend no longer asks.
      const seconds = yield* run(config({ max_attempts: 3 }), [tooMany, unavailable()])
      expect(seconds.delays).toEqual([2000, 100])
      // A retry-after shorter than the backoff changes nothing.
      const short = yield* run(config({ base_delay_ms: 3000, max_delay_ms: 5000 }), [
        unavailable({ retryAfter: "1" })
      ])
      expect(short.delays).toEqual([3000, 5000])
      // An HTTP date 4 s from now.
      const date = new Date((yield* Clock.currentTimeMillis) + 4000).toUTCString()
      const dated = yield* run(config({ max_attempts: 2 }), [unavailable({ retryAfter: date })])
      expect(dated.delays).toEqual([4000])
      // Unreadable: ignored.
      const junk = yield* run(config({ max_attempts: 2 }), [unavailable({ retryAfter: "soon" })])
      expect(junk.delays).toEqual([50])
    })
  )

  it.effect("fails at once when the retry-after would end past the deadline", () =>
    Effect.gen(function* () {
      const tooMany = unavailable({ status: 429, retryAfter: "60" })
      const { starts, exit } = yield* run(config({ deadline_ms: 30_000 }), [tooMany])
      expect(starts).toEqual([0])
      expect(exit).toStrictEqual(Exit.fail(tooMany))
    })
  )
})
