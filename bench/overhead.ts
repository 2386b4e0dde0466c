/**
 * Overhead benchmark of the gateway: `pnpm bench` (`node --import tsx bench/overhead.ts --help`).
 *
 * Starts a simulated backend and a gateway as child processes, then
 * 1. latency: for {non-streaming, streaming} x {concurrency 50, 200} sends the same bounded
 *    closed-loop load to the backend directly and through the gateway, in several rounds that
 *    alternate the two, and reports medians of the rounds: req/s, latency and time-to-first-token
 *    percentiles, the gateway's added latency, CPU time per request of each process, and the
 *    gateway's peak RSS;
 * 2. saturation: the backend answering instantly, non-streaming, concurrency raised step by step
 *    (16 to 256) to find where the gateway's throughput on its one core stops growing.
 * The gateway is pinned to CPU 0, the backend and this process (the load generator) to CPU 1.
 * Prints a markdown report on stdout (progress goes to stderr) and writes JSON to bench/results/.
 */
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs"
import { availableParallelism, cpus, loadavg, tmpdir } from "node:os"
import { dirname, join, relative } from "node:path"
import { fileURLToPath } from "node:url"
import * as Flags from "./Flags.js"
import * as LoadGen from "./LoadGen.js"
import * as Procs from "./Procs.js"
import * as Report from "./Report.js"
import * as Stats from "./Stats.js"

const usage = `Usage: pnpm bench [--flag value]...
  --rounds N            rounds per latency measurement, alternating direct/gateway (3)
  --requests N          request cap per measured run (20000)
  --duration S          time cap per measured run, seconds (3)
  --warmup S            unmeasured load before each run, seconds (0.5)
  --concurrency LIST    latency-phase concurrencies (50,200)
  --ttft-ms N           simulated time to first token, latency phase (20)
  --itl-ms N            simulated inter-token latency, latency phase (2)
  --output-tokens N     simulated completion length (16)
  --sat-concurrency L   saturation steps (16,32,64,128,256)
  --sat-rounds N        gateway rounds per saturation step (3)
  --sat-duration S      time cap per saturation run, seconds (2)
  --sat-direct-rounds N direct-to-backend reference rounds per step (1)
  --sat-stop-after N    stop once N steps in a row have not raised the best req/s by 3% (0: run all)
  --log-level L         gateway LOG_LEVEL (info, the default of the real thing)
  --gateway-node-args S extra node flags for the gateway, space-separated, for experiments (none)
  --gateway-log PATH    where the gateway's stdout request log goes (/dev/null)
  --json PATH|none      results file (bench/results/overhead-<time>.json)
  --no-pin              do not pin processes with taskset
  --wait-quiet S        wait in all up to S seconds, before the start and each run, while other
                        processes use > 25% of a core (60)
  --time-limit S        hard limit of the whole run; children are stopped after it (600)`

const options = {
  rounds: { type: "string", default: "3" },
  requests: { type: "string", default: "20000" },
  duration: { type: "string", default: "3" },
  warmup: { type: "string", default: "0.5" },
  concurrency: { type: "string", default: "50,200" },
  "ttft-ms": { type: "string", default: "20" },
  "itl-ms": { type: "string", default: "2" },
  "output-tokens": { type: "string", default: "16" },
  "sat-concurrency": { type: "string", default: "16,32,64,128,256" },
  "sat-rounds": { type: "string", default: "3" },
  "sat-duration": { type: "string", default: "2" },
  "sat-direct-rounds": { type: "string", default: "1" },
  "sat-stop-after": { type: "string", default: "0" },
  "gateway-node-args": { type: "string" },
  "log-level": { type: "string", default: "info" },
  "gateway-log": { type: "string", default: "/dev/null" },
  json: { type: "string" },
  "no-pin": { type: "boolean", default: false },
  "wait-quiet": { type: "string", default: "60" },
  "time-limit": { type: "string", default: "600" },
  help: { type: "boolean", short: "h", default: false }
} as const
const { flags, argv, num, int, list } = Flags.parse("bench", usage, options)

