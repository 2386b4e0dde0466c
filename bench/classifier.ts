/**
 * Classifier benchmark: `pnpm bench:classifier` (`node --import tsx bench/classifier.ts --help`).
 *
 * 1. classifier: `Classifier.classify` in this process, each call timed with
 *    `process.hrtime.bigint()`, over prompts of three families — plain prose without a single cue
 *    word (the worst case for the pattern scans: none stops early at its cap), code-heavy prompts,
 *    and multi-turn chats with a system prompt — at sizes up to 32k tokens of context, bucketed
 *    by size (≤ 256, ≤ 2k, ≤ 8k, ≤ 32k tokens). Warm-up first, then several runs; p50 and p99 in
 *    µs are medians over the runs. Then a few calls on adversarial inputs (long runs of word
 *    characters, of blank lines, of unclosed calls), reported apart: not in the target.
 * 2. gateway: one backend-sim (instant: ttft 0, itl 0) and one gateway (bundle, GATEWAY_AUTH=off,
 *    GATEWAY_RECORDING=off) with a policy `auto` whose tiers all name the sim's model, so the
 *    only difference between `"model": "auto"` and `"model": "sim"` is the routing decision. Each
 *    round, for a short prompt and a ~1k-token one, interleaves blocks of auto and explicit
 *    requests (auto, explicit, explicit, auto, …: drift and noise fall on both alike); per side
 *    the client p50 latency and the gateway's CPU per request (`/proc/<pid>/stat` around each
 *    block), and the medians over rounds of auto − explicit within the round.
 * The gateway is pinned to CPU 0, the sim and this process to CPU 1. Markdown on stdout,
 * progress on stderr, JSON in bench/results/.
 */
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs"
import { availableParallelism, cpus, loadavg, tmpdir } from "node:os"
import { dirname, join, relative } from "node:path"
import { fileURLToPath } from "node:url"
import * as Classifier from "@gateway/core/Classifier"
import { OpenAi, Routing } from "@gateway/domain"
import { Schema } from "effect"
import { request } from "undici"
import * as Flags from "./Flags.js"
import * as LoadGen from "./LoadGen.js"
import * as Procs from "./Procs.js"
import * as Report from "./Report.js"
import * as Stats from "./Stats.js"

const usage = `Usage: pnpm bench:classifier [--flag value]...
  --phases LIST         classifier, gateway, or both (classifier,gateway)
  --runs N              classifier: measured runs, each over every bucket (5)
  --run-ms N            classifier: time budget per bucket per run, ms (1200)
  --run-calls N         classifier: call cap per bucket per run (40000)
  --warmup-calls N      classifier: unmeasured calls over every prompt first (20000)
  --adversarial N       classifier: calls per adversarial input (5; 0 skips them)
  --rounds N            gateway: rounds per prompt (5)
  --blocks N            gateway: pairs of blocks per round, auto and explicit interleaved (10)
  --block-requests N    gateway: requests per block (200)
  --warmup S            gateway: unmeasured load before each round, seconds (0.5)
  --concurrency LIST    gateway: closed-loop concurrencies (1: latency is the service time, no
                        queueing in front of the gateway's one core)
  --no-pin              do not pin processes with taskset
  --json PATH|none      results file (bench/results/classifier-<time>.json)
  --wait-quiet S        wait in all up to S seconds, before the start and each gateway run, while
                        other processes use > ${Procs.noisyPct}% of a core (30)
  --time-limit S        hard limit of the whole run; children are stopped after it (240)`

const options = {
  phases: { type: "string", default: "classifier,gateway" },
  runs: { type: "string", default: "5" },
  "run-ms": { type: "string", default: "1200" },
  "run-calls": { type: "string", default: "40000" },
  "warmup-calls": { type: "string", default: "20000" },
  adversarial: { type: "string", default: "5" },
  rounds: { type: "string", default: "5" },
  blocks: { type: "string", default: "10" },
  "block-requests": { type: "string", default: "200" },
  warmup: { type: "string", default: "0.5" },
  concurrency: { type: "string", default: "1" },
  "no-pin": { type: "boolean", default: false },
  json: { type: "string" },
  "wait-quiet": { type: "string", default: "30" },
  "time-limit": { type: "string", default: "240" },
  help: { type: "boolean", short: "h", default: false }
} as const
const { flags, argv, num, int, list } = Flags.parse("bench:classifier", usage, options)
const phases = new Set(flags.phases.split(","))
for (const p of phases) {
  if (p !== "classifier" && p !== "gateway") {
    process.stderr.write(`bench:classifier: --phases: unknown phase '${p}'\n\n${usage}\n`)
    process.exit(2)
  }
}

