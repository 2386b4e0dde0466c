import { describe, expect, it } from "@effect/vitest"
import * as CircuitBreaker from "@gateway/core/CircuitBreaker"
import type { Target } from "@gateway/core/Models"
import { metricSum, Replica } from "@gateway/core/Replica"
import type { ProbeResult, Upstream } from "@gateway/core/Upstream"
import { type BackendEvents, Errors, GatewayConfig } from "@gateway/domain"
import { Effect, Option, Schema, TestClock } from "effect"

const decodeConfig = Schema.decodeUnknownSync(GatewayConfig.GatewayConfig)

/** A replica `r1` of model `m`, with the `pool` section given; its journal is `events`. */
const setup = (pool: Record<string, unknown> = {}) =>
  Effect.gen(function* () {
    const config = decodeConfig({
      pool,
      models: [{ name: "m", backends: [{ id: "r1", url: "http://127.0.0.1:9001" }] }]
    })
    const model = config.models[0]
    const backend = model.backends[0]
    const target: Target = {
      model,
      backend,
      upstreamModel: model.name,
      origin: new URL(backend.url).origin,
      chatPath: "/v1/chat/completions",
      timeouts: config.timeoutsFor(model),
      apiKey: Option.none()
    }
    const events: Array<BackendEvents.BackendEvent> = []
    const replica = yield* Replica.make({
      target,
      policy: config.policyFor(model),
      journal: (id, event) => {
        expect(id).toBe("r1")
        events.push(event)
      },
      gateway: "gw-test"
    })
    return { replica, events }
  })

const connect = new Errors.BackendError({ reason: "Connect", backend: "r1", detail: "ECONNREFUSED" })
const timeout = new Errors.BackendError({ reason: "Timeout", backend: "r1", detail: "no answer in 5000 ms" })
const http = (status: number) =>
  new Errors.BackendError({ reason: "Http", backend: "r1", status, detail: `HTTP ${status}` })

/** One whole call that ends with `error`, or succeeds. */
const call = (replica: Replica, error?: Errors.BackendError) =>
  Effect.flatMap(replica.begin(), (lease) => (error === undefined ? lease.succeed : lease.fail(error)))
const calls = (replica: Replica, errors: ReadonlyArray<Errors.BackendError | undefined>) =>
  Effect.forEach(errors, (error) => call(replica, error), { discard: true })

const tags = (events: ReadonlyArray<BackendEvents.BackendEvent>) => events.map((e) => e._tag)

/**
 * An upstream whose probe answers `health()` on the health path and `metrics()` on `/metrics`,
 * counting the calls per path. A `BackendError` answer is a failed probe.
 */
const fakeUpstream = (script: {
  health?: () => ProbeResult | Errors.BackendError
  metrics?: () => ProbeResult | Errors.BackendError
}) => {
  const probes = new Map<string, number>()
  const upstream: Upstream["Type"] = {
    chat: () => Effect.die("chat is not called by a replica"),
    probe: (target, path, timeoutMs) =>
      Effect.suspend(() => {
        expect(target.backend.id).toBe("r1")
        expect(timeoutMs).toBeGreaterThan(0)
        probes.set(path, (probes.get(path) ?? 0) + 1)
        const answer = (path === "/metrics" ? script.metrics : script.health)?.() ?? {
          status: 200,
          body: "ok"
        }
        return answer instanceof Errors.BackendError ? Effect.fail(answer) : Effect.succeed(answer)
      })
  }
  return { upstream, probes: (path: string) => probes.get(path) ?? 0 }
}

