/**
 * Real processes for the end-to-end tests: the simulated backend and the gateway, each started
 * from the repository root (as a bundle built for the run: see Programs.ts), waited for on `GET /health`, and
 * stopped by PID (SIGTERM, then SIGKILL after a grace period) when their scope closes. A test file
 * starts its processes once, in a scoped layer (`layer(..., { excludeTestServices: true })`).
 */
import { spawn } from "node:child_process"
import * as Fs from "node:fs/promises"
import * as Net from "node:net"
import * as Os from "node:os"
import * as Path from "node:path"
import * as Readline from "node:readline"
import { Database } from "@gateway/event-store"
import { Duration, Effect, Option, type Scope } from "effect"
import type { SimConfig, SimServer } from "../../services/backend-sim/src/index.js"
import * as Programs from "./Programs.js"

const graceMs = 3000
const startDeadline: Duration.DurationInput = "20 seconds"

/**
 * Polls `check` every 10 ms until it returns a value (not `undefined`), or dies naming `what`
 * once `timeout` has passed.
 */
export const eventually = <A, E, R>(
  what: string,
  check: Effect.Effect<A | undefined, E, R>,
  timeout: Duration.DurationInput = "3 seconds"
): Effect.Effect<A, E, R> => {
  const poll: Effect.Effect<A, E, R> = Effect.flatMap(check, (value) =>
    value === undefined ? Effect.zipRight(Effect.sleep("10 millis"), poll) : Effect.succeed(value)
  )
  return poll.pipe(
    Effect.timeoutOption(timeout),
    Effect.flatMap(
      Option.match({
        onNone: () => Effect.dieMessage(`not reached within ${Duration.format(timeout)}: ${what}`),
        onSome: Effect.succeed
      })
    )
  )
}

/** A TCP port the kernel had free on 127.0.0.1 a moment ago. */
const unusedPort: Effect.Effect<number> = Effect.async((resume) => {
  const server = Net.createServer()
  server.once("error", (error) => resume(Effect.die(error)))
  server.listen(0, "127.0.0.1", () => {
    const address = server.address()
    const port = typeof address === "object" && address !== null ? address.port : 0
    server.close(() => resume(port > 0 ? Effect.succeed(port) : Effect.dieMessage("no free port")))
  })
})

/**
 * Ports handed out to any test worker, as files created exclusively: between a port being found
 * free and a process listening on it there are seconds (a gateway's start), in which the kernel
 * can give the same port to another worker, whose health check would then reach the wrong process.
 * A reservation older than `reservationMs` is stale (a run that ended): it is renamed away (one
 * worker wins the rename) and the port reserved again. One directory per user.
 */
const reservations = Path.join(Os.tmpdir(), `gateway-test-ports-${Os.userInfo().uid}`)
const reservationMs = 30 * 60_000

const code = (error: unknown) => (error as { readonly code?: unknown }).code

const reserve = (port: number): Effect.Effect<boolean> =>
  Effect.promise(async () => {
    await Fs.mkdir(reservations, { recursive: true })
    const file = Path.join(reservations, String(port))
    const create = () =>
      Fs.open(file, "wx").then(
        (handle) => handle.close().then(() => true),
        (error) => {
          if (code(error) === "EEXIST") return false
          throw error
        }
      )
    if (await create()) return true
    const stat = await Fs.stat(file).catch(() => undefined)
    if (stat === undefined || Date.now() - stat.mtimeMs < reservationMs) return false
    const moved = await Fs.rename(file, `${file}.stale-${process.pid}-${Date.now()}`).then(
      () => true,
      () => false
    )
    return moved && (await create())
  })

/** A TCP port free on 127.0.0.1 a moment ago and handed to no other test worker of this run. */
export const freePort: Effect.Effect<number> = Effect.gen(function* () {
  for (let tries = 0; tries < 50; tries++) {
    const port = yield* unusedPort
    if (yield* reserve(port)) return port
  }
  return yield* Effect.dieMessage("no free port that another test worker had not taken")
})

/** A temporary directory, removed with its content when the scope closes. */
export const tempDir: Effect.Effect<string, never, Scope.Scope> = Effect.acquireRelease(
  Effect.promise(() => Fs.mkdtemp(Path.join(Os.tmpdir(), "gateway-e2e-"))),
  (dir) => Effect.promise(() => Fs.rm(dir, { recursive: true, force: true }))
)