const config = {
  runs: int("runs", flags.runs, 1),
  runMs: num("run-ms", flags["run-ms"], 10),
  runCalls: int("run-calls", flags["run-calls"], 100),
  warmupCalls: int("warmup-calls", flags["warmup-calls"], 0),
  adversarialCalls: int("adversarial", flags.adversarial, 0),
  rounds: int("rounds", flags.rounds, 1),
  blocks: int("blocks", flags.blocks, 1),
  blockRequests: int("block-requests", flags["block-requests"], 1),
  warmupMs: num("warmup", flags.warmup, 0) * 1000,
  concurrency: list("concurrency", flags.concurrency),
  waitQuietMs: num("wait-quiet", flags["wait-quiet"], 0) * 1000,
  timeLimitMs: num("time-limit", flags["time-limit"], 10) * 1000
}

const root = fileURLToPath(new URL("..", import.meta.url))
const log = (line: string): void => {
  process.stderr.write(`[bench:classifier ${new Date().toISOString().slice(11, 19)}] ${line}\n`)
}

// --- Pinning and children --------------------------------------------------------------------

// Read before pinning: afterwards this process sees only its own CPU.
const cpuCount = availableParallelism()
const pinned = !flags["no-pin"] && cpuCount >= 2 && Procs.hasTaskset()
const gatewayCpu = pinned ? 0 : undefined
const sideCpu = pinned ? 1 : undefined
const pinning = pinned
  ? "taskset: gateway on CPU 0; backend-sim and this process (classifier runs, load generator) on CPU 1"
  : `not pinned (${flags["no-pin"] ? "--no-pin" : cpuCount < 2 ? "fewer than 2 CPUs" : "taskset not found"})`
if (sideCpu !== undefined) Procs.pinSelf(sideCpu)

const children: Array<Procs.Proc> = []
const workDir = mkdtempSync(join(tmpdir(), "gateway-bench-classifier-"))
const stopAll = async (): Promise<void> => {
  await Promise.all(children.map((p) => p.stop()))
  rmSync(workDir, { recursive: true, force: true })
}
const { watchdog } = Procs.guard({ log, timeLimitMs: config.timeLimitMs, stop: stopAll })
const quiet = Procs.quietWaiter(config.waitQuietMs, log)

// --- Prompts ---------------------------------------------------------------------------------

const decodeRequest = Schema.decodeUnknownSync(OpenAi.ChatCompletionRequest)
const classifierConfig = Schema.decodeUnknownSync(Routing.ClassifierConfig)({})

/** Plain prose: no cue word, no question mark, no digit, no code-looking line. */
const prose = (chars: number): string => {
  const sentences = [
    "The quick brown fox jumps over the lazy dog near the old river bank. ",
    "A gentle wind moved through the tall grass while the birds sang in the morning light. ",
    "Her neighbours planted roses along the fence and watered them every evening after dinner. ",
    "The train left the station late, so the travellers read their books and watched the hills.\n"
  ]
  let out = ""
  for (let i = 0; out.length < chars; i++) out += sentences[i % sentences.length]
  return out.slice(0, chars)
}

/** Code-heavy text: fenced TypeScript with a sentence of prose between blocks. */
const code = (chars: number): string => {
  const block = [
    "Here is the next part of the module:",
    "```ts",
    'import { Effect } from "effect"',
    "export const total = (items: ReadonlyArray<Item>) => {",
    "  let sum = 0;",
    "  for (const item of items) sum += item.price * item.quantity;",
    "  return sum;",
    "}",
    "const ratio = (a: number, b: number) => (b === 0 ? 0 : a / b);",
    "```",
    ""
  ].join("\n")
  let out = "Review this code and tell me what is wrong with it.\n"
  while (out.length < chars) out += block
  return out.slice(0, chars)
}

type Family = "prose" | "code" | "chat"
const families: ReadonlyArray<Family> = ["prose", "code", "chat"]

/** A request of about `tokens` tokens of context (4 characters a token) of `family`. */
const prompt = (family: Family, tokens: number): OpenAi.ChatCompletionRequest => {
  const chars = tokens * 4
  const system = { role: "system", content: "You are a helpful assistant. Answer briefly and precisely." }
  switch (family) {
    case "prose":
      return decodeRequest({
        model: "auto",
        messages: [system, { role: "user", content: prose(chars - 58) }]
      })
    case "code":
      return decodeRequest({ model: "auto", messages: [system, { role: "user", content: code(chars - 58) }] })
    case "chat": {
      // A conversation: a long system prompt, turns of prose, and a short last question.
      const messages: Array<unknown> = [{ role: "system", content: prose(Math.min(4000, chars / 8)) }]
      const question = "Explain why the second approach is faster, and compare it with the first one?"
      let left = chars - Math.min(4000, chars / 8) - question.length
      for (let turn = 0; left > 0; turn++) {
        const n = Math.min(left, 2000)
        messages.push({ role: turn % 2 === 0 ? "user" : "assistant", content: prose(n) })
        left -= n
      }
      messages.push({ role: "user", content: question })
      return decodeRequest({ model: "auto", messages })
    }
  }
}

