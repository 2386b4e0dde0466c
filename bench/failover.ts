/**
 * Failover benchmark: `pnpm bench:failover` (`node --import tsx bench/failover.ts --help`).
 *
 * What a client sees while one of a model's two replicas fails half of its requests (HTTP 500),
 * against both replicas healthy, in the same run. Two simulated backends (`sim-1`, `sim-2`) sit
 * behind one gateway model `sim`; the pool settings are the defaults (variant `defaults`), and
 * optionally a short breaker cooldown (variant `cooldown-1s`). Every phase runs on a freshly
 * started gateway (breakers closed, no ejection, fresh latency estimates) after an unmeasured
 * healthy warm-up; in the faulty phase `sim-1` is switched to `errorRate` just before the
 * measured load, so the window holds the moment the replica starts failing and what follows.
 * Rounds alternate the order of the two phases. Per phase: client-visible error rate (non-2xx, a
 * broken connection, or a stream that ends in an error event or without `[DONE]`), latency
 * percentiles, attempts per request (`x-gateway-attempts`, and the sims' own request counts),
 * the share each replica served (`x-gateway-backend`), the gateway's CPU time per request, and
 * the breakers at the end (`GET /admin/backends`, the gateway's log). Medians over rounds and
 * per-round ratios faulty / healthy. Markdown on stdout, progress on stderr, JSON in bench/results/.
 */

import { execFileSync } from "node:child_process"
import { randomBytes } from "node:crypto"
import {
  copyFileSync,
  mkdirSync,
  mkdtempSync,
  readFileSync,
  rmSync,
  symlinkSync,
  writeFileSync
} from "node:fs"
import { availableParallelism, cpus, loadavg, tmpdir } from "node:os"
import { dirname, join, relative } from "node:path"
import { fileURLToPath } from "node:url"
import { type Agent, request } from "undici"
import * as Flags from "./Flags.js"
import * as LoadGen from "./LoadGen.js"
import * as Procs from "./Procs.js"
import * as Report from "./Report.js"
import * as Stats from "./Stats.js"

const usage = `Usage: pnpm bench:failover [--flag value]...
  --rounds N            rounds, each a healthy and a faulty phase per variant, the order
                        alternating from round to round (5)
  --variants LIST       defaults: the pool section's defaults (what users get); cooldown-1s:
                        the same with circuit_breaker.cooldown_ms 1000; no-breaker: a breaker
                        that never opens, so retries alone (defaults,cooldown-1s)
  --requests N          request cap per phase (2000)
  --duration S          time cap per phase, seconds (15)
  --concurrency N       closed-loop concurrency (16)
  --warmup S            unmeasured healthy load on each fresh gateway, seconds (1.5)
  --error-rate R        share of sim-1's requests failed in the faulty phase (0.5)
  --error-status N      their HTTP status (500)
  --ttft-ms N --itl-ms N --output-tokens N   backend-sims (20, 2, 16)
  --log-level L         gateway LOG_LEVEL (info, the default of the real thing)
  --log-dir PATH        keep the gateways' logs there (default: a temporary directory, removed)
  --no-pin              do not pin processes with taskset
  --json PATH|none      results file (bench/results/failover-<time>.json)
  --wait-quiet S        wait in all up to S seconds, before the start and each phase, while other
                        processes use > ${Procs.noisyPct}% of a core (60)
  --time-limit S        hard limit of the whole run; children are stopped after it (480)`

const options = {
  rounds: { type: "string", default: "5" },
  variants: { type: "string", default: "defaults,cooldown-1s" },
  requests: { type: "string", default: "2000" },
  duration: { type: "string", default: "15" },
  concurrency: { type: "string", default: "16" },
  warmup: { type: "string", default: "1.5" },
  "error-rate": { type: "string", default: "0.5" },
  "error-status": { type: "string", default: "500" },
  "ttft-ms": { type: "string", default: "20" },
  "itl-ms": { type: "string", default: "2" },
  "output-tokens": { type: "string", default: "16" },
  "log-level": { type: "string", default: "info" },
  "log-dir": { type: "string" },
  "no-pin": { type: "boolean", default: false },
  json: { type: "string" },
  "wait-quiet": { type: "string", default: "60" },
  "time-limit": { type: "string", default: "480" },
  help: { type: "boolean", short: "h", default: false }
} as const
const { flags, argv, fail, num, int } = Flags.parse("bench:failover", usage, options)

/** The pool section of each variant's config file; `defaults` writes none. */
const variantPools = {
  defaults: undefined,
  "cooldown-1s": { circuit_breaker: { cooldown_ms: 1000 } },
  "no-breaker": { circuit_breaker: { consecutive_failures: 1_000_000, minimum_requests: 1_000_000 } }
} as const
type Variant = keyof typeof variantPools
const variantLabel: Record<Variant, string> = {
  defaults: "pool defaults",
  "cooldown-1s": "defaults + cooldown_ms 1000",
  "no-breaker": "defaults with a breaker that never opens: retries alone"
}
const parseVariants = (raw: string): ReadonlyArray<Variant> => {
  const vs = raw
    .split(",")
    .map((v) => (v in variantPools ? (v as Variant) : fail(`--variants: unknown variant '${v}'`)))
  return new Set(vs).size === vs.length ? vs : fail("--variants: a variant is named twice")
}

