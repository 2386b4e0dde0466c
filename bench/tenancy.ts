/**
 * Tenancy benchmark: `pnpm bench:tenancy` (`node --import tsx bench/tenancy.ts --help`).
 *
 * What API keys and the rate limiter cost per request. One gateway process per variant, all
 * running at once behind the same simulated backend, recording off in all of them:
 * - off: `GATEWAY_AUTH=off`, no database at all — the baseline;
 * - memory: keys on (the key registry on a fresh PostgreSQL database), limits in the gateway's memory;
 * - redis: as memory, with the limits in Redis (`REDIS_URL`): one Lua call per admission, the
 *   settlement off the response path.
 * The load carries one key whose limits are so high nothing is refused, yet every check runs:
 * requests and tokens per minute (the prompt counted by the tokenizer) and concurrent requests.
 * Rounds alternate the variants (the order rotating from round to round), each measuring a
 * non-streaming and a streaming closed-loop load: gateway CPU per request (the gateways pinned
 * to one core), latency percentiles, and Redis's CPU per request (informative: Redis is shared).
 * Reports medians over rounds and, per round, variant − off. Markdown on stdout, progress on
 * stderr, JSON in bench/results/.
 */
import { execFileSync } from "node:child_process"
import { randomBytes } from "node:crypto"
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs"
import { availableParallelism, cpus, loadavg, tmpdir } from "node:os"
import { dirname, join, relative } from "node:path"
import { fileURLToPath } from "node:url"
import * as Flags from "./Flags.js"
import * as LoadGen from "./LoadGen.js"
import * as Procs from "./Procs.js"
import * as Report from "./Report.js"
import * as Stats from "./Stats.js"

const usage = `Usage: pnpm bench:tenancy [--flag value]...
  --rounds N            rounds, each one run per variant and mode, the order rotating (5)
  --variants LIST       off: auth off, no database; memory: keys on, limits in the gateway's
                        memory; redis: keys on, limits in Redis; must include off (off,memory,redis)
  --concurrency N       closed-loop concurrency (50)
  --requests N          request cap per measured run (20000)
  --duration S          time cap per measured run, seconds (3)
  --warmup S            unmeasured load before each run, seconds (0.5)
  --ttft-ms N --itl-ms N --output-tokens N   backend-sim (20, 2, 16)
  --admin-url URL       PostgreSQL server; a fresh database is created there for the key
                        registry and dropped at the end (postgres://postgres@127.0.0.1:5432/postgres)
  --redis-url URL       Redis of the redis variant (redis://127.0.0.1:6379)
  --gateway-node-args S extra node flags for every gateway, space-separated, e.g.
                        "--cpu-prof --cpu-prof-dir=/tmp/prof" (none)
  --no-pin              do not pin processes with taskset
  --json PATH|none      results file (bench/results/tenancy-<time>.json)
  --wait-quiet S        wait in all up to S seconds, before the start and each run, while other
                        processes use > ${Procs.noisyPct}% of a core (60)
  --time-limit S        hard limit of the whole run; children are stopped after it (600)`

const options = {
  rounds: { type: "string", default: "5" },
  variants: { type: "string", default: "off,memory,redis" },
  concurrency: { type: "string", default: "50" },
  requests: { type: "string", default: "20000" },
  duration: { type: "string", default: "3" },
  warmup: { type: "string", default: "0.5" },
  "ttft-ms": { type: "string", default: "20" },
  "itl-ms": { type: "string", default: "2" },
  "output-tokens": { type: "string", default: "16" },
  "admin-url": { type: "string", default: "postgres://postgres@127.0.0.1:5432/postgres" },
  "redis-url": { type: "string", default: "redis://127.0.0.1:6379" },
  "gateway-node-args": { type: "string" },
  "no-pin": { type: "boolean", default: false },
  json: { type: "string" },
  "wait-quiet": { type: "string", default: "60" },
  "time-limit": { type: "string", default: "600" },
  help: { type: "boolean", short: "h", default: false }
} as const
const { flags, argv, fail, num, int } = Flags.parse("bench:tenancy", usage, options)

const variantNames = ["off", "memory", "redis"] as const
type Variant = (typeof variantNames)[number]
const variantLabel: Record<Variant, string> = {
  off: "off (no keys)",
  memory: "keys, limits in memory",
  redis: "keys, limits in Redis"
}
const parseVariants = (raw: string): ReadonlyArray<Variant> => {
  const vs = raw
    .split(",")
    .map((v) =>
      (variantNames as ReadonlyArray<string>).includes(v)
        ? (v as Variant)
        : fail(`--variants: unknown variant '${v}'`)
    )
  if (new Set(vs).size !== vs.length) fail("--variants: a variant is named twice")
  return vs.includes("off") && vs.length >= 2 ? vs : fail("--variants must include off and another")
}

