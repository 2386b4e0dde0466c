/**
 * Tracing on the hot path: `pnpm bench:tracing` (`node --import tsx bench/tracing.ts --help`).
 *
 * Starts one simulated backend answering instantly and three gateways on the same bundle and
 * config (recording and keys off): `off` (no OTEL variables: spans off), `on` (OTLP/HTTP export to
 * a sink in this process, every request sampled) and `sampled` (the same with
 * `parentbased_traceidratio` at `--sample-ratio`). In each round every variant takes the same
 * bounded closed-loop load, non-streaming and streaming, one gateway at a time, in an order that
 * rotates from round to round; the report gives gateway CPU per request, req/s and latency
 * (medians over rounds and each round), the deltas against `off` in the same round, and what the
 * sink received: spans per request and bytes per request, per variant.
 * Gateways on CPU 0, the backend, the sink and this process (the load generator) on CPU 1.
 * Markdown on stdout, progress on stderr, JSON to bench/results/.
 */
import { createHash } from "node:crypto"
import {
  mkdirSync,
  mkdtempSync,
  readdirSync,
  readFileSync,
  readlinkSync,
  rmSync,
  writeFileSync
} from "node:fs"
import { createServer, type IncomingMessage, type Server, type ServerResponse } from "node:http"
import { availableParallelism, cpus, loadavg, tmpdir } from "node:os"
import { dirname, join, relative } from "node:path"
import { fileURLToPath } from "node:url"
import { gunzipSync } from "node:zlib"
import * as Flags from "./Flags.js"
import * as LoadGen from "./LoadGen.js"
import * as Procs from "./Procs.js"
import * as Report from "./Report.js"
import * as Stats from "./Stats.js"

const usage = `Usage: pnpm bench:tracing [--flag value]...
  --rounds N            rounds; each measures every variant, non-streaming and streaming (5)
  --concurrency N       closed-loop workers (32)
  --requests N          request cap per measured run (20000)
  --duration S          time cap per measured run, seconds (2.5)
  --warmup S            unmeasured load before each run, seconds (0.5)
  --output-tokens N     simulated completion length; the backend answers instantly (16)
  --sample-ratio X      OTEL_TRACES_SAMPLER_ARG of the \`sampled\` variant (0.01)
  --log-level L         gateway LOG_LEVEL (info, the default of the real thing)
  --json PATH|none      results file (bench/results/tracing-<time>.json)
  --no-pin              do not pin processes with taskset
  --wait-quiet S        wait in all up to S seconds, before the start and each run, while other
                        processes use > 25% of a core (60)
  --retries N           measure a run again, up to N times, when other processes used > 25% of a
                        core during it; the last attempt is kept (2)
  --time-limit S        hard limit of the whole run; children are stopped after it (600)`

const options = {
  rounds: { type: "string", default: "5" },
  concurrency: { type: "string", default: "32" },
  requests: { type: "string", default: "20000" },
  duration: { type: "string", default: "2.5" },
  warmup: { type: "string", default: "0.5" },
  "output-tokens": { type: "string", default: "16" },
  "sample-ratio": { type: "string", default: "0.01" },
  "log-level": { type: "string", default: "info" },
  json: { type: "string" },
  "no-pin": { type: "boolean", default: false },
  "wait-quiet": { type: "string", default: "60" },
  retries: { type: "string", default: "2" },
  "time-limit": { type: "string", default: "600" },
  help: { type: "boolean", short: "h", default: false }
} as const
const { flags, argv, num, int, fail } = Flags.parse("bench:tracing", usage, options)

const config = {
  rounds: int("rounds", flags.rounds, 1),
  concurrency: int("concurrency", flags.concurrency, 1),
  maxRequests: int("requests", flags.requests, 1),
  durationMs: num("duration", flags.duration, 0.1) * 1000,
  warmupMs: num("warmup", flags.warmup, 0) * 1000,
  outputTokens: int("output-tokens", flags["output-tokens"], 1),
  sampleRatio: num("sample-ratio", flags["sample-ratio"], 0),
  logLevel: flags["log-level"],
  waitQuietMs: num("wait-quiet", flags["wait-quiet"], 0) * 1000,
  retries: int("retries", flags.retries, 0),
  timeLimitMs: num("time-limit", flags["time-limit"], 10) * 1000
}
if (config.sampleRatio > 1) fail(`--sample-ratio must be at most 1, got '${flags["sample-ratio"]}'`)

const root = fileURLToPath(new URL("..", import.meta.url))
const log = (line: string): void => {
  process.stderr.write(`[bench:tracing ${new Date().toISOString().slice(11, 19)}] ${line}\n`)
}

