/**
 * Rate limits and budgets as a client of several gateway replicas sees them: one key's requests
 * and tokens per minute hold exactly across three replicas sharing one Redis, a spend budget is
 * not overspent under concurrent load, concurrency slots come back on every way a request ends,
 * and Redis going away mid-load is answered by the configured policy (a local guard, or 503s) —
 * never by a 500 or a hang — until the limits are back in Redis.
 *
 * The machine's shared Redis is never stopped: the outage is staged on a private `redis-server`.
 */
import { expect, layer } from "@effect/vitest"
import * as Tokenizer from "@gateway/core/Tokenizer"
import { Context, type Duration, Effect, Fiber, Layer } from "effect"
import * as Admin from "./support/Admin.js"
import * as EventLog from "./support/EventLog.js"
import { expectOpenAiError } from "./support/Http.js"
import * as Processes from "./support/Processes.js"
import * as Redis from "./support/Redis.js"

const model = "small"
/** Prices of `small`, in micro-USD per token (USD per million tokens). */
const inputPrice = 10
const outputPrice = 30
/** Completion tokens of every answer of the simulator, unless `max_tokens` cuts it shorter. */
const outputTokens = 16

const gatewayConfig = (
  simUrl: string,
  limits: { readonly redis_failure: "fail_open" | "fail_closed"; readonly redis_timeout_ms: number }
) => ({
  server: { host: "127.0.0.1" },
  pool: Processes.singleAttempt,
  limits,
  metering: { drain_after_disconnect_ms: 200 },
  models: [
    {
      name: model,
      pricing: { input_per_million_usd: inputPrice, output_per_million_usd: outputPrice },
      backends: [{ id: "small-1", url: simUrl }]
    }
  ]
})

class Stack extends Context.Tag("test/Limits/Stack")<
  Stack,
  {
    readonly sim: Processes.Sim
    readonly adminKey: string
    /**
     * Three replicas on one database and the shared Redis. They are about exactness, not Redis
     * latency: `fail_closed` (a Redis hiccup shows as a 503 instead of a silent local admission)
     * with a bound of a second, so that a busy CI machine does not make Redis look down.
     */
    readonly replicas: ReadonlyArray<Processes.Gateway>
    /** A Redis of this file's own, which the outage test freezes and restarts. */
    readonly privateRedis: Redis.PrivateRedis
    /** The replicas' database, read directly. */
    readonly events: EventLog.EventLog
    /** On `privateRedis`, one per failure policy. */
    readonly failOpen: Processes.Gateway
    readonly failClosed: Processes.Gateway
  }
>() {
  static readonly layer = Layer.scoped(
    Stack,
    Effect.gen(function* () {
      const adminKey = Admin.newAdminKey()
      const [databaseUrl, privateRedis, simPort] = yield* Effect.all(
        [Processes.freshDatabase, Redis.startPrivate, Processes.freePort],
        { concurrency: "unbounded" }
      )
      const simUrl = `http://127.0.0.1:${simPort}`
      const start = (redisUrl: string, redisFailure: "fail_open" | "fail_closed") =>
        Effect.flatMap(Processes.tempDir, (spoolDir) =>
          Processes.startGatewayOn(
            gatewayConfig(simUrl, {
              redis_failure: redisFailure,
              // The outage gateways give up on Redis soon (not so soon that a loaded CI machine
              // looks like an outage); the replicas wait for it.
              redis_timeout_ms: redisUrl === Redis.sharedUrl ? 1000 : 400
            }),
            { databaseUrl, spoolDir, env: Admin.authEnv(adminKey, redisUrl) }
          )
        )
      // Starting a process is CPU-bound: two at a time. The first gateway migrates the fresh
      // database; the others start on the migrated one.
      const [sim, first] = yield* Effect.all(
        [
          Processes.startSim({ port: simPort, model, ttftMs: 5, itlMs: 1, outputTokens, seed: 1 }),
          start(Redis.sharedUrl, "fail_closed")
        ],
        { concurrency: 2 }
      )
      const [second, third, failOpen, failClosed] = yield* Effect.all(
        [
          start(Redis.sharedUrl, "fail_closed"),
          start(Redis.sharedUrl, "fail_closed"),
          start(privateRedis.url, "fail_open"),
          start(privateRedis.url, "fail_closed")
        ],
        { concurrency: 2 }
      )
      const events = yield* EventLog.make(databaseUrl)
      return { sim, adminKey, replicas: [first, second, third], privateRedis, failOpen, failClosed, events }
    })
  )
}

