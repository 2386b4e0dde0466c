import { createServer, type Server, type Socket } from "node:net"
import { afterAll, beforeAll, describe, expect, it } from "@effect/vitest"
import type {
  BudgetCheck,
  Check,
  ConcurrencyCheck,
  Decision,
  LimiterStore,
  RateCheck
} from "@gateway/core/LimiterStore"
import * as MemoryLimiterStore from "@gateway/core/MemoryLimiterStore"
import * as RedisLimiterStore from "@gateway/core/RedisLimiterStore"
import { Effect, Exit, Schedule, Scope, TestClock } from "effect"
import { Redis } from "ioredis"
import { startPrivate } from "../../../test/support/Redis.js"

type Store = LimiterStore["Type"]

const REDIS_URL = "redis://127.0.0.1:6379"
const MINUTE = 60_000
const DAY = 86_400_000

const uniqueKey = (name: string) => `key:${name}-${crypto.randomUUID()}`

const rate = (key: string, capacity: number, cost: number, windowMs = MINUTE): RateCheck => ({
  kind: "rate",
  key,
  limit: "tokens",
  scope: "key",
  capacity,
  windowMs,
  cost
})

const concurrency = (key: string, capacity: number): ConcurrencyCheck => ({
  kind: "concurrency",
  key,
  scope: "key",
  capacity
})

const budget = (
  key: string,
  capacity: number,
  cost: number,
  period: BudgetCheck["period"] = "month"
): BudgetCheck => ({ kind: "budget", key, scope: "tenant", capacity, period, cost })

const LEASE_TTL = 30_000

const reserve = (store: Store, checks: ReadonlyArray<Check>, leaseId: string = crypto.randomUUID()) =>
  store.reserve({ leaseId, checks, leaseTtlMs: LEASE_TTL })

/** Reserves and expects an admission; returns what `settle` needs. */
const admit = (store: Store, checks: ReadonlyArray<Check>, leaseId: string = crypto.randomUUID()) =>
  Effect.flatMap(reserve(store, checks, leaseId), (decision) =>
    decision.admitted
      ? Effect.succeed({ ...decision, leaseId, checks })
      : Effect.dieMessage(`refused: ${JSON.stringify(decision)}`)
  )

const settle = (
  store: Store,
  admission: { leaseId: string; checks: ReadonlyArray<Check>; keys: ReadonlyArray<string> },
  actual: ReadonlyArray<number>
) => store.settle({ leaseId: admission.leaseId, checks: admission.checks, keys: admission.keys, actual })

const cancel = (store: Store, checks: ReadonlyArray<Check>, leaseId: string) =>
  store.cancel({ leaseId, checks, leaseTtlMs: LEASE_TTL })

const remainingOf = (decision: Decision, index = 0) => decision.states[index]?.remaining

/**
 * The port's contract. `stores` gives two stores on the same state (two replicas on Redis, the
 * same store twice in memory); most cases use the first.
 */