const config = {
  rounds: int("rounds", flags.rounds, 1),
  maxRequests: int("requests", flags.requests, 1),
  durationMs: num("duration", flags.duration, 0.1) * 1000,
  warmupMs: num("warmup", flags.warmup, 0) * 1000,
  concurrency: list("concurrency", flags.concurrency),
  ttftMs: int("ttft-ms", flags["ttft-ms"], 0),
  itlMs: int("itl-ms", flags["itl-ms"], 0),
  outputTokens: int("output-tokens", flags["output-tokens"], 1),
  satConcurrency: list("sat-concurrency", flags["sat-concurrency"]),
  satRounds: int("sat-rounds", flags["sat-rounds"], 1),
  satDurationMs: num("sat-duration", flags["sat-duration"], 0.1) * 1000,
  satDirectRounds: int("sat-direct-rounds", flags["sat-direct-rounds"], 0),
  satStopAfter: int("sat-stop-after", flags["sat-stop-after"], 0),
  gatewayNodeArgs: (flags["gateway-node-args"] ?? "").split(/\s+/).filter((a) => a !== ""),
  logLevel: flags["log-level"],
  gatewayLog: flags["gateway-log"],
  waitQuietMs: num("wait-quiet", flags["wait-quiet"], 0) * 1000,
  timeLimitMs: num("time-limit", flags["time-limit"], 10) * 1000
}

const root = fileURLToPath(new URL("..", import.meta.url))
const log = (line: string): void => {
  process.stderr.write(`[bench ${new Date().toISOString().slice(11, 19)}] ${line}\n`)
}

// --- Processes and pinning ------------------------------------------------------------------

// Read before pinning: afterwards this process sees only its own CPU.
const cpuCount = availableParallelism()
const pinned = !flags["no-pin"] && cpuCount >= 2 && Procs.hasTaskset()
const gatewayCpu = pinned ? 0 : undefined
const sideCpu = pinned ? 1 : undefined
const pinning = pinned
  ? "taskset: gateway on CPU 0; backend-sim and the load generator (this process) on CPU 1"
  : `not pinned (${flags["no-pin"] ? "--no-pin" : cpuCount < 2 ? "fewer than 2 CPUs" : "taskset not found"})`
if (sideCpu !== undefined) Procs.pinSelf(sideCpu)

const children: Array<Procs.Proc> = []
const workDir = mkdtempSync(join(tmpdir(), "gateway-bench-"))
const stopAll = async (): Promise<void> => {
  await Promise.all(children.map((p) => p.stop()))
  rmSync(workDir, { recursive: true, force: true })
}
const { watchdog } = Procs.guard({ log, timeLimitMs: config.timeLimitMs, stop: stopAll })

// --- Measurements --------------------------------------------------------------------------

type Target = "direct" | "gateway"

interface Measurement {
  readonly target: Target
  readonly round: number
  readonly stream: boolean
  readonly concurrency: number
  readonly ok: number
  readonly errors: number
  readonly firstError: string | undefined
  readonly elapsedMs: number
  readonly rps: number
  readonly p50Ms: number | undefined
  readonly p99Ms: number | undefined
  readonly ttftP50Ms: number | undefined
  readonly ttftP99Ms: number | undefined
  /** Gateway runs only: CPU time of the gateway process per request served, and in % of one core. */
  readonly gatewayCpuMsPerReq: number | undefined
  readonly gatewayCpuPct: number | undefined
  readonly gatewayPeakRssMb: number | undefined
  readonly simCpuMsPerReq: number
  readonly simCpuPct: number
  readonly loadgenCpuMsPerReq: number
  readonly loadgenCpuPct: number
  /** CPU used by everything else on the machine (other tenants' work), % of one core. */
  readonly otherCpuPct: number
  /** CPU time the hypervisor gave to other guests, % of one core. */
  readonly stealPct: number
}

