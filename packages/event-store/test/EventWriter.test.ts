import { expect, layer } from "@effect/vitest"
import { Database, EventStore, EventWriter } from "@gateway/event-store"
import { Effect, Either, Fiber, Layer, Option, Ref, Schedule } from "effect"
import * as TestDatabases from "./support/TestDatabases.js"

const event = (type: string): EventStore.NewEvent => ({
  eventId: crypto.randomUUID(),
  type,
  data: {},
  metadata: {}
})

/** The real store, with its batch statements counted and, when `gate` is closed, held back. */
class Probe extends Effect.Service<Probe>()("test/Probe", {
  effect: Effect.gen(function* () {
    return { statements: yield* Ref.make(0), gate: yield* Effect.makeLatch(true) }
  })
}) {}

const Counted = Layer.effect(
  EventStore.EventStore,
  Effect.gen(function* () {
    const store = yield* EventStore.EventStore
    const probe = yield* Probe
    return EventStore.EventStore.of({
      ...store,
      appendBatch: (writes) =>
        probe.gate.await.pipe(
          Effect.zipRight(Ref.update(probe.statements, (n) => n + 1)),
          Effect.zipRight(store.appendBatch(writes))
        )
    })
  })
)

const Writer = EventWriter.layer({ capacity: 2, maxBatch: 100 }).pipe(
  Layer.provideMerge(Counted),
  Layer.provideMerge(Probe.Default),
  Layer.provideMerge(Database.eventStore),
  Layer.provideMerge(TestDatabases.embedded)
)

layer(Writer, { excludeTestServices: true, timeout: 60_000 })("EventWriter", (it) => {
  it.effect("commits concurrent writes together, fewer statements than writes, each once", () =>
    Effect.gen(function* () {
      const writer = yield* EventWriter.EventWriter
      const store = yield* EventStore.EventStore
      const probe = yield* Probe
      const before = yield* Ref.get(probe.statements)
      const streams = Array.from({ length: 60 }, () => `request-${crypto.randomUUID()}`)
      yield* Effect.forEach(
        streams,
        (streamId) => writer.writeAndWait({ streamId, firstVersion: 1, events: [event("A"), event("B")] }),
        { concurrency: "unbounded", discard: true }
      )
      const statements = (yield* Ref.get(probe.statements)) - before
      expect(statements).toBeLessThan(streams.length)
      for (const streamId of streams) {
        expect((yield* store.readStream(streamId)).map((e) => e.type)).toEqual(["A", "B"])
      }
    })
  )

  it.effect("a write that cannot be stored fails alone; the rest of its batch is committed", () =>
    Effect.gen(function* () {
      const writer = yield* EventWriter.EventWriter
      const store = yield* EventStore.EventStore
      const taken = `request-${crypto.randomUUID()}`
      yield* writer.writeAndWait({ streamId: taken, firstVersion: 1, events: [event("First")] })
      const good = Array.from({ length: 5 }, () => `request-${crypto.randomUUID()}`)
      const results = yield* Effect.all(
        [
          // Version 1 of `taken` exists with another event id: the unique index refuses it.
          Effect.either(writer.writeAndWait({ streamId: taken, firstVersion: 1, events: [event("Clash")] })),
          ...good.map((streamId) =>
            Effect.either(writer.writeAndWait({ streamId, firstVersion: 1, events: [event("Fine")] }))
          )
        ],
        { concurrency: "unbounded" }
      )
      expect(Either.isLeft(results[0]!)).toBe(true)
      expect(results.slice(1).every(Either.isRight)).toBe(true)
      for (const streamId of good) expect(yield* store.version(streamId)).toBe(1)
      expect((yield* store.readStream(taken)).map((e) => e.type)).toEqual(["First"])
    })
  )

  it.effect("a full queue makes writers wait instead of growing", () =>
    Effect.gen(function* () {
      const writer = yield* EventWriter.EventWriter
      const probe = yield* Probe
      yield* probe.gate.close
      const write = () =>
        writer.write({ streamId: `request-${crypto.randomUUID()}`, firstVersion: 1, events: [event("X")] })
      // One write is taken by the (held) writer fiber, two fill the queue; the next must wait.
      const first = yield* write()
      yield* Effect.sleep("50 millis")
      yield* write()
      yield* write()
      const blocked = yield* Effect.fork(write())
      yield* Effect.sleep("100 millis")
      expect(Option.isNone(yield* Fiber.poll(blocked))).toBe(true)
      yield* probe.gate.open
      const durable = yield* Fiber.join(blocked)
      yield* first
      yield* durable
    })
  )
})