const contract = (name: string, stores: () => Effect.Effect<readonly [Store, Store]>) =>
  describe(`LimiterStore contract on ${name}`, () => {
    const store = Effect.map(Effect.suspend(stores), ([first]) => first)

    it.effect("a rate bucket admits its capacity at once, then refills continuously up to capacity", () =>
      Effect.gen(function* () {
        const s = yield* store
        const key = uniqueKey("rate")
        // 10 per minute: one unit every 6 s.
        for (let i = 0; i < 10; i++) expect((yield* reserve(s, [rate(key, 10, 1)])).admitted).toBe(true)
        expect(yield* reserve(s, [rate(key, 10, 1)])).toEqual({
          admitted: false,
          failed: 0,
          retryAfterMs: 6_000,
          states: [{ remaining: 0, resetMs: MINUTE }]
        })
        yield* TestClock.adjust(5_999)
        expect(yield* reserve(s, [rate(key, 10, 1)])).toMatchObject({ admitted: false, retryAfterMs: 1 })
        yield* TestClock.adjust(1)
        expect(yield* reserve(s, [rate(key, 10, 1)])).toMatchObject({
          admitted: true,
          states: [{ remaining: 0, resetMs: MINUTE }]
        })
        expect((yield* reserve(s, [rate(key, 10, 1)])).admitted).toBe(false)

        yield* TestClock.adjust(MINUTE / 2)
        expect(yield* reserve(s, [rate(key, 10, 6)])).toMatchObject({ admitted: false, retryAfterMs: 6_000 })
        expect(yield* reserve(s, [rate(key, 10, 5)])).toMatchObject({
          admitted: true,
          states: [{ remaining: 0, resetMs: MINUTE }]
        })

        yield* TestClock.adjust(10 * MINUTE)
        expect(yield* reserve(s, [rate(key, 10, 1)])).toMatchObject({
          admitted: true,
          states: [{ remaining: 9, resetMs: 6_000 }]
        })
      })
    )

    it.effect(
      "a reservation takes its cost, reports remaining and reset, and names the check without room",
      () =>
        Effect.gen(function* () {
          const s = yield* store
          const [a, b, c] = [uniqueKey("a"), uniqueKey("b"), uniqueKey("c")]
          // 100 per minute: 600 ms a unit.
          expect(yield* reserve(s, [rate(a, 100, 30)])).toEqual({
            admitted: true,
            states: [{ remaining: 70, resetMs: 18_000 }],
            keys: [a]
          })
          expect(remainingOf(yield* reserve(s, [rate(b, 5, 4)]))).toBe(1)
          expect(yield* reserve(s, [rate(a, 100, 1), concurrency(c, 3), rate(b, 5, 2)])).toEqual({
            admitted: false,
            failed: 2,
            retryAfterMs: 12_000,
            states: [
              { remaining: 70, resetMs: 18_000 },
              { remaining: 3, resetMs: 0 },
              { remaining: 1, resetMs: 48_000 }
            ]
          })
          expect(yield* reserve(s, [rate(a, 100, 1), concurrency(c, 3), rate(b, 5, 1)])).toEqual({
            admitted: true,
            states: [
              { remaining: 69, resetMs: 18_600 },
              { remaining: 2, resetMs: 0 },
              { remaining: 0, resetMs: MINUTE }
            ],
            keys: [a, c, b]
          })
        })
    )

    it.effect("all or nothing: when a later check has no room, the earlier ones are untouched", () =>
      Effect.gen(function* () {
        const s = yield* store
        const [a, b, c, d] = [uniqueKey("a"), uniqueKey("b"), uniqueKey("c"), uniqueKey("d")]
        yield* admit(s, [rate(d, 2, 2)])
        const refused = yield* reserve(s, [
          rate(a, 10, 3),
          budget(b, 1_000, 400),
          concurrency(c, 1),
          rate(d, 2, 1)
        ])
        expect(refused).toMatchObject({ admitted: false, failed: 3 })
        expect(remainingOf(yield* admit(s, [rate(a, 10, 3)]))).toBe(7)
        expect(remainingOf(yield* admit(s, [budget(b, 1_000, 400)]))).toBe(600)
        expect(remainingOf(yield* admit(s, [concurrency(c, 1)]))).toBe(0)
      })
    )

    it.effect("settle gives back unused tokens up to capacity, and takes what was used beyond", () =>
      Effect.gen(function* () {
        const s = yield* store
        const key = uniqueKey("tpm")
        // 100 per minute.
        const big = yield* admit(s, [rate(key, 100, 80)])
        expect(remainingOf(big)).toBe(20)
        yield* settle(s, big, [30])
        expect(remainingOf(yield* admit(s, [rate(key, 100, 1)]))).toBe(69)

        const other = uniqueKey("tpm")
        const half = yield* admit(s, [rate(other, 100, 50)])
        yield* TestClock.adjust(MINUTE)
        yield* settle(s, half, [0])
        expect(yield* admit(s, [rate(other, 100, 100)])).toMatchObject({
          states: [{ remaining: 0, resetMs: MINUTE }]
        })
        expect((yield* reserve(s, [rate(other, 100, 1)])).admitted).toBe(false)

        // 10 per minute: 6 s a unit. Using 15 of a reserved 10 leaves the bucket 5 in debt.
        const small = uniqueKey("tpm")
        const all = yield* admit(s, [rate(small, 10, 10)])
        yield* settle(s, all, [15])
        expect(yield* reserve(s, [rate(small, 10, 1)])).toEqual({
          admitted: false,
          failed: 0,
          retryAfterMs: 36_000,
          states: [{ remaining: 0, resetMs: 90_000 }]
        })
        yield* TestClock.adjust(35_999)
        expect((yield* reserve(s, [rate(small, 10, 1)])).admitted).toBe(false)
        yield* TestClock.adjust(1)
        expect((yield* reserve(s, [rate(small, 10, 1)])).admitted).toBe(true)
      })
    )

    it.effect("settleAll settles a batch at once, and settling a lease again changes nothing", () =>
      Effect.gen(function* () {
        const s = yield* store
        const key = uniqueKey("tpm-batch")
        const conc = uniqueKey("conc-batch")
        const checks = [rate(key, 100, 20), concurrency(conc, 3)]
        const admissions = [yield* admit(s, checks), yield* admit(s, checks), yield* admit(s, checks)]
        const requests = admissions.map((a) => ({
          leaseId: a.leaseId,
          checks: a.checks,
          keys: a.keys,
          actual: [5, 0]
        }))
        yield* s.settleAll(requests)
        // Each gave back 15 of its 20 (40 left after three reservations, 85 after), and its slot.
        const after = yield* admit(s, [rate(key, 100, 1), concurrency(conc, 3)])
        expect(remainingOf(after, 0)).toBe(84)
        // A retried batch (e.g. after a lost answer) neither refunds twice nor frees slots twice.
        yield* s.settleAll(requests)
        const again = yield* admit(s, [rate(key, 100, 1), concurrency(conc, 3)])
        expect(remainingOf(again, 0)).toBe(83)
        yield* admit(s, [concurrency(conc, 3)])
        expect((yield* reserve(s, [concurrency(conc, 3)])).admitted).toBe(false)
      })
    )

    it.effect("concurrency: capacity slots, freed once by settle, or when the lease expires", () =>
      Effect.gen(function* () {
        const s = yield* store
        const key = uniqueKey("concurrent")
        const first = yield* admit(s, [concurrency(key, 2)])
        expect(first.states).toEqual([{ remaining: 1, resetMs: 0 }])
        const second = yield* admit(s, [concurrency(key, 2)])
        expect(second.states).toEqual([{ remaining: 0, resetMs: 0 }])
        expect(yield* reserve(s, [concurrency(key, 2)])).toMatchObject({
          admitted: false,
          failed: 0,
          states: [{ remaining: 0, resetMs: 0 }]
        })

        yield* settle(s, first, [0])
        const third = yield* admit(s, [concurrency(key, 2)])
        expect(third.states).toEqual([{ remaining: 0, resetMs: 0 }])
        // Settling the same lease again frees nothing more.
        yield* settle(s, first, [0])
        expect((yield* reserve(s, [concurrency(key, 2)])).admitted).toBe(false)

        // Neither `second` nor `third` is ever settled (a crashed replica): their leases run out.
        yield* TestClock.adjust(LEASE_TTL - 1)
        expect((yield* reserve(s, [concurrency(key, 2)])).admitted).toBe(false)
        yield* TestClock.adjust(1)
        expect((yield* admit(s, [concurrency(key, 2)])).states).toEqual([{ remaining: 1, resetMs: 0 }])
      })
    )

    it.effect(
      "budget: spends up to capacity in the month, settles the difference, starts again next month",
      () =>
        Effect.gen(function* () {
          const s = yield* store
          const key = uniqueKey("budget")
          yield* TestClock.setTime(Date.UTC(2026, 10, 30, 23, 59, 0))
          const first = yield* admit(s, [budget(key, 1_000, 300)])
          expect(first.keys).toEqual([`${key}:2026-11`])
          expect(first.states).toEqual([{ remaining: 700, resetMs: MINUTE }])
          // No overspend: 300 + 701 > 1000.
          expect(yield* reserve(s, [budget(key, 1_000, 701)])).toEqual({
            admitted: false,
            failed: 0,
            retryAfterMs: MINUTE,
            states: [{ remaining: 700, resetMs: MINUTE }]
          })
          const second = yield* admit(s, [budget(key, 1_000, 700)])
          expect(second.states).toEqual([{ remaining: 0, resetMs: MINUTE }])

          yield* settle(s, first, [100])
          const third = yield* admit(s, [budget(key, 1_000, 200)])
          expect(remainingOf(third)).toBe(0)
          yield* settle(s, third, [250])
          expect(yield* reserve(s, [budget(key, 1_000, 1)])).toMatchObject({
            admitted: false,
            states: [{ remaining: 0, resetMs: MINUTE }]
          })

          yield* TestClock.adjust(MINUTE)
          const december = yield* admit(s, [budget(key, 1_000, 1_000)])
          expect(december.keys).toEqual([`${key}:2026-12`])
          expect(december.states).toEqual([{ remaining: 0, resetMs: 31 * DAY }])
          // A November request settling late changes November, not December.
          yield* settle(s, second, [0])
          expect((yield* reserve(s, [budget(key, 1_000, 1)])).admitted).toBe(false)
        })
    )

    it.effect("budget periods are UTC calendar days and months", () =>
      Effect.gen(function* () {
        const s = yield* store
        const at = (time: number) =>
          Effect.gen(function* () {
            yield* TestClock.setTime(time)
            const key = uniqueKey("period")
            const decision = yield* admit(s, [budget(key, 10, 1, "day"), budget(key, 10, 1, "month")])
            return {
              keys: decision.keys.map((k) => k.slice(key.length)),
              resetMs: decision.states.map((state) => state.resetMs)
            }
          })
        expect(yield* at(Date.UTC(2026, 11, 31, 23, 59, 59, 500))).toEqual({
          keys: [":2026-12-31", ":2026-12"],
          resetMs: [500, 500]
        })
        expect(yield* at(Date.UTC(2027, 0, 1))).toEqual({
          keys: [":2027-01-01", ":2027-01"],
          resetMs: [DAY, 31 * DAY]
        })
        expect(yield* at(Date.UTC(2028, 1, 29, 12))).toEqual({
          keys: [":2028-02-29", ":2028-02"],
          resetMs: [DAY / 2, DAY / 2]
        })

        const key = uniqueKey("daily")
        yield* TestClock.setTime(Date.UTC(2029, 11, 31, 23, 59, 59, 500))
        expect((yield* admit(s, [budget(key, 100, 100, "day")])).keys).toEqual([`${key}:2029-12-31`])
        expect(yield* reserve(s, [budget(key, 100, 1, "day")])).toMatchObject({
          admitted: false,
          retryAfterMs: 500
        })
        yield* TestClock.adjust(500)
        expect(yield* admit(s, [budget(key, 100, 100, "day")])).toMatchObject({
          keys: [`${key}:2030-01-01`],
          states: [{ remaining: 0, resetMs: DAY }]
        })
      })
    )

    it.effect("cancel of an admitted reservation gives back everything it took, exactly", () =>
      Effect.gen(function* () {
        const s = yield* store
        const [r, c, b] = [uniqueKey("rate"), uniqueKey("slots"), uniqueKey("spend")]
        const checks = [rate(r, 10, 4), concurrency(c, 1), budget(b, 1_000, 400)]
        const lease = crypto.randomUUID()
        yield* admit(s, checks, lease)
        expect(yield* reserve(s, [concurrency(c, 1)])).toMatchObject({ admitted: false, failed: 0 })

        yield* cancel(s, checks, lease)
        // The clock stands still: only the cancel can have refilled the bucket.
        expect(yield* admit(s, [rate(r, 10, 10), concurrency(c, 1), budget(b, 1_000, 1_000)])).toMatchObject({
          states: [
            { remaining: 0, resetMs: MINUTE },
            { remaining: 0, resetMs: 0 },
            { remaining: 0, resetMs: expect.any(Number) }
          ]
        })
        // The lease is spent: a late duplicate of its reserve takes nothing.
        expect(yield* reserve(s, checks, lease)).toMatchObject({ admitted: false, cancelled: true })
      })
    )

    it.effect("cancel twice gives back once, and a cancel after settle changes nothing", () =>
      Effect.gen(function* () {
        const s = yield* store
        const [r, c, b] = [uniqueKey("rate"), uniqueKey("slots"), uniqueKey("spend")]
        const checks = (cost: number) => [rate(r, 10, cost), concurrency(c, 2), budget(b, 1_000, cost * 100)]
        const lease = crypto.randomUUID()
        yield* admit(s, checks(4), lease)
        const other = yield* admit(s, checks(3))
        yield* cancel(s, checks(4), lease)
        yield* cancel(s, checks(4), lease)
        // Only `other` holds: 3 tokens, one slot, 300 spent.
        expect((yield* reserve(s, [rate(r, 10, 8)])).admitted).toBe(false)
        expect((yield* reserve(s, [budget(b, 1_000, 701)])).admitted).toBe(false)
        const third = yield* admit(s, checks(7))
        expect(third.states.map((state) => state.remaining)).toEqual([0, 0, 0])

        // A settled reservation ran: cancelling it afterwards gives nothing back.
        yield* settle(s, other, [3, 0, 300])
        yield* cancel(s, other.checks, other.leaseId)
        expect((yield* reserve(s, [rate(r, 10, 1)])).admitted).toBe(false)
        expect((yield* reserve(s, [budget(b, 1_000, 1)])).admitted).toBe(false)
        expect(yield* admit(s, [concurrency(c, 2)])).toMatchObject({ states: [{ remaining: 0 }] })
      })
    )

    it.effect("a cancel before its reserve arrives makes that reserve refuse and take nothing", () =>
      Effect.gen(function* () {
        const s = yield* store
        const [r, c, b] = [uniqueKey("rate"), uniqueKey("slots"), uniqueKey("spend")]
        const checks = [rate(r, 10, 4), concurrency(c, 1), budget(b, 1_000, 400)]
        const lease = crypto.randomUUID()
        yield* cancel(s, checks, lease)
        yield* cancel(s, checks, lease)
        expect(yield* reserve(s, checks, lease)).toEqual({
          admitted: false,
          failed: 0,
          retryAfterMs: 0,
          states: [
            { remaining: 0, resetMs: 0 },
            { remaining: 0, resetMs: 0 },
            { remaining: 0, resetMs: 0 }
          ],
          cancelled: true
        })
        expect(yield* admit(s, [rate(r, 10, 10), concurrency(c, 1), budget(b, 1_000, 1_000)])).toMatchObject({
          states: [{ remaining: 0 }, { remaining: 0 }, { remaining: 0 }]
        })
      })
    )

    it.effect("200 concurrent reservations from two replicas against capacity 50 admit exactly 50", () =>
      Effect.gen(function* () {
        const replicas = yield* Effect.suspend(stores)
        const fire = (checks: ReadonlyArray<Check>) =>
          Effect.all(
            Array.from({ length: 200 }, (_, i) => reserve(replicas[i % 2]!, checks)),
            { concurrency: "unbounded" }
          ).pipe(Effect.map((decisions) => decisions.filter((d) => d.admitted).length))

        expect(yield* fire([rate(uniqueKey("burst"), 50, 1)])).toBe(50)

        // Refused requests take nothing from the checks that had room.
        const tokens = uniqueKey("burst")
        expect(yield* fire([rate(tokens, 1_000, 1), concurrency(uniqueKey("burst"), 50)])).toBe(50)
        expect(remainingOf(yield* admit(replicas[1], [rate(tokens, 1_000, 1)]))).toBe(949)
      })
    )
  })