// ---------------------------------------------------------------------------------------------
// Talking to the gateways
// ---------------------------------------------------------------------------------------------

/** One request as the client saw it; times are `performance.now()`. */
interface Answer {
  /** The gateway asked. */
  readonly url: string
  /** The HTTP status, or null when no whole answer arrived within the client's timeout. */
  readonly status: number | null
  readonly sentAt: number
  readonly doneAt: number
  readonly headers: Headers | undefined
  readonly text: string
}

const chatBody = (content: string, maxTokens: number, stream = false) => ({
  model,
  messages: [{ role: "user", content }],
  max_tokens: maxTokens,
  ...(stream ? { stream: true, stream_options: { include_usage: true } } : {})
})

/** `POST /v1/chat/completions` with `key`, read to its end; never fails. */
const send = (url: string, key: string, body: unknown, timeoutMs = 10_000): Effect.Effect<Answer> =>
  Effect.promise(async () => {
    const sentAt = performance.now()
    try {
      const res = await fetch(`${url}/v1/chat/completions`, {
        method: "POST",
        headers: { "content-type": "application/json", ...Admin.bearer(key) },
        body: JSON.stringify(body),
        signal: AbortSignal.timeout(timeoutMs)
      })
      const text = await res.text()
      return { url, status: res.status, sentAt, doneAt: performance.now(), headers: res.headers, text }
    } catch (error) {
      return { url, status: null, sentAt, doneAt: performance.now(), headers: undefined, text: String(error) }
    }
  })

interface Usage {
  readonly prompt_tokens: number
  readonly completion_tokens: number
  readonly total_tokens: number
}

/** The usage an answer reported: the JSON body's, or a stream's usage chunk (which must end in [DONE]). */
const usageOf = (answer: Answer): Usage => {
  if (answer.headers?.get("content-type")?.startsWith("text/event-stream")) {
    const data = answer.text
      .split("\n\n")
      .filter((event) => event.startsWith("data: "))
      .map((event) => event.slice("data: ".length))
    expect(data.at(-1)).toBe("[DONE]")
    const usage = data
      .filter((d) => d !== "[DONE]")
      .map((d) => JSON.parse(d).usage)
      .filter((u) => u != null)
    expect(usage).toHaveLength(1)
    return usage[0]
  }
  const usage = JSON.parse(answer.text).usage
  expect(usage).toMatchObject({ prompt_tokens: expect.any(Number), completion_tokens: expect.any(Number) })
  return usage
}

/** What the gateway bills for `usage`, in micro-USD. */
const costOf = (usage: Usage) =>
  Math.round(usage.prompt_tokens * inputPrice + usage.completion_tokens * outputPrice)

/** Asserts an error answer as an OpenAI client expects it (see `expectOpenAiError`); returns the error. */
const openAiError = (answer: Answer, status: number, code: string) =>
  expectOpenAiError(
    new Response(answer.text, { status: answer.status ?? 599, headers: answer.headers ?? new Headers() }),
    { status, code }
  )

/** A 429 as OpenAI sends it: the error, and when to come back in `retry-after` and `retry-after-ms`. */
const expectRefusal = (answer: Answer, code: "rate_limit_exceeded" | "insufficient_quota", type: string) =>
  Effect.gen(function* () {
    const error = yield* openAiError(answer, 429, code)
    expect(error.type).toBe(type)
    expect(Number(answer.headers?.get("retry-after"))).toBeGreaterThanOrEqual(1)
    expect(Number(answer.headers?.get("retry-after-ms"))).toBeGreaterThanOrEqual(1)
  })

