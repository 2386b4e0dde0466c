import { SqlClient } from "@effect/sql"
import { expect, layer } from "@effect/vitest"
import { Database, EventStore, type Projection, ProjectionRunner } from "@gateway/event-store"
import { Effect, Layer } from "effect"
import * as TestDatabases from "./support/TestDatabases.js"

/** Counts events per type: applied twice, an event would show up twice. */
const counting: Projection.Projection<Map<string, number>> = {
  name: "test_counts",
  tables: ["test_counts"],
  create: (tables) =>
    Effect.flatMap(SqlClient.SqlClient, (sql) =>
      sql.unsafe(
        `CREATE TABLE IF NOT EXISTS ${tables("test_counts")} (type text PRIMARY KEY, n bigint NOT NULL)`
      )
    ),
  empty: () => new Map(),
  evolve: (counts, event) => counts.set(event.type, (counts.get(event.type) ?? 0) + 1),
  apply: (counts, tables) =>
    Effect.flatMap(SqlClient.SqlClient, (sql) =>
      Effect.forEach(
        counts,
        ([type, n]) =>
          sql.unsafe(
            `INSERT INTO ${tables("test_counts")} AS t (type, n) VALUES ($1, $2)
             ON CONFLICT (type) DO UPDATE SET n = t.n + excluded.n`,
            [type, n]
          ),
        { discard: true }
      )
    )
}

const countsOf = Effect.flatMap(SqlClient.SqlClient, (sql) =>
  sql<{ type: string; n: string }>`SELECT type, n::text AS n FROM test_counts ORDER BY type`.pipe(
    Effect.map((rows) => Object.fromEntries(rows.map((r) => [r.type, Number(r.n)])))
  )
)

const append = (type: string, count: number) =>
  Effect.flatMap(EventStore.EventStore, (store) =>
    store.appendBatch(
      Array.from({ length: count }, () => ({
        streamId: `request-${crypto.randomUUID()}`,
        firstVersion: 1,
        events: [{ eventId: crypto.randomUUID(), type, data: {}, metadata: {} }]
      }))
    )
  )

/** A runner for the duration of `effect`, as a gateway replica would run one. */
const withRunner = <A, E, R>(effect: Effect.Effect<A, E, R>) =>
  Effect.flatMap(ProjectionRunner.ProjectionRunner, () => effect).pipe(
    Effect.provide(ProjectionRunner.layer([counting], { batchSize: 7, pollInterval: "50 millis" }))
  )

const caughtUp = Effect.flatMap(ProjectionRunner.ProjectionRunner, (runner) => runner.caughtUp)

for (const [name, database] of TestDatabases.all) {
  const Store = Layer.provideMerge(Database.eventStore, database)

  layer(Store, { excludeTestServices: true, timeout: 60_000 })(`ProjectionRunner on ${name}`, (it) => {
    it.effect("applies every event exactly once, and resumes from its checkpoint after a stop", () =>
      Effect.gen(function* () {
        yield* append("Before", 25)
        yield* withRunner(
          Effect.gen(function* () {
            yield* caughtUp
            expect(yield* countsOf).toEqual({ Before: 25 })
            yield* append("Live", 10)
            yield* caughtUp
            expect(yield* countsOf).toEqual({ Before: 25, Live: 10 })
          })
        )
        // Stopped: events written meanwhile are applied by the next runner, the old ones not again.
        yield* append("WhileStopped", 12)
        yield* withRunner(
          Effect.gen(function* () {
            yield* caughtUp
            const status = yield* Effect.flatMap(ProjectionRunner.ProjectionRunner, (r) => r.status)
            expect(status).toMatchObject([{ name: "test_counts", eventsApplied: 47, lastError: null }])
          })
        )
        expect(yield* countsOf).toEqual({ Before: 25, Live: 10, WhileStopped: 12 })
      })
    )
  })
}

layer(Layer.provideMerge(Database.eventStore, TestDatabases.postgres), {
  excludeTestServices: true,
  timeout: 60_000
})("ProjectionRunner replicas on PostgreSQL", (it) => {
  it.effect("two replicas: one leads, the events are applied once", () =>
    Effect.gen(function* () {
      yield* append("A", 30)
      const leaders = yield* withRunner(
        withRunner(
          Effect.gen(function* () {
            yield* caughtUp
            yield* append("B", 20)
            yield* caughtUp
            return yield* Effect.flatMap(ProjectionRunner.ProjectionRunner, (r) => r.status)
          })
        )
      )
      expect(leaders).toHaveLength(1)
      expect(yield* countsOf).toEqual({ A: 30, B: 20 })
    })
  )
})