/** What the writer told its observer, in order. */
class Observed extends Effect.Service<Observed>()("test/Observed", {
  sync: () => {
    const appended: Array<{ readonly events: number; readonly seconds: number }> = []
    const failed: Array<string> = []
    const observer: EventWriter.Observer = {
      appended: (events, seconds) => void appended.push({ events, seconds }),
      appendFailed: (reason) => void failed.push(reason),
      spooled: () => {}
    }
    return { appended, failed, observer }
  }
}) {}

const ObservedWriter = EventWriter.layer({ capacity: 100, maxBatch: 100 }).pipe(
  Layer.provide(
    Layer.effect(
      EventWriter.CurrentObserver,
      Effect.map(Observed, (o) => o.observer)
    )
  ),
  Layer.provideMerge(Counted),
  Layer.provideMerge(Probe.Default),
  Layer.provideMerge(Observed.Default),
  Layer.provideMerge(Database.eventStore),
  Layer.provideMerge(TestDatabases.postgres)
)

const sum = (ns: ReadonlyArray<number>) => ns.reduce((a, b) => a + b, 0)

const eventually = <A, E, R>(check: Effect.Effect<A, E, R>) =>
  check.pipe(Effect.retry(Schedule.spaced("20 millis").pipe(Schedule.intersect(Schedule.recurs(250)))))

layer(ObservedWriter, { excludeTestServices: true, timeout: 60_000 })("EventWriter observed", (it) => {
  it.effect("tells its observer each statement's events and time; the events add up to those written", () =>
    Effect.gen(function* () {
      const writer = yield* EventWriter.EventWriter
      const probe = yield* Probe
      const { appended } = yield* Observed
      const [seen, statements] = [appended.length, yield* Ref.get(probe.statements)]
      const sizes = Array.from({ length: 40 }, (_, i) => 1 + (i % 3))
      yield* Effect.forEach(
        sizes,
        (n) =>
          writer.writeAndWait({
            streamId: `request-${crypto.randomUUID()}`,
            firstVersion: 1,
            events: Array.from({ length: n }, () => event("E"))
          }),
        { concurrency: "unbounded", discard: true }
      )
      const observed = appended.slice(seen)
      // One observation per statement, batches of several writes, every event counted once.
      expect(observed).toHaveLength((yield* Ref.get(probe.statements)) - statements)
      expect(observed.length).toBeLessThan(sizes.length)
      expect(sum(observed.map((o) => o.events))).toBe(sum(sizes))
      expect(observed.every((o) => o.seconds > 0 && o.seconds < 10)).toBe(true)
    })
  )

  it.effect("a statement the database refuses is reported as failed, not as appended", () =>
    Effect.gen(function* () {
      const writer = yield* EventWriter.EventWriter
      const { appended, failed } = yield* Observed
      const taken = `request-${crypto.randomUUID()}`
      yield* writer.writeAndWait({ streamId: taken, firstVersion: 1, events: [event("First")] })
      const [seen, failures] = [appended.length, failed.length]
      yield* Effect.all(
        [
          Effect.either(writer.writeAndWait({ streamId: taken, firstVersion: 1, events: [event("Clash")] })),
          ...Array.from({ length: 5 }, () =>
            writer.writeAndWait({
              streamId: `request-${crypto.randomUUID()}`,
              firstVersion: 1,
              events: [event("Fine")]
            })
          )
        ],
        { concurrency: "unbounded" }
      )
      expect(failed.slice(failures).length).toBeGreaterThan(0)
      expect(failed.slice(failures).every((reason) => reason === "Rejected")).toBe(true)
      expect(sum(appended.slice(seen).map((o) => o.events))).toBe(5)
    })
  )

  it.effect("status counts the writes waiting in its queue", () =>
    Effect.gen(function* () {
      const writer = yield* EventWriter.EventWriter
      const probe = yield* Probe
      const write = () =>
        writer.write({ streamId: `request-${crypto.randomUUID()}`, firstVersion: 1, events: [event("Q")] })
      yield* probe.gate.close
      // The first is taken by the writer fiber, which the closed gate holds; the rest wait.
      const durable = [yield* write()]
      yield* eventually(
        Effect.flatMap(writer.status, (s) => (s.queued === 0 ? Effect.void : Effect.fail("not taken")))
      )
      for (let i = 0; i < 5; i++) durable.push(yield* write())
      expect((yield* writer.status).queued).toBe(5)
      yield* probe.gate.open
      yield* Effect.all(durable, { discard: true })
      expect(yield* writer.status).toEqual({ queued: 0, spoolBytes: 0, refusing: false })
    })
  )
})