interface Bucket {
  readonly name: string
  readonly maxTokens: number
  readonly sizes: ReadonlyArray<number>
}
const buckets: ReadonlyArray<Bucket> = [
  { name: "≤ 256", maxTokens: 256, sizes: [32, 128, 256] },
  { name: "≤ 2k", maxTokens: 2048, sizes: [512, 1024, 2048] },
  { name: "≤ 8k", maxTokens: 8192, sizes: [4096, 8192] },
  { name: "≤ 32k", maxTokens: 32768, sizes: [16384, 32768] }
]

interface Case {
  readonly bucket: string
  readonly family: Family
  readonly tokens: number
  readonly request: OpenAi.ChatCompletionRequest
}

const cases: ReadonlyArray<Case> = buckets.flatMap((b) =>
  families.flatMap((family) =>
    b.sizes.map((tokens) => ({ bucket: b.name, family, tokens, request: prompt(family, tokens) }))
  )
)

// --- Phase 1: the classifier ------------------------------------------------------------------

interface Percentiles {
  readonly samples: number
  readonly p50Us: number | undefined
  readonly p99Us: number | undefined
  readonly maxUs: number | undefined
}

const percentiles = (samples: Float64Array): Percentiles => {
  const sorted = samples.slice().sort()
  return {
    samples: sorted.length,
    p50Us: Stats.percentile(sorted, 50),
    p99Us: Stats.percentile(sorted, 99),
    maxUs: sorted.length === 0 ? undefined : sorted[sorted.length - 1]
  }
}

/** Keeps the classifier's answers alive so the calls cannot be optimised away. */
let sink = 0

/** The cost of the timing itself: two `hrtime.bigint()` calls back to back, µs. */
const timerOverhead = (): Percentiles => {
  const n = 100_000
  const samples = new Float64Array(n)
  for (let i = 0; i < n; i++) {
    const t0 = process.hrtime.bigint()
    samples[i] = Number(process.hrtime.bigint() - t0) / 1000
  }
  return percentiles(samples)
}

/** One run over a bucket: its prompts in turn until the time budget or the call cap. */
const runBucket = (
  bucketCases: ReadonlyArray<Case>
): { samples: Map<string, Float64Array>; otherCpuPct: number } => {
  const sys0 = Procs.systemCpu()
  const self0 = Procs.selfCpuMs()
  const t0 = performance.now()
  const byFamily = new Map<Family, Array<number>>(families.map((f) => [f, []]))
  const all: Array<number> = []
  const deadline = performance.now() + config.runMs
  for (let i = 0; i < config.runCalls && (i % 64 !== 0 || performance.now() < deadline); i++) {
    const c = bucketCases[i % bucketCases.length]!
    const t0 = process.hrtime.bigint()
    const result = Classifier.classify(c.request, classifierConfig)
    const us = Number(process.hrtime.bigint() - t0) / 1000
    sink += result.score
    byFamily.get(c.family)!.push(us)
    all.push(us)
  }
  const elapsed = performance.now() - t0
  const sys1 = Procs.systemCpu()
  const self1 = Procs.selfCpuMs()
  const out = new Map<string, Float64Array>([["all", Float64Array.from(all)]])
  for (const [family, xs] of byFamily) out.set(family, Float64Array.from(xs))
  const other = sys1.busyMs - sys0.busyMs - (self1 - self0) + sys1.stealMs - sys0.stealMs
  return { samples: out, otherCpuPct: Math.max(0, (100 * other) / elapsed) }
}

interface ClassifierRow {
  readonly bucket: string
  readonly family: string
  /** Medians over runs. */
  readonly p50Us: number | undefined
  readonly p99Us: number | undefined
  /** Largest over runs. */
  readonly maxUs: number | undefined
  readonly samplesPerRun: number | undefined
  /** Runs during which other processes used more than `noisyPct` % of a core. */
  readonly noisyRuns: number
  readonly perRun: ReadonlyArray<Percentiles & { readonly otherCpuPct: number }>
}

