/**
 * The gateway's admin API from the tests: tenants, keys and usage, with the admin key the test
 * started the gateway with (`ADMIN_KEY`). Each call dies with the gateway's answer when it is not
 * the expected status, so a failing setup says why.
 */
import { Effect } from "effect"

/** A fresh admin key for one gateway (or a group of replicas sharing it). */
export const newAdminKey = (): string => `gw-admin-test-${crypto.randomUUID().replaceAll("-", "")}`

/** The environment that turns keys on, with this admin key and, when given, limits in Redis. */
export const authEnv = (adminKey: string, redisUrl?: string): Record<string, string> => ({
  GATEWAY_AUTH: "on",
  ADMIN_KEY: adminKey,
  ...(redisUrl === undefined ? {} : { REDIS_URL: redisUrl })
})

export interface LimitsInput {
  readonly requests_per_minute?: number | null
  readonly tokens_per_minute?: number | null
  readonly concurrent_requests?: number | null
  readonly budget_usd?: number | null
  readonly budget_period?: "day" | "month"
}

export interface KeyView {
  readonly id: string
  readonly tenant: string
  readonly name: string
  readonly prefix: string
  readonly models: ReadonlyArray<string> | null
  readonly limits: Record<string, unknown>
  readonly revoked_at: string | null
}

/** One admin call; dies unless the status is `expect`. */
export const adminCall = (
  baseUrl: string,
  adminKey: string,
  method: string,
  path: string,
  body?: unknown,
  expect = 200
): Effect.Effect<any> =>
  Effect.promise(async () => {
    const res = await fetch(`${baseUrl}${path}`, {
      method,
      headers: {
        authorization: `Bearer ${adminKey}`,
        ...(body === undefined ? {} : { "content-type": "application/json" })
      },
      ...(body === undefined ? {} : { body: JSON.stringify(body) })
    })
    const text = await res.text()
    if (res.status !== expect)
      throw new Error(`${method} ${path}: HTTP ${res.status} (expected ${expect}): ${text}`)
    return text.length === 0 ? undefined : JSON.parse(text)
  }).pipe(Effect.orDie)

/** Creates a key; returns its view and its secret (`key`). */
export const createKey = (
  baseUrl: string,
  adminKey: string,
  input: {
    readonly tenant: string
    readonly name: string
    readonly models?: ReadonlyArray<string> | null
    readonly limits?: LimitsInput
    readonly scopes?: ReadonlyArray<"admin" | "internal">
  }
): Effect.Effect<KeyView & { readonly key: string }> =>
  adminCall(baseUrl, adminKey, "POST", "/admin/keys", input, 201)

export const revokeKey = (baseUrl: string, adminKey: string, id: string): Effect.Effect<KeyView> =>
  adminCall(baseUrl, adminKey, "POST", `/admin/keys/${encodeURIComponent(id)}/revoke`, { reason: "test" })

export const changeKey = (
  baseUrl: string,
  adminKey: string,
  id: string,
  change: { readonly limits?: LimitsInput; readonly models?: ReadonlyArray<string> | null }
): Effect.Effect<KeyView> =>
  adminCall(baseUrl, adminKey, "PATCH", `/admin/keys/${encodeURIComponent(id)}`, change)

/** Sets a tenant's limits (creating the tenant first when it does not exist). */
export const tenantLimits = (
  baseUrl: string,
  adminKey: string,
  tenant: string,
  limits: LimitsInput
): Effect.Effect<unknown> =>
  adminCall(baseUrl, adminKey, "PATCH", `/admin/tenants/${encodeURIComponent(tenant)}`, { limits })

export interface UsageRow {
  readonly tenant?: string
  readonly key?: string
  readonly model?: string
  readonly hour?: string
  readonly requests: number
  readonly prompt_tokens: number
  readonly completion_tokens: number
  readonly total_tokens: number
  readonly cost_usd: number
}

/** `GET /admin/usage` with these query parameters. */
export const usage = (
  baseUrl: string,
  adminKey: string,
  query: Readonly<Record<string, string>> = {}
): Effect.Effect<{ readonly data: ReadonlyArray<UsageRow>; readonly total: UsageRow }> =>
  adminCall(baseUrl, adminKey, "GET", `/admin/usage?${new URLSearchParams(query).toString()}`)

/** `Authorization: Bearer <key>`. */
export const bearer = (key: string): Record<string, string> => ({ authorization: `Bearer ${key}` })
