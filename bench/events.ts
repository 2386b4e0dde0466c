/**
 * Event-store benchmark: `pnpm bench:events` (`node --import tsx bench/events.ts --help`).
 *
 * On the real PostgreSQL server, each phase on a fresh database of its own:
 * 1. append: events/s through the group-commit `EventWriter` (`writeAndWait` of a request's four
 *    events) and through the plain optimistic `append` (one statement per call), at several
 *    concurrencies, with the statements counted to give the mean events per statement;
 * 2. replay: fills the log with request-like events, then reads all of it with `readAll` and
 *    folds a `usage_hourly`-like aggregate in memory, checked against PostgreSQL's own sums;
 * 3. recording: the gateway bundle with `GATEWAY_RECORDING=off`, with recording on as shipped
 *    (writer and in-process projections), and with recording on but the projections held off
 *    (their advisory locks held here), the same simulated backend and load, the order rotating
 *    from round to round: gateway and PostgreSQL CPU per request, latency to the end of the
 *    response, what recording adds, and what each gateway left in its database.
 * Every phase reports medians of several rounds. Markdown on stdout, progress on stderr, JSON in
 * bench/results/.
 */
import { execFileSync } from "node:child_process"
import { createHash } from "node:crypto"
import {
  copyFileSync,
  mkdirSync,
  mkdtempSync,
  readdirSync,
  readFileSync,
  rmSync,
  symlinkSync,
  writeFileSync
} from "node:fs"
import { availableParallelism, cpus, loadavg, tmpdir } from "node:os"
import { dirname, join, relative } from "node:path"
import { fileURLToPath } from "node:url"
import { SqlClient } from "@effect/sql"
import { PgClient } from "@effect/sql-pg"
import { Projections } from "@gateway/core"
import { Database, EventStore, EventWriter } from "@gateway/event-store"
import { Context, Effect, Exit, Fiber, Layer, Redacted, Stream } from "effect"
import * as Flags from "./Flags.js"
import * as LoadGen from "./LoadGen.js"
import * as Procs from "./Procs.js"
import * as Report from "./Report.js"
import * as RequestEvents from "./RequestEvents.js"
import * as Stats from "./Stats.js"

const usage = `Usage: pnpm bench:events [--flag value]...
  --phases LIST          which phases to run (append,replay,recording)
  --admin-url URL        PostgreSQL server; fresh databases are created and dropped there
                         (postgres://postgres@127.0.0.1:5432/postgres)
  --pool N               connections of the store's pool, as the gateway's default (10)
 append phase
  --rounds N             rounds; each measures both paths at each concurrency (3)
  --concurrency LIST     concurrent writer fibers (1,16,64,256)
  --duration S           time cap per measured run, seconds (3)
  --writes N             stream writes (of 4 events) cap per measured run (100000)
  --warmup S             unmeasured writes before each run, seconds (0.5)
 replay phase
  --replay-events N      events in the log, a multiple of 4 (1000000)
  --fill sql|batch       how the log is filled: server-side INSERT ... SELECT generate_series (sql)
                         or the store's appendBatch in chunks (batch) (sql)
  --fill-chunk N         events per fill statement (50000 for sql, 5000 for batch)
  --batch-size N         readAll rows per round trip (5000)
  --replay-rounds N      full replays (3)
 recording phase
  --rec-rounds N         rounds, each one run per variant, the order rotating (5)
  --rec-variants LIST    off: GATEWAY_RECORDING=off; on: recording as shipped (writer and the
                         in-process projections); writer: recording on with the projections held
                         off (the benchmark holds their advisory locks) (off,on,writer)
  --rec-concurrency N    closed-loop concurrency (50)
  --rec-duration S       time cap per measured run, seconds (3)
  --rec-requests N       request cap per measured run (20000)
  --ttft-ms N --itl-ms N --output-tokens N   backend-sim (20, 2, 16)
  --gateway-node-args S  extra node flags for both gateways, space-separated, for diagnostics (none)
  --no-pin               do not pin processes with taskset
 all
  --json PATH|none       results file (bench/results/events-<time>.json)
  --wait-quiet S         wait in all up to S seconds, before each run, while other processes
                         use > 25% of a core (60)
  --time-limit S         hard limit of the whole run (1500)`

const options = {
  phases: { type: "string", default: "append,replay,recording" },
  "admin-url": { type: "string", default: "postgres://postgres@127.0.0.1:5432/postgres" },
  pool: { type: "string", default: "10" },
  rounds: { type: "string", default: "3" },
  concurrency: { type: "string", default: "1,16,64,256" },
  duration: { type: "string", default: "3" },
  writes: { type: "string", default: "100000" },
  warmup: { type: "string", default: "0.5" },
  "replay-events": { type: "string", default: "1000000" },
  fill: { type: "string", default: "sql" },
  "fill-chunk": { type: "string" },
  "batch-size": { type: "string", default: "5000" },
  "replay-rounds": { type: "string", default: "3" },
  "rec-rounds": { type: "string", default: "5" },
  "rec-variants": { type: "string", default: "off,on,writer" },
  "rec-concurrency": { type: "string", default: "50" },
  "rec-duration": { type: "string", default: "3" },
  "rec-requests": { type: "string", default: "20000" },
  "ttft-ms": { type: "string", default: "20" },
  "itl-ms": { type: "string", default: "2" },
  "output-tokens": { type: "string", default: "16" },
  "gateway-node-args": { type: "string" },
  "no-pin": { type: "boolean", default: false },
  json: { type: "string" },
  "wait-quiet": { type: "string", default: "60" },
  "time-limit": { type: "string", default: "1500" },
  help: { type: "boolean", short: "h", default: false }
} as const
const { flags, argv, fail, num, int, list } = Flags.parse("bench:events", usage, options)

const recVariants = (raw: string): ReadonlyArray<"off" | "on" | "writer"> => {
  const vs = raw
    .split(",")
    .map((v) =>
      v === "off" || v === "on" || v === "writer" ? v : fail(`--rec-variants: unknown variant '${v}'`)
    )
  return vs.includes("off") && vs.length >= 2 ? vs : fail("--rec-variants must include off and another")
}

const phaseNames = ["append", "replay", "recording"] as const
type Phase = (typeof phaseNames)[number]
const phases = new Set(
  flags.phases
    .split(",")
    .map((p) =>
      (phaseNames as ReadonlyArray<string>).includes(p) ? (p as Phase) : fail(`unknown phase '${p}'`)
    )
)
const fill: "sql" | "batch" =
  flags.fill === "sql" ? "sql" : flags.fill === "batch" ? "batch" : fail("--fill must be sql or batch")
const config = {
  adminUrl: flags["admin-url"],
  pool: int("pool", flags.pool, 1),
  rounds: int("rounds", flags.rounds, 1),
  concurrency: list("concurrency", flags.concurrency),
  durationMs: num("duration", flags.duration, 0.1) * 1000,
  maxWrites: int("writes", flags.writes, 1),
  warmupMs: num("warmup", flags.warmup, 0) * 1000,
  replayEvents: Math.ceil(int("replay-events", flags["replay-events"], 4) / 4) * 4,
  fill,
  fillChunk: int("fill-chunk", flags["fill-chunk"] ?? (fill === "sql" ? "50000" : "5000"), 4),
  batchSize: int("batch-size", flags["batch-size"], 1),
  replayRounds: int("replay-rounds", flags["replay-rounds"], 1),
  recRounds: int("rec-rounds", flags["rec-rounds"], 1),
  recVariants: recVariants(flags["rec-variants"]),
  recConcurrency: int("rec-concurrency", flags["rec-concurrency"], 1),
  recDurationMs: num("rec-duration", flags["rec-duration"], 0.1) * 1000,
  recRequests: int("rec-requests", flags["rec-requests"], 1),
  ttftMs: int("ttft-ms", flags["ttft-ms"], 0),
  itlMs: int("itl-ms", flags["itl-ms"], 0),
  outputTokens: int("output-tokens", flags["output-tokens"], 1),
  gatewayNodeArgs: (flags["gateway-node-args"] ?? "").split(/\s+/).filter((a) => a !== ""),
  waitQuietMs: num("wait-quiet", flags["wait-quiet"], 0) * 1000,
  timeLimitMs: num("time-limit", flags["time-limit"], 10) * 1000
}

const targets = {
  writerEventsPerSec: 20_000,
  replayEventsPerSec: 100_000,
  recordingCpuMs: 0.1,
  recordingP99Ms: 3
} as const

const root = fileURLToPath(new URL("..", import.meta.url))
const workDir = mkdtempSync(join(tmpdir(), "gateway-bench-events-"))
/** The gateway bundle built at the start of the run (recording phase only). */
let gatewayScript: string | undefined
const log = (line: string): void => {
  process.stderr.write(`[bench:events ${new Date().toISOString().slice(11, 19)}] ${line}\n`)
}
const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms))

// --- CPU accounting ---------------------------------------------------------------------------

const cpuCount = availableParallelism()
const pinned = !flags["no-pin"] && cpuCount >= 2 && Procs.hasTaskset()

/** CPU time of a process in ms; 0 once it is gone. */
const pidCpuMs = (pid: number): number => {
  try {
    return Procs.cpuTimeMs(pid)
  } catch {
    return 0
  }
}

/** Pids of every PostgreSQL server process on this machine (the server is not ours to pin). */
const postgresPids = (): ReadonlyArray<number> => {
  const pids: Array<number> = []
  for (const entry of readdirSync("/proc")) {
    if (!/^\d+$/.test(entry)) continue
    try {
      if (readFileSync(`/proc/${entry}/comm`, "utf8").trim() === "postgres") pids.push(Number(entry))
    } catch {
      // gone meanwhile
    }
  }
  return pids
}

