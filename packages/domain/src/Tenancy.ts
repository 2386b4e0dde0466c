/**
 * Tenants and API keys, event-sourced: each tenant is the stream `tenant-<id>`, each key the
 * stream `key-<id>`. The key registry every replica holds in memory is a projection of these
 * events, so a revoke recorded by one replica reaches all of them through the log. A key's
 * secret is never recorded: only its SHA-256 and a short prefix to recognise it by.
 */
import type { Either, ParseResult } from "effect"
import { Schema } from "effect"
import { KeyId, TenantId } from "./Ids.js"

const optional = <S extends Schema.Schema.Any>(schema: S) => Schema.optionalWith(schema, { exact: true })

const PositiveInt = Schema.Int.pipe(Schema.greaterThanOrEqualTo(1))

/** How often a spend budget starts again (calendar periods in UTC). */
export const BudgetPeriod = Schema.Literal("day", "month")
export type BudgetPeriod = typeof BudgetPeriod.Type

/** A spend budget: at most `amountMicroUsd` per `period`. */
export const Budget = Schema.Struct({
  amountMicroUsd: Schema.NonNegativeInt,
  period: BudgetPeriod
}).annotations({ identifier: "Budget" })
export type Budget = typeof Budget.Type

/** What a key (or a whole tenant) may use; a missing limit is no limit. */
export const Limits = Schema.Struct({
  requestsPerMinute: optional(PositiveInt),
  tokensPerMinute: optional(PositiveInt),
  concurrentRequests: optional(PositiveInt),
  budget: optional(Budget)
}).annotations({ identifier: "Limits" })
export type Limits = typeof Limits.Type

export const noLimits: Limits = {}

/**
 * Limits as people write them, in the config file and the admin API: snake_case, money in USD.
 * `null` clears a limit in a change (`undefined` leaves it).
 */
export const LimitsInput = Schema.Struct({
  requests_per_minute: Schema.optional(Schema.NullOr(PositiveInt)),
  tokens_per_minute: Schema.optional(Schema.NullOr(PositiveInt)),
  concurrent_requests: Schema.optional(Schema.NullOr(PositiveInt)),
  budget_usd: Schema.optional(Schema.NullOr(Schema.Number.pipe(Schema.nonNegative(), Schema.finite()))),
  budget_period: Schema.optional(BudgetPeriod)
}).annotations({ identifier: "LimitsInput" })
export type LimitsInput = typeof LimitsInput.Type

/** `input` applied over `base`: a field given replaces, `null` removes, a missing one stays. */
export const applyLimits = (base: Limits, input: LimitsInput): Limits => {
  const next: {
    requestsPerMinute?: number
    tokensPerMinute?: number
    concurrentRequests?: number
    budget?: Budget
  } = { ...base }
  const set = <K extends "requestsPerMinute" | "tokensPerMinute" | "concurrentRequests">(
    key: K,
    value: number | null | undefined
  ) => {
    if (value === null) delete next[key]
    else if (value !== undefined) next[key] = value
  }
  set("requestsPerMinute", input.requests_per_minute)
  set("tokensPerMinute", input.tokens_per_minute)
  set("concurrentRequests", input.concurrent_requests)
  if (input.budget_usd === null) delete next.budget
  else if (input.budget_usd !== undefined) {
    next.budget = {
      amountMicroUsd: Math.round(input.budget_usd * 1e6),
      period: input.budget_period ?? base.budget?.period ?? "month"
    }
  } else if (input.budget_period !== undefined && next.budget !== undefined) {
    next.budget = { ...next.budget, period: input.budget_period }
  }
  return next
}

/** Limits as the admin API shows them (the inverse of `LimitsInput`). */
export const limitsOutput = (limits: Limits) => ({
  requests_per_minute: limits.requestsPerMinute ?? null,
  tokens_per_minute: limits.tokensPerMinute ?? null,
  concurrent_requests: limits.concurrentRequests ?? null,
  budget_usd: limits.budget === undefined ? null : limits.budget.amountMicroUsd / 1e6,
  budget_period: limits.budget?.period ?? null
})

/** What a key may do besides calling models: `admin` (everything), `internal` (service RPC). */
export const Scope = Schema.Literal("admin", "internal")
export type Scope = typeof Scope.Type

/** Free-form labels for reporting (team, cost centre, application …). */
export const Metadata = Schema.Record({ key: Schema.String, value: Schema.String })
export type Metadata = typeof Metadata.Type