/**
 * `callers` clients in a loop, sending `request(i)` until `total` requests were sent or `deadlineMs`
 * has passed; a client may pause after an answer (`pauseAfter`, as an SDK honouring
 * `retry-after-ms` would).
 */
const hammer = (
  options: {
    readonly callers: number
    readonly total: number
    readonly deadlineMs: number
    readonly pauseAfter?: (answer: Answer) => number
  },
  request: (i: number) => Effect.Effect<Answer>
): Effect.Effect<ReadonlyArray<Answer>> =>
  Effect.gen(function* () {
    const answers: Array<Answer> = []
    const deadline = performance.now() + options.deadlineMs
    let issued = 0
    const caller = Effect.gen(function* () {
      while (issued < options.total && performance.now() < deadline) {
        const answer = yield* request(issued++)
        answers.push(answer)
        const pause = options.pauseAfter?.(answer) ?? 0
        if (pause > 0) yield* Effect.sleep(pause)
      }
    })
    yield* Effect.all(
      Array.from({ length: options.callers }, () => caller),
      { concurrency: "unbounded", discard: true }
    )
    return answers
  })

/** From the first request's send to the last answer, in ms. */
const spanOf = (answers: ReadonlyArray<Answer>) =>
  Math.max(...answers.map((a) => a.doneAt)) - Math.min(...answers.map((a) => a.sentAt))

/** The answers whose status is not one of `expected`, as `status body` (none expected). */
const unexpected = (answers: ReadonlyArray<Answer>, ...expected: ReadonlyArray<number>) =>
  answers
    .filter((a) => a.status === null || !expected.includes(a.status))
    .map((a) => `${a.status} ${a.text.slice(0, 300)}`)

const statusCounts = (answers: ReadonlyArray<Answer>) => {
  const counts: Record<string, number> = {}
  for (const a of answers) counts[String(a.status)] = (counts[String(a.status)] ?? 0) + 1
  return counts
}

/** Waits until `key` is known to every one of `gateways` (the registry follows the log). */
const knownTo = (gateways: ReadonlyArray<Processes.Gateway>, key: string) =>
  Effect.forEach(
    gateways,
    (gateway) =>
      Processes.eventually(
        `the new key works on ${gateway.url}`,
        Effect.promise(async () => {
          const res = await fetch(`${gateway.url}/v1/models`, { headers: Admin.bearer(key) })
          await res.arrayBuffer()
          return res.status === 200 ? true : undefined
        }),
        "5 seconds"
      ),
    { discard: true }
  )

/**
 * A key of a tenant of its own with these limits, created through the first of `gateways` and
 * known to all of them; its buckets in `redisUrl` are deleted when the scope closes.
 */
const newKey = (
  gateways: ReadonlyArray<Processes.Gateway>,
  limits: Admin.LimitsInput,
  redisUrl = Redis.sharedUrl
) =>
  Effect.gen(function* () {
    const { adminKey } = yield* Stack
    const tenant = `limits-${crypto.randomUUID().slice(0, 8)}`
    const key = yield* Admin.createKey(gateways[0]!.url, adminKey, { tenant, name: "load", limits })
    yield* Effect.addFinalizer(() => Redis.dropLimiterKeys(redisUrl, [key.id, key.tenant]))
    yield* knownTo(gateways, key.key)
    return key
  })

/** `Processes.eventually`, whose failure also says how things stood (`state()`). */
const eventuallyOr = <A>(
  what: string,
  check: Effect.Effect<A | undefined>,
  timeout: Duration.DurationInput,
  state: () => unknown
) =>
  Processes.eventually(what, check, timeout).pipe(
    Effect.catchAllDefect((defect) => Effect.dieMessage(`${String(defect)}; ${JSON.stringify(state())}`))
  )

const limiterStatus = (gateway: Processes.Gateway) =>
  Effect.flatMap(Stack, ({ adminKey }) => Admin.adminCall(gateway.url, adminKey, "GET", "/admin/limiter"))

// ---------------------------------------------------------------------------------------------
// Holding concurrency slots
// ---------------------------------------------------------------------------------------------