describe("Replica leases", () => {
  it.effect("in flight counts each lease once: up on begin, down on its first completion only", () =>
    Effect.gen(function* () {
      const { replica } = yield* setup()
      expect(replica.inFlight).toBe(0)
      const a = yield* replica.begin()
      const b = yield* replica.begin()
      const c = yield* replica.begin()
      expect(replica.inFlight).toBe(3)

      yield* a.succeed
      expect(replica.inFlight).toBe(2)
      yield* a.succeed
      yield* a.fail(connect)
      yield* a.release
      expect(replica.inFlight).toBe(2)

      yield* b.fail(http(500))
      yield* b.fail(http(500))
      yield* b.succeed
      expect(replica.inFlight).toBe(1)

      yield* c.release
      yield* c.release
      yield* c.fail(http(500))
      expect(replica.inFlight).toBe(0)

      const status = yield* replica.status
      expect(status).toMatchObject({ inFlight: 0, requests: 3, failures: 1, lastError: "Http: HTTP 500" })
      // The breaker saw one failure, not three.
      expect(status.breaker).toMatchObject({ state: "closed", consecutiveFailures: 1 })
    })
  )

  it.effect(
    "the TTFT and latency EWMAs follow samples taken on the clock; the first replaces the prior",
    () =>
      Effect.gen(function* () {
        const { replica } = yield* setup()
        // The prior (100 ms) before any sample.
        expect(replica.ttftEwmaMs).toBe(100)
        expect(replica.latencyEwmaMs).toBe(100)

        const a = yield* replica.begin()
        const b = yield* replica.begin()
        yield* TestClock.adjust(200)
        a.firstToken()
        expect(replica.ttftEwmaMs).toBe(200)
        yield* TestClock.adjust(100)
        a.firstToken() // only the first counts: the estimate only drifts towards the prior
        expect(replica.ttftEwmaMs).toBeCloseTo(100 + 100 * 2 ** (-100 / 10_000), 9)
        yield* TestClock.adjust(700)
        yield* a.succeed
        expect(replica.latencyEwmaMs).toBe(1_000)
        expect(replica.ttftEwmaMs).toBeCloseTo(100 + 100 * 2 ** (-800 / 10_000), 9)

        // One half-life (10 s) after the first samples, a new one weighs half.
        yield* TestClock.adjust(9_200)
        b.firstToken() // 10 200 ms after b began, 10 000 ms after a's first token
        expect(replica.ttftEwmaMs).toBeCloseTo(0.5 * 200 + 0.5 * 10_200, 9)
        yield* TestClock.adjust(800)
        yield* b.succeed // 11 000 ms after b began, 10 000 ms after a ended
        expect(replica.latencyEwmaMs).toBeCloseTo(0.5 * 1_000 + 0.5 * 11_000, 9)

        // Without samples, the estimate drifts back towards the prior: half way in a half-life.
        yield* TestClock.adjust(10_000)
        expect(replica.latencyEwmaMs).toBeCloseTo(100 + (6_000 - 100) * 0.5, 9)
        expect((yield* replica.status).latencyMs).toBe(3_050)

        // A first token after the lease is over is not a sample.
        const c = yield* replica.begin()
        yield* c.release
        const before = replica.ttftEwmaMs
        yield* TestClock.adjust(50_000)
        c.firstToken()
        expect(replica.ttftEwmaMs).toBeLessThan(before)
        // Only the drift from b's sample (at 10 200) to now (71 000): c's 50 000 ms did not count.
        expect(replica.ttftEwmaMs).toBeCloseTo(100 + (5_200 - 100) * 2 ** (-60_800 / 10_000), 9)
      })
  )

  it.effect("begin fails with BreakerOpen while the breaker is open, without counting a call", () =>
    Effect.gen(function* () {
      const { replica } = yield* setup({
        circuit_breaker: { consecutive_failures: 2, cooldown_ms: 1_000 },
        health: { eject_after_failures: 0 }
      })
      yield* calls(replica, [http(503), http(503)])
      yield* TestClock.adjust(400)
      const error = yield* Effect.flip(replica.begin())
      expect(error).toBeInstanceOf(CircuitBreaker.BreakerOpen)
      expect(error).toMatchObject({ backend: "r1", state: "open", retryAfterMs: 600 })
      expect(replica.available()).toBe(false)
      expect(replica.healthy).toBe(true)
      expect(yield* replica.status).toMatchObject({ inFlight: 0, requests: 2 })
    })
  )
})

