import { SqlClient } from "@effect/sql"
import { describe, expect, layer } from "@effect/vitest"
import { Database, EventStore } from "@gateway/event-store"
import { Chunk, Effect, Either, Fiber, Layer, Stream } from "effect"
import * as TestDatabases from "./support/TestDatabases.js"

const event = (type: string, data: Record<string, unknown> = {}): EventStore.NewEvent => ({
  eventId: crypto.randomUUID(),
  type,
  data,
  metadata: { requestId: "r-1" }
})

const uniqueStream = (prefix: string) => `${prefix}-${crypto.randomUUID()}`

const collect = <A, E>(stream: Stream.Stream<A, E>) =>
  Effect.map(Stream.runCollect(stream), Chunk.toReadonlyArray)

for (const [name, database] of TestDatabases.all) {
  const Store = Layer.provideMerge(Database.eventStore, database)

  layer(Store, { excludeTestServices: true, timeout: 60_000 })(`EventStore contract on ${name}`, (it) => {
    it.effect("appends to a new stream and reads it back in version order", () =>
      Effect.gen(function* () {
        const store = yield* EventStore.EventStore
        const streamId = uniqueStream("request")
        const result = yield* store.append(streamId, [event("A", { n: 1 }), event("B", { n: 2 })], 0)
        expect(result.version).toBe(2)
        const more = yield* store.append(streamId, [event("C", { n: 3 })], 2)
        expect(more.version).toBe(3)
        const events = yield* store.readStream(streamId)
        expect(events.map((e) => [e.type, e.streamVersion, e.data])).toEqual([
          ["A", 1, { n: 1 }],
          ["B", 2, { n: 2 }],
          ["C", 3, { n: 3 }]
        ])
        expect(events[0]!.metadata).toEqual({ requestId: "r-1" })
        expect(yield* store.version(streamId)).toBe(3)
        expect((yield* store.readStream(streamId, 3)).map((e) => e.type)).toEqual(["C"])
      })
    )

    it.effect("refuses an append at the wrong expected version with a typed conflict", () =>
      Effect.gen(function* () {
        const store = yield* EventStore.EventStore
        const streamId = uniqueStream("key")
        yield* store.append(streamId, [event("Created")], 0)
        const stale = yield* Effect.either(store.append(streamId, [event("Revoked")], 0))
        expect(Either.getLeft(stale).pipe((e) => e._tag === "Some" && e.value)).toMatchObject({
          _tag: "StreamVersionConflict",
          streamId,
          expected: 0,
          actual: 1
        })
        const ahead = yield* Effect.either(store.append(uniqueStream("key"), [event("X")], 5))
        expect(Either.isLeft(ahead) && ahead.left._tag).toBe("StreamVersionConflict")
        expect((yield* store.readStream(streamId)).map((e) => e.type)).toEqual(["Created"])
      })
    )

    it.effect("lets exactly one of two racing appends at the same version through", () =>
      Effect.gen(function* () {
        const store = yield* EventStore.EventStore
        const streamId = uniqueStream("key")
        yield* store.append(streamId, [event("Created")], 0)
        const results = yield* Effect.all(
          Array.from({ length: 6 }, (_, i) =>
            Effect.either(store.append(streamId, [event(`Change${i}`)], 1))
          ),
          { concurrency: "unbounded" }
        )
        expect(results.filter(Either.isRight)).toHaveLength(1)
        for (const failure of results.filter(Either.isLeft)) {
          expect(failure.left).toMatchObject({ _tag: "StreamVersionConflict", expected: 1, actual: 2 })
        }
        expect(yield* store.version(streamId)).toBe(2)
      })
    )

    it.effect('appends with "any" wherever the stream is, even when racing', () =>
      Effect.gen(function* () {
        const store = yield* EventStore.EventStore
        const streamId = uniqueStream("backend")
        yield* Effect.all(
          Array.from({ length: 5 }, () => store.append(streamId, [event("Probe")], "any")),
          { concurrency: "unbounded" }
        )
        const events = yield* store.readStream(streamId)
        expect(events.map((e) => e.streamVersion)).toEqual([1, 2, 3, 4, 5])
      })
    )

    it.effect("writes a batch of many streams in one go, and skips events it already has", () =>
      Effect.gen(function* () {
        const store = yield* EventStore.EventStore
        const a = uniqueStream("request")
        const b = uniqueStream("request")
        const writes: Array<EventStore.StreamWrite> = [
          { streamId: a, firstVersion: 1, events: [event("RequestReceived"), event("RequestCompleted")] },
          { streamId: b, firstVersion: 1, events: [event("RequestReceived")] }
        ]
        yield* store.appendBatch(writes)
        yield* store.appendBatch(writes) // a retried batch: same event ids, nothing twice
        expect((yield* store.readStream(a)).map((e) => e.type)).toEqual([
          "RequestReceived",
          "RequestCompleted"
        ])
        expect((yield* store.readStream(b)).map((e) => e.streamVersion)).toEqual([1])
      })
    )

    it.effect("reads the whole log in order, and resumes from a cursor without gaps or repeats", () =>
      Effect.gen(function* () {
        const store = yield* EventStore.EventStore
        const before = yield* collect(store.readAll(EventStore.start))
        const from = before.length === 0 ? EventStore.start : EventStore.cursorOf(before[before.length - 1]!)
        const streamId = uniqueStream("order")
        // Enough events in one transaction that positions cross the next power of ten (9 → 10,
        // 99 → 100 …), where an order by their text would go wrong.
        const last = before.length === 0 ? 0 : Number(before[before.length - 1]!.position)
        const count = 10 ** String(last + 2).length - last + 3
        const many = Array.from({ length: count }, (_, i) => i)
        yield* store.appendBatch([{ streamId, firstVersion: 1, events: many.map((i) => event("E", { i })) }])
        for (let i = count; i < count + 3; i++) yield* store.append(streamId, [event("E", { i })], i)
        const all = [...many, count, count + 1, count + 2]
        const after = yield* collect(store.readAll(from, { batchSize: 4 }))
        expect(after.map((e) => (e.data as { i: number }).i)).toEqual(all)
        const resumed = yield* collect(
          store.readAll(EventStore.cursorOf(after[count - 3]!), { batchSize: 2 })
        )
        expect(resumed.map((e) => (e.data as { i: number }).i)).toEqual(all.slice(count - 2))
        const positions = after.map((e) => BigInt(e.position))
        expect(positions.every((p, i) => i === 0 || p > positions[i - 1]!)).toBe(true)
      })
    )

    it.effect("a subscriber catches up, then gets new events as they are committed", () =>
      Effect.gen(function* () {
        const store = yield* EventStore.EventStore
        const streamId = uniqueStream("live")
        yield* store.append(streamId, [event("Old")], 0)
        const all = yield* collect(store.readAll(EventStore.start))
        const from = EventStore.cursorOf(all[all.length - 2] ?? all[0]!)
        // A poll interval far longer than the test: new events must come from the wake-up.
        const subscriber = yield* store.subscribe(from, { pollInterval: "1 hour" }).pipe(
          Stream.filter((e) => e.streamId === streamId),
          Stream.take(3),
          Stream.runCollect,
          Effect.fork
        )
        yield* Effect.sleep("50 millis")
        yield* store.append(streamId, [event("New1")], 1)
        yield* store.appendBatch([{ streamId, firstVersion: 3, events: [event("New2")] }])
        const got = yield* Fiber.join(subscriber).pipe(Effect.timeout("10 seconds"))
        expect(Chunk.toReadonlyArray(got).map((e) => e.type)).toEqual(["Old", "New1", "New2"])
      })
    )

    it.effect("many concurrent writers, one reader: nothing missing, nothing twice, stream order kept", () =>
      Effect.gen(function* () {
        const store = yield* EventStore.EventStore
        const existing = yield* collect(store.readAll(EventStore.start))
        const from =
          existing.length === 0 ? EventStore.start : EventStore.cursorOf(existing[existing.length - 1]!)
        const streams = Array.from({ length: 10 }, () => uniqueStream("load"))
        const perStream = 20
        const total = streams.length * perStream
        // The reader starts before the writers and must see every event they write.
        const reader = yield* store
          .subscribe(from, { pollInterval: "20 millis", batchSize: 37 })
          .pipe(Stream.take(total), Stream.runCollect, Effect.fork)
        yield* Effect.forEach(
          streams,
          (streamId) =>
            Effect.forEach(
              Array.from({ length: perStream }, (_, i) => i),
              (i) =>
                i % 2 === 0
                  ? Effect.asVoid(store.append(streamId, [event("W", { i })], i))
                  : store.appendBatch([{ streamId, firstVersion: i + 1, events: [event("W", { i })] }]),
              { discard: true }
            ),
          { concurrency: "unbounded", discard: true }
        )
        const seen = Chunk.toReadonlyArray(yield* Fiber.join(reader).pipe(Effect.timeout("30 seconds")))
        expect(new Set(seen.map((e) => e.eventId)).size).toBe(total)
        for (const streamId of streams) {
          const versions = seen.filter((e) => e.streamId === streamId).map((e) => e.streamVersion)
          expect(versions).toEqual(Array.from({ length: perStream }, (_, i) => i + 1))
        }
        const again = yield* collect(store.readAll(from))
        expect(again.map((e) => e.eventId)).toEqual(seen.map((e) => e.eventId))
      })
    )

    it.effect("refuses to change or delete a stored event", () =>
      Effect.gen(function* () {
        const store = yield* EventStore.EventStore
        const sql = yield* SqlClient.SqlClient
        const streamId = uniqueStream("immutable")
        yield* store.append(streamId, [event("A")], 0)
        const update = yield* Effect.either(sql`UPDATE events SET type = 'B' WHERE stream_id = ${streamId}`)
        const remove = yield* Effect.either(sql`DELETE FROM events WHERE stream_id = ${streamId}`)
        expect(Either.isLeft(update)).toBe(true)
        expect(Either.isLeft(remove)).toBe(true)
        expect((yield* store.readStream(streamId)).map((e) => e.type)).toEqual(["A"])
      })
    )
  })
}