// The `off` gateway must see no OTEL variable at all: the children inherit this environment.
const inheritedOtel = Object.keys(process.env).filter((k) => k.startsWith("OTEL_"))
for (const k of inheritedOtel) delete process.env[k]

/** The BatchSpanProcessor's default `OTEL_BSP_SCHEDULE_DELAY`: a partial batch waits this long. */
const bspScheduleDelayMs = 5000

// --- Processes and pinning ------------------------------------------------------------------

// Read before pinning: afterwards this process sees only its own CPU.
const cpuCount = availableParallelism()
const pinned = !flags["no-pin"] && cpuCount >= 2 && Procs.hasTaskset()
const gatewayCpu = pinned ? 0 : undefined
const sideCpu = pinned ? 1 : undefined
const pinning = pinned
  ? "taskset: the three gateways on CPU 0; backend-sim, the OTLP sink and the load generator (this process) on CPU 1"
  : `not pinned (${flags["no-pin"] ? "--no-pin" : cpuCount < 2 ? "fewer than 2 CPUs" : "taskset not found"})`
if (sideCpu !== undefined) Procs.pinSelf(sideCpu)

const children: Array<Procs.Proc> = []
const workDir = mkdtempSync(join(tmpdir(), "gateway-bench-tracing-"))
let sink: Sink | undefined
const stopAll = async (): Promise<void> => {
  // Gateways first, while the sink still answers their last export.
  await Promise.all(children.map((p) => p.stop()))
  await sink?.close()
  rmSync(workDir, { recursive: true, force: true })
}
const { watchdog } = Procs.guard({ log, timeLimitMs: config.timeLimitMs, stop: stopAll })

/** The `--wait-quiet` budget, shared by the whole run (`Procs.quietWaiter`). */
const quiet = Procs.quietWaiter(config.waitQuietMs, log)
const { noisyPct } = Procs

// --- The OTLP sink -------------------------------------------------------------------------

const variants = ["off", "on", "sampled"] as const
type Variant = (typeof variants)[number]

/** What the sink received from one gateway. */
interface Received {
  posts: number
  /** Request bodies as sent (before any content-encoding is undone). */
  bytes: number
  spans: number
  readonly names: Map<string, number>
}

interface Sink {
  readonly port: number
  /** The `OTEL_EXPORTER_OTLP_ENDPOINT` of a variant: its own path, so late batches are still its own. */
  endpoint(variant: Variant): string
  /** Received so far under `/<variant>/v1/traces`. */
  received(variant: Variant): Received
  /** POSTs to any other path (none expected). */
  strays(): number
  close(): Promise<void>
}

interface OtlpTraces {
  readonly resourceSpans?: ReadonlyArray<{
    readonly scopeSpans?: ReadonlyArray<{ readonly spans?: ReadonlyArray<{ readonly name?: string }> }>
  }>
}

/**
 * An OTLP/HTTP JSON receiver on 127.0.0.1: answers 200 `{}` to `POST /<variant>/v1/traces` and
 * counts posts, bytes and spans (`resourceSpans[].scopeSpans[].spans[]`, by name) per variant.
 */
const startSink = async (): Promise<Sink> => {
  const counts = new Map<Variant, Received>(
    variants.map((v) => [v, { posts: 0, bytes: 0, spans: 0, names: new Map() }])
  )
  let strays = 0
  const handle = (req: IncomingMessage, res: ServerResponse, body: Buffer): void => {
    const match = /^\/([a-z]+)\/v1\/traces$/.exec(req.url ?? "")
    const received = match === null ? undefined : counts.get(match[1] as Variant)
    if (req.method !== "POST" || received === undefined) {
      strays++
      res.writeHead(404).end()
      return
    }
    received.posts++
    received.bytes += body.length
    try {
      const json = req.headers["content-encoding"] === "gzip" ? gunzipSync(body) : body
      const traces = JSON.parse(json.toString("utf8")) as OtlpTraces
      for (const rs of traces.resourceSpans ?? []) {
        for (const ss of rs.scopeSpans ?? []) {
          for (const span of ss.spans ?? []) {
            received.spans++
            const name = span.name ?? "(unnamed)"
            received.names.set(name, (received.names.get(name) ?? 0) + 1)
          }
        }
      }
    } catch (error) {
      log(`sink: unreadable export from ${match?.[1]}: ${error instanceof Error ? error.message : error}`)
    }
    res.writeHead(200, { "content-type": "application/json" }).end("{}")
  }
  const server: Server = createServer((req, res) => {
    const chunks: Array<Buffer> = []
    req.on("data", (chunk: Buffer) => chunks.push(chunk))
    req.on("end", () => handle(req, res, Buffer.concat(chunks)))
  })
  const port = await new Promise<number>((resolve, reject) => {
    server.once("error", reject)
    server.listen(0, "127.0.0.1", () => {
      const address = server.address()
      resolve(typeof address === "object" && address !== null ? address.port : 0)
    })
  })
  return {
    port,
    endpoint: (variant) => `http://127.0.0.1:${port}/${variant}`,
    received: (variant) => {
      const r = counts.get(variant)!
      return { ...r, names: new Map(r.names) }
    },
    strays: () => strays,
    close: () =>
      new Promise((resolve) => {
        server.closeAllConnections()
        server.close(() => resolve())
      })
  }
}

