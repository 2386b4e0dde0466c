/**
 * What clients see, under concurrent load, when backend replicas fail: a replica that refuses
 * connections, one that fails half of its requests, a model whose every replica is down, replicas
 * that hang before the first token, streams that break off, and streams whose first event is an
 * error. Each scenario runs against a real gateway process in front of real simulators and checks
 * the answers (status, routing headers, bodies), the events of every request (`request-<id>`), the
 * events of the replicas (`backend-<id>`) and `GET /admin/backends`.
 *
 * One gateway serves every scenario, each on models and replicas of its own (breaker and health
 * state are per replica), backed by shared simulators that each test reconfigures for its scope.
 */
import { expect, layer } from "@effect/vitest"
import type { SimServer } from "@gateway/backend-sim"
import { Context, Effect, Layer } from "effect"
import OpenAI from "openai"
import * as Admin from "./support/Admin.js"
import * as Chaos from "./support/Chaos.js"
import * as EventLog from "./support/EventLog.js"
import * as Processes from "./support/Processes.js"

/** The prompt of the requests sent with the OpenAI SDK. */
const messages = [{ role: "user" as const, content: "Say something about gateways." }]
/** Tokens of every answer of the simulators. */
const outputTokens = 8
/** Time to first token allowed on `stall` and `slow`. */
const firstByteMs = 300
/** How long the breaker of `flaky` stays open. */
const cooldownMs = 2000

/** A breaker that never opens: scenarios about retries see every attempt. */
/** The longest silence between two chunks the `sluggish` model allows. */
const idleMs = 300

const breakerOff = { consecutive_failures: 1_000_000, minimum_requests: 1_000_000 }

/** What every gateway of this file shares: retries, ejections and probes, quick enough to test. */
const base = {
  server: { host: "127.0.0.1" },
  timeouts: { connect_ms: 1000, first_byte_ms: 5000, total_ms: 20_000 },
  metering: { drain_after_disconnect_ms: 200 },
  pool: {
    balancer: "round_robin",
    circuit_breaker: breakerOff,
    retry: { max_attempts: 3, base_delay_ms: 10, max_delay_ms: 100, deadline_ms: 10_000 },
    // Healthy replicas are not checked, so an ejection is the requests' doing; ejected ones are
    // probed every 200 ms and restored after two good probes.
    health: {
      active: false,
      interval_ms: 200,
      timeout_ms: 500,
      healthy_threshold: 2,
      eject_after_failures: 3
    }
  }
}

const gatewayConfig = (urls: {
  readonly faulty: string
  readonly healthy: string
  readonly small: string
  readonly refusing: string
  readonly dead: readonly [string, string]
}) => ({
  ...base,
  models: [
    {
      name: "refuse",
      // Round-robin keeps sending it requests until they eject it (p2c would soon weigh it as
      // slow and mostly leave it alone: fewer retries, but a slower ejection without checks).
      backends: [
        { id: "refuse-a", url: urls.refusing },
        { id: "refuse-b", url: urls.healthy }
      ]
    },
    {
      name: "flaky",
      circuit_breaker: {
        consecutive_failures: 3,
        failure_rate: 0.5,
        minimum_requests: 10,
        window_ms: 10_000,
        cooldown_ms: cooldownMs,
        cooldown_factor: 1,
        half_open_probes: 1,
        successes_to_close: 2
      },
      backends: [
        { id: "flaky-a", url: urls.faulty },
        { id: "flaky-b", url: urls.healthy }
      ]
    },
    {
      name: "large",
      fallbacks: ["small"],
      backends: [
        { id: "large-1", url: urls.dead[0] },
        { id: "large-2", url: urls.dead[1] }
      ]
    },
    { name: "small", backends: [{ id: "small-1", url: urls.small }] },
    {
      name: "stall",
      timeouts: { first_byte_ms: firstByteMs },
      backends: [
        { id: "stall-a", url: urls.faulty },
        { id: "stall-b", url: urls.healthy }
      ]
    },
    {
      name: "slow",
      timeouts: { first_byte_ms: firstByteMs },
      backends: [
        { id: "slow-a", url: urls.faulty },
        { id: "slow-b", url: urls.healthy }
      ]
    },
    { name: "brittle", backends: [{ id: "brittle-1", url: urls.faulty }] },
    { name: "sluggish", timeouts: { idle_ms: idleMs }, backends: [{ id: "sluggish-1", url: urls.faulty }] },
    {
      name: "doomed",
      retry: { max_attempts: 2 },
      backends: [
        { id: "doomed-1", url: urls.faulty },
        { id: "doomed-2", url: urls.healthy }
      ]
    }
  ]
})

class Stack extends Context.Tag("test/Resilience/Stack")<
  Stack,
  {
    readonly gateway: Processes.Gateway
    readonly adminKey: string
    /** The replica each scenario makes fail. */
    readonly faulty: Processes.Sim
    /** The replica that keeps answering. */
    readonly healthy: Processes.Sim
    /** `refuse-a`: refuses connections until told otherwise. */
    readonly refusing: SimServer.SimServer
    /** The gateway's database. */
    readonly log: EventLog.EventLog
  }