/** The admin connection, for the server's settings and for which backends serve our databases. */
let admin: SqlClient.SqlClient | undefined
/** Databases this run created; their backends' CPU counts as ours, other databases' as noise. */
const ourDatabases: Array<string> = []

interface PostgresPids {
  /** Backends connected to the benchmark's databases (including autovacuum workers there). */
  readonly backends: ReadonlyArray<number>
  /** The server's background processes (WAL writer, checkpointer, ...): they work for everyone. */
  readonly background: ReadonlyArray<number>
}

/** PostgreSQL processes that work for this benchmark, wholly or in part. */
const ourPostgresPids = async (): Promise<PostgresPids> => {
  if (admin === undefined) return { backends: [], background: postgresPids() }
  const rows = await Effect.runPromise(
    admin
      .unsafe<{ pid: number; background: boolean }>(
        `SELECT pid, datname IS NULL AS background FROM pg_stat_activity
         WHERE datname IS NULL OR datname = ANY($1::text[])`,
        [ourDatabases]
      )
      .pipe(Effect.orElseSucceed(() => [] as ReadonlyArray<{ pid: number; background: boolean }>))
  )
  const all = new Set(postgresPids())
  const live = rows.filter((r) => all.has(r.pid))
  return {
    backends: live.filter((r) => !r.background).map((r) => r.pid),
    background: live.filter((r) => r.background).map((r) => r.pid)
  }
}

interface CpuSample {
  readonly at: number
  readonly self: number
  readonly pids: ReadonlyMap<number, number>
  readonly pg: ReadonlyMap<number, number>
  readonly sys: Procs.SystemCpu
}

interface CpuUse {
  readonly elapsedMs: number
  readonly selfMs: number
  /** CPU of each of the given child processes, ms. */
  readonly pidMs: ReadonlyArray<number>
  /** PostgreSQL backends serving the benchmark's databases, ms. */
  readonly postgresMs: number
  /** PostgreSQL's background processes (also working for anyone else on the server), ms. */
  readonly postgresBgMs: number
  /** Everything else on the machine, % of one core; and time stolen by the hypervisor. */
  readonly otherPct: number
  readonly stealPct: number
}

const sampleCpu = async (pids: ReadonlyArray<number>): Promise<CpuSample> => {
  const pg = await ourPostgresPids()
  return {
    at: performance.now(),
    self: Procs.selfCpuMs(),
    pids: new Map(pids.map((p) => [p, pidCpuMs(p)])),
    pg: new Map([...pg.backends, ...pg.background].map((p) => [p, pidCpuMs(p)])),
    sys: Procs.systemCpu()
  }
}

const cpuSince = async (s0: CpuSample): Promise<CpuUse> => {
  const pg = await ourPostgresPids()
  const sys = Procs.systemCpu()
  const self = Procs.selfCpuMs()
  const pidMs = [...s0.pids].map(([pid, t0]) => pidCpuMs(pid) - t0)
  // Backends that connected meanwhile count from 0; those that ended meanwhile are lost.
  const used = (pids: ReadonlyArray<number>) =>
    pids.reduce((t, pid) => t + Math.max(0, pidCpuMs(pid) - (s0.pg.get(pid) ?? 0)), 0)
  const postgresMs = used(pg.backends)
  const postgresBgMs = used(pg.background)
  const elapsedMs = performance.now() - s0.at
  const ours = self - s0.self + pidMs.reduce((a, b) => a + b, 0) + postgresMs + postgresBgMs
  const pct = (ms: number) => (100 * ms) / elapsedMs
  return {
    elapsedMs,
    selfMs: self - s0.self,
    pidMs,
    postgresMs,
    postgresBgMs,
    otherPct: Math.max(0, pct(sys.busyMs - s0.sys.busyMs - ours)),
    stealPct: pct(sys.stealMs - s0.sys.stealMs)
  }
}

const noisyPct = 25
let quietBudgetMs = config.waitQuietMs
let waitedMs = 0

/** Waits (within the `--wait-quiet` budget) while others use more than `noisyPct` % of a core. */
const waitQuiet = async (pids: ReadonlyArray<number>): Promise<void> => {
  let logged = false
  while (quietBudgetMs > 0) {
    const s0 = await sampleCpu(pids)
    await sleep(250)
    const use = await cpuSince(s0)
    const other = use.otherPct + use.stealPct
    if (other < noisyPct) return
    quietBudgetMs -= use.elapsedMs
    waitedMs += use.elapsedMs
    if (!logged) log(`waiting for other processes to go quiet (${Math.round(other)}% of a core)`)
    logged = true
  }
}

const noisy = (u: { readonly otherPct: number; readonly stealPct: number }) =>
  u.otherPct + u.stealPct > noisyPct

/** A fresh, empty database on the server, dropped when the scope closes; its URL. */
const dbName = (url: string) => new URL(url).pathname.slice(1)

const fresh = Effect.gen(function* () {
  const url = yield* Database.freshPostgres(config.adminUrl)
  ourDatabases.push(dbName(url))
  return url
})

/** Writes out what earlier work left dirty, so that it is not flushed during the next measurement. */
const checkpoint = Effect.suspend(() => {
  const t0 = performance.now()
  return admin === undefined
    ? Effect.void
    : admin`CHECKPOINT`.pipe(
        Effect.tap(() =>
          Effect.sync(() => log(`CHECKPOINT ${((performance.now() - t0) / 1000).toFixed(1)} s`))
        ),
        Effect.asVoid,
        Effect.orDie
      )
})

// --- Phase 1: append throughput --------------------------------------------------------------

type AppendPath = "writer" | "append"

interface AppendRun {
  readonly path: AppendPath
  readonly concurrency: number
  readonly round: number
  readonly writes: number
  readonly events: number
  readonly errors: number
  readonly firstError: string | undefined
  readonly elapsedMs: number
  readonly eventsPerSec: number
  readonly p50Ms: number | undefined
  readonly p99Ms: number | undefined
  readonly statements: number
  readonly eventsPerStatement: number | undefined
  readonly maxEventsPerStatement: number
  readonly selfCpuPct: number
  readonly postgresCpuPct: number
  readonly postgresBgCpuPct: number
  readonly selfCpuMs: number
  readonly postgresCpuMs: number
  readonly otherPct: number
  readonly stealPct: number
}

/** Statements issued through the store, and the events in them. */
const counters = { statements: 0, events: 0, maxEvents: 0 }
const count = (events: number) => {
  counters.statements++
  counters.events += events
  if (events > counters.maxEvents) counters.maxEvents = events
}

/** The real store with every statement counted. */
const Counted = Layer.effect(
  EventStore.EventStore,
  Effect.map(EventStore.EventStore, (store) =>
    EventStore.EventStore.of({
      ...store,
      append: (streamId, events, expected) =>
        Effect.suspend(() => {
          count(events.length)
          return store.append(streamId, events, expected)
        }),
      appendBatch: (writes) =>
        Effect.suspend(() => {
          let n = 0
          for (const w of writes) n += w.events.length
          count(n)
          return store.appendBatch(writes)
        })
    })
  )
)

/** The store as the gateway has it: PostgreSQL, migrated, LISTEN for other replicas' appends. */
const storeLayer = (url: string) =>
  Database.eventStore.pipe(
    Layer.provideMerge(Database.layerPostgres(Redacted.make(url), { maxConnections: config.pool }))
  )

interface Load {
  readonly writes: number
  readonly errors: number
  readonly firstError: string | undefined
  readonly elapsedMs: number
  readonly latencyMs: Float64Array
}

/** `concurrency` fibers writing a request's four events each, until `maxWrites` or `durationMs`. */
const appendLoad = (
  path: AppendPath,
  concurrency: number,
  maxWrites: number,
  durationMs: number,
  seed: number
) =>
  Effect.gen(function* () {
    const writer = yield* EventWriter.EventWriter
    const store = yield* EventStore.EventStore
    const random = RequestEvents.rng(seed)
    const latency = new Float64Array(maxWrites)
    let issued = 0
    let done = 0
    let errors = 0
    let firstError: string | undefined
    const one = (w: EventStore.StreamWrite): Effect.Effect<void, { readonly message: string }> =>
      path === "writer" ? writer.writeAndWait(w) : Effect.asVoid(store.append(w.streamId, w.events, 0))
    const start = performance.now()
    const deadline = start + durationMs
    const worker = Effect.gen(function* () {
      while (issued < maxWrites && performance.now() < deadline) {
        issued++
        const w = RequestEvents.requestWrite(random, Date.now())
        const t0 = performance.now()
        const result = yield* Effect.either(one(w))
        if (result._tag === "Left") {
          errors++
          firstError ??= result.left.message
        } else latency[done++] = performance.now() - t0
      }
    })
    yield* Effect.all(
      Array.from({ length: concurrency }, () => worker),
      { concurrency: "unbounded", discard: true }
    ).pipe(
      Effect.timeoutFail({
        duration: durationMs + 60_000,
        onTimeout: () => new Error(`${path} c=${concurrency}: writes did not finish within 60 s`)
      })
    )
    return {
      writes: done,
      errors,
      firstError,
      elapsedMs: performance.now() - start,
      latencyMs: latency.slice(0, done).sort()
    } satisfies Load
  })

