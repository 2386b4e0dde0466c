/**
 * Dead-letter recovery end to end, on real gateway processes in front of a real simulator that
 * fails and heals: a request that fails every attempt is dead-lettered with its reason; once the
 * backend heals a retry (`POST /admin/dead-letters/{id}/retry`) completes it on the same stream,
 * billed once; two concurrent retries — on one replica or on two sharing the database — run once;
 * a discard records why; a request whose payload was not stored in full is refused; and a replay
 * of `dead_letters` from the start of the log gives exactly the live table.
 */
import { PgClient } from "@effect/sql-pg"
import { expect, layer } from "@effect/vitest"
import * as Progress from "@gateway/cli/Progress"
import * as Replay from "@gateway/cli/Replay"
import { Projections } from "@gateway/core"
import { EventStore } from "@gateway/event-store"
import { Context, Effect, Layer, Option, Redacted } from "effect"
import * as Admin from "./support/Admin.js"
import * as EventLog from "./support/EventLog.js"
import { messages, postChat, readSse } from "./support/Http.js"
import * as Processes from "./support/Processes.js"

const model = "small"
const outputTokens = 8

/** Two attempts per request (a retry on the one replica), no breaker or ejection in the way. */
const pool = {
  retry: { max_attempts: 2, base_delay_ms: 5, max_delay_ms: 10 },
  circuit_breaker: { consecutive_failures: 1_000_000, minimum_requests: 1_000_000 },
  health: { active: false, eject_after_failures: 0 }
}

const gatewayConfig = (simUrl: string, storePayloads: "full" | "hash") => ({
  server: { host: "127.0.0.1" },
  pool,
  events: { store_payloads: storePayloads },
  models: [
    {
      name: model,
      pricing: { input_per_million_usd: 0.15, output_per_million_usd: 0.6 },
      backends: [{ id: "small-1", url: simUrl }]
    }
  ]
})

class Stack extends Context.Tag("test/DeadLetters/Stack")<
  Stack,
  {
    readonly sim: Processes.Sim
    readonly adminKey: string
    /** Records request bodies in full. */
    readonly gateway: Processes.Gateway
    /** A second replica on the same database, recording only a hash of each body. */
    readonly hashing: Processes.Gateway
    readonly events: EventLog.EventLog
    readonly databaseUrl: string
  }
>() {
  static readonly layer = Layer.scoped(
    Stack,
    Effect.gen(function* () {
      const adminKey = Admin.newAdminKey()
      const [databaseUrl, simPort] = yield* Effect.all([Processes.freshDatabase, Processes.freePort])
      const simUrl = `http://127.0.0.1:${simPort}`
      const start = (storePayloads: "full" | "hash") =>
        Effect.flatMap(Processes.tempDir, (spoolDir) =>
          Processes.startGatewayOn(gatewayConfig(simUrl, storePayloads), {
            databaseUrl,
            spoolDir,
            env: Admin.authEnv(adminKey)
          })
        )
      const [sim, gateway] = yield* Effect.all(
        [
          Processes.startSim({ port: simPort, model, ttftMs: 5, itlMs: 1, outputTokens, seed: 1 }),
          start("full")
        ],
        { concurrency: 2 }
      )
      // Started on the migrated database.
      const hashing = yield* start("hash")
      const events = yield* EventLog.make(databaseUrl)
      return { sim, adminKey, gateway, hashing, events, databaseUrl }
    })
  )
}

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/** A fresh tenant's key (so its usage is this test's alone). */
const newKey = Effect.gen(function* () {
  const { gateway, adminKey } = yield* Stack
  const tenant = `t-${crypto.randomUUID().slice(0, 8)}`
  return yield* Admin.createKey(gateway.url, adminKey, { tenant, name: "app" })
})

/** Sends a chat request with `key` to `url`; returns its gateway request id and status. */
const ask = (url: string, key: string, stream = false) =>
  Effect.gen(function* () {
    const res = yield* postChat(url, { model, messages, stream }, { headers: Admin.bearer(key) })
    const id = res.headers.get("x-gateway-request-id")!
    if (stream && res.status === 200) yield* readSse(res)
    else yield* Effect.promise(() => res.text())
    return { id, status: res.status }
  })

