/**
 * The operator CLI against a real PostgreSQL database with the live projection runner going:
 * `replay` rebuilds a projection, compares it row by row with the live one and swaps it in (or,
 * with `--verify`, only reports), again and again; `events show|tail` and `projections status`
 * read the log as an operator would. Commands run through the CLI's own parser and handlers;
 * one runs as the real process, for its exit code.
 */
import { execFile } from "node:child_process"
import { fileURLToPath } from "node:url"
import { NodeContext } from "@effect/platform-node"
import { SqlClient } from "@effect/sql"
import { expect, layer } from "@effect/vitest"
import { Projections } from "@gateway/core"
import { Events, Ids } from "@gateway/domain"
import { Database, EventStore, Projection, ProjectionRunner } from "@gateway/event-store"
import { Config, Effect, Either, Exit, Fiber, Layer, Option, Schedule, Stream } from "effect"
import * as Programs from "../../../test/support/Programs.js"
import * as Cli from "../src/Cli.js"
import * as LogCursor from "../src/LogCursor.js"
import * as Progress from "../src/Progress.js"
import * as Replay from "../src/Replay.js"

const root = fileURLToPath(new URL("../../../", import.meta.url))

// ---------------------------------------------------------------------------------------------
// Synthetic traffic: request lifecycles shaped as the domain encodes them
// ---------------------------------------------------------------------------------------------

const hourStart = Date.parse("2026-11-21T10:00:00.000Z")
const models = ["gpt-4o-mini", "llama-3-70b"] as const
const tenants = ["acme", "globex"] as const
const keys = ["key-1", "key-2", "key-3"] as const

/** What usage_hourly must add up to. */
interface Totals {
  requests: number
  promptTokens: number
}

const encode = (type: string, data: Record<string, unknown>) =>
  Events.encodeRequestEvent(Either.getOrThrow(Events.decodeRequestEvent(type, data)))

let sequence = 0

/** One request's events: received, routed, attempted, then completed or failed; or rejected. */
const lifecycle = (i: number, options: { readonly clientId?: string } = {}) => {
  const requestId = `req-${++sequence}-${Math.random().toString(36).slice(2, 8)}`
  const model = models[i % models.length]!
  const tenantId = tenants[i % tenants.length]!
  const keyId = keys[i % keys.length]!
  const backend = `sim-${i % 2}`
  const at = hourStart + ((i * 7_919) % 120) * 60_000 // spread over two hours
  const meta = (offsetMs: number) =>
    Events.makeMetadata({
      requestId: Ids.RequestId.make(requestId),
      ...(options.clientId === undefined ? {} : { correlationId: options.clientId }),
      traceId: "4bf92f3577b34da6a3ce929d0e0e4736",
      spanId: "00f067aa0ba902b7",
      keyId: Ids.KeyId.make(keyId),
      tenantId: Ids.TenantId.make(tenantId),
      occurredAt: at + offsetMs
    })
  const event = (type: string, data: Record<string, unknown>, offsetMs: number) => {
    const encoded = encode(type, data)
    return { eventId: crypto.randomUUID(), type: encoded.type, data: encoded.data, metadata: meta(offsetMs) }
  }
  const received = event(
    "RequestReceived",
    {
      model,
      stream: i % 3 === 0,
      endpoint: "chat.completions",
      payload: { kind: "hash", sha256: "a".repeat(64), bytes: 180 + i }
    },
    0
  )
  const kind = i % 10 === 9 ? "rejected" : i % 10 === 8 ? "failed" : "completed"
  const promptTokens = 20 + (i % 13)
  const cost = 100 + i * 3
  const events =
    kind === "rejected"
      ? // Turned away before routing: the gateway records the rejection alone.
        [event("RequestRejected", { reason: "rate_limited", status: 429, message: "Slow down" }, 1)]
      : [
          received,
          event("RequestRouted", { model, backend, upstreamModel: `${model}-upstream`, why: "requested" }, 1),
          event("AttemptStarted", { attempt: 1, backend, model }, 2),
          kind === "completed"
            ? event(
                "RequestCompleted",
                {
                  model,
                  backend,
                  promptTokens,
                  completionTokens: 40,
                  usageSource: "backend",
                  cost: { amountMicroUsd: cost, priceVersion: "2026-11" },
                  latencyMs: 500 + i,
                  ttftMs: null,
                  finishReason: "stop",
                  cached: false,
                  stream: false,
                  status: 200
                },
                520 + i
              )
            : event(
                "RequestFailed",
                {
                  status: 502,
                  error: { code: "upstream_error", message: "backend answered 500", reason: "Http" },
                  attempts: 1,
                  lastBackend: backend
                },
                300
              )
        ]
  const totals: Totals =
    kind === "completed" ? { requests: 1, promptTokens } : { requests: 0, promptTokens: 0 }
  return { requestId, write: { streamId: `request-${requestId}`, firstVersion: 1, events }, totals }
}