interface Env {
  readonly sim: Procs.Proc
  readonly simUrl: string
  readonly gateway: Procs.Proc
  readonly gatewayUrl: string
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

/** One measured run: unmeasured warm-up on the same connections, then the bounded load. */
const measure = async (
  env: Env,
  target: Target,
  round: number,
  stream: boolean,
  concurrency: number,
  durationMs: number
): Promise<Measurement> => {
  const base = target === "direct" ? env.simUrl : env.gatewayUrl
  const spec: LoadGen.LoadSpec = {
    url: `${base}/v1/chat/completions`,
    body: requestBody(stream),
    stream,
    concurrency,
    maxRequests: config.maxRequests,
    maxDurationMs: durationMs
  }
  await quiet.wait(1, 250, [env.gateway.pid, env.sim.pid])
  const agent = LoadGen.makeAgent(concurrency)
  try {
    if (config.warmupMs > 0) await LoadGen.run(agent, { ...spec, maxDurationMs: config.warmupMs })
    const viaGateway = target === "gateway"
    const rss = viaGateway ? Procs.watchPeakRss(env.gateway.pid) : undefined
    const sys0 = Procs.systemCpu()
    const gw0 = Procs.cpuTimeMs(env.gateway.pid)
    const sim0 = Procs.cpuTimeMs(env.sim.pid)
    const self0 = Procs.selfCpuMs()
    const result = await LoadGen.run(agent, spec)
    const self1 = Procs.selfCpuMs()
    const sim1 = Procs.cpuTimeMs(env.sim.pid)
    const gw1 = Procs.cpuTimeMs(env.gateway.pid)
    const sys1 = Procs.systemCpu()
    const ours = gw1 - gw0 + (sim1 - sim0) + (self1 - self0)
    const peakKb = rss?.stop()
    const served = Math.max(1, result.ok + result.errors)
    const pct = (ms: number) => (100 * ms) / result.elapsedMs
    const m: Measurement = {
      target,
      round,
      stream,
      concurrency,
      ok: result.ok,
      errors: result.errors,
      firstError: result.firstError,
      elapsedMs: result.elapsedMs,
      rps: (1000 * result.ok) / result.elapsedMs,
      p50Ms: Stats.percentile(result.latencyMs, 50),
      p99Ms: Stats.percentile(result.latencyMs, 99),
      ttftP50Ms: result.ttftMs && Stats.percentile(result.ttftMs, 50),
      ttftP99Ms: result.ttftMs && Stats.percentile(result.ttftMs, 99),
      gatewayCpuMsPerReq: viaGateway ? (gw1 - gw0) / served : undefined,
      gatewayCpuPct: viaGateway ? pct(gw1 - gw0) : undefined,
      gatewayPeakRssMb: peakKb === undefined ? undefined : peakKb / 1024,
      simCpuMsPerReq: (sim1 - sim0) / served,
      simCpuPct: pct(sim1 - sim0),
      loadgenCpuMsPerReq: (self1 - self0) / served,
      loadgenCpuPct: pct(self1 - self0),
      otherCpuPct: Math.max(0, pct(sys1.busyMs - sys0.busyMs - ours)),
      stealPct: pct(sys1.stealMs - sys0.stealMs)
    }
    log(
      `${target.padEnd(7)} ${stream ? "stream " : "json   "} c=${String(concurrency).padEnd(3)} round ${round}: ` +
        `${Math.round(m.rps)} req/s, p50 ${Report.fixed(m.p50Ms, 2)} ms, p99 ${Report.fixed(m.p99Ms, 2)} ms` +
        (stream ? `, ttft p99 ${Report.fixed(m.ttftP99Ms, 2)} ms` : "") +
        (viaGateway ? `, gw ${Report.fixed(m.gatewayCpuMsPerReq, 3)} ms cpu/req` : "") +
        `, other ${Math.round(m.otherCpuPct + m.stealPct)}%` +
        (m.errors > 0 ? `, ${m.errors} errors (first: ${m.firstError})` : "")
    )
    return m
  } finally {
    await agent.close()
  }
}

/** The `--wait-quiet` budget, shared by the whole run (`Procs.quietWaiter`). */
const quiet = Procs.quietWaiter(config.waitQuietMs, log)
const { noisyPct } = Procs

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
  readonly simCpuMsPerReq: number | undefined
  readonly simCpuPct: number | undefined
  readonly loadgenCpuPct: number | undefined
  readonly otherCpuPct: number | undefined
  readonly stealPct: number | undefined
  readonly errors: number
  readonly rounds: number
  /** Runs during which other processes used more than `noisyPct` of a core. */
  readonly noisyRuns: number
}

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
    simCpuMsPerReq: med((m) => m.simCpuMsPerReq),
    simCpuPct: med((m) => m.simCpuPct),
    loadgenCpuPct: med((m) => m.loadgenCpuPct),
    otherCpuPct: med((m) => m.otherCpuPct),
    stealPct: med((m) => m.stealPct),
    errors: ms.reduce((n, m) => n + m.errors, 0),
    rounds: ms.length,
    noisyRuns: ms.filter((m) => m.otherCpuPct + m.stealPct > noisyPct).length
  }
}