const config = {
  rounds: int("rounds", flags.rounds, 1),
  variants: parseVariants(flags.variants),
  maxRequests: int("requests", flags.requests, 1),
  durationMs: num("duration", flags.duration, 0.1) * 1000,
  concurrency: int("concurrency", flags.concurrency, 1),
  warmupMs: num("warmup", flags.warmup, 0) * 1000,
  errorRate: num("error-rate", flags["error-rate"], 0),
  errorStatus: int("error-status", flags["error-status"], 400),
  ttftMs: int("ttft-ms", flags["ttft-ms"], 0),
  itlMs: int("itl-ms", flags["itl-ms"], 0),
  outputTokens: int("output-tokens", flags["output-tokens"], 1),
  logLevel: flags["log-level"],
  waitQuietMs: num("wait-quiet", flags["wait-quiet"], 0) * 1000,
  timeLimitMs: num("time-limit", flags["time-limit"], 10) * 1000
}
if (config.errorRate > 1) fail("--error-rate must be at most 1")

/** The issue's targets, for the faulty phase against the healthy one. */
const targets = { errorRate: 0.001, p99Ratio: 2 } as const

const root = fileURLToPath(new URL("..", import.meta.url))
const log = (line: string): void => {
  process.stderr.write(`[bench:failover ${new Date().toISOString().slice(11, 19)}] ${line}\n`)
}

// The gateways get exactly the environment set below, whatever this shell has set.
for (const name of ["DATABASE_URL", "REDIS_URL", "ADMIN_KEY", "GATEWAY_AUTH", "GATEWAY_RECORDING"]) {
  delete process.env[name]
}

// --- Processes and pinning -------------------------------------------------------------------

// Read before pinning: afterwards this process sees only its own CPU.
const cpuCount = availableParallelism()
const pinned = !flags["no-pin"] && cpuCount >= 2 && Procs.hasTaskset()
const gatewayCpu = pinned ? 0 : undefined
const sideCpu = pinned ? 1 : undefined
const pinning = pinned
  ? "taskset: the gateway on CPU 0; both backend-sims and the load generator (this process) on CPU 1"
  : `not pinned (${flags["no-pin"] ? "--no-pin" : cpuCount < 2 ? "fewer than 2 CPUs" : "taskset not found"})`
if (sideCpu !== undefined) Procs.pinSelf(sideCpu)

const quiet = Procs.quietWaiter(config.waitQuietMs, log)
const children: Array<Procs.Proc> = []
const workDir = mkdtempSync(join(tmpdir(), "gateway-bench-failover-"))
const logDir = flags["log-dir"] ?? workDir
mkdirSync(logDir, { recursive: true })
let stopped = false
const stopAll = async (): Promise<void> => {
  if (stopped) return
  stopped = true
  await Promise.all(children.map((p) => p.stop()))
  rmSync(workDir, { recursive: true, force: true })
}
const { watchdog } = Procs.guard({ log, timeLimitMs: config.timeLimitMs, stop: stopAll })

// --- The backends ----------------------------------------------------------------------------

/** The replicas, in config order; the first is the one that fails in the faulty phase. */
const replicaIds = ["sim-1", "sim-2"] as const
type ReplicaId = (typeof replicaIds)[number]
const faultyReplica: ReplicaId = "sim-1"

interface Sim {
  readonly id: ReplicaId
  readonly proc: Procs.Proc
  readonly url: string
}

/** The counters of `GET /sim/stats` this benchmark reads. */
interface SimStats {
  readonly requests: number
  readonly errorsInjected: number
  readonly completed: number
}

const simStats = async (sim: Sim): Promise<SimStats> => {
  const res = await fetch(`${sim.url}/sim/stats`, { signal: AbortSignal.timeout(5000) })
  const text = await res.text()
  if (res.status !== 200) throw new Error(`${sim.id}: GET /sim/stats: HTTP ${res.status} ${text}`)
  return JSON.parse(text) as SimStats
}

const configureSim = async (sim: Sim, patch: Record<string, number>): Promise<void> => {
  const res = await fetch(`${sim.url}/sim/config`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify(patch),
    signal: AbortSignal.timeout(5000)
  })
  const text = await res.text()
  if (res.status !== 200) throw new Error(`${sim.id}: POST /sim/config: HTTP ${res.status} ${text}`)
}

/** Both sims back to answering everything. */
const resetSims = (sims: ReadonlyArray<Sim>) =>
  Promise.all(sims.map((s) => configureSim(s, { errorRate: 0, errorStatus: 500 })))

// --- Load ------------------------------------------------------------------------------------

type Phase = "healthy" | "faulty"

interface LoadResult {
  readonly requests: number
  readonly ok: number
  readonly errors: number
  /** Error count by kind (`HTTP 502`, `stream error event`, …). */
  readonly errorKinds: Readonly<Record<string, number>>
  readonly firstError: string | undefined
  readonly elapsedMs: number
  /** Every request's latency, ok or not (a client waits for both), ascending. */
  readonly latencyMs: Float64Array
  readonly jsonLatencyMs: Float64Array
  readonly streamLatencyMs: Float64Array
  /** Streams: time to the first `data:` chunk with content, ascending. */
  readonly ttftMs: Float64Array
  /** Answered requests by `x-gateway-backend`. */
  readonly servedBy: Readonly<Record<string, number>>
  /** Sum of `x-gateway-attempts` (1 when absent) over the answered requests. */
  readonly attempts: number
}

