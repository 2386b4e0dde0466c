/**
 * Child processes of the benchmark (the simulated backend and the gateway), CPU pinning, and what
 * Linux tells about a process: CPU time from `/proc/<pid>/stat`, memory from `/proc/<pid>/status`.
 */
import { type ChildProcess, execFileSync, spawn, spawnSync } from "node:child_process"
import { closeSync, openSync, readFileSync, writeFileSync } from "node:fs"
import { createServer } from "node:net"

/** A child process started by the benchmark; `stop` ends it (SIGTERM, then SIGKILL) by its pid. */
export interface Proc {
  readonly name: string
  readonly pid: number
  /** Resolves with the exit code (or null when killed by a signal) once the process has exited. */
  readonly exited: Promise<number | null>
  stop(): Promise<void>
  /** The last few kB the process wrote on stderr, for error messages. */
  stderrTail(): string
}

export interface SpawnOptions {
  readonly name: string
  readonly cwd: string
  /** Script run by node; TypeScript (`.ts`) is run with `--import tsx`. */
  readonly script: string
  readonly args?: ReadonlyArray<string>
  /** Flags of node itself, before the script. */
  readonly nodeArgs?: ReadonlyArray<string>
  readonly env?: Readonly<Record<string, string>>
  /** CPU to pin the process to with `taskset -c`; undefined: not pinned. */
  readonly cpu?: number | undefined
  /** Where stdout goes: a file path (e.g. `/dev/null`), or "pipe" to read it. */
  readonly stdout: string
}

/** Whether `taskset` (util-linux) can be run here. */
export const hasTaskset = (): boolean => spawnSync("taskset", ["--version"], { stdio: "ignore" }).status === 0

/** Pins every thread of this process to `cpu`; threads created later inherit the mask. */
export const pinSelf = (cpu: number): void => {
  execFileSync("taskset", ["-a", "-p", "-c", String(cpu), String(process.pid)], { stdio: "ignore" })
}

/** A TCP port that was free on 127.0.0.1 a moment ago. */
export const freePort = (): Promise<number> =>
  new Promise((resolve, reject) => {
    const server = createServer()
    server.once("error", reject)
    server.listen(0, "127.0.0.1", () => {
      const address = server.address()
      const port = typeof address === "object" && address !== null ? address.port : 0
      server.close(() => (port > 0 ? resolve(port) : reject(new Error("no free port"))))
    })
  })

const tailLimit = 8192

/** Starts `node <script>`, pinned with taskset when `cpu` is set. */
export const spawnNode = (options: SpawnOptions): { proc: Proc; child: ChildProcess } => {
  const loader = options.script.endsWith(".ts") ? ["--import", "tsx"] : []
  const nodeArgs = [...(options.nodeArgs ?? []), ...loader, options.script, ...(options.args ?? [])]
  const [command, args] =
    options.cpu === undefined
      ? [process.execPath, nodeArgs]
      : ["taskset", ["-c", String(options.cpu), process.execPath, ...nodeArgs]]
  const stdout = options.stdout === "pipe" ? "pipe" : openSync(options.stdout, "a")
  // taskset execs node in place, so the child's pid is the node process's pid.
  const child = spawn(command, args, {
    cwd: options.cwd,
    env: { ...process.env, ...options.env },
    stdio: ["ignore", stdout, "pipe"]
  })
  if (typeof stdout === "number") closeSync(stdout)
  if (child.pid === undefined) throw new Error(`${options.name}: could not start ${command}`)
  const pid = child.pid
  let tail = ""
  child.stderr?.setEncoding("utf8")
  child.stderr?.on("data", (chunk: string) => {
    tail = (tail + chunk).slice(-tailLimit)
  })
  let exitCode: number | null | undefined
  const exited = new Promise<number | null>((resolve) => {
    child.once("exit", (code) => {
      exitCode = code
      resolve(code)
    })
  })
  const stop = async (): Promise<void> => {
    if (exitCode !== undefined) return
    child.kill("SIGTERM")
    const timer = setTimeout(() => {
      if (exitCode === undefined) child.kill("SIGKILL")
    }, 5000)
    await exited
    clearTimeout(timer)
  }
  return { proc: { name: options.name, pid, exited, stop, stderrTail: () => tail }, child }
}