>() {
  static readonly layer = Layer.scoped(
    Stack,
    Effect.gen(function* () {
      const free = Processes.freePort
      // Six different ports (a port just released could be handed out twice).
      const ports = yield* Effect.all({
        faulty: free,
        healthy: free,
        small: free,
        refusing: free,
        dead1: free,
        dead2: free
      }).pipe(Effect.repeat({ until: (p) => new Set(Object.values(p)).size === 6 }))
      const url = (port: number) => `http://127.0.0.1:${port}`
      const refusing = yield* Chaos.inProcessSim({
        port: ports.refusing,
        model: "refuse",
        ttftMs: 5,
        itlMs: 2,
        outputTokens,
        refuseConnections: true
      })
      const adminKey = Admin.newAdminKey()
      const sim = (port: number, model: string, seed: number) =>
        Processes.startSim({ port, model, ttftMs: 5, itlMs: 2, outputTokens, seed })
      // `small` runs for the scope; the tests only reach it through the gateway.
      const [faulty, healthy, , gateway] = yield* Effect.all(
        [
          sim(ports.faulty, "faulty", 1),
          sim(ports.healthy, "healthy", 2),
          sim(ports.small, "small", 3),
          Processes.startGateway(
            gatewayConfig({
              faulty: url(ports.faulty),
              healthy: url(ports.healthy),
              small: url(ports.small),
              refusing: url(ports.refusing),
              dead: [url(ports.dead1), url(ports.dead2)]
            }),
            { ADMIN_KEY: adminKey }
          )
        ],
        { concurrency: "unbounded" }
      )
      const log = yield* EventLog.make(gateway.databaseUrl)
      return { gateway, adminKey, faulty, healthy, refusing, log }
    })
  )
}

// ---------------------------------------------------------------------------------------------
// What every answer and its events must say
// ---------------------------------------------------------------------------------------------

/** A whole answer: a chat completion, or a stream of chunks that ended with `[DONE]`. */
const expectWhole = (answer: Chaos.Answer, model: string) => {
  expect({ status: answer.status, body: answer.json ?? answer.events }).toMatchObject({ status: 200 })
  if (answer.stream) {
    expect(answer.done).toBe(true)
    expect(answer.events.filter((e) => e.error !== undefined)).toEqual([])
    expect(answer.events.every((e) => e.object === "chat.completion.chunk" && e.model === model)).toBe(true)
    expect(Chaos.streamedText(answer.events).split(" ")).toHaveLength(outputTokens)
  } else {
    expect(answer.json).toMatchObject({ object: "chat.completion", model })
    expect(answer.json.choices[0].message.content.split(" ")).toHaveLength(outputTokens)
  }
}

const ofType = (events: ReadonlyArray<Chaos.Stored>, type: string) => events.filter((e) => e.type === type)

/**
 * The events of a request that got its answer, possibly after failed attempts: received, then per
 * attempt routed + started (+ failed, before the first byte, retryable), then completed; each
 * attempt after a failure routed elsewhere; and the story matches the answer's headers.
 */
const expectAnsweredEvents = (answer: Chaos.Answer, events: ReadonlyArray<Chaos.Stored>) => {
  const started = ofType(events, "AttemptStarted")
  const n = started.length
  expect(n).toBeGreaterThanOrEqual(1)
  expect(events.map((e) => e.type)).toEqual([
    "RequestReceived",
    ...started.flatMap((_, i) =>
      i < n - 1 ? ["RequestRouted", "AttemptStarted", "AttemptFailed"] : ["RequestRouted", "AttemptStarted"]
    ),
    "RequestCompleted"
  ])
  const routed = ofType(events, "RequestRouted")
  const failed = ofType(events, "AttemptFailed")
  expect(started.map((e) => e.data.attempt)).toEqual(started.map((_, i) => i + 1))
  expect(started.map((e) => e.data.backend)).toEqual(routed.map((e) => e.data.backend))
  expect(["requested", "fallback"]).toContain(routed[0]!.data.why)
  failed.forEach((failure, i) => {
    expect(failure.data).toMatchObject({
      attempt: i + 1,
      backend: started[i]!.data.backend,
      retryable: true,
      afterFirstByte: false
    })
    // The next attempt went elsewhere: another replica of the model, or another model.
    const next = routed[i + 1]!.data
    expect(next.backend).not.toBe(failure.data.backend)
    expect(next.why).toBe(next.model === routed[i]!.data.model ? "retry" : "fallback")
  })
  const completed = ofType(events, "RequestCompleted")[0]!.data
  expect(completed).toMatchObject({
    model: answer.model,
    backend: answer.backend,
    stream: answer.stream,
    status: 200,
    attempts: n
  })
  expect(started[n - 1]!.data.backend).toBe(answer.backend)
  expect(answer.attempts).toBe(n > 1 ? String(n) : null)
}

