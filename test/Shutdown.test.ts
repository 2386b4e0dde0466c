/**
 * A gateway told to stop (SIGTERM) in the middle of streamed answers: it closes its listening
 * socket at once, lets the answers in flight finish (up to `server.shutdown_grace_ms`), puts
 * every one of them on the books, and exits 0. Past the grace period the answers still running
 * are cut, recorded as ended early, and the process exits all the same.
 */
import * as Net from "node:net"
import { expect, layer } from "@effect/vitest"
import { Events } from "@gateway/domain"
import { Context, Duration, Effect, Layer, Option } from "effect"
import * as EventLog from "./support/EventLog.js"
import { messages, postChat } from "./support/Http.js"
import * as Processes from "./support/Processes.js"

/** Tokens of a streamed answer, and the time between two of them. */
const tokens = 25
const itlMs = 120
/** About how long one answer streams: 3 s. */
const answerMs = tokens * itlMs

class Stack extends Context.Tag("test/Shutdown/Stack")<Stack, { readonly sim: Processes.Sim }>() {
  static readonly layer = Layer.scoped(
    Stack,
    Effect.gen(function* () {
      const sim = yield* Processes.startSim({
        model: "slow",
        ttftMs: 20,
        itlMs,
        outputTokens: tokens,
        seed: 7
      })
      return { sim }
    })
  )
}

const gatewayConfig = (simUrl: string, server: Record<string, unknown> = {}) => ({
  server: { host: "127.0.0.1", ...server },
  pool: Processes.singleAttempt,
  metering: { drain_after_disconnect_ms: 300 },
  models: [{ name: "slow", backends: [{ id: "slow-1", url: simUrl }] }]
})

/** A streamed answer being read: its request id, and the rest of it once it has ended. */
interface OpenStream {
  readonly requestId: string
  /** Everything the client received, and when the body ended (`performance.now()`). */
  readonly rest: Promise<{ readonly text: string; readonly endedAt: number; readonly error?: string }>
}

/** Sends a streamed request and resolves once its first `data:` event has arrived. */
const openStream = (url: string): Effect.Effect<OpenStream> =>
  Effect.gen(function* () {
    const res = yield* postChat(url, { model: "slow", stream: true, messages })
    expect(res.status).toBe(200)
    const requestId = res.headers.get("x-gateway-request-id")!
    const reader = res.body!.getReader()
    const decoder = new TextDecoder()
    let text = ""
    while (!text.includes("data: ")) {
      const { done, value } = yield* Effect.promise(() => reader.read())
      if (done) return yield* Effect.dieMessage(`the stream ended before its first event:\n${text}`)
      text += decoder.decode(value, { stream: true })
    }
    const rest = (async () => {
      try {
        for (;;) {
          const { done, value } = await reader.read()
          if (done) break
          text += decoder.decode(value, { stream: true })
        }
        return { text, endedAt: performance.now() }
      } catch (error) {
        return { text, endedAt: performance.now(), error: String(error) }
      }
    })()
    return { requestId, rest }
  })

/** The content chunks of an SSE body, and whether it ended with `[DONE]`. */
const parse = (text: string) => {
  const data = text
    .split("\n\n")
    .filter((event) => event.startsWith("data: "))
    .map((event) => event.slice("data: ".length))
  const chunks = data.filter((d) => d !== "[DONE]").map((d) => JSON.parse(d))
  const content = chunks.filter(
    (c) => typeof c.choices?.[0]?.delta?.content === "string" && c.choices[0].delta.content !== ""
  )
  return {
    content: content.length,
    done: data.at(-1) === "[DONE]",
    errors: chunks.filter((c) => c.error !== undefined)
  }
}

/** Opens a TCP connection to the port: `"connected"`, or the error code (`ECONNREFUSED`). */
const tryConnect = (port: number): Effect.Effect<string> =>
  Effect.async<string>((resume) => {
    const socket = Net.connect({ port, host: "127.0.0.1" })
    socket.once("connect", () => {
      socket.destroy()
      resume(Effect.succeed("connected"))
    })
    socket.once("error", (error: NodeJS.ErrnoException) =>
      resume(Effect.succeed(error.code ?? error.message))
    )
  }).pipe(Effect.timeoutOption("2 seconds"), Effect.map(Option.getOrElse(() => "timed out")))

