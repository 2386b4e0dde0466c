/**
 * What the gateway puts on the books for each request, read straight from the `events` table of
 * a real gateway process in front of a real simulator: the exact lifecycle of successes,
 * failures, disconnects and rejections, the durability rule (the terminal event is committed
 * before the client gets the end of its answer), privacy of the prompt, and the order in which
 * a reader of the whole log sees the events.
 */
import { createHash } from "node:crypto"
import { SqlClient } from "@effect/sql"
import { PgClient } from "@effect/sql-pg"
import { expect, layer } from "@effect/vitest"
import * as Progress from "@gateway/cli/Progress"
import * as Replay from "@gateway/cli/Replay"
import { Projections } from "@gateway/core"
import { Events } from "@gateway/domain"
import { EventStore } from "@gateway/event-store"
import { Context, Effect, Fiber, Layer, Option, Redacted } from "effect"
import { contentChunks, messages, postChat, readSse, readThenHangUp } from "./support/Http.js"
import * as Processes from "./support/Processes.js"

const maxBodyBytes = 4096
const outputTokens = 8

class Stack extends Context.Tag("test/RequestLifecycle/Stack")<
  Stack,
  {
    readonly sim: Processes.Sim
    readonly gateway: Processes.Gateway
    /** The gateway's own database. */
    readonly sql: SqlClient.SqlClient
  }
>() {
  static readonly layer = Layer.scoped(
    Stack,
    Effect.gen(function* () {
      const simPort = yield* Processes.freePort
      const simUrl = `http://127.0.0.1:${simPort}`
      const [sim, gateway] = yield* Effect.all(
        [
          Processes.startSim({ port: simPort, model: "small", ttftMs: 5, itlMs: 1, outputTokens, seed: 1 }),
          Processes.startGateway({
            server: { host: "127.0.0.1", max_body_bytes: maxBodyBytes },
            pool: Processes.singleAttempt,
            metering: { drain_after_disconnect_ms: 200 },
            models: [
              {
                name: "small",
                pricing: { input_per_million_usd: 0.15, output_per_million_usd: 0.6 },
                backends: [{ id: "small-1", url: simUrl }]
              }
            ]
          })
        ],
        { concurrency: "unbounded" }
      )
      const database = yield* Layer.build(
        PgClient.layer({ url: Redacted.make(gateway.databaseUrl), maxConnections: 4 })
      ).pipe(Effect.orDie)
      return { sim, gateway, sql: Context.get(database, SqlClient.SqlClient) }
    })
  )
}

// ---------------------------------------------------------------------------------------------
// Reading the log
// ---------------------------------------------------------------------------------------------

/** A row of `events`, bigints and xid8 as decimal strings. */
interface EventRow {
  readonly position: string
  readonly transaction_id: string
  readonly event_id: string
  readonly stream_id: string
  readonly stream_version: number
  readonly type: string
  readonly data: any
  readonly metadata: any
}

/**
 * Bigints and xid8 as text. The aliases shadow the columns in ORDER BY: order by
 * `events.position`, not `position`, or "10" sorts before "9".
 */
const columns = `position::text AS position, transaction_id::text AS transaction_id,
  event_id::text AS event_id, stream_id, stream_version, type, data, metadata`

const query = <A extends object>(statement: string, params: ReadonlyArray<unknown> = []) =>
  Effect.flatMap(Stack, ({ sql }) => sql.unsafe<A>(statement, params)).pipe(Effect.orDie)

/** The committed events of one request's stream, in version order. */
const eventsOf = (requestId: string) =>
  query<EventRow>(`SELECT ${columns} FROM events WHERE stream_id = $1 ORDER BY stream_version`, [
    `request-${requestId}`
  ])

const terminal: ReadonlySet<string> = new Set(Events.terminalTags)

/** Polls until the request's stream has a terminal event; for what is recorded without waiting. */
const settled = (requestId: string) =>
  Processes.eventually(
    `a terminal event on request-${requestId}`,
    Effect.map(eventsOf(requestId), (rows) => (rows.some((row) => terminal.has(row.type)) ? rows : undefined))
  )

/** The `n` of a `SELECT count(*)::int AS n ...` statement. */
const countOf = (statement: string, params: ReadonlyArray<unknown>) =>
  Effect.map(query<{ n: number }>(statement, params), (rows) => rows[0]?.n ?? 0)

