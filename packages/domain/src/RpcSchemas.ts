/**
 * What the internal RPC API (`RpcApi`) takes and answers: keys and tenants as the admin API shows
 * them, usage reports, backend and projection status, a request's recorded lifecycle. Inputs are
 * loose where the server checks them (ids, limits): the server applies the same validation as the
 * admin HTTP API, so a bad value is an `InvalidRequest` naming the field, not a decoding defect.
 */
import { Schema } from "effect"
import * as Events from "./Events.js"
import { KeyId, TenantId } from "./Ids.js"
import * as OpenAi from "./OpenAi.js"
import * as Tenancy from "./Tenancy.js"

const optional = <S extends Schema.Schema.Any>(schema: S) => Schema.optionalWith(schema, { exact: true })

// ---------------------------------------------------------------------------------------------
// Tenants and keys
// ---------------------------------------------------------------------------------------------

/**
 * A change of limits (snake_case, money in USD, as the admin API takes it): a field given
 * replaces, `null` removes, a missing one stays. Checked on the server against `Tenancy.LimitsInput`.
 */
export const LimitsChange = Schema.Struct({
  requests_per_minute: optional(Schema.NullOr(Schema.Number)),
  tokens_per_minute: optional(Schema.NullOr(Schema.Number)),
  concurrent_requests: optional(Schema.NullOr(Schema.Number)),
  budget_usd: optional(Schema.NullOr(Schema.Number)),
  budget_period: optional(Tenancy.BudgetPeriod)
}).annotations({ identifier: "LimitsChange" })
export type LimitsChange = typeof LimitsChange.Type

/** Limits as the admin API shows them; `null` is no limit. */
export const LimitsView = Schema.Struct({
  requests_per_minute: Schema.NullOr(Schema.Number),
  tokens_per_minute: Schema.NullOr(Schema.Number),
  concurrent_requests: Schema.NullOr(Schema.Number),
  budget_usd: Schema.NullOr(Schema.Number),
  budget_period: Schema.NullOr(Tenancy.BudgetPeriod)
}).annotations({ identifier: "LimitsView" })
export type LimitsView = typeof LimitsView.Type

/** An API key (never its secret). */
export const ApiKey = Schema.Struct({
  id: KeyId,
  tenant: TenantId,
  name: Schema.String,
  /** The first characters of the secret, to recognise it by (`gw-AbCd`). */
  prefix: Schema.String,
  /** Public model names it may call; `null` for all. */
  models: Schema.NullOr(Schema.Array(Schema.String)),
  limits: LimitsView,
  scopes: Schema.Array(Tenancy.Scope),
  metadata: Tenancy.Metadata,
  policy: Schema.NullOr(Schema.String),
  createdAt: Schema.Date,
  revokedAt: Schema.NullOr(Schema.Date),
  revokedReason: Schema.NullOr(Schema.String)
}).annotations({ identifier: "ApiKey" })
export type ApiKey = typeof ApiKey.Type

/** A key just created, with its secret: shown this once and nowhere else. */
export const CreatedKey = Schema.Struct({
  key: ApiKey,
  secret: Schema.String
}).annotations({ identifier: "CreatedKey" })
export type CreatedKey = typeof CreatedKey.Type

export const NewKey = Schema.Struct({
  /** Created if new (admin callers only). */
  tenant: Schema.String,
  name: Schema.String,
  models: optional(Schema.NullOr(Schema.Array(Schema.String))),
  limits: optional(LimitsChange),
  scopes: optional(Schema.Array(Tenancy.Scope)),
  metadata: optional(Tenancy.Metadata),
  policy: optional(Schema.NullOr(Schema.String))
}).annotations({ identifier: "NewKey" })
export type NewKey = typeof NewKey.Type

export const KeyFilter = Schema.Struct({
  tenant: optional(Schema.String),
  includeRevoked: optional(Schema.Boolean)
}).annotations({ identifier: "KeyFilter" })
export type KeyFilter = typeof KeyFilter.Type

export const KeyUpdate = Schema.Struct({
  id: Schema.String,
  limits: optional(LimitsChange),
  models: optional(Schema.NullOr(Schema.Array(Schema.String))),
  /** Binds a routing policy; `null` unbinds. */
  policy: optional(Schema.NullOr(Schema.String))
}).annotations({ identifier: "KeyUpdate" })
export type KeyUpdate = typeof KeyUpdate.Type

export const KeyRevoke = Schema.Struct({
  id: Schema.String,
  reason: optional(Schema.String)
}).annotations({ identifier: "KeyRevoke" })
export type KeyRevoke = typeof KeyRevoke.Type

export const Tenant = Schema.Struct({
  id: TenantId,
  name: Schema.String,
  limits: LimitsView,
  metadata: Tenancy.Metadata,
  policy: Schema.NullOr(Schema.String),
  createdAt: Schema.Date
}).annotations({ identifier: "Tenant" })
export type Tenant = typeof Tenant.Type