/** A streamed answer whose first chunk has arrived; the client may leave it with `abort`. */
interface OpenStream {
  readonly status: number
  readonly abort: () => void
}

const openStream = (url: string, key: string, body: unknown): Effect.Effect<OpenStream> =>
  Effect.promise(async () => {
    const controller = new AbortController()
    const res = await fetch(`${url}/v1/chat/completions`, {
      method: "POST",
      headers: { "content-type": "application/json", ...Admin.bearer(key) },
      body: JSON.stringify(body),
      signal: controller.signal
    })
    if (res.status !== 200 || res.body === null) {
      await res.arrayBuffer()
      return { status: res.status, abort: () => {} }
    }
    await res.body.getReader().read()
    return { status: res.status, abort: () => controller.abort() }
  })

/** Concurrency slots of an API key held in Redis right now (leases of requests in flight). */
const slotsHeld = (redisUrl: string, keyId: string) =>
  Effect.gen(function* () {
    const [slots] = yield* Redis.keys(redisUrl, `gw:rl:*${keyId}*:concurrency`)
    if (slots === undefined) return 0
    return Number(yield* Effect.orDie(Redis.command(redisUrl, "ZCARD", slots)))
  })

// ---------------------------------------------------------------------------------------------
// The tests
// ---------------------------------------------------------------------------------------------