const appendRun = (path: AppendPath, concurrency: number, round: number) =>
  Effect.gen(function* () {
    yield* Effect.promise(() => waitQuiet([]))
    const seed = round * 1000 + concurrency * 10 + (path === "writer" ? 1 : 2)
    if (config.warmupMs > 0) yield* appendLoad(path, concurrency, config.maxWrites, config.warmupMs, seed + 7)
    const c0 = { ...counters }
    const cpu0 = yield* Effect.promise(() => sampleCpu([]))
    counters.maxEvents = 0
    const load = yield* appendLoad(path, concurrency, config.maxWrites, config.durationMs, seed)
    const cpu = yield* Effect.promise(() => cpuSince(cpu0))
    const statements = counters.statements - c0.statements
    const stmtEvents = counters.events - c0.events
    const pct = (ms: number) => (100 * ms) / cpu.elapsedMs
    const run: AppendRun = {
      path,
      concurrency,
      round,
      writes: load.writes,
      events: load.writes * 4,
      errors: load.errors,
      firstError: load.firstError,
      elapsedMs: load.elapsedMs,
      eventsPerSec: (1000 * load.writes * 4) / load.elapsedMs,
      p50Ms: Stats.percentile(load.latencyMs, 50),
      p99Ms: Stats.percentile(load.latencyMs, 99),
      statements,
      eventsPerStatement: statements > 0 ? stmtEvents / statements : undefined,
      maxEventsPerStatement: counters.maxEvents,
      selfCpuPct: pct(cpu.selfMs),
      postgresCpuPct: pct(cpu.postgresMs),
      postgresBgCpuPct: pct(cpu.postgresBgMs),
      selfCpuMs: cpu.selfMs,
      postgresCpuMs: cpu.postgresMs,
      otherPct: cpu.otherPct,
      stealPct: cpu.stealPct
    }
    log(
      `${path.padEnd(6)} c=${String(concurrency).padEnd(3)} round ${round}: ${Report.rps(run.eventsPerSec)} events/s, ` +
        `${Report.fixed(run.eventsPerStatement, 1)} events/statement, p99 ${Report.fixed(run.p99Ms, 2)} ms, ` +
        `bench ${Math.round(run.selfCpuPct)}% pg ${Math.round(run.postgresCpuPct)}% other ${Math.round(run.otherPct + run.stealPct)}%` +
        (run.errors > 0 ? `, ${run.errors} errors (first: ${run.firstError})` : "")
    )
    return run
  })

interface AppendSummary {
  readonly path: AppendPath
  readonly concurrency: number
  readonly eventsPerSec: number | undefined
  readonly writesPerSec: number | undefined
  readonly p50Ms: number | undefined
  readonly p99Ms: number | undefined
  readonly statementsPerSec: number | undefined
  readonly eventsPerStatement: number | undefined
  readonly maxEventsPerStatement: number | undefined
  readonly selfCpuPct: number | undefined
  readonly postgresCpuPct: number | undefined
  readonly postgresBgCpuPct: number | undefined
  /** CPU time per event committed, µs. */
  readonly selfCpuUsPerEvent: number | undefined
  readonly postgresCpuUsPerEvent: number | undefined
  readonly otherPct: number | undefined
  readonly errors: number
  readonly noisyRuns: number
  readonly rounds: number
}

const summarizeAppend = (runs: ReadonlyArray<AppendRun>): AppendSummary => {
  const med = (f: (r: AppendRun) => number | undefined) => Stats.median(runs.map(f))
  return {
    path: runs[0]!.path,
    concurrency: runs[0]!.concurrency,
    eventsPerSec: med((r) => r.eventsPerSec),
    writesPerSec: med((r) => r.eventsPerSec / 4),
    p50Ms: med((r) => r.p50Ms),
    p99Ms: med((r) => r.p99Ms),
    statementsPerSec: med((r) => (1000 * r.statements) / r.elapsedMs),
    eventsPerStatement: med((r) => r.eventsPerStatement),
    maxEventsPerStatement: Stats.max(runs.map((r) => r.maxEventsPerStatement)),
    selfCpuPct: med((r) => r.selfCpuPct),
    postgresCpuPct: med((r) => r.postgresCpuPct),
    postgresBgCpuPct: med((r) => r.postgresBgCpuPct),
    selfCpuUsPerEvent: med((r) => (r.events > 0 ? (1000 * r.selfCpuMs) / r.events : undefined)),
    postgresCpuUsPerEvent: med((r) => (r.events > 0 ? (1000 * r.postgresCpuMs) / r.events : undefined)),
    otherPct: med((r) => r.otherPct + r.stealPct),
    errors: runs.reduce((n, r) => n + r.errors, 0),
    noisyRuns: runs.filter(noisy).length,
    rounds: runs.length
  }
}

interface AppendResult {
  readonly summaries: ReadonlyArray<AppendSummary>
  readonly runs: ReadonlyArray<AppendRun>
  readonly eventsInDb: number
  readonly tableMb: number
}

const appendPhase = (url: string) =>
  Effect.gen(function* () {
    const runs: Array<AppendRun> = []
    for (let round = 1; round <= config.rounds; round++) {
      const order: ReadonlyArray<AppendPath> = round % 2 === 1 ? ["writer", "append"] : ["append", "writer"]
      for (const concurrency of config.concurrency) {
        for (const path of order) runs.push(yield* appendRun(path, concurrency, round))
      }
    }
    const sql = yield* SqlClient.SqlClient
    const [size] = yield* sql<{ n: number; bytes: string }>`
      SELECT count(*)::int AS n, pg_total_relation_size('events')::text AS bytes FROM events`
    const summaries = (["writer", "append"] as const).flatMap((path) =>
      config.concurrency.map((c) =>
        summarizeAppend(runs.filter((r) => r.path === path && r.concurrency === c))
      )
    )
    return {
      summaries,
      runs,
      eventsInDb: size?.n ?? 0,
      tableMb: Number(size?.bytes ?? 0) / 2 ** 20
    } satisfies AppendResult
  }).pipe(
    Effect.provide(EventWriter.layer().pipe(Layer.provideMerge(Counted), Layer.provideMerge(storeLayer(url))))
  )

// --- Phase 2: replay ---------------------------------------------------------------------------

/** Request i of n happens at `base + i * span / n`: the log covers 30 days. */
const fillBase = Date.UTC(2026, 9, 22)
const fillSpanMs = 30 * 24 * 3600 * 1000

/**
 * The same events as `RequestEvents.requestWrite` (field for field, values from PostgreSQL's
 * `random()`), generated by the server: request numbers $1 .. $2, 4 events each, in order.
 */
const fillSql = `
WITH models(idx, model, upstream, backends, prompt_price, completion_price) AS (
  VALUES
    (0, 'llama-3.1-70b-instruct', 'meta-llama/Meta-Llama-3.1-70B-Instruct', ARRAY['vllm-eu-west-1a-01', 'vllm-eu-west-1b-02'], 590, 790),
    (1, 'llama-3.1-8b-instruct', 'meta-llama/Meta-Llama-3.1-8B-Instruct', ARRAY['vllm-eu-west-1a-03', 'vllm-eu-west-1b-04'], 50, 80),
    (2, 'qwen2.5-72b-instruct', 'Qwen/Qwen2.5-72B-Instruct', ARRAY['vllm-eu-west-1a-05'], 400, 800),
    (3, 'mistral-large-2407', 'mistralai/Mistral-Large-Instruct-2407', ARRAY['tgi-eu-west-1a-01', 'tgi-eu-west-1b-02'], 2000, 6000),
    (4, 'gpt-oss-120b', 'openai/gpt-oss-120b', ARRAY['sglang-eu-west-1a-01'], 150, 600)
), base AS (
  SELECT g,
    floor(random() * 5)::int AS model_idx,
    random() AS backend_pick,
    lpad(floor(random() * ${RequestEvents.tenants})::int::text, 3, '0') AS tenant,
    floor(random() * ${RequestEvents.keysPerTenant})::int AS key_no,
    random() < 0.6 AS stream,
    20 + floor(random() * 4000)::int AS prompt_tokens,
    1 + floor(random() * 1000)::int AS completion_tokens,
    100 + floor(random() * 900)::int AS ttft,
    5 + random() * 20 AS ms_per_token,
    gen_random_uuid()::text AS request_id,
    replace(gen_random_uuid()::text, '-', '') AS trace_id,
    left(replace(gen_random_uuid()::text, '-', ''), 16) AS span_id,
    ARRAY[gen_random_uuid(), gen_random_uuid(), gen_random_uuid(), gen_random_uuid()] AS ids,
    to_timestamp(($3::bigint + g * $4::double precision) / 1000.0) AS at
  FROM generate_series($1::int, $2::int) AS g
), timed AS (
  SELECT base.*, models.*,
    (models.backends)[1 + floor(backend_pick * array_length(models.backends, 1))::int] AS backend,
    round(CASE WHEN stream THEN ttft ELSE 100 END + completion_tokens * ms_per_token)::int AS latency_ms
  FROM base JOIN models ON models.idx = base.model_idx
)
INSERT INTO events (event_id, stream_id, stream_version, type, data, metadata)
SELECT ids[v], 'request-' || request_id, v,
  (ARRAY['RequestReceived', 'RequestRouted', 'AttemptStarted', 'RequestCompleted'])[v],
  CASE v
    WHEN 1 THEN jsonb_build_object('model', model, 'stream', stream, 'endpoint', 'chat.completions',
      'user', 'user-' || floor(random() * 100000)::int,
      'payload', jsonb_build_object('kind', 'hash',
        'sha256', replace(gen_random_uuid()::text, '-', '') || replace(gen_random_uuid()::text, '-', ''),
        'bytes', prompt_tokens * 4 + 180))
    WHEN 2 THEN jsonb_build_object('model', model, 'backend', backend, 'upstreamModel', upstream,
      'why', 'round_robin',
      'detail', 'tier=standard candidates=' || array_length(backends, 1) || ' inflight=' || floor(random() * 64)::int)
    WHEN 3 THEN jsonb_build_object('attempt', 1, 'backend', backend, 'model', model)
    ELSE jsonb_build_object('model', model, 'backend', backend, 'promptTokens', prompt_tokens,
      'completionTokens', completion_tokens, 'usageSource', 'backend',
      'cost', jsonb_build_object(
        'amountMicroUsd', round((prompt_tokens * prompt_price + completion_tokens * completion_price) / 1000.0)::bigint,
        'priceVersion', '${RequestEvents.priceVersion}'),
      'latencyMs', latency_ms, 'ttftMs', CASE WHEN stream THEN ttft END, 'finishReason', 'stop',
      'cached', false, 'stream', stream, 'status', 200)
  END,
  jsonb_build_object('requestId', request_id, 'correlationId', request_id,
    'causationId', CASE WHEN v = 1 THEN NULL ELSE ids[v - 1]::text END,
    'traceId', trace_id, 'spanId', span_id,
    'keyId', 'key-' || tenant || '-' || key_no, 'tenantId', 'tenant-' || tenant,
    'occurredAt', to_char((CASE WHEN v = 4 THEN at + latency_ms * interval '1 millisecond' ELSE at END) AT TIME ZONE 'UTC',
      'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"'))
FROM timed CROSS JOIN generate_series(1, 4) AS v
ORDER BY g, v`