/** Waits until the replica at `url` knows `key` (a replica learns new keys from the log). */
const knownTo = (url: string, key: string) =>
  Processes.eventually(
    `the key known to ${url}`,
    Effect.promise(() =>
      fetch(`${url}/v1/models`, { headers: Admin.bearer(key) }).then(async (res) => {
        await res.arrayBuffer()
        return res.status === 200 ? true : undefined
      })
    ),
    "10 seconds"
  )

/** A request through `url` while the backend fails every attempt with 503. */
const failingRequest = (url: string, key: string, stream = false) =>
  Effect.scoped(
    Effect.gen(function* () {
      const { sim } = yield* Stack
      yield* sim.withConfig({ errorRate: 1, errorStatus: 503 })
      const { id, status } = yield* ask(url, key, stream)
      expect(status).toBe(503)
      return id
    })
  )

const admin = (method: string, path: string, body?: unknown, expected = 200) =>
  Effect.flatMap(Stack, ({ gateway, adminKey }) =>
    Admin.adminCall(gateway.url, adminKey, method, path, body, expected)
  )

/** Any admin call, answering its status and JSON body whatever they are. */
const adminRaw = (baseUrl: string, method: string, path: string, body?: unknown) =>
  Effect.flatMap(Stack, ({ adminKey }) =>
    Effect.promise(async () => {
      const res = await fetch(`${baseUrl}${path}`, {
        method,
        headers: { authorization: `Bearer ${adminKey}`, "content-type": "application/json" },
        ...(body === undefined ? {} : { body: JSON.stringify(body) })
      })
      return { status: res.status, body: (await res.json()) as any }
    })
  )

/** Waits until the letter of `id` is listed (the projection has caught up) and matches `check`. */
const letterOf = (id: string, check: (letter: any) => boolean = () => true) =>
  Processes.eventually(
    `dead letter ${id} listed`,
    Effect.map(admin("GET", "/admin/dead-letters?limit=500"), (list: any) => {
      const letter = list.data.find((l: any) => l.id === id)
      return letter !== undefined && check(letter) ? letter : undefined
    }),
    "10 seconds"
  )

/** Waits until `id` has no letter any more. */
const noLetter = (id: string) =>
  Processes.eventually(
    `dead letter ${id} cleared`,
    Effect.map(admin("GET", "/admin/dead-letters?limit=500"), (list: any) =>
      list.data.some((l: any) => l.id === id) ? undefined : true
    ),
    "10 seconds"
  )

const typesOf = (id: string) =>
  Effect.flatMap(Stack, ({ events }) =>
    events.query<{ type: string; stream_version: number; data: any }>(
      `SELECT type, stream_version, data FROM events WHERE stream_id = $1 ORDER BY stream_version`,
      [`request-${id}`]
    )
  )

const afterLastRetry = (rows: ReadonlyArray<{ type: string }>) => {
  const at = rows.map((r) => r.type).lastIndexOf("DeadLetterRetried")
  return rows.slice(at).map((r) => r.type)
}

const failedRun = [
  "RequestRouted",
  "AttemptStarted",
  "AttemptFailed",
  "RequestRouted",
  "AttemptStarted",
  "AttemptFailed",
  "RequestFailed"
]

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