interface Scenario {
  readonly stream: boolean
  readonly concurrency: number
}
const scenarioName = (s: Scenario): string =>
  `${s.stream ? "streaming" : "non-streaming"}, c=${s.concurrency}`

interface ScenarioResult {
  readonly scenario: Scenario
  readonly direct: Summary
  readonly gateway: Summary
  /** Medians over rounds of (gateway - direct) within the round. */
  readonly added: {
    readonly p50Ms: number | undefined
    readonly p99Ms: number | undefined
    readonly ttftP50Ms: number | undefined
    readonly ttftP99Ms: number | undefined
  }
  /** Largest peak RSS of the gateway over the rounds. */
  readonly gatewayMaxRssMb: number | undefined
  readonly runs: ReadonlyArray<Measurement>
}

const scenarioResult = (scenario: Scenario, runs: ReadonlyArray<Measurement>): ScenarioResult => {
  const of = (t: Target) => runs.filter((m) => m.target === t)
  const pairs = of("direct").flatMap((d) => {
    const g = runs.find((m) => m.target === "gateway" && m.round === d.round)
    return g === undefined ? [] : [{ d, g }]
  })
  const added = (f: (m: Measurement) => number | undefined) =>
    Stats.median(pairs.map(({ d, g }) => Stats.diff(f(g), f(d))))
  return {
    scenario,
    direct: summarize(of("direct")),
    gateway: summarize(of("gateway")),
    added: {
      p50Ms: added((m) => m.p50Ms),
      p99Ms: added((m) => m.p99Ms),
      ttftP50Ms: added((m) => m.ttftP50Ms),
      ttftP99Ms: added((m) => m.ttftP99Ms)
    },
    gatewayMaxRssMb: Stats.max(of("gateway").map((m) => m.gatewayPeakRssMb)),
    runs
  }
}

interface SaturationStep {
  readonly concurrency: number
  readonly gateway: Summary
  readonly direct: Summary | undefined
  readonly runs: ReadonlyArray<Measurement>
}

// --- Phases --------------------------------------------------------------------------------

const latencyPhase = async (env: Env): Promise<ReadonlyArray<ScenarioResult>> => {
  const scenarios: Array<Scenario> = [false, true].flatMap((stream) =>
    config.concurrency.map((concurrency) => ({ stream, concurrency }))
  )
  const runs = new Map<Scenario, Array<Measurement>>(scenarios.map((s) => [s, []]))
  // Rounds outermost, so each scenario's samples are spread over the whole phase; the order of
  // direct and gateway alternates from round to round.
  for (let round = 1; round <= config.rounds; round++) {
    const order: ReadonlyArray<Target> = round % 2 === 1 ? ["direct", "gateway"] : ["gateway", "direct"]
    for (const s of scenarios) {
      for (const target of order) {
        runs.get(s)!.push(await measure(env, target, round, s.stream, s.concurrency, config.durationMs))
      }
    }
  }
  return scenarios.map((s) => scenarioResult(s, runs.get(s)!))
}