describe("Replica passive ejection", () => {
  // The breaker is kept out of the way: only ejection is under test.
  const pool = {
    health: { eject_after_failures: 3 },
    circuit_breaker: { consecutive_failures: 100, minimum_requests: 100 }
  }

  it.effect("N Connect/Timeout failures in a row eject it and record BackendEjected(request_failures)", () =>
    Effect.gen(function* () {
      const { replica, events } = yield* setup(pool)
      yield* calls(replica, [connect, timeout])
      expect(replica.available()).toBe(true)
      yield* TestClock.adjust(1_234)
      yield* call(replica, connect)
      expect(replica.available()).toBe(false)
      expect(replica.healthy).toBe(false)
      expect(events).toHaveLength(1)
      expect(events[0]).toMatchObject({
        _tag: "BackendEjected",
        model: "m",
        gateway: "gw-test",
        cause: "request_failures",
        failures: 3,
        detail: "Connect: ECONNREFUSED"
      })
      expect(yield* replica.status).toMatchObject({
        health: "ejected",
        ejectedAt: 1_234,
        lastError: "Connect: ECONNREFUSED"
      })
      // Still ejected after more failures, and ejected once only.
      yield* calls(replica, [connect, timeout])
      expect(replica.available()).toBe(false)
      expect(tags(events)).toEqual(["BackendEjected"])
    })
  )

  it.effect("a success, an HTTP 500 or a client error (400) in between starts the count again", () =>
    Effect.gen(function* () {
      const { replica, events } = yield* setup(pool)
      yield* calls(replica, [connect, connect, undefined, connect, timeout])
      expect(replica.available()).toBe(true)
      yield* calls(replica, [undefined, connect, connect, http(500), connect, timeout])
      expect(replica.available()).toBe(true)
      // A refusal the client caused means the replica is up and answering.
      yield* calls(replica, [undefined, timeout, connect, http(400), connect, timeout])
      expect(replica.available()).toBe(true)
      // HTTP errors alone never eject: the replica answers.
      yield* calls(replica, [http(500), http(502), http(503), http(429), http(500)])
      expect(replica.available()).toBe(true)
      expect(events).toEqual([])
      // A released call (the client left) says nothing either way.
      yield* calls(replica, [undefined, connect, connect])
      yield* Effect.flatMap(replica.begin(), (lease) => lease.release)
      expect(replica.available()).toBe(true)
      yield* call(replica, timeout)
      expect(replica.available()).toBe(false)
      expect(tags(events)).toEqual(["BackendEjected"])
    })
  )

  it.effect("eject_after_failures 0 never ejects", () =>
    Effect.gen(function* () {
      const { replica, events } = yield* setup({ ...pool, health: { eject_after_failures: 0 } })
      yield* calls(
        replica,
        Array.from({ length: 20 }, () => connect)
      )
      expect(replica.available()).toBe(true)
      expect(events).toEqual([])
    })
  )
})

describe("Replica active health checks", () => {
  it.scoped("unhealthy_threshold failed checks eject; healthy_threshold good probes restore", () =>
    Effect.gen(function* () {
      const { replica, events } = yield* setup({
        health: { interval_ms: 1_000, unhealthy_threshold: 2, healthy_threshold: 3 }
      })
      let up = false
      const { upstream, probes } = fakeUpstream({ health: () => (up ? { status: 200, body: "" } : connect) })
      yield* Effect.forkScoped(replica.run(upstream))

      // No check before the first interval.
      yield* TestClock.adjust(999)
      expect(probes("/health")).toBe(0)
      yield* TestClock.adjust(1)
      expect(probes("/health")).toBe(1)
      expect(replica.available()).toBe(true)
      expect(yield* replica.status).toMatchObject({ lastCheckAt: 1_000, lastCheckOk: false })
      yield* TestClock.adjust(1_000)
      expect(probes("/health")).toBe(2)
      expect(replica.available()).toBe(false)
      expect(events).toEqual([
        expect.objectContaining({
          _tag: "BackendEjected",
          cause: "health_check",
          failures: 2,
          detail: "Connect: ECONNREFUSED"
        })
      ])
      expect((yield* replica.status).ejectedAt).toBe(2_000)

      // Probes go on while ejected; a failed one in between starts the count of good ones again.
      yield* TestClock.adjust(1_000)
      expect(probes("/health")).toBe(3)
      up = true
      yield* TestClock.adjust(2_000)
      expect(replica.available()).toBe(false)
      up = false
      yield* TestClock.adjust(1_000)
      up = true
      yield* TestClock.adjust(2_000)
      expect(replica.available()).toBe(false)
      yield* TestClock.adjust(1_000)
      expect(probes("/health")).toBe(9)
      expect(replica.available()).toBe(true)
      expect(events[1]).toEqual(
        expect.objectContaining({ _tag: "BackendRestored", model: "m", gateway: "gw-test", probes: 3 })
      )
      // Ejected at 2 000, restored at 9 000.
      expect((events[1] as BackendEvents.BackendRestored).ejectedForMs).toBe(7_000)
      expect(yield* replica.status).toMatchObject({ health: "healthy", ejectedAt: null, lastCheckOk: true })
    })
  )

  it.scoped("a non-2xx health answer is a failed check", () =>
    Effect.gen(function* () {
      const { replica, events } = yield* setup({ health: { interval_ms: 500, unhealthy_threshold: 1 } })
      const { upstream } = fakeUpstream({ health: () => ({ status: 503, body: "loading" }) })
      yield* Effect.forkScoped(replica.run(upstream))
      yield* TestClock.adjust(500)
      expect(replica.available()).toBe(false)
      expect(events).toEqual([
        expect.objectContaining({ cause: "health_check", failures: 1, detail: "GET /health: HTTP 503" })
      ])
    })
  )

  it.scoped("with active false, healthy replicas are not probed but ejected ones are", () =>
    Effect.gen(function* () {
      const { replica, events } = yield* setup({
        health: {
          active: false,
          path: "/v1/models",
          interval_ms: 1_000,
          healthy_threshold: 2,
          eject_after_failures: 2
        }
      })
      let up = true
      const { upstream, probes } = fakeUpstream({ health: () => (up ? { status: 200, body: "" } : timeout) })
      yield* Effect.forkScoped(replica.run(upstream))
      yield* TestClock.adjust(10_000)
      expect(probes("/v1/models")).toBe(0)

      up = false
      yield* calls(replica, [connect, connect])
      expect(replica.available()).toBe(false)
      yield* TestClock.adjust(3_000)
      expect(probes("/v1/models")).toBe(3)
      expect(replica.available()).toBe(false)
      up = true
      yield* TestClock.adjust(2_000)
      expect(probes("/v1/models")).toBe(5)
      expect(replica.available()).toBe(true)
      expect(tags(events)).toEqual(["BackendEjected", "BackendRestored"])
      expect(events[1]).toMatchObject({ probes: 2, ejectedForMs: 15_000 - 10_000 })

      // Healthy again: no more probes.
      yield* TestClock.adjust(10_000)
      expect(probes("/v1/models")).toBe(5)
    })
  )
})