layer(Stack.layer, { excludeTestServices: true, timeout: "60 seconds" })("dead letters", (it) => {
  it.effect(
    "a request failing every attempt is dead-lettered with its reason; a retry that fails again keeps it, counted",
    () =>
      Effect.gen(function* () {
        const { gateway } = yield* Stack
        const key = yield* newKey
        const id = yield* failingRequest(gateway.url, key.key)
        const letter = yield* letterOf(id)
        expect(letter).toMatchObject({
          id,
          object: "dead_letter",
          tenant: key.tenant,
          key_id: key.id,
          model,
          status: 503,
          reason: "Http",
          attempts: 2,
          retries: 0,
          last_retry_at: null,
          last_retry_outcome: null,
          retryable: true
        })
        const detail = yield* admin("GET", `/admin/dead-letters/${id}`)
        expect(detail.events.map((e: any) => e.type)).toEqual(["RequestReceived", ...failedRun])
        expect(detail.events[0].data.payload.kind).toBe("full")

        // Still failing: the retry runs, fails again, and the letter stays with the retry counted.
        const outcome = yield* Effect.scoped(
          Effect.gen(function* () {
            const { sim } = yield* Stack
            yield* sim.withConfig({ errorRate: 1, errorStatus: 503 })
            return yield* admin("POST", `/admin/dead-letters/${id}/retry`)
          })
        )
        expect(outcome).toMatchObject({ id, outcome: "dead_lettered_again", retry: 1, status: 503 })
        const rows = yield* typesOf(id)
        expect(rows.map((r) => r.type)).toEqual([
          "RequestReceived",
          ...failedRun,
          "DeadLetterRetried",
          ...failedRun
        ])
        expect(rows.map((r) => r.stream_version)).toEqual(rows.map((_, i) => i + 1))
        expect(rows[8]!.data).toMatchObject({
          by: "admin",
          retry: 1,
          previousStatus: 503,
          previousReason: "Http"
        })
        const after = yield* letterOf(id, (l) => l.retries === 1 && l.last_retry_outcome === "failed")
        expect(after).toMatchObject({ status: 503, last_retry_by: "admin", retryable: true })
        expect(new Date(after.last_retry_at).getTime()).toBeGreaterThanOrEqual(
          new Date(letter.dead_at).getTime()
        )
      })
  )

  it.effect(
    "once the backend heals, a retry completes it on the same stream, billed once, and clears the letter",
    () =>
      Effect.gen(function* () {
        const { gateway, events } = yield* Stack
        const key = yield* newKey
        const id = yield* failingRequest(gateway.url, key.key)
        yield* letterOf(id)

        const outcome = yield* admin("POST", `/admin/dead-letters/${id}/retry`)
        expect(outcome).toEqual({
          id,
          object: "dead_letter.retry",
          outcome: "completed",
          retry: 1,
          status: 200,
          error: null
        })
        const rows = yield* typesOf(id)
        expect(rows.map((r) => r.type)).toEqual([
          "RequestReceived",
          ...failedRun,
          "DeadLetterRetried",
          "RequestRouted",
          "AttemptStarted",
          "RequestCompleted"
        ])
        expect(rows.map((r) => r.stream_version)).toEqual(rows.map((_, i) => i + 1))
        expect(rows[9]!.data).toMatchObject({ why: "retry" })
        const completed = rows[rows.length - 1]!.data
        expect(completed.completionTokens).toBe(outputTokens)
        // A retry is traffic: its access line, with what it used, as for any request.
        const line = yield* Processes.eventually(
          "the retry's access line",
          Effect.sync(() =>
            gateway.logs().find((l) => l.msg === "request" && l.method === "RETRY" && l.request_id === id)
          ),
          "3 seconds"
        )
        expect(line).toMatchObject({
          path: "DeadLetters.retry",
          status: 200,
          tenant: key.tenant,
          key_id: key.id,
          model,
          completion_tokens: outputTokens
        })
        // …and in the request metrics: the tenant's first answer, after its failure.
        const { adminKey } = yield* Stack
        const exposition = yield* Effect.promise(() =>
          fetch(`${gateway.url}/metrics`, { headers: Admin.bearer(adminKey) }).then((r) => r.text())
        )
        const counted = (statusClass: string) =>
          exposition
            .split("\n")
            .filter(
              (l) =>
                l.startsWith("gateway_requests_total{") &&
                l.includes(`tenant="${key.tenant}"`) &&
                l.includes(`status_class="${statusClass}"`)
            )
            .reduce((sum, l) => sum + Number(l.split(" ").at(-1)), 0)
        expect([counted("2xx"), counted("5xx")]).toEqual([1, 1])

        yield* noLetter(id)
        yield* admin("GET", `/admin/dead-letters/${id}`, undefined, 404)
        // Done is done: a second retry finds nothing to run.
        const again = yield* adminRaw(gateway.url, "POST", `/admin/dead-letters/${id}/retry`)
        expect(again.status).toBe(404)
        expect(again.body.error.code).toBe("dead_letter_not_found")

        // Billed once, for the retry's answer; the audit log shows it completed.
        yield* events.caughtUp("10 seconds")
        const usage = yield* Admin.usage(gateway.url, (yield* Stack).adminKey, { key: key.id })
        expect(usage.total).toMatchObject({ requests: 1, completion_tokens: outputTokens })
        expect(usage.total.prompt_tokens).toBe(completed.promptTokens)
        const [log] = yield* events.query<any>(
          `SELECT outcome, http_status, completion_tokens, attempts, error FROM request_log WHERE request_id = $1`,
          [id]
        )
        expect(log).toMatchObject({
          outcome: "completed",
          http_status: 200,
          completion_tokens: outputTokens,
          attempts: 1,
          error: null
        })
      })
  )

  it.effect("two concurrent retries of a streamed request, on one replica or two, run it once", () =>
    Effect.gen(function* () {
      const { gateway, hashing, sim } = yield* Stack
      const key = yield* newKey
      const id = yield* failingRequest(gateway.url, key.key, true)
      yield* letterOf(id)
      // A slow answer, so that the retries overlap.
      const results = yield* Effect.scoped(
        Effect.gen(function* () {
          yield* sim.withConfig({ ttftMs: 300 })
          return yield* Effect.all(
            [gateway.url, gateway.url, hashing.url].map((url) =>
              adminRaw(url, "POST", `/admin/dead-letters/${id}/retry`)
            ),
            { concurrency: "unbounded" }
          )
        })
      )
      const ran = results.filter((r) => r.status === 200)
      const refused = results.filter((r) => r.status !== 200)
      expect(ran.map((r) => r.body.outcome)).toEqual(["completed"])
      expect(refused.map((r) => [r.status, r.body.error.code])).toEqual([
        [409, "retry_in_progress"],
        [409, "retry_in_progress"]
      ])
      const rows = yield* typesOf(id)
      expect(rows.filter((r) => r.type === "DeadLetterRetried")).toHaveLength(1)
      expect(afterLastRetry(rows)).toEqual([
        "DeadLetterRetried",
        "RequestRouted",
        "AttemptStarted",
        "RequestCompleted"
      ])
      expect(rows.find((r) => r.type === "RequestCompleted")!.data).toMatchObject({
        stream: true,
        status: 200
      })
      yield* noLetter(id)
    })
  )

  it.effect("a discard records why and who, and the letter is gone for good", () =>
    Effect.gen(function* () {
      const { gateway } = yield* Stack
      const key = yield* newKey
      const id = yield* failingRequest(gateway.url, key.key)
      yield* letterOf(id)
      const missingReason = yield* adminRaw(gateway.url, "POST", `/admin/dead-letters/${id}/discard`, {})
      expect(missingReason.status).toBe(400)
      const discarded = yield* admin("POST", `/admin/dead-letters/${id}/discard`, {
        reason: "the customer gave up"
      })
      expect(discarded).toMatchObject({ id, discarded: true, discard_reason: "the customer gave up" })
      const rows = yield* typesOf(id)
      expect(rows[rows.length - 1]).toMatchObject({
        type: "DeadLetterDiscarded",
        data: { reason: "the customer gave up", by: "admin" }
      })
      yield* noLetter(id)
      const retry = yield* adminRaw(gateway.url, "POST", `/admin/dead-letters/${id}/retry`)
      expect(retry.status).toBe(404)
      const again = yield* adminRaw(gateway.url, "POST", `/admin/dead-letters/${id}/discard`, { reason: "x" })
      expect(again.status).toBe(404)
    })
  )

  it.effect("a payload not stored in full, or a key revoked since, is refused and nothing runs", () =>
    Effect.gen(function* () {
      const { gateway, hashing, adminKey } = yield* Stack
      const key = yield* newKey
      yield* knownTo(hashing.url, key.key)
      const hashed = yield* failingRequest(hashing.url, key.key)
      const letter = yield* letterOf(hashed)
      expect(letter.retryable).toBe(false)
      const refused = yield* adminRaw(gateway.url, "POST", `/admin/dead-letters/${hashed}/retry`)
      expect(refused.status).toBe(409)
      expect(refused.body.error.code).toBe("not_retryable_payload_not_stored")

      // In bulk, a refusal is an outcome.
      const bulk = yield* admin("POST", "/admin/dead-letters/retry", { tenant: key.tenant })
      expect(bulk).toEqual({
        object: "list",
        data: [
          {
            id: hashed,
            object: "dead_letter.retry",
            outcome: "not_retryable",
            retry: null,
            status: null,
            error: expect.stringContaining("payload was not stored in full")
          }
        ],
        more: false
      })

      const revokedKey = yield* newKey
      const revoked = yield* failingRequest(gateway.url, revokedKey.key)
      yield* letterOf(revoked)
      yield* Admin.revokeKey(gateway.url, adminKey, revokedKey.id)
      const refusedKey = yield* adminRaw(gateway.url, "POST", `/admin/dead-letters/${revoked}/retry`)
      expect(refusedKey.status).toBe(409)
      expect(refusedKey.body.error.code).toBe("not_retryable_key_revoked")

      for (const id of [hashed, revoked]) {
        const rows = yield* typesOf(id)
        expect(rows.map((r) => r.type)).toEqual(["RequestReceived", ...failedRun])
      }
    })
  )

  it.effect(
    "lists filter and page; a replay of dead_letters (and of the bill and audit log) from the start of the log equals the live table",
    () =>
      Effect.gen(function* () {
        const { databaseUrl, events } = yield* Stack
        yield* events.caughtUp("10 seconds")
        const all = yield* admin("GET", "/admin/dead-letters?limit=500")
        expect(all.data.length).toBeGreaterThanOrEqual(3)
        // Newest first, one page at a time.
        const first = yield* admin("GET", "/admin/dead-letters?limit=2")
        expect(first.data.map((l: any) => l.id)).toEqual(all.data.slice(0, 2).map((l: any) => l.id))
        const second = yield* admin("GET", `/admin/dead-letters?limit=2&cursor=${first.next_cursor}`)
        expect(second.data.map((l: any) => l.id)).toEqual(all.data.slice(2, 4).map((l: any) => l.id))
        const tenant = all.data[0].tenant
        const mine = yield* admin("GET", `/admin/dead-letters?tenant=${tenant}`)
        expect(mine.data.every((l: any) => l.tenant === tenant)).toBe(true)
        expect(mine.data.length).toBeGreaterThanOrEqual(1)
        // A letter with a retry behind it is in there.
        expect(all.data.some((l: any) => l.retries > 0 && l.last_retry_outcome === "failed")).toBe(true)

        const database = Layer.provideMerge(
          EventStore.layer(),
          PgClient.layer({ url: Redacted.make(databaseUrl), maxConnections: 2 })
        )
        const quiet = Layer.succeed(Progress.Progress, { update: () => Effect.void, log: () => Effect.void })
        for (const batchSize of [1, 7, 1000]) {
          const outcome = yield* Replay.replay({
            projection: Projections.DeadLetters.projection,
            from: Option.none(),
            verify: true,
            batchSize
          }).pipe(Effect.provide(Layer.merge(database, quiet)))
          expect(outcome.eventsApplied).toBeGreaterThan(0)
          expect(outcome.diffs).toHaveLength(1)
          expect(outcome.diffs[0]).toMatchObject({ liveRows: all.data.length, rebuiltRows: all.data.length })
          expect(Replay.identical(outcome)).toBe(true)
        }
        // And the bill and the audit log, with streams that failed and were completed by a retry.
        for (const projection of [Projections.UsageHourly.projection, Projections.RequestLog.projection]) {
          const outcome = yield* Replay.replay({
            projection,
            from: Option.none(),
            verify: true,
            batchSize: 7
          }).pipe(Effect.provide(Layer.merge(database, quiet)))
          expect(Replay.identical(outcome)).toBe(true)
        }
      })
  )
})