/** Relative growth below which a step does not count as "throughput still growing". */
const growth = 0.03

const saturationPhase = async (env: Env): Promise<ReadonlyArray<SaturationStep>> => {
  const steps: Array<SaturationStep> = []
  let best = 0
  let flat = 0
  for (const concurrency of config.satConcurrency) {
    const runs: Array<Measurement> = []
    for (let round = 1; round <= config.satRounds; round++) {
      runs.push(await measure(env, "gateway", round, false, concurrency, config.satDurationMs))
      if (round <= config.satDirectRounds) {
        runs.push(await measure(env, "direct", round, false, concurrency, config.satDurationMs))
      }
    }
    const gateway = summarize(runs.filter((m) => m.target === "gateway"))
    const directRuns = runs.filter((m) => m.target === "direct")
    steps.push({
      concurrency,
      gateway,
      direct: directRuns.length > 0 ? summarize(directRuns) : undefined,
      runs
    })
    const rps = gateway.rps ?? 0
    if (rps > best * (1 + growth)) flat = 0
    else if (++flat === config.satStopAfter) {
      log(`throughput has not grown by ${growth * 100}% for ${flat} steps: stopping at c=${concurrency}`)
      break
    }
    best = Math.max(best, rps)
  }
  return steps
}

/** Unmeasured traffic so both servers are JIT-warm and have their connections open. */
const warmUp = async (env: Env): Promise<void> => {
  const agent = LoadGen.makeAgent(16)
  try {
    for (const base of [env.simUrl, env.gatewayUrl]) {
      for (const stream of [false, true]) {
        const spec = {
          url: `${base}/v1/chat/completions`,
          body: requestBody(stream),
          stream,
          concurrency: 16,
          maxRequests: 5000,
          maxDurationMs: 1500
        }
        const r = await LoadGen.run(agent, spec)
        if (r.ok === 0) throw new Error(`warm-up against ${base} failed: ${r.firstError}`)
      }
    }
  } finally {
    await agent.close()
  }
}

const configureSim = async (simUrl: string, patch: Record<string, number>): Promise<void> => {
  const res = await fetch(`${simUrl}/sim/config`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify(patch),
    signal: AbortSignal.timeout(5000)
  })
  const text = await res.text()
  if (res.status !== 200) throw new Error(`POST /sim/config: HTTP ${res.status} ${text}`)
}

// --- Report --------------------------------------------------------------------------------

const targets = {
  cpuMsPerReq: 0.4,
  oneCoreRps: 2500,
  ttftP99AddedMs: 2,
  rssMb: 150
} as const

interface TargetRow {
  readonly target: string
  readonly measured: string | undefined
  readonly passed: boolean | undefined
}