interface ReplayRun {
  readonly round: number
  readonly events: number
  readonly elapsedMs: number
  readonly eventsPerSec: number
  readonly selfCpuPct: number
  readonly postgresCpuPct: number
  readonly postgresBgCpuPct: number
  readonly selfCpuMs: number
  readonly postgresCpuMs: number
  readonly otherPct: number
  readonly stealPct: number
  readonly groups: number
  readonly matches: boolean
}

interface ReplayResult {
  readonly fill: {
    readonly method: "sql" | "batch"
    readonly events: number
    readonly statements: number
    readonly elapsedMs: number
    readonly eventsPerSec: number
    readonly vacuumMs: number
    readonly tableMb: number
    readonly heapMb: number
  }
  readonly expected: RequestEvents.UsageTotals
  readonly runs: ReadonlyArray<ReplayRun>
  readonly eventsPerSec: number | undefined
  readonly selfCpuPct: number | undefined
  readonly postgresCpuPct: number | undefined
  readonly postgresBgCpuPct: number | undefined
}

const replayPhase = (url: string) =>
  Effect.gen(function* () {
    const sql = yield* SqlClient.SqlClient
    const store = yield* EventStore.EventStore
    const n = config.replayEvents
    const requests = n / 4
    const perRequestMs = fillSpanMs / requests
    log(`replay: filling the log with ${n.toLocaleString("en-US")} events (${config.fill})`)
    const t0 = performance.now()
    let statements = 0
    const chunkRequests = Math.max(1, Math.floor(config.fillChunk / 4))
    const chunks = Array.from({ length: Math.ceil(requests / chunkRequests) }, (_, i) => i * chunkRequests)
    yield* Effect.forEach(
      chunks,
      (first): Effect.Effect<void, unknown> => {
        const last = Math.min(requests, first + chunkRequests) - 1
        statements++
        if (config.fill === "sql")
          return Effect.asVoid(sql.unsafe(fillSql, [first, last, fillBase, perRequestMs]))
        const random = RequestEvents.rng(first + 1)
        const writes = Array.from({ length: last - first + 1 }, (_, i) =>
          RequestEvents.requestWrite(random, fillBase + (first + i) * perRequestMs)
        )
        return store.appendBatch(writes)
      },
      // Two statements at a time: one per core.
      { concurrency: 2, discard: true }
    ).pipe(
      Effect.tap(() =>
        Effect.sync(() => {
          const s = (performance.now() - t0) / 1000
          log(`replay: ${n.toLocaleString("en-US")} events written in ${s.toFixed(1)} s`)
        })
      )
    )
    const fillMs = performance.now() - t0
    const v0 = performance.now()
    yield* sql`VACUUM (ANALYZE) events`
    const vacuumMs = performance.now() - v0
    yield* checkpoint
    const [size] = yield* sql<{ n: number; total: string; heap: string }>`
      SELECT count(*)::int AS n, pg_total_relation_size('events')::text AS total,
        pg_relation_size('events')::text AS heap FROM events`
    if (size?.n !== n)
      return yield* Effect.die(new Error(`expected ${n} events in the log, found ${size?.n}`))
    const [sums] = yield* sql.unsafe<{
      groups: number
      requests: number
      prompt_tokens: string
      completion_tokens: string
      cost_micro_usd: string
    }>(RequestEvents.totalsSql)
    const expected: RequestEvents.UsageTotals = {
      groups: sums?.groups ?? 0,
      requests: sums?.requests ?? 0,
      promptTokens: Number(sums?.prompt_tokens ?? 0),
      completionTokens: Number(sums?.completion_tokens ?? 0),
      costMicroUsd: Number(sums?.cost_micro_usd ?? 0)
    }
    log(
      `replay: VACUUM (ANALYZE) ${(vacuumMs / 1000).toFixed(1)} s; table ${(Number(size.total) / 2 ** 20).toFixed(0)} MB; ` +
        `${expected.groups.toLocaleString("en-US")} usage groups`
    )
    const runs: Array<ReplayRun> = []
    for (let round = 1; round <= config.replayRounds; round++) {
      yield* Effect.promise(() => waitQuiet([]))
      const cpu0 = yield* Effect.promise(() => sampleCpu([]))
      const r0 = performance.now()
      const usage = yield* store
        .readAll(EventStore.start, { batchSize: config.batchSize })
        .pipe(Stream.runFold(RequestEvents.emptyUsage(), RequestEvents.foldUsage))
      const elapsedMs = performance.now() - r0
      const cpu = yield* Effect.promise(() => cpuSince(cpu0))
      const got = RequestEvents.totals(usage)
      const matches =
        usage.events === n &&
        got.groups === expected.groups &&
        got.requests === expected.requests &&
        got.promptTokens === expected.promptTokens &&
        got.completionTokens === expected.completionTokens &&
        got.costMicroUsd === expected.costMicroUsd
      const pct = (ms: number) => (100 * ms) / cpu.elapsedMs
      const run: ReplayRun = {
        round,
        events: usage.events,
        elapsedMs,
        eventsPerSec: (1000 * usage.events) / elapsedMs,
        selfCpuPct: pct(cpu.selfMs),
        postgresCpuPct: pct(cpu.postgresMs),
        postgresBgCpuPct: pct(cpu.postgresBgMs),
        selfCpuMs: cpu.selfMs,
        postgresCpuMs: cpu.postgresMs,
        otherPct: cpu.otherPct,
        stealPct: cpu.stealPct,
        groups: got.groups,
        matches
      }
      log(
        `replay round ${round}: ${usage.events.toLocaleString("en-US")} events in ${(elapsedMs / 1000).toFixed(2)} s, ` +
          `${Report.rps(run.eventsPerSec)} events/s, bench ${Math.round(run.selfCpuPct)}% pg ${Math.round(run.postgresCpuPct)}% ` +
          `other ${Math.round(run.otherPct + run.stealPct)}%, aggregate ${matches ? "matches" : "DOES NOT MATCH"} PostgreSQL's sums`
      )
      runs.push(run)
    }
    return {
      fill: {
        method: config.fill,
        events: n,
        statements,
        elapsedMs: fillMs,
        eventsPerSec: (1000 * n) / fillMs,
        vacuumMs,
        tableMb: Number(size.total) / 2 ** 20,
        heapMb: Number(size.heap) / 2 ** 20
      },
      expected,
      runs,
      eventsPerSec: Stats.median(runs.map((r) => r.eventsPerSec)),
      selfCpuPct: Stats.median(runs.map((r) => r.selfCpuPct)),
      postgresCpuPct: Stats.median(runs.map((r) => r.postgresCpuPct)),
      postgresBgCpuPct: Stats.median(runs.map((r) => r.postgresBgCpuPct))
    } satisfies ReplayResult
  }).pipe(Effect.provide(storeLayer(url)))

// --- Phase 3: what recording costs the gateway ---------------------------------------------------

/**
 * off: `GATEWAY_RECORDING=off`. on: recording as shipped — the group-commit writer and the
 * projections the gateway runs in-process. writer: recording on, but the benchmark holds the
 * projections' advisory locks on that gateway's database, so the gateway stays a follower and
 * runs none of them: what the writer alone costs.
 */
type Variant = "off" | "on" | "writer"
const variantLabel: Readonly<Record<Variant, string>> = {
  off: "off",
  on: "on",
  writer: "on, projections held off"
}

interface RecRun {
  readonly variant: Variant
  /** Gateways with projections: from the end of the load until they had applied every event. */
  readonly catchUpMs: number | undefined
  /** Events still not applied when the measurement ended (0, unless the catch-up timed out). */
  readonly behindAtEnd: number | undefined
  readonly stream: boolean
  readonly round: number
  readonly ok: number
  readonly errors: number
  readonly firstError: string | undefined
  readonly rps: number
  readonly p50Ms: number | undefined
  readonly p99Ms: number | undefined
  readonly ttftP50Ms: number | undefined
  readonly ttftP99Ms: number | undefined
  readonly gatewayCpuMsPerReq: number
  readonly gatewayCpuPct: number
  readonly postgresCpuMsPerReq: number
  readonly postgresCpuPct: number
  readonly postgresBgCpuPct: number
  readonly simCpuPct: number
  readonly loadgenCpuPct: number
  readonly otherPct: number
  readonly stealPct: number
}