interface Adversarial {
  readonly name: string
  readonly chars: number
  readonly calls: number
  readonly medianUs: number | undefined
  readonly maxUs: number | undefined
  readonly tier: string
}

/** Inputs that make the pattern scans backtrack, at 2k and 4k tokens of last turn. */
const adversarialInputs: ReadonlyArray<readonly [string, (chars: number) => string]> = [
  ["one run of word characters (a hex dump without spaces)", (n) => "0123456789abcdef".repeat(n / 16)],
  ["blank lines", (n) => "\n".repeat(n)],
  ["unclosed calls `f(f(f(…`", (n) => "f(".repeat(n / 2)]
]

const adversarialPhase = (): ReadonlyArray<Adversarial> => {
  const out: Array<Adversarial> = []
  for (const [name, make] of adversarialInputs) {
    for (const chars of [8192, 16384]) {
      const req = decodeRequest({ model: "auto", messages: [{ role: "user", content: make(chars) }] })
      const times: Array<number> = []
      let tier = ""
      for (let i = 0; i < config.adversarialCalls; i++) {
        const t0 = process.hrtime.bigint()
        const result = Classifier.classify(req, classifierConfig)
        times.push(Number(process.hrtime.bigint() - t0) / 1000)
        tier = result.tier
      }
      const row = {
        name,
        chars,
        calls: times.length,
        medianUs: Stats.median(times),
        maxUs: Stats.max(times),
        tier
      }
      log(`adversarial ${name}, ${chars} chars: median ${Report.fixed(row.medianUs, 0)} µs`)
      out.push(row)
    }
  }
  return out
}

const classifierPhase = async (): Promise<{
  timer: Percentiles
  rows: ReadonlyArray<ClassifierRow>
  adversarial: ReadonlyArray<Adversarial>
}> => {
  const timer = timerOverhead()
  log(`timer overhead: p50 ${Report.fixed(timer.p50Us, 3)} µs, p99 ${Report.fixed(timer.p99Us, 3)} µs`)
  log(`warm-up: ${config.warmupCalls} calls over ${cases.length} prompts`)
  for (let i = 0; i < config.warmupCalls; i++)
    sink += Classifier.classify(cases[i % cases.length]!.request, classifierConfig).score
  const runs = new Map<string, Array<Percentiles & { otherCpuPct: number }>>()
  for (let run = 1; run <= config.runs; run++) {
    for (const b of buckets) {
      await quiet.wait(1, 250, [])
      const { samples, otherCpuPct } = runBucket(cases.filter((c) => c.bucket === b.name))
      for (const [family, xs] of samples) {
        const key = `${b.name}|${family}`
        const list = runs.get(key) ?? []
        list.push({ ...percentiles(xs), otherCpuPct })
        runs.set(key, list)
      }
      const all = runs.get(`${b.name}|all`)!.at(-1)!
      log(
        `run ${run}, ${b.name} tokens: ${all.samples} calls, p50 ${Report.fixed(all.p50Us, 1)} µs, p99 ${Report.fixed(all.p99Us, 1)} µs, other ${Math.round(otherCpuPct)}%`
      )
    }
  }
  const rows: Array<ClassifierRow> = []
  for (const b of buckets) {
    for (const family of ["all", ...families]) {
      const perRun = runs.get(`${b.name}|${family}`) ?? []
      rows.push({
        bucket: b.name,
        family,
        p50Us: Stats.median(perRun.map((p) => p.p50Us)),
        p99Us: Stats.median(perRun.map((p) => p.p99Us)),
        maxUs: Stats.max(perRun.map((p) => p.maxUs)),
        samplesPerRun: Stats.median(perRun.map((p) => p.samples)),
        noisyRuns: perRun.filter((p) => p.otherCpuPct > Procs.noisyPct).length,
        perRun
      })
    }
  }
  const adversarial = config.adversarialCalls > 0 ? adversarialPhase() : []
  return { timer, rows, adversarial }
}

// --- Phase 2: the gateway, auto vs explicit ---------------------------------------------------

type Target = "auto" | "explicit"

const gatewayPrompts: ReadonlyArray<{ readonly name: string; readonly messages: ReadonlyArray<unknown> }> = [
  {
    name: "short (2 messages, ~20 tokens)",
    messages: [
      { role: "system", content: "You are a helpful assistant." },
      { role: "user", content: "Hello there, how are you today? Tell me something about latency." }
    ]
  },
  {
    name: "~1k tokens of prose and code",
    messages: [
      { role: "system", content: "You are a senior engineer. Answer precisely." },
      { role: "user", content: `${prose(2000)}\n${code(1900)}\nExplain why this is slow, step by step?` }
    ]
  }
]