const evaluate = (
  latency: ReadonlyArray<ScenarioResult>,
  saturation: ReadonlyArray<SaturationStep>
): ReadonlyArray<TargetRow> => {
  const rows: Array<TargetRow> = []
  const le = (x: number | undefined, limit: number) => (x === undefined ? undefined : x <= limit)
  for (const r of latency.filter((r) => !r.scenario.stream)) {
    const x = r.gateway.gatewayCpuMsPerReq
    rows.push({
      target: `gateway CPU ≤ ${targets.cpuMsPerReq} ms per non-streaming request (${scenarioName(r.scenario)})`,
      measured: x === undefined ? undefined : `${x.toFixed(3)} ms`,
      passed: le(x, targets.cpuMsPerReq)
    })
  }
  const peak = saturation.reduce<SaturationStep | undefined>(
    (a, s) => (a === undefined || (s.gateway.rps ?? 0) > (a.gateway.rps ?? 0) ? s : a),
    undefined
  )
  if (peak !== undefined) {
    const x = peak.gateway.gatewayCpuMsPerReq
    rows.push({
      target: `gateway CPU ≤ ${targets.cpuMsPerReq} ms per non-streaming request (saturation, c=${peak.concurrency})`,
      measured: x === undefined ? undefined : `${x.toFixed(3)} ms`,
      passed: le(x, targets.cpuMsPerReq)
    })
    const rps = peak.gateway.rps
    rows.push({
      target: `≥ ${targets.oneCoreRps.toLocaleString("en-US")} req/s on one core (max over saturation steps)`,
      measured: rps === undefined ? undefined : `${Report.rps(rps)} req/s (c=${peak.concurrency})`,
      passed: rps === undefined ? undefined : rps >= targets.oneCoreRps
    })
  }
  for (const r of latency.filter((r) => r.scenario.stream)) {
    const x = r.added.ttftP99Ms
    rows.push({
      target: `TTFT p99 via gateway within ${targets.ttftP99AddedMs} ms of direct (${scenarioName(r.scenario)})`,
      measured: x === undefined ? undefined : `${Report.signed(x, 2)} ms`,
      passed: le(x, targets.ttftP99AddedMs)
    })
  }
  const at200 = latency.filter((r) => r.scenario.concurrency === 200)
  if (at200.length > 0) {
    const x = Stats.max(at200.map((r) => r.gatewayMaxRssMb))
    rows.push({
      target: `gateway peak RSS ≤ ${targets.rssMb} MB at concurrency 200 (max over runs)`,
      measured: x === undefined ? undefined : `${x.toFixed(1)} MB`,
      passed: le(x, targets.rssMb)
    })
  }
  return rows
}

