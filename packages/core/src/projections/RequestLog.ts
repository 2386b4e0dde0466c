/**
 * `request_log`: one row per request, its latest state — the audit trail: who asked what model,
 * which backend answered, status, tokens, cost, latency, time to first token, the error.
 */
import { SqlClient } from "@effect/sql"
import type { EventStore, Projection } from "@gateway/event-store"
import { Effect } from "effect"
import { data, meta } from "./Fields.js"

/** Fields learnt so far in the batch; `undefined` keeps what the table already has. */
interface Row {
  requestId: string
  correlationId?: string | undefined
  keyId?: string | undefined
  tenantId?: string | undefined
  model?: string | undefined
  /** The model the client asked for (`model` is the one that answered, after a fallback). */
  requestedModel?: string | undefined
  backend?: string | undefined
  /** Backend calls made, retries and fallbacks included. */
  attempts?: number | undefined
  /** The routing policy that classified the request, its tier, and whether the route followed it. */
  policy?: string | undefined
  tier?: string | undefined
  routedByTier?: boolean | undefined
  stream?: boolean | undefined
  outcome?: string | undefined
  httpStatus?: number | undefined
  promptTokens?: number | undefined
  completionTokens?: number | undefined
  /** The price table of the completion; cost is computed from it when the row is written. */
  priceVersion?: string | undefined
  latencyMs?: number | undefined
  ttftMs?: number | null | undefined
  error?: string | undefined
  receivedAt?: string | undefined
  finishedAt?: string | undefined
  lastPosition: string
}

const columns: ReadonlyArray<readonly [column: string, type: string, field: keyof Row]> = [
  ["request_id", "text", "requestId"],
  ["correlation_id", "text", "correlationId"],
  ["key_id", "text", "keyId"],
  ["tenant_id", "text", "tenantId"],
  ["model", "text", "model"],
  ["backend", "text", "backend"],
  ["stream", "boolean", "stream"],
  ["outcome", "text", "outcome"],
  ["http_status", "int", "httpStatus"],
  ["prompt_tokens", "int", "promptTokens"],
  ["completion_tokens", "int", "completionTokens"],
  ["latency_ms", "double precision", "latencyMs"],
  ["ttft_ms", "double precision", "ttftMs"],
  ["error", "text", "error"],
  ["received_at", "timestamptz", "receivedAt"],
  ["finished_at", "timestamptz", "finishedAt"],
  ["last_position", "bigint", "lastPosition"],
  ["requested_model", "text", "requestedModel"],
  ["attempts", "int", "attempts"],
  ["policy", "text", "policy"],
  ["tier", "text", "tier"],
  ["routed_by_tier", "boolean", "routedByTier"]
]

/** Columns whose first value stands whatever the batch boundaries (later facts win elsewhere). */
const firstStands = new Set(["received_at", "policy", "tier", "routed_by_tier"])

