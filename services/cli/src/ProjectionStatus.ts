/**
 * Where each projection stands: its checkpoint, how many events it applied, its last error, and
 * its lag — the events in the log after its checkpoint. Lists every checkpoint row (a running
 * rebuild shows as `<name>:rebuild`) and the known projections that have none yet.
 */
import { SqlClient } from "@effect/sql"
import { Effect } from "effect"
import * as TextTable from "./TextTable.js"

export interface Status {
  readonly name: string
  readonly position: string
  readonly eventsApplied: string
  readonly lag: string
  readonly lastError: string | null
  readonly updatedAt: Date | null
}

export const read = Effect.fn("ProjectionStatus.read")(function* (known: ReadonlyArray<string>) {
  const sql = yield* SqlClient.SqlClient
  const rows = yield* sql.unsafe<{
    name: string
    position: string
    events_applied: string
    lag: string
    last_error: string | null
    updated_at: Date | null
  }>(
    `SELECT n.name, coalesce(c.position, 0)::text AS position,
      coalesce(c.events_applied, 0)::text AS events_applied,
      (SELECT count(*) FROM events e
       WHERE (e.transaction_id, e.position) > (coalesce(c.transaction_id, '0'::xid8), coalesce(c.position, 0))
      )::text AS lag,
      c.last_error, c.updated_at
    FROM (SELECT name FROM projection_checkpoints UNION SELECT unnest($1::text[])) n
    LEFT JOIN projection_checkpoints c ON c.name = n.name
    ORDER BY n.name`,
    [known]
  )
  return rows.map(
    (row): Status => ({
      name: row.name,
      position: row.position,
      eventsApplied: row.events_applied,
      lag: row.lag,
      lastError: row.last_error,
      updatedAt: row.updated_at
    })
  )
})

export const render = (statuses: ReadonlyArray<Status>) =>
  TextTable.render(
    ["PROJECTION", "POSITION", "APPLIED", "LAG", "UPDATED", "LAST ERROR"],
    statuses.map((s) => [
      s.name,
      s.position,
      s.eventsApplied,
      s.lag,
      s.updatedAt === null ? "never" : s.updatedAt.toISOString(),
      s.lastError ?? "-"
    ])
  )
