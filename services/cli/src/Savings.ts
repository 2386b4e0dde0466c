/**
 * `report savings`: what routing saved, from the event log. For each request a policy routed
 * (an acted `RequestClassified`) that completed, what it cost (its `RequestCompleted.cost`)
 * against what it would have cost on the policy's complex model: its recorded tokens priced at
 * that model's price in the price table its cost names (`price_tables`, by `priceVersion`), so
 * both sides use the prices in force when it ran. The policy's complex model comes from the
 * config. By tenant and by tier, with totals.
 */
import { SqlClient } from "@effect/sql"
import type { Routing } from "@gateway/domain"
import { Effect, Either, Option } from "effect"
import * as RoutingOptions from "./RoutingOptions.js"

export interface Options {
  /** Requests completed at or after this time; from the start of the log when none. */
  readonly from: Option.Option<Date>
  /** Requests completed before this time; up to now when none. */
  readonly to: Option.Option<Date>
  /** Each policy's complex model, from the config. */
  readonly complexModels: ReadonlyMap<string, string>
}

/** Requests of one tenant, tier, policy and price table, as the log has them. */
export interface Group {
  readonly tenant: string
  readonly tier: Routing.Tier
  readonly policy: string
  /** The price table their cost names; `null` when no cost was recorded. */
  readonly priceVersion: string | null
  readonly requests: number
  readonly promptTokens: number
  readonly completionTokens: number
  readonly costMicroUsd: number
}

export interface Line {
  readonly requests: number
  readonly routedMicroUsd: number
  /** Everything on the policy's complex model. */
  readonly baselineMicroUsd: number
  readonly savedMicroUsd: number
  /** Of the baseline; `null` when the baseline costs nothing. */
  readonly savedPercent: number | null
}

export interface Report {
  readonly from: string | null
  readonly to: string | null
  /** Each policy seen in the log, with the complex model its requests are compared with. */
  readonly policies: Readonly<Record<string, string | null>>
  readonly byTenant: ReadonlyArray<Line & { readonly tenant: string }>
  readonly byTier: ReadonlyArray<Line & { readonly tier: Routing.Tier }>
  readonly total: Line
  /** Routed requests that could not be compared, and why. */
  readonly leftOut: ReadonlyArray<{ readonly reason: string; readonly requests: number }>
}

const iso = (time: Option.Option<Date>) => Option.getOrNull(Option.map(time, (t) => t.toISOString()))

/** The routed, completed requests in the range, grouped; the sums are exact. */
const groups = (options: Options) =>
  Effect.flatMap(SqlClient.SqlClient, (sql) =>
    sql<{
      tenant: string
      tier: Routing.Tier
      policy: string
      price_version: string | null
      requests: number
      prompt_tokens: string
      completion_tokens: string
      cost_micro_usd: string | null
    }>`
      WITH completed AS (
        SELECT c.stream_id, c.data, c.metadata,
          coalesce((c.metadata->>'occurredAt')::timestamptz, c.recorded_at) AS at
        FROM events c
        WHERE c.type = 'RequestCompleted' AND c.stream_id LIKE 'request-%'
      )
      SELECT coalesce(c.metadata->>'tenantId', '') AS tenant,
        k.data->>'tier' AS tier,
        k.data->>'policy' AS policy,
        c.data->'cost'->>'priceVersion' AS price_version,
        count(*)::int AS requests,
        sum((c.data->>'promptTokens')::bigint)::text AS prompt_tokens,
        sum((c.data->>'completionTokens')::bigint)::text AS completion_tokens,
        sum((c.data->'cost'->>'amountMicroUsd')::bigint)::text AS cost_micro_usd
      FROM completed c
      JOIN events k ON k.stream_id = c.stream_id
        AND k.type = 'RequestClassified' AND k.data->>'acted' = 'true'
      WHERE (${iso(options.from)}::timestamptz IS NULL OR c.at >= ${iso(options.from)}::timestamptz)
        AND (${iso(options.to)}::timestamptz IS NULL OR c.at < ${iso(options.to)}::timestamptz)
      GROUP BY 1, 2, 3, 4
      ORDER BY 1, 2, 3, 4`.pipe(
      Effect.map((rows) =>
        rows.map(
          (row): Group => ({
            tenant: row.tenant,
            tier: row.tier,
            policy: row.policy,
            priceVersion: row.price_version,
            requests: row.requests,
            promptTokens: Number(row.prompt_tokens),
            completionTokens: Number(row.completion_tokens),
            costMicroUsd: Number(row.cost_micro_usd ?? 0)
          })
        )
      )
    )
  )

/** The price tables of `versions`: model → price. */
const priceTables = (versions: ReadonlyArray<string>) =>
  Effect.flatMap(SqlClient.SqlClient, (sql) =>
    versions.length === 0
      ? Effect.succeed(new Map<string, Readonly<Record<string, RoutingOptions.Price>>>())
      : sql<{ version: string; prices: Record<string, RoutingOptions.Price> | string }>`
          SELECT version, prices FROM price_tables WHERE version IN ${sql.in(versions)}`.pipe(
          Effect.map(
            (rows) =>
              new Map(
                rows.map((row) => [
                  row.version,
                  (typeof row.prices === "string" ? JSON.parse(row.prices) : row.prices) as Readonly<
                    Record<string, RoutingOptions.Price>
                  >
                ])
              )
          )
        )
  )