/** 64 hex digits, the SHA-256 of a key's secret: all that is kept of it. */
export const SecretHash = Schema.String.pipe(Schema.pattern(/^[0-9a-f]{64}$/))

// ---------------------------------------------------------------------------------------------
// Events
// ---------------------------------------------------------------------------------------------

export class TenantCreated extends Schema.TaggedClass<TenantCreated>()("TenantCreated", {
  tenantId: TenantId,
  name: Schema.String,
  limits: Limits,
  /** The routing policy `"model": "auto"` means for the tenant's keys (unless a key has its own). */
  policy: optional(Schema.String),
  metadata: optional(Metadata),
  by: Schema.String
}) {}

export class TenantLimitsChanged extends Schema.TaggedClass<TenantLimitsChanged>()("TenantLimitsChanged", {
  tenantId: TenantId,
  limits: Limits,
  /** A new routing policy binding; `null` removes it, absent keeps it. */
  policy: optional(Schema.NullOr(Schema.String)),
  by: Schema.String
}) {}

export class KeyCreated extends Schema.TaggedClass<KeyCreated>()("KeyCreated", {
  keyId: KeyId,
  tenantId: TenantId,
  name: Schema.String,
  /** SHA-256 of the secret, hex. */
  hash: SecretHash,
  /** The first characters of the secret, to recognise it in a list (`gw-AbCd…`). */
  prefix: Schema.String,
  /** Public model names the key may call; `null` for all. */
  models: Schema.NullOr(Schema.Array(Schema.String)),
  limits: Limits,
  scopes: Schema.Array(Scope),
  metadata: optional(Metadata),
  /** The routing policy any policy name means for this key (`"model": "auto"` → this one). */
  policy: optional(Schema.String),
  by: Schema.String
}) {}

/** New limits or allowed models for a key; a field left out is unchanged. */
export class KeyLimitsChanged extends Schema.TaggedClass<KeyLimitsChanged>()("KeyLimitsChanged", {
  keyId: KeyId,
  limits: optional(Limits),
  models: optional(Schema.NullOr(Schema.Array(Schema.String))),
  /** A new routing policy binding; `null` removes it, absent keeps it. */
  policy: optional(Schema.NullOr(Schema.String)),
  by: Schema.String
}) {}

export class KeyRevoked extends Schema.TaggedClass<KeyRevoked>()("KeyRevoked", {
  keyId: KeyId,
  reason: Schema.String,
  by: Schema.String
}) {}

export const TenancyEvent = Schema.Union(
  TenantCreated,
  TenantLimitsChanged,
  KeyCreated,
  KeyLimitsChanged,
  KeyRevoked
).annotations({ identifier: "TenancyEvent" })
export type TenancyEvent = typeof TenancyEvent.Type
export type TenancyEventType = TenancyEvent["_tag"]

export const tenantStream = (tenantId: TenantId): `tenant-${string}` => `tenant-${tenantId}`
export const keyStream = (keyId: KeyId): `key-${string}` => `key-${keyId}`

/** The stream prefixes holding tenancy events (the registry follows only these). */
export const streamPrefixes = ["key-", "tenant-"] as const

type Encoder = (event: TenancyEvent) => { readonly _tag: TenancyEventType; readonly [key: string]: unknown }
type Decoder = (data: unknown) => Either.Either<TenancyEvent, ParseResult.ParseError>

const encoders = new Map<string, Encoder>(
  TenancyEvent.members.map((member) => [member._tag, Schema.encodeSync(member as any) as Encoder])
)
const decoders = new Map<string, Decoder>(
  TenancyEvent.members.map((member) => [member._tag, Schema.decodeUnknownEither(member as any) as Decoder])
)

/** Plain JSON for the insert: `type` is the tag, `data` the rest. */
export const encodeTenancyEvent = (
  event: TenancyEvent
): { readonly type: TenancyEventType; readonly data: Record<string, unknown> } => {
  const { _tag, ...data } = encoders.get(event._tag)!(event)
  return { type: _tag, data }
}

/** A stored tenancy event, or `undefined` for a type this version does not know. */
export const decodeTenancyEvent = (
  type: string,
  data: unknown
): Either.Either<TenancyEvent, ParseResult.ParseError> | undefined => {
  const decode = decoders.get(type)
  if (decode === undefined) return undefined
  return decode(
    typeof data === "object" && data !== null && !Array.isArray(data) ? { ...data, _tag: type } : data
  )
}