const expected: Totals = { requests: 0, promptTokens: 0 }

/** Appends `count` requests in transactions of 25, and waits for the live projections. */
const record = (count: number) =>
  Effect.gen(function* () {
    const store = yield* EventStore.EventStore
    const requests = Array.from({ length: count }, (_, i) => lifecycle(i))
    for (let i = 0; i < requests.length; i += 25) {
      yield* store.appendBatch(requests.slice(i, i + 25).map((r) => r.write))
    }
    for (const { totals } of requests) {
      expected.requests += totals.requests
      expected.promptTokens += totals.promptTokens
    }
    yield* Effect.flatMap(ProjectionRunner.ProjectionRunner, (runner) => runner.caughtUp)
    return requests
  })

// ---------------------------------------------------------------------------------------------
// Running the CLI
// ---------------------------------------------------------------------------------------------

/** The CLI on `args`, on this test's database, its stdout and stderr captured line by line. */
const cli = (...args: Array<string>) =>
  Effect.gen(function* () {
    const database = Layer.succeedContext(
      yield* Effect.context<SqlClient.SqlClient | EventStore.EventStore>()
    )
    const stdout: Array<string> = []
    const stderr: Array<string> = []
    const console = yield* Effect.console
    const capture =
      (into: Array<string>) =>
      (...parts: ReadonlyArray<unknown>) =>
        Effect.sync(() => {
          into.push(...parts.map(String).join(" ").split("\n"))
        })
    const run = Cli.run({ store: database, following: database })(["node", "gateway", ...args]).pipe(
      Effect.provide(Progress.layerLines(0)),
      Effect.provide(NodeContext.layer),
      Effect.withConsole({ ...console, log: capture(stdout), error: capture(stderr) }),
      Effect.exit
    )
    return { stdout, stderr, run }
  })

/** Runs the CLI on `args` to the end. */
const runCli = (...args: Array<string>) =>
  Effect.gen(function* () {
    const { stdout, stderr, run } = yield* cli(...args)
    const exit = yield* run
    return { exit, stdout: stdout.join("\n"), stderr: stderr.join("\n") }
  })

/** The real CLI process (`pnpm cli …`) on this test's database: its exit code and stdout. */
const spawnCli = (...args: Array<string>) =>
  Effect.gen(function* () {
    const sql = yield* SqlClient.SqlClient
    const [row] = yield* sql<{ name: string }>`SELECT current_database() AS name`
    const url = new URL(
      yield* Config.string("TEST_DATABASE_URL").pipe(
        Config.withDefault("postgres://postgres@127.0.0.1:5432/postgres")
      )
    )
    url.pathname = `/${row!.name}`
    return yield* Effect.async<{ code: number; stdout: string; stderr: string }>((resume) => {
      execFile(
        process.execPath,
        Programs.nodeArgs("services/cli/src/main.ts", args),
        {
          cwd: root,
          timeout: 20_000,
          env: {
            ...Object.fromEntries(Object.entries(process.env).filter(([key]) => key !== "NODE_OPTIONS")),
            DATABASE_URL: url.toString()
          }
        },
        (error, stdout, stderr) =>
          resume(Effect.succeed({ code: error === null ? 0 : Number(error.code ?? -1), stdout, stderr }))
      )
    })
  })