const bodyOf = (model: string, messages: ReadonlyArray<unknown>) =>
  JSON.stringify({ model, messages, stream: false })

interface Env {
  readonly sim: Procs.Proc
  readonly gateway: Procs.Proc
  readonly url: string
}

/** One target's side of a round: its blocks' latencies together, its CPU summed. */
interface Side {
  readonly ok: number
  readonly errors: number
  readonly firstError: string | undefined
  readonly p50Ms: number | undefined
  readonly p99Ms: number | undefined
  readonly gatewayCpuMsPerReq: number
}

/** A round of one prompt at one concurrency: blocks of auto and explicit requests interleaved. */
interface GatewayRound {
  readonly prompt: string
  readonly concurrency: number
  readonly round: number
  readonly auto: Side
  readonly explicit: Side
  readonly otherCpuPct: number
}

/**
 * `config.blocks` pairs of blocks, each `config.blockRequests` requests of one target, in the
 * order auto, explicit, explicit, auto, … so drift and noise fall on both alike; the gateway's CPU
 * is read around every block.
 */
const measureRound = async (
  env: Env,
  promptIndex: number,
  concurrency: number,
  round: number
): Promise<GatewayRound> => {
  const p = gatewayPrompts[promptIndex]!
  const spec = (target: Target): LoadGen.LoadSpec => ({
    url: `${env.url}/v1/chat/completions`,
    body: bodyOf(target === "auto" ? "auto" : "sim", p.messages),
    stream: false,
    concurrency,
    maxRequests: config.blockRequests,
    maxDurationMs: 10_000
  })
  await quiet.wait(1, 250, [env.gateway.pid, env.sim.pid])
  const agent = LoadGen.makeAgent(concurrency)
  try {
    if (config.warmupMs > 0) {
      for (const target of ["auto", "explicit"] as const) {
        await LoadGen.run(agent, {
          ...spec(target),
          maxRequests: 100_000,
          maxDurationMs: config.warmupMs / 2
        })
      }
    }
    const acc = {
      auto: {
        latency: [] as Array<Float64Array>,
        cpuMs: 0,
        ok: 0,
        errors: 0,
        firstError: undefined as string | undefined
      },
      explicit: {
        latency: [] as Array<Float64Array>,
        cpuMs: 0,
        ok: 0,
        errors: 0,
        firstError: undefined as string | undefined
      }
    }
    const sys0 = Procs.systemCpu()
    const ours0 = Procs.cpuTimeMs(env.gateway.pid) + Procs.cpuTimeMs(env.sim.pid) + Procs.selfCpuMs()
    const t0 = performance.now()
    for (let block = 0; block < 2 * config.blocks; block++) {
      const target: Target = block % 4 === 0 || block % 4 === 3 ? "auto" : "explicit"
      const gw0 = Procs.cpuTimeMs(env.gateway.pid)
      const result = await LoadGen.run(agent, spec(target))
      const gw1 = Procs.cpuTimeMs(env.gateway.pid)
      const side = acc[target]
      side.latency.push(result.latencyMs)
      side.cpuMs += gw1 - gw0
      side.ok += result.ok
      side.errors += result.errors
      side.firstError ??= result.firstError
    }
    const elapsed = performance.now() - t0
    const ours1 = Procs.cpuTimeMs(env.gateway.pid) + Procs.cpuTimeMs(env.sim.pid) + Procs.selfCpuMs()
    const sys1 = Procs.systemCpu()
    const sideOf = (target: Target): Side => {
      const a = acc[target]
      const all = new Float64Array(a.latency.reduce((n, xs) => n + xs.length, 0))
      let at = 0
      for (const xs of a.latency) {
        all.set(xs, at)
        at += xs.length
      }
      all.sort()
      return {
        ok: a.ok,
        errors: a.errors,
        firstError: a.firstError,
        p50Ms: Stats.percentile(all, 50),
        p99Ms: Stats.percentile(all, 99),
        gatewayCpuMsPerReq: a.cpuMs / Math.max(1, a.ok + a.errors)
      }
    }
    const other = sys1.busyMs - sys0.busyMs - (ours1 - ours0) + sys1.stealMs - sys0.stealMs
    const r: GatewayRound = {
      prompt: p.name,
      concurrency,
      round,
      auto: sideOf("auto"),
      explicit: sideOf("explicit"),
      otherCpuPct: Math.max(0, (100 * other) / elapsed)
    }
    const errors = r.auto.errors + r.explicit.errors
    log(
      `${p.name}, c=${concurrency}, round ${round}: p50 auto ${Report.fixed(r.auto.p50Ms, 3)} / explicit ${Report.fixed(r.explicit.p50Ms, 3)} ms, ` +
        `gw cpu/req auto ${r.auto.gatewayCpuMsPerReq.toFixed(4)} / explicit ${r.explicit.gatewayCpuMsPerReq.toFixed(4)} ms, other ${Math.round(r.otherCpuPct)}%` +
        (errors > 0 ? `, ${errors} errors (first: ${r.auto.firstError ?? r.explicit.firstError})` : "")
    )
    return r
  } finally {
    await agent.close()
  }
}