export const NewTenant = Schema.Struct({
  id: Schema.String,
  name: optional(Schema.String),
  limits: optional(LimitsChange),
  metadata: optional(Tenancy.Metadata),
  policy: optional(Schema.NullOr(Schema.String))
}).annotations({ identifier: "NewTenant" })
export type NewTenant = typeof NewTenant.Type

export const TenantUpdate = Schema.Struct({
  id: Schema.String,
  limits: optional(LimitsChange),
  policy: optional(Schema.NullOr(Schema.String))
}).annotations({ identifier: "TenantUpdate" })
export type TenantUpdate = typeof TenantUpdate.Type

/** One id (a key's, a tenant's). */
export const ById = Schema.Struct({ id: Schema.String })

// ---------------------------------------------------------------------------------------------
// Usage
// ---------------------------------------------------------------------------------------------

export const UsageGroup = Schema.Literal("tenant", "key", "model", "hour")
export type UsageGroup = typeof UsageGroup.Type

/**
 * Usage from `usage_hourly` between `from` (its hour included; default 30 days ago) and `to`
 * (default an hour from now), grouped by `groupBy` (default tenant, key, model), optionally
 * only one tenant, key or model.
 */
export const UsageQuery = Schema.Struct({
  from: optional(Schema.Date),
  to: optional(Schema.Date),
  groupBy: optional(Schema.Array(UsageGroup)),
  tenant: optional(Schema.String),
  key: optional(Schema.String),
  model: optional(Schema.String)
}).annotations({ identifier: "UsageQuery" })
export type UsageQuery = typeof UsageQuery.Type

export const UsageTotals = Schema.Struct({
  requests: Schema.Number,
  promptTokens: Schema.Number,
  completionTokens: Schema.Number,
  totalTokens: Schema.Number,
  costUsd: Schema.Number
}).annotations({ identifier: "UsageTotals" })
export type UsageTotals = typeof UsageTotals.Type

/** One group's usage; only the grouped-by fields are present (`null`: requests made without a key). */
export const UsageRow = Schema.Struct({
  tenant: optional(Schema.NullOr(Schema.String)),
  key: optional(Schema.NullOr(Schema.String)),
  model: optional(Schema.NullOr(Schema.String)),
  hour: optional(Schema.Date),
  ...UsageTotals.fields
}).annotations({ identifier: "UsageRow" })
export type UsageRow = typeof UsageRow.Type

export const UsageReport = Schema.Struct({
  from: Schema.Date,
  to: Schema.Date,
  groupBy: Schema.Array(UsageGroup),
  rows: Schema.Array(UsageRow),
  total: UsageTotals
}).annotations({ identifier: "UsageReport" })
export type UsageReport = typeof UsageReport.Type

// ---------------------------------------------------------------------------------------------
// Status
// ---------------------------------------------------------------------------------------------

/** One backend replica as `GET /admin/backends` shows it. */
export const BackendStatus = Schema.Struct({
  id: Schema.String,
  model: Schema.String,
  url: Schema.String,
  weight: Schema.Number,
  health: Schema.Literal("healthy", "ejected"),
  ejectedAt: Schema.NullOr(Schema.Date),
  circuit: Schema.Struct({
    state: Schema.Literal("closed", "open", "half_open"),
    since: Schema.Date,
    consecutiveFailures: Schema.Number,
    windowRequests: Schema.Number,
    windowFailures: Schema.Number,
    opens: Schema.Number,
    retryAfterMs: Schema.Number,
    probesInFlight: Schema.Number
  }),
  inFlight: Schema.Number,
  ttftEwmaMs: Schema.Number,
  latencyEwmaMs: Schema.Number,
  balancerLatencyMs: Schema.Number,
  queueWaiting: Schema.NullOr(Schema.Number),
  queueRunning: Schema.NullOr(Schema.Number),
  requests: Schema.Number,
  failures: Schema.Number,
  lastError: Schema.NullOr(Schema.String),
  lastCheckAt: Schema.NullOr(Schema.Date),
  lastCheckOk: Schema.NullOr(Schema.Boolean)
}).annotations({ identifier: "BackendStatus" })
export type BackendStatus = typeof BackendStatus.Type

/** A projection: its checkpoint, how far behind the log it is, and the last error of its runner. */
export const ProjectionStatus = Schema.Struct({
  name: Schema.String,
  /** The global position of the last event applied (a bigint, as a string). */
  position: Schema.String,
  eventsApplied: Schema.Number,
  /** Events committed after its checkpoint; `null` when it could not be counted now. */
  lag: Schema.NullOr(Schema.Number),
  lastError: Schema.NullOr(Schema.String),
  /** Whether this gateway replica runs it (one replica leads each projection). */
  leader: Schema.Boolean
}).annotations({ identifier: "ProjectionStatus" })
export type ProjectionStatus = typeof ProjectionStatus.Type

