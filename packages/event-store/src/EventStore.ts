/**
 * The event log: append with optimistic concurrency, read one stream, read or follow the whole
 * log in a total order that never skips an event of a transaction still in flight.
 *
 * The whole-log order is `(transaction_id, position)`, read only below
 * `pg_snapshot_xmin(pg_current_snapshot())`: every transaction there has ended, so the set is
 * final and a cursor over it neither skips nor repeats an event.
 */
import { SqlClient, type SqlError } from "@effect/sql"
import {
  Cause,
  Chunk,
  Context,
  Duration,
  Effect,
  Layer,
  Option,
  PubSub,
  Ref,
  Schedule,
  Schema,
  Stream
} from "effect"
import { tenancyFilter } from "./Migrations.js"

/** An event to append; `eventId` makes a retried write idempotent. */
export interface NewEvent {
  readonly eventId: string
  readonly type: string
  readonly data: unknown
  readonly metadata: unknown
}

/** An event as stored. `position` is the global position (a bigint, as a decimal string). */
export interface RecordedEvent {
  readonly position: string
  readonly transactionId: string
  readonly eventId: string
  readonly streamId: string
  readonly streamVersion: number
  readonly type: string
  readonly data: unknown
  readonly metadata: unknown
  readonly recordedAt: Date
}

/** A place in the whole-log order: after the event with this transaction id and position. */
export interface Cursor {
  readonly transactionId: string
  readonly position: string
}

/** Before the first event. */
export const start: Cursor = { transactionId: "0", position: "0" }

export const cursorOf = (event: RecordedEvent): Cursor => ({
  transactionId: event.transactionId,
  position: event.position
})

/**
 * What the stream's last version must be for an append to go through: a number (0 for a stream
 * that does not exist yet), or `"any"` to append wherever the stream is.
 */
export type ExpectedVersion = number | "any"

/** The stream moved on since the caller read it. */
export class StreamVersionConflict extends Schema.TaggedError<StreamVersionConflict>()(
  "StreamVersionConflict",
  {
    streamId: Schema.String,
    expected: Schema.Number,
    actual: Schema.Number
  }
) {
  override get message() {
    return `Stream ${this.streamId} is at version ${this.actual}, expected ${this.expected}.`
  }
}

/**
 * The database failed: `Unavailable` when it could not be reached or dropped the connection (the
 * write may succeed later), `Rejected` when it refused the statement (it will not).
 */
export class EventStoreError extends Schema.TaggedError<EventStoreError>()("EventStoreError", {
  operation: Schema.String,
  reason: Schema.Literal("Unavailable", "Rejected"),
  detail: Schema.String
}) {
  override get message() {
    return `Event store ${this.operation} failed: ${this.detail}`
  }
}

/** Events of one stream with the versions they take, as the batching writer hands them over. */
export interface StreamWrite {
  readonly streamId: string
  /** Version of the first event; the others follow it. */
  readonly firstVersion: number
  readonly events: ReadonlyArray<NewEvent>
}

export interface AppendResult {
  /** The stream's version after the append. */
  readonly version: number
  /** Global position of the last event appended. */
  readonly lastPosition: string
}

export interface ReadOptions {
  /** Rows fetched per round trip (default 1000). */
  readonly batchSize?: number | undefined
  /**
   * Only the tenancy streams (`key-*`, `tenant-*`), read through their own index: what the key
   * registry follows without reading every request's events.
   */
  readonly tenancyOnly?: boolean | undefined
}

export interface ReadAllOptions extends ReadOptions {
  /**
   * How long to wait for events already committed but held back by an older transaction still
   * open somewhere on the server (default 5 s); after that the read ends without them.
   */
  readonly settle?: Duration.DurationInput | undefined
}

export interface SubscribeOptions extends ReadOptions {
  /** How often to look for new events when no notification came (default 1 s). */
  readonly pollInterval?: Duration.DurationInput | undefined
}

export class EventStore extends Context.Tag("@gateway/event-store/EventStore")<
  EventStore,
  {
    readonly append: (
      streamId: string,
      events: ReadonlyArray<NewEvent>,
      expected: ExpectedVersion
    ) => Effect.Effect<AppendResult, StreamVersionConflict | EventStoreError>
    /**
     * Writes many streams' events in one statement (group commit). Versions are the caller's;
     * an event whose `eventId` is already stored is skipped, so a retried batch is harmless.
     */
    readonly appendBatch: (writes: ReadonlyArray<StreamWrite>) => Effect.Effect<void, EventStoreError>
    readonly readStream: (
      streamId: string,
      fromVersion?: number
    ) => Effect.Effect<ReadonlyArray<RecordedEvent>, EventStoreError>
    /** The whole log after `from`, up to the events committed when it gets there; then it ends. */
    readonly readAll: (
      from: Cursor,
      options?: ReadAllOptions
    ) => Stream.Stream<RecordedEvent, EventStoreError>
    /** The whole log after `from`, then new events as they are committed; it never ends. */
    readonly subscribe: (
      from: Cursor,
      options?: SubscribeOptions
    ) => Stream.Stream<RecordedEvent, EventStoreError>
    /** The current version of a stream (0 when it has no events). */
    readonly version: (streamId: string) => Effect.Effect<number, EventStoreError>
  }
