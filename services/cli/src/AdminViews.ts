/**
 * What the admin commands print with `--json`, and what their tables are drawn from: keys,
 * tenants, usage and backends in the admin HTTP API's snake_case shapes (times as ISO strings),
 * made from the RPC API's values, so that scripts reading `--json` see the same answer whichever
 * API the CLI calls.
 */
import type { RpcSchemas } from "@gateway/client"

/** Limits: `null` is no limit. */
export interface Limits {
  readonly requests_per_minute: number | null
  readonly tokens_per_minute: number | null
  readonly concurrent_requests: number | null
  readonly budget_usd: number | null
  readonly budget_period: string | null
}

export interface ApiKey {
  readonly id: string
  readonly object: "api_key"
  readonly tenant: string
  readonly name: string
  readonly prefix: string
  readonly models: ReadonlyArray<string> | null
  readonly limits: Limits
  readonly scopes: ReadonlyArray<string>
  readonly metadata?: Readonly<Record<string, string>>
  /** The routing policy bound to the key; `null` (or absent) when none. */
  readonly policy?: string | null
  readonly created_at: string
  readonly revoked_at: string | null
  readonly revoked_reason: string | null
}

/** A key just created, with its secret (`key`): the only time the secret is shown. */
export interface CreatedKey extends ApiKey {
  readonly key: string
}

export interface Tenant {
  readonly id: string
  readonly object: "tenant"
  readonly name: string
  readonly limits: Limits
  readonly metadata?: Readonly<Record<string, string>>
  readonly policy?: string | null
  readonly created_at: string
}

/** What `usage` can be grouped by. */
export const usageGroups = ["tenant", "key", "model", "hour"] as const
export type UsageGroup = (typeof usageGroups)[number]

export interface UsageTotals {
  readonly requests: number
  readonly prompt_tokens: number
  readonly completion_tokens: number
  readonly total_tokens: number
  readonly cost_usd: number
}

export interface UsageRow extends UsageTotals {
  readonly tenant?: string | null
  readonly key?: string | null
  readonly model?: string | null
  readonly hour?: string | null
}

export interface UsageReport {
  readonly object: "usage"
  readonly from: string
  readonly to: string
  readonly group_by: ReadonlyArray<UsageGroup>
  readonly data: ReadonlyArray<UsageRow>
  readonly total: UsageTotals
}

/** One backend replica as the gateway replica answering sees it. */
export interface Backend {
  readonly id: string
  readonly model: string
  readonly url: string
  readonly weight: number
  readonly health: "healthy" | "ejected"
  readonly ejected_at: string | null
  readonly circuit: {
    readonly state: "closed" | "open" | "half_open"
    readonly since: string
    readonly consecutive_failures: number
    readonly window_requests: number
    readonly window_failures: number
    readonly opens: number
    /** While open: milliseconds until half-open, else 0. */
    readonly retry_after_ms: number
    readonly probes_in_flight: number
  }
  readonly in_flight: number
  readonly ttft_ewma_ms: number
  readonly latency_ewma_ms: number
  readonly balancer_latency_ms: number
  readonly queue_waiting: number | null
  readonly queue_running: number | null
  readonly requests: number
  readonly failures: number
  readonly last_error: string | null
  readonly last_check_at: string | null
  readonly last_check_ok: boolean | null
}

export interface BackendsReport {
  readonly object: "list"
  readonly data: ReadonlyArray<Backend>
}

const iso = (date: Date | null) => (date === null ? null : date.toISOString())

export const key = (key: RpcSchemas.ApiKey): ApiKey => ({
  id: key.id,
  object: "api_key",
  tenant: key.tenant,
  name: key.name,
  prefix: key.prefix,
  models: key.models,
  limits: key.limits,
  scopes: key.scopes,
  metadata: key.metadata,
  policy: key.policy,
  created_at: key.createdAt.toISOString(),
  revoked_at: iso(key.revokedAt),
  revoked_reason: key.revokedReason
})

export const createdKey = (created: RpcSchemas.CreatedKey): CreatedKey => ({
  ...key(created.key),
  key: created.secret
})

export const tenant = (tenant: RpcSchemas.Tenant): Tenant => ({
  id: tenant.id,
  object: "tenant",
  name: tenant.name,
  limits: tenant.limits,
  metadata: tenant.metadata,
  policy: tenant.policy,
  created_at: tenant.createdAt.toISOString()
})

const totals = (t: RpcSchemas.UsageTotals): UsageTotals => ({
  requests: t.requests,
  prompt_tokens: t.promptTokens,
  completion_tokens: t.completionTokens,
  total_tokens: t.totalTokens,
  cost_usd: t.costUsd
})

export const usage = (report: RpcSchemas.UsageReport): UsageReport => ({
  object: "usage",
  from: report.from.toISOString(),
  to: report.to.toISOString(),
  group_by: report.groupBy,
  data: report.rows.map((row) => {
    // Only the grouped-by fields, in the order of the groups, as the admin API answers.
    const groups: Record<string, string | null> = {}
    for (const g of report.groupBy) {
      groups[g] = g === "hour" ? (row.hour?.toISOString() ?? null) : (row[g] ?? null)
    }
    return { ...groups, ...totals(row) }
  }),
  total: totals(report.total)
})

export const backend = (b: RpcSchemas.BackendStatus): Backend => ({
  id: b.id,
  model: b.model,
  url: b.url,
  weight: b.weight,
  health: b.health,
  ejected_at: iso(b.ejectedAt),
  circuit: {
    state: b.circuit.state,
    since: b.circuit.since.toISOString(),
    consecutive_failures: b.circuit.consecutiveFailures,
    window_requests: b.circuit.windowRequests,
    window_failures: b.circuit.windowFailures,
    opens: b.circuit.opens,
    retry_after_ms: b.circuit.retryAfterMs,
    probes_in_flight: b.circuit.probesInFlight
  },
  in_flight: b.inFlight,
  ttft_ewma_ms: b.ttftEwmaMs,
  latency_ewma_ms: b.latencyEwmaMs,
  balancer_latency_ms: b.balancerLatencyMs,
  queue_waiting: b.queueWaiting,
  queue_running: b.queueRunning,
  requests: b.requests,
  failures: b.failures,
  last_error: b.lastError,
  last_check_at: iso(b.lastCheckAt),
  last_check_ok: b.lastCheckOk
})

export const backends = (replicas: ReadonlyArray<RpcSchemas.BackendStatus>): BackendsReport => ({
  object: "list",
  data: replicas.map(backend)
})
