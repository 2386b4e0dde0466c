/**
 * Rebuilds a projection from the event log into fresh tables (`<table>_rebuild`, with a
 * checkpoint of their own, `<name>:rebuild`), then — once caught up, in one transaction holding
 * the live checkpoint's row lock, which pauses the live runner — brings both to the same place
 * in the log, compares them row by row and either swaps the rebuilt tables in (the live
 * checkpoint then describes them) or, to verify only, rolls back.
 *
 * With `from`, the rebuild starts there instead of at the beginning: the rebuilt tables then
 * hold only the events from there on, and a swap replaces the live tables with that.
 *
 * The final transaction has a transaction id (the row lock takes one), so while it compares,
 * every follower of the log waits at the xmin horizon too: keep it short on a busy gateway.
 */
import { SqlClient } from "@effect/sql"
import { EventStore, Projection, ProjectionRunner } from "@gateway/event-store"
import { Chunk, Clock, Effect, Option, Schema, Stream } from "effect"
import * as LogCursor from "./LogCursor.js"
import { Progress } from "./Progress.js"
import * as TableDiff from "./TableDiff.js"
import * as TableSwap from "./TableSwap.js"

export interface Options {
  readonly projection: Projection.Any
  /** Where the rebuild starts; the beginning of the log when none. */
  readonly from: Option.Option<LogCursor.StartAt>
  /** Compare only: roll back instead of swapping. */
  readonly verify: boolean
  /** Events read and applied per transaction. */
  readonly batchSize: number
}

export interface Outcome {
  readonly projection: string
  /** The cursor the rebuild started after. */
  readonly from: EventStore.Cursor
  /** Events applied to the rebuilt tables, all told. */
  readonly eventsApplied: number
  /** Of which applied under the lock, to reach the live checkpoint. */
  readonly appliedUnderLock: number
  /** Events the live tables were behind the rebuild, applied to them under the lock. */
  readonly appliedToLive: number
  /** Where both stood when compared: the live checkpoint afterwards. */
  readonly checkpoint: EventStore.Cursor
  readonly seconds: number
  readonly diffs: ReadonlyArray<TableDiff.TableDiff>
  readonly swapped: boolean
}

export const identical = (outcome: Outcome) => outcome.diffs.every(TableDiff.identical)

/** Where a rebuild writes: `usage_hourly` → `usage_hourly_rebuild`. */
export const rebuildTables: Projection.Tables = (base) => `${base}_rebuild`

export const rebuildCheckpoint = (name: string) => `${name}:rebuild`

/** Another replay of the same projection moved the rebuild checkpoint under this one. */
export class ReplayConflict extends Schema.TaggedError<ReplayConflict>()("ReplayConflict", {
  projection: Schema.String
}) {
  override get message() {
    return `Another replay of ${this.projection} is running (its rebuild checkpoint moved).`
  }
}

/** Carries the outcome out of the transaction that `verify` rolls back. */
class Verified {
  readonly _tag = "Verified"
  constructor(readonly outcome: Outcome) {}
}

/** Drops a rebuild's tables and checkpoint (left over, or after a verify). */
const discard = (projection: Projection.Any) =>
  Effect.flatMap(SqlClient.SqlClient, (sql) =>
    Effect.zipRight(
      Effect.forEach(projection.tables, (base) => sql.unsafe(`DROP TABLE IF EXISTS ${rebuildTables(base)}`), {
        discard: true
      }),
      sql`DELETE FROM projection_checkpoints WHERE name = ${rebuildCheckpoint(projection.name)}`
    )
  )

/**
 * Applies `events` batch by batch (one transaction each, moving checkpoint `checkpoint` from
 * `from`), calling `onBatch` with the running total; returns where it ended and how many.
 */
const applyAll = <E, R>(
  projection: Projection.Any,
  tables: Projection.Tables,
  checkpoint: string,
  from: EventStore.Cursor,
  events: Stream.Stream<EventStore.RecordedEvent, E, R>,
  batchSize: number,
  onBatch: (applied: number, at: EventStore.Cursor) => Effect.Effect<void> = () => Effect.void
) =>
  events.pipe(
    // Batches of `batchSize` whatever chunks the store's stream happens to emit.
    Stream.grouped(batchSize),
    Stream.runFoldEffect({ at: from, applied: 0 }, (state, chunk) => {
      const batch = Array.from(chunk)
      if (batch.length === 0) return Effect.succeed(state)
      return ProjectionRunner.applyBatch(projection, tables, checkpoint, state.at, batch).pipe(
        Effect.map((at) => ({ at, applied: state.applied + batch.length })),
        Effect.tap(({ applied, at }) => onBatch(applied, at))
      )
    }),
    Effect.catchTag("CheckpointMoved", () => Effect.fail(new ReplayConflict({ projection: projection.name })))
  )