/** `effect`, or a defect naming `what` once `timeout` has passed. */
const within = <A>(what: string, timeout: Duration.DurationInput, effect: Effect.Effect<A>) =>
  effect.pipe(
    Effect.timeoutOption(timeout),
    Effect.flatMap(
      Option.match({
        onNone: () => Effect.dieMessage(`not within ${Duration.format(timeout)}: ${what}`),
        onSome: Effect.succeed
      })
    )
  )

/** The process's exit code and when it exited (`performance.now()`), within `timeout`. */
const exitOf = (child: Processes.Child, timeout: Duration.DurationInput) =>
  within(
    `the gateway exits after SIGTERM\n${child.output()}`,
    timeout,
    Effect.promise(() => child.exited.then((code) => ({ code, at: performance.now() })))
  )

/** How the streams ended, within `timeout`. */
const endsOf = (streams: ReadonlyArray<OpenStream>, timeout: Duration.DurationInput) =>
  within(
    "the streams end",
    timeout,
    Effect.promise(() => Promise.all(streams.map((s) => s.rest)))
  )

const portOf = (url: string) => Number(new URL(url).port)

/** A streamed request on a raw connection, on which a `GET /ready` can then be pipelined. */
const rawStream = (port: number) =>
  Effect.sync(() => {
    const body = JSON.stringify({ model: "slow", stream: true, messages })
    const socket = Net.connect({ port, host: "127.0.0.1" })
    let received = ""
    const firstEvent = new Promise<void>((resolve) =>
      socket.on("data", (data) => {
        received += data.toString()
        if (received.includes("data: ")) resolve()
      })
    )
    const closed = new Promise<string>((resolve) => socket.on("close", () => resolve(received)))
    socket.on("error", () => {})
    socket.write(
      `POST /v1/chat/completions HTTP/1.1\r\nhost: gateway\r\ncontent-type: application/json\r\ncontent-length: ${Buffer.byteLength(body)}\r\n\r\n${body}`
    )
    return {
      firstEvent: Effect.promise(() => firstEvent),
      askReady: Effect.sync(() => socket.write("GET /ready HTTP/1.1\r\nhost: gateway\r\n\r\n")),
      /** Everything the connection received, once the gateway has closed it. */
      closed: within(
        "the gateway closes the connection",
        "15 seconds",
        Effect.promise(() => closed)
      )
    }
  })

const terminal: ReadonlySet<string> = new Set(Events.terminalTags)

