/**
 * PostgreSQL going away under a running gateway, simulated by pausing a TCP proxy between them
 * (the machine's PostgreSQL itself is never touched): clients are still served in full, their
 * events wait in the local spool, and once the database is back the spool drains into the log —
 * every request on the books exactly once, and counted once by the projections.
 *
 * Also: a projection whose connection drops in the middle of its batch transaction starts again
 * and counts what it missed.
 */
import * as Fs from "node:fs/promises"
import * as Path from "node:path"
import { SqlClient } from "@effect/sql"
import { PgClient } from "@effect/sql-pg"
import { expect, layer } from "@effect/vitest"
import { Context, Effect, Layer, Redacted } from "effect"
import * as EventLog from "./support/EventLog.js"
import * as Load from "./support/Load.js"
import * as Processes from "./support/Processes.js"
import * as TcpProxy from "./support/TcpProxy.js"

class Stack extends Context.Tag("test/DatabaseOutage/Stack")<
  Stack,
  {
    readonly gateway: Processes.Gateway
    /** Between the gateway and PostgreSQL. */
    readonly proxy: TcpProxy.TcpProxy
    /** The gateway's database, read directly. */
    readonly log: EventLog.EventLog
    readonly spoolDir: string
  }
>() {
  static readonly layer = Layer.scoped(
    Stack,
    Effect.gen(function* () {
      const sim = yield* Processes.startSim({ model: "small", ttftMs: 5, itlMs: 2, outputTokens: 8, seed: 1 })
      const databaseUrl = yield* Processes.freshDatabase
      const server = new URL(Processes.testDatabaseServer)
      const proxy = yield* TcpProxy.make({ host: server.hostname, port: Number(server.port || 5432) })
      const proxied = new URL(databaseUrl)
      proxied.hostname = "127.0.0.1"
      proxied.port = String(proxy.port)
      const spoolDir = yield* Processes.tempDir
      const gateway = yield* Processes.startGatewayOn(
        {
          server: { host: "127.0.0.1" },
          models: [{ name: "small", backends: [{ id: "small-1", url: sim.url }] }]
        },
        { databaseUrl: proxied.toString(), spoolDir }
      )
      return { gateway, proxy, log: yield* EventLog.make(databaseUrl), spoolDir }
    })
  )
}

/** `count` requests, JSON and streamed in turn, `concurrency` at a time. */
const send = (url: string, count: number, concurrency: number) =>
  Effect.forEach(
    Array.from({ length: count }, (_, i) => i % 2 === 1),
    (stream) => Load.chat(url, stream),
    { concurrency }
  )

const idsOf = (outcomes: ReadonlyArray<Load.Outcome>) => outcomes.map((o) => o.id ?? "(no id)")

/** Requests on whose stream there is not exactly one RequestCompleted. */
const notOnce = (counts: ReadonlyMap<string, number>) =>
  Array.from(counts)
    .filter(([, n]) => n !== 1)
    .map(([id, n]) => `${id}: ${n} RequestCompleted`)

const ready = (url: string) =>
  Effect.promise(async () => {
    const res = await fetch(`${url}/ready`)
    return {
      status: res.status,
      body: (await res.json()) as { status: string; checks: Record<string, string> }
    }
  })

const segmentName = /^events-\d{10}\.ndjson$/

/** The spool's segment files. */
const segments = (dir: string) =>
  Effect.promise(async () => (await Fs.readdir(dir)).filter((f) => segmentName.test(f)))

/**
 * The spool's segment files, with their sizes and the requests whose RequestCompleted they hold;
 * only while nothing drains them.
 */
const spooled = (dir: string) =>
  Effect.promise(async () => {
    const files = (await Fs.readdir(dir)).filter((f) => segmentName.test(f))
    const sizes: Record<string, number> = {}
    const completed: Array<string> = []
    for (const file of files) {
      const text = await Fs.readFile(Path.join(dir, file), "utf8")
      sizes[file] = Buffer.byteLength(text)
      for (const line of text.split("\n").filter((l) => l.length > 0)) {
        const write = JSON.parse(line) as { streamId: string; events: ReadonlyArray<{ type: string }> }
        if (write.events.some((e) => e.type === "RequestCompleted")) {
          completed.push(write.streamId.slice("request-".length))
        }
      }
    }
    return { files, sizes, completed }
  })