const config = {
  rounds: int("rounds", flags.rounds, 1),
  variants: parseVariants(flags.variants),
  concurrency: int("concurrency", flags.concurrency, 1),
  maxRequests: int("requests", flags.requests, 1),
  durationMs: num("duration", flags.duration, 0.1) * 1000,
  warmupMs: num("warmup", flags.warmup, 0) * 1000,
  ttftMs: int("ttft-ms", flags["ttft-ms"], 0),
  itlMs: int("itl-ms", flags["itl-ms"], 0),
  outputTokens: int("output-tokens", flags["output-tokens"], 1),
  adminUrl: flags["admin-url"],
  redisUrl: flags["redis-url"],
  gatewayNodeArgs: (flags["gateway-node-args"] ?? "").split(/\s+/).filter((a) => a !== ""),
  waitQuietMs: num("wait-quiet", flags["wait-quiet"], 0) * 1000,
  timeLimitMs: num("time-limit", flags["time-limit"], 10) * 1000
}

/** The key's limits: far above what the run can use, so nothing is refused, but every check runs. */
const keyLimits = {
  requests_per_minute: 100_000_000,
  tokens_per_minute: 1_000_000_000,
  concurrent_requests: 100_000
} as const

const targets = { cpuMsPerReq: 0.1, p99Ms: 1 } as const

const root = fileURLToPath(new URL("..", import.meta.url))
const log = (line: string): void => {
  process.stderr.write(`[bench:tenancy ${new Date().toISOString().slice(11, 19)}] ${line}\n`)
}

// The gateways get exactly the environment of their variant, whatever this shell has set.
for (const name of ["DATABASE_URL", "REDIS_URL", "ADMIN_KEY", "GATEWAY_AUTH", "GATEWAY_RECORDING"]) {
  delete process.env[name]
}

// --- Processes, pinning, the database, Redis -------------------------------------------------

// Read before pinning: afterwards this process sees only its own CPU.
const cpuCount = availableParallelism()
const pinned = !flags["no-pin"] && cpuCount >= 2 && Procs.hasTaskset()
const gatewayCpu = pinned ? 0 : undefined
const sideCpu = pinned ? 1 : undefined
const pinning = pinned
  ? "taskset: the gateways on CPU 0; backend-sim and the load generator (this process) on CPU 1; PostgreSQL and Redis not pinned"
  : `not pinned (${flags["no-pin"] ? "--no-pin" : cpuCount < 2 ? "fewer than 2 CPUs" : "taskset not found"})`
if (sideCpu !== undefined) Procs.pinSelf(sideCpu)

const quiet = Procs.quietWaiter(config.waitQuietMs, log)
const children: Array<Procs.Proc> = []
const workDir = mkdtempSync(join(tmpdir(), "gateway-bench-tenancy-"))
/** The fresh database of the run, once created. */
let database: string | undefined
/** The run's API key id, when the redis variant runs: its buckets in Redis are deleted at the end. */
let redisKeyId: string | undefined

const psql = (sql: string): void => {
  execFileSync("psql", ["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", config.adminUrl, "-c", sql], {
    stdio: ["ignore", "ignore", "pipe"],
    timeout: 30_000
  })
}

const redisCli = (...args: ReadonlyArray<string>): string =>
  execFileSync("redis-cli", ["-u", config.redisUrl, ...args], {
    encoding: "utf8",
    stdio: ["ignore", "pipe", "pipe"],
    timeout: 10_000
  })

/** The Redis server's pid, when it runs on this machine (its CPU is then readable), and version. */
const redisServer = (): { readonly pid: number | undefined; readonly version: string } => {
  try {
    const info = redisCli("info", "server")
    const version = /redis_version:(\S+)/.exec(info)?.[1] ?? "unknown"
    const pid = Number(/process_id:(\d+)/.exec(info)?.[1])
    const local = Number.isInteger(pid) && readFileSync(`/proc/${pid}/comm`, "utf8").startsWith("redis")
    if (local) Procs.cpuTimeMs(pid)
    return { pid: local ? pid : undefined, version }
  } catch {
    return { pid: undefined, version: "unknown" }
  }
}

