import { describe, expect, it } from "@effect/vitest"
import * as Balancer from "@gateway/core/Balancer"
import { Ewma } from "@gateway/core/Balancer"
import { Effect, Random, TestClock } from "effect"

const replica = (id: string, load: Partial<Omit<Balancer.ReplicaLoad, "id">> = {}): Balancer.ReplicaLoad => ({
  id,
  weight: 1,
  inFlight: 0,
  ttftEwmaMs: 100,
  latencyEwmaMs: 1000,
  ...load
})

/** Picks `n` times and counts the ids chosen. */
const tally = (
  balancer: Balancer.Balancer,
  candidates: ReadonlyArray<Balancer.ReplicaLoad>,
  n: number,
  exclude?: ReadonlySet<string>
) =>
  Effect.gen(function* () {
    const counts = new Map<string, number>()
    const order: Array<string> = []
    for (let i = 0; i < n; i++) {
      const id = yield* balancer.pick(candidates, exclude)
      if (id === undefined) throw new Error("no pick")
      order.push(id)
      counts.set(id, (counts.get(id) ?? 0) + 1)
    }
    return { counts, order }
  })

describe("Balancer p2c", () => {
  it.effect("keeps the less loaded of the two replicas it draws", () =>
    Effect.gen(function* () {
      const balancer = yield* Balancer.make("p2c")
      const candidates = [
        replica("a", { inFlight: 5 }),
        replica("b", { inFlight: 0 }),
        replica("c", { inFlight: 2 }),
        replica("d", { inFlight: 9 })
      ]
      // Draws are indexes: the first among 4, the second among the 3 others.
      const draw = (first: number, second: number) =>
        balancer.pick(candidates).pipe(Effect.withRandom(Random.fixed([first, second])))
      expect(yield* draw(0, 1)).toBe("c") // a (5) vs c (2): c; b was never drawn
      expect(yield* draw(0, 2)).toBe("a") // a (5) vs d (9)
      expect(yield* draw(3, 0)).toBe("a") // d (9) vs a (5)
      expect(yield* draw(2, 0)).toBe("c") // c (2) vs a (5)
      expect(yield* draw(1, 2)).toBe("b") // b (0) vs d (9): the second skips the first's index
    })
  )

  it.effect("compares latency as well as in-flight requests, and the server's queue", () =>
    Effect.gen(function* () {
      const balancer = yield* Balancer.make("p2c")
      const both = (a: Balancer.ReplicaLoad, b: Balancer.ReplicaLoad) =>
        balancer.pick([a, b]).pipe(Effect.withRandom(Random.fixed([0, 0])))
      // Same in-flight, one twice as slow.
      expect(yield* both(replica("slow", { latencyEwmaMs: 2000 }), replica("fast"))).toBe("fast")
      // Fewer in flight beats lower latency when (inFlight + 1) × latency says so: 4×500 > 1×1000.
      expect(
        yield* both(
          replica("busy", { inFlight: 3, latencyEwmaMs: 500 }),
          replica("idle", { latencyEwmaMs: 1000 })
        )
      ).toBe("idle")
      // A vLLM queue counts like requests in flight.
      expect(yield* both(replica("queued", { queueDepth: 4 }), replica("free", { inFlight: 1 }))).toBe("free")
    })
  )

  it.effect("over many picks favours the replica with fewer in flight and lower latency", () =>
    Effect.gen(function* () {
      const balancer = yield* Balancer.make()
      expect(balancer.strategy).toBe("p2c")
      const candidates = [
        replica("loaded", { inFlight: 8 }),
        replica("slow", { latencyEwmaMs: 5000 }),
        replica("good"),
        replica("fine", { inFlight: 1 })
      ]
      const { counts } = yield* tally(balancer, candidates, 4000).pipe(Effect.withRandom(Random.make(42)))
      const good = counts.get("good") ?? 0
      const fine = counts.get("fine") ?? 0
      // "good" wins every pair it is drawn in (half of all picks); "fine" loses only to it.
      expect(good).toBeGreaterThan(1800)
      expect(good).toBeLessThan(2200)
      expect(fine).toBeGreaterThan(1100)
      expect(fine).toBeLessThan(1700)
      expect(good).toBeGreaterThan(fine)
      // The worst two only win against each other: a sixth of the pairs.
      expect((counts.get("loaded") ?? 0) + (counts.get("slow") ?? 0)).toBeLessThan(850)
    })
  )

  it.effect("always picks a single candidate, and needs no random draw for it", () =>
    Effect.gen(function* () {
      const balancer = yield* Balancer.make("p2c")
      const only = [replica("solo", { inFlight: 100, latencyEwmaMs: 60_000 })]
      const { counts } = yield* tally(balancer, only, 50)
      expect(counts.get("solo")).toBe(50)
      expect(yield* balancer.pick([])).toBeUndefined()
    })
  )

  it.effect("skips excluded replicas while another is left, then falls back to the least loaded", () =>
    Effect.gen(function* () {
      const balancer = yield* Balancer.make("p2c")
      const candidates = [replica("a"), replica("b", { inFlight: 3 }), replica("c", { inFlight: 1 })]
      const { counts } = yield* tally(balancer, candidates, 200, new Set(["a", "c"]))
      expect(counts.get("b")).toBe(200)
      // Of the two left, the less loaded (c) always wins the pair.
      const twoLeft = yield* tally(balancer, candidates, 200, new Set(["a"]))
      expect(twoLeft.counts.get("c")).toBe(200)
      // Everything failed already: the least loaded of all, rather than nothing.
      expect(yield* balancer.pick(candidates, new Set(["a", "b", "c"]))).toBe("a")
    })
  )
})