// --- Gateways ------------------------------------------------------------------------------

/** What each variant adds to the gateway's environment (all have recording and keys off). */
const variantEnv = (variant: Variant, s: Sink): Record<string, string> => {
  switch (variant) {
    case "off":
      return {}
    case "on":
      return { OTEL_EXPORTER_OTLP_ENDPOINT: s.endpoint("on") }
    case "sampled":
      return {
        OTEL_EXPORTER_OTLP_ENDPOINT: s.endpoint("sampled"),
        OTEL_TRACES_SAMPLER: "parentbased_traceidratio",
        OTEL_TRACES_SAMPLER_ARG: String(config.sampleRatio)
      }
  }
}

interface Gateway {
  readonly variant: Variant
  readonly proc: Procs.Proc
  readonly url: string
  readonly port: number
  /** Requests sent to it so far, warm-ups included (for spans and bytes per request). */
  sent: number
}

/** Established TCP connections of a process, as (local port, remote port), from `/proc`. */
const tcpConnections = (pid: number): ReadonlyArray<{ readonly local: number; readonly remote: number }> => {
  const inodes = new Set<string>()
  for (const fd of readdirSync(`/proc/${pid}/fd`)) {
    try {
      const m = /^socket:\[(\d+)\]$/.exec(readlinkSync(`/proc/${pid}/fd/${fd}`))
      if (m !== null) inodes.add(m[1]!)
    } catch {
      // closed meanwhile
    }
  }
  const out: Array<{ local: number; remote: number }> = []
  for (const table of ["tcp", "tcp6"]) {
    let text: string
    try {
      text = readFileSync(`/proc/${pid}/net/${table}`, "utf8")
    } catch {
      continue
    }
    // sl local_address rem_address st ... inode (field 10); st 01 = ESTABLISHED
    for (const line of text.split("\n").slice(1)) {
      const f = line.trim().split(/\s+/)
      if (f.length < 10 || f[3] !== "01" || !inodes.has(f[9]!)) continue
      const port = (address: string) => Number.parseInt(address.slice(address.lastIndexOf(":") + 1), 16)
      out.push({ local: port(f[1]!), remote: port(f[2]!) })
    }
  }
  return out
}

// --- Measurements --------------------------------------------------------------------------

interface Measurement {
  readonly variant: Variant
  readonly round: number
  /** Position of the variant in its round's order (1 = first). */
  readonly position: number
  /** 1 unless earlier attempts were noisy (`--retries`). */
  readonly attempt: number
  readonly stream: boolean
  readonly ok: number
  readonly errors: number
  readonly firstError: string | undefined
  readonly elapsedMs: number
  readonly rps: number
  readonly p50Ms: number | undefined
  readonly p99Ms: number | undefined
  readonly ttftP50Ms: number | undefined
  readonly ttftP99Ms: number | undefined
  /** CPU time of the gateway under load per request served, and in % of one core. */
  readonly gatewayCpuMsPerReq: number
  readonly gatewayCpuPct: number
  readonly gatewayPeakRssMb: number | undefined
  /** backend-sim + this process (load generator and sink), % of one core: the other side's load. */
  readonly sideCpuPct: number
  readonly otherCpuPct: number
  readonly stealPct: number
  /** The gateway's outgoing connections at the end of the load: to the sink, and to neither sink nor backend. */
  readonly sinkConnections: number
  readonly strayPeers: ReadonlyArray<number>
}

interface Env {
  readonly sim: Procs.Proc
  readonly simPort: number
  readonly sinkPort: number
  readonly gateways: ReadonlyArray<Gateway>
}