const withTimeout = <A>(promise: Promise<A>, ms: number, what: string): Promise<A> => {
  let timer: NodeJS.Timeout | undefined
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms: ${what}`)), ms)
  })
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer))
}

export interface SimOptions {
  readonly cwd: string
  readonly model: string
  readonly ttftMs: number
  readonly itlMs: number
  readonly outputTokens: number
  readonly capacity: number
  readonly cpu: number | undefined
}

/** Starts the simulated backend on an ephemeral port; resolves once it prints its listening line. */
export const startSim = async (options: SimOptions): Promise<{ proc: Proc; url: string }> => {
  const { proc, child } = spawnNode({
    name: "backend-sim",
    cwd: options.cwd,
    script: "services/backend-sim/src/main.ts",
    args: [
      "--port",
      "0",
      "--model",
      options.model,
      "--ttft-ms",
      String(options.ttftMs),
      "--itl-ms",
      String(options.itlMs),
      "--output-tokens",
      String(options.outputTokens),
      "--capacity",
      String(options.capacity)
    ],
    cpu: options.cpu,
    stdout: "pipe"
  })
  const listening = new Promise<string>((resolve, reject) => {
    let buffered = ""
    child.stdout?.setEncoding("utf8")
    child.stdout?.on("data", (chunk: string) => {
      buffered += chunk
      const newline = buffered.indexOf("\n")
      if (newline < 0) return
      try {
        const line = JSON.parse(buffered.slice(0, newline)) as { url?: unknown }
        if (typeof line.url === "string") resolve(line.url)
        else reject(new Error(`backend-sim: unexpected first line ${buffered.slice(0, newline)}`))
      } catch (error) {
        reject(error)
      }
      // Keep draining (and discarding) anything else so the pipe never fills.
      buffered = ""
      child.stdout?.removeAllListeners("data")
      child.stdout?.resume()
    })
    proc.exited.then((code) => reject(new Error(`backend-sim exited (${code}): ${proc.stderrTail()}`)))
  })
  try {
    const url = await withTimeout(listening, 30_000, "backend-sim to listen")
    return { proc, url }
  } catch (error) {
    await proc.stop()
    throw error
  }
}

export interface GatewayOptions {
  readonly cwd: string
  readonly configPath: string
  readonly port: number
  readonly logLevel: string
  /** Where the gateway's stdout (its JSON request log at info) goes. */
  readonly stdout: string
  readonly cpu: number | undefined
  /** Extra flags of node for the gateway process (e.g. `--trace-gc`). */
  readonly nodeArgs?: ReadonlyArray<string>
  /** Extra environment of the gateway (e.g. `DATABASE_URL`, `GATEWAY_RECORDING`). */
  readonly env?: Readonly<Record<string, string>>
  /** Build the bundle first (default true); false when it was just built for another gateway. */
  readonly build?: boolean
  /** The bundle to run (default `services/gateway/dist/main.mjs`), e.g. a copy taken earlier. */
  readonly script?: string
}

/**
 * Builds the gateway as it runs in production (`services/gateway/dist/main.mjs`, plain node, no
 * TypeScript loader), starts it and resolves once `GET /health` answers 200.
 */
export const startGateway = async (options: GatewayOptions): Promise<{ proc: Proc; url: string }> => {
  if (options.build !== false) {
    execFileSync(process.execPath, ["services/gateway/build.mjs"], { cwd: options.cwd, stdio: "inherit" })
  }
  const { proc } = spawnNode({
    name: "gateway",
    cwd: options.cwd,
    script: options.script ?? "services/gateway/dist/main.mjs",
    env: {
      ...options.env,
      GATEWAY_CONFIG: options.configPath,
      PORT: String(options.port),
      HOST: "127.0.0.1",
      LOG_LEVEL: options.logLevel
    },
    nodeArgs: options.nodeArgs ?? [],
    cpu: options.cpu,
    stdout: options.stdout
  })
  const url = `http://127.0.0.1:${options.port}`
  let exited = false
  proc.exited.then(() => {
    exited = true
  })
  const deadline = performance.now() + 30_000
  while (performance.now() < deadline && !exited) {
    try {
      const res = await fetch(`${url}/health`, { signal: AbortSignal.timeout(1000) })
      await res.arrayBuffer()
      if (res.status === 200) return { proc, url }
    } catch {
      // not listening yet
    }
    await new Promise((resolve) => setTimeout(resolve, 100))
  }
  const reason = exited ? `gateway exited: ${proc.stderrTail()}` : "gateway /health not 200 within 30 s"
  await proc.stop()
  throw new Error(reason)
}