// ---------------------------------------------------------------------------------------------
// Events
// ---------------------------------------------------------------------------------------------

/** A stored event this version cannot decode (a newer type, or data that no longer fits). */
export const UndecodedEvent = Schema.TaggedStruct("UndecodedEvent", {
  type: Schema.String,
  data: Schema.Unknown,
  problem: Schema.String
}).annotations({ identifier: "UndecodedEvent" })
export type UndecodedEvent = typeof UndecodedEvent.Type

/** One event of a request's stream, decoded. */
export const RecordedRequestEvent = Schema.Struct({
  position: Schema.String,
  streamVersion: Schema.Number,
  event: Schema.Union(Events.RequestEvent, UndecodedEvent),
  metadata: Schema.NullOr(Events.EventMetadata),
  recordedAt: Schema.Date
}).annotations({ identifier: "RecordedRequestEvent" })
export type RecordedRequestEvent = typeof RecordedRequestEvent.Type

export const ForRequest = Schema.Struct({ requestId: Schema.String })

// ---------------------------------------------------------------------------------------------
// Completions
// ---------------------------------------------------------------------------------------------

const isObject = (u: unknown): u is OpenAi.ChatCompletionRequest =>
  typeof u === "object" && u !== null && !Array.isArray(u)

/**
 * A chat completion request as `POST /v1/chat/completions` takes it. Only its shape (an object)
 * is checked on the wire: the server validates it with the HTTP endpoint's own rules, so a bad
 * field is an `InvalidRequest` naming it, and fields it does not know reach the backend.
 */
export const ChatRequest = Schema.declare(isObject, {
  identifier: "ChatCompletionRequest",
  description: "an OpenAI chat completion request"
})

/**
 * A whole completion as `POST /v1/chat/completions` answers it, with the gateway's id of the
 * request (HTTP's `x-gateway-request-id`), the key to its recorded events (`Events.forRequest`).
 * A failed call's error carries the same id as `requestId` (the key to its dead letter).
 */
export const Completion = Schema.extend(
  OpenAi.ChatCompletion,
  // Optional on the wire: a gateway older than its client does not send it.
  Schema.Struct({ gateway_request_id: optional(Schema.String) })
).annotations({ identifier: "Completion" })
export type Completion = typeof Completion.Type

/** A streamed chunk; the stream's first chunk carries the gateway's id of the request. */
export const CompletionChunk = Schema.extend(
  OpenAi.ChatCompletionChunk,
  Schema.Struct({ gateway_request_id: optional(Schema.String) })
).annotations({ identifier: "CompletionChunk" })
export type CompletionChunk = typeof CompletionChunk.Type

// ---------------------------------------------------------------------------------------------
// Dead letters
// ---------------------------------------------------------------------------------------------

/**
 * Which dead letters (`DeadLetters.DeadLetterFilter`, loose: the server checks the tenant id and
 * the limit, 1 to `DeadLetters.maxLimit`, or `maxRetryBatch` for a retry). A service key's
 * calls are held to its own tenant whatever `tenantId` says (another one is `Forbidden`).
 */
export const DeadLetterQuery = Schema.Struct({
  tenantId: optional(Schema.String),
  model: optional(Schema.String),
  /** The failure's reason as listed (`Http`, `Timeout`, `Connect` …). */
  reason: optional(Schema.String),
  /** Dead at or after. */
  since: optional(Schema.Date),
  /** Dead before. */
  until: optional(Schema.Date),
  limit: optional(Schema.Number),
  /** `nextCursor` of the previous page. */
  cursor: optional(Schema.String)
}).annotations({ identifier: "DeadLetterQuery" })
export type DeadLetterQuery = typeof DeadLetterQuery.Type

/** One letter to retry: its outcome, or a typed refusal (not found, not retryable, running). */
export const RetryOne = Schema.Struct({ requestId: Schema.String }).annotations({ identifier: "RetryOne" })

/** The letters matching a filter, at most `DeadLetters.maxRetryBatch`: refusals are outcomes. */
export const RetryMatching = Schema.Struct({ filter: DeadLetterQuery }).annotations({
  identifier: "RetryMatching"
})

export const DeadLetterRetry = Schema.Union(RetryOne, RetryMatching)
export type DeadLetterRetry = typeof DeadLetterRetry.Type

export const DeadLetterDiscard = Schema.Struct({
  requestId: Schema.String,
  /** Why, for the record (required, not empty). */
  reason: Schema.String
}).annotations({ identifier: "DeadLetterDiscard" })
export type DeadLetterDiscard = typeof DeadLetterDiscard.Type