let stopped = false
const stopAll = async (): Promise<void> => {
  if (stopped) return
  stopped = true
  await Promise.all(children.map((p) => p.stop()))
  if (database !== undefined) {
    try {
      psql(`DROP DATABASE IF EXISTS ${database} WITH (FORCE)`)
    } catch (error) {
      log(`could not drop the database ${database}: ${error instanceof Error ? error.message : error}`)
    }
  }
  if (redisKeyId !== undefined) {
    try {
      // Everything of the key is in its hash tag `{k:<id>}` (buckets, concurrency set, lease records).
      const keys = redisCli("--scan", "--pattern", `*{k:${redisKeyId}}*`)
        .split("\n")
        .filter((k) => k !== "")
      for (let i = 0; i < keys.length; i += 100) redisCli("del", ...keys.slice(i, i + 100))
      log(`Redis: ${keys.length} keys of the run's API key left over, deleted`)
    } catch {
      // they expire on their own
    }
  }
  rmSync(workDir, { recursive: true, force: true })
}
const { watchdog } = Procs.guard({ log, timeLimitMs: config.timeLimitMs, stop: stopAll })

// --- Gateways --------------------------------------------------------------------------------

interface Gateway {
  readonly variant: Variant
  readonly proc: Procs.Proc
  readonly url: string
  /** Requests it answered 200, warm-ups included. */
  ok: number
}

interface Env {
  readonly sim: Procs.Proc
  readonly gateways: ReadonlyMap<Variant, Gateway>
  /** Headers of every load request: the key (ignored by the off gateway). */
  readonly headers: Readonly<Record<string, string>>
  readonly redisPid: number | undefined
}

const chatPost = async (
  url: string,
  headers: Readonly<Record<string, string>>
): Promise<{ readonly status: number; readonly headers: Headers; readonly text: string }> => {
  const res = await fetch(`${url}/v1/chat/completions`, {
    method: "POST",
    headers: { "content-type": "application/json", ...headers },
    body: LoadGen.chatBody(false),
    signal: AbortSignal.timeout(10_000)
  })
  return { status: res.status, headers: res.headers, text: await res.text() }
}

const adminCall = async (
  gateway: Gateway,
  adminKey: string,
  method: string,
  path: string,
  body: unknown,
  expect: number
): Promise<any> => {
  const res = await fetch(`${gateway.url}${path}`, {
    method,
    headers: {
      authorization: `Bearer ${adminKey}`,
      ...(body === undefined ? {} : { "content-type": "application/json" })
    },
    ...(body === undefined ? {} : { body: JSON.stringify(body) }),
    signal: AbortSignal.timeout(10_000)
  })
  const text = await res.text()
  if (res.status !== expect) {
    throw new Error(`${gateway.variant}: ${method} ${path}: HTTP ${res.status} (expected ${expect}): ${text}`)
  }
  return JSON.parse(text)
}

/**
 * Before measuring: without a key a keyed gateway answers 401; with it, 200 and the limits in the
 * `x-ratelimit-*` headers (so the checks run); the off gateway answers 200 with no such headers.
 * A keyed gateway that did not create the key learns it from the log: it is given a few seconds.
 */
const verify = async (gateway: Gateway, headers: Readonly<Record<string, string>>): Promise<void> => {
  if (gateway.variant !== "off") {
    const anonymous = await chatPost(gateway.url, {})
    if (anonymous.status !== 401) {
      throw new Error(`${gateway.variant}: a request without a key got HTTP ${anonymous.status}, not 401`)
    }
  }
  const deadline = performance.now() + 15_000
  for (;;) {
    const r = await chatPost(gateway.url, headers)
    if (r.status === 200) {
      gateway.ok++
      const rpm = r.headers.get("x-ratelimit-limit-requests")
      const tpm = r.headers.get("x-ratelimit-limit-tokens")
      const expected =
        gateway.variant === "off"
          ? rpm === null && tpm === null
          : rpm === String(keyLimits.requests_per_minute) && tpm === String(keyLimits.tokens_per_minute)
      if (!expected) {
        throw new Error(
          `${gateway.variant}: unexpected x-ratelimit-limit-* headers: requests ${rpm}, tokens ${tpm}`
        )
      }
      return
    }
    if (r.status !== 401 || performance.now() > deadline) {
      throw new Error(`${gateway.variant}: probe answered HTTP ${r.status}: ${r.text.slice(0, 300)}`)
    }
    await new Promise((resolve) => setTimeout(resolve, 100))
  }
}