/** Answers whose request failed an attempt on `backend` (with the events of each). */
const failedOn = (
  answers: ReadonlyArray<Chaos.Answer>,
  byId: ReadonlyMap<string, ReadonlyArray<Chaos.Stored>>,
  backend: string
) =>
  answers.flatMap((answer) => {
    const events = byId.get(answer.id) ?? []
    const failures = ofType(events, "AttemptFailed").filter((e) => e.data.backend === backend)
    return failures.length === 0 ? [] : [{ answer, events, failures }]
  })

/** The first attempt failed on `from` for `reason`; the retry went to `to`, which answered. */
const expectRetried = (
  events: ReadonlyArray<Chaos.Stored>,
  expected: { readonly from: string; readonly to: string; readonly reason: string }
) => {
  expect(events.slice(1, 6).map((e) => [e.type, e.data.backend])).toEqual([
    ["RequestRouted", expected.from],
    ["AttemptStarted", expected.from],
    ["AttemptFailed", expected.from],
    ["RequestRouted", expected.to],
    ["AttemptStarted", expected.to]
  ])
  expect(events[3]!.data.error.reason).toBe(expected.reason)
  expect(events[4]!.data).toMatchObject({ why: "retry" })
  expect(events[4]!.data.detail).toContain(`${expected.reason}`)
  expect(events[4]!.data.detail).toContain(expected.from)
}

/** The circuit events of a replica follow the breaker's state machine; returns the end state. */
const circuitWalk = (events: ReadonlyArray<Chaos.Stored>): string => {
  let state = "closed"
  for (const event of events.filter((e) => e.type.startsWith("Circuit"))) {
    const at = `${event.type} while ${state}`
    switch (event.type) {
      case "CircuitOpened":
        expect(state, at).not.toBe("open")
        expect(event.data.from, at).toBe(state)
        state = "open"
        break
      case "CircuitHalfOpened":
        expect(state, at).toBe("open")
        state = "half_open"
        break
      case "CircuitClosed":
        expect(state, at).toBe("half_open")
        state = "closed"
        break
    }
  }
  return state
}

const ids = (answers: ReadonlyArray<Chaos.Answer>) => answers.map((a) => a.id)

/**
 * A client that lost its connection says why: with what the gateway wrote to stderr when it died
 * (it is given a second to do so).
 */
const orCrashOf =
  (gateway: Processes.Gateway) =>
  <A, E, R>(self: Effect.Effect<A, E, R>): Effect.Effect<A, E, R> =>
    Effect.catchAllDefect(self, (defect) =>
      Effect.promise(() => gateway.child.exited).pipe(
        Effect.timeoutOption("1 second"),
        Effect.zipRight(
          Effect.suspend(() =>
            Effect.dieMessage(
              gateway.child.exitCode() === undefined
                ? String(defect)
                : `the gateway exited with code ${gateway.child.exitCode()} (client: ${String(defect)}):\n${gateway.child.stderr.join("\n")}`
            )
          )
        )
      )
    )

// ---------------------------------------------------------------------------------------------
// The scenarios
// ---------------------------------------------------------------------------------------------

