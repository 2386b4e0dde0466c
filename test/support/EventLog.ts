/**
 * The gateway's database as the resilience tests read it, straight from PostgreSQL (never through
 * a proxy the test may have paused): what is on the books per request, the log's integrity, and
 * whether the projections have caught up with it.
 */
import { SqlClient } from "@effect/sql"
import { PgClient } from "@effect/sql-pg"
import { Context, type Duration, Effect, Layer, Redacted, type Scope } from "effect"
import { eventually } from "./Processes.js"

export interface EventLog {
  /** The number of RequestCompleted events on each of these requests' streams (0 when none). */
  readonly completedPer: (requestIds: ReadonlyArray<string>) => Effect.Effect<ReadonlyMap<string, number>>
  /** Events of any type on these requests' streams. */
  readonly eventsOf: (requestIds: ReadonlyArray<string>) => Effect.Effect<number>
  /** Totals over the whole log. */
  readonly totals: Effect.Effect<{
    readonly events: number
    readonly distinctEventIds: number
    readonly completed: number
    /** Streams whose versions are not exactly 1..n, as `stream: versions`. */
    readonly gapped: ReadonlyArray<string>
    /** Streams without a terminal event (requests cut off by a crash). */
    readonly unfinished: number
  }>
  /** `sum(requests)` of `usage_hourly`. */
  readonly usageRequests: Effect.Effect<number>
  /** Rows of `request_log`. */
  readonly requestLogRows: Effect.Effect<number>
  /** Waits until every projection's checkpoint is at the end of the log (with `timeout`). */
  readonly caughtUp: (timeout: Duration.DurationInput) => Effect.Effect<void>
  /** Any read-only query on the database, for assertions the helpers above do not cover. */
  readonly query: <A extends object>(
    statement: string,
    params?: ReadonlyArray<unknown>
  ) => Effect.Effect<ReadonlyArray<A>>
  /** Waits until no session of a gateway (`application_name` llm-gateway) is left on the database. */
  readonly noGatewaySessions: (timeout: Duration.DurationInput) => Effect.Effect<void>
  /**
   * Takes an EXCLUSIVE lock on `table` (reads go on, writes wait) until the returned effect runs
   * or the scope closes, whichever comes first.
   */
  readonly lockTable: (table: string) => Effect.Effect<Effect.Effect<void>, never, Scope.Scope>
  /** Waits until a statement of another session waits for a lock on `table`. */
  readonly someoneWaitsFor: (table: string) => Effect.Effect<void>
}

const terminal = ["RequestCompleted", "RequestFailed", "RequestCancelled", "RequestRejected"]

/** The projections a gateway runs; each must have a checkpoint at the end of the log. */
const projections = ["request_log", "usage_hourly", "dead_letters"]