interface Gateway {
  readonly proc: Procs.Proc
  readonly url: string
  /** The recording gateways' database. */
  readonly databaseUrl: string | undefined
  /** Requests it answered 200, warm-ups included. */
  ok: number
  /**
   * When it runs projections: how many of them are short of the last committed event, or with
   * `exact`, how many events they have still to apply in all; undefined while one has no
   * checkpoint yet.
   */
  readonly behind: ((exact: boolean) => Promise<number | undefined>) | undefined
  /** Queries the benchmark itself ran on the gateway's database (to subtract from its counts). */
  ownQueries: number
}

interface RecEnv {
  readonly sim: Procs.Proc
  readonly gateways: ReadonlyMap<Variant, Gateway>
}

const requestBody = (stream: boolean): string =>
  JSON.stringify({
    model: "sim",
    messages: [
      { role: "system", content: "You are a helpful assistant." },
      { role: "user", content: "Hello there, how are you today? Tell me something about latency." }
    ],
    stream
  })

const catchUpLimitMs = 60_000

/**
 * Waits (up to `catchUpLimitMs`) until the gateway's projections have applied every committed
 * event; returns the events still behind then (0 when caught up, undefined without projections).
 */
const catchUp = async (gateway: Gateway): Promise<number | undefined> => {
  if (gateway.behind === undefined) return undefined
  const deadline = performance.now() + catchUpLimitMs
  for (;;) {
    gateway.ownQueries++
    if ((await gateway.behind(false)) === 0) return 0
    if (performance.now() > deadline) {
      gateway.ownQueries++
      return gateway.behind(true)
    }
    await sleep(100)
  }
}

const recMeasure = async (env: RecEnv, variant: Variant, stream: boolean, round: number): Promise<RecRun> => {
  const gateway = env.gateways.get(variant)!
  const spec: LoadGen.LoadSpec = {
    url: `${gateway.url}/v1/chat/completions`,
    body: requestBody(stream),
    stream,
    concurrency: config.recConcurrency,
    maxRequests: config.recRequests,
    maxDurationMs: config.recDurationMs
  }
  const pids = [gateway.proc.pid, env.sim.pid]
  await waitQuiet(pids)
  const agent = LoadGen.makeAgent(config.recConcurrency)
  try {
    if (config.warmupMs > 0) {
      gateway.ok += (await LoadGen.run(agent, { ...spec, maxDurationMs: config.warmupMs })).ok
      await catchUp(gateway)
    }
    const cpu0 = await sampleCpu(pids)
    const result = await LoadGen.run(agent, spec)
    // The projections' work for these requests counts too: the window ends once they caught up.
    const loadEnd = performance.now()
    const behindAtEnd = await catchUp(gateway)
    const catchUpMs = gateway.behind === undefined ? undefined : performance.now() - loadEnd
    const cpu = await cpuSince(cpu0)
    gateway.ok += result.ok
    const served = Math.max(1, result.ok + result.errors)
    const pct = (ms: number) => (100 * ms) / cpu.elapsedMs
    const [gwMs = 0, simMs = 0] = cpu.pidMs
    const run: RecRun = {
      variant,
      catchUpMs,
      behindAtEnd,
      stream,
      round,
      ok: result.ok,
      errors: result.errors,
      firstError: result.firstError,
      rps: (1000 * result.ok) / result.elapsedMs,
      p50Ms: Stats.percentile(result.latencyMs, 50),
      p99Ms: Stats.percentile(result.latencyMs, 99),
      ttftP50Ms: result.ttftMs && Stats.percentile(result.ttftMs, 50),
      ttftP99Ms: result.ttftMs && Stats.percentile(result.ttftMs, 99),
      gatewayCpuMsPerReq: gwMs / served,
      gatewayCpuPct: pct(gwMs),
      postgresCpuMsPerReq: cpu.postgresMs / served,
      postgresCpuPct: pct(cpu.postgresMs),
      postgresBgCpuPct: pct(cpu.postgresBgMs),
      simCpuPct: pct(simMs),
      loadgenCpuPct: pct(cpu.selfMs),
      otherPct: cpu.otherPct,
      stealPct: cpu.stealPct
    }
    log(
      `recording ${variant.padEnd(6)} ${stream ? "stream" : "json  "} round ${round}: ${Math.round(run.rps)} req/s, ` +
        `p50 ${Report.fixed(run.p50Ms, 2)} ms, p99 ${Report.fixed(run.p99Ms, 2)} ms, gw ${run.gatewayCpuMsPerReq.toFixed(3)} ms cpu/req, ` +
        `pg ${run.postgresCpuMsPerReq.toFixed(3)} ms cpu/req, other ${Math.round(run.otherPct + run.stealPct)}%` +
        (catchUpMs === undefined
          ? ""
          : `, projections caught up ${(catchUpMs / 1000).toFixed(2)} s after the load`) +
        (behindAtEnd ? `, ${behindAtEnd} events still behind` : "") +
        (run.errors > 0 ? `, ${run.errors} errors (first: ${run.firstError})` : "")
    )
    return run
  } finally {
    await agent.close()
  }
}

interface RecSummary {
  readonly variant: Variant
  readonly catchUpMs: number | undefined
  readonly rps: number | undefined
  readonly p50Ms: number | undefined
  readonly p99Ms: number | undefined
  readonly ttftP50Ms: number | undefined
  readonly ttftP99Ms: number | undefined
  readonly gatewayCpuMsPerReq: number | undefined
  readonly gatewayCpuPct: number | undefined
  readonly postgresCpuMsPerReq: number | undefined
  readonly postgresCpuPct: number | undefined
  readonly postgresBgCpuPct: number | undefined
  readonly simCpuPct: number | undefined
  readonly loadgenCpuPct: number | undefined
  readonly otherPct: number | undefined
  readonly errors: number
  readonly noisyRuns: number
  readonly rounds: number
}

const summarizeRec = (variant: Variant, runs: ReadonlyArray<RecRun>): RecSummary => {
  const med = (f: (r: RecRun) => number | undefined) => Stats.median(runs.map(f))
  return {
    variant,
    catchUpMs: med((r) => r.catchUpMs),
    rps: med((r) => r.rps),
    p50Ms: med((r) => r.p50Ms),
    p99Ms: med((r) => r.p99Ms),
    ttftP50Ms: med((r) => r.ttftP50Ms),
    ttftP99Ms: med((r) => r.ttftP99Ms),
    gatewayCpuMsPerReq: med((r) => r.gatewayCpuMsPerReq),
    gatewayCpuPct: med((r) => r.gatewayCpuPct),
    postgresCpuMsPerReq: med((r) => r.postgresCpuMsPerReq),
    postgresCpuPct: med((r) => r.postgresCpuPct),
    postgresBgCpuPct: med((r) => r.postgresBgCpuPct),
    simCpuPct: med((r) => r.simCpuPct),
    loadgenCpuPct: med((r) => r.loadgenCpuPct),
    otherPct: med((r) => r.otherPct + r.stealPct),
    errors: runs.reduce((n, r) => n + r.errors, 0),
    noisyRuns: runs.filter(noisy).length,
    rounds: runs.length
  }
}

/** Medians over rounds of (variant − off) within the round. */
interface Added {
  readonly variant: Variant
  readonly gatewayCpuMsPerReq: number | undefined
  readonly p50Ms: number | undefined
  readonly p99Ms: number | undefined
  readonly ttftP99Ms: number | undefined
}

interface RecScenario {
  readonly stream: boolean
  readonly summaries: ReadonlyArray<RecSummary>
  readonly added: ReadonlyArray<Added>
}

/** What a recording gateway left in its database. */
interface DatabaseCheck {
  readonly variant: Variant
  readonly answered: number
  readonly events: Readonly<Record<string, number>>
  /** Insert statements (transactions) that wrote the events, and the most events in one. */
  readonly statements: number
  readonly maxEventsPerStatement: number
  /**
   * Transactions on the database over its life (migrations, writer, projections), from
   * `pg_stat_database`, less the benchmark's own queries.
   */
  readonly transactions: number
  /** Each projection's checkpoint: events applied, and events still after it at the end. */
  readonly projections: ReadonlyArray<{
    readonly name: string
    readonly applied: number
    readonly behind: number
  }>
}

interface RecResult {
  readonly scenarios: ReadonlyArray<RecScenario>
  readonly runs: ReadonlyArray<RecRun>
  readonly checks: ReadonlyArray<DatabaseCheck>
  readonly pinning: string
}

const recScenario = (stream: boolean, runs: ReadonlyArray<RecRun>): RecScenario => {
  const of = (v: Variant) => runs.filter((m) => m.stream === stream && m.variant === v)
  const added = (variant: Variant): Added => {
    const pairs = of("off").flatMap((off) => {
      const other = of(variant).find((m) => m.round === off.round)
      return other === undefined ? [] : [{ off, other }]
    })
    const diff = (f: (m: RecRun) => number | undefined) =>
      Stats.median(pairs.map(({ off, other }) => Stats.diff(f(other), f(off))))
    return {
      variant,
      gatewayCpuMsPerReq: diff((m) => m.gatewayCpuMsPerReq),
      p50Ms: diff((m) => m.p50Ms),
      p99Ms: diff((m) => m.p99Ms),
      ttftP99Ms: diff((m) => m.ttftP99Ms)
    }
  }
  return {
    stream,
    summaries: config.recVariants.map((v) => summarizeRec(v, of(v))),
    added: config.recVariants.filter((v) => v !== "off").map(added)
  }
}

