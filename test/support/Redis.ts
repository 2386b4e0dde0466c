/**
 * Redis from the tests, without a client library: one command per connection over a minimal
 * RESP codec (enough for PING, SCAN, DEL), the gateway's limiter keys of one API key, and a private
 * `redis-server` on its own port that a test may freeze, kill and start afresh — the machine's
 * shared Redis is never stopped.
 */
import { type ChildProcess, spawn } from "node:child_process"
import * as Net from "node:net"
import * as Os from "node:os"
import { Effect, Option, type Scope } from "effect"
import { eventually, freePort } from "./Processes.js"

/** The shared Redis the gateways' limits live in (`TEST_REDIS_URL`, the local one by default). */
export const sharedUrl = process.env.TEST_REDIS_URL ?? "redis://127.0.0.1:6379"

/** A RESP reply: simple or bulk string, integer, nil, array, or the server's error. */
export type Reply = string | number | null | Error | ReadonlyArray<Reply>

const encode = (args: ReadonlyArray<string | number>): string =>
  `*${args.length}\r\n${args
    .map((arg) => {
      const s = String(arg)
      return `$${Buffer.byteLength(s)}\r\n${s}\r\n`
    })
    .join("")}`

/** One reply starting at `at`, and where it ends; `undefined` while it is incomplete. */
const decode = (buf: Buffer, at: number): { readonly value: Reply; readonly next: number } | undefined => {
  const eol = buf.indexOf("\r\n", at)
  if (eol === -1) return undefined
  const line = buf.toString("utf8", at + 1, eol)
  const after = eol + 2
  switch (String.fromCharCode(buf[at]!)) {
    case "+":
      return { value: line, next: after }
    case "-":
      return { value: new Error(line), next: after }
    case ":":
      return { value: Number(line), next: after }
    case "$": {
      const length = Number(line)
      if (length < 0) return { value: null, next: after }
      if (buf.length < after + length + 2) return undefined
      return { value: buf.toString("utf8", after, after + length), next: after + length + 2 }
    }
    case "*": {
      const count = Number(line)
      if (count < 0) return { value: null, next: after }
      const items: Array<Reply> = []
      let next = after
      for (let i = 0; i < count; i++) {
        const item = decode(buf, next)
        if (item === undefined) return undefined
        items.push(item.value)
        next = item.next
      }
      return { value: items, next }
    }
    default:
      throw new Error(`not a RESP reply: ${JSON.stringify(buf.toString("utf8", at, eol))}`)
  }
}

const target = (url: string) => {
  const parsed = new URL(url)
  return { host: parsed.hostname || "127.0.0.1", port: Number(parsed.port || 6379) }
}

/** Sends one command on a fresh connection; fails when Redis cannot be reached in time. */
export const command = (url: string, ...args: ReadonlyArray<string | number>): Effect.Effect<Reply, Error> =>
  Effect.async<Reply, Error>((resume) => {
    const { host, port } = target(url)
    const socket = Net.connect(port, host)
    let buf = Buffer.alloc(0)
    let done = false
    const finish = (result: Effect.Effect<Reply, Error>) => {
      if (done) return
      done = true
      socket.destroy()
      resume(result)
    }
    socket.setTimeout(2000, () => finish(Effect.fail(new Error(`redis ${url}: no answer within 2 s`))))
    socket.on("error", (error) => finish(Effect.fail(error)))
    socket.on("close", () => finish(Effect.fail(new Error(`redis ${url}: connection closed`))))
    socket.on("data", (chunk) => {
      buf = Buffer.concat([buf, chunk])
      try {
        const reply = decode(buf, 0)
        if (reply !== undefined) finish(Effect.succeed(reply.value))
      } catch (error) {
        finish(Effect.fail(error as Error))
      }
    })
    socket.write(encode(args))
    return Effect.sync(() => socket.destroy())
  })

/** Every key matching the glob `pattern` (SCAN, so Redis is never blocked). */
export const keys = (url: string, pattern: string): Effect.Effect<ReadonlyArray<string>> =>
  Effect.gen(function* () {
    const found: Array<string> = []
    let cursor = "0"
    do {
      const reply = yield* command(url, "SCAN", cursor, "MATCH", pattern, "COUNT", 1000)
      if (!Array.isArray(reply)) return yield* Effect.dieMessage(`SCAN: unexpected reply ${String(reply)}`)
      cursor = String(reply[0])
      found.push(...(reply[1] as ReadonlyArray<string>))
    } while (cursor !== "0")
    return found
  }).pipe(Effect.orDie)