const jsonHeaders = { "content-type": "application/json" } as const
const bodies = { json: LoadGen.chatBody(false), stream: LoadGen.chatBody(true) } as const
const contentful = /"content":"(?:[^"\\]|\\.)/
/** An OpenAI error event in a stream: the gateway's own (`{"error":…}`) or a backend's (vLLM). */
const errorEvent = /data: \{"(?:error"|object":"error")/
const carryLength = 64

const header = (value: string | ReadonlyArray<string> | undefined): string | undefined =>
  Array.isArray(value) ? value[0] : (value as string | undefined)

/**
 * One bounded closed-loop load of chat requests, every second one streaming. Stops issuing after
 * `maxRequests` or `maxDurationMs`, whichever comes first; requests in flight are bounded by the
 * agent's timeouts.
 */
const runLoad = async (
  agent: Agent,
  url: string,
  concurrency: number,
  maxRequests: number,
  maxDurationMs: number
): Promise<LoadResult> => {
  const latency = new Float64Array(maxRequests)
  const jsonLatency = new Float64Array(maxRequests)
  const streamLatency = new Float64Array(maxRequests)
  const ttft = new Float64Array(maxRequests)
  let issued = 0
  let done = 0
  let jsonDone = 0
  let streamDone = 0
  let ttftCount = 0
  let ok = 0
  let errors = 0
  let attempts = 0
  let firstError: string | undefined
  const errorKinds: Record<string, number> = {}
  const servedBy: Record<string, number> = {}
  const start = performance.now()
  const deadline = start + maxDurationMs

  const finish = (stream: boolean, ms: number) => {
    latency[done++] = ms
    if (stream) streamLatency[streamDone++] = ms
    else jsonLatency[jsonDone++] = ms
  }
  const failed = (kind: string, detail: string) => {
    errors++
    errorKinds[kind] = (errorKinds[kind] ?? 0) + 1
    firstError ??= `${kind}: ${detail.slice(0, 300)}`
  }

  const once = async (stream: boolean): Promise<void> => {
    const sent = performance.now()
    try {
      const res = await request(url, {
        method: "POST",
        body: stream ? bodies.stream : bodies.json,
        headers: jsonHeaders,
        dispatcher: agent
      })
      const backend = header(res.headers["x-gateway-backend"])
      const tries = Number(header(res.headers["x-gateway-attempts"]) ?? "1")
      if (res.statusCode !== 200) {
        const text = await res.body.text()
        finish(stream, performance.now() - sent)
        return failed(`HTTP ${res.statusCode}`, text)
      }
      let answered: boolean
      if (!stream) {
        const text = await res.body.text()
        finish(stream, performance.now() - sent)
        answered = text.includes('"choices"')
        if (!answered) failed("body without choices", text)
      } else {
        let first: number | undefined
        let carry = ""
        let broken: string | undefined
        for await (const chunk of res.body) {
          // latin1 keeps bytes as they are; only ASCII patterns are searched for.
          const text = carry + (chunk as Buffer).toString("latin1")
          if (first === undefined && contentful.test(text)) first = performance.now() - sent
          if (broken === undefined && errorEvent.test(text)) broken = text.slice(text.search(errorEvent))
          carry = text.slice(-carryLength)
        }
        finish(stream, performance.now() - sent)
        answered = false
        if (broken !== undefined) failed("stream error event", broken)
        else if (!carry.includes("data: [DONE]")) failed("stream without [DONE]", carry)
        else if (first === undefined) failed("stream without content", carry)
        else {
          answered = true
          ttft[ttftCount++] = first
        }
      }
      if (!answered) return
      ok++
      attempts += Number.isFinite(tries) && tries >= 1 ? tries : 1
      const by = backend ?? "(no x-gateway-backend)"
      servedBy[by] = (servedBy[by] ?? 0) + 1
    } catch (error) {
      finish(stream, performance.now() - sent)
      failed("connection", error instanceof Error ? `${error.name}: ${error.message}` : String(error))
    }
  }

  const worker = async (): Promise<void> => {
    while (issued < maxRequests && performance.now() < deadline) {
      const i = issued++
      await once(i % 2 === 1)
    }
  }
  await Promise.all(Array.from({ length: concurrency }, worker))
  const sorted = (xs: Float64Array, n: number) => xs.slice(0, n).sort()
  return {
    requests: issued,
    ok,
    errors,
    errorKinds,
    firstError,
    elapsedMs: performance.now() - start,
    latencyMs: sorted(latency, done),
    jsonLatencyMs: sorted(jsonLatency, jsonDone),
    streamLatencyMs: sorted(streamLatency, streamDone),
    ttftMs: sorted(ttft, ttftCount),
    servedBy,
    attempts
  }
}

// --- The gateway of one phase ----------------------------------------------------------------

const adminKey = `gw-admin-bench-${randomBytes(16).toString("hex")}`

/** What `GET /admin/backends` shows of one replica (the fields read here). */
interface BackendView {
  readonly id: string
  readonly health: string
  readonly circuit: {
    readonly state: string
    readonly opens: number
    readonly retry_after_ms: number
    readonly window_requests: number
    readonly window_failures: number
  }
  readonly requests: number
  readonly failures: number
  readonly last_error: string | null
}

const adminBackends = async (gatewayUrl: string): Promise<ReadonlyArray<BackendView>> => {
  const res = await fetch(`${gatewayUrl}/admin/backends`, {
    headers: { authorization: `Bearer ${adminKey}` },
    signal: AbortSignal.timeout(5000)
  })
  const text = await res.text()
  if (res.status !== 200) throw new Error(`GET /admin/backends: HTTP ${res.status} ${text}`)
  return (JSON.parse(text) as { data: ReadonlyArray<BackendView> }).data
}

/** What the gateway's log says happened to the pool during the measured load. */
interface PoolLog {
  readonly circuitOpened: number
  readonly circuitHalfOpened: number
  readonly circuitClosed: number
  /** Why each opening happened (`ConsecutiveFailures`, `FailureRate`, `ProbeFailed`), in order. */
  readonly openCauses: ReadonlyArray<string>
  /** From the start of the measured load to the first `circuit open`, ms. */
  readonly firstOpenAfterMs: number | undefined
  readonly attemptFailed: number
  readonly ejected: number
  readonly fallbacks: number
  /** Error lines (`level: error`), which should not occur. */
  readonly errorLines: number
}

const readPoolLog = (path: string, fromMs: number): PoolLog => {
  const counts = {
    circuitOpened: 0,
    circuitHalfOpened: 0,
    circuitClosed: 0,
    attemptFailed: 0,
    ejected: 0,
    fallbacks: 0,
    errorLines: 0
  }
  const openCauses: Array<string> = []
  let firstOpenAt: number | undefined
  let text = ""
  try {
    text = readFileSync(path, "utf8")
  } catch {
    // no log
  }
  for (const line of text.split("\n")) {
    if (line === "" || !line.startsWith("{")) continue
    let entry: { time?: string; level?: string; msg?: string; cause?: unknown }
    try {
      entry = JSON.parse(line)
    } catch {
      continue
    }
    const at = Date.parse(entry.time ?? "")
    if (!(at >= fromMs)) continue
    if (entry.level === "error" || entry.level === "fatal") counts.errorLines++
    switch (entry.msg) {
      case "circuit open":
        counts.circuitOpened++
        openCauses.push(String(entry.cause))
        firstOpenAt ??= at
        break
      case "circuit half-open":
        counts.circuitHalfOpened++
        break
      case "circuit closed":
        counts.circuitClosed++
        break
      case "backend attempt failed":
        counts.attemptFailed++
        break
      case "backend ejected":
        counts.ejected++
        break
      case "falling back to another model":
        counts.fallbacks++
        break
    }
  }
  return {
    ...counts,
    openCauses,
    firstOpenAfterMs: firstOpenAt === undefined ? undefined : firstOpenAt - fromMs
  }
}

interface PhaseRun {
  readonly variant: Variant
  readonly round: number
  readonly phase: Phase
  readonly gatewayPid: number
  readonly requests: number
  readonly ok: number
  readonly errors: number
  readonly errorKinds: Readonly<Record<string, number>>
  readonly firstError: string | undefined
  readonly errorRate: number
  readonly elapsedMs: number
  readonly rps: number
  readonly p50Ms: number | undefined
  readonly p99Ms: number | undefined
  readonly maxMs: number | undefined
  readonly jsonP99Ms: number | undefined
  readonly streamP99Ms: number | undefined
  readonly ttftP99Ms: number | undefined
  /** Mean of `x-gateway-attempts` over the answered requests. */
  readonly meanAttempts: number | undefined
  /** Chat requests the sims received, per client request (every attempt, failed or not). */
  readonly upstreamPerRequest: number
  /** Share of the answered requests each replica served. */
  readonly share: Readonly<Record<string, number>>
  /** Per replica: chat requests received and errors injected during the load (`/sim/stats`). */
  readonly sims: Readonly<Record<string, { readonly requests: number; readonly errorsInjected: number }>>
  readonly gatewayCpuMsPerReq: number
  readonly gatewayCpuPct: number
  readonly otherCpuPct: number
  readonly stealPct: number
  /** The replicas as `GET /admin/backends` showed them right after the load. */
  readonly backends: ReadonlyArray<BackendView>
  readonly poolLog: PoolLog
}

interface Env {
  readonly sims: ReadonlyArray<Sim>
  /** The gateway bundle every phase runs (`snapshotGateway`). */
  readonly gatewayScript: string
}

/**
 * The code measured is fixed when the run starts: the bundle is built then and every phase's
 * gateway runs a copy of it (with its node_modules linked, for PGlite), whatever happens to
 * `services/gateway/dist` meanwhile.
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

const writeConfig = (variant: Variant, port: number, sims: ReadonlyArray<Sim>): string => {
  const path = join(workDir, `gateway-${variant}.json`)
  const pool = variantPools[variant]
  writeFileSync(
    path,
    JSON.stringify({
      server: { host: "127.0.0.1", port },
      ...(pool === undefined ? {} : { pool }),
      models: [{ name: "sim", backends: sims.map((s) => ({ id: s.id, url: s.url })) }]
    })
  )
  return path
}

/** One phase on a fresh gateway: start, warm up healthy, set the fault, measure, read, stop. */
const runPhase = async (env: Env, variant: Variant, round: number, phase: Phase): Promise<PhaseRun> => {
  const port = await Procs.freePort()
  const configPath = writeConfig(variant, port, env.sims)
  const logPath = join(logDir, `gateway-${variant}-r${round}-${phase}.log`)
  const gateway = await Procs.startGateway({
    cwd: root,
    configPath,
    port,
    logLevel: config.logLevel,
    stdout: logPath,
    cpu: gatewayCpu,
    // As `pnpm bench` runs it: the proxy alone (recording is `pnpm bench:events`' subject).
    env: { GATEWAY_AUTH: "off", GATEWAY_RECORDING: "off", ADMIN_KEY: adminKey },
    script: env.gatewayScript,
    build: false
  })
  children.push(gateway.proc)
  const url = `${gateway.url}/v1/chat/completions`
  const agent = LoadGen.makeAgent(config.concurrency)
  try {
    await resetSims(env.sims)
    if (config.warmupMs > 0) {
      const w = await runLoad(agent, url, config.concurrency, 100_000, config.warmupMs)
      if (w.ok === 0) throw new Error(`warm-up failed: ${w.firstError}`)
      if (w.errors > 0) log(`warm-up: ${w.errors} errors (first: ${w.firstError})`)
    }
    await quiet.wait(1, 250, [gateway.proc.pid, ...env.sims.map((s) => s.proc.pid)])
    const faulty = env.sims.find((s) => s.id === faultyReplica)!
    if (phase === "faulty") {
      await configureSim(faulty, { errorRate: config.errorRate, errorStatus: config.errorStatus })
    }
    const stats0 = await Promise.all(env.sims.map(simStats))
    const sys0 = Procs.systemCpu()
    const gw0 = Procs.cpuTimeMs(gateway.proc.pid)
    const sims0 = env.sims.reduce((t, s) => t + Procs.cpuTimeMs(s.proc.pid), 0)
    const self0 = Procs.selfCpuMs()
    const loadStartMs = Date.now()
    const r = await runLoad(agent, url, config.concurrency, config.maxRequests, config.durationMs)
    const self1 = Procs.selfCpuMs()
    const sims1 = env.sims.reduce((t, s) => t + Procs.cpuTimeMs(s.proc.pid), 0)
    const gw1 = Procs.cpuTimeMs(gateway.proc.pid)
    const sys1 = Procs.systemCpu()
    const stats1 = await Promise.all(env.sims.map(simStats))
    const backends = await adminBackends(gateway.url)
    await resetSims(env.sims)
    await agent.close()
    await gateway.proc.stop()
    const poolLog = readPoolLog(logPath, loadStartMs)

    const pct = (ms: number) => (100 * ms) / r.elapsedMs
    const ours = gw1 - gw0 + (sims1 - sims0) + (self1 - self0)
    const sims: Record<string, { requests: number; errorsInjected: number }> = {}
    let upstream = 0
    for (const [i, s] of env.sims.entries()) {
      const requests = stats1[i]!.requests - stats0[i]!.requests
      sims[s.id] = { requests, errorsInjected: stats1[i]!.errorsInjected - stats0[i]!.errorsInjected }
      upstream += requests
    }
    const share: Record<string, number> = {}
    for (const [by, n] of Object.entries(r.servedBy)) share[by] = n / Math.max(1, r.ok)
    const requests = Math.max(1, r.requests)
    const run: PhaseRun = {
      variant,
      round,
      phase,
      gatewayPid: gateway.proc.pid,
      requests: r.requests,
      ok: r.ok,
      errors: r.errors,
      errorKinds: r.errorKinds,
      firstError: r.firstError,
      errorRate: r.errors / requests,
      elapsedMs: r.elapsedMs,
      rps: (1000 * r.requests) / r.elapsedMs,
      p50Ms: Stats.percentile(r.latencyMs, 50),
      p99Ms: Stats.percentile(r.latencyMs, 99),
      maxMs: Stats.percentile(r.latencyMs, 100),
      jsonP99Ms: Stats.percentile(r.jsonLatencyMs, 99),
      streamP99Ms: Stats.percentile(r.streamLatencyMs, 99),
      ttftP99Ms: Stats.percentile(r.ttftMs, 99),
      meanAttempts: r.ok === 0 ? undefined : r.attempts / r.ok,
      upstreamPerRequest: upstream / requests,
      share,
      sims,
      gatewayCpuMsPerReq: (gw1 - gw0) / requests,
      gatewayCpuPct: pct(gw1 - gw0),
      otherCpuPct: Math.max(0, pct(sys1.busyMs - sys0.busyMs - ours)),
      stealPct: pct(sys1.stealMs - sys0.stealMs),
      backends,
      poolLog
    }
    const bad = backends.find((b) => b.id === faultyReplica)
    log(
      `${variant.padEnd(11)} round ${round} ${phase.padEnd(7)}: ${r.requests} req, ` +
        `${r.errors} errors${r.errors > 0 ? ` (first: ${r.firstError})` : ""}, ` +
        `p50 ${Report.fixed(run.p50Ms, 1)} ms, p99 ${Report.fixed(run.p99Ms, 1)} ms, ` +
        `attempts ${Report.fixed(run.meanAttempts, 3)}, ${faultyReplica} share ${pctText(share[faultyReplica])}, ` +
        `gw ${run.gatewayCpuMsPerReq.toFixed(3)} ms cpu/req` +
        (bad === undefined
          ? ""
          : `; ${faultyReplica} circuit ${bad.circuit.state}, opened ${poolLog.circuitOpened}× ` +
            `(${poolLog.openCauses.join(", ") || "never"}), first after ${Report.fixed(poolLog.firstOpenAfterMs, 0) ?? "n/a"} ms`) +
        `, other ${Math.round(run.otherCpuPct + run.stealPct)}%`
    )
    return run
  } finally {
    await agent.close().catch(() => undefined)
    await gateway.proc.stop()
    children.splice(children.indexOf(gateway.proc), 1)
  }
}

// --- Summaries -------------------------------------------------------------------------------

const pctText = (x: number | undefined, digits = 1): string =>
  x === undefined ? "n/a" : `${(100 * x).toFixed(digits)} %`

const noisy = (r: PhaseRun) => r.otherCpuPct + r.stealPct > Procs.noisyPct

interface Summary {
  readonly variant: Variant
  readonly phase: Phase
  readonly rounds: number
  readonly requests: number
  readonly errors: number
  /** All errors of all rounds over all requests of all rounds. */
  readonly errorRate: number
  readonly maxRoundErrorRate: number
  readonly errorKinds: Readonly<Record<string, number>>
  readonly rps: number | undefined
  readonly p50Ms: number | undefined
  readonly p99Ms: number | undefined
  readonly maxMs: number | undefined
  readonly jsonP99Ms: number | undefined
  readonly streamP99Ms: number | undefined
  readonly ttftP99Ms: number | undefined
  readonly meanAttempts: number | undefined
  readonly upstreamPerRequest: number | undefined
  readonly share: Readonly<Record<string, number | undefined>>
  readonly gatewayCpuMsPerReq: number | undefined
  readonly gatewayCpuPct: number | undefined
  readonly noisyRuns: number
}

const summarize = (variant: Variant, phase: Phase, runs: ReadonlyArray<PhaseRun>): Summary => {
  const med = (f: (r: PhaseRun) => number | undefined) => Stats.median(runs.map(f))
  const requests = runs.reduce((t, r) => t + r.requests, 0)
  const errors = runs.reduce((t, r) => t + r.errors, 0)
  const errorKinds: Record<string, number> = {}
  for (const r of runs)
    for (const [k, n] of Object.entries(r.errorKinds)) errorKinds[k] = (errorKinds[k] ?? 0) + n
  const share: Record<string, number | undefined> = {}
  for (const id of replicaIds) share[id] = med((r) => r.share[id] ?? 0)
  return {
    variant,
    phase,
    rounds: runs.length,
    requests,
    errors,
    errorRate: errors / Math.max(1, requests),
    maxRoundErrorRate: Stats.max(runs.map((r) => r.errorRate)) ?? 0,
    errorKinds,
    rps: med((r) => r.rps),
    p50Ms: med((r) => r.p50Ms),
    p99Ms: med((r) => r.p99Ms),
    maxMs: Stats.max(runs.map((r) => r.maxMs)),
    jsonP99Ms: med((r) => r.jsonP99Ms),
    streamP99Ms: med((r) => r.streamP99Ms),
    ttftP99Ms: med((r) => r.ttftP99Ms),
    meanAttempts: med((r) => r.meanAttempts),
    upstreamPerRequest: med((r) => r.upstreamPerRequest),
    share,
    gatewayCpuMsPerReq: med((r) => r.gatewayCpuMsPerReq),
    gatewayCpuPct: med((r) => r.gatewayCpuPct),
    noisyRuns: runs.filter(noisy).length
  }
}

interface VariantResult {
  readonly variant: Variant
  readonly healthy: Summary
  readonly faulty: Summary
  /** Medians over rounds of faulty / healthy within the same round. */
  readonly ratio: {
    readonly p50: number | undefined
    readonly p99: number | undefined
    readonly ttftP99: number | undefined
    readonly cpuPerReq: number | undefined
  }
  readonly perRoundP99Ratio: ReadonlyArray<number | undefined>
}

const variantResult = (variant: Variant, runs: ReadonlyArray<PhaseRun>): VariantResult => {
  const mine = runs.filter((r) => r.variant === variant)
  const of = (p: Phase) => mine.filter((r) => r.phase === p)
  const pairs = of("faulty").flatMap((f) => {
    const h = mine.find((r) => r.phase === "healthy" && r.round === f.round)
    return h === undefined ? [] : [{ f, h }]
  })
  const ratio = (g: (r: PhaseRun) => number | undefined) =>
    pairs.map(({ f, h }) => {
      const a = g(f)
      const b = g(h)
      return a === undefined || b === undefined || b === 0 ? undefined : a / b
    })
  return {
    variant,
    healthy: summarize(variant, "healthy", of("healthy")),
    faulty: summarize(variant, "faulty", of("faulty")),
    ratio: {
      p50: Stats.median(ratio((r) => r.p50Ms)),
      p99: Stats.median(ratio((r) => r.p99Ms)),
      ttftP99: Stats.median(ratio((r) => r.ttftP99Ms)),
      cpuPerReq: Stats.median(ratio((r) => r.gatewayCpuMsPerReq))
    },
    perRoundP99Ratio: ratio((r) => r.p99Ms)
  }
}

// --- Report ----------------------------------------------------------------------------------

interface TargetRow {
  readonly target: string
  readonly measured: string
  readonly passed: boolean | undefined
}

const evaluate = (results: ReadonlyArray<VariantResult>): ReadonlyArray<TargetRow> =>
  results.flatMap((v) => [
    {
      target: `client-visible error rate < ${targets.errorRate * 100} % while ${faultyReplica} fails ${config.errorRate * 100} % (${v.variant}, all rounds)`,
      measured: `${v.faulty.errors} / ${v.faulty.requests} = ${pctText(v.faulty.errorRate, 3)}`,
      passed: v.faulty.errorRate < targets.errorRate
    },
    {
      target: `p99 faulty ≤ ${targets.p99Ratio}× healthy (${v.variant}, median of per-round ratios)`,
      measured:
        `${Report.fixed(v.ratio.p99, 2) ?? "n/a"}× (${Report.fixed(v.faulty.p99Ms, 1)} vs ${Report.fixed(v.healthy.p99Ms, 1)} ms; ` +
        `rounds ${v.perRoundP99Ratio.map((x) => Report.fixed(x, 2) ?? "n/a").join(", ")})`,
      passed: v.ratio.p99 === undefined ? undefined : v.ratio.p99 <= targets.p99Ratio
    }
  ])

const f1 = (x: number | undefined) => Report.fixed(x, 1)
const f3 = (x: number | undefined) => Report.fixed(x, 3)

const markdown = (
  meta: Record<string, string>,
  results: ReadonlyArray<VariantResult>,
  runs: ReadonlyArray<PhaseRun>,
  targetRows: ReadonlyArray<TargetRow>
): string => {
  const out: Array<string> = []
  out.push("# Failover benchmark", "")
  for (const [k, v] of Object.entries(meta)) out.push(`- ${k}: ${v}`)
  out.push(
    "",
    `## Per phase (medians of ${config.rounds} rounds; errors summed over the rounds)`,
    "",
    `Latency in ms over every request (ok or not), mixed 50/50 non-streaming / streaming; ` +
      `attempts = mean \`x-gateway-attempts\` of answered requests; upstream/req = chat requests ` +
      `the sims received per client request; share = answered requests per replica; max = the slowest ` +
      `request of all rounds.`,
    "",
    Report.table(
      [
        "variant",
        "phase",
        "req/s",
        "errors",
        "error rate",
        "p50",
        "p99",
        "p99 json",
        "p99 stream",
        "TTFT p99",
        "max",
        "attempts",
        "upstream/req",
        `share ${replicaIds[0]} / ${replicaIds[1]}`,
        "gw CPU ms/req",
        "gw CPU %",
        "noisy"
      ],
      results.flatMap((v) =>
        [v.healthy, v.faulty].map((s) => [
          v.variant,
          s.phase,
          Report.rps(s.rps),
          `${s.errors} / ${s.requests}`,
          pctText(s.errorRate, 3),
          f1(s.p50Ms),
          f1(s.p99Ms),
          f1(s.jsonP99Ms),
          f1(s.streamP99Ms),
          f1(s.ttftP99Ms),
          f1(s.maxMs),
          f3(s.meanAttempts),
          f3(s.upstreamPerRequest),
          `${pctText(s.share[replicaIds[0]], 0)} / ${pctText(s.share[replicaIds[1]], 0)}`,
          f3(s.gatewayCpuMsPerReq),
          Report.fixed(s.gatewayCpuPct, 0),
          `${s.noisyRuns}/${s.rounds}`
        ])
      )
    ),
    "",
    "### Faulty / healthy (median over rounds of the ratio within the round)",
    "",
    Report.table(
      ["variant", "p50", "p99", "TTFT p99", "gw CPU ms/req", "p99 per round"],
      results.map((v) => [
        v.variant,
        `${Report.fixed(v.ratio.p50, 2)}×`,
        `${Report.fixed(v.ratio.p99, 2)}×`,
        `${Report.fixed(v.ratio.ttftP99, 2)}×`,
        `${Report.fixed(v.ratio.cpuPerReq, 2)}×`,
        v.perRoundP99Ratio.map((x) => Report.fixed(x, 2) ?? "n/a").join(", ")
      ])
    ),
    "",
    `### ${faultyReplica} at the end of each faulty phase (\`GET /admin/backends\` and the gateway's log)`,
    "",
    Report.table(
      [
        "variant",
        "round",
        "circuit",
        "opens (log)",
        "causes",
        "first open after ms",
        "half-opens / closes",
        `${faultyReplica} attempts / failed`,
        "errors",
        "error kinds"
      ],
      runs
        .filter((r) => r.phase === "faulty")
        .map((r) => {
          const b = r.backends.find((x) => x.id === faultyReplica)
          const s = r.sims[faultyReplica]
          return [
            r.variant,
            String(r.round),
            b === undefined
              ? "n/a"
              : `${b.circuit.state}${b.circuit.state === "open" ? ` (${Math.round(b.circuit.retry_after_ms / 1000)} s left)` : ""}, ${b.health}`,
            String(r.poolLog.circuitOpened),
            r.poolLog.openCauses.join(", ") || "–",
            f1(r.poolLog.firstOpenAfterMs) ?? "–",
            `${r.poolLog.circuitHalfOpened} / ${r.poolLog.circuitClosed}`,
            s === undefined ? "n/a" : `${s.requests} / ${s.errorsInjected}`,
            String(r.errors),
            Object.entries(r.errorKinds)
              .map(([k, n]) => `${k} ×${n}`)
              .join(", ") || "–"
          ]
        })
    ),
    "",
    "## Targets",
    "",
    Report.table(
      ["target", "measured", ""],
      targetRows.map((t) => [t.target, t.measured, Report.check(t.passed)])
    ),
    "",
    "## Summary (healthy → faulty; ratios are medians of per-round ratios)",
    "",
    Report.table(
      [
        "variant",
        "error rate",
        "p99 ms",
        "p99 ratio",
        "TTFT p99 ratio",
        "gw CPU ms/req",
        "CPU ratio",
        "attempts (faulty)",
        `${faultyReplica} share (faulty)`,
        "breaker opens (faulty, median)"
      ],
      results.map((v) => [
        v.variant,
        `${pctText(v.healthy.errorRate, 3)} → ${pctText(v.faulty.errorRate, 3)}`,
        `${f1(v.healthy.p99Ms)} → ${f1(v.faulty.p99Ms)}`,
        `${Report.fixed(v.ratio.p99, 2)}×`,
        `${Report.fixed(v.ratio.ttftP99, 2)}×`,
        `${f3(v.healthy.gatewayCpuMsPerReq)} → ${f3(v.faulty.gatewayCpuMsPerReq)}`,
        `${Report.fixed(v.ratio.cpuPerReq, 2)}×`,
        f3(v.faulty.meanAttempts),
        pctText(v.faulty.share[faultyReplica], 1),
        Report.fixed(
          Stats.median(
            runs
              .filter((r) => r.variant === v.variant && r.phase === "faulty")
              .map((r) => r.poolLog.circuitOpened)
          ),
          0
        )
      ])
    ),
    ""
  )
  const firstErrors = runs.filter((r) => r.firstError !== undefined)
  if (firstErrors.length > 0) {
    out.push("First error of each phase that had one:", "")
    for (const r of firstErrors) out.push(`- ${r.variant} round ${r.round} ${r.phase}: ${r.firstError}`)
    out.push("")
  }
  return out.join("\n")
}

// --- Main ------------------------------------------------------------------------------------

const main = async (): Promise<void> => {
  const phases = config.rounds * config.variants.length * 2
  const perPhaseS = Math.min(config.durationMs / 1000, config.maxRequests / (config.concurrency * 18)) + 3
  log(pinning)
  log(
    `plan: ${phases} phases on fresh gateways, about ${Math.round(10 + phases * (perPhaseS + config.warmupMs / 1000))} s`
  )
  const quietAtStart = await quiet.wait(2, 1000, [])
  const startedAt = new Date()
  const tree0 = Procs.treeState(root)
  const gatewayScript = snapshotGateway()
  const load0 = loadavg()

  const sims: Array<Sim> = []
  for (const id of replicaIds) {
    const started = await Procs.startSim({
      cwd: root,
      model: "sim",
      ttftMs: config.ttftMs,
      itlMs: config.itlMs,
      outputTokens: config.outputTokens,
      capacity: 1024,
      cpu: sideCpu
    })
    children.push(started.proc)
    sims.push({ id, proc: started.proc, url: started.url })
    log(`backend-sim ${id} pid ${started.proc.pid} at ${started.url}`)
  }
  const env: Env = { sims, gatewayScript }

  const runs: Array<PhaseRun> = []
  for (let round = 1; round <= config.rounds; round++) {
    const n = config.variants.length
    const order = config.variants.map((_, i) => config.variants[(i + round - 1) % n]!)
    const phaseOrder: ReadonlyArray<Phase> = round % 2 === 1 ? ["healthy", "faulty"] : ["faulty", "healthy"]
    for (const variant of order) {
      for (const phase of phaseOrder) runs.push(await runPhase(env, variant, round, phase))
    }
  }
  const load1 = loadavg()
  const tree1 = Procs.treeState(root)
  await stopAll()
  clearTimeout(watchdog)

  const results = config.variants.map((v) => variantResult(v, runs))
  const meta: Record<string, string> = {
    date: startedAt.toISOString(),
    command: ["pnpm bench:failover", ...argv].join(" "),
    machine: `${cpuCount} CPUs (${cpus()[0]?.model ?? "unknown"}), load average ${load0.map((x) => x.toFixed(2)).join(" ")} at start, ${load1.map((x) => x.toFixed(2)).join(" ")} at end`,
    node: process.version,
    tree:
      tree1 === tree0
        ? tree0
        : `${tree0} at the start; at the end: ${tree1} (the bundle was built at the start)`,
    pinning,
    gateway:
      `bundle on plain node (built at the start, every phase runs that copy), GATEWAY_AUTH=off, GATEWAY_RECORDING=off, LOG_LEVEL=${config.logLevel} (stdout to a file, read for the breaker's transitions); ` +
      `one model, replicas ${replicaIds.join(", ")}; a fresh process per phase`,
    variants: config.variants
      .map((v) => {
        const pool = variantPools[v]
        return `${v} = ${variantLabel[v]} (${pool === undefined ? "no pool section" : `pool ${JSON.stringify(pool)}`})`
      })
      .join("; "),
    backends: `two backend-sims, ttft ${config.ttftMs} ms, itl ${config.itlMs} ms, ${config.outputTokens} tokens, capacity 1024; faulty phase: ${faultyReplica} errorRate ${config.errorRate}, HTTP ${config.errorStatus}`,
    load:
      `closed loop on undici keep-alive, concurrency ${config.concurrency}, every second request streaming; ` +
      `per phase ${config.warmupMs / 1000} s healthy warm-up, then ≤ ${config.maxRequests} requests or ≤ ${config.durationMs / 1000} s`,
    "other load":
      `${quietAtStart ? "quiet" : "busy"} at the start; waited ${Math.round(quiet.waitedMs() / 1000)} s in all for quiet ` +
      `(budget --wait-quiet ${config.waitQuietMs / 1000} s); ${runs.filter(noisy).length} of ${runs.length} phases noisy ` +
      `(other processes > ${Procs.noisyPct}% of a core during the load)`
  }
  const targetRows = evaluate(results)
  process.stdout.write(`${markdown(meta, results, runs, targetRows)}\n`)

  if (flags.json !== "none") {
    const path =
      flags.json ??
      join(root, "bench", "results", `failover-${startedAt.toISOString().replace(/[:.]/g, "-")}.json`)
    mkdirSync(dirname(path), { recursive: true })
    writeFileSync(path, `${JSON.stringify({ meta, config, results, runs, targets: targetRows }, null, 2)}\n`)
    log(`results written to ${relative(process.cwd(), path)}`)
  }
  if (flags["log-dir"] !== undefined) log(`gateway logs kept in ${flags["log-dir"]}`)
  const healthyErrors = results.reduce((t, v) => t + v.healthy.errors, 0)
  if (healthyErrors > 0) {
    log(`FAILED: ${healthyErrors} requests failed in healthy phases`)
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