let clockTicks: number | undefined
const ticksPerSecond = (): number => {
  if (clockTicks === undefined) {
    try {
      clockTicks = Number(execFileSync("getconf", ["CLK_TCK"], { encoding: "utf8" }).trim()) || 100
    } catch {
      clockTicks = 100
    }
  }
  return clockTicks
}

/** User + system CPU time of a process (all its threads) in ms, from `/proc/<pid>/stat`. */
export const cpuTimeMs = (pid: number): number => {
  const stat = readFileSync(`/proc/${pid}/stat`, "utf8")
  // Fields after the command name (which may contain spaces) start at state, field 3.
  const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ")
  const utime = Number(fields[11])
  const stime = Number(fields[12])
  return ((utime + stime) * 1000) / ticksPerSecond()
}

export interface SystemCpu {
  /** CPU time spent by every process and interrupt of the machine (all CPUs), ms. */
  readonly busyMs: number
  /** Time the hypervisor gave to other guests while this one wanted to run, ms. */
  readonly stealMs: number
}

/** Machine-wide CPU time from the `cpu` line of `/proc/stat`. */
export const systemCpu = (): SystemCpu => {
  const line = readFileSync("/proc/stat", "utf8").split("\n", 1)[0]!
  // cpu user nice system idle iowait irq softirq steal ...
  const [user, nice, system, , , irq, softirq, steal] = line.trim().split(/\s+/).slice(1).map(Number)
  const ms = (ticks: number) => (ticks * 1000) / ticksPerSecond()
  return {
    busyMs: ms(user! + nice! + system! + irq! + softirq!),
    stealMs: ms(steal ?? 0)
  }
}

/** A `kB` field of `/proc/<pid>/status` (VmRSS, VmHWM, ...), in kB; undefined when unreadable. */
export const statusKb = (pid: number, field: string): number | undefined => {
  try {
    const status = readFileSync(`/proc/${pid}/status`, "utf8")
    const match = new RegExp(`^${field}:\\s+(\\d+) kB`, "m").exec(status)
    return match === null ? undefined : Number(match[1])
  } catch {
    return undefined
  }
}

/**
 * Peak resident memory of a process over a window: VmRSS polled every `intervalMs`, and VmHWM when
 * the kernel let us reset it at the start (writing 5 to `/proc/<pid>/clear_refs`).
 */
export const watchPeakRss = (pid: number, intervalMs = 50): { stop(): number | undefined } => {
  let hwmReset = false
  try {
    writeFileSync(`/proc/${pid}/clear_refs`, "5")
    hwmReset = true
  } catch {
    // not allowed here: polling alone
  }
  let peak = statusKb(pid, "VmRSS") ?? 0
  const timer = setInterval(() => {
    peak = Math.max(peak, statusKb(pid, "VmRSS") ?? 0)
  }, intervalMs)
  return {
    stop: () => {
      clearInterval(timer)
      peak = Math.max(peak, statusKb(pid, "VmRSS") ?? 0)
      if (hwmReset) peak = Math.max(peak, statusKb(pid, "VmHWM") ?? 0)
      return peak > 0 ? peak : undefined
    }
  }
}

/** CPU time used by this process so far, in ms. */
export const selfCpuMs = (): number => {
  const usage = process.cpuUsage()
  return (usage.user + usage.system) / 1000
}

/** A run counts as noisy when other processes (or the hypervisor) took more than this % of a core. */
export const noisyPct = 25

/** CPU time of a process in ms; 0 once it is gone. */
const cpuTimeOr0 = (pid: number): number => {
  try {
    return cpuTimeMs(pid)
  } catch {
    return 0
  }
}