/** Unmeasured traffic so every gateway is JIT-warm and has its connections open. */
const warmUp = async (env: Env): Promise<void> => {
  const agent = LoadGen.makeAgent(16)
  try {
    for (const gateway of env.gateways.values()) {
      for (const stream of [false, true]) {
        const r = await LoadGen.run(agent, {
          url: `${gateway.url}/v1/chat/completions`,
          body: LoadGen.chatBody(stream),
          headers: env.headers,
          stream,
          concurrency: 16,
          maxRequests: 5000,
          maxDurationMs: 1500
        })
        gateway.ok += r.ok
        if (r.ok === 0 || r.errors > 0) {
          throw new Error(`warm-up of ${gateway.variant}: ${r.errors} errors (first: ${r.firstError})`)
        }
      }
    }
  } finally {
    await agent.close()
  }
}

// --- Measurements ----------------------------------------------------------------------------

interface Run {
  readonly variant: Variant
  readonly stream: boolean
  readonly round: number
  readonly ok: number
  readonly errors: number
  readonly firstError: string | undefined
  readonly elapsedMs: number
  readonly rps: number
  readonly p50Ms: number | undefined
  readonly p99Ms: number | undefined
  readonly ttftP50Ms: number | undefined
  readonly ttftP99Ms: number | undefined
  /** CPU time of the gateway per request served, and in % of one core. */
  readonly gatewayCpuMsPerReq: number
  readonly gatewayCpuPct: number
  /** The Redis server's CPU per request (anyone's use of it during the run), when readable. */
  readonly redisCpuMsPerReq: number | undefined
  readonly simCpuPct: number
  readonly loadgenCpuPct: number
  /** CPU used by everything else on the machine, and stolen by the hypervisor, % of one core. */
  readonly otherPct: number
  readonly stealPct: number
}

const measure = async (env: Env, variant: Variant, stream: boolean, round: number): Promise<Run> => {
  const gateway = env.gateways.get(variant)!
  const spec: LoadGen.LoadSpec = {
    url: `${gateway.url}/v1/chat/completions`,
    body: LoadGen.chatBody(stream),
    headers: env.headers,
    stream,
    concurrency: config.concurrency,
    maxRequests: config.maxRequests,
    maxDurationMs: config.durationMs
  }
  await quiet.wait(1, 250, [env.sim.pid, ...[...env.gateways.values()].map((g) => g.proc.pid)])
  const agent = LoadGen.makeAgent(config.concurrency)
  try {
    if (config.warmupMs > 0) {
      const w = await LoadGen.run(agent, { ...spec, maxDurationMs: config.warmupMs })
      gateway.ok += w.ok
      if (w.errors > 0) log(`${variant} warm-up: ${w.errors} errors (first: ${w.firstError})`)
    }
    const redisCpu = () => (env.redisPid === undefined ? 0 : Procs.cpuTimeMs(env.redisPid))
    const sys0 = Procs.systemCpu()
    const gw0 = Procs.cpuTimeMs(gateway.proc.pid)
    const sim0 = Procs.cpuTimeMs(env.sim.pid)
    const redis0 = redisCpu()
    const self0 = Procs.selfCpuMs()
    const result = await LoadGen.run(agent, spec)
    const self1 = Procs.selfCpuMs()
    const redis1 = redisCpu()
    const sim1 = Procs.cpuTimeMs(env.sim.pid)
    const gw1 = Procs.cpuTimeMs(gateway.proc.pid)
    const sys1 = Procs.systemCpu()
    gateway.ok += result.ok
    // Redis works for us only in the redis variant; otherwise its CPU is someone else's.
    const ours = gw1 - gw0 + (sim1 - sim0) + (self1 - self0) + (variant === "redis" ? redis1 - redis0 : 0)
    const served = Math.max(1, result.ok + result.errors)
    const pct = (ms: number) => (100 * ms) / result.elapsedMs
    const run: Run = {
      variant,
      stream,
      round,
      ok: result.ok,
      errors: result.errors,
      firstError: result.firstError,
      elapsedMs: result.elapsedMs,
      rps: (1000 * result.ok) / result.elapsedMs,
      p50Ms: Stats.percentile(result.latencyMs, 50),
      p99Ms: Stats.percentile(result.latencyMs, 99),
      ttftP50Ms: result.ttftMs && Stats.percentile(result.ttftMs, 50),
      ttftP99Ms: result.ttftMs && Stats.percentile(result.ttftMs, 99),
      gatewayCpuMsPerReq: (gw1 - gw0) / served,
      gatewayCpuPct: pct(gw1 - gw0),
      redisCpuMsPerReq: env.redisPid === undefined ? undefined : (redis1 - redis0) / served,
      simCpuPct: pct(sim1 - sim0),
      loadgenCpuPct: pct(self1 - self0),
      otherPct: Math.max(0, pct(sys1.busyMs - sys0.busyMs - ours)),
      stealPct: pct(sys1.stealMs - sys0.stealMs)
    }
    log(
      `${variant.padEnd(6)} ${stream ? "stream" : "json  "} round ${round}: ${Math.round(run.rps)} req/s, ` +
        `p50 ${Report.fixed(run.p50Ms, 2)} ms, p99 ${Report.fixed(run.p99Ms, 2)} ms, ` +
        `gw ${run.gatewayCpuMsPerReq.toFixed(3)} ms cpu/req` +
        (run.redisCpuMsPerReq === undefined ? "" : `, redis ${run.redisCpuMsPerReq.toFixed(3)} ms cpu/req`) +
        `, other ${Math.round(run.otherPct + run.stealPct)}%` +
        (run.errors > 0 ? `, ${run.errors} errors (first: ${run.firstError})` : "")
    )
    return run
  } finally {
    await agent.close()
  }
}