/** A child process stopped (by its pid) when the scope closes. */
const child = <A extends { readonly proc: Procs.Proc }>(start: () => Promise<A>) =>
  Effect.acquireRelease(Effect.promise(start), (c) => Effect.promise(() => c.proc.stop()))

/** One connection to `url` for as long as the scope lasts. */
const connection = (url: string) =>
  Effect.gen(function* () {
    const context = yield* Layer.build(PgClient.layer({ url: Redacted.make(url), maxConnections: 1 }))
    return yield* Context.get(context, SqlClient.SqlClient).reserve
  })

/**
 * Takes the advisory locks by which a gateway's projection runner elects the replica that runs
 * each projection (`pg_try_advisory_lock(hashtext('gateway.projection.<name>'))`), and keeps them
 * until the scope closes: a gateway on that database then runs no projection.
 */
const holdProjectionLocks = (url: string) =>
  Effect.gen(function* () {
    const conn = yield* connection(url)
    for (const p of Projections.all) {
      yield* conn.execute(
        "SELECT pg_advisory_lock(hashtext($1))",
        [`gateway.projection.${p.name}`],
        undefined
      )
    }
  })

const checkDatabase = (variant: Variant, gateway: Gateway) =>
  Effect.gen(function* () {
    const conn = yield* connection(gateway.databaseUrl!)
    const query = <A>(text: string) =>
      Effect.map(conn.execute(text, [], undefined), (rows) => rows as ReadonlyArray<A>)
    const events = yield* query<{ type: string; n: number }>(
      "SELECT type, count(*)::int AS n FROM events GROUP BY type ORDER BY type"
    )
    // Each batch of the writer is one statement, committed on its own: one transaction id.
    const [batches] = yield* query<{ statements: number; max: number }>(
      `SELECT count(*)::int AS statements, coalesce(max(n), 0)::int AS max
       FROM (SELECT count(*) AS n FROM events GROUP BY transaction_id) AS t`
    )
    // PostgreSQL's count of the database's transactions, the gateway's and the benchmark's.
    const [stats] = yield* query<{ n: string }>(
      "SELECT (xact_commit + xact_rollback)::text AS n FROM pg_stat_database WHERE datname = current_database()"
    )
    const projections = yield* query<{ name: string; applied: string; behind: number }>(
      `SELECT c.name, c.events_applied::text AS applied,
         (SELECT count(*) FROM events e WHERE (e.transaction_id, e.position) > (c.transaction_id, c.position))::int AS behind
       FROM projection_checkpoints c ORDER BY c.name`
    )
    return {
      variant,
      answered: gateway.ok,
      events: Object.fromEntries(events.map((r) => [r.type, r.n])),
      statements: batches?.statements ?? 0,
      maxEventsPerStatement: batches?.max ?? 0,
      transactions: Number(stats?.n ?? 0) - gateway.ownQueries,
      projections: projections.map((r) => ({ name: r.name, applied: Number(r.applied), behind: r.behind }))
    } satisfies DatabaseCheck
  }).pipe(Effect.scoped)

const recordingPhase = Effect.gen(function* () {
  const gatewayCpu = pinned ? 0 : undefined
  const sideCpu = pinned ? 1 : undefined
  const pinning = pinned
    ? "taskset: the gateways on CPU 0; backend-sim and the load generator (this process) on CPU 1; PostgreSQL not pinned"
    : `not pinned (${flags["no-pin"] ? "--no-pin" : cpuCount < 2 ? "fewer than 2 CPUs" : "taskset not found"})`
  if (sideCpu !== undefined) Procs.pinSelf(sideCpu)
  const sim = yield* child(() =>
    Procs.startSim({
      cwd: root,
      model: "sim",
      ttftMs: config.ttftMs,
      itlMs: config.itlMs,
      outputTokens: config.outputTokens,
      capacity: 1024,
      cpu: sideCpu
    })
  )
  const gateways = new Map<Variant, Gateway>()
  for (const variant of config.recVariants) {
    const databaseUrl = variant === "off" ? undefined : yield* fresh
    if (variant === "writer") yield* holdProjectionLocks(databaseUrl!)
    const started = yield* child(async () => {
      const port = await Procs.freePort()
      const configPath = join(workDir, `gateway-${variant}.json`)
      writeFileSync(
        configPath,
        JSON.stringify({
          server: { host: "127.0.0.1", port },
          models: [{ name: "sim", backends: [{ id: "sim-1", url: sim.url }] }]
        })
      )
      return Procs.startGateway({
        cwd: root,
        configPath,
        port,
        logLevel: "info",
        stdout: "/dev/null",
        cpu: gatewayCpu,
        nodeArgs: config.gatewayNodeArgs,
        build: false,
        script: gatewayScript!,
        env:
          databaseUrl === undefined
            ? { GATEWAY_RECORDING: "off", GATEWAY_AUTH: "off" }
            : { GATEWAY_RECORDING: "on", GATEWAY_AUTH: "off", DATABASE_URL: databaseUrl }
      })
    })
    let behind: Gateway["behind"]
    if (variant === "on") {
      const conn = yield* connection(databaseUrl!)
      // Cheap enough to poll: the last committed event, and the checkpoints short of it.
      const lagging = conn.execute(
        `WITH last AS (
           SELECT transaction_id, position FROM events
           WHERE transaction_id < pg_snapshot_xmin(pg_current_snapshot())
           ORDER BY transaction_id DESC, position DESC LIMIT 1
         )
         SELECT (SELECT count(*) FROM projection_checkpoints)::int AS n,
           (SELECT count(*) FROM projection_checkpoints c, last
            WHERE (c.transaction_id, c.position) < (last.transaction_id, last.position))::int AS lagging`,
        [],
        undefined
      )
      // Only when giving up: how many events they have still to apply.
      const count = conn.execute(
        `SELECT coalesce(sum((
           SELECT count(*) FROM events e
           WHERE (e.transaction_id, e.position) > (c.transaction_id, c.position)
             AND e.transaction_id < pg_snapshot_xmin(pg_current_snapshot()))), 0)::int AS behind
         FROM projection_checkpoints c`,
        [],
        undefined
      )
      behind = (exact) =>
        Effect.runPromise(
          (exact ? count : lagging).pipe(
            Effect.map((rows) => {
              const row = rows[0] as { n?: number; lagging?: number; behind?: number } | undefined
              if (exact) return row?.behind
              return row === undefined || (row.n ?? 0) < Projections.all.length ? undefined : row.lagging
            }),
            Effect.orElseSucceed(() => undefined)
          )
        )
    }
    gateways.set(variant, { ...started, databaseUrl, ok: 0, behind, ownQueries: 0 })
    log(`recording: gateway (${variantLabel[variant]}) pid ${started.proc.pid}`)
  }
  log(`recording: backend-sim pid ${sim.proc.pid}`)
  const env: RecEnv = { sim: sim.proc, gateways }
  // Unmeasured traffic: JIT, connections, the database pool.
  yield* Effect.promise(async () => {
    const agent = LoadGen.makeAgent(16)
    try {
      for (const [variant, gateway] of gateways) {
        for (const stream of [false, true]) {
          const r = await LoadGen.run(agent, {
            url: `${gateway.url}/v1/chat/completions`,
            body: requestBody(stream),
            stream,
            concurrency: 16,
            maxRequests: 5000,
            maxDurationMs: 1500
          })
          if (r.ok === 0) throw new Error(`warm-up (recording ${variant}) failed: ${r.firstError}`)
          gateway.ok += r.ok
        }
      }
    } finally {
      await agent.close()
    }
  })
  const runs: Array<RecRun> = []
  const n = config.recVariants.length
  for (let round = 1; round <= config.recRounds; round++) {
    // The order rotates from round to round.
    const order = config.recVariants.map((_, i) => config.recVariants[(i + round - 1) % n]!)
    for (const stream of [false, true]) {
      for (const variant of order)
        runs.push(yield* Effect.promise(() => recMeasure(env, variant, stream, round)))
    }
  }
  // Let the last events and projection batches land, and every backend report its statistics
  // (idle backends flush theirs within 10 s), then look at what the gateways wrote.
  yield* Effect.sleep("11 seconds")
  const checks: Array<DatabaseCheck> = []
  for (const [variant, gateway] of gateways) {
    if (gateway.databaseUrl !== undefined) checks.push(yield* checkDatabase(variant, gateway))
  }
  return {
    scenarios: [recScenario(false, runs), recScenario(true, runs)],
    runs,
    checks,
    pinning
  } satisfies RecResult
}).pipe(Effect.scoped)

// --- Report -------------------------------------------------------------------------------------

interface TargetRow {
  readonly target: string
  readonly measured: string | undefined
  readonly passed: boolean | undefined
}

const f = Report.fixed
const scenarioName = (stream: boolean) =>
  `${stream ? "streaming" : "non-streaming"}, c=${config.recConcurrency}`