const uuid = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/
const isoTime = /^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z$/

/** The gateway's own id of the request answered by `res`. */
const gatewayIdOf = (res: Response): string => {
  const id = res.headers.get("x-gateway-request-id")
  expect(id).toMatch(uuid)
  return id!
}

/**
 * Asserts a whole stream: these event types at versions 1..n, every event's metadata naming the
 * request and the correlation id, and each event caused by the one before it.
 */
const expectLifecycle = (
  rows: ReadonlyArray<EventRow>,
  expected: {
    readonly requestId: string
    readonly correlationId: string
    readonly types: ReadonlyArray<Events.RequestEventType>
  }
) => {
  expect(rows.map((row) => row.type)).toEqual(expected.types)
  expect(rows.map((row) => row.stream_version)).toEqual(expected.types.map((_, i) => i + 1))
  rows.forEach((row, i) => {
    expect(row.stream_id).toBe(`request-${expected.requestId}`)
    expect(row.event_id).toMatch(uuid)
    expect(Object.keys(row.metadata)).toEqual(
      expect.arrayContaining(["causationId", "correlationId", "occurredAt", "requestId", "spanId", "traceId"])
    )
    expect(row.metadata).toMatchObject({
      requestId: expected.requestId,
      correlationId: expected.correlationId,
      causationId: i === 0 ? null : rows[i - 1]!.event_id
    })
    expect(row.metadata.occurredAt).toMatch(isoTime)
  })
}

const succeeded = ["RequestReceived", "RequestRouted", "AttemptStarted", "RequestCompleted"] as const

// ---------------------------------------------------------------------------------------------
// Holding the log still
// ---------------------------------------------------------------------------------------------

/**
 * Takes an EXCLUSIVE lock on `events` (reads go on, the gateway's inserts wait) until the
 * returned effect runs or the scope closes, whichever comes first.
 */
const lockEvents = Effect.gen(function* () {
  const { sql } = yield* Stack
  const connection = yield* sql.reserve
  let held = false
  const release = Effect.suspend(() => {
    if (!held) return Effect.void
    held = false
    return connection.executeRaw("COMMIT", [])
  }).pipe(Effect.orDie, Effect.asVoid)
  yield* Effect.acquireRelease(
    Effect.gen(function* () {
      yield* connection.executeRaw("BEGIN", [])
      held = true
      yield* connection.executeRaw("LOCK TABLE events IN EXCLUSIVE MODE", [])
    }),
    () => release
  )
  return release
}).pipe(Effect.orDie)

/** Waits until an insert of the gateway is blocked on the lock of `lockEvents`. */
const insertWaiting = Processes.eventually(
  "an insert into events waits for the lock",
  Effect.map(
    countOf(
      "SELECT count(*)::int AS n FROM pg_locks WHERE relation = 'events'::regclass AND NOT granted",
      []
    ),
    (n) => (n > 0 ? true : undefined)
  )
)

/** A window in which something must NOT happen; only used while the log is locked. */
const quietWindow = "300 millis"

// ---------------------------------------------------------------------------------------------
// Talking to the gateway
// ---------------------------------------------------------------------------------------------

/** A JSON answer's body. */
const jsonOf = (res: Response): Effect.Effect<any> => Effect.promise(() => res.json())

/** Reads a body to its end; `received.text` holds what has arrived so far. */
const readInto = (res: Response, received: { text: string }): Effect.Effect<string> =>
  Effect.promise(async () => {
    const reader = res.body!.getReader()
    const decoder = new TextDecoder()
    for (;;) {
      const { done, value } = await reader.read()
      if (done) return received.text
      received.text += decoder.decode(value, { stream: true })
    }
  })

/**
 * Sends a request and reads its whole answer. The writer commits events in the order it was
 * given them, so whatever the gateway had queued before is committed once this answer is in.
 */
const barrier = Effect.gen(function* () {
  const { gateway } = yield* Stack
  const res = yield* postChat(gateway.url, { model: "small", messages })
  yield* Effect.promise(() => res.text())
  expect(res.status).toBe(200)
})

