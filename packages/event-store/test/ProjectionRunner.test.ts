import { SqlClient } from "@effect/sql"
import { expect, layer } from "@effect/vitest"
import { Database, EventStore, type Projection, ProjectionRunner } from "@gateway/event-store"
import { Effect, Layer, Schedule } from "effect"
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

/** Refuses every batch holding a `Poison` event (its SQL fails), so from there on it stays behind. */
const stuck: Projection.Projection<boolean> = {
  name: "test_stuck",
  tables: [],
  create: () => Effect.void,
  empty: () => false,
  evolve: (poisoned, event) => poisoned || event.type === "Poison",
  apply: (poisoned) =>
    poisoned ? Effect.flatMap(SqlClient.SqlClient, (sql) => Effect.asVoid(sql`SELECT 1 / 0`)) : Effect.void
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

/** Each projection's lag, by name, as the runner reports it. */
const lagOf = Effect.flatMap(ProjectionRunner.ProjectionRunner, (runner) => runner.lag).pipe(
  Effect.map((lags) => Object.fromEntries(lags.map((l) => [l.name, l.events])))
)

/** Waits (up to 10 s) until the runner reports `expected`. */
const lagReaches = (expected: Record<string, number>) =>
  lagOf.pipe(
    Effect.filterOrFail(
      (lag) => JSON.stringify(lag) === JSON.stringify(expected),
      (lag) => `lag ${JSON.stringify(lag)}`
    ),
    Effect.retry(Schedule.spaced("50 millis").pipe(Schedule.intersect(Schedule.recurs(200))))
  )

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

    it.effect("reports how many events of the log each projection has not applied", () =>
      Effect.gen(function* () {
        yield* caughtUp
        expect(yield* lagOf).toEqual({ test_counts: 0, test_stuck: 0 })
        // Ten events in one transaction, the first refused by test_stuck: it stays ten behind.
        yield* Effect.flatMap(EventStore.EventStore, (store) =>
          store.appendBatch([
            {
              streamId: `request-${crypto.randomUUID()}`,
              firstVersion: 1,
              events: ["Poison", ...Array.from({ length: 9 }, () => "After")].map((type) => ({
                eventId: crypto.randomUUID(),
                type,
                data: {},
                metadata: {}
              }))
            }
          ])
        )
        yield* lagReaches({ test_counts: 0, test_stuck: 10 })
        // Behind the log, not this process's writes: events appended by anyone count.
        yield* append("Other", 4)
        yield* lagReaches({ test_counts: 0, test_stuck: 14 })
      }).pipe(
        Effect.provide(ProjectionRunner.layer([counting, stuck], { batchSize: 7, pollInterval: "50 millis" }))
      )
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

  it.effect("a runner that stops lets go of its lock, though its connection stays in the pool", () =>
    Effect.gen(function* () {
      const sql = yield* SqlClient.SqlClient
      const advisoryLocks = Effect.map(
        sql<{ n: number }>`
          SELECT count(*)::int AS n FROM pg_locks
          WHERE locktype = 'advisory' AND granted
            AND database = (SELECT oid FROM pg_database WHERE datname = current_database())`,
        ([row]) => row?.n ?? 0
      )
      yield* append("C", 3)
      yield* withRunner(
        Effect.gen(function* () {
          yield* caughtUp // applied, so led: the lock is held
          expect(yield* advisoryLocks).toBe(1)
        })
      )
      expect(yield* advisoryLocks).toBe(0)
    })
  )
})