const evaluate = (
  append: AppendResult | undefined,
  replay: ReplayResult | undefined,
  rec: RecResult | undefined
): ReadonlyArray<TargetRow> => {
  const rows: Array<TargetRow> = []
  if (append !== undefined) {
    const writer = append.summaries.filter((s) => s.path === "writer")
    const best = writer.reduce<AppendSummary | undefined>(
      (a, s) => (a === undefined || (s.eventsPerSec ?? 0) > (a.eventsPerSec ?? 0) ? s : a),
      undefined
    )
    if (best !== undefined) {
      rows.push({
        target: `≥ ${Report.rps(targets.writerEventsPerSec)} events/s through the batching writer (best concurrency)`,
        measured: `${Report.rps(best.eventsPerSec)} events/s (c=${best.concurrency})`,
        passed: best.eventsPerSec === undefined ? undefined : best.eventsPerSec >= targets.writerEventsPerSec
      })
    }
  }
  if (replay !== undefined) {
    rows.push({
      target: `≥ ${Report.rps(targets.replayEventsPerSec)} events/s replayed with readAll (batch ${config.batchSize}) into the aggregate`,
      measured: `${Report.rps(replay.eventsPerSec)} events/s`,
      passed:
        replay.eventsPerSec === undefined ? undefined : replay.eventsPerSec >= targets.replayEventsPerSec
    })
  }
  if (rec !== undefined) {
    for (const variant of ["on", "writer"] as const) {
      const label = variant === "on" ? "" : `; ${variantLabel[variant]}`
      for (const sc of rec.scenarios) {
        const cpu = sc.added.find((x) => x.variant === variant)?.gatewayCpuMsPerReq
        if (cpu === undefined) continue
        rows.push({
          target: `recording adds ≤ ${targets.recordingCpuMs} ms gateway CPU per request (${scenarioName(sc.stream)}${label})`,
          measured: `${Report.signed(cpu, 3)} ms`,
          passed: cpu <= targets.recordingCpuMs
        })
      }
      for (const sc of rec.scenarios) {
        const p99 = sc.added.find((x) => x.variant === variant)?.p99Ms
        if (p99 === undefined) continue
        rows.push({
          target: `recording adds ≤ ${targets.recordingP99Ms} ms to p99 time to end of response (${scenarioName(sc.stream)}${label})`,
          measured: `${Report.signed(p99, 2)} ms`,
          passed: p99 <= targets.recordingP99Ms
        })
      }
    }
  }
  return rows
}

const markdown = (
  meta: Record<string, string>,
  append: AppendResult | undefined,
  replay: ReplayResult | undefined,
  rec: RecResult | undefined,
  targetRows: ReadonlyArray<TargetRow>
): string => {
  const out: Array<string> = ["# Event-store benchmark", ""]
  for (const [k, v] of Object.entries(meta)) out.push(`- ${k}: ${v}`)
  const noise = (otherPct: number | undefined, noisyRuns: number, rounds: number) =>
    `${f(otherPct, 0) ?? "n/a"}` + (noisyRuns > 0 ? ` (${noisyRuns}/${rounds} noisy)` : "")
  if (append !== undefined) {
    out.push(
      "",
      `## Append throughput (medians of ${config.rounds} rounds)`,
      "",
      `Each write is one request's 4 events on a new stream \`request-<uuid>\`. writer = \`EventWriter.writeAndWait\` (group commit, defaults: capacity 10,000, maxBatch 1,000 writes); append = \`EventStore.append(stream, events, 0)\`, one statement per call. Pool of ${config.pool} connections. Per run: ${config.warmupMs / 1000} s warm-up, then ≤ ${config.maxWrites} writes or ≤ ${config.durationMs / 1000} s. Latency is per call (\`writeAndWait\` or \`append\`), ms. CPU % of one core; bench = this process (event generation, the store, the pg driver); pg = the PostgreSQL backends serving the benchmark's database; pg bg = the server's background processes (WAL writer, checkpointer, …), which also work for any other database on the server.`,
      "",
      Report.table(
        [
          "path",
          "concurrency",
          "events/s",
          "writes/s",
          "p50 ms",
          "p99 ms",
          "statements/s",
          "mean events/statement",
          "max events/statement",
          "bench CPU %",
          "pg CPU %",
          "pg bg CPU %",
          "bench CPU µs/event",
          "pg CPU µs/event",
          "other CPU %",
          "errors"
        ],
        append.summaries.map((s) => [
          s.path,
          String(s.concurrency),
          Report.rps(s.eventsPerSec),
          Report.rps(s.writesPerSec),
          f(s.p50Ms, 2),
          f(s.p99Ms, 2),
          Report.rps(s.statementsPerSec),
          f(s.eventsPerStatement, 1),
          f(s.maxEventsPerStatement, 0),
          f(s.selfCpuPct, 0),
          f(s.postgresCpuPct, 0),
          f(s.postgresBgCpuPct, 0),
          f(s.selfCpuUsPerEvent, 1),
          f(s.postgresCpuUsPerEvent, 1),
          noise(s.otherPct, s.noisyRuns, s.rounds),
          String(s.errors)
        ])
      ),
      "",
      `Database after the phase: ${append.eventsInDb.toLocaleString("en-US")} events, ${append.tableMb.toFixed(0)} MB with indexes.`
    )
  }
  if (replay !== undefined) {
    const fl = replay.fill
    out.push(
      "",
      `## Replay (${config.replayRounds} rounds)`,
      "",
      `Fill: ${fl.events.toLocaleString("en-US")} events (${(fl.events / 4).toLocaleString("en-US")} requests over 30 days, ${RequestEvents.tenants} tenants × ${RequestEvents.keysPerTenant} keys, 5 models) by ` +
        (fl.method === "sql"
          ? `server-side \`INSERT … SELECT … generate_series\` (the same event shapes as the append phase, values from PostgreSQL's \`random()\`), ${fl.statements} statements of ≤ ${config.fillChunk.toLocaleString("en-US")} events, 2 at a time`
          : `\`EventStore.appendBatch\`, ${fl.statements} statements of ≤ ${config.fillChunk.toLocaleString("en-US")} events, 2 at a time`) +
        `: ${(fl.elapsedMs / 1000).toFixed(1)} s (${Report.rps(fl.eventsPerSec)} events/s), then \`VACUUM (ANALYZE) events\` ${(fl.vacuumMs / 1000).toFixed(1)} s. Table ${fl.heapMb.toFixed(0)} MB, ${fl.tableMb.toFixed(0)} MB with indexes.`,
      "",
      `Replay: \`readAll(start, { batchSize: ${config.batchSize} })\` to the end, folded with \`Stream.runFold\` into a usage_hourly-like map (hour × tenant × key × model: requests, prompt and completion tokens, cost), reading the stored JSON as is. Each round's aggregate is compared with the same sums computed by PostgreSQL (${replay.expected.groups.toLocaleString("en-US")} groups, ${replay.expected.requests.toLocaleString("en-US")} completed requests).`,
      "",
      Report.table(
        [
          "round",
          "events",
          "seconds",
          "events/s",
          "bench CPU %",
          "pg CPU %",
          "pg bg CPU %",
          "bench CPU µs/event",
          "pg CPU µs/event",
          "other CPU %",
          "aggregate"
        ],
        replay.runs.map((r) => [
          String(r.round),
          r.events.toLocaleString("en-US"),
          (r.elapsedMs / 1000).toFixed(2),
          Report.rps(r.eventsPerSec),
          f(r.selfCpuPct, 0),
          f(r.postgresCpuPct, 0),
          f(r.postgresBgCpuPct, 0),
          f((1000 * r.selfCpuMs) / r.events, 2),
          f((1000 * r.postgresCpuMs) / r.events, 2),
          f(r.otherPct + r.stealPct, 0),
          r.matches ? "matches" : "DOES NOT MATCH"
        ])
      ),
      "",
      `Median: ${Report.rps(replay.eventsPerSec)} events/s (bench CPU ${f(replay.selfCpuPct, 0)} %, pg CPU ${f(replay.postgresCpuPct, 0)} %).`
    )
  }
  if (rec !== undefined) {
    const checks = rec.checks.map((c) => {
      const total = Object.values(c.events).reduce((x, y) => x + y, 0)
      return (
        `- ${variantLabel[c.variant]}: answered 200 to ${c.answered.toLocaleString("en-US")} requests (warm-ups included); ` +
        `${total.toLocaleString("en-US")} events (` +
        Object.entries(c.events)
          .map(([type, n]) => `${type} ${n.toLocaleString("en-US")}`)
          .join(", ") +
        `) in ${c.statements.toLocaleString("en-US")} insert statements: ${(c.statements / Math.max(1, c.answered)).toFixed(2)} per request, ` +
        `${(total / Math.max(1, c.statements)).toFixed(1)} events per statement on average, ${c.maxEventsPerStatement} at most; ` +
        `${c.transactions.toLocaleString("en-US")} PostgreSQL transactions on its database (pg_stat_database, the benchmark's own queries left out): ${(c.transactions / Math.max(1, c.answered)).toFixed(2)} per request; projections ` +
        (c.projections.length === 0
          ? "none ran"
          : c.projections
              .map(
                (p) =>
                  `${p.name} ${p.applied.toLocaleString("en-US")} applied, ${p.behind.toLocaleString("en-US")} behind`
              )
              .join("; "))
      )
    })
    out.push(
      "",
      `## Recording overhead: backend-sim ttft ${config.ttftMs} ms, itl ${config.itlMs} ms, ${config.outputTokens} tokens (medians of ${config.recRounds} rounds)`,
      "",
      `One gateway process per variant, all running at once: the production bundle (\`services/gateway/build.mjs\`, built at the start of the run and run from a copy) on plain node, LOG_LEVEL=info, stdout to /dev/null. ` +
        `**off** = \`GATEWAY_RECORDING=off\`; **on** = recording as shipped, to a fresh PostgreSQL database (the group-commit writer, and the projections the gateway runs in-process)` +
        (config.recVariants.includes("writer")
          ? "; **on, projections held off** = recording on to another fresh database whose projection advisory locks the benchmark holds, so that gateway runs no projection: the writer alone"
          : "") +
        `. ${rec.pinning}. Per run: ${config.warmupMs / 1000} s warm-up, then ≤ ${config.recRequests} requests or ≤ ${config.recDurationMs / 1000} s, closed loop at concurrency ${config.recConcurrency}; the order of the variants rotates from round to round. Latency = send to last byte (for streams, after \`data: [DONE]\`, which waits for the terminal event's commit), ms. For a gateway running projections, the CPU window runs on after the load until they have applied every event (column "projections caught up after"), so their work for those requests is counted. pg CPU = the PostgreSQL backends serving the gateways' databases; pg bg = the server's background processes (WAL writer, checkpointer, …), which also work for any other database on the server.`,
      "",
      Report.table(
        [
          "scenario",
          "recording",
          "req/s",
          "p50",
          "p99",
          "TTFT p50",
          "TTFT p99",
          "gw CPU ms/req",
          "gw CPU %",
          "pg CPU ms/req",
          "pg CPU %",
          "pg bg CPU %",
          "sim CPU %",
          "loadgen CPU %",
          "projections caught up after (s)",
          "other CPU %",
          "errors"
        ],
        rec.scenarios.flatMap((sc) =>
          sc.summaries.map((r) => [
            scenarioName(sc.stream),
            variantLabel[r.variant],
            Report.rps(r.rps),
            f(r.p50Ms, 2),
            f(r.p99Ms, 2),
            f(r.ttftP50Ms, 2),
            f(r.ttftP99Ms, 2),
            f(r.gatewayCpuMsPerReq, 3),
            f(r.gatewayCpuPct, 0),
            f(r.postgresCpuMsPerReq, 3),
            f(r.postgresCpuPct, 0),
            f(r.postgresBgCpuPct, 0),
            f(r.simCpuPct, 0),
            f(r.loadgenCpuPct, 0),
            r.catchUpMs === undefined ? "–" : (r.catchUpMs / 1000).toFixed(2),
            noise(r.otherPct, r.noisyRuns, r.rounds),
            String(r.errors)
          ])
        )
      ),
      "",
      "### Added by recording (median over rounds of variant − off in the same round)",
      "",
      Report.table(
        ["scenario", "recording", "gw CPU ms/req", "p50 ms", "p99 ms", "TTFT p99 ms"],
        rec.scenarios.flatMap((sc) =>
          sc.added.map((x) => [
            scenarioName(sc.stream),
            variantLabel[x.variant],
            Report.signed(x.gatewayCpuMsPerReq, 3),
            Report.signed(x.p50Ms, 2),
            Report.signed(x.p99Ms, 2),
            Report.signed(x.ttftP99Ms, 2)
          ])
        )
      ),
      "",
      "What the recording gateways left in their databases at the end:",
      "",
      ...checks
    )
  }
  out.push(
    "",
    "## Targets",
    "",
    Report.table(
      ["target", "measured", ""],
      targetRows.map((t) => [t.target, t.measured, Report.check(t.passed)])
    ),
    ""
  )
  return out.join("\n")
}