interface GatewayRow {
  readonly prompt: string
  readonly concurrency: number
  /** Medians over rounds. */
  readonly auto: { readonly p50Ms?: number; readonly p99Ms?: number; readonly cpu?: number }
  readonly explicit: { readonly p50Ms?: number; readonly p99Ms?: number; readonly cpu?: number }
  /** Medians over rounds of auto − explicit within the round. */
  readonly deltaP50Ms: number | undefined
  readonly deltaCpuMsPerReq: number | undefined
  readonly deltaP50PerRound: ReadonlyArray<number | undefined>
  readonly requestsPerRound: number | undefined
  readonly errors: number
  readonly noisyRounds: number
  readonly rounds: number
}

const summarizeGateway = (rounds: ReadonlyArray<GatewayRound>): ReadonlyArray<GatewayRow> =>
  config.concurrency
    .flatMap((concurrency) => gatewayPrompts.map((p) => ({ p, concurrency })))
    .map(({ p, concurrency }) => {
      const mine = rounds.filter((r) => r.prompt === p.name && r.concurrency === concurrency)
      const side = (t: Target) => {
        const med = (f: (s: Side) => number | undefined) => Stats.median(mine.map((r) => f(r[t])))
        return {
          p50Ms: med((s) => s.p50Ms),
          p99Ms: med((s) => s.p99Ms),
          cpu: med((s) => s.gatewayCpuMsPerReq)
        } as GatewayRow["auto"]
      }
      const deltaP50PerRound = mine.map((r) => Stats.diff(r.auto.p50Ms, r.explicit.p50Ms))
      return {
        prompt: p.name,
        concurrency,
        auto: side("auto"),
        explicit: side("explicit"),
        deltaP50Ms: Stats.median(deltaP50PerRound),
        deltaCpuMsPerReq: Stats.median(
          mine.map((r) => r.auto.gatewayCpuMsPerReq - r.explicit.gatewayCpuMsPerReq)
        ),
        deltaP50PerRound,
        requestsPerRound: Stats.median(mine.map((r) => r.auto.ok + r.explicit.ok)),
        errors: mine.reduce((n, r) => n + r.auto.errors + r.explicit.errors, 0),
        noisyRounds: mine.filter((r) => r.otherCpuPct > Procs.noisyPct).length,
        rounds: mine.length
      }
    })

/** One request with `"model": "auto"`: the gateway must route it (x-gateway-tier) to the sim. */
const checkRouting = async (url: string): Promise<string> => {
  const res = await request(`${url}/v1/chat/completions`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: bodyOf("auto", gatewayPrompts[1]!.messages),
    headersTimeout: 10_000,
    bodyTimeout: 10_000
  })
  const text = await res.body.text()
  const tier = res.headers["x-gateway-tier"]
  const model = res.headers["x-gateway-model"]
  if (res.statusCode !== 200 || typeof tier !== "string" || model !== "sim") {
    throw new Error(
      `auto was not routed: HTTP ${res.statusCode}, tier ${String(tier)}, model ${String(model)}: ${text.slice(0, 200)}`
    )
  }
  return tier
}