layer(Stack.layer, { excludeTestServices: true })("the gateway under backend failures", (it) => {
  it.scoped(
    "a replica that refuses connections costs clients nothing; it is ejected, then restored by the probes",
    () =>
      Effect.gen(function* () {
        const { gateway, adminKey, healthy, refusing, log } = yield* Stack
        yield* healthy.withConfig({ model: "refuse" })

        const answers = yield* Chaos.load(gateway.url, "refuse", { n: 48, concurrency: 12 })
        for (const answer of answers) expectWhole(answer, "refuse")
        expect(Chaos.countByBackend(answers)).toEqual({ "refuse-b": 48 })
        const byId = yield* Chaos.settledEvents(log, ids(answers))
        for (const answer of answers) expectAnsweredEvents(answer, byId.get(answer.id)!)
        const retried = failedOn(answers, byId, "refuse-a")
        // It takes three failed connections to eject it; concurrent requests may add a few.
        expect(retried.length).toBeGreaterThanOrEqual(3)
        for (const { events } of retried) {
          expectRetried(events, { from: "refuse-a", to: "refuse-b", reason: "Connect" })
        }

        const ejected = yield* Chaos.awaitBackendEvent(log, "refuse-a", "BackendEjected", (events) =>
          events.some((e) => e.type === "BackendEjected")
        )
        expect(ejected.map((e) => e.type)).toEqual(["BackendEjected"])
        expect(ejected[0]!.data).toMatchObject({
          model: "refuse",
          cause: "request_failures",
          failures: 3,
          detail: expect.stringMatching(/^Connect: .*ECONNREFUSED/)
        })
        const whileOut = yield* Chaos.adminBackends(gateway.url, adminKey)
        expect(whileOut.get("refuse-a")).toMatchObject({ health: "ejected", last_error: expect.any(String) })
        expect(whileOut.get("refuse-b")).toMatchObject({ health: "healthy", circuit: { state: "closed" } })

        // Back: two good probes 200 ms apart restore it.
        const backAt = performance.now()
        yield* Effect.promise(() => refusing.setRefusing(false))
        const restored = yield* Chaos.awaitBackendEvent(log, "refuse-a", "BackendRestored", (events) =>
          events.some((e) => e.type === "BackendRestored")
        )
        expect(performance.now() - backAt).toBeLessThan(3000)
        expect(restored.map((e) => e.type)).toEqual(["BackendEjected", "BackendRestored"])
        expect(restored[1]!.data).toMatchObject({ model: "refuse", probes: 2 })
        expect(restored[1]!.data.ejectedForMs).toBeGreaterThan(0)
        expect((yield* Chaos.adminBackends(gateway.url, adminKey)).get("refuse-a")?.health).toBe("healthy")

        const after = yield* Chaos.load(gateway.url, "refuse", { n: 48, concurrency: 16 })
        for (const answer of after) expectWhole(answer, "refuse")
        expect(after.every((a) => a.attempts === null)).toBe(true)
        expect(Chaos.countByBackend(after)["refuse-a"]).toBeGreaterThan(0)
      })
  )

  it.scoped(
    "a replica failing half of its requests: clients never notice, its breaker opens, half-opens, and closes once it heals",
    () =>
      Effect.gen(function* () {
        const { gateway, adminKey, faulty, healthy, log } = yield* Stack
        yield* healthy.withConfig({ model: "flaky" })
        yield* faulty.withConfig({ model: "flaky", errorRate: 0.5, errorStatus: 500, seed: 7 })
        const backends = Chaos.adminBackends(gateway.url, adminKey)

        const answers = yield* Chaos.load(gateway.url, "flaky", { n: 60, concurrency: 12 })
        for (const answer of answers) expectWhole(answer, "flaky")
        const byId = yield* Chaos.settledEvents(log, ids(answers))
        for (const answer of answers) expectAnsweredEvents(answer, byId.get(answer.id)!)
        const retried = failedOn(answers, byId, "flaky-a")
        expect(retried.length).toBeGreaterThan(0)
        for (const { answer, events, failures } of retried) {
          expect(failures.map((f) => f.data.error)).toEqual([
            { reason: "Http", status: 500, message: "HTTP 500" }
          ])
          expectRetried(events, { from: "flaky-a", to: "flaky-b", reason: "Http" })
          expect(answer).toMatchObject({ backend: "flaky-b", attempts: "2" })
        }

        // It opened within its thresholds: three failures in a row, or half of ten calls or more.
        const opened = yield* Chaos.awaitBackendEvent(log, "flaky-a", "CircuitOpened", (events) =>
          events.some((e) => e.type === "CircuitOpened")
        )
        const first = opened.find((e) => e.type === "CircuitOpened")!.data
        expect(first).toMatchObject({ model: "flaky", from: "closed", cooldownMs })
        if (first.cause === "consecutive_failures") expect(first.failures).toBe(3)
        else {
          expect(first.cause).toBe("failure_rate")
          expect(first.requests).toBeGreaterThanOrEqual(10)
          expect(first.failures).toBeGreaterThanOrEqual(first.requests / 2)
        }

        // Caught at the start of an open period (a request now and then, so half-open probes run).
        const open = yield* Processes.eventually(
          "flaky-a's circuit open with most of its cooldown ahead",
          Effect.gen(function* () {
            const view = (yield* backends).get("flaky-a")!
            if (view.circuit.state === "open" && view.circuit.retry_after_ms >= cooldownMs - 800) return view
            yield* Chaos.chat(gateway.url, "flaky", false)
            return undefined
          }),
          "15 seconds"
        )
        expect(open).toMatchObject({ health: "healthy", circuit: { state: "open" } })
        expect(open.circuit.opens).toBeGreaterThanOrEqual(1)
        expect(open.failures).toBeGreaterThan(0)
        expect((yield* backends).get("flaky-b")?.circuit.state).toBe("closed")
        // While open, every request goes to flaky-b at the first attempt, and none reaches flaky-a.
        const before = yield* faulty.stats
        const whileOpen = yield* Chaos.load(gateway.url, "flaky", { n: 24, concurrency: 12 })
        const after = yield* faulty.stats
        expect((yield* backends).get("flaky-a")?.circuit.state).toBe("open")
        for (const answer of whileOpen) expectWhole(answer, "flaky")
        expect(Chaos.countByBackend(whileOpen)).toEqual({ "flaky-b": 24 })
        expect(whileOpen.every((a) => a.attempts === null)).toBe(true)
        expect(after.requests).toBe(before.requests)

        // Healed: after the cooldown it half-opens, and two good probes close it.
        yield* faulty.withConfig({ errorRate: 0 })
        yield* Processes.eventually(
          "flaky-a's circuit half-open after its cooldown",
          Effect.map(backends, (all) =>
            all.get("flaky-a")?.circuit.state === "half_open" ? true : undefined
          ),
          `${(cooldownMs + 2000) / 1000} seconds`
        )
        yield* Processes.eventually(
          "flaky-a's circuit closed by its probes",
          Effect.gen(function* () {
            const answer = yield* Chaos.chat(gateway.url, "flaky", true)
            expectWhole(answer, "flaky")
            return (yield* backends).get("flaky-a")?.circuit.state === "closed" ? true : undefined
          }),
          "5 seconds"
        )
        const circuit = yield* Chaos.awaitBackendEvent(log, "flaky-a", "CircuitClosed", (events) =>
          events.some((e) => e.type === "CircuitClosed")
        )
        expect(circuitWalk(circuit)).toBe("closed")
        expect(circuit.slice(-3).map((e) => e.type)).toEqual([
          "CircuitOpened",
          "CircuitHalfOpened",
          "CircuitClosed"
        ])
        expect(circuit.at(-1)!.data).toMatchObject({ model: "flaky", successes: 2 })
        for (const reopened of circuit.filter(
          (e) => e.type === "CircuitOpened" && e.data.from === "half_open"
        )) {
          expect(reopened.data).toMatchObject({ cause: "probe_failed", cooldownMs })
        }

        const healed = yield* Chaos.load(gateway.url, "flaky", { n: 16, concurrency: 8 })
        for (const answer of healed) expectWhole(answer, "flaky")
        expect(Chaos.countByBackend(healed)["flaky-a"]).toBeGreaterThan(0)
      })
  )

  it.effect(
    "every replica of a model down: its fallback answers, streamed or not, and says so in headers and events",
    () =>
      Effect.gen(function* () {
        const { gateway, log } = yield* Stack
        const answers = yield* Chaos.load(gateway.url, "large", { n: 40, concurrency: 10 })
        for (const answer of answers) {
          expectWhole(answer, "small")
          expect(answer).toMatchObject({ model: "small", fallback: "large", backend: "small-1" })
        }
        const byId = yield* Chaos.settledEvents(log, ids(answers))
        for (const answer of answers) {
          const events = byId.get(answer.id)!
          expectAnsweredEvents(answer, events)
          expect(events[0]!.data).toMatchObject({ model: "large", stream: answer.stream })
          const routed = ofType(events, "RequestRouted")
          expect(routed.at(-1)!.data).toMatchObject({ model: "small", backend: "small-1", why: "fallback" })
          expect(routed.at(-1)!.data.detail).toMatch(/^large: .*(Connect|ejected)/)
          for (const failure of ofType(events, "AttemptFailed")) {
            expect(["large-1", "large-2"]).toContain(failure.data.backend)
            expect(failure.data.error.reason).toBe("Connect")
          }
          expect(ofType(events, "RequestCompleted")[0]!.data).toMatchObject({
            model: "small",
            backend: "small-1"
          })
        }
        // Once both are ejected, requests go straight to the fallback.
        for (const id of ["large-1", "large-2"]) {
          const ejected = yield* Chaos.awaitBackendEvent(log, id, "BackendEjected", (events) =>
            events.some((e) => e.type === "BackendEjected")
          )
          expect(ejected[0]!.data).toMatchObject({ model: "large", cause: "request_failures" })
        }
        const direct = yield* Chaos.chat(gateway.url, "large", false)
        expect(direct).toMatchObject({ status: 200, model: "small", fallback: "large", attempts: null })
        const directEvents = (yield* Chaos.settledEvents(log, [direct.id])).get(direct.id)!
        expect(directEvents.map((e) => e.type)).toEqual([
          "RequestReceived",
          "RequestRouted",
          "AttemptStarted",
          "RequestCompleted"
        ])
        expect(directEvents[1]!.data.detail).toMatch(/^large: .*large-1: ejected; large-2: ejected/)

        // The same through the OpenAI SDK.
        const client = new OpenAI({ baseURL: `${gateway.url}/v1`, apiKey: "unused", maxRetries: 0 })
        const whole = yield* Effect.promise(() =>
          client.chat.completions.create({ model: "large", messages }).withResponse()
        )
        expect(whole.data.model).toBe("small")
        expect(whole.response.headers.get("x-gateway-fallback")).toBe("large")
        expect(whole.response.headers.get("x-gateway-model")).toBe("small")
        const streamed = yield* Effect.promise(async () => {
          const { data, response } = await client.chat.completions
            .create({ model: "large", messages, stream: true })
            .withResponse()
          const chunks = []
          for await (const chunk of data) chunks.push(chunk)
          return { chunks, headers: response.headers }
        })
        expect(streamed.headers.get("x-gateway-fallback")).toBe("large")
        expect(streamed.chunks.length).toBeGreaterThan(outputTokens)
        expect(streamed.chunks.every((c) => c.model === "small")).toBe(true)

        // The audit trail (request_log) says what was asked for, what answered, and the calls it took.
        yield* log.caughtUp("10 seconds")
        const audited = yield* log.query<{
          request_id: string
          requested_model: string
          model: string
          backend: string
          attempts: number
          outcome: string
        }>(
          "SELECT request_id, requested_model, model, backend, attempts, outcome FROM request_log WHERE request_id = ANY($1)",
          [[...ids(answers), direct.id]]
        )
        expect(audited).toHaveLength(answers.length + 1)
        for (const row of audited) {
          expect(row).toMatchObject({
            requested_model: "large",
            model: "small",
            backend: "small-1",
            outcome: "completed"
          })
          const events = row.request_id === direct.id ? directEvents : byId.get(row.request_id)!
          expect(row.attempts).toBe(ofType(events, "AttemptStarted").length)
        }
      })
  )

  const stalls = [
    {
      name: "hangs before its headers",
      model: "stall",
      fault: { hangRate: 1 }
    },
    {
      name: "sends its headers but the first token late",
      model: "slow",
      fault: { slowFirstTokenRate: 1, slowFirstTokenMs: 5000 }
    }
  ] as const

  it.scoped.each(stalls)(
    "a replica that $name times out at first_byte_ms and the request is answered elsewhere in time",
    ({ model, fault }) =>
      Effect.gen(function* () {
        const { gateway, faulty, healthy, log } = yield* Stack
        yield* healthy.withConfig({ model })
        yield* faulty.withConfig({ model, ...fault })
        const answers = yield* Chaos.load(gateway.url, model, { n: 32, concurrency: 8 })
        for (const answer of answers) {
          expectWhole(answer, model)
          expect(answer.backend).toBe(`${model}-b`)
          // One timeout, a short backoff and a fast answer: well within first_byte_ms + 1 s.
          expect(answer.elapsedMs).toBeLessThan(firstByteMs + 1000)
        }
        const byId = yield* Chaos.settledEvents(log, ids(answers))
        for (const answer of answers) expectAnsweredEvents(answer, byId.get(answer.id)!)
        const retried = failedOn(answers, byId, `${model}-a`)
        expect(retried.length).toBeGreaterThanOrEqual(3)
        for (const { answer, events, failures } of retried) {
          expect(failures.map((f) => f.data.error)).toEqual([
            { reason: "Timeout", message: `no first token within ${firstByteMs} ms` }
          ])
          expectRetried(events, { from: `${model}-a`, to: `${model}-b`, reason: "Timeout" })
          expect(answer.elapsedMs).toBeGreaterThanOrEqual(firstByteMs - 20)
        }
        // Timeouts count as the replica being unreachable: three in a row eject it.
        const ejected = yield* Chaos.awaitBackendEvent(log, `${model}-a`, "BackendEjected", (events) =>
          events.some((e) => e.type === "BackendEjected")
        )
        expect(ejected[0]!.data).toMatchObject({ model, cause: "request_failures", failures: 3 })
        expect(ejected[0]!.data.detail).toMatch(/^Timeout: /)
        // The gateway let go of every attempt it gave up on.
        yield* Processes.eventually(
          "the faulty replica holds no request",
          Effect.map(faulty.stats, (s) => (s.hanging === 0 && s.running === 0 ? true : undefined))
        )
      })
  )

  it.scoped(
    "a stream that breaks after its first chunks ends with one error event, is recorded as failed after the first byte, and is not retried",
    () =>
      Effect.gen(function* () {
        const { gateway, adminKey, faulty, log } = yield* Stack
        yield* faulty.withConfig({ model: "brittle", breakAfterChunks: 3 })
        const before = yield* faulty.stats
        const answers = yield* Chaos.load(gateway.url, "brittle", {
          n: 40,
          concurrency: 10,
          stream: (i) => i % 4 !== 3
        })
        const streams = answers.filter((a) => a.stream)
        for (const answer of answers.filter((a) => !a.stream)) expectWhole(answer, "brittle")
        for (const answer of streams) {
          expect(answer).toMatchObject({ status: 200, backend: "brittle-1", done: false })
          // Ended promptly: no hang waiting for a backend that is gone.
          expect(answer.elapsedMs).toBeLessThan(3000)
          expect(Chaos.streamedText(answer.events).split(" ")).toHaveLength(3)
          const errors = answer.events.filter((e) => e.error !== undefined)
          expect(errors).toHaveLength(1)
          expect(answer.events.at(-1)).toBe(errors[0])
          expect(errors[0].error).toMatchObject({
            code: "backend_stream_broken",
            type: "api_error",
            message: expect.any(String)
          })
        }
        const after = yield* faulty.stats
        // One backend call per request: a broken stream is not retried.
        expect(after.requests - before.requests).toBe(answers.length)
        expect(after.breaksInjected - before.breaksInjected).toBe(streams.length)

        const byId = yield* Chaos.settledEvents(log, ids(answers))
        for (const answer of streams) {
          const events = byId.get(answer.id)!
          expect(events.map((e) => e.type)).toEqual([
            "RequestReceived",
            "RequestRouted",
            "AttemptStarted",
            "AttemptFailed",
            "RequestFailed"
          ])
          expect(events[3]!.data).toMatchObject({
            attempt: 1,
            backend: "brittle-1",
            error: { reason: "StreamBroken" },
            afterFirstByte: true
          })
          const failed = events[4]!.data
          expect(failed).toMatchObject({
            status: 200,
            error: { code: "backend_stream_broken", reason: "StreamBroken" },
            attempts: 1,
            lastBackend: "brittle-1"
          })
          expect(failed.tokensDelivered).toBeGreaterThan(0)
        }
        for (const answer of answers.filter((a) => !a.stream)) {
          expectAnsweredEvents(answer, byId.get(answer.id)!)
        }
        // The replica answers (it only breaks off): it is not ejected, and its failures are counted.
        const view = (yield* Chaos.adminBackends(gateway.url, adminKey)).get("brittle-1")!
        expect(view).toMatchObject({ health: "healthy", circuit: { state: "closed" }, in_flight: 0 })
        expect(view.failures).toBe(streams.length)
        expect(view.last_error).toMatch(/^StreamBroken: /)
        expect(yield* Chaos.backendEvents(log, "brittle-1")).toEqual([])
      })
  )

  it.scoped(
    "a stream that falls silent after its first token ends at idle_ms with one timeout event, recorded as failed after the first byte",
    () =>
      Effect.gen(function* () {
        const { gateway, faulty, log } = yield* Stack
        // The first token comes at once, the next one 5 s later: far past idle_ms.
        yield* faulty.withConfig({ model: "sluggish", itlMs: 5000 })
        const answers = yield* Chaos.load(gateway.url, "sluggish", {
          n: 12,
          concurrency: 6,
          stream: () => true
        })
        for (const answer of answers) {
          expect(answer).toMatchObject({ status: 200, backend: "sluggish-1", done: false })
          // Ended at the idle bound, not when the backend would have gone on.
          expect(answer.elapsedMs).toBeGreaterThanOrEqual(idleMs - 20)
          expect(answer.elapsedMs).toBeLessThan(2500)
          expect(Chaos.streamedText(answer.events).length).toBeGreaterThan(0)
          const errors = answer.events.filter((e) => e.error !== undefined)
          expect(errors).toHaveLength(1)
          expect(answer.events.at(-1)).toBe(errors[0])
          expect(errors[0].error).toMatchObject({ code: "backend_timeout", type: "timeout_error" })
          expect(errors[0].error.message).toContain(`no chunk for ${idleMs} ms`)
        }
        const byId = yield* Chaos.settledEvents(log, ids(answers))
        for (const answer of answers) {
          const events = byId.get(answer.id)!
          expect(events.map((e) => e.type)).toEqual([
            "RequestReceived",
            "RequestRouted",
            "AttemptStarted",
            "AttemptFailed",
            "RequestFailed"
          ])
          expect(events[3]!.data).toMatchObject({ error: { reason: "Timeout" }, afterFirstByte: true })
          expect(events[4]!.data).toMatchObject({ status: 200, error: { reason: "Timeout" }, attempts: 1 })
          expect(events[4]!.data.tokensDelivered).toBeGreaterThan(0)
        }
      })
  )

  it.scoped(
    "an error event as the first event of a stream is retried on the other replica; the client gets a normal stream",
    () =>
      Effect.gen(function* () {
        const { faulty, healthy } = yield* Stack
        // A gateway of its own: this scenario once crashed the process (an unread break).
        const adminKey = Admin.newAdminKey()
        const gateway = yield* Processes.startGateway(
          {
            ...base,
            models: [
              {
                name: "eventful",
                backends: [
                  { id: "eventful-a", url: faulty.url },
                  { id: "eventful-b", url: healthy.url }
                ]
              }
            ]
          },
          { ADMIN_KEY: adminKey }
        )
        const log = yield* EventLog.make(gateway.databaseUrl)
        yield* healthy.withConfig({ model: "eventful" })
        yield* faulty.withConfig({ model: "eventful", errorRate: 1, errorMode: "event", errorStatus: 500 })
        const answers = yield* Chaos.load(gateway.url, "eventful", {
          n: 40,
          concurrency: 10,
          stream: (i) => i % 4 !== 3
        }).pipe(orCrashOf(gateway))
        for (const answer of answers) {
          expectWhole(answer, "eventful")
          expect(answer.backend).toBe("eventful-b")
        }
        const byId = yield* Chaos.settledEvents(log, ids(answers))
        for (const answer of answers) expectAnsweredEvents(answer, byId.get(answer.id)!)
        const retried = failedOn(answers, byId, "eventful-a")
        const retriedStreams = retried.filter((r) => r.answer.stream)
        expect(retriedStreams.length).toBeGreaterThanOrEqual(3)
        for (const { answer, events, failures } of retried) {
          // A whole answer gets the error as its status instead.
          expectRetried(events, {
            from: "eventful-a",
            to: "eventful-b",
            reason: answer.stream ? "StreamError" : "Http"
          })
          expect(failures[0]!.data.error).toMatchObject(
            answer.stream
              ? { reason: "StreamError", message: "Simulated backend error (status 500)" }
              : { reason: "Http", status: 500 }
          )
          expect(answer.attempts).toBe("2")
        }
        // A replica that answers with errors is up: counted as failing, not ejected.
        const view = (yield* Chaos.adminBackends(gateway.url, adminKey)).get("eventful-a")!
        expect(view).toMatchObject({ health: "healthy", requests: retried.length, failures: retried.length })
        expect(yield* Chaos.backendEvents(log, "eventful-a")).toEqual([])
        expect(gateway.child.exitCode()).toBeUndefined()
        expect(gateway.child.stderr).toEqual([])
      })
  )

  it.scoped(
    "when every attempt fails, the client gets the last backend's status in the OpenAI error shape",
    () =>
      Effect.gen(function* () {
        const { gateway, adminKey, faulty, healthy, log } = yield* Stack
        const statusOf: Record<string, number> = { "doomed-1": 500, "doomed-2": 502 }
        yield* faulty.withConfig({ model: "doomed", errorRate: 1, errorStatus: 500 })
        yield* healthy.withConfig({ model: "doomed", errorRate: 1, errorStatus: 502 })
        const answers = yield* Chaos.load(gateway.url, "doomed", { n: 24, concurrency: 8 })
        const byId = yield* Chaos.settledEvents(log, ids(answers))
        for (const answer of answers) {
          const events = byId.get(answer.id)!
          expect(events.map((e) => e.type)).toEqual([
            "RequestReceived",
            "RequestRouted",
            "AttemptStarted",
            "AttemptFailed",
            "RequestRouted",
            "AttemptStarted",
            "AttemptFailed",
            "RequestFailed"
          ])
          const tried = ofType(events, "AttemptStarted").map((e) => e.data.backend)
          expect([...tried].sort()).toEqual(["doomed-1", "doomed-2"])
          const failed = events.at(-1)!.data
          const status = statusOf[tried[1]!]!
          expect(failed).toMatchObject({
            status,
            attempts: 2,
            lastBackend: tried[1],
            error: { code: "injected_error", reason: "Http" }
          })
          expect(answer.status).toBe(status)
          expect(answer.contentType).toMatch(/^application\/json/)
          expect(answer.requestId).toBe(answer.id)
          expect(Object.keys(answer.json)).toEqual(["error"])
          expect(answer.json.error).toEqual({
            message: `Simulated backend error (status ${status})`,
            type: "server_error",
            param: null,
            code: "injected_error"
          })
        }
        // Each replica failed every request once; an error status is not a reason to eject it.
        const views = yield* Chaos.adminBackends(gateway.url, adminKey)
        for (const [id, status] of Object.entries(statusOf)) {
          expect(views.get(id)).toMatchObject({
            health: "healthy",
            requests: answers.length,
            failures: answers.length,
            last_error: `Http: HTTP ${status}`
          })
          expect(yield* Chaos.backendEvents(log, id)).toEqual([])
        }
        // What the OpenAI SDK makes of it: an APIError with the status and the backend's code.
        const client = new OpenAI({ baseURL: `${gateway.url}/v1`, apiKey: "unused", maxRetries: 0 })
        const error = yield* Effect.promise(() =>
          client.chat.completions.create({ model: "doomed", messages }).then(
            () => undefined,
            (e: unknown) => e
          )
        )
        expect(error).toBeInstanceOf(OpenAI.InternalServerError)
        expect(error).toMatchObject({ code: "injected_error", type: "server_error" })
        expect([500, 502]).toContain((error as InstanceType<typeof OpenAI.APIError>).status)
      })
  )

  it.effect(
    "after all of that the gateway still runs, logged no error, and every request is on the books",
    () =>
      Effect.gen(function* () {
        const { gateway, log } = yield* Stack
        expect(gateway.child.exitCode()).toBeUndefined()
        expect(gateway.logs().filter((l) => l.level === "error" || l.level === "fatal")).toEqual([])
        expect(gateway.child.stderr).toEqual([])
        const totals = yield* log.totals
        expect(totals.gapped).toEqual([])
        const unfinished = yield* log.query<{ stream_id: string }>(
          `SELECT stream_id FROM events WHERE stream_id LIKE 'request-%' GROUP BY stream_id
         HAVING NOT bool_or(type IN ('RequestCompleted', 'RequestFailed', 'RequestCancelled', 'RequestRejected'))`
        )
        expect(unfinished).toEqual([])
      })
  )
})