/** A child process; its output is kept line by line for assertions and error messages. */
export interface Child {
  readonly name: string
  readonly pid: number
  readonly stdout: ReadonlyArray<string>
  readonly stderr: ReadonlyArray<string>
  /** The exit code (null when ended by a signal), or undefined while it runs. */
  readonly exitCode: () => number | null | undefined
  /** Resolves once the process has exited and its output has been read to the end. */
  readonly exited: Promise<number | null>
  /** Everything it wrote, for error messages. */
  readonly output: () => string
}

const signal = (pid: number, name: NodeJS.Signals) => {
  try {
    process.kill(pid, name)
  } catch {
    // Already gone.
  }
}

/** Waits up to `ms` for the process to exit; interruptible even inside a finalizer. */
const awaitExit = (child: Child, ms: number): Effect.Effect<boolean> =>
  Effect.promise(() => child.exited).pipe(
    Effect.interruptible,
    Effect.timeoutOption(ms),
    Effect.map(Option.isSome)
  )

/** SIGTERM, then SIGKILL if the process is still there after the grace period. */
const stop = (child: Child): Effect.Effect<void> =>
  Effect.gen(function* () {
    if (child.exitCode() !== undefined) return
    signal(child.pid, "SIGTERM")
    if (yield* awaitExit(child, graceMs)) return
    console.warn(`${child.name} (pid ${child.pid}) ignored SIGTERM for ${graceMs} ms: sending SIGKILL`)
    signal(child.pid, "SIGKILL")
    yield* awaitExit(child, 2000)
  })

/**
 * Starts the program `script` (its bundle, or the source through tsx: see Programs.ts) with `args`
 * in the repository root; stopped when the scope closes. The environment is this process's
 * without `NODE_OPTIONS` and `SIM_*` (which would change the simulator's defaults), plus `env`.
 */
export const spawnNode = (
  name: string,
  script: string,
  args: ReadonlyArray<string>,
  env: Readonly<Record<string, string>> = {}
): Effect.Effect<Child, never, Scope.Scope> =>
  Effect.acquireRelease(
    Effect.sync(() => {
      const inherited = Object.fromEntries(
        Object.entries(process.env).filter(([key]) => key !== "NODE_OPTIONS" && !key.startsWith("SIM_"))
      )
      const proc = spawn(process.execPath, Programs.nodeArgs(script, args), {
        cwd: Programs.root,
        env: { ...inherited, ...env },
        stdio: ["ignore", "pipe", "pipe"]
      })
      const pid = proc.pid
      if (pid === undefined) throw new Error(`${name}: could not start ${process.execPath}`)
      const stdout: Array<string> = []
      const stderr: Array<string> = []
      proc.on("error", (error) => stderr.push(`spawn error: ${error.message}`))
      Readline.createInterface({ input: proc.stdout }).on("line", (line) => stdout.push(line))
      Readline.createInterface({ input: proc.stderr }).on("line", (line) => stderr.push(line))
      let code: number | null | undefined
      // `close` comes after `exit` once stdout and stderr have ended: the output is complete.
      const exited = new Promise<number | null>((resolve) =>
        proc.once("close", (c) => {
          code = c
          resolve(c)
        })
      )
      return {
        name,
        pid,
        stdout,
        stderr,
        exitCode: () => code,
        exited,
        output: () => [...stdout, ...stderr].join("\n")
      } satisfies Child
    }),
    stop
  )

/** Waits until `GET url/health` answers 200; dies with the process's output if it exits first. */
const waitHealthy = (child: Child, url: string): Effect.Effect<void> =>
  eventually(
    `${child.name} answers GET ${url}/health`,
    Effect.suspend(() => {
      if (child.exitCode() !== undefined) {
        return Effect.dieMessage(`${child.name} exited with ${child.exitCode()}:\n${child.output()}`)
      }
      return Effect.promise(() =>
        fetch(`${url}/health`, { signal: AbortSignal.timeout(1000) }).then(
          async (res) => {
            await res.arrayBuffer()
            return res.status === 200 ? true : undefined
          },
          () => undefined
        )
      )
    }),
    startDeadline
  ).pipe(Effect.asVoid)

const getJson = (url: string): Effect.Effect<any> =>
  Effect.promise(() =>
    fetch(url).then((res) => {
      if (!res.ok) throw new Error(`GET ${url}: HTTP ${res.status}`)
      return res.json()
    })
  )

