/**
 * The dead-letter queue as callers see it (admin HTTP routes, the RPC API, the CLI): requests
 * that failed after every attempt and fallback (server-side: 5xx, 429, timeouts), kept in the
 * `dead_letters` projection until a retry completes them or an operator discards them. A retry
 * runs the recorded payload again on the request's own stream, so it needs `store_payloads: full`.
 */
import { Schema } from "effect"
import { KeyId, RequestId, TenantId } from "./Ids.js"

const optional = <S extends Schema.Schema.Any>(schema: S) => Schema.optionalWith(schema, { exact: true })

const PositiveInt = Schema.Int.pipe(Schema.greaterThanOrEqualTo(1))

/** How the last retry of a letter still in the queue went (a completed retry clears the letter). */
export const LastRetryOutcome = Schema.Literal(
  /** DeadLetterRetried is recorded and no terminal event followed yet. */
  "running",
  /** Failed again after all attempts (RequestFailed). */
  "failed",
  /** Turned away before any attempt (RequestRejected: a limit, a model no longer allowed …). */
  "rejected",
  /** Cut off (RequestCancelled), e.g. the gateway shut down during the retry. */
  "cancelled"
)
export type LastRetryOutcome = typeof LastRetryOutcome.Type

/** One dead-lettered request, as the `dead_letters` projection has it. */
export class DeadLetter extends Schema.Class<DeadLetter>("DeadLetter")({
  requestId: RequestId,
  tenantId: Schema.NullOr(TenantId),
  keyId: Schema.NullOr(KeyId),
  /** The model as the client named it (`null` when the stream has no RequestReceived). */
  model: Schema.NullOr(Schema.String),
  /** The HTTP status the client got for the last failure (0 when dead-lettered without one). */
  status: Schema.Int,
  /** Why it failed: the backend failure (`Http`, `Timeout`, `Connect` …) or the error code. */
  reason: Schema.String,
  /** Backend calls the last run made. */
  attempts: Schema.NonNegativeInt,
  lastError: Schema.String,
  /** When it (last) failed. */
  deadAt: Schema.Date,
  /** Retries so far. */
  retries: Schema.NonNegativeInt,
  lastRetryAt: Schema.NullOr(Schema.Date),
  lastRetryBy: Schema.NullOr(Schema.String),
  /** `null` before the first retry. */
  lastRetryOutcome: Schema.NullOr(LastRetryOutcome),
  /** The request body was recorded in full (`store_payloads: full`): it can be retried. */
  retryable: Schema.Boolean
}) {}

export const defaultLimit = 50
export const maxLimit = 500

/** Which dead letters to list (or retry in bulk); newest first, paged with `cursor`. */
export const DeadLetterFilter = Schema.Struct({
  tenantId: optional(TenantId),
  model: optional(Schema.String),
  reason: optional(Schema.String),
  /** Dead at or after. */
  since: optional(Schema.Date),
  /** Dead before. */
  until: optional(Schema.Date),
  limit: Schema.optionalWith(Schema.Int.pipe(Schema.between(1, maxLimit)), {
    exact: true,
    default: () => defaultLimit
  }),
  /** `nextCursor` of the previous page. */
  cursor: optional(Schema.String)
}).annotations({ identifier: "DeadLetterFilter" })
export type DeadLetterFilter = typeof DeadLetterFilter.Type
export type DeadLetterFilterInput = typeof DeadLetterFilter.Encoded

/** A page of dead letters; `nextCursor` is `null` on the last page. */
export const DeadLetterPage = Schema.Struct({
  data: Schema.Array(DeadLetter),
  nextCursor: Schema.NullOr(Schema.String)
}).annotations({ identifier: "DeadLetterPage" })
export type DeadLetterPage = typeof DeadLetterPage.Type

/** One event of a request's stream, as stored (for `get`: the whole story of a letter). */
export const StreamEvent = Schema.Struct({
  version: PositiveInt,
  type: Schema.String,
  data: Schema.Unknown,
  /** When it happened in the gateway (metadata `occurredAt`). */
  occurredAt: Schema.String,
  /** The global position in the log (a bigint, as a decimal string). */
  position: Schema.String
}).annotations({ identifier: "StreamEvent" })
export type StreamEvent = typeof StreamEvent.Type

