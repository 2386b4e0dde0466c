/**
 * Runs projections in the background: each follows the log from its checkpoint in a fiber of
 * its own. On PostgreSQL only one replica runs a given projection at a time — the one holding
 * its advisory lock on a reserved connection; when that replica dies its connection closes, the
 * lock is released and another takes over. Every batch is applied in one transaction that first
 * checks the checkpoint has not moved, so even two runners could not apply an event twice.
 */
import { SqlClient, type SqlError } from "@effect/sql"
import { Cause, Context, type Duration, Effect, Layer, Option, Ref, Schedule, Stream } from "effect"
import { Database } from "./Database.js"
import {
  type Cursor,
  cursorOf,
  EventStore,
  type EventStoreError,
  type RecordedEvent,
  start
} from "./EventStore.js"
import * as Migrations from "./Migrations.js"
import * as Projection from "./Projection.js"

export interface Status {
  readonly name: string
  readonly position: string
  readonly eventsApplied: number
  readonly lastError: string | null
  readonly leader: boolean
}

/** How far a projection is behind the log. */
export interface Lag {
  readonly name: string
  /**
   * Events committed after its checkpoint: counted exactly up to `lagCountLimit`, estimated from
   * global positions beyond it.
   */
  readonly events: number
}

export class ProjectionRunner extends Context.Tag("@gateway/event-store/ProjectionRunner")<
  ProjectionRunner,
  {
    readonly status: Effect.Effect<ReadonlyArray<Status>, SqlError.SqlError>
    /** Resolves once every projection has applied the log up to what is committed now. */
    readonly caughtUp: Effect.Effect<void, SqlError.SqlError | EventStoreError>
    /**
     * Every projection's lag behind the whole log (whichever replica leads it), read from the
     * checkpoints; on PostgreSQL the statement gives up after `lagStatementTimeout`.
     */
    readonly lag: Effect.Effect<ReadonlyArray<Lag>, SqlError.SqlError>
  }
>() {}

/** Another runner advanced the checkpoint under us: start again from where it is. */
class CheckpointMoved {
  readonly _tag = "CheckpointMoved"
}

/** Pause after a failed turn (the database went away, a projection's SQL failed). */
const restartDelay = "1 second"

/** How often a follower tries to take the lead, and a leader checks its lock connection. */
const leadershipCheck = "2 seconds"

/** Events behind counted one by one up to here; past it, a count would cost more than it tells. */
export const lagCountLimit = 100_000

/** What the lag query may take on the server before it is cancelled. */
export const lagStatementTimeout = "1s"

const lockKey = (name: string) => `gateway.projection.${name}`

export const readCheckpoint = (name: string) =>
  Effect.flatMap(SqlClient.SqlClient, (sql) =>
    sql<{ transaction_id: string; position: string }>`
      SELECT transaction_id::text AS transaction_id, position::text AS position
      FROM projection_checkpoints WHERE name = ${name}`.pipe(
      Effect.map((rows): Cursor => {
        const row = rows[0]
        return row === undefined ? start : { transactionId: row.transaction_id, position: row.position }
      })
    )
  )

/**
 * Applies one batch and moves the checkpoint from `from` to the batch's last event, in one
 * transaction, unless the checkpoint is no longer at `from`.
 */
export const applyBatch = <D>(
  projection: Projection.Projection<D>,
  tables: Projection.Tables,
  checkpointName: string,
  from: Cursor,
  events: ReadonlyArray<RecordedEvent>
) =>
  Effect.flatMap(SqlClient.SqlClient, (sql) =>
    sql.withTransaction(
      Effect.gen(function* () {
        const [current] = yield* sql<{ transaction_id: string; position: string }>`
          SELECT transaction_id::text AS transaction_id, position::text AS position
          FROM projection_checkpoints WHERE name = ${checkpointName} FOR UPDATE`
        const at: Cursor =
          current === undefined
            ? start
            : { transactionId: current.transaction_id, position: current.position }
        if (at.transactionId !== from.transactionId || at.position !== from.position) {
          return yield* Effect.fail(new CheckpointMoved())
        }
        let delta = projection.empty()
        for (const event of events) delta = projection.evolve(delta, event)
        yield* projection.apply(delta, tables)
        const last = cursorOf(events[events.length - 1]!)
        yield* sql`
          INSERT INTO projection_checkpoints (name, transaction_id, position, events_applied, last_error, updated_at)
          VALUES (${checkpointName}, ${last.transactionId}::xid8, ${last.position}::bigint, ${events.length}, NULL, now())
          ON CONFLICT (name) DO UPDATE SET
            transaction_id = excluded.transaction_id,
            position = excluded.position,
            events_applied = projection_checkpoints.events_applied + excluded.events_applied,
            last_error = NULL,
            updated_at = now()`
        return last
      })
    )
  )