const line = (requests: number, routed: number, baseline: number): Line => ({
  requests,
  routedMicroUsd: routed,
  baselineMicroUsd: baseline,
  savedMicroUsd: baseline - routed,
  savedPercent: baseline === 0 ? null : (100 * (baseline - routed)) / baseline
})

interface Sum {
  requests: number
  routed: number
  baseline: number
}

/** The complex model's price in the table the group was priced with, or why there is none. */
const complexPrice = (
  group: Group,
  complex: string | undefined,
  prices: ReadonlyMap<string, Readonly<Record<string, RoutingOptions.Price>>>
): Either.Either<RoutingOptions.Price, string> => {
  if (complex === undefined) return Either.left(`policy ${group.policy} is not in the config`)
  if (group.priceVersion === null)
    return Either.left("no cost recorded (the model that answered has no price)")
  const table = prices.get(group.priceVersion)
  if (table === undefined) return Either.left(`price table ${group.priceVersion} is not in price_tables`)
  const price = table[complex]
  return price === undefined
    ? Either.left(`no price for ${complex} in price table ${group.priceVersion}`)
    : Either.right(price)
}

/** Totals the groups; `prices` holds the price tables they name. */
export const summarize = (
  all: ReadonlyArray<Group>,
  prices: ReadonlyMap<string, Readonly<Record<string, RoutingOptions.Price>>>,
  options: Options
): Report => {
  const byTenant = new Map<string, Sum>()
  const byTier = new Map<Routing.Tier, Sum>()
  const total: Sum = { requests: 0, routed: 0, baseline: 0 }
  const leftOut = new Map<string, number>()
  const policies: Record<string, string | null> = {}
  const add = <K>(sums: Map<K, Sum>, key: K, requests: number, routed: number, baseline: number) => {
    const sum = sums.get(key) ?? { requests: 0, routed: 0, baseline: 0 }
    sum.requests += requests
    sum.routed += routed
    sum.baseline += baseline
    sums.set(key, sum)
  }
  for (const group of all) {
    const complex = options.complexModels.get(group.policy)
    policies[group.policy] = complex ?? null
    const price = complexPrice(group, complex, prices)
    if (Either.isLeft(price)) {
      leftOut.set(price.left, (leftOut.get(price.left) ?? 0) + group.requests)
      continue
    }
    // USD per million tokens is micro-USD per token.
    const baseline =
      group.promptTokens * price.right.inputPerMillionUsd +
      group.completionTokens * price.right.outputPerMillionUsd
    add(byTenant, group.tenant, group.requests, group.costMicroUsd, baseline)
    add(byTier, group.tier, group.requests, group.costMicroUsd, baseline)
    total.requests += group.requests
    total.routed += group.costMicroUsd
    total.baseline += baseline
  }
  const toLine = (sum: Sum) => line(sum.requests, sum.routed, sum.baseline)
  return {
    from: iso(options.from),
    to: iso(options.to),
    policies,
    byTenant: Array.from(byTenant, ([tenant, sum]) => ({ tenant, ...toLine(sum) })).sort((a, b) =>
      a.tenant.localeCompare(b.tenant)
    ),
    byTier: (["simple", "moderate", "complex"] as const).flatMap((tier) => {
      const sum = byTier.get(tier)
      return sum === undefined ? [] : [{ tier, ...toLine(sum) }]
    }),
    total: toLine(total),
    leftOut: Array.from(leftOut, ([reason, requests]) => ({ reason, requests }))
  }
}

/** The report of the routed requests in the range. */
export const report = Effect.fn("Savings.report")(function* (options: Options) {
  const all = yield* groups(options)
  const versions = Array.from(new Set(all.flatMap((g) => (g.priceVersion === null ? [] : [g.priceVersion]))))
  return summarize(all, yield* priceTables(versions), options)
})

const cells = (l: Line) => [
  String(l.requests),
  RoutingOptions.usd(l.routedMicroUsd),
  RoutingOptions.usd(l.baselineMicroUsd),
  RoutingOptions.usd(l.savedMicroUsd),
  l.savedPercent === null ? "-" : `${l.savedPercent.toFixed(1)}%`
]

const headers = ["requests", "routed", "on complex", "saved", "saved %"]

/** The report as an operator reads it. */
export const render = (report: Report): ReadonlyArray<string> => {
  const range = `${report.from === null ? "the start of the log" : report.from} to ${report.to ?? "now"}`
  const policies = Object.entries(report.policies)
    .map(([policy, complex]) => `${policy} (complex: ${complex ?? "not in the config"})`)
    .join(", ")
  const leftOut = report.leftOut.map(
    ({ reason, requests }) => `left out: ${requests} request${requests === 1 ? "" : "s"}, ${reason}`
  )
  if (report.total.requests === 0) {
    return [`Savings from routing, ${range}: no routed request completed.`, ...leftOut]
  }
  return [
    `Savings from routing, ${range}: ${report.total.requests} routed request${report.total.requests === 1 ? "" : "s"}; policies ${policies}`,
    "Each request's recorded cost against its tokens at the complex model's price, in the price table it was priced with.",
    "",
    ...RoutingOptions.table(
      ["tenant", ...headers],
      [
        ...report.byTenant.map((l) => [l.tenant === "" ? "-" : l.tenant, ...cells(l)]),
        ["total", ...cells(report.total)]
      ],
      1
    ),
    "",
    ...RoutingOptions.table(
      ["tier", ...headers],
      [...report.byTier.map((l) => [l.tier, ...cells(l)]), ["total", ...cells(report.total)]],
      1
    ),
    ...(leftOut.length > 0 ? ["", ...leftOut] : [])
  ]
}
