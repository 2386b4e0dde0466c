/**
 * A gateway killed with SIGKILL in the middle of a load, then started again on the same database
 * and spool directory: every answer a client received in full is on the books (the durability
 * rule survives a crash), and after the restart the projections count each completed request
 * exactly once.
 */
import * as Fs from "node:fs/promises"
import { expect, layer } from "@effect/vitest"
import { Context, Effect, Fiber, Layer, type Scope } from "effect"
import * as EventLog from "./support/EventLog.js"
import * as Load from "./support/Load.js"
import * as Processes from "./support/Processes.js"

/** Concurrent clients, each sending one request after another. */
const workers = 8
/** Requests per client at most before the crash (the kill ends the load long before). */
const perWorker = 40
/** Requests per client once the gateway is back. */
const perWorkerAfter = 3
/** How long the load runs before the gateway is killed. */
const killAfter = "1 second"

class Stack extends Context.Tag("test/Crash/Stack")<
  Stack,
  {
    /** Starts a gateway on the suite's database and spool directory (the same ones every time). */
    readonly startGateway: Effect.Effect<Processes.Gateway, never, Scope.Scope>
    readonly log: EventLog.EventLog
    readonly spoolDir: string
  }
>() {
  static readonly layer = Layer.scoped(
    Stack,
    Effect.gen(function* () {
      // Streams of 16 tokens 10 ms apart: about 170 ms each, so the kill finds some mid-answer.
      const sim = yield* Processes.startSim({
        model: "small",
        ttftMs: 5,
        itlMs: 10,
        outputTokens: 16,
        seed: 1
      })
      const databaseUrl = yield* Processes.freshDatabase
      const spoolDir = yield* Processes.tempDir
      const config = {
        server: { host: "127.0.0.1" },
        models: [{ name: "small", backends: [{ id: "small-1", url: sim.url }] }]
      }
      return {
        startGateway: Processes.startGatewayOn(config, { databaseUrl, spoolDir }),
        log: yield* EventLog.make(databaseUrl),
        spoolDir
      }
    })
  )
}

/**
 * One client: up to `count` requests one after another, JSON and streamed in turn, stopping at
 * the first that finds the gateway gone.
 */
const client = (url: string, index: number, count: number) =>
  Effect.gen(function* () {
    const outcomes: Array<Load.Outcome> = []
    for (let n = 0; n < count; n++) {
      const outcome = yield* Load.chat(url, (index + n) % 2 === 0)
      outcomes.push(outcome)
      if (outcome.broken) break
    }
    return outcomes
  })

const load = (url: string, count: number) =>
  Effect.map(
    Effect.forEach(
      Array.from({ length: workers }, (_, i) => i),
      (i) => client(url, i, count),
      { concurrency: "unbounded" }
    ),
    (tallies) => tallies.flat()
  )

/** The gateway ids of the requests whose whole answer arrived. */
const completedIds = (outcomes: ReadonlyArray<Load.Outcome>) =>
  outcomes.filter((o) => o.complete).map((o) => o.id ?? "(no x-gateway-request-id)")

const uuid = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/

layer(Stack.layer, { excludeTestServices: true })("a gateway killed mid-load", (it) => {
  it.scoped(
    "every answer a client got in full is on the books after a restart, and counted exactly once",
    () =>
      Effect.gen(function* () {
        const { startGateway, log, spoolDir } = yield* Stack
        const first = yield* startGateway
        const running = yield* Effect.fork(load(first.url, perWorker))
        yield* Effect.sleep(killAfter)
        process.kill(first.child.pid, "SIGKILL")
        const before = yield* Fiber.join(running)
        expect(yield* Effect.promise(() => first.child.exited)).toBe(null)

        // The kill came mid-load: requests were completed before it and cut off by it.
        const cut = before.filter((o) => o.broken)
        expect(completedIds(before).length).toBeGreaterThan(0)
        expect(cut.length).toBeGreaterThan(0)
        // Nothing else went wrong: every request either completed or was cut off by the kill.
        expect(before.filter((o) => !o.complete && !o.broken)).toEqual([])

        // The dead process's sessions are gone (and with them its projection locks), so the
        // new one takes the lead at once rather than at its next leadership check.
        yield* log.noGatewaySessions("5 seconds")
        const second = yield* startGateway
        const after = yield* load(second.url, perWorkerAfter)
        expect(after.filter((o) => !o.complete)).toEqual([])

        const tally = [...completedIds(before), ...completedIds(after)]
        for (const id of tally) expect(id).toMatch(uuid)
        expect(new Set(tally).size).toBe(tally.length)

        // The durability rule, across the crash: no polling, these were committed before the
        // clients had their answers.
        const completed = yield* log.completedPer(tally)
        expect(
          Array.from(completed)
            .filter(([, n]) => n !== 1)
            .map(([id, n]) => `${id}: ${n} RequestCompleted`)
        ).toEqual([])

        yield* log.caughtUp("20 seconds")
        const totals = yield* log.totals
        expect(totals.distinctEventIds).toBe(totals.events)
        expect(totals.gapped).toEqual([])
        // Requests cut off by the kill may be on the books too (committed, answer lost), but no
        // more requests completed than were sent.
        expect(totals.completed).toBeGreaterThanOrEqual(tally.length)
        expect(totals.completed).toBeLessThanOrEqual(before.length + after.length)
        expect(yield* log.usageRequests).toBe(totals.completed)
        // The database never went away: nothing was spooled.
        expect(yield* Effect.promise(() => Fs.readdir(spoolDir))).toEqual([])
      })
  )
})