/**
 * The events after `after` up to and including `upTo`, page by page. Both are checkpoints, read
 * below the xmin horizon when they were written, so every event up to them has been committed:
 * no need to look at the horizon again (which this very transaction now holds back).
 */
const eventsBetween = (after: EventStore.Cursor, upTo: EventStore.Cursor, pageSize: number) =>
  Stream.paginateChunkEffect(after, (cursor) =>
    Effect.flatMap(SqlClient.SqlClient, (sql) =>
      sql.unsafe<EventStore.Row>(
        `SELECT ${EventStore.columns}
         FROM events
         WHERE (transaction_id, position) > ($1::xid8, $2::bigint)
           AND (transaction_id, position) <= ($3::xid8, $4::bigint)
         ORDER BY events.transaction_id, events.position
         LIMIT $5`,
        [cursor.transactionId, cursor.position, upTo.transactionId, upTo.position, pageSize]
      )
    ).pipe(
      Effect.map((rows) => {
        const events = rows.map(EventStore.toRecorded)
        const last = events[events.length - 1]
        return [
          Chunk.unsafeFromArray(events),
          last === undefined || events.length < pageSize
            ? Option.none()
            : Option.some(EventStore.cursorOf(last))
        ] as const
      })
    )
  )

const formatNumber = (n: number) => Math.round(n).toLocaleString("en-US")

export const replay = Effect.fn("Replay.replay")(
  function* (options: Options) {
    const sql = yield* SqlClient.SqlClient
    const store = yield* EventStore.EventStore
    const progress = yield* Progress
    const { projection } = options
    const checkpoint = rebuildCheckpoint(projection.name)
    const began = yield* Clock.currentTimeMillis

    yield* discard(projection)
    yield* projection.create(Projection.liveTables)
    yield* projection.create(rebuildTables)
    const from = Option.isSome(options.from) ? yield* LogCursor.resolve(options.from.value) : EventStore.start
    yield* sql`
    INSERT INTO projection_checkpoints (name, transaction_id, position)
    VALUES (${checkpoint}, ${from.transactionId}::xid8, ${from.position}::bigint)`

    const report = (applied: number, at: EventStore.Cursor) =>
      Effect.flatMap(Clock.currentTimeMillis, (now) =>
        progress.update(
          `replay ${projection.name}: ${formatNumber(applied)} events applied, ` +
            `${formatNumber(applied / Math.max((now - began) / 1000, 0.001))} events/s, at position ${at.position}`
        )
      )
    const rebuilt = yield* applyAll(
      projection,
      rebuildTables,
      checkpoint,
      from,
      store.readAll(from, { batchSize: options.batchSize }),
      options.batchSize,
      report
    )
    yield* progress.log(
      `replay ${projection.name}: ${formatNumber(rebuilt.applied)} events applied, caught up at position ` +
        `${rebuilt.at.position}; locking the live checkpoint`
    )

    const outcome = yield* sql
      .withTransaction(
        Effect.gen(function* () {
          // The live runner takes this row lock first in each batch: it waits until we are done.
          yield* sql`INSERT INTO projection_checkpoints (name) VALUES (${projection.name}) ON CONFLICT (name) DO NOTHING`
          const [row] = yield* sql<{ transaction_id: string; position: string }>`
          SELECT transaction_id::text AS transaction_id, position::text AS position
          FROM projection_checkpoints WHERE name = ${projection.name} FOR UPDATE`
          const live: EventStore.Cursor =
            row === undefined
              ? EventStore.start
              : { transactionId: row.transaction_id, position: row.position }
          const between = (after: EventStore.Cursor, upTo: EventStore.Cursor) =>
            eventsBetween(after, upTo, options.batchSize)
          const order = LogCursor.compare(rebuilt.at, live)
          // Whichever is behind catches up with the other; the live runner would have done the same.
          const underLock =
            order < 0
              ? yield* applyAll(
                  projection,
                  rebuildTables,
                  checkpoint,
                  rebuilt.at,
                  between(rebuilt.at, live),
                  options.batchSize
                )
              : { at: rebuilt.at, applied: 0 }
          const toLive =
            order > 0
              ? yield* applyAll(
                  projection,
                  Projection.liveTables,
                  projection.name,
                  live,
                  between(live, rebuilt.at),
                  options.batchSize
                )
              : { at: live, applied: 0 }
          const diffs = yield* Effect.forEach(projection.tables, (base) =>
            TableDiff.compare(base, rebuildTables(base))
          )
          const outcome: Outcome = {
            projection: projection.name,
            from,
            eventsApplied: rebuilt.applied + underLock.applied,
            appliedUnderLock: underLock.applied,
            appliedToLive: toLive.applied,
            checkpoint: order < 0 ? live : rebuilt.at,
            seconds: ((yield* Clock.currentTimeMillis) - began) / 1000,
            diffs,
            swapped: !options.verify
          }
          if (options.verify) return yield* Effect.fail(new Verified(outcome))
          for (const base of projection.tables) yield* TableSwap.swap(base, rebuildTables(base))
          yield* sql`DELETE FROM projection_checkpoints WHERE name = ${checkpoint}`
          return outcome
        })
      )
      .pipe(Effect.catchTag("Verified", (verified) => Effect.as(discard(projection), verified.outcome)))
    return outcome
  },
  (effect, options) =>
    // Interrupted or failed: the rebuild's tables would only be in the way.
    Effect.onError(effect, () => Effect.ignore(discard(options.projection)))
)

