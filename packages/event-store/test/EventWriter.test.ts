import { expect, layer } from "@effect/vitest"
import { Database, EventStore, EventWriter } from "@gateway/event-store"
import { Effect, Either, Fiber, Layer, Option, Ref } from "effect"
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
