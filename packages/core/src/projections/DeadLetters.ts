/**
 * `dead_letters`: requests that ended failed after every attempt (server-side failures: 5xx,
 * 429, timeouts) and have not been recovered or discarded since, with their retries: how many,
 * the last one's time, who ran it and how it went. A retry that completes (RequestCompleted) or
 * a discard (DeadLetterDiscarded) clears the letter; a retry that fails again (RequestFailed,
 * after its DeadLetterRetried) keeps it with the new failure. Recovery reads them from here.
 *
 * The request's model and whether its payload was stored in full come from its RequestReceived,
 * read from the log when the letter is written: an event of the same stream, committed before
 * the failure, so a replay finds exactly what the live projection found.
 */
import { SqlClient } from "@effect/sql"
import type { EventStore, Projection } from "@gateway/event-store"
import { Effect } from "effect"
import { data, meta } from "./Fields.js"

interface Failure {
  readonly tenantId: string | null
  readonly keyId: string | null
  readonly status: number
  readonly reason: string
  readonly attempts: number
  readonly lastError: string
  readonly deadAt: string
}

/** What the batch did to one request's letter. */
interface Change {
  /** The letter was cleared (completed or discarded): drop it before the rest applies. */
  clear: boolean
  /** The latest failure: creates the letter, or replaces its failure columns. */
  failure: Failure | undefined
  /** DeadLetterRetried events since. */
  retries: number
  lastRetryAt: string | undefined
  lastRetryBy: string | undefined
  /** How the latest retry went (kept only once the letter has been retried). */
  outcome: string | undefined
  /** The last event that touched the letter. */
  position: string
}

type Delta = Map<string, Change>

const recoverable = (status: number) => status >= 500 || status === 429

const fresh = (position: string, clear: boolean): Change => ({
  clear,
  failure: undefined,
  retries: 0,
  lastRetryAt: undefined,
  lastRetryBy: undefined,
  outcome: undefined,
  position
})

const handled: ReadonlySet<string> = new Set([
  "RequestFailed",
  "DeadLettered",
  "DeadLetterRetried",
  "RequestCompleted",
  "DeadLetterDiscarded",
  "RequestCancelled",
  "RequestRejected"
])