describe("EventStore on PostgreSQL with transactions in flight", () => {
  const Store = Layer.provideMerge(Database.eventStore, TestDatabases.postgres)

  layer(Store, { excludeTestServices: true, timeout: 60_000 })("xmin rule", (it) => {
    it.effect("never hands out an event of a later transaction while an earlier one is open", () =>
      Effect.gen(function* () {
        const store = yield* EventStore.EventStore
        const sql = yield* SqlClient.SqlClient
        const existing = yield* collect(store.readAll(EventStore.start))
        const from =
          existing.length === 0 ? EventStore.start : EventStore.cursorOf(existing[existing.length - 1]!)
        const slow = uniqueStream("slow")
        const fast = uniqueStream("fast")
        // The slow transaction takes its id and position first, then stays open.
        const inserted = yield* Effect.makeLatch(false)
        const release = yield* Effect.makeLatch(false)
        const slowTx = yield* sql
          .withTransaction(
            Effect.gen(function* () {
              yield* sql`SELECT pg_current_xact_id()`
              yield* sql.unsafe(
                `INSERT INTO events (event_id, stream_id, stream_version, type, data, metadata)
                 VALUES ($1, $2, 1, 'Slow', '{}', '{}')`,
                [crypto.randomUUID(), slow]
              )
              yield* inserted.open
              yield* release.await
            })
          )
          .pipe(Effect.fork)
        yield* inserted.await
        yield* store.append(fast, [event("Fast")], 0)
        const whileOpen = yield* collect(store.readAll(from, { settle: "200 millis" }))
        expect(whileOpen.map((e) => e.type)).toEqual([])
        yield* release.open
        yield* Fiber.join(slowTx)
        const afterCommit = yield* collect(store.readAll(from))
        expect(afterCommit.map((e) => e.type)).toEqual(["Slow", "Fast"])
      })
    )
  })
})
