/**
 * The gateway's internal RPC API (`@effect/rpc`, served at `/rpc` with NDJSON): completions
 * through the same pipeline as the HTTP endpoint, key and tenant administration, usage, backend
 * and projection status, a request's recorded lifecycle, and the dead-letter queue. Every call is
 * authenticated by the bearer token of its HTTP request: the admin key, a key with the `admin`
 * scope (everything), or a service key with the `internal` scope (its own tenant's data only).
 * Each call names the errors a caller must handle; the typed client (`@gateway/client`) is built
 * from this group.
 */
import { Rpc, RpcGroup } from "@effect/rpc"
import { Schema } from "effect"
import * as DeadLetters from "./DeadLetters.js"
import * as Errors from "./Errors.js"
import * as S from "./RpcSchemas.js"

/** A request id with no recorded events (or none this caller may see). */
export class RequestNotFound extends Schema.TaggedError<RequestNotFound>()("RequestNotFound", {
  requestId: Schema.String
}) {
  override get message() {
    return `No recorded request with id '${this.requestId}'.`
  }
}

/**
 * Every call may fail with these: no or a wrong key (`Unauthorized`), or a key that may not do
 * this (`Forbidden`: `internal_only` without the `internal` scope, `admin_only` for operator
 * calls, `other_tenant` for another tenant's data).
 */
const AuthErrors = [Errors.Unauthorized, Errors.Forbidden] as const

const errors = <const E extends ReadonlyArray<Schema.Schema.All>>(...more: E) =>
  Schema.Union(...AuthErrors, ...more)

/** The failures of the change calls: bad input, unknown id, a concurrent change, the log away. */
const ChangeErrors = errors(
  Errors.InvalidRequest,
  Errors.NotFound,
  Errors.Conflict,
  Errors.ServiceUnavailable
)

/** The failures of a completion: those of `POST /v1/chat/completions`. */
const CompletionErrors = errors(
  Errors.InvalidRequest,
  Errors.PayloadTooLarge,
  Errors.ModelNotFound,
  Errors.RateLimited,
  Errors.QuotaExceeded,
  Errors.BackendError,
  Errors.ServiceUnavailable
)

// ---------------------------------------------------------------------------------------------
// Keys and tenants
// ---------------------------------------------------------------------------------------------

export class KeysCreate extends Rpc.make("Keys.create", {
  payload: S.NewKey,
  success: S.CreatedKey,
  error: ChangeErrors
}) {}

export class KeysList extends Rpc.make("Keys.list", {
  payload: S.KeyFilter,
  success: Schema.Array(S.ApiKey),
  error: errors(Errors.ServiceUnavailable)
}) {}

export class KeysGet extends Rpc.make("Keys.get", {
  payload: S.ById,
  success: S.ApiKey,
  error: errors(Errors.NotFound, Errors.ServiceUnavailable)
}) {}

export class KeysUpdate extends Rpc.make("Keys.update", {
  payload: S.KeyUpdate,
  success: S.ApiKey,
  error: ChangeErrors
}) {}

export class KeysRevoke extends Rpc.make("Keys.revoke", {
  payload: S.KeyRevoke,
  success: S.ApiKey,
  error: ChangeErrors
}) {}

export class TenantsCreate extends Rpc.make("Tenants.create", {
  payload: S.NewTenant,
  success: S.Tenant,
  error: ChangeErrors
}) {}

export class TenantsList extends Rpc.make("Tenants.list", {
  success: Schema.Array(S.Tenant),
  error: errors(Errors.ServiceUnavailable)
}) {}

export class TenantsGet extends Rpc.make("Tenants.get", {
  payload: S.ById,
  success: S.Tenant,
  error: errors(Errors.NotFound, Errors.ServiceUnavailable)
}) {}

export class TenantsUpdate extends Rpc.make("Tenants.update", {
  payload: S.TenantUpdate,
  success: S.Tenant,
  error: ChangeErrors
}) {}

// ---------------------------------------------------------------------------------------------
// Usage, status, events
// ---------------------------------------------------------------------------------------------

export class UsageQuery extends Rpc.make("Usage.query", {
  payload: S.UsageQuery,
  success: S.UsageReport,
  error: errors(Errors.InvalidRequest, Errors.ServiceUnavailable)
}) {}