describe("Balancer round_robin", () => {
  it.effect("cycles through the replicas evenly, whatever their load", () =>
    Effect.gen(function* () {
      const balancer = yield* Balancer.make("round_robin")
      const candidates = [replica("a", { inFlight: 50 }), replica("b"), replica("c")]
      const { counts, order } = yield* tally(balancer, candidates, 300)
      expect(order.slice(0, 6)).toEqual(["a", "b", "c", "a", "b", "c"])
      expect([...counts.values()]).toEqual([100, 100, 100])
    })
  )

  it.effect("skips excluded replicas and keeps cycling over the rest", () =>
    Effect.gen(function* () {
      const balancer = yield* Balancer.make("round_robin")
      const candidates = [replica("a"), replica("b"), replica("c")]
      const { order } = yield* tally(balancer, candidates, 4, new Set(["b"]))
      expect(order).toEqual(["a", "c", "a", "c"])
      expect(yield* balancer.pick(candidates, new Set(["a", "b", "c"]))).toBe("a")
    })
  )
})

describe("Balancer weighted", () => {
  it.effect("picks in proportion to the weights, smoothly interleaved", () =>
    Effect.gen(function* () {
      const balancer = yield* Balancer.make("weighted")
      const candidates = [replica("big", { weight: 3 }), replica("small", { weight: 1 })]
      const { counts, order } = yield* tally(balancer, candidates, 4000)
      expect(counts.get("big")).toBe(3000)
      expect(counts.get("small")).toBe(1000)
      // Never two "small" in a row and never more than two "big": every 4 picks hold exactly one "small".
      for (let i = 0; i + 4 <= order.length; i++) {
        expect(order.slice(i, i + 4).filter((id) => id === "small")).toHaveLength(1)
      }
    })
  )

  it.effect("follows nginx's sequence for 5:1:1", () =>
    Effect.gen(function* () {
      const balancer = yield* Balancer.make("weighted")
      const candidates = [
        replica("a", { weight: 5 }),
        replica("b", { weight: 1 }),
        replica("c", { weight: 1 })
      ]
      const { order } = yield* tally(balancer, candidates, 7)
      expect(order).toEqual(["a", "a", "b", "a", "c", "a", "a"])
    })
  )

  it.effect("shares out among the replicas left when some are excluded", () =>
    Effect.gen(function* () {
      const balancer = yield* Balancer.make("weighted")
      const candidates = [
        replica("a", { weight: 2 }),
        replica("b", { weight: 1 }),
        replica("c", { weight: 5 })
      ]
      const { counts } = yield* tally(balancer, candidates, 300, new Set(["c"]))
      expect(counts.get("a")).toBe(200)
      expect(counts.get("b")).toBe(100)
      expect(counts.has("c")).toBe(false)
    })
  )
})

describe("Ewma", () => {
  it("starts at the prior, and the first sample replaces it", () => {
    const fresh = Ewma.make({ priorMs: 50, halfLifeMs: 1000 })
    expect(Ewma.valueAt(fresh, 0)).toBe(50)
    expect(Ewma.observe(fresh, 400, 10).value).toBe(400)
  })

  it("moves towards new samples, the more the longer since the last", () => {
    const options = { priorMs: 100, halfLifeMs: 1000, minWeight: 0.1 }
    const first = Ewma.observe(Ewma.make(options), 100, 0)
    // One half-life later a sample moves it half way; two half-lives later three quarters.
    expect(Ewma.observe(first, 300, 1000).value).toBeCloseTo(200)
    expect(Ewma.observe(first, 300, 2000).value).toBeCloseTo(250)
    // Samples within the same millisecond still count (minWeight), and repeated ones converge.
    let e = first
    for (let i = 0; i < 100; i++) e = Ewma.observe(e, 300, 0)
    expect(e.value).toBeGreaterThan(299)
    expect(e.samples).toBe(101)
  })

  it("drifts back to the prior when not refreshed", () => {
    const slow = Ewma.observe(Ewma.make({ priorMs: 100, halfLifeMs: 1000 }), 900, 0)
    expect(Ewma.valueAt(slow, 0)).toBe(900)
    expect(Ewma.valueAt(slow, 1000)).toBeCloseTo(500)
    expect(Ewma.valueAt(slow, 60_000)).toBeCloseTo(100)
  })

  it.effect("reads the time from Effect's Clock", () =>
    Effect.gen(function* () {
      let e = yield* Ewma.makeNow({ priorMs: 100, halfLifeMs: 1000 })
      e = yield* Ewma.observeNow(e, 100)
      yield* TestClock.adjust("1 second")
      e = yield* Ewma.observeNow(e, 500)
      expect(e.value).toBeCloseTo(300)
      yield* TestClock.adjust("1 second")
      expect(yield* Ewma.valueNow(e)).toBeCloseTo(200)
    })
  )
})