/**
 * CPU used over `sampleMs` by everything but this process and `pids` (the benchmark's own), plus
 * the time the hypervisor stole, in % of one core.
 */
export const otherCpuPct = async (sampleMs: number, pids: ReadonlyArray<number>): Promise<number> => {
  const ours = () => selfCpuMs() + pids.reduce((t, pid) => t + cpuTimeOr0(pid), 0)
  const sys0 = systemCpu()
  const ours0 = ours()
  const t0 = performance.now()
  await new Promise((resolve) => setTimeout(resolve, sampleMs))
  const ours1 = ours()
  const sys1 = systemCpu()
  const elapsed = performance.now() - t0
  return (100 * (sys1.busyMs - sys0.busyMs - (ours1 - ours0) + sys1.stealMs - sys0.stealMs)) / elapsed
}

/** `--wait-quiet`: one budget of waiting for the whole run. */
export interface QuietWaiter {
  /**
   * Waits while other processes use more than `noisyPct` % of a core, until `samples` quiet
   * samples of `sampleMs` in a row; busy samples use up the budget. False when it ran out.
   */
  wait(samples: number, sampleMs: number, pids: ReadonlyArray<number>): Promise<boolean>
  /** Time spent waiting so far, ms. */
  waitedMs(): number
}

export const quietWaiter = (budgetMs: number, log: (line: string) => void): QuietWaiter => {
  let budget = budgetMs
  let waited = 0
  return {
    wait: async (samples, sampleMs, pids) => {
      let quiet = 0
      let logged = false
      while (quiet < samples) {
        if (budget <= 0) return false
        const t0 = performance.now()
        const pct = await otherCpuPct(sampleMs, pids)
        if (pct < noisyPct) quiet++
        else {
          quiet = 0
          const spent = performance.now() - t0
          budget -= spent
          waited += spent
          if (!logged) log(`waiting for other processes to go quiet (${Math.round(pct)}% of a core)`)
          logged = true
        }
      }
      return true
    },
    waitedMs: () => waited
  }
}

/**
 * Ends the run on SIGINT, SIGTERM or once `timeLimitMs` has passed: `stop` cleans up (children,
 * work directory, databases), then the process exits 1 — after 30 s at the latest. `watchdog` is
 * the time limit's timer, to clear when the run ends on its own.
 */
export const guard = (options: {
  readonly log: (line: string) => void
  readonly timeLimitMs: number
  readonly stop: () => Promise<unknown>
}): {
  readonly abort: (reason: string) => void
  /** Whether the run is being stopped by `abort` (its failure is then not the run's own). */
  readonly aborting: () => boolean
  readonly watchdog: ReturnType<typeof setTimeout>
} => {
  let stopping = false
  const abort = (reason: string): void => {
    if (stopping) return
    stopping = true
    options.log(`aborting: ${reason}`)
    setTimeout(() => process.exit(1), 30_000).unref()
    void options.stop().finally(() => process.exit(1))
  }
  process.once("SIGINT", () => abort("SIGINT"))
  process.once("SIGTERM", () => abort("SIGTERM"))
  const watchdog = setTimeout(
    () => abort(`--time-limit of ${options.timeLimitMs / 1000} s reached`),
    options.timeLimitMs
  )
  return { abort, aborting: () => stopping, watchdog }
}

/** The commit measured, and which source files of the gateway's packages differ from it. */
export const treeState = (root: string): string => {
  const git = (...args: ReadonlyArray<string>) => execFileSync("git", args, { cwd: root, encoding: "utf8" })
  try {
    const commit = git("rev-parse", "--short", "HEAD").trim()
    const dirty = git("status", "--porcelain", "--", "packages", "services")
      .split("\n")
      .filter((l) => l.trim() !== "")
      .map((l) => l.slice(3))
      .filter((path) => path.includes("/src/"))
    return dirty.length === 0
      ? `commit ${commit}, packages/*/src and services/*/src clean`
      : `commit ${commit} plus uncommitted changes in ${dirty.join(", ")}`
  } catch {
    return "unknown (git failed)"
  }
}