>() {}

/** An `events` row as selected with `columns`. */
export interface Row {
  readonly position: string
  readonly transaction_id: string
  readonly event_id: string
  readonly stream_id: string
  readonly stream_version: number
  readonly type: string
  readonly data: unknown
  readonly metadata: unknown
  readonly recorded_at: Date
}

/** A selected row as a `RecordedEvent`. */
export const toRecorded = (row: Row): RecordedEvent => ({
  position: row.position,
  transactionId: row.transaction_id,
  eventId: row.event_id,
  streamId: row.stream_id,
  streamVersion: row.stream_version,
  type: row.type,
  data: row.data,
  metadata: row.metadata,
  recordedAt: row.recorded_at
})

/** The select list giving a `Row`, for other readers of the events table (e.g. replays). */
export const columns = `position::text AS position, transaction_id::text AS transaction_id, event_id::text AS event_id,
  stream_id, stream_version, type, data, metadata, recorded_at`

const failed =
  (operation: string) =>
  (error: SqlError.SqlError): EventStoreError =>
    new EventStoreError({ operation, reason: reasonOf(error.cause), detail: describe(error.cause ?? error) })

/**
 * A statement the server refused carries a SQLSTATE; classes 08 (connection), 53 (resources) and
 * 57 (operator intervention, e.g. shutdown) are the server going away, not the statement.
 */
const reasonOf = (cause: unknown): "Unavailable" | "Rejected" => {
  const code = (cause as { code?: unknown } | undefined)?.code
  if (typeof code === "string" && /^[0-9A-Z]{5}$/.test(code)) {
    return /^(08|53|57)/.test(code) ? "Unavailable" : "Rejected"
  }
  return "Unavailable"
}

const describe = (cause: unknown): string => (cause instanceof Error ? cause.message : String(cause))

/** Retries of an `"any"` append that lost a race for the next version. */
const anyVersionRetry = Schedule.exponential("2 millis").pipe(
  Schedule.jittered,
  Schedule.intersect(Schedule.recurs(20))
)

const isUniqueViolation = (error: SqlError.SqlError) =>
  (error.cause as { code?: unknown } | undefined)?.code === "23505"

/** JSON text for a jsonb parameter (node-pg would otherwise send arrays as Postgres arrays). */
const json = (value: unknown) => JSON.stringify(value)

export interface Options {
  /**
   * Signals, besides this process's own appends, that new events may be in the table (e.g.
   * Postgres LISTEN for other replicas' writes). Polling covers what it misses.
   */
  readonly notifications?: Stream.Stream<unknown, unknown> | undefined
}