describe("Replica circuit breaker", () => {
  it.effect("transitions reach the journal in order: opened, half-opened after the cooldown, closed", () =>
    Effect.gen(function* () {
      const { replica, events } = yield* setup({
        circuit_breaker: { consecutive_failures: 3, cooldown_ms: 5_000, successes_to_close: 2 },
        health: { eject_after_failures: 0 }
      })
      yield* calls(replica, [http(500), timeout, http(502)])
      expect(events).toEqual([
        expect.objectContaining({
          _tag: "CircuitOpened",
          model: "m",
          gateway: "gw-test",
          from: "closed",
          cause: "consecutive_failures",
          failures: 3,
          cooldownMs: 5_000
        })
      ])
      // Open: refused without a call.
      yield* TestClock.adjust(4_999)
      expect(yield* Effect.flip(replica.begin())).toMatchObject({ _tag: "BreakerOpen", state: "open" })
      expect(replica.inFlight).toBe(0)
      expect(tags(events)).toEqual(["CircuitOpened"])

      yield* TestClock.adjust(1)
      const probe = yield* replica.begin()
      expect(tags(events)).toEqual(["CircuitOpened", "CircuitHalfOpened"])
      // One probe at a time.
      expect(yield* Effect.flip(replica.begin())).toMatchObject({ _tag: "BreakerOpen", state: "half_open" })
      yield* probe.succeed
      expect(tags(events)).toEqual(["CircuitOpened", "CircuitHalfOpened"])
      yield* call(replica)
      expect(events.slice(1)).toEqual([
        expect.objectContaining({ _tag: "CircuitHalfOpened", model: "m", gateway: "gw-test" }),
        expect.objectContaining({ _tag: "CircuitClosed", model: "m", gateway: "gw-test", successes: 2 })
      ])
      expect((yield* replica.status).breaker.state).toBe("closed")
    })
  )

  it.effect("a failed probe re-opens it (probe_failed) with a longer cooldown", () =>
    Effect.gen(function* () {
      const { replica, events } = yield* setup({
        circuit_breaker: { consecutive_failures: 1, cooldown_ms: 1_000, cooldown_factor: 2 },
        health: { eject_after_failures: 0 }
      })
      yield* call(replica, http(500))
      yield* TestClock.adjust(1_000)
      yield* call(replica, http(500))
      expect(events).toEqual([
        expect.objectContaining({ _tag: "CircuitOpened", cause: "consecutive_failures", cooldownMs: 1_000 }),
        expect.objectContaining({ _tag: "CircuitHalfOpened" }),
        expect.objectContaining({ _tag: "CircuitOpened", from: "half_open", cause: "probe_failed" })
      ])
      expect((events[2] as BackendEvents.CircuitOpened).cooldownMs).toBe(2_000)
    })
  )
})