export class BackendsStatus extends Rpc.make("Backends.status", {
  success: Schema.Array(S.BackendStatus),
  error: errors()
}) {}

export class ProjectionsStatus extends Rpc.make("Projections.status", {
  success: Schema.Array(S.ProjectionStatus),
  error: errors(Errors.ServiceUnavailable)
}) {}

export class EventsForRequest extends Rpc.make("Events.forRequest", {
  payload: S.ForRequest,
  success: Schema.Array(S.RecordedRequestEvent),
  error: errors(RequestNotFound, Errors.InvalidRequest, Errors.ServiceUnavailable)
}) {}

// ---------------------------------------------------------------------------------------------
// Dead letters
// ---------------------------------------------------------------------------------------------

/** Dead letters matching a filter, newest first, a page at a time. */
export class DeadLettersList extends Rpc.make("DeadLetters.list", {
  payload: S.DeadLetterQuery,
  success: DeadLetters.DeadLetterPage,
  error: errors(Errors.InvalidRequest, Errors.ServiceUnavailable)
}) {}

/** A dead letter and every event of its request's stream. */
export class DeadLettersGet extends Rpc.make("DeadLetters.get", {
  payload: S.ForRequest,
  success: DeadLetters.DeadLetterDetail,
  error: errors(DeadLetters.DeadLetterNotFound, Errors.InvalidRequest, Errors.ServiceUnavailable)
}) {}

/**
 * Runs one letter again (`{ requestId }`: its outcome, or a typed refusal) or the letters matching
 * a filter (`{ filter }`: at most `maxRetryBatch`, refusals as outcomes, `more` when more
 * matched), and waits for how each run ended.
 */
export class DeadLettersRetry extends Rpc.make("DeadLetters.retry", {
  payload: S.DeadLetterRetry,
  success: DeadLetters.RetryBatch,
  error: errors(
    DeadLetters.DeadLetterNotFound,
    DeadLetters.DeadLetterNotRetryable,
    DeadLetters.DeadLetterRetryInProgress,
    Errors.InvalidRequest,
    Errors.ServiceUnavailable
  )
}) {}

/** Drops a letter for good, recording why and who; answers the letter as it was. */
export class DeadLettersDiscard extends Rpc.make("DeadLetters.discard", {
  payload: S.DeadLetterDiscard,
  success: DeadLetters.DeadLetter,
  error: errors(
    DeadLetters.DeadLetterNotFound,
    DeadLetters.DeadLetterRetryInProgress,
    Errors.InvalidRequest,
    Errors.ServiceUnavailable
  )
}) {}

// ---------------------------------------------------------------------------------------------
// Completions
// ---------------------------------------------------------------------------------------------

/**
 * A streamed completion: the chunks as they arrive from the backend (the usage chunk last), the
 * first with the gateway's id of the request; a failure carries it as `requestId`.
 */
export class ChatCompletion extends Rpc.make("ChatCompletion", {
  payload: S.ChatRequest,
  success: S.CompletionChunk,
  error: CompletionErrors,
  stream: true
}) {}

/** A whole completion, with the gateway's id of the request; a failure carries it as `requestId`. */
export class ChatCompletionOnce extends Rpc.make("ChatCompletionOnce", {
  payload: S.ChatRequest,
  success: S.Completion,
  error: CompletionErrors
}) {}

/** Administration, usage, status, events and dead letters. */
export const AdminRpcs = RpcGroup.make(
  KeysCreate,
  KeysList,
  KeysGet,
  KeysUpdate,
  KeysRevoke,
  TenantsCreate,
  TenantsList,
  TenantsGet,
  TenantsUpdate,
  UsageQuery,
  BackendsStatus,
  ProjectionsStatus,
  EventsForRequest,
  DeadLettersList,
  DeadLettersGet,
  DeadLettersRetry,
  DeadLettersDiscard
)

/** Completions through the HTTP endpoint's pipeline. */
export const CompletionRpcs = RpcGroup.make(ChatCompletion, ChatCompletionOnce)

/** The whole internal API. */
export const GatewayRpcs = AdminRpcs.merge(CompletionRpcs)
export type GatewayRpcs = typeof GatewayRpcs