const noisy = (r: Run) => r.otherPct + r.stealPct > Procs.noisyPct

interface Summary {
  readonly variant: Variant
  readonly rps: number | undefined
  readonly p50Ms: number | undefined
  readonly p99Ms: number | undefined
  readonly ttftP50Ms: number | undefined
  readonly ttftP99Ms: number | undefined
  readonly gatewayCpuMsPerReq: number | undefined
  readonly gatewayCpuPct: number | undefined
  readonly redisCpuMsPerReq: number | undefined
  readonly simCpuPct: number | undefined
  readonly loadgenCpuPct: number | undefined
  readonly otherPct: number | undefined
  readonly errors: number
  readonly noisyRuns: number
  readonly rounds: number
}

const summarize = (variant: Variant, runs: ReadonlyArray<Run>): Summary => {
  const med = (f: (r: Run) => number | undefined) => Stats.median(runs.map(f))
  return {
    variant,
    rps: med((r) => r.rps),
    p50Ms: med((r) => r.p50Ms),
    p99Ms: med((r) => r.p99Ms),
    ttftP50Ms: med((r) => r.ttftP50Ms),
    ttftP99Ms: med((r) => r.ttftP99Ms),
    gatewayCpuMsPerReq: med((r) => r.gatewayCpuMsPerReq),
    gatewayCpuPct: med((r) => r.gatewayCpuPct),
    redisCpuMsPerReq: med((r) => r.redisCpuMsPerReq),
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
  readonly redisCpuMsPerReq: number | undefined
}

interface Scenario {
  readonly stream: boolean
  readonly summaries: ReadonlyArray<Summary>
  readonly added: ReadonlyArray<Added>
}

const scenario = (stream: boolean, runs: ReadonlyArray<Run>): Scenario => {
  const of = (v: Variant) => runs.filter((r) => r.stream === stream && r.variant === v)
  const added = (variant: Variant): Added => {
    const pairs = of("off").flatMap((off) => {
      const other = of(variant).find((r) => r.round === off.round)
      return other === undefined ? [] : [{ off, other }]
    })
    const diff = (f: (r: Run) => number | undefined) =>
      Stats.median(pairs.map(({ off, other }) => Stats.diff(f(other), f(off))))
    return {
      variant,
      gatewayCpuMsPerReq: diff((r) => r.gatewayCpuMsPerReq),
      p50Ms: diff((r) => r.p50Ms),
      p99Ms: diff((r) => r.p99Ms),
      ttftP99Ms: diff((r) => r.ttftP99Ms),
      redisCpuMsPerReq: diff((r) => r.redisCpuMsPerReq)
    }
  }
  return {
    stream,
    summaries: config.variants.map((v) => summarize(v, of(v))),
    added: config.variants.filter((v) => v !== "off").map(added)
  }
}

/** What a gateway answered in all, and what a keyed gateway's limiter says at the end. */
interface GatewayCheck {
  readonly variant: Variant
  /** Requests answered 200, warm-ups included. */
  readonly answered: number
  /** `GET /admin/limiter` (keyed gateways). */
  readonly limiter:
    | {
        readonly store: string
        readonly degraded: boolean
        readonly storeFailures: number
        readonly refused: Readonly<Record<string, number>>
      }
    | undefined
  /** The limiter is the variant's store, never failed, refused nothing. */
  readonly passed: boolean
}

// --- Report ----------------------------------------------------------------------------------

interface TargetRow {
  readonly target: string
  readonly measured: string | undefined
  readonly passed: boolean | undefined
}

const scenarioName = (stream: boolean) => `${stream ? "streaming" : "non-streaming"}, c=${config.concurrency}`

const evaluate = (scenarios: ReadonlyArray<Scenario>): ReadonlyArray<TargetRow> => {
  const rows: Array<TargetRow> = []
  for (const variant of config.variants.filter((v) => v !== "off")) {
    for (const sc of scenarios) {
      const x = sc.added.find((a) => a.variant === variant)?.gatewayCpuMsPerReq
      rows.push({
        target: `${variantLabel[variant]}: adds ≤ ${targets.cpuMsPerReq} ms gateway CPU per request (${scenarioName(sc.stream)})`,
        measured: Report.signed(x, 3)?.concat(" ms"),
        passed: x === undefined ? undefined : x <= targets.cpuMsPerReq
      })
    }
    for (const sc of scenarios) {
      const x = sc.added.find((a) => a.variant === variant)?.p99Ms
      rows.push({
        target: `${variantLabel[variant]}: adds ≤ ${targets.p99Ms} ms to p99 latency (${scenarioName(sc.stream)})`,
        measured: Report.signed(x, 2)?.concat(" ms"),
        passed: x === undefined ? undefined : x <= targets.p99Ms
      })
    }
  }
  return rows
}

const markdown = (
  meta: Record<string, string>,
  scenarios: ReadonlyArray<Scenario>,
  checks: ReadonlyArray<GatewayCheck>,
  targetRows: ReadonlyArray<TargetRow>
): string => {
  const f = Report.fixed
  const out: Array<string> = ["# Tenancy benchmark: API keys and rate limits", ""]
  for (const [k, v] of Object.entries(meta)) out.push(`- ${k}: ${v}`)
  const noise = (s: Summary) =>
    `${f(s.otherPct, 0) ?? "n/a"}` + (s.noisyRuns > 0 ? ` (${s.noisyRuns}/${s.rounds} noisy)` : "")
  out.push(
    "",
    `## Backend-sim ttft ${config.ttftMs} ms, itl ${config.itlMs} ms, ${config.outputTokens} tokens; concurrency ${config.concurrency} (medians of ${config.rounds} rounds)`,
    "",
    `One gateway process per variant, all running at once, recording off in all: the production bundle (\`services/gateway/build.mjs\`, built at the start) on plain node, LOG_LEVEL=info, stdout to /dev/null. ` +
      `**off** = \`GATEWAY_AUTH=off\`, no database; **keys, limits in memory** = \`GATEWAY_AUTH=on\`, the key registry on a fresh PostgreSQL database, the limiter's buckets in the gateway; **keys, limits in Redis** = the same with \`REDIS_URL\`. ` +
      `The load sends one key (limits: ${keyLimits.requests_per_minute.toLocaleString("en-US")} requests/min, ${keyLimits.tokens_per_minute.toLocaleString("en-US")} tokens/min, ${keyLimits.concurrent_requests.toLocaleString("en-US")} concurrent), so every request is authenticated and checked against rpm, tpm (prompt counted by the tokenizer, plus the default max_tokens) and concurrency, and nothing is refused. ` +
      `Per run: ${config.warmupMs / 1000} s warm-up, then ≤ ${config.maxRequests} requests or ≤ ${config.durationMs / 1000} s, closed loop; the order of the variants rotates from round to round. ` +
      "Latency = send to last byte, ms. gw CPU = the gateway process (user+sys) per request served, or % of one core. redis CPU ms/req = the Redis server's CPU during the run per request (Redis is shared: in the other variants it is someone else's use, a baseline). other CPU % = everything else on the machine (noise).",
    "",
    Report.table(
      [
        "scenario",
        "variant",
        "req/s",
        "p50",
        "p99",
        "TTFT p50",
        "TTFT p99",
        "gw CPU ms/req",
        "gw CPU %",
        "redis CPU ms/req",
        "sim CPU %",
        "loadgen CPU %",
        "other CPU %",
        "errors"
      ],
      scenarios.flatMap((sc) =>
        sc.summaries.map((s) => [
          scenarioName(sc.stream),
          variantLabel[s.variant],
          Report.rps(s.rps),
          f(s.p50Ms, 2),
          f(s.p99Ms, 2),
          f(s.ttftP50Ms, 2),
          f(s.ttftP99Ms, 2),
          f(s.gatewayCpuMsPerReq, 3),
          f(s.gatewayCpuPct, 0),
          f(s.redisCpuMsPerReq, 3),
          f(s.simCpuPct, 0),
          f(s.loadgenCpuPct, 0),
          noise(s),
          String(s.errors)
        ])
      )
    ),
    "",
    "### Added by keys and limits (median over rounds of variant − off in the same round)",
    "",
    Report.table(
      ["scenario", "variant", "gw CPU ms/req", "p50 ms", "p99 ms", "TTFT p99 ms", "redis CPU ms/req"],
      scenarios.flatMap((sc) =>
        sc.added.map((a) => [
          scenarioName(sc.stream),
          variantLabel[a.variant],
          Report.signed(a.gatewayCpuMsPerReq, 3),
          Report.signed(a.p50Ms, 2),
          Report.signed(a.p99Ms, 2),
          Report.signed(a.ttftP99Ms, 2),
          Report.signed(a.redisCpuMsPerReq, 3)
        ])
      )
    ),
    "",
    "The gateways at the end (the limiter's state from `GET /admin/limiter`):",
    "",
    ...checks.map(
      (c) =>
        `- ${variantLabel[c.variant]}: answered 200 to ${c.answered.toLocaleString("en-US")} requests (warm-ups included)` +
        (c.limiter === undefined
          ? ""
          : `; limiter store ${c.limiter.store}, ${c.limiter.storeFailures} store failures, degraded ${c.limiter.degraded}, refused ` +
            Object.entries(c.limiter.refused)
              .map(([k, n]) => `${k} ${n}`)
              .join(", ")) +
        (c.passed ? "" : " — NOT AS EXPECTED")
    ),
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

// --- Main ------------------------------------------------------------------------------------

const main = async (): Promise<void> => {
  const runCount = config.rounds * config.variants.length * 2
  log(pinning)
  log(
    `plan: ${runCount} measured runs, about ${Math.round(20 + (runCount * (config.durationMs + config.warmupMs + 600)) / 1000)} s`
  )
  const keyed = config.variants.some((v) => v !== "off")
  const redis = config.variants.includes("redis") ? redisServer() : { pid: undefined, version: "n/a" }
  if (config.variants.includes("redis")) {
    log(
      `redis ${redis.version}, ${redis.pid === undefined ? "its CPU not readable here" : `pid ${redis.pid}`}`
    )
  }
  const quietAtStart = await quiet.wait(2, 1000, [])
  const startedAt = new Date()
  const tree0 = Procs.treeState(root)
  const load0 = loadavg()

  const adminKey = `gw-admin-bench-${randomBytes(16).toString("hex")}`
  let databaseUrl: string | undefined
  if (keyed) {
    const name = `bench_tenancy_${randomBytes(6).toString("hex")}`
    psql(`CREATE DATABASE ${name}`)
    database = name
    const url = new URL(config.adminUrl)
    url.pathname = `/${name}`
    databaseUrl = url.toString()
    log(`database ${name} created`)
  }

  const sim = await Procs.startSim({
    cwd: root,
    model: "sim",
    ttftMs: config.ttftMs,
    itlMs: config.itlMs,
    outputTokens: config.outputTokens,
    capacity: 1024,
    cpu: sideCpu
  })
  children.push(sim.proc)
  log(`backend-sim pid ${sim.proc.pid} at ${sim.url}`)

  const gateways = new Map<Variant, Gateway>()
  for (const [i, variant] of config.variants.entries()) {
    const port = await Procs.freePort()
    const configPath = join(workDir, `gateway-${variant}.json`)
    writeFileSync(
      configPath,
      JSON.stringify({
        server: { host: "127.0.0.1", port },
        models: [{ name: "sim", backends: [{ id: "sim-1", url: sim.url }] }]
      })
    )
    const env: Record<string, string> =
      variant === "off"
        ? { GATEWAY_AUTH: "off", GATEWAY_RECORDING: "off" }
        : {
            GATEWAY_AUTH: "on",
            GATEWAY_RECORDING: "off",
            ADMIN_KEY: adminKey,
            DATABASE_URL: databaseUrl!,
            ...(variant === "redis" ? { REDIS_URL: config.redisUrl } : {})
          }
    // Built once, by the first; every gateway runs the same bundle.
    const started = await Procs.startGateway({
      cwd: root,
      configPath,
      port,
      logLevel: "info",
      stdout: "/dev/null",
      cpu: gatewayCpu,
      nodeArgs: config.gatewayNodeArgs,
      env,
      build: i === 0
    })
    children.push(started.proc)
    gateways.set(variant, { variant, ...started, ok: 0 })
    log(`gateway (${variantLabel[variant]}) pid ${started.proc.pid} at ${started.url}`)
  }

  // One key, created through the first keyed gateway's admin API; the others read it from the log.
  let headers: Record<string, string> = {}
  let keyId: string | undefined
  const first = [...gateways.values()].find((g) => g.variant !== "off")
  if (first !== undefined) {
    const created = await adminCall(
      first,
      adminKey,
      "POST",
      "/admin/keys",
      { tenant: "bench", name: "bench", limits: keyLimits },
      201
    )
    if (typeof created?.key !== "string")
      throw new Error(`POST /admin/keys: no key in ${JSON.stringify(created)}`)
    keyId = String(created.id)
    headers = { authorization: `Bearer ${created.key}` }
    log(`key ${keyId} created (tenant bench)`)
    if (config.variants.includes("redis")) redisKeyId = keyId
  }
  for (const gateway of gateways.values()) await verify(gateway, headers)

  const env: Env = { sim: sim.proc, gateways, headers, redisPid: redis.pid }
  log("warm-up (not measured)")
  await warmUp(env)

  const runs: Array<Run> = []
  const n = config.variants.length
  for (let round = 1; round <= config.rounds; round++) {
    const order = config.variants.map((_, i) => config.variants[(i + round - 1) % n]!)
    for (const stream of [false, true]) {
      for (const variant of order) runs.push(await measure(env, variant, stream, round))
    }
  }

  const checks: Array<GatewayCheck> = []
  for (const gateway of gateways.values()) {
    if (gateway.variant === "off") {
      checks.push({ variant: "off", answered: gateway.ok, limiter: undefined, passed: true })
      continue
    }
    const status = (await adminCall(
      gateway,
      adminKey,
      "GET",
      "/admin/limiter",
      undefined,
      200
    )) as NonNullable<GatewayCheck["limiter"]>
    const passed =
      status.store === gateway.variant &&
      status.storeFailures === 0 &&
      !status.degraded &&
      Object.values(status.refused).every((x) => x === 0)
    checks.push({ variant: gateway.variant, answered: gateway.ok, limiter: status, passed })
  }
  const rss = [...gateways.values()]
    .map((g) => {
      const kb = Procs.statusKb(g.proc.pid, "VmRSS")
      return `${g.variant} ${kb === undefined ? "n/a" : `${(kb / 1024).toFixed(1)} MB`}`
    })
    .join(", ")
  const load1 = loadavg()
  const tree1 = Procs.treeState(root)
  await stopAll()
  clearTimeout(watchdog)

  const scenarios = [scenario(false, runs), scenario(true, runs)]
  const meta: Record<string, string> = {
    date: startedAt.toISOString(),
    command: ["pnpm bench:tenancy", ...argv].join(" "),
    machine: `${cpuCount} CPUs (${cpus()[0]?.model ?? "unknown"}), load average ${load0.map((x) => x.toFixed(2)).join(" ")} at start, ${load1.map((x) => x.toFixed(2)).join(" ")} at end`,
    node: process.version,
    tree:
      tree1 === tree0
        ? tree0
        : `${tree0} at the start; at the end: ${tree1} (the bundle was built at the start)`,
    redis: config.variants.includes("redis")
      ? `${redis.version} at ${config.redisUrl}${redis.pid === undefined ? ", CPU not readable" : ""}`
      : "not used",
    pinning,
    ...(config.gatewayNodeArgs.length === 0
      ? {}
      : { "gateway node flags": config.gatewayNodeArgs.join(" ") }),
    "gateway RSS at the end": rss,
    "other load":
      `${quietAtStart ? "quiet" : "busy"} at the start; waited ${Math.round(quiet.waitedMs() / 1000)} s in all for quiet ` +
      `(budget --wait-quiet ${config.waitQuietMs / 1000} s); ${runs.filter(noisy).length} of ${runs.length} measured runs noisy ` +
      `(other processes > ${Procs.noisyPct}% of a core during the run)`
  }
  const targetRows = evaluate(scenarios)
  process.stdout.write(`${markdown(meta, scenarios, checks, targetRows)}\n`)

  if (flags.json !== "none") {
    const path =
      flags.json ??
      join(root, "bench", "results", `tenancy-${startedAt.toISOString().replace(/[:.]/g, "-")}.json`)
    mkdirSync(dirname(path), { recursive: true })
    writeFileSync(
      path,
      `${JSON.stringify({ meta, config, keyLimits, scenarios, checks, runs, targets: targetRows }, null, 2)}\n`
    )
    log(`results written to ${relative(process.cwd(), path)}`)
  }
  const errors = runs.reduce((t, r) => t + r.errors, 0)
  if (errors > 0 || checks.some((c) => !c.passed)) {
    log(`FAILED: ${errors} requests were not answered 200, or a limiter was not as expected`)
    process.exitCode = 1
  }
}

main().catch(async (error: unknown) => {
  log(`failed: ${error instanceof Error ? (error.stack ?? error.message) : String(error)}`)
  for (const p of children) log(`${p.name} stderr: ${p.stderrTail().slice(-2000)}`)
  await stopAll()
  clearTimeout(watchdog)
  process.exit(1)
})