const gatewayPhase = async (): Promise<{
  rows: ReadonlyArray<GatewayRow>
  rounds: ReadonlyArray<GatewayRound>
  tier: string
}> => {
  const sim = await Procs.startSim({
    cwd: root,
    model: "sim",
    ttftMs: 0,
    itlMs: 0,
    outputTokens: 16,
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
      routing: { policies: [{ name: "auto", tiers: { simple: "sim", moderate: "sim", complex: "sim" } }] },
      models: [{ name: "sim", backends: [{ id: "sim-1", url: sim.url }] }]
    })
  )
  const gateway = await Procs.startGateway({
    cwd: root,
    configPath,
    port,
    logLevel: "info",
    stdout: "/dev/null",
    cpu: gatewayCpu,
    env: { GATEWAY_RECORDING: "off", GATEWAY_AUTH: "off" }
  })
  children.push(gateway.proc)
  const env: Env = { sim: sim.proc, gateway: gateway.proc, url: gateway.url }
  log(`backend-sim pid ${sim.proc.pid} at ${sim.url}; gateway pid ${gateway.proc.pid} at ${gateway.url}`)
  const tier = await checkRouting(gateway.url)
  log(`auto is routed (x-gateway-tier: ${tier} for the ~1k-token prompt)`)

  // Unmeasured: both paths JIT-warm.
  const agent = LoadGen.makeAgent(8)
  try {
    for (const p of gatewayPrompts) {
      for (const model of ["auto", "sim"]) {
        const r = await LoadGen.run(agent, {
          url: `${gateway.url}/v1/chat/completions`,
          body: bodyOf(model, p.messages),
          stream: false,
          concurrency: 8,
          maxRequests: 20_000,
          maxDurationMs: 1000
        })
        if (r.ok === 0) throw new Error(`warm-up failed: ${r.firstError}`)
      }
    }
  } finally {
    await agent.close()
  }

  const rounds: Array<GatewayRound> = []
  for (let round = 1; round <= config.rounds; round++) {
    for (const concurrency of config.concurrency) {
      for (let i = 0; i < gatewayPrompts.length; i++)
        rounds.push(await measureRound(env, i, concurrency, round))
    }
  }
  return { rows: summarizeGateway(rounds), rounds, tier }
}

// --- Report ------------------------------------------------------------------------------------

const targets = { classifierP99Us: 50, classifierMaxTokens: 2048, addedP50Ms: 0.1 } as const

const markdown = (
  meta: Record<string, string>,
  classifier: Awaited<ReturnType<typeof classifierPhase>> | undefined,
  gateway: Awaited<ReturnType<typeof gatewayPhase>> | undefined
): string => {
  const out: Array<string> = ["# Classifier benchmark", ""]
  for (const [k, v] of Object.entries(meta)) out.push(`- ${k}: ${v}`)
  const checks: Array<readonly [string, string | undefined, boolean | undefined]> = []
  if (classifier !== undefined) {
    out.push(
      "",
      `## Classifier time per request (µs; p50 and p99 are medians of ${config.runs} runs, max the largest call of all runs)`,
      "",
      `Timer overhead (two hrtime.bigint() back to back): p50 ${Report.fixed(classifier.timer.p50Us, 3)} µs, p99 ${Report.fixed(classifier.timer.p99Us, 3)} µs — included in every sample.`,
      "",
      Report.table(
        ["context tokens", "prompts", "p50", "p99", "max", "calls per run", "noisy runs"],
        classifier.rows.map((r) => [
          r.bucket,
          r.family,
          Report.fixed(r.p50Us, 1),
          Report.fixed(r.p99Us, 1),
          Report.fixed(r.maxUs, 0),
          Report.fixed(r.samplesPerRun, 0),
          `${r.noisyRuns}/${r.perRun.length}`
        ])
      )
    )
    if (classifier.adversarial.length > 0) {
      out.push(
        "",
        `### Adversarial last turns (${config.adversarialCalls} calls each; not in the target)`,
        "",
        Report.table(
          ["input", "chars (tokens)", "median µs", "max µs", "tier"],
          classifier.adversarial.map((a) => [
            a.name,
            `${a.chars} (${a.chars / 4})`,
            Report.fixed(a.medianUs, 0),
            Report.fixed(a.maxUs, 0),
            a.tier
          ])
        )
      )
    }
    for (const b of buckets.filter((b) => b.maxTokens <= targets.classifierMaxTokens)) {
      const row = classifier.rows.find((r) => r.bucket === b.name && r.family === "all")
      checks.push([
        `classifier p99 ≤ ${targets.classifierP99Us} µs (${b.name} tokens, all prompts)`,
        row?.p99Us === undefined ? undefined : `${row.p99Us.toFixed(1)} µs`,
        row?.p99Us === undefined ? undefined : row.p99Us <= targets.classifierP99Us
      ])
    }
  }
  if (gateway !== undefined) {
    out.push(
      "",
      `## Gateway: \`"model": "auto"\` vs \`"model": "sim"\` (medians of ${config.rounds} rounds; Δ = median over rounds of auto − explicit in the same round)`,
      "",
      `backend-sim instant (ttft 0, itl 0, 16 tokens), non-streaming. Each round interleaves ${config.blocks} pairs of ${config.blockRequests}-request blocks (auto, explicit, explicit, auto, …); p50/p99 over the round's requests of each side, gw CPU = the gateway's CPU time during its blocks / their requests. auto was classified \`${gateway.tier}\` for the ~1k-token prompt. Latency in ms; gw CPU in ms per request.`,
      "",
      Report.table(
        [
          "prompt",
          "c",
          "requests per round",
          "p50 auto",
          "p50 explicit",
          "Δ p50",
          "p99 auto / explicit",
          "gw CPU auto",
          "gw CPU explicit",
          "Δ gw CPU",
          "Δ p50 per round",
          "errors",
          "noisy rounds"
        ],
        gateway.rows.map((r) => [
          r.prompt,
          String(r.concurrency),
          Report.fixed(r.requestsPerRound, 0),
          Report.fixed(r.auto.p50Ms, 3),
          Report.fixed(r.explicit.p50Ms, 3),
          Report.signed(r.deltaP50Ms, 3),
          `${Report.fixed(r.auto.p99Ms, 3)} / ${Report.fixed(r.explicit.p99Ms, 3)}`,
          Report.fixed(r.auto.cpu, 4),
          Report.fixed(r.explicit.cpu, 4),
          Report.signed(r.deltaCpuMsPerReq, 4),
          r.deltaP50PerRound.map((d) => Report.signed(d, 3)).join(", "),
          String(r.errors),
          `${r.noisyRounds}/${r.rounds}`
        ])
      )
    )
    for (const r of gateway.rows) {
      checks.push([
        `auto adds ≤ ${targets.addedP50Ms} ms to the gateway's p50 (${r.prompt}, c=${r.concurrency})`,
        r.deltaP50Ms === undefined ? undefined : `${Report.signed(r.deltaP50Ms, 3)} ms`,
        r.deltaP50Ms === undefined ? undefined : r.deltaP50Ms <= targets.addedP50Ms
      ])
    }
  }
  out.push(
    "",
    "## Targets",
    "",
    Report.table(
      ["target", "measured", ""],
      checks.map(([t, m, ok]) => [t, m, Report.check(ok)])
    ),
    ""
  )
  return out.join("\n")
}