/** The commit measured, which files of the code under test differ from it, and a digest of how. */
const treeState = (): { readonly text: string; readonly digest: string } => {
  const git = (...args: ReadonlyArray<string>) => execFileSync("git", args, { cwd: root, encoding: "utf8" })
  try {
    const commit = git("rev-parse", "--short", "HEAD").trim()
    const status = git("status", "--porcelain", "--", "packages", "services")
    const dirty = status
      .split("\n")
      .filter((l) => l.trim() !== "")
      .map((l) => l.slice(3))
    const digest = createHash("sha1")
      .update(commit)
      .update(status)
      .update(git("diff", "HEAD", "--", "packages", "services"))
      .digest("hex")
    return {
      text:
        dirty.length === 0
          ? `commit ${commit}, packages/ and services/ clean`
          : `commit ${commit} plus uncommitted changes in ${dirty.join(", ")}`,
      digest
    }
  } catch {
    return { text: "unknown (git failed)", digest: "" }
  }
}

/**
 * The code measured is fixed when the run starts: the store's modules are loaded then, and the
 * gateway bundle is built then and run from a copy (with its node_modules linked, for PGlite).
 */
const snapshotGateway = (): string => {
  execFileSync(process.execPath, ["services/gateway/build.mjs"], { cwd: root, stdio: "inherit" })
  const dir = join(workDir, "gateway")
  mkdirSync(dir, { recursive: true })
  for (const file of ["main.mjs", "main.mjs.map"]) {
    copyFileSync(join(root, "services/gateway/dist", file), join(dir, file))
  }
  symlinkSync(join(root, "services/gateway/node_modules"), join(dir, "node_modules"))
  return join(dir, "main.mjs")
}

// --- Main -----------------------------------------------------------------------------------------

const main = Effect.gen(function* () {
  RequestEvents.check()
  const sizes = RequestEvents.sizes(200)
  const adminContext = yield* Layer.build(
    PgClient.layer({ url: Redacted.make(config.adminUrl), maxConnections: 1 })
  )
  admin = Context.get(adminContext, SqlClient.SqlClient)
  const settings = yield* admin<{ name: string; setting: string; unit: string | null }>`
    SELECT name, setting, unit FROM pg_settings
    WHERE name IN ('server_version', 'synchronous_commit', 'fsync', 'shared_buffers', 'wal_sync_method', 'commit_delay')
    ORDER BY name`
  const startedAt = new Date()
  if (phases.has("recording")) gatewayScript = snapshotGateway()
  const tree0 = treeState()
  const load0 = loadavg()
  log(`phases: ${[...phases].join(", ")}`)

  let append: AppendResult | undefined
  let replay: ReplayResult | undefined
  let rec: RecResult | undefined
  if (phases.has("append")) {
    log("append phase")
    append = yield* Effect.scoped(Effect.flatMap(fresh, appendPhase))
    yield* checkpoint
  }
  if (phases.has("replay")) {
    log("replay phase")
    replay = yield* Effect.scoped(Effect.flatMap(fresh, replayPhase))
    yield* checkpoint
  }
  if (phases.has("recording")) {
    log("recording phase")
    rec = yield* recordingPhase
  }
  const load1 = loadavg()
  const tree1 = treeState()
  const allNoise = [...(append?.runs ?? []), ...(replay?.runs ?? []), ...(rec?.runs ?? [])]
  const pgSetting = (name: string) => {
    const s = settings.find((r) => r.name === name)
    if (s === undefined) return "n/a"
    return s.name === "shared_buffers" ? `${(Number(s.setting) * 8) / 1024} MB` : s.setting
  }
  const meta: Record<string, string> = {
    date: startedAt.toISOString(),
    command: ["pnpm bench:events", ...argv].join(" "),
    machine: `${cpuCount} CPUs (${cpus()[0]?.model ?? "unknown"}), load average ${load0.map((x) => x.toFixed(2)).join(" ")} at start, ${load1.map((x) => x.toFixed(2)).join(" ")} at end`,
    node: process.version,
    tree:
      tree1.digest === tree0.digest
        ? tree0.text
        : `${tree0.text} at the start; CHANGED during the run, at the end: ${tree1.text} (the measured code is the start's: modules loaded and gateway bundle built then)`,
    postgres: `${pgSetting("server_version")} on 127.0.0.1, fsync ${pgSetting("fsync")}, synchronous_commit ${pgSetting("synchronous_commit")}, wal_sync_method ${pgSetting("wal_sync_method")}, commit_delay ${pgSetting("commit_delay")}, shared_buffers ${pgSetting("shared_buffers")}; each phase on a fresh database`,
    events: `request-like: 4 per request (RequestReceived, RequestRouted, AttemptStarted, RequestCompleted), mean ${sizes.dataBytes.toFixed(0)} bytes of JSON data and ${sizes.metadataBytes.toFixed(0)} bytes of metadata per event`,
    ...(config.gatewayNodeArgs.length === 0
      ? {}
      : { "gateway node flags": config.gatewayNodeArgs.join(" ") }),
    "other load": `waited ${Math.round(waitedMs / 1000)} s in all for quiet (budget --wait-quiet ${config.waitQuietMs / 1000} s); ${allNoise.filter(noisy).length} of ${allNoise.length} measured runs noisy (other processes > ${noisyPct}% of a core)`
  }
  const targetRows = evaluate(append, replay, rec)
  process.stdout.write(`${markdown(meta, append, replay, rec, targetRows)}\n`)
  if (flags.json !== "none") {
    const path =
      flags.json ??
      join(root, "bench", "results", `events-${startedAt.toISOString().replace(/[:.]/g, "-")}.json`)
    mkdirSync(dirname(path), { recursive: true })
    writeFileSync(
      path,
      `${JSON.stringify({ meta, config, append, replay, recording: rec, targets: targetRows }, null, 2)}\n`
    )
    log(`results written to ${relative(process.cwd(), path)}`)
  }
}).pipe(Effect.scoped)

const fiber = Effect.runFork(main)
const { watchdog, aborting } = Procs.guard({
  log,
  timeLimitMs: config.timeLimitMs,
  stop: () => Effect.runPromise(Fiber.interrupt(fiber))
})
fiber.addObserver((exit) => {
  clearTimeout(watchdog)
  rmSync(workDir, { recursive: true, force: true })
  if (Exit.isFailure(exit) && !aborting()) {
    log(`failed: ${exit.cause.toString()}`)
    process.exitCode = 1
  }
})