export const make = (databaseUrl: string): Effect.Effect<EventLog, never, Scope.Scope> =>
  Effect.gen(function* () {
    const context = yield* Layer.build(
      PgClient.layer({ url: Redacted.make(databaseUrl), maxConnections: 3 })
    ).pipe(Effect.orDie)
    const sql = Context.get(context, SqlClient.SqlClient)
    const query = <A extends object>(statement: string, params: ReadonlyArray<unknown> = []) =>
      sql.unsafe<A>(statement, params).pipe(Effect.orDie)
    const streams = (ids: ReadonlyArray<string>) => ids.map((id) => `request-${id}`)

    const completedPer = (ids: ReadonlyArray<string>) =>
      Effect.map(
        query<{ stream_id: string; n: number }>(
          `SELECT stream_id, count(*)::int AS n FROM events
           WHERE type = 'RequestCompleted' AND stream_id = ANY($1::text[]) GROUP BY stream_id`,
          [streams(ids)]
        ),
        (rows) => {
          const counts = new Map(ids.map((id) => [id, 0]))
          for (const row of rows) counts.set(row.stream_id.slice("request-".length), row.n)
          return counts
        }
      )

    const eventsOf = (ids: ReadonlyArray<string>) =>
      Effect.map(
        query<{ n: number }>(`SELECT count(*)::int AS n FROM events WHERE stream_id = ANY($1::text[])`, [
          streams(ids)
        ]),
        (rows) => rows[0]?.n ?? 0
      )

    const totals = Effect.gen(function* () {
      const [counts] = yield* query<{ events: number; distinct_ids: number; completed: number }>(
        `SELECT count(*)::int AS events, count(DISTINCT event_id)::int AS distinct_ids,
           (count(*) FILTER (WHERE type = 'RequestCompleted'))::int AS completed
         FROM events`
      )
      const gapped = yield* query<{ stream_id: string; versions: string }>(
        `SELECT stream_id, string_agg(stream_version::text, ',' ORDER BY stream_version) AS versions
         FROM events GROUP BY stream_id
         HAVING min(stream_version) <> 1 OR max(stream_version) <> count(*) OR count(DISTINCT stream_version) <> count(*)`
      )
      const [unfinished] = yield* query<{ n: number }>(
        `SELECT count(*)::int AS n FROM (
           SELECT stream_id FROM events GROUP BY stream_id
           HAVING NOT bool_or(type = ANY($1::text[]))) AS s`,
        [terminal]
      )
      return {
        events: counts?.events ?? 0,
        distinctEventIds: counts?.distinct_ids ?? 0,
        completed: counts?.completed ?? 0,
        gapped: gapped.map((row) => `${row.stream_id}: ${row.versions}`),
        unfinished: unfinished?.n ?? 0
      }
    })

    const usageRequests = Effect.map(
      query<{ n: number }>(`SELECT coalesce(sum(requests), 0)::int AS n FROM usage_hourly`),
      (rows) => rows[0]?.n ?? 0
    )

    const requestLogRows = Effect.map(
      query<{ n: number }>(`SELECT count(*)::int AS n FROM request_log`),
      (rows) => rows[0]?.n ?? 0
    )

    // A checkpoint is at the end when no event sorts after it in the log's order.
    const behind = Effect.map(
      query<{ n: number }>(
        `SELECT count(*)::int AS n FROM unnest($1::text[]) AS p(name)
         LEFT JOIN projection_checkpoints c ON c.name = p.name
         WHERE c.name IS NULL OR EXISTS (
           SELECT 1 FROM events e WHERE (e.transaction_id, e.position) > (c.transaction_id, c.position))`,
        [projections]
      ),
      (rows) => rows[0]?.n ?? 0
    )

    const caughtUp = (timeout: Duration.DurationInput) =>
      eventually(
        "every projection's checkpoint at the end of the log",
        Effect.map(behind, (n) => (n === 0 ? true : undefined)),
        timeout
      ).pipe(Effect.asVoid)

    const noGatewaySessions = (timeout: Duration.DurationInput) =>
      eventually(
        "no gateway session left on the database",
        Effect.map(
          query<{ n: number }>(
            `SELECT count(*)::int AS n FROM pg_stat_activity
             WHERE datname = current_database() AND application_name = 'llm-gateway'`
          ),
          (rows) => ((rows[0]?.n ?? 0) === 0 ? true : undefined)
        ),
        timeout
      ).pipe(Effect.asVoid)

    const lockTable = (table: string) =>
      Effect.gen(function* () {
        const connection = yield* sql.reserve
        let held = false
        const release = Effect.suspend(() => {
          if (!held) return Effect.void
          held = false
          return connection.executeRaw("COMMIT", [])
        }).pipe(Effect.orDie, Effect.asVoid)
        yield* Effect.acquireRelease(
          Effect.gen(function* () {
            yield* connection.executeRaw("BEGIN", [])
            held = true
            yield* connection.executeRaw(`LOCK TABLE ${table} IN EXCLUSIVE MODE`, [])
          }),
          () => release
        )
        return release
      }).pipe(Effect.orDie)

    const someoneWaitsFor = (table: string) =>
      eventually(
        `a statement waits for the lock on ${table}`,
        Effect.map(
          query<{ n: number }>(
            `SELECT count(*)::int AS n FROM pg_locks WHERE relation = $1::regclass AND NOT granted`,
            [table]
          ),
          (rows) => ((rows[0]?.n ?? 0) > 0 ? true : undefined)
        ),
        "5 seconds"
      ).pipe(Effect.asVoid)

    return {
      query,
      completedPer,
      eventsOf,
      totals,
      usageRequests,
      requestLogRows,
      caughtUp,
      noGatewaySessions,
      lockTable,
      someoneWaitsFor
    }
  })