export const projection: Projection.Projection<Delta> = {
  name: "dead_letters",
  tables: ["dead_letters"],
  create: (tables) =>
    Effect.flatMap(SqlClient.SqlClient, (sql) =>
      sql
        .unsafe(`
        CREATE TABLE IF NOT EXISTS ${tables("dead_letters")} (
          request_id text PRIMARY KEY,
          status int NOT NULL,
          reason text NOT NULL,
          attempts int NOT NULL,
          last_error text NOT NULL,
          dead_at timestamptz NOT NULL,
          position bigint NOT NULL
        )`)
        .pipe(
          // Columns added since the first version; a table made before them gets them here.
          Effect.zipRight(
            sql.unsafe(`
            ALTER TABLE ${tables("dead_letters")}
              ADD COLUMN IF NOT EXISTS tenant_id text,
              ADD COLUMN IF NOT EXISTS key_id text,
              ADD COLUMN IF NOT EXISTS model text,
              ADD COLUMN IF NOT EXISTS retryable boolean NOT NULL DEFAULT false,
              ADD COLUMN IF NOT EXISTS retries int NOT NULL DEFAULT 0,
              ADD COLUMN IF NOT EXISTS last_retry_at timestamptz,
              ADD COLUMN IF NOT EXISTS last_retry_by text,
              ADD COLUMN IF NOT EXISTS last_retry_outcome text`)
          )
        )
    ),
  empty: () => new Map(),
  evolve: (letters, event: EventStore.RecordedEvent) => {
    if (!handled.has(event.type)) return letters
    const m = meta(event)
    const d = data(event)
    let change = letters.get(m.requestId)
    if (change === undefined) {
      change = fresh(event.position, false)
      letters.set(m.requestId, change)
    }
    change.position = event.position
    switch (event.type) {
      case "RequestFailed":
        change.outcome = "failed"
        if (recoverable(d.status)) {
          change.failure = {
            tenantId: m.tenantId ?? null,
            keyId: m.keyId ?? null,
            status: d.status,
            reason: d.error.reason ?? d.error.code,
            attempts: d.attempts,
            lastError: d.error.message,
            deadAt: m.occurredAt
          }
        }
        break
      case "DeadLettered":
        change.outcome = "failed"
        change.failure = {
          tenantId: m.tenantId ?? null,
          keyId: m.keyId ?? null,
          status: 0,
          reason: d.reason,
          attempts: d.attempts,
          lastError: d.lastError,
          deadAt: m.occurredAt
        }
        break
      case "DeadLetterRetried":
        change.retries += 1
        change.lastRetryAt = m.occurredAt
        change.lastRetryBy = d.by
        change.outcome = "running"
        break
      case "RequestCancelled":
        change.outcome = "cancelled"
        break
      case "RequestRejected":
        change.outcome = "rejected"
        break
      case "RequestCompleted":
      case "DeadLetterDiscarded":
        letters.set(m.requestId, fresh(event.position, true))
        break
    }
    return letters
  },
  apply: (letters, tables) =>
    Effect.gen(function* () {
      if (letters.size === 0) return
      const sql = yield* SqlClient.SqlClient
      const table = tables("dead_letters")
      const all = Array.from(letters.entries())
      const cleared = all.filter(([, c]) => c.clear).map(([id]) => id)
      const changed = all.filter(
        ([, c]) => c.failure !== undefined || c.retries > 0 || c.outcome !== undefined
      )
      const failed = changed.filter(([, c]) => c.failure !== undefined)
      const f = (c: Change) => c.failure!
      if (cleared.length > 0) {
        yield* sql.unsafe(`DELETE FROM ${table} WHERE request_id = ANY($1::text[])`, [cleared])
      }
      if (changed.length > 0) {
        // Letters that exist: a new failure replaces the last one, retries add up, and the last
        // retry's outcome is kept once there has been a retry. A cancelled or rejected request
        // that never failed has no letter, and gets none.
        yield* sql.unsafe(
          `UPDATE ${table} AS t SET
             status = coalesce(u.status, t.status),
             reason = coalesce(u.reason, t.reason),
             attempts = coalesce(u.attempts, t.attempts),
             last_error = coalesce(u.last_error, t.last_error),
             dead_at = coalesce(u.dead_at, t.dead_at),
             retries = t.retries + u.retries,
             last_retry_at = coalesce(u.last_retry_at, t.last_retry_at),
             last_retry_by = coalesce(u.last_retry_by, t.last_retry_by),
             last_retry_outcome = CASE WHEN t.retries + u.retries > 0
               THEN coalesce(u.outcome, t.last_retry_outcome) END,
             position = u.position
           FROM unnest($1::text[], $2::int[], $3::text[], $4::int[], $5::text[], $6::timestamptz[], $7::int[],
             $8::timestamptz[], $9::text[], $10::text[], $11::bigint[])
             AS u(request_id, status, reason, attempts, last_error, dead_at, retries, last_retry_at,
               last_retry_by, outcome, position)
           WHERE t.request_id = u.request_id`,
          [
            changed.map(([id]) => id),
            changed.map(([, c]) => c.failure?.status ?? null),
            changed.map(([, c]) => c.failure?.reason ?? null),
            changed.map(([, c]) => c.failure?.attempts ?? null),
            changed.map(([, c]) => c.failure?.lastError ?? null),
            changed.map(([, c]) => c.failure?.deadAt ?? null),
            changed.map(([, c]) => c.retries),
            changed.map(([, c]) => c.lastRetryAt ?? null),
            changed.map(([, c]) => c.lastRetryBy ?? null),
            changed.map(([, c]) => c.outcome ?? null),
            changed.map(([, c]) => c.position)
          ]
        )
      }
      if (failed.length > 0) {
        // New letters (the rest were updated above).
        yield* sql.unsafe(
          `INSERT INTO ${table} (request_id, tenant_id, key_id, model, status, reason, attempts,
             last_error, dead_at, retries, last_retry_at, last_retry_by, last_retry_outcome, retryable, position)
           SELECT u.request_id, u.tenant_id, u.key_id, r.data ->> 'model', u.status, u.reason, u.attempts,
             u.last_error, u.dead_at, u.retries, u.last_retry_at, u.last_retry_by,
             CASE WHEN u.retries > 0 THEN u.outcome END,
             coalesce(r.data -> 'payload' ->> 'kind' = 'full', false), u.position
           FROM unnest($1::text[], $2::text[], $3::text[], $4::int[], $5::text[], $6::int[], $7::text[],
             $8::timestamptz[], $9::int[], $10::timestamptz[], $11::text[], $12::text[], $13::bigint[])
             AS u(request_id, tenant_id, key_id, status, reason, attempts, last_error, dead_at, retries,
               last_retry_at, last_retry_by, outcome, position)
           LEFT JOIN LATERAL (
             SELECT e.data FROM events e
             WHERE e.stream_id = 'request-' || u.request_id AND e.type = 'RequestReceived'
             ORDER BY e.stream_version LIMIT 1
           ) r ON true
           ON CONFLICT (request_id) DO NOTHING`,
          [
            failed.map(([id]) => id),
            failed.map(([, c]) => f(c).tenantId),
            failed.map(([, c]) => f(c).keyId),
            failed.map(([, c]) => f(c).status),
            failed.map(([, c]) => f(c).reason),
            failed.map(([, c]) => f(c).attempts),
            failed.map(([, c]) => f(c).lastError),
            failed.map(([, c]) => f(c).deadAt),
            failed.map(([, c]) => c.retries),
            failed.map(([, c]) => c.lastRetryAt ?? null),
            failed.map(([, c]) => c.lastRetryBy ?? null),
            failed.map(([, c]) => c.outcome ?? null),
            failed.map(([, c]) => c.position)
          ]
        )
      }
    })
}