// ---------------------------------------------------------------------------------------------
// Reading the tables
// ---------------------------------------------------------------------------------------------

const usageTotals = Effect.flatMap(SqlClient.SqlClient, (sql) =>
  sql<{ requests: number; prompt_tokens: number }>`
    SELECT coalesce(sum(requests), 0)::int AS requests, coalesce(sum(prompt_tokens), 0)::int AS prompt_tokens
    FROM usage_hourly`.pipe(
    Effect.map(
      ([row]): Totals => ({
        requests: row!.requests,
        promptTokens: row!.prompt_tokens
      })
    )
  )
)

/** The table's identity: a swap replaces it by another. */
const tableOid = (table: string) =>
  Effect.flatMap(SqlClient.SqlClient, (sql) =>
    sql<{ oid: number | null }>`SELECT to_regclass(${table})::oid::int AS oid`.pipe(
      Effect.map(([row]) => row?.oid ?? null)
    )
  )

/** Index and constraint names of `table`. */
const namesOn = (table: string) =>
  Effect.flatMap(SqlClient.SqlClient, (sql) =>
    sql<{ name: string }>`
      SELECT c.relname AS name FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
      WHERE i.indrelid = to_regclass(${table})
      UNION ALL SELECT conname FROM pg_constraint WHERE conrelid = to_regclass(${table})
      ORDER BY 1`.pipe(Effect.map((rows) => rows.map((r) => r.name)))
  )

/** A progress reporter that shows nothing, and runs `onLog` on each notable line. */
const quiet = (onLog: (line: string) => Effect.Effect<void> = () => Effect.void) =>
  Layer.succeed(Progress.Progress, { update: () => Effect.void, log: onLog })

/** Waits (up to 3 s) until `condition` holds. */
const poll = (condition: () => boolean) =>
  Effect.suspend(() => (condition() ? Effect.void : Effect.fail("not yet"))).pipe(
    Effect.retry({ schedule: Schedule.spaced("10 millis"), times: 300 }),
    Effect.orDie
  )

const checkpointRows = Effect.flatMap(SqlClient.SqlClient, (sql) =>
  sql<{ name: string }>`SELECT name FROM projection_checkpoints ORDER BY name`.pipe(
    Effect.map((rows) => rows.map((r) => r.name))
  )
)

/** A projection no runner runs: events counted per type. */
const typeCounts: Projection.Projection<Map<string, number>> = {
  name: "type_counts",
  tables: ["type_counts"],
  create: (tables) =>
    Effect.flatMap(SqlClient.SqlClient, (sql) =>
      sql.unsafe(
        `CREATE TABLE IF NOT EXISTS ${tables("type_counts")} (type text PRIMARY KEY, n bigint NOT NULL)`
      )
    ),
  empty: () => new Map(),
  evolve: (counts, event) => counts.set(event.type, (counts.get(event.type) ?? 0) + 1),
  apply: (counts, tables) =>
    Effect.flatMap(SqlClient.SqlClient, (sql) =>
      sql.unsafe(
        `INSERT INTO ${tables("type_counts")} AS t (type, n) SELECT * FROM unnest($1::text[], $2::bigint[])
         ON CONFLICT (type) DO UPDATE SET n = t.n + excluded.n`,
        [Array.from(counts.keys()), Array.from(counts.values())]
      )
    ).pipe(Effect.asVoid)
}

const TestDatabase = Layer.provideMerge(Database.eventStore, Database.layerTest)
const Live = Layer.provideMerge(
  ProjectionRunner.layer(Projections.all, { pollInterval: "50 millis" }),
  TestDatabase
)

