import { describe, expect, it } from "@effect/vitest"
import { BackendJournal } from "@gateway/core/BackendJournal"
import * as BackendPool from "@gateway/core/BackendPool"
import { Models } from "@gateway/core/Models"
import type { Replica } from "@gateway/core/Replica"
import * as Settings from "@gateway/core/Settings"
import { Upstream } from "@gateway/core/Upstream"
import { type BackendEvents, Errors, GatewayConfig } from "@gateway/domain"
import { Effect, Layer, Schema, TestClock } from "effect"

const decodeConfig = Schema.decodeUnknownSync(GatewayConfig.GatewayConfig)

const backends = (...ids: ReadonlyArray<string>) =>
  ids.map((id, i) => ({ id, url: `http://127.0.0.1:${9001 + i}` }))

/**
 * A pool over `config` (the raw file shape), with a fake upstream whose health probe answers
 * 200 unless `down` holds the replica's id, and a journal collecting `[backend, event]`.
 */
const harness = (config: Record<string, unknown>) => {
  const events: Array<readonly [string, BackendEvents.BackendEvent]> = []
  const down = new Set<string>()
  const probed: Array<string> = []
  const upstream = Layer.succeed(
    Upstream,
    Upstream.of({
      chat: () => Effect.die("chat is not called by the pool"),
      probe: (target) =>
        Effect.suspend(() => {
          const id = target.backend.id
          probed.push(id)
          return down.has(id)
            ? Effect.fail(new Errors.BackendError({ reason: "Connect", backend: id, detail: "ECONNREFUSED" }))
            : Effect.succeed({ status: 200, body: "ok" })
        })
    })
  )
  const journal = Layer.succeed(
    BackendJournal,
    BackendJournal.of({ record: (backend, event) => void events.push([backend, event]) })
  )
  const layer = BackendPool.layer({ gateway: "gw-test" }).pipe(
    Layer.provide(Models.Default),
    Layer.provide(Settings.layer(decodeConfig(config))),
    Layer.provide(upstream),
    Layer.provide(journal)
  )
  return { layer, events, down, probed }
}

const connect = (id: string) => new Errors.BackendError({ reason: "Connect", backend: id, detail: "refused" })
const http500 = (id: string) =>
  new Errors.BackendError({ reason: "Http", backend: id, status: 500, detail: "HTTP 500" })

/** One whole call on `replica` that fails with `error`. */
const failOnce = (replica: Replica, error: Errors.BackendError) =>
  Effect.flatMap(replica.begin(), (lease) => lease.fail(error))

const poolModel = (name: string) =>
  Effect.map(BackendPool.BackendPool, (pool) => {
    const model = pool.model(name)
    if (model === undefined) throw new Error(`no model ${name}`)
    return model
  })

const replicaOf = (model: BackendPool.ModelPool, id: string) => {
  const replica = model.replicas.find((r) => r.id === id)
  if (replica === undefined) throw new Error(`no replica ${id}`)
  return replica
}

/** The ids of `n` picks. */
const picks = (model: BackendPool.ModelPool, n: number, tried?: ReadonlySet<string>, panic?: boolean) =>
  Effect.forEach(Array.from({ length: n }), () =>
    Effect.map(model.pick(tried, panic), (replica) => replica?.id)
  )

const count = (ids: ReadonlyArray<string | undefined>) => {
  const counts: Record<string, number> = {}
  for (const id of ids) counts[String(id)] = (counts[String(id)] ?? 0) + 1
  return counts
}

/**
 * Ejection after 2 unreachable calls, the breaker opening after 3 failures: a replica can be
 * ejected with its breaker closed, or have its breaker open while healthy. Health checks every
 * minute, out of the way unless a test moves the clock that far.
 */
const pool = {
  health: { eject_after_failures: 2, interval_ms: 60_000 },
  circuit_breaker: { consecutive_failures: 3, cooldown_ms: 10_000, cooldown_factor: 1 }
}