/** The replay found the rebuilt and live tables different (with `--verify`: exit code 1). */
export class DifferencesFound extends Schema.TaggedError<DifferencesFound>()("DifferencesFound", {
  projection: Schema.String
}) {
  override get message() {
    return `The rebuilt ${this.projection} differs from the live one.`
  }
}

const plural = (n: number, word: string) => `${formatNumber(n)} ${word}${n === 1 ? "" : "s"}`

const sampleLines = (sign: string, side: TableDiff.OneWay) =>
  side.sample.map((row) => `    ${sign} ${JSON.stringify(row)}`)

/** What an operator reads after a replay, as text lines. */
export const report = (outcome: Outcome): ReadonlyArray<string> => {
  const start =
    outcome.from.position === "0" ? "the start of the log" : `after position ${outcome.from.position}`
  const rate = outcome.eventsApplied / Math.max(outcome.seconds, 0.001)
  const lines = [
    `replay ${outcome.projection}: ${plural(outcome.eventsApplied, "event")} applied from ${start} ` +
      `in ${outcome.seconds.toFixed(1)} s (${formatNumber(rate)} events/s)`,
    `compared at position ${outcome.checkpoint.position}` +
      (outcome.appliedUnderLock > 0
        ? `, ${plural(outcome.appliedUnderLock, "event")} applied under the lock`
        : "") +
      (outcome.appliedToLive > 0
        ? `, live tables caught up by ${plural(outcome.appliedToLive, "event")}`
        : "")
  ]
  for (const diff of outcome.diffs) {
    if (TableDiff.identical(diff)) {
      lines.push(`  ${diff.table}: identical (${plural(diff.liveRows, "row")})`)
      continue
    }
    lines.push(
      `  ${diff.table}: ${plural(diff.onlyRebuilt.count, "row")} only in the rebuilt table, ` +
        `${plural(diff.onlyLive.count, "row")} only in the live table ` +
        `(${plural(diff.rebuiltRows, "row")} rebuilt, ${formatNumber(diff.liveRows)} live)`,
      ...(diff.onlyRebuilt.count > 0 ? [`    rebuilt only (+), up to 10:`] : []),
      ...sampleLines("+", diff.onlyRebuilt),
      ...(diff.onlyLive.count > 0 ? [`    live only (-), up to 10:`] : []),
      ...sampleLines("-", diff.onlyLive)
    )
  }
  lines.push(
    outcome.swapped
      ? `swapped: the rebuilt ${outcome.diffs.map((d) => d.table).join(", ")} is live; ` +
          `checkpoint ${outcome.projection} stays at position ${outcome.checkpoint.position}`
      : identical(outcome)
        ? "verified: identical; nothing swapped"
        : "verified: differences found; nothing swapped"
  )
  return lines
}