/** The store on whatever `SqlClient` is provided (PostgreSQL, or PGlite over the wire). */
export const make = (options: Options = {}) =>
  Effect.gen(function* () {
    const sql = yield* SqlClient.SqlClient
    const appended = yield* PubSub.sliding<void>(1)
    if (options.notifications !== undefined) {
      // Followed for the store's lifetime: a dropped LISTEN connection is opened again.
      yield* options.notifications.pipe(
        Stream.runForEach(() => PubSub.publish(appended, undefined)),
        Effect.catchAllCause((cause) =>
          Cause.isInterruptedOnly(cause)
            ? Effect.failCause(cause)
            : Effect.logWarning("event notifications lost; polling until they are back", cause)
        ),
        Effect.zipRight(Effect.sleep("2 seconds")),
        Effect.forever,
        Effect.forkScoped
      )
    }
    const announce = PubSub.publish(appended, undefined)

    const version = (streamId: string) =>
      sql<{
        v: number
      }>`SELECT coalesce(max(stream_version), 0)::int AS v FROM events WHERE stream_id = ${streamId}`.pipe(
        Effect.map((rows) => rows[0]?.v ?? 0),
        Effect.mapError(failed("version"))
      )

    const append = (streamId: string, events: ReadonlyArray<NewEvent>, expected: ExpectedVersion) => {
      if (events.length === 0) {
        return Effect.map(version(streamId), (v) => ({ version: v, lastPosition: "0" }))
      }
      const statement = sql.unsafe<{ current: number; inserted: number; last_position: string | null }>(
        `WITH current AS (
           SELECT coalesce(max(stream_version), 0)::int AS v FROM events WHERE stream_id = $1
         ), inserted AS (
           INSERT INTO events (event_id, stream_id, stream_version, type, data, metadata)
           SELECT e.event_id, $1, current.v + e.ord::int, e.type, e.data, e.metadata
           FROM current, unnest($2::uuid[], $3::text[], $4::jsonb[], $5::jsonb[])
             WITH ORDINALITY AS e(event_id, type, data, metadata, ord)
           WHERE $6::int IS NULL OR current.v = $6::int
           RETURNING position, stream_version
         )
         SELECT current.v AS current,
           (SELECT count(*)::int FROM inserted) AS inserted,
           (SELECT max(position)::text FROM inserted) AS last_position
         FROM current`,
        [
          streamId,
          events.map((e) => e.eventId),
          events.map((e) => e.type),
          events.map((e) => json(e.data)),
          events.map((e) => json(e.metadata)),
          expected === "any" ? null : expected
        ]
      )
      const attempt = statement.pipe(
        Effect.flatMap(([row]) =>
          row !== undefined && row.inserted === events.length
            ? Effect.succeed({ version: row.current + events.length, lastPosition: row.last_position ?? "0" })
            : Effect.fail(
                new StreamVersionConflict({
                  streamId,
                  expected: expected === "any" ? -1 : expected,
                  actual: row?.current ?? 0
                })
              )
        )
      )
      // Two appends saw the same version; the loser hits the unique index. With "any" it goes
      // again at the new end of the stream; with an expected version that is a conflict.
      const raced = (error: StreamVersionConflict | SqlError.SqlError) =>
        error._tag === "SqlError" && isUniqueViolation(error)
      return (
        expected === "any" ? Effect.retry(attempt, { schedule: anyVersionRetry, while: raced }) : attempt
      ).pipe(
        Effect.catchTag("SqlError", (error) =>
          isUniqueViolation(error) && expected !== "any"
            ? Effect.flatMap(version(streamId), (actual) =>
                Effect.fail(new StreamVersionConflict({ streamId, expected, actual }))
              )
            : Effect.fail(failed("append")(error))
        ),
        Effect.tap(() => announce),
        Effect.withSpan("EventStore.append", { attributes: { streamId, events: events.length } })
      )
    }

    const appendBatch = (writes: ReadonlyArray<StreamWrite>) => {
      const ids: Array<string> = []
      const streams: Array<string> = []
      const versions: Array<number> = []
      const types: Array<string> = []
      const data: Array<string> = []
      const metadata: Array<string> = []
      for (const write of writes) {
        write.events.forEach((event, i) => {
          ids.push(event.eventId)
          streams.push(write.streamId)
          versions.push(write.firstVersion + i)
          types.push(event.type)
          data.push(json(event.data))
          metadata.push(json(event.metadata))
        })
      }
      if (ids.length === 0) return Effect.void
      return sql
        .unsafe(
          `INSERT INTO events (event_id, stream_id, stream_version, type, data, metadata)
           SELECT * FROM unnest($1::uuid[], $2::text[], $3::int[], $4::text[], $5::jsonb[], $6::jsonb[])
           ON CONFLICT (event_id) DO NOTHING`,
          [ids, streams, versions, types, data, metadata]
        )
        .pipe(
          Effect.mapError(failed("appendBatch")),
          Effect.zipRight(announce),
          Effect.withSpan("EventStore.appendBatch", { attributes: { events: ids.length } })
        )
    }

    const readStream = (streamId: string, fromVersion = 1) =>
      sql
        .unsafe<Row>(
          `SELECT ${columns} FROM events WHERE stream_id = $1 AND stream_version >= $2 ORDER BY events.stream_version`,
          [streamId, fromVersion]
        )
        .pipe(
          Effect.map((rows) => rows.map(toRecorded)),
          Effect.mapError(failed("readStream"))
        )

    /** One page of the whole log after `cursor`, below the oldest transaction still running. */
    const page = (cursor: Cursor, limit: number, filter: string) =>
      sql
        .unsafe<Row>(
          `SELECT ${columns} FROM events
           WHERE (transaction_id, position) > ($1::xid8, $2::bigint)
             AND transaction_id < pg_snapshot_xmin(pg_current_snapshot())${filter}
           ORDER BY events.transaction_id, events.position
           LIMIT $3`,
          [cursor.transactionId, cursor.position, limit]
        )
        .pipe(
          Effect.map((rows) => rows.map(toRecorded)),
          Effect.mapError(failed("readAll"))
        )

    const filterOf = (options: ReadOptions) => (options.tenancyOnly === true ? ` AND ${tenancyFilter}` : "")

    const pages = (from: Cursor, limit: number, filter: string, onEmpty: Effect.Effect<boolean>) =>
      Stream.paginateChunkEffect(from, (cursor) =>
        Effect.flatMap(page(cursor, limit, filter), (rows) => {
          const last = rows[rows.length - 1]
          if (last !== undefined) {
            return Effect.succeed([Chunk.unsafeFromArray(rows), Option.some(cursorOf(last))] as const)
          }
          return Effect.map(
            onEmpty,
            (more) => [Chunk.empty<RecordedEvent>(), more ? Option.some(cursor) : Option.none()] as const
          )
        })
      )

    /** The last event committed now, whether or not older transactions are still open. */
    const lastCommitted = (filter: string) =>
      sql
        .unsafe<{ transaction_id: string; position: string }>(
          `SELECT transaction_id::text AS transaction_id, position::text AS position FROM events
         WHERE true${filter}
         ORDER BY events.transaction_id DESC, events.position DESC LIMIT 1`
        )
        .pipe(
          Effect.map((rows): Cursor | undefined =>
            rows[0] === undefined
              ? undefined
              : { transactionId: rows[0].transaction_id, position: rows[0].position }
          ),
          Effect.mapError(failed("readAll"))
        )

    const before = (a: Cursor, b: Cursor) => {
      const ta = BigInt(a.transactionId)
      const tb = BigInt(b.transactionId)
      return ta < tb || (ta === tb && BigInt(a.position) < BigInt(b.position))
    }

    // Up to the last event committed when the read starts: events held back by an older open
    // transaction (anywhere on the server) are waited for, later ones are not read.
    const readAll = (from: Cursor, options: ReadAllOptions = {}) =>
      Stream.unwrap(
        Effect.map(lastCommitted(filterOf(options)), (target) => {
          if (target === undefined) return Stream.empty
          const cursor = { current: from }
          const deadline = Date.now() + Duration.toMillis(Duration.decode(options.settle ?? "5 seconds"))
          const waitOrEnd = Effect.suspend(() =>
            before(cursor.current, target) && Date.now() < deadline
              ? Effect.as(Effect.sleep("10 millis"), true)
              : Effect.succeed(false)
          )
          // Per chunk, not per event: a page stays one chunk, which projections apply as one batch.
          return pages(from, options.batchSize ?? 1000, filterOf(options), waitOrEnd).pipe(
            Stream.takeWhile((event) => !before(target, cursorOf(event))),
            Stream.mapChunks((chunk) => {
              const last = Chunk.last(chunk)
              if (last._tag === "Some") cursor.current = cursorOf(last.value)
              return chunk
            })
          )
        })
      )

    /** Committed events after `cursor` that a page cannot return yet: an older transaction is open. */
    const heldBack = (cursor: Cursor, filter: string) =>
      sql
        .unsafe<{ held: boolean }>(
          `SELECT EXISTS (SELECT 1 FROM events WHERE (transaction_id, position) > ($1::xid8, $2::bigint)${filter}) AS held`,
          [cursor.transactionId, cursor.position]
        )
        .pipe(
          Effect.map((rows) => rows[0]?.held === true),
          Effect.orElseSucceed(() => false)
        )

    const subscribe = (from: Cursor, options: SubscribeOptions = {}) =>
      Stream.unwrapScoped(
        Effect.gen(function* () {
          const wakeUps = yield* PubSub.subscribe(appended)
          const poll = Duration.decode(options.pollInterval ?? "1 second")
          const cursor = yield* Ref.make(from)
          // Caught up: wait for an append (here or, via notifications, elsewhere) or the poll —
          // unless events are already there, held back by an older open transaction: then look
          // again shortly, as that transaction will not announce itself.
          const filter = filterOf(options)
          const idle = Effect.flatMap(Ref.get(cursor), (at) => heldBack(at, filter)).pipe(
            Effect.flatMap((held) =>
              held ? Effect.sleep("10 millis") : wakeUps.take.pipe(Effect.timeout(poll), Effect.ignore)
            ),
            Effect.as(true)
          )
          return pages(from, options.batchSize ?? 1000, filter, idle).pipe(
            Stream.mapChunksEffect((chunk) => {
              const last = Chunk.last(chunk)
              return last._tag === "Some"
                ? Effect.as(Ref.set(cursor, cursorOf(last.value)), chunk)
                : Effect.succeed(chunk)
            })
          )
        })
      )

    return EventStore.of({ append, appendBatch, readStream, readAll, subscribe, version })
  })

/** The store on the provided `SqlClient`. */
export const layer = (options: Options = {}): Layer.Layer<EventStore, never, SqlClient.SqlClient> =>
  Layer.scoped(EventStore, make(options))