const recordError = (name: string, message: string) =>
  Effect.flatMap(
    SqlClient.SqlClient,
    (sql) =>
      sql`
      INSERT INTO projection_checkpoints (name, last_error) VALUES (${name}, ${message})
      ON CONFLICT (name) DO UPDATE SET last_error = excluded.last_error, updated_at = now()`
  ).pipe(Effect.ignore)

export interface Options {
  readonly batchSize?: number
  readonly pollInterval?: Duration.DurationInput
}

export const make = (projections: ReadonlyArray<Projection.Any>, options: Options = {}) =>
  Effect.gen(function* () {
    const sql = yield* SqlClient.SqlClient
    const store = yield* EventStore
    const database = yield* Database
    const leaders = yield* Ref.make(new Set<string>())

    yield* Migrations.exclusively(
      Effect.forEach(projections, (projection) => projection.create(Projection.liveTables), { discard: true })
    )

    /** Follows the log from the checkpoint, applying batch after batch, until it fails. */
    const follow = (projection: Projection.Any) =>
      Effect.gen(function* () {
        const from = yield* readCheckpoint(projection.name)
        const position = yield* Ref.make(from)
        yield* store
          .subscribe(from, {
            batchSize: options.batchSize ?? 1000,
            pollInterval: options.pollInterval ?? "1 second"
          })
          .pipe(
            Stream.chunks,
            Stream.runForEach((chunk) => {
              const events = Array.from(chunk)
              if (events.length === 0) return Effect.void
              return Ref.get(position).pipe(
                Effect.flatMap((at) =>
                  applyBatch(projection, Projection.liveTables, projection.name, at, events)
                ),
                Effect.flatMap((last) => Ref.set(position, last))
              )
            })
          )
      })

    /** Runs `projection` while holding its advisory lock (PostgreSQL), or always (embedded). */
    const lead = (projection: Projection.Any) =>
      database.kind === "embedded"
        ? Effect.zipRight(
            Ref.update(leaders, (s) => new Set(s).add(projection.name)),
            follow(projection)
          )
        : Effect.scoped(
            Effect.gen(function* () {
              const connection = yield* sql.reserve
              const [row] = yield* connection.execute(
                "SELECT pg_try_advisory_lock(hashtext($1)) AS locked",
                [lockKey(projection.name)],
                undefined
              )
              if (row?.locked !== true) return // another replica leads; try again later
              // The connection goes back to the pool, where a session lock would outlive this lead
              // and keep every later turn (here or on another replica) from taking it.
              yield* Effect.addFinalizer(() =>
                connection
                  .execute("SELECT pg_advisory_unlock(hashtext($1))", [lockKey(projection.name)], undefined)
                  .pipe(Effect.timeout("2 seconds"), Effect.ignore)
              )
              yield* Ref.update(leaders, (s) => new Set(s).add(projection.name))
              yield* Effect.addFinalizer(() =>
                Ref.update(leaders, (s) => {
                  const next = new Set(s)
                  next.delete(projection.name)
                  return next
                })
              )
              yield* Effect.logInfo("projection running", { projection: projection.name })
              // The lock lives as long as this connection: if it breaks, stop and let the lead go.
              const heartbeat = connection
                .execute("SELECT 1", [], undefined)
                .pipe(Effect.delay(leadershipCheck), Effect.forever)
              yield* Effect.raceFirst(follow(projection), heartbeat)
            })
          )

    /**
     * One turn: lead (or find another replica leading) until something stops it. Every failure
     * is caught, defects included — a connection that dies mid-transaction surfaces as one from
     * the failed ROLLBACK — recorded on the checkpoint row, and followed by another turn.
     */
    const turn = (projection: Projection.Any) =>
      lead(projection).pipe(
        Effect.catchAllCause((cause) => {
          if (Cause.isInterruptedOnly(cause)) return Effect.failCause(cause)
          const failure = Cause.failureOption(cause)
          if (Option.isSome(failure) && failure.value instanceof CheckpointMoved) return Effect.void
          return Effect.zipRight(
            recordError(projection.name, Cause.pretty(cause).split("\n")[0] ?? "failed"),
            Effect.logWarning("projection stopped; restarting", { projection: projection.name }, cause)
          ).pipe(Effect.zipRight(Effect.sleep(restartDelay)))
        })
      )

    const run = (projection: Projection.Any) =>
      turn(projection).pipe(Effect.zipRight(Effect.sleep(leadershipCheck)), Effect.forever)

    yield* Effect.forEach(projections, (p) => Effect.forkScoped(run(p)), { discard: true })

    const status = Effect.gen(function* () {
      const rows = yield* sql<{
        name: string
        position: string
        events_applied: string
        last_error: string | null
      }>`
        SELECT name, position::text AS position, events_applied::text AS events_applied, last_error
        FROM projection_checkpoints ORDER BY name`
      const leading = yield* Ref.get(leaders)
      return projections.map((p): Status => {
        const row = rows.find((r) => r.name === p.name)
        return {
          name: p.name,
          position: row?.position ?? "0",
          eventsApplied: Number(row?.events_applied ?? 0),
          lastError: row?.last_error ?? null,
          leader: leading.has(p.name)
        }
      })
    })

    // The last event committed now (whether or not older transactions are still open), then
    // every projection's checkpoint at or past it.
    const caughtUp = Effect.gen(function* () {
      const [last] = yield* sql<{ transaction_id: string; position: string }>`
        SELECT transaction_id::text AS transaction_id, position::text AS position FROM events
        ORDER BY events.transaction_id DESC, events.position DESC LIMIT 1`
      if (last === undefined) return
      const names = projections.map((p) => p.name)
      const behind = sql.unsafe<{ n: number }>(
        `SELECT count(*)::int AS n FROM unnest($1::text[]) AS p(name)
         LEFT JOIN projection_checkpoints c ON c.name = p.name
         WHERE c.name IS NULL OR (c.transaction_id, c.position) < ($2::xid8, $3::bigint)`,
        [names, last.transaction_id, last.position]
      )
      yield* behind.pipe(
        Effect.flatMap(([row]) => ((row?.n ?? 0) === 0 ? Effect.void : Effect.fail("behind" as const))),
        Effect.retry(Schedule.spaced("25 millis")),
        Effect.catchAll(() => Effect.void)
      )
    })

    // Per projection: events after its checkpoint, counted on the (transaction_id, position)
    // index until the limit; past it, the distance in global positions (gaps make it a little high).
    const lagQuery = sql.unsafe<{ name: string; events: string }>(
      `SELECT p.name,
         (CASE WHEN n.counted < $2 THEN n.counted
          ELSE greatest(n.counted, (SELECT max(position) FROM events) - coalesce(c.position, 0)) END)::text AS events
       FROM unnest($1::text[]) AS p(name)
       LEFT JOIN projection_checkpoints c ON c.name = p.name
       CROSS JOIN LATERAL (
         SELECT count(*) AS counted FROM (
           SELECT 1 FROM events e
           WHERE (e.transaction_id, e.position) > (coalesce(c.transaction_id, '0'::xid8), coalesce(c.position, 0))
           LIMIT $2) AS behind
       ) AS n
       ORDER BY p.name`,
      [projections.map((p) => p.name), lagCountLimit]
    )
    // PGlite runs one statement at a time and cannot cancel one; PostgreSQL cancels it at the limit.
    const lag = (
      database.kind === "embedded"
        ? lagQuery
        : sql.withTransaction(
            Effect.zipRight(sql.unsafe(`SET LOCAL statement_timeout = '${lagStatementTimeout}'`), lagQuery)
          )
    ).pipe(Effect.map((rows) => rows.map((r): Lag => ({ name: r.name, events: Number(r.events) }))))

    return ProjectionRunner.of({ status, caughtUp, lag })
  })

export const layer = (projections: ReadonlyArray<Projection.Any>, options: Options = {}) =>
  Layer.scoped(ProjectionRunner, make(projections, options))
