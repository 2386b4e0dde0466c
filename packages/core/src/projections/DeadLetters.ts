/**
 * `dead_letters`: requests that ended failed after every attempt (server-side failures: 5xx,
 * 429, timeouts) and have not been recovered or discarded since. Recovery reads them from here.
 */
import { SqlClient } from "@effect/sql"
import type { EventStore, Projection } from "@gateway/event-store"
import { Effect } from "effect"
import { data, meta } from "./Fields.js"

interface Letter {
  readonly requestId: string
  readonly status: number
  readonly reason: string
  readonly attempts: number
  readonly lastError: string
  readonly deadAt: string
  readonly position: string
}

/** Per request: the letter to keep, or `null` to remove one. */
type Delta = Map<string, Letter | null>

const recoverable = (status: number) => status >= 500 || status === 429

export const projection: Projection.Projection<Delta> = {
  name: "dead_letters",
  tables: ["dead_letters"],
  create: (tables) =>
    Effect.flatMap(SqlClient.SqlClient, (sql) =>
      sql.unsafe(`
        CREATE TABLE IF NOT EXISTS ${tables("dead_letters")} (
          request_id text PRIMARY KEY,
          status int NOT NULL,
          reason text NOT NULL,
          attempts int NOT NULL,
          last_error text NOT NULL,
          dead_at timestamptz NOT NULL,
          position bigint NOT NULL
        )`)
    ),
  empty: () => new Map(),
  evolve: (letters, event: EventStore.RecordedEvent) => {
    const m = meta(event)
    const d = data(event)
    switch (event.type) {
      case "RequestFailed":
        if (recoverable(d.status)) {
          letters.set(m.requestId, {
            requestId: m.requestId,
            status: d.status,
            reason: d.error.reason ?? d.error.code,
            attempts: d.attempts,
            lastError: d.error.message,
            deadAt: m.occurredAt,
            position: event.position
          })
        }
        break
      case "DeadLettered":
        letters.set(m.requestId, {
          requestId: m.requestId,
          status: 0,
          reason: d.reason,
          attempts: d.attempts,
          lastError: d.lastError,
          deadAt: m.occurredAt,
          position: event.position
        })
        break
      case "RequestCompleted":
      case "DeadLetterDiscarded":
        letters.set(m.requestId, null)
        break
    }
    return letters
  },
  apply: (letters, tables) =>
    Effect.gen(function* () {
      if (letters.size === 0) return
      const sql = yield* SqlClient.SqlClient
      const keep = Array.from(letters.values()).filter((l): l is Letter => l !== null)
      const drop = Array.from(letters.entries())
        .filter(([, l]) => l === null)
        .map(([id]) => id)
      if (drop.length > 0) {
        yield* sql.unsafe(`DELETE FROM ${tables("dead_letters")} WHERE request_id = ANY($1::text[])`, [drop])
      }
      if (keep.length > 0) {
        yield* sql.unsafe(
          `INSERT INTO ${tables("dead_letters")} (request_id, status, reason, attempts, last_error, dead_at, position)
           SELECT * FROM unnest($1::text[], $2::int[], $3::text[], $4::int[], $5::text[], $6::timestamptz[], $7::bigint[])
           ON CONFLICT (request_id) DO UPDATE SET status = excluded.status, reason = excluded.reason,
             attempts = excluded.attempts, last_error = excluded.last_error, dead_at = excluded.dead_at,
             position = excluded.position`,
          [
            keep.map((l) => l.requestId),
            keep.map((l) => l.status),
            keep.map((l) => l.reason),
            keep.map((l) => l.attempts),
            keep.map((l) => l.lastError),
            keep.map((l) => l.deadAt),
            keep.map((l) => l.position)
          ]
        )
      }
    })
}