const loadSpec = (gateway: Gateway, stream: boolean, maxDurationMs: number): LoadGen.LoadSpec => ({
  url: `${gateway.url}/v1/chat/completions`,
  body: LoadGen.chatBody(stream),
  stream,
  concurrency: config.concurrency,
  maxRequests: config.maxRequests,
  maxDurationMs
})

/** Runs load against `gateway`, counting what it was sent. */
const load = async (
  agent: ReturnType<typeof LoadGen.makeAgent>,
  gateway: Gateway,
  spec: LoadGen.LoadSpec
) => {
  const result = await LoadGen.run(agent, spec)
  gateway.sent += result.ok + result.errors
  return result
}

/** One measured run: unmeasured warm-up on the same connections, then the bounded load. */
const measure = async (
  env: Env,
  gateway: Gateway,
  round: number,
  position: number,
  stream: boolean,
  attempt: number
): Promise<Measurement> => {
  const ours = [env.sim.pid, ...env.gateways.map((g) => g.proc.pid)]
  await quiet.wait(1, 250, ours)
  const agent = LoadGen.makeAgent(config.concurrency)
  try {
    if (config.warmupMs > 0) await load(agent, gateway, loadSpec(gateway, stream, config.warmupMs))
    const oursCpu = () => ours.reduce((t, pid) => t + Procs.cpuTimeMs(pid), 0)
    const rss = Procs.watchPeakRss(gateway.proc.pid)
    const sys0 = Procs.systemCpu()
    const ours0 = oursCpu()
    const gw0 = Procs.cpuTimeMs(gateway.proc.pid)
    const sim0 = Procs.cpuTimeMs(env.sim.pid)
    const self0 = Procs.selfCpuMs()
    const result = await load(agent, gateway, loadSpec(gateway, stream, config.durationMs))
    const self1 = Procs.selfCpuMs()
    const sim1 = Procs.cpuTimeMs(env.sim.pid)
    const gw1 = Procs.cpuTimeMs(gateway.proc.pid)
    const ours1 = oursCpu()
    const sys1 = Procs.systemCpu()
    const peakKb = rss.stop()
    const outgoing = tcpConnections(gateway.proc.pid).filter((c) => c.local !== gateway.port)
    const served = Math.max(1, result.ok + result.errors)
    const pct = (ms: number) => (100 * ms) / result.elapsedMs
    const m: Measurement = {
      variant: gateway.variant,
      round,
      position,
      attempt,
      stream,
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
      gatewayPeakRssMb: peakKb === undefined ? undefined : peakKb / 1024,
      sideCpuPct: pct(sim1 - sim0 + (self1 - self0)),
      otherCpuPct: Math.max(0, pct(sys1.busyMs - sys0.busyMs - (ours1 - ours0) - (self1 - self0))),
      stealPct: pct(sys1.stealMs - sys0.stealMs),
      sinkConnections: outgoing.filter((c) => c.remote === env.sinkPort).length,
      strayPeers: outgoing.map((c) => c.remote).filter((p) => p !== env.sinkPort && p !== env.simPort)
    }
    log(
      `${m.variant.padEnd(7)} ${stream ? "stream" : "json  "} round ${round}` +
        `${attempt > 1 ? ` (attempt ${attempt})` : ""}: ` +
        `${Math.round(m.rps)} req/s, p50 ${Report.fixed(m.p50Ms, 2)} ms, p99 ${Report.fixed(m.p99Ms, 2)} ms, ` +
        `gw ${m.gatewayCpuMsPerReq.toFixed(3)} ms cpu/req (${Math.round(m.gatewayCpuPct)}%), ` +
        `other ${Math.round(m.otherCpuPct + m.stealPct)}%` +
        (m.errors > 0 ? `, ${m.errors} errors (first: ${m.firstError})` : "")
    )
    return m
  } finally {
    await agent.close()
  }
}

// --- Summaries -----------------------------------------------------------------------------

interface Summary {
  readonly rps: number | undefined
  readonly p50Ms: number | undefined
  readonly p99Ms: number | undefined
  readonly ttftP50Ms: number | undefined
  readonly ttftP99Ms: number | undefined
  readonly gatewayCpuMsPerReq: number | undefined
  readonly gatewayCpuPct: number | undefined
  readonly gatewayPeakRssMb: number | undefined
  readonly sideCpuPct: number | undefined
  readonly otherCpuPct: number | undefined
  readonly errors: number
  readonly rounds: number
  readonly noisyRuns: number
}

const isNoisy = (m: Measurement): boolean => m.otherCpuPct + m.stealPct > noisyPct