export const projection: Projection.Projection<Map<string, Row>> = {
  name: "request_log",
  tables: ["request_log"],
  create: (tables) =>
    Effect.flatMap(SqlClient.SqlClient, (sql) =>
      sql
        .unsafe(`
        CREATE TABLE IF NOT EXISTS ${tables("request_log")} (
          request_id text PRIMARY KEY,
          correlation_id text,
          key_id text,
          tenant_id text,
          model text,
          backend text,
          stream boolean,
          outcome text,
          http_status int,
          prompt_tokens int,
          completion_tokens int,
          cost_usd numeric(24, 9),
          latency_ms double precision,
          ttft_ms double precision,
          error text,
          received_at timestamptz,
          finished_at timestamptz,
          last_position bigint NOT NULL
        )`)
        .pipe(
          // Columns added since the first version; a table made before them gets them here.
          Effect.zipRight(
            sql.unsafe(`
            ALTER TABLE ${tables("request_log")}
              ADD COLUMN IF NOT EXISTS requested_model text,
              ADD COLUMN IF NOT EXISTS attempts int,
              ADD COLUMN IF NOT EXISTS policy text,
              ADD COLUMN IF NOT EXISTS tier text,
              ADD COLUMN IF NOT EXISTS routed_by_tier boolean`)
          )
        )
    ),
  empty: () => new Map(),
  evolve: (rows, event: EventStore.RecordedEvent) => {
    const m = meta(event)
    const d = data(event)
    const row: Row = rows.get(m.requestId) ?? { requestId: m.requestId, lastPosition: event.position }
    row.lastPosition = event.position
    row.correlationId ??= m.correlationId
    row.keyId ??= m.keyId
    row.tenantId ??= m.tenantId
    switch (event.type) {
      case "RequestReceived":
        row.model = d.model
        row.requestedModel = d.model
        row.stream = d.stream
        row.outcome ??= "received"
        row.receivedAt = m.occurredAt
        break
      case "RequestRouted":
        row.model = d.model
        row.backend = d.backend
        break
      case "RequestClassified":
        // The first decision stands: the policy the request named is recorded before observers.
        if (row.policy === undefined) {
          row.policy = d.policy
          row.tier = d.tier
          row.routedByTier = d.acted
        }
        break
      case "AttemptStarted":
        row.backend = d.backend
        row.attempts = d.attempt
        break
      case "RequestCompleted":
        // A dead-letter retry can complete a request that failed before: its error is history.
        row.error = undefined
        Object.assign(row, {
          outcome: "completed",
          model: d.model,
          backend: d.backend,
          httpStatus: d.status,
          promptTokens: d.promptTokens,
          completionTokens: d.completionTokens,
          priceVersion: d.cost?.priceVersion ?? undefined,
          latencyMs: d.latencyMs,
          ttftMs: d.ttftMs,
          finishedAt: m.occurredAt
        })
        break
      case "RequestFailed":
        Object.assign(row, {
          outcome: "failed",
          httpStatus: d.status,
          attempts: d.attempts,
          ...(typeof d.lastBackend === "string" ? { backend: d.lastBackend } : {}),
          error: d.error.message,
          finishedAt: m.occurredAt
        })
        break
      case "RequestCancelled":
        Object.assign(row, {
          outcome: "cancelled",
          httpStatus: 499,
          ...(typeof d.promptTokens === "number" ? { promptTokens: d.promptTokens } : {}),
          completionTokens: d.completionTokens ?? d.tokensDelivered,
          latencyMs: d.latencyMs,
          finishedAt: m.occurredAt
        })
        break
      case "RequestRejected":
        Object.assign(row, {
          outcome: "rejected",
          httpStatus: d.status,
          error: d.message,
          finishedAt: m.occurredAt
        })
        row.receivedAt ??= m.occurredAt
        break
      case "DeadLettered":
        Object.assign(row, { outcome: "dead_lettered", error: d.lastError })
        break
    }
    rows.set(m.requestId, row)
    return rows
  },
  apply: (rows, tables) => {
    if (rows.size === 0) return Effect.void
    const all = Array.from(rows.values())
    const names = columns.map(([c]) => c).join(", ")
    const arrays = [
      ...columns.map(([, type], i) => `$${i + 1}::${type}[]`),
      `$${columns.length + 1}::text[]`
    ].join(", ")
    const selected = columns.map(([c]) => `u.${c}`).join(", ")
    const updates = [...columns.slice(1).map(([c]) => c), "cost_usd"]
      .map((c) =>
        // Whatever the batch boundaries: the first arrival time stands, later facts win.
        c === "last_position"
          ? `${c} = excluded.${c}`
          : c === "error"
            ? // Completed (a dead-letter retry after a failure) clears the failure's error.
              `${c} = CASE WHEN excluded.outcome = 'completed' THEN excluded.${c} ELSE coalesce(excluded.${c}, t.${c}) END`
            : firstStands.has(c)
              ? `${c} = coalesce(t.${c}, excluded.${c})`
              : `${c} = coalesce(excluded.${c}, t.${c})`
      )
      .join(",\n           ")
    return Effect.flatMap(SqlClient.SqlClient, (sql) =>
      sql.unsafe(
        `INSERT INTO ${tables("request_log")} AS t (${names}, cost_usd)
         SELECT ${selected},
           (u.prompt_tokens * (p.prices -> u.model ->> 'inputPerMillionUsd')::numeric
             + u.completion_tokens * (p.prices -> u.model ->> 'outputPerMillionUsd')::numeric) / 1000000
         FROM unnest(${arrays}) AS u(${names}, price_version)
         LEFT JOIN price_tables p ON p.version = u.price_version
         ON CONFLICT (request_id) DO UPDATE SET
           ${updates}`,
        [
          ...columns.map(([, , field]) => all.map((row) => row[field] ?? null)),
          all.map((row) => row.priceVersion ?? null)
        ]
      )
    ).pipe(Effect.asVoid)
  }
}
