/**
 * Errors that cross a boundary (HTTP, later RPC and the event log). The HTTP layer turns each of
 * them into the OpenAI error shape in one place (`@gateway/core/ErrorResponse`).
 */
import { Schema } from "effect"

/**
 * On the errors a completion can end with: the gateway's id of that request (what HTTP sends as
 * `x-gateway-request-id`), set on the RPC API's answers so a caller can find its events or its
 * dead letter; absent elsewhere.
 */
const answered = { requestId: Schema.optional(Schema.String) }

/** The request body or a field of it is wrong; `param` names the field when there is one. */
export class InvalidRequest extends Schema.TaggedError<InvalidRequest>()("InvalidRequest", {
  message: Schema.String,
  param: Schema.NullOr(Schema.String),
  code: Schema.NullOr(Schema.String),
  ...answered
}) {}

/** The body is larger than the configured limit. */
export class PayloadTooLarge extends Schema.TaggedError<PayloadTooLarge>()("PayloadTooLarge", {
  limitBytes: Schema.Number,
  ...answered
}) {
  override get message() {
    return `Request body exceeds the limit of ${this.limitBytes} bytes.`
  }
}

/** No configured model answers to this name. */
export class ModelNotFound extends Schema.TaggedError<ModelNotFound>()("ModelNotFound", {
  model: Schema.String,
  ...answered
}) {
  override get message() {
    return `The model '${this.model}' does not exist or you do not have access to it.`
  }
}

/** No route matches the method and path. */
export class RouteNotFound extends Schema.TaggedError<RouteNotFound>()("RouteNotFound", {
  method: Schema.String,
  path: Schema.String
}) {
  override get message() {
    return `Unknown request URL: ${this.method} ${this.path}.`
  }
}

/** Why talking to a backend failed. */
export const BackendFailure = Schema.Literal(
  /** TCP connect failed (refused, reset, unreachable). */
  "Connect",
  /** No answer within the configured time. */
  "Timeout",
  /** The backend answered with an error status; `status` and `upstream` say which. */
  "Http",
  /** The body broke off or could not be read. */
  "StreamBroken",
  /** The backend answered something that is not the OpenAI wire format. */
  "Protocol",
  /** The backend sent an error event inside a 200 stream. */
  "StreamError",
  /** No replica could be tried: every one is ejected or its circuit is open. */
  "Unavailable"
)
export type BackendFailure = typeof BackendFailure.Type

/** A backend attempt failed. `upstream` is the backend's own error body when it sent one. */
export class BackendError extends Schema.TaggedError<BackendError>()("BackendError", {
  reason: BackendFailure,
  backend: Schema.String,
  status: Schema.optional(Schema.Number),
  detail: Schema.String,
  upstream: Schema.optional(Schema.Unknown),
  /** The backend's `retry-after` header, passed on to the client with a 429 or 503. */
  retryAfter: Schema.optional(Schema.String),
  ...answered
}) {
  override get message() {
    return `Backend ${this.backend} failed (${this.reason}): ${this.detail}`
  }
  /** Worth another attempt (elsewhere or later): connect errors, timeouts, 429 and 5xx. */
  get retryable(): boolean {
    return this.reason !== "Http" || this.status === undefined || this.status === 429 || this.status >= 500
  }
}

/** The gateway cannot take the request now (e.g. not ready, shutting down). */
export class ServiceUnavailable extends Schema.TaggedError<ServiceUnavailable>()("ServiceUnavailable", {
  message: Schema.String,
  ...answered
}) {}

/** No API key, or one that does not exist or was revoked (401 `invalid_api_key`). */
export class Unauthorized extends Schema.TaggedError<Unauthorized>()("Unauthorized", {
  message: Schema.String,
  ...answered
}) {}

/** The key is valid but may not do this: call that model, or use an admin route (403). */
export class Forbidden extends Schema.TaggedError<Forbidden>()("Forbidden", {
  message: Schema.String,
  code: Schema.String,
  ...answered
}) {}

/** Which limit refused a request. */
export const LimitKind = Schema.Literal("requests", "tokens", "concurrent")
export type LimitKind = typeof LimitKind.Type

/** A rate limit is reached (429 `rate_limit_exceeded`); `retryAfterMs` is when to try again. */
export class RateLimited extends Schema.TaggedError<RateLimited>()("RateLimited", {
  limit: LimitKind,
  /** Whose limit: the key's or its tenant's. */
  scope: Schema.Literal("key", "tenant"),
  capacity: Schema.Number,
  requested: Schema.Number,
  retryAfterMs: Schema.Number,
  ...answered
}) {
  override get message() {
    const what =
      this.limit === "requests"
        ? "requests per minute (RPM)"
        : this.limit === "tokens"
          ? "tokens per minute (TPM)"
          : "concurrent requests"
    const wait = Math.max(1, Math.ceil(this.retryAfterMs / 1000))
    return `Rate limit reached for this ${this.scope === "key" ? "API key" : "organization"} on ${what}: limit ${this.capacity}, requested ${this.requested}. Please try again in ${wait}s.`
  }
}

/** The spend budget of the period is used up (429 `insufficient_quota`). */
export class QuotaExceeded extends Schema.TaggedError<QuotaExceeded>()("QuotaExceeded", {
  scope: Schema.Literal("key", "tenant"),
  budgetMicroUsd: Schema.Number,
  period: Schema.String,
  retryAfterMs: Schema.Number,
  ...answered
}) {
  override get message() {
    return `You exceeded the ${this.period}ly budget of this ${this.scope === "key" ? "API key" : "organization"} (${(this.budgetMicroUsd / 1e6).toFixed(2)} USD). It resets at the start of the next ${this.period} (UTC).`
  }
}

/** An admin operation names a tenant or key that does not exist (404). */
export class NotFound extends Schema.TaggedError<NotFound>()("NotFound", {
  what: Schema.Literal("tenant", "key"),
  id: Schema.String
}) {
  override get message() {
    return `No ${this.what} with id '${this.id}'.`
  }
}

/** An admin operation would create something that exists already (409). */
export class Conflict extends Schema.TaggedError<Conflict>()("Conflict", {
  message: Schema.String
}) {}

export type GatewayError =
  | NotFound
  | Conflict
  | Unauthorized
  | Forbidden
  | RateLimited
  | QuotaExceeded
  | InvalidRequest
  | PayloadTooLarge
  | ModelNotFound
  | RouteNotFound
  | BackendError
  | ServiceUnavailable