layer(Live, { excludeTestServices: true, timeout: "30 seconds" })("gateway CLI", (it) => {
  it.effect("replay usage_hourly: identical, swapped in, and the live runner keeps applying to it", () =>
    Effect.gen(function* () {
      yield* record(60)
      expect(yield* usageTotals).toEqual(expected)
      const before = yield* tableOid("usage_hourly")

      const { exit, stdout, stderr } = yield* runCli("replay", "usage_hourly")

      expect(Exit.isSuccess(exit)).toBe(true)
      expect(stdout).toMatch(/replay usage_hourly: [\d,]+ events applied from the start of the log/)
      expect(stdout).toMatch(/usage_hourly: identical \(\d+ rows\)/)
      expect(stdout).toContain("swapped: the rebuilt usage_hourly is live; checkpoint usage_hourly stays at")
      expect(stderr).toContain("locking the live checkpoint")
      expect(yield* tableOid("usage_hourly")).not.toBe(before)
      expect(yield* tableOid("usage_hourly_rebuild")).toBeNull()
      expect(yield* namesOn("usage_hourly")).toEqual(["usage_hourly_pkey", "usage_hourly_pkey"])
      expect(yield* checkpointRows).not.toContain("usage_hourly:rebuild")
      expect(yield* usageTotals).toEqual(expected)

      // The runner goes on with the new table from the checkpoint it kept.
      yield* record(20)
      expect(yield* usageTotals).toEqual(expected)
    })
  )

  it.effect("a second replay right after the first works, for every projection", () =>
    Effect.gen(function* () {
      for (const name of ["usage_hourly", "request_log", "dead_letters"]) {
        for (const _ of [1, 2]) {
          const { exit, stdout } = yield* runCli("replay", name, "--batch-size", "50")
          expect(Exit.isSuccess(exit), stdout).toBe(true)
          expect(stdout).toContain("swapped")
          expect(stdout).toContain(`${name}: identical`)
          expect(yield* namesOn(name)).toEqual([`${name}_pkey`, `${name}_pkey`])
          expect(yield* tableOid(`${name}_rebuild`)).toBeNull()
        }
      }
      expect(yield* usageTotals).toEqual(expected)
    })
  )

  it.effect("--verify reports a tampered row and exits 1 without swapping; a replay repairs it", () =>
    Effect.gen(function* () {
      const sql = yield* SqlClient.SqlClient
      const [row] = yield* sql<{ requests: number; tenant_id: string }>`
        UPDATE usage_hourly SET requests = requests + 5
        WHERE (hour, tenant_id, key_id, model) = (SELECT hour, tenant_id, key_id, model FROM usage_hourly ORDER BY 1, 2, 3, 4 LIMIT 1)
        RETURNING requests::int AS requests, tenant_id`
      const before = yield* tableOid("usage_hourly")

      // The real process: its exit code is what a script sees.
      const spawned = yield* spawnCli("replay", "usage_hourly", "--verify")
      expect(spawned.code, spawned.stderr).toBe(1)
      expect(spawned.stdout).toContain(
        "usage_hourly: 1 row only in the rebuilt table, 1 row only in the live table"
      )
      expect(spawned.stdout).toMatch(
        new RegExp(`- \\{.*"requests":${row!.requests},.*"tenant_id":"${row!.tenant_id}"`)
      )
      expect(spawned.stdout).toContain("verified: differences found; nothing swapped")

      const verified = yield* runCli("replay", "usage_hourly", "--verify")
      expect(Exit.isFailure(verified.exit)).toBe(true)
      expect(verified.exit).toStrictEqual(
        Exit.fail(new Replay.DifferencesFound({ projection: "usage_hourly" }))
      )
      expect(yield* tableOid("usage_hourly")).toBe(before)
      expect(yield* tableOid("usage_hourly_rebuild")).toBeNull()
      expect(yield* checkpointRows).not.toContain("usage_hourly:rebuild")
      expect((yield* usageTotals).requests).toBe(expected.requests + 5)

      const repaired = yield* runCli("replay", "usage_hourly")
      expect(Exit.isSuccess(repaired.exit)).toBe(true)
      expect(repaired.stdout).toContain("1 row only in the rebuilt table, 1 row only in the live table")
      expect(repaired.stdout).toContain("swapped")
      expect(yield* usageTotals).toEqual(expected)

      const again = yield* runCli("replay", "usage_hourly", "--verify")
      expect(Exit.isSuccess(again.exit)).toBe(true)
      expect(again.stdout).toContain("verified: identical; nothing swapped")
    })
  )

  it.effect("--from a position rebuilds only the events from there on", () =>
    Effect.gen(function* () {
      const sql = yield* SqlClient.SqlClient
      const [middle] = yield* sql<{ position: string }>`
        SELECT position::text AS position FROM events ORDER BY position
        OFFSET (SELECT count(*) / 2 FROM events) LIMIT 1`
      const { exit, stdout } = yield* runCli("replay", "usage_hourly", "--from", middle!.position, "--verify")
      expect(stdout).toContain(`from after position ${BigInt(middle!.position) - 1n}`)
      expect(stdout).toMatch(/usage_hourly: [\d,]+ rows? only in the rebuilt table/)
      expect(Exit.isFailure(exit)).toBe(true)
      expect(yield* usageTotals).toEqual(expected)

      expect(LogCursor.parse("2026-11-21T18:00:00Z")).toEqual(
        Either.right({ _tag: "Time", time: new Date("2026-11-21T18:00:00Z") })
      )
      const bad = yield* runCli("replay", "usage_hourly", "--from", "yesterday")
      expect(Exit.isFailure(bad.exit)).toBe(true)
      expect(bad.stderr).toContain("neither a position")
    })
  )

  it.effect("a projection never run: its live tables are caught up under the lock, then swapped", () =>
    Effect.gen(function* () {
      const outcome = yield* Replay.replay({
        projection: typeCounts,
        from: Option.none(),
        verify: false,
        batchSize: 100
      }).pipe(Effect.provide(quiet()))
      expect(outcome.eventsApplied).toBeGreaterThan(0)
      expect(outcome.appliedToLive).toBe(outcome.eventsApplied)
      expect(Replay.identical(outcome)).toBe(true)
      expect(outcome.swapped).toBe(true)
    })
  )

  it.effect("events the live side applied while the rebuild finished are applied to it under the lock", () =>
    Effect.gen(function* () {
      const store = yield* EventStore.EventStore
      const context = yield* Effect.context<SqlClient.SqlClient | EventStore.EventStore>()
      yield* typeCounts.create(Projection.liveTables)
      // The live runner's part, played by hand between the end of the rebuild and the lock.
      const liveMovesOn = Effect.gen(function* () {
        yield* store.appendBatch([lifecycle(9).write, lifecycle(19).write]) // two rejections, an event each
        const from = yield* ProjectionRunner.readCheckpoint("type_counts")
        const events = yield* Stream.runCollect(store.readAll(from))
        yield* ProjectionRunner.applyBatch(typeCounts, Projection.liveTables, "type_counts", from, [
          ...events
        ])
      }).pipe(Effect.provide(context), Effect.orDie)

      const outcome = yield* Replay.replay({
        projection: typeCounts,
        from: Option.none(),
        verify: true,
        batchSize: 100
      }).pipe(Effect.provide(quiet((line) => (line.includes("locking") ? liveMovesOn : Effect.void))))

      expect(outcome.appliedUnderLock).toBe(2)
      expect(outcome.appliedToLive).toBe(0)
      expect(Replay.identical(outcome)).toBe(true)
      expect(outcome.swapped).toBe(false)
    })
  )

  it.effect("events show prints one request's lifecycle in order, by request id or x-request-id", () =>
    Effect.gen(function* () {
      const store = yield* EventStore.EventStore
      const request = lifecycle(4, { clientId: "client-abc-123" })
      yield* store.appendBatch([request.write])

      for (const id of [request.requestId, "client-abc-123"]) {
        const { exit, stdout } = yield* runCli("events", "show", id)
        expect(Exit.isSuccess(exit)).toBe(true)
        const lines = stdout.split("\n")
        expect(lines[0]).toBe(`request ${request.requestId}  (4 events)`)
        expect(lines[1]).toContain("x-request-id client-abc-123  tenant acme  key key-2")
        expect(lines.slice(2).map((line) => line.trim().split(/\s+/).slice(0, 4))).toEqual([
          ["v1", "2026-11-21T11:56:00.000Z", "+0ms", "RequestReceived"],
          ["v2", "2026-11-21T11:56:00.001Z", "+1ms", "RequestRouted"],
          ["v3", "2026-11-21T11:56:00.002Z", "+2ms", "AttemptStarted"],
          ["v4", "2026-11-21T11:56:00.524Z", "+524ms", "RequestCompleted"]
        ])
        expect(lines[5]).toContain(
          "model=gpt-4o-mini backend=sim-0 status=200 tokens=24+40 cost=$0.000112 latency=504ms"
        )
      }

      const missing = yield* runCli("events", "show", "no-such-request")
      expect(Exit.isFailure(missing.exit)).toBe(true)
    })
  )

  it.effect("events tail prints new events as they are committed", () =>
    Effect.gen(function* () {
      const store = yield* EventStore.EventStore
      const { stdout, stderr, run } = yield* cli("events", "tail")
      const fiber = yield* Effect.fork(run)
      yield* poll(() => stderr.some((line) => line.startsWith("following the event log")))
      const request = lifecycle(8) // a failure
      yield* store.appendBatch([request.write])
      const ours = () => stdout.filter((line) => line.includes(`request-${request.requestId}`))
      yield* poll(() => ours().length >= 4)
      yield* Fiber.interrupt(fiber)
      expect(ours().map((line) => line.split("  ").slice(2, 4))).toEqual(
        ["RequestReceived", "RequestRouted", "AttemptStarted", "RequestFailed"].map((type) => [
          `request-${request.requestId}`,
          type
        ])
      )
      expect(ours()[3]).toContain(
        'status=502 error="Http: backend answered 500" attempts=1 lastBackend=sim-0'
      )
    })
  )

  it.effect("projections status shows each checkpoint and its lag", () =>
    Effect.gen(function* () {
      const sql = yield* SqlClient.SqlClient
      yield* Effect.flatMap(ProjectionRunner.ProjectionRunner, (runner) => runner.caughtUp)
      // A checkpoint at the very start: its lag is the whole log.
      yield* sql`INSERT INTO projection_checkpoints (name) VALUES ('lagging') ON CONFLICT (name) DO NOTHING`
      const [total] = yield* sql<{ n: string }>`SELECT count(*)::text AS n FROM events`

      const { exit, stdout } = yield* runCli("projections", "status")
      yield* sql`DELETE FROM projection_checkpoints WHERE name = 'lagging'`

      expect(Exit.isSuccess(exit)).toBe(true)
      const rows = stdout.split("\n").map((line) => line.split(/\s+/))
      expect(rows[0]).toEqual(["PROJECTION", "POSITION", "APPLIED", "LAG", "UPDATED", "LAST", "ERROR"])
      const byName = new Map(rows.slice(1).map((row) => [row[0], row]))
      for (const name of ["request_log", "usage_hourly", "dead_letters"]) {
        expect(byName.get(name)?.[3], name).toBe("0")
        expect(Number(byName.get(name)?.[2]), name).toBeGreaterThan(0)
        expect(byName.get(name)?.[5], name).toBe("-")
      }
      expect(byName.get("lagging")?.slice(1, 4)).toEqual(["0", "0", total!.n])
    })
  )
})