/** The gateway's limiter keys (`gw:rl:` prefix) of one API key or tenant id. */
export const limiterKeysOf = (url: string, id: string): Effect.Effect<ReadonlyArray<string>> =>
  keys(url, `gw:rl:*${id}*`)

/** Deletes the gateway's limiter keys of these API key or tenant ids; a cleanup, so it never fails. */
export const dropLimiterKeys = (url: string, ids: ReadonlyArray<string>): Effect.Effect<void> =>
  Effect.forEach(
    ids,
    (id) =>
      Effect.flatMap(limiterKeysOf(url, id), (found) =>
        found.length === 0 ? Effect.void : Effect.orDie(command(url, "DEL", ...found))
      ),
    { discard: true }
  ).pipe(Effect.catchAllDefect(() => Effect.void))

// ---------------------------------------------------------------------------------------------
// A private redis-server
// ---------------------------------------------------------------------------------------------

export interface PrivateRedis {
  readonly port: number
  readonly url: string
  /** The running server's PID. */
  readonly pid: () => number
  /** SIGSTOP: connections stay open and every command hangs, as on a frozen or partitioned host. */
  readonly freeze: Effect.Effect<void>
  /** SIGCONT: a frozen server runs again, and executes what it was sent meanwhile. */
  readonly thaw: Effect.Effect<void>
  /** Kills the server (SIGKILL, all data gone) and starts an empty one on the same port. */
  readonly restart: Effect.Effect<void>
}

const signal = (proc: ChildProcess, name: NodeJS.Signals) => {
  try {
    proc.kill(name)
  } catch {
    // Already gone.
  }
}

const exited = (proc: ChildProcess, ms: number): Effect.Effect<boolean> =>
  proc.exitCode !== null || proc.signalCode !== null
    ? Effect.succeed(true)
    : Effect.async<boolean>((resume) => {
        const onExit = () => resume(Effect.succeed(true))
        proc.once("exit", onExit)
        return Effect.sync(() => proc.off("exit", onExit))
      }).pipe(Effect.interruptible, Effect.timeoutOption(ms), Effect.map(Option.isSome))

/**
 * Starts `redis-server` on a free loopback port, keeping nothing on disk; stopped (by its PID)
 * when the scope closes, whatever state a test left it in.
 */
export const startPrivate: Effect.Effect<PrivateRedis, never, Scope.Scope> = Effect.gen(function* () {
  const port = yield* freePort
  const url = `redis://127.0.0.1:${port}`
  const output: Array<string> = []
  let current: ChildProcess | undefined

  const launch = Effect.gen(function* () {
    const proc = spawn(
      "redis-server",
      ["--port", String(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
      { cwd: Os.tmpdir(), stdio: ["ignore", "pipe", "pipe"] }
    )
    proc.on("error", (error) => output.push(`spawn error: ${error.message}`))
    proc.stdout?.on("data", (chunk: Buffer) => output.push(chunk.toString()))
    proc.stderr?.on("data", (chunk: Buffer) => output.push(chunk.toString()))
    current = proc
    yield* eventually(
      `redis-server on port ${port} answers PING`,
      Effect.suspend(() =>
        proc.exitCode !== null
          ? Effect.dieMessage(`redis-server exited with ${proc.exitCode}:\n${output.join("")}`)
          : command(url, "PING").pipe(
              Effect.map((reply) => (reply === "PONG" ? true : undefined)),
              Effect.orElseSucceed(() => undefined)
            )
      ),
      "10 seconds"
    )
  })

  const kill = Effect.suspend(() => {
    const proc = current
    if (proc === undefined) return Effect.void
    current = undefined
    signal(proc, "SIGKILL")
    return Effect.asVoid(exited(proc, 5000))
  })

  const stop = Effect.suspend(() => {
    const proc = current
    if (proc === undefined) return Effect.void
    // A frozen server only acts on SIGTERM once it runs again.
    signal(proc, "SIGCONT")
    signal(proc, "SIGTERM")
    return Effect.flatMap(exited(proc, 3000), (gone) => (gone ? Effect.void : kill))
  })

  yield* Effect.acquireRelease(launch, () => stop)
  return {
    port,
    url,
    pid: () => current?.pid ?? -1,
    freeze: Effect.sync(() => {
      if (current !== undefined) signal(current, "SIGSTOP")
    }),
    thaw: Effect.sync(() => {
      if (current !== undefined) signal(current, "SIGCONT")
    }),
    restart: Effect.zipRight(kill, launch)
  }
})