describe("Replica queue metrics", () => {
  const metricsText = (waiting: number, running: number) =>
    [
      "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.",
      "# TYPE vllm:num_requests_waiting gauge",
      `vllm:num_requests_waiting{model_name="x"} ${waiting}`,
      `vllm:num_requests_waiting_total{model_name="x"} 1000`,
      "# TYPE vllm:num_requests_running gauge",
      `vllm:num_requests_running{model_name="x"} ${running}`,
      ""
    ].join("\n")

  it.scoped("the scrape sets queueDepth from vllm:num_requests_waiting, every interval", () =>
    Effect.gen(function* () {
      const { replica } = yield* setup({
        health: { active: false },
        queue_metrics: { interval_ms: 1_000, timeout_ms: 300 }
      })
      let answer: ProbeResult | Errors.BackendError = { status: 200, body: metricsText(7, 3) }
      const { upstream, probes } = fakeUpstream({ metrics: () => answer })
      expect(replica.queueDepth).toBeUndefined()
      yield* Effect.forkScoped(replica.run(upstream))
      yield* TestClock.adjust(0)
      expect(probes("/metrics")).toBe(1)
      expect(replica.queueDepth).toBe(7)
      expect(yield* replica.status).toMatchObject({ queueWaiting: 7, queueRunning: 3 })

      answer = { status: 200, body: metricsText(2, 5) }
      yield* TestClock.adjust(999)
      expect(replica.queueDepth).toBe(7)
      yield* TestClock.adjust(1)
      expect(replica.queueDepth).toBe(2)
      expect(yield* replica.status).toMatchObject({ queueWaiting: 2, queueRunning: 5 })

      // A failed scrape forgets the old values rather than steering by stale ones.
      answer = timeout
      yield* TestClock.adjust(1_000)
      expect(replica.queueDepth).toBeUndefined()
      answer = { status: 200, body: metricsText(4, 1) }
      yield* TestClock.adjust(1_000)
      expect(replica.queueDepth).toBe(4)
      answer = { status: 404, body: "not found" }
      yield* TestClock.adjust(1_000)
      expect(yield* replica.status).toMatchObject({ queueWaiting: null, queueRunning: null })
      expect(probes("/metrics")).toBe(5)
      expect(probes("/health")).toBe(0)
    })
  )

  it("metricSum sums the labelled series of one metric and ignores metrics that share its prefix", () => {
    const text = [
      "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.",
      "# TYPE vllm:num_requests_waiting gauge",
      'vllm:num_requests_waiting{engine="0",model_name="x"} 3.0',
      'vllm:num_requests_waiting{engine="1",model_name="x"} 4',
      'vllm:num_requests_waiting_total{model_name="x"} 1000',
      'vllm:num_requests_waiting_by_reason{reason="capacity"} 50',
      'other{name="vllm:num_requests_waiting"} 9',
      "vllm:num_requests_running 2",
      "vllm:num_requests_running_seconds 77"
    ].join("\n")
    expect(metricSum(text, "vllm:num_requests_waiting")).toBe(7)
    expect(metricSum(text, "vllm:num_requests_running")).toBe(2)
    expect(metricSum(text, "vllm:num_requests_swapped")).toBeUndefined()
    expect(metricSum("vllm:num_requests_waiting_total 5\n", "vllm:num_requests_waiting")).toBeUndefined()
    // At the very start and at the very end of the text, without a newline.
    expect(metricSum('vllm:num_requests_waiting{a="b c"} 12', "vllm:num_requests_waiting")).toBe(12)
    // An optional timestamp after the value, and tabs as separators.
    expect(
      metricSum('vllm:num_requests_waiting{model_name="x"} 7 1700000000000\n', "vllm:num_requests_waiting")
    ).toBe(7)
    expect(metricSum('vllm:num_requests_waiting{model_name="x"}\t5\n', "vllm:num_requests_waiting")).toBe(5)
    expect(metricSum("vllm:num_requests_waiting\t6\n", "vllm:num_requests_waiting")).toBe(6)
  })
})