describe("BackendPool pick", () => {
  it.effect("p2c (the default) always picks the less loaded of two replicas", () => {
    const { layer } = harness({ pool, models: [{ name: "m", backends: backends("a", "b") }] })
    return Effect.gen(function* () {
      const model = yield* poolModel("m")
      expect(model.policy.balancer).toBe("p2c")
      const a = replicaOf(model, "a")
      const b = replicaOf(model, "b")
      const held = yield* Effect.forEach([1, 2, 3], () => a.begin())
      expect(count(yield* picks(model, 50))).toEqual({ b: 50 })

      const onB = yield* Effect.forEach([1, 2, 3, 4, 5], () => b.begin())
      expect(count(yield* picks(model, 50))).toEqual({ a: 50 })

      // The load turns: a is free, b has 3 in flight.
      yield* Effect.forEach([...held, ...onB.slice(0, 2)], (lease) => lease.succeed)
      expect([a.inFlight, b.inFlight]).toEqual([0, 3])
      expect(count(yield* picks(model, 20))).toEqual({ a: 20 })
    }).pipe(Effect.provide(layer))
  })

  it.effect("p2c steers away from a replica that fails fast (a failure counts as a slow answer)", () => {
    // No breaker or ejection in the way: only the balancer decides.
    const { layer } = harness({
      pool: {
        circuit_breaker: { consecutive_failures: 1000, minimum_requests: 1000 },
        health: { eject_after_failures: 0 }
      },
      models: [{ name: "m", backends: backends("fast-fail", "steady") }]
    })
    return Effect.gen(function* () {
      const model = yield* poolModel("m")
      const failing = replicaOf(model, "fast-fail")
      const steady = replicaOf(model, "steady")
      // Both answer in 50 ms when they answer; one of them also fails at once, every other call.
      const answer = (replica: Replica) =>
        Effect.flatMap(replica.begin(), (lease) => Effect.zipRight(TestClock.adjust(50), lease.succeed))
      for (let i = 0; i < 4; i++) {
        yield* answer(steady)
        yield* answer(failing)
        yield* failOnce(failing, http500("fast-fail"))
      }
      expect(failing.latencyEwmaMs).toBeGreaterThan(2 * steady.latencyEwmaMs)
      expect(count(yield* picks(model, 40))).toEqual({ steady: 40 })
    }).pipe(Effect.provide(layer))
  })

  it.effect("skips ejected replicas and open breakers, and answers undefined when none is left", () => {
    const { layer } = harness({ pool, models: [{ name: "m", backends: backends("a", "b", "c") }] })
    return Effect.gen(function* () {
      const model = yield* poolModel("m")
      const [a, b, c] = [replicaOf(model, "a"), replicaOf(model, "b"), replicaOf(model, "c")]
      expect(model.unavailable()).toBe("a: available; b: available; c: available")
      expect(model.retryAfterMs()).toBeUndefined()

      // a: ejected (2 connect failures), breaker still closed.
      yield* failOnce(a, connect("a"))
      yield* failOnce(a, connect("a"))
      expect(a.healthy).toBe(false)
      expect((yield* a.status).breaker.state).toBe("closed")
      expect(new Set(yield* picks(model, 40))).toEqual(new Set(["b", "c"]))

      // b: breaker open (3 HTTP 500), still healthy.
      for (let i = 0; i < 3; i++) yield* failOnce(b, http500("b"))
      expect(b.healthy).toBe(true)
      expect(count(yield* picks(model, 40))).toEqual({ c: 40 })
      expect(model.unavailable()).toBe("a: ejected; b: circuit open; c: available")
      expect(model.retryAfterMs()).toBe(10_000)

      // c too, 4 s later: nothing is left; b half-opens first.
      yield* TestClock.adjust(4_000)
      for (let i = 0; i < 3; i++) yield* failOnce(c, http500("c"))
      expect(yield* model.pick()).toBeUndefined()
      expect(yield* model.pick(new Set(["a", "b"]))).toBeUndefined()
      expect(model.unavailable()).toBe("a: ejected; b: circuit open; c: circuit open")
      expect(model.retryAfterMs()).toBe(6_000)

      // Panic: the ejected replica is a candidate again (its breaker is closed); open breakers are not.
      expect(count(yield* picks(model, 10, undefined, true))).toEqual({ a: 10 })

      // Once b's cooldown is over, b may take a probe.
      yield* TestClock.adjust(6_000)
      expect(model.retryAfterMs()).toBe(4_000)
      expect(count(yield* picks(model, 10))).toEqual({ b: 10 })
    }).pipe(Effect.provide(layer))
  })

  it.effect("pick(tried) avoids the replicas already tried while another is available", () => {
    const { layer } = harness({ pool, models: [{ name: "m", backends: backends("a", "b", "c") }] })
    return Effect.gen(function* () {
      const model = yield* poolModel("m")
      expect(count(yield* picks(model, 30, new Set(["a", "b"])))).toEqual({ c: 30 })
      expect(new Set(yield* picks(model, 30, new Set(["a"])))).toEqual(new Set(["b", "c"]))
      // Every one tried: still an answer (the least loaded) rather than none.
      yield* replicaOf(model, "a").begin()
      yield* replicaOf(model, "c").begin()
      expect(count(yield* picks(model, 10, new Set(["a", "b", "c"])))).toEqual({ b: 10 })
      // The only one available is tried: it is the answer.
      for (let i = 0; i < 2; i++) {
        yield* failOnce(replicaOf(model, "b"), connect("b"))
        yield* failOnce(replicaOf(model, "c"), connect("c"))
      }
      expect(count(yield* picks(model, 10, new Set(["a"])))).toEqual({ a: 10 })
    }).pipe(Effect.provide(layer))
  })

  it.effect("panic considers ejected replicas, still preferring the less loaded", () => {
    const { layer } = harness({ pool, models: [{ name: "m", backends: backends("a", "b") }] })
    return Effect.gen(function* () {
      const model = yield* poolModel("m")
      const [a, b] = [replicaOf(model, "a"), replicaOf(model, "b")]
      for (const r of [a, b]) for (let i = 0; i < 2; i++) yield* failOnce(r, connect(r.id))
      expect(model.unavailable()).toBe("a: ejected; b: ejected")
      expect(yield* model.pick()).toBeUndefined()
      yield* a.begin()
      expect(count(yield* picks(model, 20, undefined, true))).toEqual({ b: 20 })
      expect(count(yield* picks(model, 10, new Set(["b"]), true))).toEqual({ a: 10 })
    }).pipe(Effect.provide(layer))
  })
})