const postJson = (url: string, body: unknown): Effect.Effect<any> =>
  Effect.promise(() =>
    fetch(url, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify(body)
    }).then(async (res) => {
      if (!res.ok) throw new Error(`POST ${url}: HTTP ${res.status} ${await res.text()}`)
      return res.json()
    })
  )

// ---------------------------------------------------------------------------------------------
// The simulated backend
// ---------------------------------------------------------------------------------------------

export interface Sim {
  readonly url: string
  readonly child: Child
  readonly stats: Effect.Effect<SimServer.SimStats>
  /**
   * Applies `patch` (`POST /sim/config`) for the rest of the current scope, then puts the patched
   * options back as they were: use it in `it.scoped`.
   */
  readonly withConfig: (patch: SimConfig.SimOptionsPatch) => Effect.Effect<void, never, Scope.Scope>
}

const kebab = (key: string) => key.replace(/[A-Z]/g, (c) => `-${c.toLowerCase()}`)

/**
 * Starts the simulator on `options.port` (a free port when not given) with these start-up flags
 * (`ttftMs: 50` is `--ttft-ms 50`; `refuseConnections`, a bare flag, is left to `withConfig`).
 */
export const startSim = (
  options: Omit<SimConfig.SimOptionsPatch, "refuseConnections">
): Effect.Effect<Sim, never, Scope.Scope> =>
  Effect.gen(function* () {
    const port = options.port ?? (yield* freePort)
    const flags = Object.entries({ ...options, port, host: "127.0.0.1" }).flatMap(([key, value]) =>
      value === undefined ? [] : [`--${kebab(key)}`, String(value)]
    )
    const child = yield* spawnNode("backend-sim", "services/backend-sim/src/main.ts", flags)
    const url = `http://127.0.0.1:${port}`
    yield* waitHealthy(child, url)
    const configure = (patch: Record<string, unknown>) => postJson(`${url}/sim/config`, patch)
    return {
      url,
      child,
      stats: getJson(`${url}/sim/stats`),
      withConfig: (patch) =>
        Effect.acquireRelease(
          Effect.gen(function* () {
            const before: Record<string, unknown> = yield* getJson(`${url}/sim/config`)
            yield* configure(patch)
            // An option that was unset is cleared with null.
            return Object.fromEntries(Object.keys(patch).map((key) => [key, before[key] ?? null]))
          }),
          (restore) => configure(restore)
        ).pipe(Effect.asVoid)
    } satisfies Sim
  })

// ---------------------------------------------------------------------------------------------
// The gateway
// ---------------------------------------------------------------------------------------------

/** One JSON line of the gateway's stdout (its access log has `msg: "request"`). */
export type LogLine = Record<string, unknown>

export interface Gateway {
  readonly url: string
  readonly child: Child
  /** The database the gateway records its events into (dropped when the scope closes). */
  readonly databaseUrl: string
  /** Every stdout line so far that is a JSON object. */
  readonly logs: () => ReadonlyArray<LogLine>
  /** Waits (3 s by default) for the access-log line of the request with this `x-request-id`. */
  readonly accessLog: (requestId: string, timeout?: Duration.DurationInput) => Effect.Effect<LogLine>
}

const adminDatabaseUrl = process.env.TEST_DATABASE_URL ?? "postgres://postgres@127.0.0.1:5432/postgres"

const parseLine = (line: string): Array<LogLine> => {
  try {
    const value: unknown = JSON.parse(line)
    return typeof value === "object" && value !== null ? [value as LogLine] : []
  } catch {
    return []
  }
}

/**
 * A `pool` section that makes every request exactly one attempt on its one replica: no retry,
 * no breaker, no ejection. For suites about what one attempt does (errors, recording, billing),
 * whose faults would otherwise open breakers and change what the next test sees.
 */
export const singleAttempt = {
  retry: { max_attempts: 1 },
  circuit_breaker: { consecutive_failures: 1_000_000, minimum_requests: 1_000_000 },
  health: { active: false, eject_after_failures: 0 }
} as const

/** Writes `config` as JSON into a temporary directory (removed with the scope); returns its path. */
export const writeConfig = (config: unknown): Effect.Effect<string, never, Scope.Scope> =>
  Effect.gen(function* () {
    const path = Path.join(yield* tempDir, "gateway.json")
    yield* Effect.promise(() => Fs.writeFile(path, JSON.stringify(config, null, 2)))
    return path
  })

