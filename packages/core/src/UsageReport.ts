/**
 * Usage from the `usage_hourly` projection, summed by the groups asked for: the one query behind
 * the admin API's `GET /admin/usage` and the RPC API's `Usage.query`, which only shape its rows.
 */
import type { SqlClient } from "@effect/sql"
import { Errors } from "@gateway/domain"
import { Effect } from "effect"

export const groupColumns = { tenant: "tenant_id", key: "key_id", model: "model", hour: "hour" } as const
export type Group = keyof typeof groupColumns

export const isGroup = (name: string): name is Group => Object.hasOwn(groupColumns, name)

export interface Query {
  readonly from: Date
  readonly to: Date
  /** Summed per distinct combination of these, in this order (none: one row, the total). */
  readonly groups: ReadonlyArray<Group>
  readonly tenant?: string | undefined
  readonly key?: string | undefined
  readonly model?: string | undefined
}

/** One row: the group's values (`null` for requests made without a key) and the sums. */
export interface Row {
  readonly tenant?: string | null
  readonly key?: string | null
  readonly model?: string | null
  readonly hour?: Date
  readonly requests: number
  readonly promptTokens: number
  readonly completionTokens: number
  readonly costUsd: number
}

const groupValue = (value: unknown): string | null =>
  value === "" || value === null || value === undefined ? null : String(value)

/** The rows of `query`, hours from `from` (its whole hour) up to `to`. */
export const read = (
  sql: SqlClient.SqlClient,
  query: Query
): Effect.Effect<ReadonlyArray<Row>, Errors.ServiceUnavailable> => {
  const groups = Array.from(new Set(query.groups))
  const columns = groups.map((g) => groupColumns[g])
  const filters: Array<string> = []
  const values: Array<unknown> = [query.from.toISOString(), query.to.toISOString()]
  for (const [value, column] of [
    [query.tenant, "tenant_id"],
    [query.key, "key_id"],
    [query.model, "model"]
  ] as const) {
    if (value !== undefined) {
      values.push(value)
      filters.push(`AND ${column} = $${values.length}`)
    }
  }
  return sql
    .unsafe<Record<string, unknown>>(
      `SELECT ${columns.join(", ")}${columns.length > 0 ? "," : ""}
         sum(requests)::bigint AS requests, sum(prompt_tokens)::bigint AS prompt_tokens,
         sum(completion_tokens)::bigint AS completion_tokens, round(coalesce(sum(cost_usd), 0), 9)::text AS cost_usd
       FROM usage_hourly
       WHERE hour >= date_trunc('hour', $1::timestamptz) AND hour < $2::timestamptz ${filters.join(" ")}
       ${columns.length > 0 ? `GROUP BY ${columns.join(", ")} ORDER BY ${columns.join(", ")}` : ""}`,
      values
    )
    .pipe(
      Effect.map((rows) =>
        rows.map((row): Row => {
          const out: { -readonly [K in keyof Row]: Row[K] } = {
            requests: Number(row.requests ?? 0),
            promptTokens: Number(row.prompt_tokens ?? 0),
            completionTokens: Number(row.completion_tokens ?? 0),
            costUsd: Number(row.cost_usd ?? 0)
          }
          for (const g of groups) {
            const value = row[groupColumns[g]]
            if (g === "hour") out.hour = value instanceof Date ? value : new Date(String(value))
            else out[g] = groupValue(value)
          }
          return out
        })
      ),
      Effect.mapError(
        (error) =>
          new Errors.ServiceUnavailable({ message: `Usage cannot be read right now (${error.message}).` })
      )
    )
}
