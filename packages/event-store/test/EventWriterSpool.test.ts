import { mkdtempSync, readdirSync, rmSync, writeFileSync } from "node:fs"
import { tmpdir } from "node:os"
import { join } from "node:path"
import { expect, layer } from "@effect/vitest"
import { Database, EventStore, EventWriter } from "@gateway/event-store"
import { Effect, Layer, Ref, Schedule } from "effect"
import * as TestDatabases from "./support/TestDatabases.js"

const event = (type: string): EventStore.NewEvent => ({
  eventId: crypto.randomUUID(),
  type,
  data: {},
  metadata: {}
})

/** Whether the database "answers"; while it does not, batches fail as an outage would. */
class Outage extends Effect.Service<Outage>()("test/Outage", {
  effect: Ref.make(false).pipe(Effect.map((down) => ({ down })))
}) {}

const Flaky = Layer.effect(
  EventStore.EventStore,
  Effect.gen(function* () {
    const store = yield* EventStore.EventStore
    const { down } = yield* Outage
    return EventStore.EventStore.of({
      ...store,
      appendBatch: (writes) =>
        Effect.flatMap(Ref.get(down), (isDown) =>
          isDown
            ? Effect.fail(
                new EventStore.EventStoreError({
                  operation: "appendBatch",
                  reason: "Unavailable",
                  detail: "ECONNREFUSED"
                })
              )
            : store.appendBatch(writes)
        )
    })
  })
)

/** What the writer told its observer. */
class Observed extends Effect.Service<Observed>()("test/Observed", {
  sync: () => {
    const appended: Array<number> = []
    const failed: Array<string> = []
    const spooled: Array<number> = []
    const observer: EventWriter.Observer = {
      appended: (events) => void appended.push(events),
      appendFailed: (reason) => void failed.push(reason),
      spooled: (events) => void spooled.push(events)
    }
    return { appended, failed, spooled, observer }
  }
}) {}

const sum = (ns: ReadonlyArray<number>) => ns.reduce((a, b) => a + b, 0)

const spoolDir = mkdtempSync(join(tmpdir(), "gateway-spool-"))

const Stack = EventWriter.layer({ spoolDir, drainInterval: "50 millis" }).pipe(
  Layer.provide(
    Layer.effect(
      EventWriter.CurrentObserver,
      Effect.map(Observed, (o) => o.observer)
    )
  ),
  Layer.provideMerge(Observed.Default),
  Layer.provideMerge(Flaky),
  Layer.provideMerge(Outage.Default),
  Layer.provideMerge(Database.eventStore),
  Layer.provideMerge(TestDatabases.postgres)
)

const eventually = <A, E, R>(check: Effect.Effect<A, E, R>) =>
  check.pipe(Effect.retry(Schedule.spaced("50 millis").pipe(Schedule.intersect(Schedule.recurs(100)))))