const summarize = (ms: ReadonlyArray<Measurement>): Summary => {
  const med = (f: (m: Measurement) => number | undefined) => Stats.median(ms.map(f))
  return {
    rps: med((m) => m.rps),
    p50Ms: med((m) => m.p50Ms),
    p99Ms: med((m) => m.p99Ms),
    ttftP50Ms: med((m) => m.ttftP50Ms),
    ttftP99Ms: med((m) => m.ttftP99Ms),
    gatewayCpuMsPerReq: med((m) => m.gatewayCpuMsPerReq),
    gatewayCpuPct: med((m) => m.gatewayCpuPct),
    gatewayPeakRssMb: med((m) => m.gatewayPeakRssMb),
    sideCpuPct: med((m) => m.sideCpuPct),
    otherCpuPct: med((m) => m.otherCpuPct + m.stealPct),
    errors: ms.reduce((n, m) => n + m.errors, 0),
    rounds: ms.length,
    noisyRuns: ms.filter(isNoisy).length
  }
}

/** Medians over rounds of (variant − off) and (variant / off) within the round. */
interface Delta {
  /** Rounds compared. */
  readonly pairs: number
  readonly cpuMsPerReq: number | undefined
  readonly cpuRatio: number | undefined
  readonly rpsRatio: number | undefined
  readonly p50Ms: number | undefined
  readonly p99Ms: number | undefined
}

/** `quietOnly`: only the rounds in which neither run was noisy. */
const delta = (runs: ReadonlyArray<Measurement>, variant: Variant, quietOnly: boolean): Delta => {
  const pairs = runs
    .filter((m) => m.variant === "off")
    .flatMap((off) => {
      const v = runs.find((m) => m.variant === variant && m.round === off.round)
      return v === undefined || (quietOnly && (isNoisy(off) || isNoisy(v))) ? [] : [{ off, v }]
    })
  const diff = (f: (m: Measurement) => number | undefined) =>
    Stats.median(pairs.map(({ off, v }) => Stats.diff(f(v), f(off))))
  const ratio = (f: (m: Measurement) => number) => Stats.median(pairs.map(({ off, v }) => f(v) / f(off)))
  return {
    pairs: pairs.length,
    cpuMsPerReq: diff((m) => m.gatewayCpuMsPerReq),
    cpuRatio: ratio((m) => m.gatewayCpuMsPerReq),
    rpsRatio: ratio((m) => m.rps),
    p50Ms: diff((m) => m.p50Ms),
    p99Ms: diff((m) => m.p99Ms)
  }
}

/** What one variant's gateway sent to the sink over the whole run. */
interface Export {
  readonly variant: Variant
  readonly requests: number
  readonly posts: number
  readonly bytes: number
  readonly spans: number
  readonly names: ReadonlyArray<readonly [string, number]>
  /** Spans (and bytes) received after the run, while the gateways shut down. */
  readonly spansAtShutdown: number
  /** Measured runs with an open connection to the sink / to anything but the sink and the backend. */
  readonly runsWithSinkConnection: number
  readonly strayPeers: ReadonlyArray<number>
}

// --- Report --------------------------------------------------------------------------------

const scenarioName = (stream: boolean): string =>
  `${stream ? "streaming" : "non-streaming"}, c=${config.concurrency}`