contract("memory", () => Effect.map(MemoryLimiterStore.make, (store) => [store, store] as const))

const prefix = `gw:test:${crypto.randomUUID().slice(0, 8)}:`
const connections = Effect.runSync(Scope.make())
let replicas: readonly [Redis, Redis] | undefined

beforeAll(async () => {
  replicas = await Effect.runPromise(
    Effect.all([RedisLimiterStore.connect(REDIS_URL), RedisLimiterStore.connect(REDIS_URL)]).pipe(
      Scope.extend(connections)
    )
  )
})

afterAll(async () => {
  if (replicas !== undefined) {
    const redis = replicas[0]
    let cursor = "0"
    do {
      const [next, keys] = await redis.scan(cursor, "MATCH", `${prefix}*`, "COUNT", 1000)
      if (keys.length > 0) await redis.del(...keys)
      cursor = next
    } while (cursor !== "0")
  }
  await Effect.runPromise(Scope.close(connections, Exit.void))
})

const redisStore = (redis: Redis) => RedisLimiterStore.make({ redis, keyPrefix: prefix, clock: "effect" })

contract("redis", () =>
  Effect.suspend(() => {
    const [a, b] = replicas!
    return Effect.all([redisStore(a), redisStore(b)])
  })
)

describe("RedisLimiterStore", () => {
  it.effect("decides on Redis's own clock by default", () =>
    Effect.gen(function* () {
      const store = yield* RedisLimiterStore.make({ redis: replicas![0], keyPrefix: prefix })
      const key = uniqueKey("time")
      const before = MemoryLimiterStore.periodOf(Date.now(), "month")
      const decision = yield* admit(store, [budget(key, 10, 1), rate(key, 10, 4)])
      const after = MemoryLimiterStore.periodOf(Date.now(), "month")
      expect([`${key}:${before.suffix}`, `${key}:${after.suffix}`]).toContain(decision.keys[0])
      expect(decision.states[1]).toEqual({ remaining: 6, resetMs: 24_000 })
      // The key layout operators see; a subject already in braces keeps its hash tag.
      const subject = `{k:${crypto.randomUUID()}}`
      yield* admit(store, [rate(`${subject}:tpm`, 10, 1)])
      expect(yield* Effect.promise(() => replicas![0].exists(`${prefix}${subject}:tpm:tokens`))).toBe(1)
    })
  )

  it.effect("survives a script flush (falls back to EVAL)", () =>
    Effect.gen(function* () {
      const [a] = replicas!
      const store = yield* redisStore(a)
      const key = uniqueKey("flush")
      expect(remainingOf(yield* admit(store, [rate(key, 10, 1)]))).toBe(9)
      yield* Effect.promise(() => a.script("FLUSH"))
      expect(remainingOf(yield* admit(store, [rate(key, 10, 1)]))).toBe(8)
    })
  )

  it.scopedLive("fails fast with LimiterStoreUnavailable when Redis cannot be reached", () =>
    Effect.gen(function* () {
      const redis = yield* RedisLimiterStore.connect("redis://127.0.0.1:1", { connectTimeoutMs: 100 })
      const store = yield* RedisLimiterStore.make({ redis, timeoutMs: 200 })
      const started = Date.now()
      const error = yield* Effect.flip(reserve(store, [rate(uniqueKey("down"), 10, 1)]))
      expect(error._tag).toBe("LimiterStoreUnavailable")
      expect(Date.now() - started).toBeLessThan(200)
      const settled = yield* Effect.flip(store.settle({ leaseId: "x", checks: [], keys: [], actual: [] }))
      expect(settled._tag).toBe("LimiterStoreUnavailable")
    })
  )

  it.scopedLive("gives up after timeoutMs when Redis accepts but never answers", () =>
    Effect.gen(function* () {
      const sockets = new Set<Socket>()
      const silent = yield* Effect.acquireRelease(
        Effect.async<Server>((resume) => {
          const server = createServer((socket) => sockets.add(socket))
          server.listen(0, "127.0.0.1", () => resume(Effect.succeed(server)))
        }),
        (server) =>
          Effect.async<void>((resume) => {
            for (const socket of sockets) socket.destroy()
            server.close(() => resume(Effect.void))
          })
      )
      const address = silent.address()
      const port = typeof address === "object" && address !== null ? address.port : 0
      // A client with ioredis' defaults queues commands while it waits for the server: only the
      // store's own bound ends the wait.
      const redis = yield* Effect.acquireRelease(
        Effect.sync(() => new Redis(port, "127.0.0.1", { maxRetriesPerRequest: null })),
        (client) => Effect.sync(() => client.disconnect())
      )
      const store = yield* RedisLimiterStore.make({ redis, timeoutMs: 150 })
      const started = Date.now()
      const error = yield* Effect.flip(reserve(store, [rate(uniqueKey("silent"), 10, 1)]))
      const elapsed = Date.now() - started
      expect(error).toMatchObject({ _tag: "LimiterStoreUnavailable" })
      expect(elapsed).toBeGreaterThanOrEqual(140)
      expect(elapsed).toBeLessThan(1_000)
    })
  )

  it.scopedLive("a reserve that timed out on a frozen Redis and was cancelled leaves nothing behind", () =>
    Effect.gen(function* () {
      // A private server: freezing the shared one would stall everyone else's tests.
      const server = yield* startPrivate
      const redis = yield* RedisLimiterStore.connect(server.url)
      const store = yield* RedisLimiterStore.make({ redis, timeoutMs: 100 })
      const subject = `{k:${crypto.randomUUID()}}`
      const checks = (cost: number) => [
        rate(`${subject}:tpm`, 10, cost),
        concurrency(`${subject}:conc`, 2),
        budget(`${subject}:spend`, 1_000, cost * 100)
      ]
      const [gone, kept] = [crypto.randomUUID(), crypto.randomUUID()]
      const read = <A>(f: (client: Redis) => Promise<A>) => Effect.promise(() => f(redis))
      // Load the scripts first: a frozen server's NOSCRIPT would come too late for the EVAL fallback.
      yield* cancel(store, checks(1), crypto.randomUUID())
      yield* admit(store, [], crypto.randomUUID())

      yield* server.freeze
      // Both time out, but Redis has them queued: they run once it is thawed.
      expect(yield* Effect.flip(reserve(store, checks(3), gone))).toMatchObject({
        _tag: "LimiterStoreUnavailable"
      })
      expect(yield* Effect.flip(reserve(store, checks(2), kept))).toMatchObject({
        _tag: "LimiterStoreUnavailable"
      })
      // Only `gone` is given up on (as the rate limiter does); the cancel cannot get through yet.
      expect(yield* Effect.flip(cancel(store, checks(3), gone))).toMatchObject({
        _tag: "LimiterStoreUnavailable"
      })
      yield* server.thaw
      yield* cancel(store, checks(3), gone).pipe(
        Effect.retry(Schedule.spaced("50 millis").pipe(Schedule.intersect(Schedule.recurs(40))))
      )

      // `kept` ran after the thaw and holds (the leak this fixes); `gone` ran too, and is undone.
      const slots = `gw:rl:${subject}:conc:concurrency`
      expect(yield* read((r) => r.zrange(slots, 0, -1))).toEqual([kept])
      expect(yield* read((r) => r.get(`gw:rl:${subject}:lease:${gone}`))).toBe("x")
      const month = MemoryLimiterStore.periodOf(Date.now(), "month").suffix
      expect(yield* read((r) => r.get(`gw:rl:${subject}:spend:budget:${month}`))).toBe("200")
      expect(remainingOf(yield* reserve(store, [rate(`${subject}:tpm`, 10, 0)]))).toBe(8)

      // Settling `kept` leaves the key as if nothing had happened: slot free, bucket full, nothing spent.
      const keys = [`${subject}:tpm`, `${subject}:conc`, `${subject}:spend:${month}`]
      yield* settle(store, { leaseId: kept, checks: checks(2), keys }, [0, 0, 0])
      expect(yield* read((r) => r.zcard(slots))).toBe(0)
      expect(yield* read((r) => r.exists(`gw:rl:${subject}:lease:${kept}`))).toBe(0)
      expect(yield* read((r) => r.exists(`gw:rl:${subject}:tpm:tokens`))).toBe(0)
      expect(yield* read((r) => r.get(`gw:rl:${subject}:spend:budget:${month}`))).toBe("0")
    })
  )
})