layer(Stack, { excludeTestServices: true, timeout: 60_000 })("EventWriter with the database away", (it) => {
  it.effect("spools what the database cannot take, then drains it in order, once, when it returns", () =>
    Effect.gen(function* () {
      const writer = yield* EventWriter.EventWriter
      const { down } = yield* Outage
      const store = yield* EventStore.EventStore
      const observed = yield* Observed
      const streamId = `request-${crypto.randomUUID()}`
      yield* writer.writeAndWait({ streamId, firstVersion: 1, events: [event("Before")] })
      yield* Ref.set(down, true)
      // Durable while the database is away: the writers are released once the spool has it.
      yield* writer.writeAndWait({ streamId, firstVersion: 2, events: [event("During1"), event("During2")] })
      const others = Array.from({ length: 20 }, () => `request-${crypto.randomUUID()}`)
      yield* Effect.forEach(
        others,
        (s) => writer.writeAndWait({ streamId: s, firstVersion: 1, events: [event("X")] }),
        {
          concurrency: "unbounded",
          discard: true
        }
      )
      expect((yield* writer.status).spoolBytes).toBeGreaterThan(0)
      expect(readdirSync(spoolDir).length).toBeGreaterThan(0)
      // The failed statements and the spooled batches were reported; nothing went in meanwhile.
      expect(observed.failed.length).toBeGreaterThan(0)
      expect(observed.failed.every((reason) => reason === "Unavailable")).toBe(true)
      expect(sum(observed.spooled)).toBe(2 + others.length)
      expect(sum(observed.appended)).toBe(1)
      expect((yield* store.readStream(streamId)).map((e) => e.type)).toEqual(["Before"])
      // Back: spooled events reach the table; what arrives meanwhile waits its turn behind them.
      yield* Ref.set(down, false)
      yield* writer.writeAndWait({ streamId, firstVersion: 4, events: [event("After")] })
      yield* eventually(
        Effect.flatMap(writer.status, (s) =>
          s.spoolBytes === 0 ? Effect.void : Effect.fail("still spooled")
        )
      )
      const events = yield* store.readStream(streamId)
      expect(events.map((e) => e.type)).toEqual(["Before", "During1", "During2", "After"])
      const positions = events.map((e) => BigInt(e.position))
      expect(positions.every((p, i) => i === 0 || p > positions[i - 1]!)).toBe(true)
      for (const s of others) expect((yield* store.readStream(s)).length).toBe(1)
      expect(readdirSync(spoolDir)).toEqual([])
      // Drained or written directly, each event went in by one statement that was reported.
      expect(sum(observed.appended)).toBe(1 + 2 + others.length + 1)
      expect((yield* writer.status).spoolBytes).toBe(0)
    })
  )
})

layer(Layer.provideMerge(Database.eventStore, TestDatabases.postgres), {
  excludeTestServices: true,
  timeout: 60_000
})("EventWriter after a crash", (it) => {
  it.effect("drains a spool left by a previous process as soon as it starts", () =>
    Effect.gen(function* () {
      const store = yield* EventStore.EventStore
      const dir = mkdtempSync(join(tmpdir(), "gateway-spool-"))
      const streamId = `request-${crypto.randomUUID()}`
      // A previous process spooled these and died before draining them.
      const { Spool } = yield* Effect.promise(() => import("@gateway/event-store"))
      const left = yield* Spool.make(dir)
      yield* left.append([{ streamId, firstVersion: 1, events: [event("Spooled1"), event("Spooled2")] }])
      yield* Effect.scoped(
        Effect.gen(function* () {
          const writer = yield* EventWriter.make({ spoolDir: dir, drainInterval: "20 millis" })
          yield* writer.writeAndWait({ streamId, firstVersion: 3, events: [event("New")] })
          yield* eventually(
            Effect.flatMap(writer.status, (s) =>
              s.spoolBytes === 0 ? Effect.void : Effect.fail("still spooled")
            )
          )
        })
      )
      expect((yield* store.readStream(streamId)).map((e) => e.type)).toEqual(["Spooled1", "Spooled2", "New"])
    })
  )
})

layer(Layer.provideMerge(Outage.Default, Layer.provideMerge(Database.eventStore, TestDatabases.embedded)), {
  excludeTestServices: true,
  timeout: 60_000
})("EventWriter with neither the database nor the spool", (it) => {
  it.effect("fails the writes and says it is refusing, until the database takes writes again", () =>
    Effect.gen(function* () {
      const { down } = yield* Outage
      const dir = mkdtempSync(join(tmpdir(), "gateway-spool-"))
      yield* Effect.scoped(
        Effect.gen(function* () {
          const writer = yield* EventWriter.make({ spoolDir: dir, drainInterval: "20 millis" }).pipe(
            Effect.provide(Flaky)
          )
          // The spool's directory turns into a file: no segment can be opened any more.
          rmSync(dir, { recursive: true, force: true })
          writeFileSync(dir, "not a directory")
          yield* Ref.set(down, true)
          const streamId = `request-${crypto.randomUUID()}`
          const failed = yield* Effect.either(
            writer.writeAndWait({ streamId, firstVersion: 1, events: [event("Lost")] })
          )
          expect(failed._tag).toBe("Left")
          expect((yield* writer.status).refusing).toBe(true)
          yield* Ref.set(down, false)
          yield* writer.writeAndWait({ streamId, firstVersion: 1, events: [event("Kept")] })
          expect((yield* writer.status).refusing).toBe(false)
        })
      )
      rmSync(dir, { force: true })
    })
  )
})