// --- Main --------------------------------------------------------------------------------------

const main = async (): Promise<void> => {
  log(pinning)
  const quietAtStart = await quiet.wait(2, 500, [])
  const startedAt = new Date()
  const load0 = loadavg()
  let classifier: Awaited<ReturnType<typeof classifierPhase>> | undefined
  let gateway: Awaited<ReturnType<typeof gatewayPhase>> | undefined
  if (phases.has("classifier")) {
    log("classifier phase")
    classifier = await classifierPhase()
  }
  if (phases.has("gateway")) {
    log("gateway phase")
    gateway = await gatewayPhase()
  }
  const load1 = loadavg()
  await stopAll()
  clearTimeout(watchdog)

  const meta: Record<string, string> = {
    date: startedAt.toISOString(),
    command: ["pnpm bench:classifier", ...argv].join(" "),
    commit: Procs.treeState(root),
    machine: `${cpuCount} CPUs (${cpus()[0]?.model ?? "unknown"}), load average ${load0.map((x) => x.toFixed(2)).join(" ")} at start, ${load1.map((x) => x.toFixed(2)).join(" ")} at end`,
    node: process.version,
    pinning,
    "other load": `${quietAtStart ? "quiet" : "busy"} at the start; waited ${Math.round(quiet.waitedMs() / 1000)} s in all for quiet`,
    classifier: `default config; per run and bucket ≤ ${config.runCalls} calls or ≤ ${config.runMs} ms, the bucket's prompts in turn, after ${config.warmupCalls} warm-up calls; prompts: prose (system + one user turn of plain prose), code (system + one user turn of fenced TypeScript), chat (system prompt, turns of prose, a short last question); sizes ${buckets.map((b) => b.sizes.join("/")).join(", ")} tokens`,
    gateway: `bundle on plain node, GATEWAY_AUTH=off, GATEWAY_RECORDING=off, LOG_LEVEL=info to /dev/null; policy auto with every tier on sim; closed loop at concurrency ${config.concurrency.join(", ")}; per round ${config.warmupMs / 1000} s warm-up, then ${config.blocks} × 2 blocks of ${config.blockRequests} requests`
  }
  process.stdout.write(`${markdown(meta, classifier, gateway)}\n`)
  if (flags.json !== "none") {
    const path =
      flags.json ??
      join(root, "bench", "results", `classifier-${startedAt.toISOString().replace(/[:.]/g, "-")}.json`)
    mkdirSync(dirname(path), { recursive: true })
    writeFileSync(path, `${JSON.stringify({ meta, config, classifier, gateway, sink }, null, 2)}\n`)
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