/** A dead letter with every event of its request stream, in version order. */
export const DeadLetterDetail = Schema.Struct({
  letter: DeadLetter,
  events: Schema.Array(StreamEvent)
}).annotations({ identifier: "DeadLetterDetail" })
export type DeadLetterDetail = typeof DeadLetterDetail.Type

/**
 * How one retry ended. `completed`: answered and billed (the letter is cleared);
 * `dead_lettered_again`: failed again after all attempts (the letter stays, one more retry
 * counted); `rejected` / `cancelled`: turned away or cut off before an answer (the letter
 * stays). In a bulk retry the refusals appear as outcomes too: `already_running` (another retry
 * holds the stream), `not_found` (no longer dead-lettered), `not_retryable` (payload not stored
 * in full, or its key revoked).
 */
export const RetryOutcomeKind = Schema.Literal(
  "completed",
  "dead_lettered_again",
  "rejected",
  "cancelled",
  "already_running",
  "not_found",
  "not_retryable"
)
export type RetryOutcomeKind = typeof RetryOutcomeKind.Type

export class RetryOutcome extends Schema.Class<RetryOutcome>("RetryOutcome")({
  requestId: RequestId,
  outcome: RetryOutcomeKind,
  /** Which retry of the letter this was (1 for the first), when one ran. */
  retry: Schema.NullOr(PositiveInt),
  /** The status the run ended with (200 when completed), when one ran. */
  status: Schema.NullOr(Schema.Int),
  /** Why it did not complete, when it did not. */
  error: Schema.NullOr(Schema.String)
}) {}

/** Why a bulk retry stopped where it did. */
export const RetryBatch = Schema.Struct({
  outcomes: Schema.Array(RetryOutcome),
  /** More letters matched than the batch took (retry again to go on). */
  more: Schema.Boolean
}).annotations({ identifier: "RetryBatch" })
export type RetryBatch = typeof RetryBatch.Type

/** Most letters one `retryMatching` call runs (one after another). */
export const maxRetryBatch = 100

// ---------------------------------------------------------------------------------------------
// Errors a caller must handle
// ---------------------------------------------------------------------------------------------

/** No dead letter for this request: it never failed, or it was completed or discarded since. */
export class DeadLetterNotFound extends Schema.TaggedError<DeadLetterNotFound>()("DeadLetterNotFound", {
  requestId: Schema.String
}) {
  override get message() {
    return `No dead-lettered request with id '${this.requestId}'.`
  }
}

/** Why a dead letter cannot be run again. */
export const NotRetryableReason = Schema.Literal(
  /** Recorded with `store_payloads: hash` or `none`: there is nothing to send again. */
  "payload_not_stored",
  /** Its API key has been revoked since (it is not run under another identity). */
  "key_revoked",
  /** Auth is on but the request was recorded without a key, or the key is unknown. */
  "key_unknown"
)
export type NotRetryableReason = typeof NotRetryableReason.Type

/** The letter exists but cannot be retried; it can still be discarded. */
export class DeadLetterNotRetryable extends Schema.TaggedError<DeadLetterNotRetryable>()(
  "DeadLetterNotRetryable",
  {
    requestId: Schema.String,
    reason: NotRetryableReason
  }
) {
  override get message() {
    const why =
      this.reason === "payload_not_stored"
        ? "its payload was not stored in full (events.store_payloads is not 'full')"
        : this.reason === "key_revoked"
          ? "its API key has been revoked"
          : "it was recorded without a known API key"
    return `Request '${this.requestId}' cannot be retried: ${why}.`
  }
}

/** Another retry of this letter holds its stream (running here or on another replica). */
export class DeadLetterRetryInProgress extends Schema.TaggedError<DeadLetterRetryInProgress>()(
  "DeadLetterRetryInProgress",
  {
    requestId: Schema.String
  }
) {
  override get message() {
    return `A retry of request '${this.requestId}' is already running.`
  }
}

export type DeadLetterError = DeadLetterNotFound | DeadLetterNotRetryable | DeadLetterRetryInProgress
