/**
 * Where in the event log a command starts: `--from` as a global position or as a time, turned
 * into a cursor just before the first event (in the log's `(transaction_id, position)` order) at
 * or after it; and the cursor after the last event committed now.
 */
import { SqlClient } from "@effect/sql"
import type { EventStore } from "@gateway/event-store"
import { Effect, Either } from "effect"

/** A `--from` value: a global position, or the first event recorded at or after a time. */
export type StartAt =
  | { readonly _tag: "Position"; readonly position: bigint }
  | { readonly _tag: "Time"; readonly time: Date }

/** `1234` is a position; anything `Date` understands as ISO 8601 (`2026-11-21T18:00Z`) a time. */
export const parse = (text: string): Either.Either<StartAt, string> => {
  const trimmed = text.trim()
  if (/^\d+$/.test(trimmed)) return Either.right({ _tag: "Position", position: BigInt(trimmed) })
  if (/^\d{4}-\d{2}-\d{2}/.test(trimmed)) {
    const time = new Date(trimmed)
    if (!Number.isNaN(time.getTime())) return Either.right({ _tag: "Time", time })
  }
  return Either.left(`'${text}' is neither a position (a whole number) nor an ISO 8601 time`)
}

export const describe = (at: StartAt) =>
  at._tag === "Position"
    ? `position ${at.position}`
    : `the first event recorded at/after ${at.time.toISOString()}`

interface Row {
  readonly transaction_id: string
  readonly position: string
}

/** Just before `row` in log order: the next read starts with it. */
const before = (row: Row): EventStore.Cursor => ({
  transactionId: row.transaction_id,
  position: (BigInt(row.position) - 1n).toString()
})

/** After the last event whose transaction has ended (the next read gets only newer events). */
export const end = Effect.flatMap(SqlClient.SqlClient, (sql) =>
  sql<Row>`
    SELECT transaction_id::text AS transaction_id, position::text AS position FROM events
    WHERE transaction_id < pg_snapshot_xmin(pg_current_snapshot())
    ORDER BY events.transaction_id DESC, events.position DESC LIMIT 1`.pipe(
    Effect.map(
      ([row]): EventStore.Cursor =>
        row === undefined
          ? { transactionId: "0", position: "0" }
          : { transactionId: row.transaction_id, position: row.position }
    )
  )
)

/**
 * The cursor just before the first event at `at`: the event at that position (or the next one),
 * or the first in log order recorded at or after that time (a scan: `recorded_at` has no index).
 * Past the end of the log, the end.
 */
export const resolve = (at: StartAt) =>
  Effect.flatMap(SqlClient.SqlClient, (sql) => {
    const first =
      at._tag === "Position"
        ? sql<Row>`
            SELECT transaction_id::text AS transaction_id, position::text AS position FROM events
            WHERE position >= ${at.position.toString()}::bigint ORDER BY events.position LIMIT 1`
        : sql<Row>`
            SELECT transaction_id::text AS transaction_id, position::text AS position FROM events
            WHERE recorded_at >= ${at.time}
            ORDER BY events.transaction_id, events.position LIMIT 1`
    return Effect.flatMap(first, ([row]) => (row === undefined ? end : Effect.succeed(before(row))))
  })

/** Whether `a` comes before `b` in log order (-1), is `b` (0) or comes after (1). */
export const compare = (a: EventStore.Cursor, b: EventStore.Cursor): -1 | 0 | 1 => {
  const ta = BigInt(a.transactionId)
  const tb = BigInt(b.transactionId)
  if (ta !== tb) return ta < tb ? -1 : 1
  const pa = BigInt(a.position)
  const pb = BigInt(b.position)
  return pa === pb ? 0 : pa < pb ? -1 : 1
}