const markdown = (
  meta: Record<string, string>,
  runs: ReadonlyArray<Measurement>,
  exports: ReadonlyArray<Export>
): string => {
  const f0 = (x: number | undefined) => Report.fixed(x, 0)
  const f2 = (x: number | undefined) => Report.fixed(x, 2)
  const f3 = (x: number | undefined) => Report.fixed(x, 3)
  const out: Array<string> = ["# Tracing on the hot path", ""]
  for (const [k, v] of Object.entries(meta)) out.push(`- ${k}: ${v}`)
  out.push(
    "",
    `## Per variant (medians of ${config.rounds} rounds)`,
    "",
    "backend-sim instant (ttft 0, itl 0). gw CPU ms/req = gateway CPU time (user+sys, all threads) / requests served during the run; CPU % is of one core. side CPU % = backend-sim + load generator + sink, on the other core. other = CPU used meanwhile outside the benchmark, plus steal.",
    "",
    Report.table(
      [
        "scenario",
        "variant",
        "gw CPU ms/req",
        "… quiet runs only",
        "req/s",
        "p50 ms",
        "p99 ms",
        "TTFT p50 ms",
        "TTFT p99 ms",
        "gw CPU %",
        "gw peak RSS MB",
        "side CPU %",
        "other CPU %",
        "errors"
      ],
      [false, true].flatMap((stream) =>
        variants.map((v) => {
          const ms = runs.filter((m) => m.stream === stream && m.variant === v)
          const s = summarize(ms)
          const q = summarize(ms.filter((m) => !isNoisy(m)))
          return [
            scenarioName(stream),
            v,
            f3(s.gatewayCpuMsPerReq),
            `${f3(q.gatewayCpuMsPerReq) ?? "–"} (${q.rounds})`,
            Report.rps(s.rps),
            f2(s.p50Ms),
            f2(s.p99Ms),
            stream ? f2(s.ttftP50Ms) : "–",
            stream ? f2(s.ttftP99Ms) : "–",
            f0(s.gatewayCpuPct),
            Report.fixed(s.gatewayPeakRssMb, 1),
            f0(s.sideCpuPct),
            `${f0(s.otherCpuPct)}${s.noisyRuns > 0 ? ` (${s.noisyRuns}/${s.rounds} noisy)` : ""}`,
            String(s.errors)
          ]
        })
      )
    ),
    "",
    "## Against `off` (median over rounds of the difference, or ratio, within the round)",
    "",
    `"quiet rounds" keeps only the rounds in which neither run was noisy (other processes > ${noisyPct}% of a core).`,
    "",
    Report.table(
      [
        "scenario",
        "variant",
        "rounds",
        "Δ gw CPU ms/req",
        "gw CPU ratio",
        "req/s ratio",
        "Δ p50 ms",
        "Δ p99 ms"
      ],
      [false, true].flatMap((stream) =>
        [false, true].flatMap((quietOnly) =>
          (["on", "sampled"] as const).map((v) => {
            const d = delta(
              runs.filter((m) => m.stream === stream),
              v,
              quietOnly
            )
            return [
              scenarioName(stream),
              `${v} − off`,
              quietOnly ? `${d.pairs} quiet` : `all ${d.pairs}`,
              Report.signed(d.cpuMsPerReq, 3),
              f3(d.cpuRatio),
              f3(d.rpsRatio),
              Report.signed(d.p50Ms, 2),
              Report.signed(d.p99Ms, 2)
            ]
          })
        )
      )
    ),
    "",
    "## Each round",
    "",
    "gw CPU ms/req and req/s of each variant; the order is the one the round ran them in.",
    "",
    Report.table(
      [
        "scenario",
        "round",
        "order",
        ...variants.map((v) => `${v} CPU ms/req`),
        ...variants.map((v) => `${v} req/s`),
        "max other CPU %"
      ],
      [false, true].flatMap((stream) =>
        Array.from({ length: config.rounds }, (_, i) => {
          const round = runs.filter((m) => m.stream === stream && m.round === i + 1)
          const of = (v: Variant) => round.find((m) => m.variant === v)
          const order = [...round].sort((a, b) => a.position - b.position).map((m) => m.variant)
          return [
            scenarioName(stream),
            String(i + 1),
            order.join(", "),
            ...variants.map((v) => f3(of(v)?.gatewayCpuMsPerReq)),
            ...variants.map((v) => Report.rps(of(v)?.rps)),
            f0(Stats.max(round.map((m) => m.otherCpuPct + m.stealPct)))
          ]
        })
      )
    ),
    "",
    "## What reached the sink (whole run, warm-ups included)",
    "",
    `Requests = all requests sent to that gateway. The spans of a partial batch wait up to ${bspScheduleDelayMs / 1000} s (\`OTEL_BSP_SCHEDULE_DELAY\`, default) in the gateway; the sink was read ${(bspScheduleDelayMs + 1500) / 1000} s after the last load, then again after the gateways had shut down.`,
    "",
    Report.table(
      [
        "variant",
        "requests",
        "POSTs",
        "spans",
        "spans/request",
        "bytes/request",
        "bytes/span",
        "spans at shutdown",
        "runs with a sink connection",
        "other outgoing peers"
      ],
      exports.map((e) => [
        e.variant,
        e.requests.toLocaleString("en-US"),
        e.posts.toLocaleString("en-US"),
        e.spans.toLocaleString("en-US"),
        Report.fixed(e.requests > 0 ? e.spans / e.requests : undefined, 3),
        Report.fixed(e.requests > 0 ? e.bytes / e.requests : undefined, 0),
        Report.fixed(e.spans > 0 ? e.bytes / e.spans : undefined, 0),
        String(e.spansAtShutdown),
        `${e.runsWithSinkConnection}/${runs.filter((m) => m.variant === e.variant).length}`,
        e.strayPeers.length === 0 ? "none" : `ports ${e.strayPeers.join(", ")}`
      ])
    )
  )
  const on = exports.find((e) => e.variant === "on")
  if (on !== undefined && on.requests > 0) {
    out.push(
      "",
      "Spans per request of `on`, by name:",
      "",
      Report.table(
        ["span", "per request"],
        on.names.map(([name, n]) => [`\`${name}\``, (n / on.requests).toFixed(3)])
      )
    )
  }
  out.push("")
  return out.join("\n")
}