/**
 * Without a database the gateway runs with recording off (tests of start-up failures). API keys
 * are off unless a test is about them (`GATEWAY_AUTH: "on"` in its `env`).
 */
const gatewayEnv = (configPath: string, port: number, databaseUrl?: string) => ({
  GATEWAY_CONFIG: configPath,
  GATEWAY_AUTH: "off",
  ...(databaseUrl === undefined ? { GATEWAY_RECORDING: "off" } : { DATABASE_URL: databaseUrl }),
  PORT: String(port),
  HOST: "127.0.0.1",
  LOG_LEVEL: "info"
})

/**
 * Starts the gateway with `config` (the file format, snake_case) on a free loopback port, with
 * `env` over the defaults (e.g. `GATEWAY_AUTH`, `ADMIN_KEY`, `REDIS_URL`).
 */
export const startGateway = (
  config: unknown,
  env: Readonly<Record<string, string>> = {}
): Effect.Effect<Gateway, never, Scope.Scope> =>
  Effect.gen(function* () {
    const configPath = yield* writeConfig(config)
    const port = yield* freePort
    // Each gateway records into a database and a spool directory of its own.
    const databaseUrl = yield* Database.freshPostgres(adminDatabaseUrl)
    const spoolDir = yield* tempDir
    const child = yield* spawnNode("gateway", "services/gateway/src/main.ts", [], {
      ...gatewayEnv(configPath, port, databaseUrl),
      SPOOL_DIR: spoolDir,
      ...env
    })
    return yield* healthyGateway(child, port, databaseUrl)
  })

/** The PostgreSQL server the tests' databases live on (`TEST_DATABASE_URL`, the local one by default). */
export const testDatabaseServer = adminDatabaseUrl

/** A fresh database on the test server, dropped when the scope closes; returns its URL. */
export const freshDatabase: Effect.Effect<string, never, Scope.Scope> =
  Database.freshPostgres(adminDatabaseUrl)

/**
 * Starts the gateway with `config` on a database and spool directory the caller owns, so that a
 * test can restart it on the same ones (after killing it) or point it at a proxy of the database.
 * `databaseUrl` is what the gateway is given (the database itself, or a proxy in front of it).
 */
export const startGatewayOn = (
  config: unknown,
  options: {
    readonly databaseUrl: string
    readonly spoolDir: string
    readonly env?: Readonly<Record<string, string>>
  }
): Effect.Effect<Gateway, never, Scope.Scope> =>
  Effect.gen(function* () {
    const configPath = yield* writeConfig(config)
    const port = yield* freePort
    const child = yield* spawnNode("gateway", "services/gateway/src/main.ts", [], {
      ...gatewayEnv(configPath, port, options.databaseUrl),
      SPOOL_DIR: options.spoolDir,
      ...options.env
    })
    return yield* healthyGateway(child, port, options.databaseUrl)
  })

/** Waits for the started gateway to answer `/health`, then describes it. */
const healthyGateway = (child: Child, port: number, databaseUrl: string): Effect.Effect<Gateway> =>
  Effect.gen(function* () {
    const url = `http://127.0.0.1:${port}`
    yield* waitHealthy(child, url)
    const logs = () => child.stdout.flatMap(parseLine)
    return {
      url,
      child,
      databaseUrl,
      logs,
      accessLog: (requestId, timeout) =>
        eventually(
          `access log line of request ${requestId}`,
          Effect.sync(() =>
            logs().find(
              (l) => l.msg === "request" && (l.request_id === requestId || l.client_request_id === requestId)
            )
          ),
          timeout
        )
    } satisfies Gateway
  })

/** Runs the gateway on the config file at `configPath` until it exits on its own (within `timeout`). */
export const runGatewayToExit = (
  configPath: string,
  timeout: Duration.DurationInput = "20 seconds"
): Effect.Effect<{ readonly code: number | null; readonly output: string }, never, Scope.Scope> =>
  Effect.gen(function* () {
    const port = yield* freePort
    const child = yield* spawnNode(
      "gateway",
      "services/gateway/src/main.ts",
      [],
      gatewayEnv(configPath, port)
    )
    const exited = yield* awaitExit(child, Duration.toMillis(timeout))
    if (!exited) {
      return yield* Effect.dieMessage(
        `the gateway still runs after ${Duration.format(timeout)}:\n${child.output()}`
      )
    }
    return { code: child.exitCode() ?? null, output: child.output() }
  })