layer(Stack.layer, { excludeTestServices: true, timeout: 120_000 })("rate limits and budgets", (it) => {
  it.scoped("requests per minute hold exactly across three replicas sharing one Redis", () =>
    Effect.gen(function* () {
      const { replicas } = yield* Stack
      const rpm = 120
      const key = yield* newKey(replicas, { requests_per_minute: rpm })
      const body = chatBody("Hi", 2)
      const answers = yield* hammer({ callers: 40, total: 480, deadlineMs: 15_000 }, (i) =>
        send(replicas[i % replicas.length]!.url, key.key, body)
      )
      const admitted = answers.filter((a) => a.status === 200)
      const refused = answers.filter((a) => a.status === 429)
      expect(unexpected(answers, 200, 429)).toEqual([])

      // The bucket starts full and refills continuously at `rpm` per minute.
      const elapsedMs = spanOf(answers)
      const allowed = rpm + (rpm * elapsedMs) / 60_000
      const measured = `${admitted.length} admitted of ${answers.length} in ${elapsedMs.toFixed(0)} ms; allowed ${allowed.toFixed(2)}`
      expect(admitted.length, measured).toBeLessThanOrEqual(allowed * 1.01)
      expect(admitted.length, measured).toBeGreaterThanOrEqual(Math.floor(rpm * 0.99))

      for (const a of admitted) {
        expect(a.headers?.get("x-ratelimit-limit-requests")).toBe(String(rpm))
        expect(Number(a.headers?.get("x-ratelimit-remaining-requests"))).toBeLessThan(rpm)
      }
      for (const a of refused) yield* expectRefusal(a, "rate_limit_exceeded", "requests")
      // Every refusal is on the books as RequestRejected (rate_limited), with the key; none billed.
      const { events } = yield* Stack
      yield* Processes.eventually(
        `${refused.length} RequestRejected events of the key`,
        Effect.map(
          events.query<{ n: number }>(
            `SELECT count(*)::int AS n FROM events
             WHERE type = 'RequestRejected' AND data->>'reason' = 'rate_limited' AND metadata->>'keyId' = $1`,
            [key.id]
          ),
          (rows) => (rows[0]?.n === refused.length ? true : undefined)
        ),
        "5 seconds"
      )
      // Each replica admitted and refused some: the one bucket is shared.
      expect(
        replicas.map((replica) => {
          const own = answers.filter((a) => a.url === replica.url)
          return [own.some((a) => a.status === 200), own.some((a) => a.status === 429)]
        })
      ).toEqual(replicas.map(() => [true, true]))
    })
  )

  it.scoped("tokens per minute hold across three replicas: streamed usage stays within the bucket", () =>
    Effect.gen(function* () {
      const { replicas } = yield* Stack
      const tpm = 3000
      const maxTokens = 64
      const key = yield* newKey(replicas, { tokens_per_minute: tpm })
      const body = chatBody("Hi", maxTokens, true)
      // Each admission reserves the prompt's estimate plus `max_tokens`; the answers use less
      // (`outputTokens`), and the rest goes back to the bucket once they end.
      const reservation = Tokenizer.countPrompt(body as any) + maxTokens
      const answers = yield* hammer(
        {
          callers: 30,
          total: 1500,
          deadlineMs: 3000,
          // As an SDK honouring `retry-after-ms` would, but never for long.
          pauseAfter: (a) => (a.status === 429 ? Math.min(Number(a.headers?.get("retry-after-ms")), 100) : 0)
        },
        (i) => send(replicas[i % replicas.length]!.url, key.key, body)
      )
      const admitted = answers.filter((a) => a.status === 200)
      const refused = answers.filter((a) => a.status === 429)
      expect(unexpected(answers, 200, 429)).toEqual([])

      const used = admitted.map(usageOf)
      for (const usage of used) {
        expect(usage.completion_tokens).toBe(outputTokens)
        expect(usage.total_tokens).toBeLessThanOrEqual(reservation)
      }
      const usedTokens = used.reduce((sum, u) => sum + u.total_tokens, 0)
      const elapsedMs = spanOf(answers)
      const allowed = tpm + (tpm * elapsedMs) / 60_000
      const measured = `${usedTokens} tokens used by ${admitted.length} of ${answers.length} requests in ${elapsedMs.toFixed(0)} ms; allowed ${allowed.toFixed(0)}`
      expect(usedTokens, measured).toBeLessThanOrEqual(allowed * 1.01)
      // What the answers did not use went back: far more was admitted than whole reservations fit.
      expect(admitted.length, measured).toBeGreaterThan(Math.ceil(allowed / reservation))
      expect(usedTokens, measured).toBeGreaterThanOrEqual(tpm * 0.8)

      for (const a of admitted) expect(a.headers?.get("x-ratelimit-limit-tokens")).toBe(String(tpm))
      for (const a of refused) yield* expectRefusal(a, "rate_limit_exceeded", "tokens")
    })
  )

  it.scoped("a spend budget is not overspent by concurrent requests; refusals are insufficient_quota", () =>
    Effect.gen(function* () {
      const { replicas, adminKey } = yield* Stack
      const budgetMicroUsd = 20_000
      const key = yield* newKey(replicas, { budget_usd: budgetMicroUsd / 1e6, budget_period: "day" })
      // "x hello " is as many tokens to the gateway's tokenizer as to the simulator's count, so a
      // request's reservation and its real cost differ only by the completion tokens it did not use.
      const reservationOf = (body: ReturnType<typeof chatBody>) =>
        Tokenizer.countPrompt(body as any) * inputPrice + body.max_tokens * outputPrice
      const small = chatBody("x hello ".repeat(2), 24)
      const reservation = reservationOf(small)
      const costs: Array<number> = []
      const admittedCost = (a: Answer) => {
        const cost = costOf(usageOf(a))
        costs.push(cost)
        return cost
      }

      // Nearly exhausted first: one large request (whose reservation is its cost: it asks for
      // exactly the tokens the simulator answers with) leaves room for about eight small ones.
      const largeOf = (units: number) => chatBody("x hello ".repeat(units), outputTokens)
      const perUnit = reservationOf(largeOf(2)) - reservationOf(largeOf(1))
      const target = budgetMicroUsd - 8.5 * reservation
      const large = largeOf(1 + Math.floor((target - reservationOf(largeOf(1))) / perUnit))
      expect(reservationOf(large)).toBeLessThanOrEqual(target)
      expect(reservationOf(large)).toBeGreaterThan(target - perUnit)
      const first = yield* send(replicas[0]!.url, key.key, large)
      expect(first.status).toBe(200)
      expect(admittedCost(first)).toBe(reservationOf(large))

      // Then a burst through all three replicas.
      const burst = yield* Effect.forEach(
        Array.from({ length: 60 }, (_, i) => replicas[i % replicas.length]!),
        (replica) => send(replica.url, key.key, small),
        { concurrency: 20 }
      )
      expect(unexpected(burst, 200, 429)).toEqual([])
      const burstAdmitted = burst.filter((a) => a.status === 200)
      expect(burstAdmitted.length).toBeGreaterThan(0)
      expect(burstAdmitted.length).toBeLessThan(burst.length)
      for (const a of burstAdmitted) admittedCost(a)
      for (const a of burst.filter((a) => a.status === 429))
        yield* expectRefusal(a, "insufficient_quota", "insufficient_quota")

      // Then one at a time until refused: what is left is less than a request's reservation.
      let refusal: Answer | undefined
      for (let i = 0; i < 20 && refusal === undefined; i++) {
        const a = yield* send(replicas[i % replicas.length]!.url, key.key, small)
        if (a.status === 200) admittedCost(a)
        else refusal = a
      }
      expect(refusal).toBeDefined()
      yield* expectRefusal(refusal!, "insufficient_quota", "insufficient_quota")

      const spent = costs.reduce((sum, c) => sum + c, 0)
      const measured = `${spent} µUSD spent of ${budgetMicroUsd} by ${costs.length} requests; a reservation is ${reservation}`
      expect(spent, measured).toBeLessThanOrEqual(budgetMicroUsd + reservation)
      expect(budgetMicroUsd - spent, measured).toBeLessThan(2 * reservation)

      // The books agree with what the clients were billed.
      const books = yield* Processes.eventually(
        "usage_hourly has every admitted request of the key",
        Effect.map(Admin.usage(replicas[1]!.url, adminKey, { key: key.id }), (u) =>
          u.total.requests === costs.length ? u.total : undefined
        ),
        "15 seconds"
      )
      expect(books.cost_usd).toBeCloseTo(spent / 1e6, 9)
    })
  )

  it.scoped("a concurrency slot comes back however a request ends", () =>
    Effect.gen(function* () {
      const { replicas, sim } = yield* Stack
      const url = replicas[0]!.url
      const key = yield* newKey(replicas.slice(0, 1), { concurrent_requests: 2 })
      // Slow answers, so that requests overlap: 100 ms to the first token, then 20 tokens a second.
      yield* sim.withConfig({ ttftMs: 100, itlMs: 50, outputTokens: 80 })
      const long = chatBody("Hi", 80, true)
      const short = chatBody("Hi", 2)
      /** Both of two concurrent requests admitted: two slots are free. */
      const twoSlotsFree = (after: string) =>
        Processes.eventually(
          `two concurrent requests are admitted after ${after}`,
          Effect.map(
            Effect.all([send(url, key.key, short), send(url, key.key, short)], { concurrency: 2 }),
            (pair) => (pair.every((a) => a.status === 200) ? performance.now() : undefined)
          ),
          "3 seconds"
        )

      // The limit holds: two streams open, a third request is refused.
      const streams = yield* Effect.all([openStream(url, key.key, long), openStream(url, key.key, long)], {
        concurrency: 2
      })
      expect(streams.map((s) => s.status)).toEqual([200, 200])
      const third = yield* send(url, key.key, short)
      yield* expectRefusal(third, "rate_limit_exceeded", "requests")

      // (a) Clients gone mid-stream: their slots come back after the drain bound (200 ms), long
      // before the backend would have finished (about 4 s).
      for (const s of streams) s.abort()
      const abortedAt = performance.now()
      const freedAt = yield* twoSlotsFree("two clients left mid-stream")
      expect(freedAt - abortedAt).toBeLessThan(2000)

      // (a') Clients gone while waiting for a whole JSON answer.
      const controllers = [new AbortController(), new AbortController()]
      const pending = controllers.map((c) =>
        fetch(`${url}/v1/chat/completions`, {
          method: "POST",
          headers: { "content-type": "application/json", ...Admin.bearer(key.key) },
          body: JSON.stringify(chatBody("Hi", 80)),
          signal: c.signal
        }).catch(() => undefined)
      )
      yield* Processes.eventually(
        "both waiting requests hold their slots",
        Effect.map(slotsHeld(Redis.sharedUrl, key.id), (n) => (n === 2 ? true : undefined))
      )
      yield* expectRefusal(yield* send(url, key.key, short), "rate_limit_exceeded", "requests")
      for (const c of controllers) c.abort()
      yield* Effect.promise(() => Promise.all(pending))
      yield* twoSlotsFree("two clients left before their answers")

      // (b) Backend errors before the answer, then streams the backend breaks off.
      yield* Effect.scoped(
        Effect.gen(function* () {
          yield* sim.withConfig({ errorRate: 1, errorStatus: 500 })
          for (let round = 0; round < 2; round++) {
            const failed = yield* Effect.all(
              [send(url, key.key, short), send(url, key.key, chatBody("Hi", 2, true))],
              { concurrency: 2 }
            )
            expect(failed.map((a) => a.status! >= 500)).toEqual([true, true])
          }
        })
      )
      yield* twoSlotsFree("backend errors")
      yield* Effect.scoped(
        Effect.gen(function* () {
          yield* sim.withConfig({ breakAfterChunks: 2 })
          for (let round = 0; round < 2; round++) {
            const broken = yield* Effect.all([send(url, key.key, long), send(url, key.key, long)], {
              concurrency: 2
            })
            expect(broken.map((a) => a.status)).toEqual([200, 200])
            for (const a of broken) {
              expect(a.text).toContain('"error"')
              expect(a.text).not.toContain("[DONE]")
            }
          }
        })
      )
      yield* twoSlotsFree("streams broken off by the backend")

      // (c) Answers that end normally.
      for (let round = 0; round < 3; round++) {
        const done = yield* Effect.all(
          [send(url, key.key, chatBody("Hi", 4, true)), send(url, key.key, chatBody("Hi", 4))],
          { concurrency: 2 }
        )
        expect(done.map((a) => a.status)).toEqual([200, 200])
        expect(done[0]!.text).toContain("data: [DONE]")
      }
      yield* twoSlotsFree("answers that ended normally")
    })
  )

  it.scoped(
    "Redis stopping under load: fail_open guards locally, fail_closed answers 503, then Redis again",
    () =>
      Effect.gen(function* () {
        const { privateRedis, failOpen, failClosed } = yield* Stack
        // Low, so that the local guard has something to refuse within a short outage.
        const rpm = 30
        const openKey = yield* newKey([failOpen, failClosed], { requests_per_minute: rpm }, privateRedis.url)
        const closedKey = yield* newKey(
          [failOpen, failClosed],
          { requests_per_minute: rpm },
          privateRedis.url
        )
        const body = chatBody("Hi", 2)

        // A steady load on each gateway, every request bounded by a 5 s client timeout.
        let stopped = false
        const load = (gateway: Processes.Gateway, key: string) => {
          const answers: Array<Answer> = []
          const caller = Effect.gen(function* () {
            while (!stopped && answers.length < 3000) {
              answers.push(yield* send(gateway.url, key, body, 5000))
              yield* Effect.sleep("10 millis")
            }
          })
          return {
            answers,
            run: Effect.all([caller, caller, caller, caller], { concurrency: 4, discard: true })
          }
        }
        const open = load(failOpen, openKey.key)
        const closed = load(failClosed, closedKey.key)
        const fiber = yield* Effect.fork(
          Effect.all([open.run, closed.run], { concurrency: 2, discard: true })
        )
        const answered = (answers: ReadonlyArray<Answer>, from: number, to = Infinity) =>
          answers.filter((a) => a.sentAt >= from && a.doneAt <= to)

        yield* Processes.eventually(
          "both gateways answer with Redis up",
          Effect.sync(() =>
            answered(open.answers, 0).length >= 10 && answered(closed.answers, 0).length >= 10
              ? true
              : undefined
          )
        )
        // Redis stops answering: connections stay open, commands hang.
        yield* privateRedis.freeze
        const outageFrom = performance.now()
        // Long enough for each gateway to try Redis again after its back-off (a second), and for a
        // request waiting on Redis to show as one answered only after the outage.
        const outageMs = 2500
        yield* eventuallyOr(
          "fail_open refuses with its local guard and fail_closed answers 503 while Redis is frozen",
          Effect.sync(() =>
            answered(open.answers, outageFrom).some((a) => a.status === 429) &&
            answered(closed.answers, outageFrom).filter((a) => a.status === 503).length >= 10 &&
            [open, closed].every((l) => answered(l.answers, outageFrom + outageMs).length > 0)
              ? true
              : undefined
          ),
          "10 seconds",
          () => ({
            open: statusCounts(answered(open.answers, outageFrom)),
            closed: statusCounts(answered(closed.answers, outageFrom)),
            inFlight: [open, closed].map((l) => l.answers.length)
          })
        )
        // Redis comes back, empty.
        const outageTo = performance.now()
        yield* privateRedis.restart
        const backAt = performance.now()
        yield* eventuallyOr(
          "both gateways admit against Redis again",
          Effect.gen(function* () {
            const buckets = yield* Effect.all([
              Redis.limiterKeysOf(privateRedis.url, openKey.id),
              Redis.limiterKeysOf(privateRedis.url, closedKey.id)
            ])
            return buckets.every((b) => b.length > 0) &&
              answered(closed.answers, backAt).some((a) => a.status === 200)
              ? true
              : undefined
          }),
          "15 seconds",
          () => ({
            open: statusCounts(answered(open.answers, backAt)),
            closed: statusCounts(answered(closed.answers, backAt))
          })
        )
        stopped = true
        yield* Fiber.join(fiber)

        const all = [...open.answers, ...closed.answers]
        const slowest = Math.max(...all.map((a) => a.doneAt - a.sentAt))
        // Never a 500, never a hang: no request sent early in the outage waited for its end.
        expect(unexpected(open.answers, 200, 429)).toEqual([])
        expect(unexpected(closed.answers, 200, 429, 503)).toEqual([])
        expect(slowest, `the slowest answer took ${slowest.toFixed(0)} ms`).toBeLessThan(3000)
        const waitedForRedis = all.filter(
          (a) => a.sentAt >= outageFrom && a.sentAt < outageTo - 1500 && a.doneAt > outageTo
        )
        expect(
          waitedForRedis.map((a) => `${a.url}: ${a.status} after ${(a.doneAt - a.sentAt).toFixed(0)} ms`)
        ).toEqual([])

        // Before: admitted by Redis. During: fail_open serves or refuses with its guard (the same
        // limit, per replica), fail_closed refuses every request with 503.
        const before = answered(closed.answers, 0, outageFrom)
        expect(before.filter((a) => a.status === 200).length).toBeGreaterThan(0)
        expect(unexpected(before, 200, 429)).toEqual([])
        const openDuring = answered(open.answers, outageFrom, outageTo)
        const guardAdmitted = openDuring.filter((a) => a.status === 200).length
        expect(guardAdmitted).toBeGreaterThan(0)
        expect(guardAdmitted).toBeLessThanOrEqual(rpm + (rpm * (outageTo - outageFrom)) / 60_000 + 1)
        for (const a of openDuring.filter((a) => a.status === 429))
          yield* expectRefusal(a, "rate_limit_exceeded", "requests")
        const closedDuring = answered(closed.answers, outageFrom, outageTo)
        expect(unexpected(closedDuring, 503)).toEqual([])
        for (const a of closedDuring.slice(0, 5)) yield* openAiError(a, 503, "service_unavailable")

        // The outage is in the logs and in the limiter's status.
        for (const gateway of [failOpen, failClosed]) {
          expect(gateway.logs().some((l) => l.level === "error" && /limiter/i.test(String(l.msg)))).toBe(true)
          const status = yield* limiterStatus(gateway)
          expect(status.store).toBe("redis")
          expect(status.storeFailures).toBeGreaterThan(0)
        }
      })
  )
})