// --- Main ----------------------------------------------------------------------------------

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms))

const digest = (path: string): string => createHash("sha256").update(readFileSync(path)).digest("hex")

/** Unmeasured traffic so every gateway is JIT-warm, non-streaming and streaming. */
const warmUp = async (gateway: Gateway): Promise<void> => {
  const agent = LoadGen.makeAgent(config.concurrency)
  try {
    for (const stream of [false, true]) {
      const r = await load(agent, gateway, { ...loadSpec(gateway, stream, 1500), maxRequests: 10_000 })
      if (r.ok === 0) throw new Error(`warm-up of ${gateway.variant} failed: ${r.firstError}`)
    }
  } finally {
    await agent.close()
  }
}

const main = async (): Promise<void> => {
  const runCount = config.rounds * 2 * variants.length
  const estimateS = Math.round(
    30 + (bspScheduleDelayMs + 1500) / 1000 + (runCount * (config.durationMs + config.warmupMs + 400)) / 1000
  )
  log(pinning)
  if (inheritedOtel.length > 0) log(`removed from the environment: ${inheritedOtel.join(", ")}`)
  log(`plan: ${runCount} measured runs, about ${estimateS} s plus waits for quiet and repeated noisy runs`)
  const quietAtStart = await quiet.wait(2, 1000, [])
  const startedAt = new Date()
  const tree0 = Procs.treeState(root)
  const load0 = loadavg()

  sink = await startSink()
  const sim = await Procs.startSim({
    cwd: root,
    model: "sim",
    ttftMs: 0,
    itlMs: 0,
    outputTokens: config.outputTokens,
    capacity: 1024,
    cpu: sideCpu
  })
  children.push(sim.proc)
  const configPath = join(workDir, "gateway.json")
  writeFileSync(
    configPath,
    JSON.stringify({
      // PORT, set per gateway by Procs.startGateway, overrides this port.
      server: { host: "127.0.0.1" },
      models: [{ name: "sim", backends: [{ id: "sim-1", url: sim.url }] }]
    })
  )
  // One build for all three; the bundle must not change while they start (another run's build).
  const bundle = join(root, "services/gateway/dist/main.mjs")
  const gateways: Array<Gateway> = []
  let bundleDigest: string | undefined
  for (const variant of variants) {
    const port = await Procs.freePort()
    const started = await Procs.startGateway({
      cwd: root,
      configPath,
      port,
      logLevel: config.logLevel,
      stdout: "/dev/null",
      cpu: gatewayCpu,
      // The proxy alone, as `pnpm bench` runs it; keys and recording are measured elsewhere.
      env: { GATEWAY_RECORDING: "off", GATEWAY_AUTH: "off", ...variantEnv(variant, sink) },
      build: gateways.length === 0
    })
    children.push(started.proc)
    bundleDigest ??= digest(bundle)
    gateways.push({ variant, proc: started.proc, url: started.url, port, sent: 0 })
    log(`gateway ${variant}: pid ${started.proc.pid} at ${started.url}`)
  }
  if (digest(bundle) !== bundleDigest) {
    throw new Error(`${relative(root, bundle)} changed while the gateways started: run again`)
  }
  const env: Env = { sim: sim.proc, simPort: Number(new URL(sim.url).port), sinkPort: sink.port, gateways }
  log(`backend-sim pid ${sim.proc.pid} at ${sim.url}; OTLP sink at http://127.0.0.1:${sink.port}`)

  log("warm-up (not measured)")
  for (const g of gateways) await warmUp(g)

  const runs: Array<Measurement> = []
  for (let round = 1; round <= config.rounds; round++) {
    const order = variants.map((_, i) => gateways[(i + round - 1) % gateways.length]!)
    for (const stream of [false, true]) {
      for (const [i, g] of order.entries()) {
        let m = await measure(env, g, round, i + 1, stream, 1)
        while (isNoisy(m) && m.attempt <= config.retries) {
          m = await measure(env, g, round, i + 1, stream, m.attempt + 1)
        }
        runs.push(m)
      }
    }
  }

  log(`waiting ${(bspScheduleDelayMs + 1500) / 1000} s for the last partial batches`)
  await sleep(bspScheduleDelayMs + 1500)
  const afterRun = new Map(variants.map((v) => [v, sink!.received(v)]))
  const rss = gateways.map((g) => {
    const hwm = Procs.statusKb(g.proc.pid, "VmHWM")
    return `${g.variant} ${hwm === undefined ? "n/a" : `${(hwm / 1024).toFixed(1)} MB`}`
  })
  const load1 = loadavg()
  const tree1 = Procs.treeState(root)
  await Promise.all(children.map((p) => p.stop()))
  const strays = sink.strays()
  const exports: ReadonlyArray<Export> = variants.map((variant) => {
    const r = afterRun.get(variant)!
    const ms = runs.filter((m) => m.variant === variant)
    return {
      variant,
      requests: gateways.find((g) => g.variant === variant)!.sent,
      posts: r.posts,
      bytes: r.bytes,
      spans: r.spans,
      names: [...r.names.entries()].sort((a, b) => b[1] - a[1]),
      spansAtShutdown: sink!.received(variant).spans - r.spans,
      runsWithSinkConnection: ms.filter((m) => m.sinkConnections > 0).length,
      strayPeers: [...new Set(ms.flatMap((m) => m.strayPeers))]
    }
  })
  await stopAll()
  clearTimeout(watchdog)

  const noisy = runs.filter(isNoisy).length
  const retried = runs.reduce((n, m) => n + m.attempt - 1, 0)
  const meta: Record<string, string> = {
    date: startedAt.toISOString(),
    command: ["pnpm bench:tracing", ...argv].join(" "),
    machine: `${cpuCount} CPUs (${cpus()[0]?.model ?? "unknown"}), load average ${load0.map((x) => x.toFixed(2)).join(" ")} at start, ${load1.map((x) => x.toFixed(2)).join(" ")} at end`,
    node: process.version,
    tree:
      tree1 === tree0
        ? tree0
        : `${tree0} at the start; at the end: ${tree1} (the bundle was built at the start)`,
    "other load":
      `${quietAtStart ? "quiet" : "busy"} at the start; waited ${Math.round(quiet.waitedMs() / 1000)} s in all for quiet ` +
      `(budget --wait-quiet ${config.waitQuietMs / 1000} s); ${retried} noisy runs measured again (--retries ${config.retries}); ` +
      `${noisy} of the ${runs.length} runs kept noisy (other processes > ${noisyPct}% of a core during the run)`,
    pinning,
    gateways: `one bundle, one config (model \`sim\` → backend-sim, ttft 0, itl 0, ${config.outputTokens} tokens), GATEWAY_RECORDING=off GATEWAY_AUTH=off, LOG_LEVEL=${config.logLevel} to /dev/null; off: no OTEL variables; on: OTEL_EXPORTER_OTLP_ENDPOINT=<sink>/on; sampled: OTEL_EXPORTER_OTLP_ENDPOINT=<sink>/sampled OTEL_TRACES_SAMPLER=parentbased_traceidratio OTEL_TRACES_SAMPLER_ARG=${config.sampleRatio}; BSP settings default`,
    load: `closed loop on undici keep-alive, c=${config.concurrency}, per run: ${config.warmupMs / 1000} s warm-up, then ≤ ${config.maxRequests} requests or ≤ ${config.durationMs / 1000} s; one gateway under load at a time, variant order rotated each round`,
    "gateway VmHWM at the end": rss.join(", "),
    ...(strays > 0 ? { "sink: POSTs to unknown paths": String(strays) } : {})
  }
  process.stdout.write(`${markdown(meta, runs, exports)}\n`)

  if (flags.json !== "none") {
    const path =
      flags.json ??
      join(root, "bench", "results", `tracing-${startedAt.toISOString().replace(/[:.]/g, "-")}.json`)
    mkdirSync(dirname(path), { recursive: true })
    writeFileSync(path, `${JSON.stringify({ meta, config, runs, exports }, null, 2)}\n`)
    log(`results written to ${relative(process.cwd(), path)}`)
  }
}

main().catch(async (error: unknown) => {
  log(`failed: ${error instanceof Error ? (error.stack ?? error.message) : String(error)}`)
  for (const p of children) log(`${p.name} stderr: ${p.stderrTail().slice(-2000)}`)
  await stopAll()
  clearTimeout(watchdog)
  process.exit(1)
})