describe("BackendPool strategies and status", () => {
  const config = {
    pool: { ...pool, balancer: "round_robin" },
    models: [
      { name: "rr", backends: backends("rr-1", "rr-2", "rr-3") },
      {
        name: "w",
        balancer: "weighted",
        backends: [
          { id: "w-heavy", url: "http://10.0.0.1:8000", weight: 3 },
          { id: "w-light", url: "http://10.0.0.2:8000" }
        ]
      },
      { name: "p", balancer: "p2c", backends: backends("p-1", "p-2") }
    ]
  }

  it.effect("round_robin and weighted from the config are honoured per model", () => {
    const { layer } = harness(config)
    return Effect.gen(function* () {
      const rr = yield* poolModel("rr")
      expect(rr.policy.balancer).toBe("round_robin")
      expect(yield* picks(rr, 7)).toEqual(["rr-1", "rr-2", "rr-3", "rr-1", "rr-2", "rr-3", "rr-1"])
      // Load does not change the order.
      yield* replicaOf(rr, "rr-3").begin()
      expect(yield* picks(rr, 3)).toEqual(["rr-2", "rr-3", "rr-1"])

      const w = yield* poolModel("w")
      expect(w.policy.balancer).toBe("weighted")
      // Smooth weighted round-robin, 3:1 interleaved.
      expect(yield* picks(w, 8)).toEqual([
        "w-heavy",
        "w-heavy",
        "w-light",
        "w-heavy",
        "w-heavy",
        "w-heavy",
        "w-light",
        "w-heavy"
      ])

      const p = yield* poolModel("p")
      expect(p.policy.balancer).toBe("p2c")
      yield* replicaOf(p, "p-1").begin()
      expect(count(yield* picks(p, 20))).toEqual({ "p-2": 20 })
    }).pipe(Effect.provide(layer))
  })

  it.effect("status lists every replica in config order; an unknown model has no pool", () => {
    const { layer } = harness(config)
    return Effect.gen(function* () {
      const backendPool = yield* BackendPool.BackendPool
      expect(backendPool.model("nope")).toBeUndefined()
      yield* replicaOf(yield* poolModel("w"), "w-light").begin()
      const status = yield* backendPool.status
      expect(status.map((s) => [s.model, s.id])).toEqual([
        ["rr", "rr-1"],
        ["rr", "rr-2"],
        ["rr", "rr-3"],
        ["w", "w-heavy"],
        ["w", "w-light"],
        ["p", "p-1"],
        ["p", "p-2"]
      ])
      expect(status[3]).toMatchObject({
        url: "http://10.0.0.1:8000",
        weight: 3,
        health: "healthy",
        inFlight: 0
      })
      expect(status[4]).toMatchObject({ weight: 1, inFlight: 1, requests: 1 })
      expect(status.every((s) => s.breaker.state === "closed" && s.ejectedAt === null)).toBe(true)
    }).pipe(Effect.provide(layer))
  })
})

describe("BackendPool health checks", () => {
  it.effect(
    "each replica is checked on its own fiber: a replica that fails its checks is ejected, then restored",
    () => {
      const { layer, events, down, probed } = harness({
        pool: { health: { interval_ms: 1_000, unhealthy_threshold: 2, healthy_threshold: 2 } },
        models: [{ name: "m", backends: backends("a", "b") }]
      })
      return Effect.gen(function* () {
        const model = yield* poolModel("m")
        down.add("b")
        yield* TestClock.adjust(2_000)
        expect(count(probed)).toEqual({ a: 2, b: 2 })
        expect(model.unavailable()).toBe("a: available; b: ejected")
        expect(count(yield* picks(model, 20))).toEqual({ a: 20 })
        expect(events).toEqual([
          [
            "b",
            expect.objectContaining({
              _tag: "BackendEjected",
              model: "m",
              gateway: "gw-test",
              cause: "health_check"
            })
          ]
        ])

        down.delete("b")
        yield* TestClock.adjust(2_000)
        expect(model.unavailable()).toBe("a: available; b: available")
        expect(events.map(([id, e]) => `${id}:${e._tag}`)).toEqual(["b:BackendEjected", "b:BackendRestored"])
        expect(events[1]![1]).toMatchObject({ probes: 2, ejectedForMs: 2_000 })
      }).pipe(Effect.provide(layer))
    }
  )

  it.effect("the replicas' fibers stop with the pool", () => {
    const { layer, probed } = harness({
      pool: { health: { interval_ms: 1_000 } },
      models: [{ name: "m", backends: backends("a") }]
    })
    return Effect.gen(function* () {
      yield* Effect.provide(TestClock.adjust(3_000), layer)
      expect(probed).toEqual(["a", "a", "a"])
      yield* TestClock.adjust(10_000)
      expect(probed).toHaveLength(3)
    })
  })
})
