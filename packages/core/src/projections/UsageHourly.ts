/**
 * `usage_hourly`: requests, tokens and cost per tenant, key, model and hour — what billing reads.
 * Completed requests count, and cancelled ones for what the backend had generated. Cost is computed here, exactly (`numeric`), from the tokens and
 * the price table whose version the event carries: correct a price table, replay, and the bill
 * follows.
 */
import { SqlClient } from "@effect/sql"
import type { EventStore, Projection } from "@gateway/event-store"
import { Effect } from "effect"
import { data, hourOf, meta } from "./Fields.js"

interface Row {
  hour: string
  tenantId: string
  keyId: string
  model: string
  requests: number
  promptTokens: number
  completionTokens: number
  priceVersion: string
}

export const projection: Projection.Projection<Map<string, Row>> = {
  name: "usage_hourly",
  tables: ["usage_hourly"],
  create: (tables) =>
    Effect.flatMap(SqlClient.SqlClient, (sql) =>
      sql.unsafe(`
        CREATE TABLE IF NOT EXISTS ${tables("usage_hourly")} (
          hour timestamptz NOT NULL,
          tenant_id text NOT NULL,
          key_id text NOT NULL,
          model text NOT NULL,
          requests bigint NOT NULL,
          prompt_tokens bigint NOT NULL,
          completion_tokens bigint NOT NULL,
          cost_usd numeric(24, 9) NOT NULL,
          PRIMARY KEY (hour, tenant_id, key_id, model)
        )`)
    ),
  empty: () => new Map(),
  evolve: (rows, event: EventStore.RecordedEvent) => {
    if (event.type !== "RequestCompleted" && event.type !== "RequestCancelled") return rows
    const d = data(event)
    // A cancelled request is billed for what the backend generated, when it had started.
    if (event.type === "RequestCancelled" && typeof d.promptTokens !== "number") return rows
    const m = meta(event)
    const hour = hourOf(m.occurredAt)
    const tenantId = m.tenantId ?? ""
    const keyId = m.keyId ?? ""
    const priceVersion: string = d.cost?.priceVersion ?? ""
    const key = `${hour}\u0000${tenantId}\u0000${keyId}\u0000${d.model}\u0000${priceVersion}`
    const row = rows.get(key) ?? {
      hour,
      tenantId,
      keyId,
      model: d.model as string,
      requests: 0,
      promptTokens: 0,
      completionTokens: 0,
      priceVersion
    }
    row.requests += 1
    row.promptTokens += d.promptTokens as number
    row.completionTokens += d.completionTokens as number
    rows.set(key, row)
    return rows
  },
  apply: (rows, tables) => {
    if (rows.size === 0) return Effect.void
    const all = Array.from(rows.values())
    return Effect.flatMap(SqlClient.SqlClient, (sql) =>
      sql.unsafe(
        `INSERT INTO ${tables("usage_hourly")} AS t
           (hour, tenant_id, key_id, model, requests, prompt_tokens, completion_tokens, cost_usd)
         SELECT u.hour, u.tenant_id, u.key_id, u.model, sum(u.requests), sum(u.prompt_tokens),
           sum(u.completion_tokens),
           coalesce(sum((u.prompt_tokens * (p.prices -> u.model ->> 'inputPerMillionUsd')::numeric
             + u.completion_tokens * (p.prices -> u.model ->> 'outputPerMillionUsd')::numeric) / 1000000), 0)
         FROM unnest($1::timestamptz[], $2::text[], $3::text[], $4::text[], $5::bigint[], $6::bigint[],
           $7::bigint[], $8::text[])
           AS u(hour, tenant_id, key_id, model, requests, prompt_tokens, completion_tokens, price_version)
         LEFT JOIN price_tables p ON p.version = u.price_version
         GROUP BY u.hour, u.tenant_id, u.key_id, u.model
         ON CONFLICT (hour, tenant_id, key_id, model) DO UPDATE SET
           requests = t.requests + excluded.requests,
           prompt_tokens = t.prompt_tokens + excluded.prompt_tokens,
           completion_tokens = t.completion_tokens + excluded.completion_tokens,
           cost_usd = t.cost_usd + excluded.cost_usd`,
        [
          all.map((r) => r.hour),
          all.map((r) => r.tenantId),
          all.map((r) => r.keyId),
          all.map((r) => r.model),
          all.map((r) => r.requests),
          all.map((r) => r.promptTokens),
          all.map((r) => r.completionTokens),
          all.map((r) => r.priceVersion)
        ]
      )
    ).pipe(Effect.asVoid)
  }
}