const logOf = (gateway: Processes.Gateway) => gateway.logs().map((l) => String(l.msg))

layer(Stack.layer, { excludeTestServices: true, timeout: 90_000 })(
  "a gateway whose database goes away",
  (it) => {
    it.scoped(
      "serves every request while PostgreSQL is unreachable, then puts each on the books exactly once",
      () =>
        Effect.gen(function* () {
          const { gateway, proxy, log, spoolDir } = yield* Stack
          const before = yield* send(gateway.url, 4, 2)
          expect(before.every((o) => o.complete)).toBe(true)
          expect(notOnce(yield* log.completedPer(idsOf(before)))).toEqual([])
          expect((yield* ready(gateway.url)).status).toBe(200)
          // Idle projections: this test is about the spool, not a batch cut off mid-transaction.
          yield* log.caughtUp("10 seconds")

          yield* proxy.pause
          const during = yield* send(gateway.url, 40, 8)
          expect(during.filter((o) => !o.complete).map((o) => o.error)).toEqual([])
          // Still ready: it serves on, spooling; the database's check says what is wrong.
          const outage = yield* ready(gateway.url)
          expect(outage.status).toBe(200)
          expect(outage.body.checks.database).not.toBe("ok")
          expect(outage.body.checks.event_log).toBe("ok")
          // Nothing reached the database; everything waits in fsynced spool segments.
          expect(yield* log.eventsOf(idsOf(during))).toBe(0)
          const spool = yield* spooled(spoolDir)
          expect(spool.files.length).toBeGreaterThan(0)
          expect(Object.values(spool.sizes).every((n) => n > 0)).toBe(true)
          expect(spool.completed.sort()).toEqual(idsOf(during).sort())
          expect(logOf(gateway)).toContain("database unreachable; spooling events")

          yield* proxy.resume
          yield* Processes.eventually(
            "the spool drains into the database",
            Effect.map(segments(spoolDir), (files) => (files.length === 0 ? true : undefined)),
            "30 seconds"
          )
          // Once drained, new requests are committed before their answers end again.
          const after = yield* send(gateway.url, 4, 2)
          expect(after.every((o) => o.complete)).toBe(true)
          expect(notOnce(yield* log.completedPer(idsOf(after)))).toEqual([])

          const all = [...before, ...during, ...after]
          expect(notOnce(yield* log.completedPer(idsOf(all)))).toEqual([])
          const totals = yield* log.totals
          expect(totals.completed).toBe(all.length)
          expect(totals.events).toBe(all.length * 4)
          expect(totals.distinctEventIds).toBe(totals.events)
          expect(totals.gapped).toEqual([])
          yield* log.caughtUp("20 seconds")
          expect(yield* log.usageRequests).toBe(all.length)
          expect(yield* log.requestLogRows).toBe(all.length)
          expect((yield* ready(gateway.url)).status).toBe(200)
        })
    )

    it.scoped(
      "a projection whose connection drops inside its batch transaction starts again and counts what it missed",
      () =>
        Effect.gen(function* () {
          const { gateway, proxy, log } = yield* Stack
          yield* log.caughtUp("10 seconds")
          const counted = yield* log.usageRequests
          // The usage_hourly projection's next batch waits, inside its transaction, for this lock...
          const release = yield* log.lockTable("usage_hourly")
          const blocked = yield* Load.chat(gateway.url, false)
          expect(blocked.complete).toBe(true)
          yield* log.someoneWaitsFor("usage_hourly")
          // ... when its connection drops: the statement fails, then so does the ROLLBACK on the
          // dead connection, which @effect/sql turns into a defect; the runner must survive it.
          yield* proxy.pause
          yield* Effect.sleep("200 millis")
          yield* proxy.resume
          yield* release
          const later = yield* Load.chat(gateway.url, true)
          expect(later.complete).toBe(true)
          // The runner starts again after a pause of a second and a leadership check of two.
          yield* Processes.eventually(
            "usage_hourly counts the 2 requests of this test",
            Effect.map(log.usageRequests, (n) => (n === counted + 2 ? true : undefined)),
            "15 seconds"
          )
        })
    )
  }
)