layer(Stack.layer, { excludeTestServices: true, timeout: "60 seconds" })("graceful shutdown", (it) => {
  it.scoped(
    "SIGTERM during streaming: in-flight streams complete, new connections are refused, events flushed",
    () =>
      Effect.gen(function* () {
        const { sim } = yield* Stack
        const gateway = yield* Processes.startGateway(gatewayConfig(sim.url, { shutdown_grace_ms: 20_000 }))
        const log = yield* EventLog.make(gateway.databaseUrl)
        const three = [openStream(gateway.url), openStream(gateway.url), openStream(gateway.url)]
        const streams = yield* Effect.all(three, { concurrency: "unbounded" })

        const signalledAt = performance.now()
        process.kill(gateway.child.pid, "SIGTERM")
        // The listening socket goes at once: a new connection is refused, not queued.
        const refused = yield* Processes.eventually(
          "a new connection to the gateway is refused",
          Effect.map(tryConnect(portOf(gateway.url)), (outcome) =>
            outcome === "ECONNREFUSED" ? performance.now() : undefined
          ),
          "2 seconds"
        )

        const ends = yield* endsOf(streams, "10 seconds")
        for (const end of ends) {
          expect(end.error, end.text).toBeUndefined()
          const body = parse(end.text)
          expect(body.errors, end.text).toEqual([])
          expect(body.content, end.text).toBe(tokens)
          expect(body.done, "the stream ends with data: [DONE]").toBe(true)
        }
        const lastEnd = Math.max(...ends.map((e) => e.endedAt))
        expect(refused - signalledAt, "refused within a second of SIGTERM").toBeLessThan(1_000)
        expect(lastEnd - refused, "refused well before the streams end").toBeGreaterThan(answerMs / 3)

        const exit = yield* exitOf(gateway.child, "15 seconds")
        expect(exit.code, gateway.child.output()).toBe(0)
        expect(exit.at).toBeGreaterThanOrEqual(lastEnd)

        const completed = yield* log.completedPer(streams.map((s) => s.requestId))
        expect([...completed.values()], "one RequestCompleted per streamed request").toEqual([1, 1, 1])
        const totals = yield* log.totals
        expect(totals.gapped).toEqual([])
        expect(totals.unfinished, "no request was left without its terminal event").toBe(0)

        const lines = gateway.logs()
        const started = lines.find((l) => l.msg === "shutting down")
        expect(started, gateway.child.output()).toMatchObject({ in_flight: 3 })
        expect(
          lines.some((l) => l.msg === "shut down"),
          gateway.child.output()
        ).toBe(true)
      })
  )

  it.scoped(
    "a stream longer than shutdown_grace_ms is cut at the deadline, recorded, and the gateway exits",
    () =>
      Effect.gen(function* () {
        const { sim } = yield* Stack
        // 100 tokens: 12 s of streaming, against a grace of 1 s (the environment over the file).
        yield* sim.withConfig({ outputTokens: 100 })
        const gateway = yield* Processes.startGateway(gatewayConfig(sim.url, { shutdown_grace_ms: 60_000 }), {
          SHUTDOWN_GRACE_MS: "1000"
        })
        const log = yield* EventLog.make(gateway.databaseUrl)
        const stream = yield* openStream(gateway.url)

        const signalledAt = performance.now()
        process.kill(gateway.child.pid, "SIGTERM")
        const end = (yield* endsOf([stream], "5 seconds"))[0]!
        const cutAfter = end.endedAt - signalledAt
        expect(cutAfter, "cut at the deadline").toBeGreaterThanOrEqual(900)
        expect(cutAfter, "cut at the deadline, not at the answer's end").toBeLessThan(3_000)
        const body = parse(end.text)
        expect(body.done, "a cut stream never ends with [DONE]").toBe(false)
        expect(body.content).toBeLessThan(100)

        const exit = yield* exitOf(gateway.child, "10 seconds")
        expect(exit.code, gateway.child.output()).toBe(0)
        expect(exit.at - signalledAt, "exits promptly after the deadline").toBeLessThan(5_000)

        const rows = yield* log.query<{ type: string }>(
          "SELECT type FROM events WHERE stream_id = $1 ORDER BY stream_version",
          [`request-${stream.requestId}`]
        )
        const types = rows.map((r) => r.type)
        expect(
          types.filter((t) => terminal.has(t)),
          types.join(", ")
        ).toEqual(["RequestCancelled"])
        expect(types).not.toContain("RequestCompleted")
      })
  )

  it.scoped(
    "while draining, a request on a connection still open is answered not ready, and the connection closed",
    () =>
      Effect.gen(function* () {
        const { sim } = yield* Stack
        const gateway = yield* Processes.startGateway(gatewayConfig(sim.url))
        const port = portOf(gateway.url)
        const connection = yield* rawStream(port)
        yield* connection.firstEvent
        process.kill(gateway.child.pid, "SIGTERM")
        // Draining has begun once the listening socket is gone; the stream still runs.
        yield* Processes.eventually(
          "a new connection to the gateway is refused",
          Effect.map(tryConnect(port), (outcome) => (outcome === "ECONNREFUSED" ? true : undefined)),
          "2 seconds"
        )
        yield* connection.askReady
        const received = yield* connection.closed
        // The stream first, whole; then the answer to GET /ready, after which the gateway hangs up.
        const [stream, ready] = received.split(/(?=HTTP\/1\.1 )/)
        expect(stream, received).toMatch(/^HTTP\/1\.1 200 /)
        expect(stream).toContain("data: [DONE]")
        expect(ready, received).toMatch(/^HTTP\/1\.1 503 /)
        expect(ready).toMatch(/\r\nconnection: close\r\n/i)
        const report = JSON.parse(ready!.slice(ready!.indexOf("\r\n\r\n") + 4))
        expect(report).toMatchObject({ status: "not_ready", checks: { serving: "shutting down" } })
        const exit = yield* exitOf(gateway.child, "10 seconds")
        expect(exit.code, gateway.child.output()).toBe(0)
      })
  )
})