const markdown = (
  meta: Record<string, string>,
  latency: ReadonlyArray<ScenarioResult>,
  saturation: ReadonlyArray<SaturationStep>,
  targetRows: ReadonlyArray<TargetRow>
): string => {
  const out: Array<string> = []
  out.push("# Gateway overhead benchmark", "")
  for (const [k, v] of Object.entries(meta)) out.push(`- ${k}: ${v}`)
  out.push(
    "",
    `## Latency: backend-sim ttft ${config.ttftMs} ms, itl ${config.itlMs} ms, ${config.outputTokens} tokens (medians of ${config.rounds} rounds)`,
    "",
    "Latency and TTFT in ms. CPU ms/req = process CPU time (user+sys) / requests served; CPU % is of one core. other/steal = CPU used meanwhile by processes outside the benchmark / taken by the hypervisor (noise).",
    ""
  )
  const f2 = (x: number | undefined) => Report.fixed(x, 2)
  const f3 = (x: number | undefined) => Report.fixed(x, 3)
  const f0 = (x: number | undefined) => Report.fixed(x, 0)
  const noise = (s: Summary) =>
    `${f0(s.otherCpuPct) ?? "n/a"}/${f0(s.stealPct) ?? "n/a"}` +
    (s.noisyRuns > 0 ? ` (${s.noisyRuns}/${s.rounds} noisy)` : "")
  out.push(
    Report.table(
      [
        "scenario",
        "path",
        "req/s",
        "p50",
        "p99",
        "TTFT p50",
        "TTFT p99",
        "gw CPU ms/req",
        "gw CPU %",
        "gw peak RSS MB",
        "sim CPU ms/req",
        "loadgen CPU %",
        "other/steal CPU %",
        "errors"
      ],
      latency.flatMap((r) =>
        (["direct", "gateway"] as const).map((t) => {
          const s = r[t]
          return [
            scenarioName(r.scenario),
            t,
            Report.rps(s.rps),
            f2(s.p50Ms),
            f2(s.p99Ms),
            f2(s.ttftP50Ms),
            f2(s.ttftP99Ms),
            t === "gateway" ? f3(s.gatewayCpuMsPerReq) : "–",
            t === "gateway" ? f0(s.gatewayCpuPct) : "–",
            t === "gateway" ? Report.fixed(s.gatewayPeakRssMb, 1) : "–",
            f3(s.simCpuMsPerReq),
            f0(s.loadgenCpuPct),
            noise(s),
            String(s.errors)
          ]
        })
      )
    ),
    "",
    "### Added by the gateway (median over rounds of gateway − direct in the same round, ms)",
    "",
    Report.table(
      ["scenario", "p50", "p99", "TTFT p50", "TTFT p99"],
      latency.map((r) => [
        scenarioName(r.scenario),
        Report.signed(r.added.p50Ms, 2),
        Report.signed(r.added.p99Ms, 2),
        Report.signed(r.added.ttftP50Ms, 2),
        Report.signed(r.added.ttftP99Ms, 2)
      ])
    )
  )
  if (saturation.length > 0) {
    const peak = Stats.max(saturation.map((s) => s.gateway.rps))
    out.push(
      "",
      `## Saturation: gateway on one core, backend-sim instant (ttft 0, itl 0), non-streaming (medians of ${config.satRounds} rounds)`,
      "",
      "The load generator and backend-sim share the other core: sim CPU % + loadgen CPU % near 100 means that side, not the gateway, was the limit. `direct req/s` is the same load straight to the sim.",
      "",
      Report.table(
        [
          "concurrency",
          "gw req/s",
          "gw p50 ms",
          "gw p99 ms",
          "gw CPU %",
          "gw CPU ms/req",
          "gw peak RSS MB",
          "sim CPU %",
          "loadgen CPU %",
          "direct req/s",
          "other/steal CPU %",
          "errors"
        ],
        saturation.map((s) => [
          String(s.concurrency),
          Report.rps(s.gateway.rps),
          f2(s.gateway.p50Ms),
          f2(s.gateway.p99Ms),
          f0(s.gateway.gatewayCpuPct),
          f3(s.gateway.gatewayCpuMsPerReq),
          Report.fixed(s.gateway.gatewayPeakRssMb, 1),
          f0(s.gateway.simCpuPct),
          f0(s.gateway.loadgenCpuPct),
          s.direct === undefined ? undefined : Report.rps(s.direct.rps),
          noise(s.gateway),
          String(s.gateway.errors + (s.direct?.errors ?? 0))
        ])
      ),
      "",
      `Max: ${Report.rps(peak)} req/s.`
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

const otherLoad = (quietAtStart: boolean, runs: ReadonlyArray<Measurement>): string => {
  const noisy = runs.filter((m) => m.otherCpuPct + m.stealPct > noisyPct).length
  return (
    `${quietAtStart ? "quiet" : "busy"} at the start; waited ${Math.round(quiet.waitedMs() / 1000)} s in all for quiet ` +
    `(budget --wait-quiet ${config.waitQuietMs / 1000} s); ${noisy} of ${runs.length} measured runs noisy ` +
    `(other processes > ${noisyPct}% of a core during the run)`
  )
}

// --- Main ----------------------------------------------------------------------------------

const main = async (): Promise<void> => {
  const latencyRuns = config.rounds * config.concurrency.length * 2 * 2
  const satRuns =
    config.satConcurrency.length * (config.satRounds + Math.min(config.satRounds, config.satDirectRounds))
  const estimateS = Math.round(
    12 +
      (latencyRuns * (config.durationMs + config.warmupMs + 450) +
        satRuns * (config.satDurationMs + config.warmupMs + 450)) /
        1000
  )
  log(`${pinning}`)
  log(`plan: ${latencyRuns} latency runs + up to ${satRuns} saturation runs, about ${estimateS} s`)
  const quietAtStart = await quiet.wait(2, 1000, [])
  const startedAt = new Date()
  const load0 = loadavg()

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
  const port = await Procs.freePort()
  const configPath = join(workDir, "gateway.json")
  writeFileSync(
    configPath,
    JSON.stringify({
      server: { host: "127.0.0.1", port },
      models: [{ name: "sim", backends: [{ id: "sim-1", url: sim.url }] }]
    })
  )
  const gateway = await Procs.startGateway({
    cwd: root,
    configPath,
    port,
    logLevel: config.logLevel,
    stdout: config.gatewayLog,
    cpu: gatewayCpu,
    nodeArgs: config.gatewayNodeArgs,
    // The proxy's own overhead: recording is measured by `pnpm bench:events`, on real PostgreSQL.
    env: { GATEWAY_RECORDING: "off", GATEWAY_AUTH: "off" }
  })
  children.push(gateway.proc)
  const env: Env = { sim: sim.proc, simUrl: sim.url, gateway: gateway.proc, gatewayUrl: gateway.url }
  log(`backend-sim pid ${sim.proc.pid} at ${sim.url}; gateway pid ${gateway.proc.pid} at ${gateway.url}`)

  const rssMb = () => {
    const kb = Procs.statusKb(gateway.proc.pid, "VmRSS")
    return kb === undefined ? "n/a" : `${(kb / 1024).toFixed(1)} MB`
  }
  const rssAtStart = rssMb()
  log("warm-up (not measured)")
  await warmUp(env)
  const rssAfterWarmUp = rssMb()

  log("latency phase")
  const latency = await latencyPhase(env)

  let saturation: ReadonlyArray<SaturationStep> = []
  if (config.satConcurrency.length > 0 && config.satRounds > 0) {
    log("saturation phase: backend-sim set to ttft 0, itl 0")
    await configureSim(sim.url, { ttftMs: 0, itlMs: 0 })
    saturation = await saturationPhase(env)
  }

  const gatewayHwmKb = Procs.statusKb(gateway.proc.pid, "VmHWM")
  const rssAtEnd = rssMb()
  const load1 = loadavg()
  await stopAll()
  clearTimeout(watchdog)

  const meta: Record<string, string> = {
    date: startedAt.toISOString(),
    command: ["pnpm bench", ...argv].join(" "),
    machine: `${cpuCount} CPUs (${cpus()[0]?.model ?? "unknown"}), load average ${load0.map((x) => x.toFixed(2)).join(" ")} at start, ${load1.map((x) => x.toFixed(2)).join(" ")} at end`,
    node: process.version,
    "other load": otherLoad(quietAtStart, [
      ...latency.flatMap((r) => r.runs),
      ...saturation.flatMap((s) => s.runs)
    ]),
    pinning,
    "gateway LOG_LEVEL": `${config.logLevel}, stdout to ${config.gatewayLog}`,
    ...(config.gatewayNodeArgs.length === 0
      ? {}
      : { "gateway node flags": config.gatewayNodeArgs.join(" ") }),
    load: `closed loop on undici keep-alive, per run: ${config.warmupMs / 1000} s warm-up, then ≤ ${config.maxRequests} requests or ≤ ${config.durationMs / 1000} s (saturation ≤ ${config.satDurationMs / 1000} s)`,
    "gateway RSS": `${rssAtStart} idle after start, ${rssAfterWarmUp} after warm-up, ${rssAtEnd} at the end; VmHWM over the whole run ${gatewayHwmKb === undefined ? "n/a" : `${(gatewayHwmKb / 1024).toFixed(1)} MB`}`
  }
  const targetRows = evaluate(latency, saturation)
  process.stdout.write(`${markdown(meta, latency, saturation, targetRows)}\n`)

  if (flags.json !== "none") {
    const path =
      flags.json ??
      join(root, "bench", "results", `overhead-${startedAt.toISOString().replace(/[:.]/g, "-")}.json`)
    mkdirSync(dirname(path), { recursive: true })
    writeFileSync(
      path,
      `${JSON.stringify({ meta, config, latency, saturation, targets: targetRows }, null, 2)}\n`
    )
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