/**
 * Starts a long stream (500 tokens 20 ms apart), hangs up after the first content token, and
 * returns the stream's events once it has a terminal one and everything queued with it is
 * committed.
 */
const hangUpMidStream = (clientId: string) =>
  Effect.gen(function* () {
    const { gateway, sim } = yield* Stack
    const res = yield* Effect.scoped(
      Effect.gen(function* () {
        yield* sim.withConfig({ itlMs: 20, outputTokens: 500 })
        const controller = new AbortController()
        const res = yield* postChat(
          gateway.url,
          { model: "small", messages, stream: true },
          { headers: { "x-request-id": clientId }, signal: controller.signal }
        )
        yield* readThenHangUp(res, controller, (text) => /"content":"[^"]/.test(text))
        return res
      })
    )
    const requestId = gatewayIdOf(res)
    yield* settled(requestId)
    yield* barrier
    return { requestId, rows: yield* eventsOf(requestId) }
  })

// ---------------------------------------------------------------------------------------------
// The tests
// ---------------------------------------------------------------------------------------------

layer(Stack.layer, { excludeTestServices: true })("the lifecycle of a request in the event log", (it) => {
  it.effect("a non-streamed answer is on the books, whole, by the time the client has it", () =>
    Effect.gen(function* () {
      const { gateway } = yield* Stack
      const res = yield* postChat(
        gateway.url,
        { model: "small", messages },
        { headers: { "x-request-id": "lifecycle-plain" } }
      )
      const body = yield* jsonOf(res)
      // No polling: the durability rule says it is committed before the answer is sent.
      const requestId = gatewayIdOf(res)
      const rows = yield* eventsOf(requestId)
      expect(res.status).toBe(200)
      expect(res.headers.get("x-request-id")).toBe("lifecycle-plain")
      expectLifecycle(rows, { requestId, correlationId: "lifecycle-plain", types: succeeded })
      const [received, routed, started, completed] = rows.map((row) => row.data)
      expect(received).toMatchObject({ model: "small", stream: false, endpoint: "chat.completions" })
      expect(routed).toEqual({
        model: "small",
        backend: "small-1",
        upstreamModel: "small",
        why: "requested",
        detail: "balancer p2c"
      })
      expect(started).toEqual({ attempt: 1, backend: "small-1", model: "small" })
      expect(body.usage.completion_tokens).toBe(outputTokens)
      expect(completed).toMatchObject({
        model: "small",
        backend: "small-1",
        promptTokens: body.usage.prompt_tokens,
        completionTokens: body.usage.completion_tokens,
        usageSource: "backend",
        ttftMs: null,
        finishReason: body.choices[0].finish_reason,
        cached: false,
        stream: false,
        status: 200
      })
      expect(completed.latencyMs).toBeGreaterThanOrEqual(0)
    })
  )

  it.effect("a stream with include_usage is on the books with the backend's usage when [DONE] arrives", () =>
    Effect.gen(function* () {
      const { gateway } = yield* Stack
      const res = yield* postChat(
        gateway.url,
        { model: "small", messages, stream: true, stream_options: { include_usage: true } },
        { headers: { "x-request-id": "lifecycle-stream-usage" } }
      )
      const { events, done } = yield* readSse(res)
      const rows = yield* eventsOf(gatewayIdOf(res))
      expect(done).toBe(true)
      const usage = events.find((chunk) => chunk.usage != null)?.usage
      expect(usage).toMatchObject({ completion_tokens: outputTokens })
      expectLifecycle(rows, {
        requestId: gatewayIdOf(res),
        correlationId: "lifecycle-stream-usage",
        types: succeeded
      })
      expect(rows[0]!.data).toMatchObject({ model: "small", stream: true })
      const completed = rows[3]!.data
      const finishReason = events.find((chunk) => chunk.choices?.[0]?.finish_reason != null)?.choices[0]
        .finish_reason
      expect(finishReason).toEqual(expect.any(String))
      expect(completed).toMatchObject({
        promptTokens: usage.prompt_tokens,
        completionTokens: usage.completion_tokens,
        usageSource: "backend",
        finishReason,
        stream: true,
        status: 200
      })
      expect(completed.ttftMs).toEqual(expect.any(Number))
      expect(completed.ttftMs).toBeGreaterThanOrEqual(0)
      expect(completed.ttftMs).toBeLessThanOrEqual(completed.latencyMs)
    })
  )

  it.effect(
    "a stream whose client did not ask for usage is billed from the backend's usage, which the client does not see",
    () =>
      Effect.gen(function* () {
        const { gateway } = yield* Stack
        const res = yield* postChat(gateway.url, { model: "small", messages, stream: true })
        const { events, done } = yield* readSse(res)
        const requestId = gatewayIdOf(res)
        const rows = yield* eventsOf(requestId)
        expect(done).toBe(true)
        expect(events.some((chunk) => chunk.usage != null)).toBe(false)
        // Without an x-request-id the correlation id is the request's own.
        expectLifecycle(rows, { requestId, correlationId: requestId, types: succeeded })
        expect(rows[3]!.data).toMatchObject({
          completionTokens: contentChunks(events).length,
          usageSource: "backend",
          stream: true,
          status: 200
        })
        expect(contentChunks(events)).toHaveLength(outputTokens)
      })
  )

  it.scoped("while the log cannot be written, no client gets the end of its answer", () =>
    Effect.gen(function* () {
      const { gateway, sim } = yield* Stack
      const before = yield* sim.stats
      const release = yield* lockEvents
      const plain = yield* postChat(gateway.url, { model: "small", messages }).pipe(
        Effect.flatMap((res) =>
          Effect.map(
            Effect.promise(() => res.text()),
            (text) => ({ res, text })
          )
        ),
        Effect.fork
      )
      const streamed = { text: "" }
      const streamRes = yield* postChat(gateway.url, {
        model: "small",
        messages,
        stream: true,
        stream_options: { include_usage: true }
      })
      const reading = yield* Effect.fork(readInto(streamRes, streamed))
      yield* insertWaiting
      yield* Processes.eventually(
        "the backend has sent both answers to their end",
        Effect.map(sim.stats, (s) => (s.completed >= before.completed + 2 ? true : undefined))
      )
      yield* Processes.eventually(
        "the client has every chunk of the stream but the end",
        Effect.sync(() => (streamed.text.includes('"usage":{') ? true : undefined))
      )
      const early = yield* Fiber.await(Fiber.zip(plain, reading)).pipe(Effect.timeoutOption(quietWindow))
      expect(Option.isNone(early), "an answer ended while its terminal event could not be committed").toBe(
        true
      )
      expect(streamed.text).not.toContain("[DONE]")

      yield* release
      const { res, text } = yield* Fiber.join(plain)
      const streamText = yield* Fiber.join(reading)
      expect(res.status).toBe(200)
      expect(JSON.parse(text).usage.completion_tokens).toBe(outputTokens)
      expect(streamText).toContain("data: [DONE]")
      for (const answered of [res, streamRes]) {
        const requestId = gatewayIdOf(answered)
        expectLifecycle(yield* eventsOf(requestId), { requestId, correlationId: requestId, types: succeeded })
      }
    })
  )

  it.scoped("a backend error is on the books as a failed attempt and a failed request before the 500", () =>
    Effect.gen(function* () {
      const { gateway, sim } = yield* Stack
      yield* sim.withConfig({ errorRate: 1, errorStatus: 500 })
      const res = yield* postChat(
        gateway.url,
        { model: "small", messages },
        { headers: { "x-request-id": "lifecycle-backend-500" } }
      )
      const { error } = yield* jsonOf(res)
      const requestId = gatewayIdOf(res)
      const rows = yield* eventsOf(requestId)
      expect(res.status).toBe(500)
      expectLifecycle(rows, {
        requestId,
        correlationId: "lifecycle-backend-500",
        types: ["RequestReceived", "RequestRouted", "AttemptStarted", "AttemptFailed", "RequestFailed"]
      })
      expect(rows[3]!.data).toEqual({
        attempt: 1,
        backend: "small-1",
        error: { reason: "Http", status: 500, message: expect.any(String) },
        retryable: true,
        afterFirstByte: false
      })
      expect(rows[4]!.data).toEqual({
        status: 500,
        error: { code: error.code, message: expect.any(String), reason: "Http" },
        attempts: 1,
        lastBackend: "small-1"
      })
    })
  )

  it.scoped("a stream the backend breaks off is on the books as a failure after the first byte", () =>
    Effect.gen(function* () {
      const { gateway, sim } = yield* Stack
      yield* sim.withConfig({ breakAfterChunks: 3 })
      const res = yield* postChat(
        gateway.url,
        { model: "small", messages, stream: true },
        { headers: { "x-request-id": "lifecycle-broken" } }
      )
      const { events, done } = yield* readSse(res)
      expect(done).toBe(false)
      expect(contentChunks(events)).toHaveLength(3)
      const requestId = gatewayIdOf(res)
      const rows = yield* settled(requestId)
      expectLifecycle(rows, {
        requestId,
        correlationId: "lifecycle-broken",
        types: ["RequestReceived", "RequestRouted", "AttemptStarted", "AttemptFailed", "RequestFailed"]
      })
      expect(rows[3]!.data).toMatchObject({
        attempt: 1,
        backend: "small-1",
        error: { reason: "StreamBroken" },
        afterFirstByte: true
      })
      // What the client got: a 200 whose stream ended in an error event.
      expect(rows[4]!.data).toMatchObject({
        status: 200,
        error: { code: events.at(-1).error.code, reason: "StreamBroken" },
        attempts: 1,
        lastBackend: "small-1"
      })
    })
  )

  it.scoped(
    "a stream the backend breaks off ends for the client only after its RequestFailed is committed",
    () =>
      Effect.gen(function* () {
        const { gateway, sim } = yield* Stack
        yield* sim.withConfig({ breakAfterChunks: 3 })
        const release = yield* lockEvents
        const res = yield* postChat(gateway.url, { model: "small", messages, stream: true })
        const reading = yield* Effect.fork(readSse(res))
        yield* insertWaiting
        const early = yield* Fiber.await(reading).pipe(Effect.timeoutOption(quietWindow))
        expect(
          Option.isNone(early),
          "the broken stream ended for the client while its RequestFailed could not be committed"
        ).toBe(true)
        yield* release
        const { done } = yield* Fiber.join(reading)
        expect(done).toBe(false)
        expect((yield* eventsOf(gatewayIdOf(res))).at(-1)?.type).toBe("RequestFailed")
      })
  )

  it.effect("a client that hangs up mid-stream is on the books as cancelled after the first byte", () =>
    Effect.gen(function* () {
      const { requestId, rows } = yield* hangUpMidStream("lifecycle-hang-up")
      const upToTerminal = rows.slice(0, rows.findIndex((row) => terminal.has(row.type)) + 1)
      expectLifecycle(upToTerminal, {
        requestId,
        correlationId: "lifecycle-hang-up",
        types: ["RequestReceived", "RequestRouted", "AttemptStarted", "RequestCancelled"]
      })
      const cancelled = upToTerminal[3]!.data
      expect(cancelled.afterFirstByte).toBe(true)
      expect(cancelled.tokensDelivered).toBeGreaterThanOrEqual(1)
      expect(cancelled.tokensDelivered).toBeLessThan(500)
      expect(cancelled.latencyMs).toBeGreaterThan(0)
      // Billed for what the backend generated, read while draining or estimated: never zero.
      expect(cancelled).toMatchObject({ model: "small", backend: "small-1" })
      expect(cancelled.promptTokens).toBeGreaterThan(0)
      expect(cancelled.completionTokens).toBeGreaterThanOrEqual(cancelled.tokensDelivered)
      expect(cancelled.cost.amountMicroUsd).toBeGreaterThan(0)
    })
  )

  it.effect(
    "a client that hangs up mid-stream gets RequestCancelled only, not AttemptFailed and RequestFailed",
    () =>
      Effect.gen(function* () {
        const { requestId, rows } = yield* hangUpMidStream("lifecycle-hang-up-exact")
        expectLifecycle(rows, {
          requestId,
          correlationId: "lifecycle-hang-up-exact",
          types: ["RequestReceived", "RequestRouted", "AttemptStarted", "RequestCancelled"]
        })
      })
  )

  it.scoped("a client that hangs up while [DONE] waits for the commit gets one terminal event", () =>
    Effect.gen(function* () {
      const { gateway } = yield* Stack
      const release = yield* lockEvents
      const controller = new AbortController()
      const res = yield* postChat(
        gateway.url,
        { model: "small", messages, stream: true, stream_options: { include_usage: true } },
        { headers: { "x-request-id": "lifecycle-hang-up-at-done" }, signal: controller.signal }
      )
      // The simulator writes the usage chunk and [DONE] at once: the gateway holds [DONE] back.
      yield* readThenHangUp(res, controller, (text) => text.includes('"usage":{'))
      const line = yield* gateway.accessLog("lifecycle-hang-up-at-done")
      expect(line.status).toBe(499)
      yield* release
      const requestId = gatewayIdOf(res)
      yield* settled(requestId)
      yield* barrier
      const rows = yield* eventsOf(requestId)
      expect(rows.filter((row) => terminal.has(row.type)).map((row) => row.type)).toEqual([
        expect.any(String)
      ])
    })
  )

  const rejections = [
    {
      name: "malformed JSON",
      body: '{"model": "small", "messages": [',
      reason: "invalid_request",
      status: 400
    },
    {
      name: "an unknown model",
      body: JSON.stringify({ model: "no-such-model", messages }),
      reason: "model_not_found",
      status: 404
    },
    {
      name: "a body over max_body_bytes",
      body: JSON.stringify({
        model: "small",
        messages: [{ role: "user", content: "x".repeat(maxBodyBytes) }]
      }),
      reason: "payload_too_large",
      status: 413
    }
  ]

  it.effect.each(rejections)("$name is on the books as one RequestRejected ($reason, $status)", (c) =>
    Effect.gen(function* () {
      const { gateway } = yield* Stack
      const clientId = `lifecycle-rejected-${c.status}`
      const res = yield* postChat(gateway.url, c.body, { headers: { "x-request-id": clientId } })
      const { error } = yield* jsonOf(res)
      expect(res.status).toBe(c.status)
      const requestId = gatewayIdOf(res)
      // Recorded without waiting, by design: nothing is billed.
      const rows = yield* settled(requestId)
      expectLifecycle(rows, { requestId, correlationId: clientId, types: ["RequestRejected"] })
      expect(rows[0]!.data).toEqual({ reason: c.reason, status: c.status, message: error.message })
    })
  )

  it.effect("the request body is kept as the sha256 of its exact bytes, and the prompt nowhere", () =>
    Effect.gen(function* () {
      const { gateway } = yield* Stack
      const canary = `prompt-canary-${crypto.randomUUID()}`
      const user = `user-canary-${crypto.randomUUID()}`
      // Odd spacing and non-ASCII: a hash of the body re-serialized, or of UTF-16, would differ.
      const body = `{ "model":"small",\n  "user": "${user}",\n  "messages": [{"role": "user", "content": "Grüße, ${canary} 🚀"}] }`
      const bytes = Buffer.from(body, "utf8")
      const res = yield* postChat(gateway.url, body)
      expect(res.status).toBe(200)
      yield* Effect.promise(() => res.text())
      const requestId = gatewayIdOf(res)
      const rows = yield* eventsOf(requestId)
      expectLifecycle(rows, { requestId, correlationId: requestId, types: succeeded })
      expect(rows[0]!.data).toEqual({
        model: "small",
        stream: false,
        endpoint: "chat.completions",
        user,
        payload: {
          kind: "hash",
          sha256: createHash("sha256").update(bytes).digest("hex"),
          bytes: bytes.length
        }
      })
      const mentioning = (needle: string) =>
        countOf(
          `SELECT count(*)::int AS n FROM events
           WHERE strpos(data::text, $1) > 0 OR strpos(metadata::text, $1) > 0`,
          [needle]
        )
      // The search finds what is there (the user field is kept on purpose) ...
      expect(yield* mentioning(user)).toBe(1)
      // ... and the prompt is not.
      expect(yield* mentioning(canary)).toBe(0)
    })
  )

  it.effect("two requests with the same x-request-id get streams of their own, correlated", () =>
    Effect.gen(function* () {
      const { gateway } = yield* Stack
      const clientId = "lifecycle-same-client-id"
      const answers = yield* Effect.forEach(
        [false, true],
        (stream) =>
          postChat(
            gateway.url,
            { model: "small", messages, stream },
            { headers: { "x-request-id": clientId } }
          ).pipe(Effect.tap((res) => Effect.promise(() => res.text()))),
        { concurrency: "unbounded" }
      )
      const ids = answers.map(gatewayIdOf)
      expect(new Set(ids).size).toBe(2)
      for (const [i, res] of answers.entries()) {
        expect(res.headers.get("x-request-id")).toBe(clientId)
        const rows = yield* eventsOf(ids[i]!)
        expectLifecycle(rows, { requestId: ids[i]!, correlationId: clientId, types: succeeded })
        expect(rows[3]!.data.stream).toBe(i === 1)
      }
    })
  )

  it.effect("under concurrency every stream is gapless and the whole log never shows a version early", () =>
    Effect.gen(function* () {
      const { gateway } = yield* Stack
      const ids = yield* Effect.forEach(
        Array.from({ length: 30 }, (_, i) => i % 2 === 0),
        (stream) =>
          postChat(gateway.url, { model: "small", messages, stream }).pipe(
            Effect.tap((res) => Effect.promise(() => res.text())),
            Effect.map(gatewayIdOf)
          ),
        { concurrency: "unbounded" }
      )
      expect(new Set(ids).size).toBe(30)
      const rows = yield* query<EventRow>(
        `SELECT ${columns} FROM events WHERE stream_id = ANY($1::text[]) ORDER BY stream_id, stream_version`,
        [ids.map((id) => `request-${id}`)]
      )
      for (const requestId of ids) {
        expectLifecycle(
          rows.filter((row) => row.stream_id === `request-${requestId}`),
          { requestId, correlationId: requestId, types: succeeded }
        )
      }

      // As a projection reads the log: by (transaction_id, position), below the oldest
      // transaction still open (any writer's), so ours show up once those before them end.
      const ours = new Set(ids.map((id) => `request-${id}`))
      const log = yield* Processes.eventually(
        "the events of the 30 requests are below the oldest open transaction",
        Effect.map(
          query<EventRow>(
            `SELECT ${columns} FROM events
             WHERE transaction_id < pg_snapshot_xmin(pg_current_snapshot())
             ORDER BY events.transaction_id, events.position`
          ),
          (log) =>
            log.filter((row) => ours.has(row.stream_id)).length === 30 * succeeded.length ? log : undefined
        )
      )
      const last = new Map<string, number>()
      const early = log.filter((row) => {
        const previous = last.get(row.stream_id) ?? 0
        last.set(row.stream_id, row.stream_version)
        return row.stream_version !== previous + 1
      })
      expect(early.map((row) => `${row.stream_id} v${row.stream_version} at ${row.position}`)).toEqual([])
    })
  )

  it.effect("replaying each projection from the start of the log gives exactly the live tables", () =>
    Effect.gen(function* () {
      const { gateway } = yield* Stack
      // A little more traffic of every kind on top of what the other tests sent.
      yield* Effect.forEach(
        [false, true, false],
        (stream) => postChat(gateway.url, { model: "small", messages, stream }),
        {
          concurrency: 3,
          discard: true
        }
      )
      const database = Layer.provideMerge(
        EventStore.layer(),
        PgClient.layer({ url: Redacted.make(gateway.databaseUrl), maxConnections: 2 })
      )
      const quiet = Layer.succeed(Progress.Progress, { update: () => Effect.void, log: () => Effect.void })
      for (const projection of Projections.all) {
        const outcome = yield* Replay.replay({
          projection,
          from: Option.none(),
          verify: true,
          batchSize: 7
        }).pipe(Effect.provide(Layer.merge(database, quiet)))
        expect(outcome.eventsApplied).toBeGreaterThan(0)
        expect(outcome.diffs.filter((d) => !Replay.identical({ ...outcome, diffs: [d] }))).toEqual([])
      }
      // And the bill is priced: tokens times the recorded price table, exactly.
      const { sql } = yield* Stack
      const [usage] = yield* sql<{ prompt: string; completion: string; cost: string }>`
        SELECT sum(prompt_tokens)::text AS prompt, sum(completion_tokens)::text AS completion,
               sum(cost_usd)::text AS cost FROM usage_hourly`
      const expected = (Number(usage!.prompt) * 0.15 + Number(usage!.completion) * 0.6) / 1e6
      expect(Number(usage!.cost)).toBeCloseTo(expected, 9)
    })
  )
})
