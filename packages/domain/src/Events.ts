/**
 * The request-lifecycle event catalogue: what is appended to the stream `request-<requestId>`.
 * Usage, billing, audit and the dead-letter queue are projections that replay these events, so
 * each carries everything they need. Stored as jsonb and read back years later: only add
 * optional fields or new literals; a rename or a new meaning is a new event type.
 */
import { Clock, Effect, Either, Option, ParseResult, Schema } from "effect"
import { BackendFailure } from "./Errors.js"
import { BackendId, KeyId, ModelName, RequestId, TenantId } from "./Ids.js"
import { Cost } from "./Pricing.js"
import { Features, Tier } from "./Routing.js"

const optional = <S extends Schema.Schema.Any>(schema: S) => Schema.optionalWith(schema, { exact: true })

const PositiveInt = Schema.Int.pipe(Schema.greaterThanOrEqualTo(1))
const Tokens = Schema.NonNegativeInt
const Millis = Schema.NonNegative.pipe(Schema.finite())
const HttpStatus = Schema.Int.pipe(Schema.between(100, 599))

// ---------------------------------------------------------------------------------------------
// Payload reference
// ---------------------------------------------------------------------------------------------

/** How much of the request body `RequestReceived` keeps (config `store_payloads`, default `hash`). */
export const PayloadMode = Schema.Literal("full", "hash", "none")
export type PayloadMode = typeof PayloadMode.Type

export const PayloadNone = Schema.Struct({ kind: Schema.Literal("none") }).annotations({
  identifier: "PayloadNone"
})

/** Proves what was sent without keeping it: prompts can hold private data. */
export const PayloadHash = Schema.Struct({
  kind: Schema.Literal("hash"),
  sha256: Schema.String.pipe(Schema.pattern(/^[0-9a-f]{64}$/)),
  bytes: Schema.NonNegativeInt
}).annotations({ identifier: "PayloadHash" })

/** The request JSON itself; what dead-letter recovery needs to send the request again. */
export const PayloadFull = Schema.Struct({
  kind: Schema.Literal("full"),
  body: Schema.Unknown,
  bytes: Schema.NonNegativeInt
}).annotations({ identifier: "PayloadFull" })

export const Payload = Schema.Union(PayloadNone, PayloadHash, PayloadFull).annotations({
  identifier: "Payload"
})
export type Payload = typeof Payload.Type

// ---------------------------------------------------------------------------------------------
// Events
// ---------------------------------------------------------------------------------------------

/** The gateway accepted the connection and read the body; `model` is as the client sent it. */
export class RequestReceived extends Schema.TaggedClass<RequestReceived>()("RequestReceived", {
  model: Schema.String,
  stream: Schema.Boolean,
  endpoint: Schema.Literal("chat.completions"),
  /** The OpenAI `user` field, when the client sent one. */
  user: optional(Schema.String),
  payload: Payload
}) {}

/** Why a request was refused before any backend was tried. */
export const RejectionReason = Schema.Literal(
  "invalid_request",
  "model_not_found",
  "payload_too_large",
  "rate_limited",
  "quota_exceeded",
  "unauthorized",
  "forbidden",
  "unavailable"
)
export type RejectionReason = typeof RejectionReason.Type

/** Refused before routing (terminal); `status` is what the client got. */
export class RequestRejected extends Schema.TaggedClass<RequestRejected>()("RequestRejected", {
  reason: RejectionReason,
  status: HttpStatus,
  message: Schema.String
}) {}

/** Why the router picked this model and backend. */
export const RouteReason = Schema.Literal("requested", "round_robin", "tier", "fallback", "retry")
export type RouteReason = typeof RouteReason.Type

/** The router chose a target; recorded again on each fallback or retry. */
export class RequestRouted extends Schema.TaggedClass<RequestRouted>()("RequestRouted", {
  /** The public model name. */
  model: ModelName,
  backend: BackendId,
  upstreamModel: Schema.String,
  why: RouteReason,
  /** E.g. the tier and score, or the error that caused the fallback. */
  detail: optional(Schema.String)
}) {}

/**
 * The classifier's decision for a request that named a routing policy (or a model a policy
 * observes): the tier, the score and the features behind it, and whether the route followed it
 * (`acted: false` in shadow mode), so decisions can be audited and re-evaluated by replay.
 */
export class RequestClassified extends Schema.TaggedClass<RequestClassified>()("RequestClassified", {
  policy: Schema.String,
  tier: Tier,
  score: Schema.Number,
  features: Features,
  /** The model the policy chose for the tier. */
  model: ModelName,
  acted: Schema.Boolean,
  /** The second opinion's tier, when one was asked and answered in time. */
  secondOpinion: optional(Tier)
}) {}

/** A call to a backend began; `attempt` counts from 1 across retries and fallbacks. */
export class AttemptStarted extends Schema.TaggedClass<AttemptStarted>()("AttemptStarted", {
  attempt: PositiveInt,
  backend: BackendId,
  model: ModelName
}) {}

export const AttemptError = Schema.Struct({
  reason: BackendFailure,
  status: optional(HttpStatus),
  message: Schema.String
}).annotations({ identifier: "AttemptError" })
export type AttemptError = typeof AttemptError.Type

/** A backend call failed; after the first byte it cannot be retried without the client noticing. */
export class AttemptFailed extends Schema.TaggedClass<AttemptFailed>()("AttemptFailed", {
  attempt: PositiveInt,
  backend: BackendId,
  error: AttemptError,
  retryable: Schema.Boolean,
  afterFirstByte: Schema.Boolean
}) {}

/** Whether token counts came from the backend's `usage` or were estimated by the gateway. */
export const UsageSource = Schema.Literal("backend", "estimated")
export type UsageSource = typeof UsageSource.Type

/** The client got a whole answer (terminal); what usage and billing are built from. */
export class RequestCompleted extends Schema.TaggedClass<RequestCompleted>()("RequestCompleted", {
  /** The model that answered (after fallback), by public name. */
  model: ModelName,
  backend: BackendId,
  promptTokens: Tokens,
  completionTokens: Tokens,
  cachedTokens: optional(Tokens),
  usageSource: UsageSource,
  /** `null` when no price is configured for the model. */
  cost: Schema.NullOr(Cost),
  latencyMs: Millis,
  /** Time to first token; `null` for a non-streaming request. */
  ttftMs: Schema.NullOr(Millis),
  finishReason: Schema.NullOr(Schema.String),
  /** Served from the response cache. */
  cached: Schema.Boolean,
  stream: Schema.Boolean,
  status: HttpStatus,
  /** Backend calls it took, retries and fallbacks included (absent in early records: 1). */
  attempts: optional(PositiveInt)
}) {}

export const FailureError = Schema.Struct({
  /** The OpenAI error `code` or `type` the client got. */
  code: Schema.String,
  message: Schema.String,
  reason: optional(Schema.String)
}).annotations({ identifier: "FailureError" })
export type FailureError = typeof FailureError.Type

/** The request ended in an error after routing (terminal); `attempts` may be 0. */
export class RequestFailed extends Schema.TaggedClass<RequestFailed>()("RequestFailed", {
  status: HttpStatus,
  error: FailureError,
  attempts: Schema.NonNegativeInt,
  lastBackend: optional(BackendId),
  /** Completion tokens the client had been sent when a stream broke (not billed). */
  tokensDelivered: optional(Tokens)
}) {}

/** The client went away before the end (terminal); tokens already delivered are still billed. */
export class RequestCancelled extends Schema.TaggedClass<RequestCancelled>()("RequestCancelled", {
  /** Completion tokens sent before the disconnect. */
  tokensDelivered: Tokens,
  latencyMs: Millis,
  afterFirstByte: Schema.Boolean,
  /**
   * What the backend generated, billed like a completed request: read from its usage (it was
   * drained after the disconnect) or estimated. Absent when no backend had started answering.
   */
  model: optional(ModelName),
  backend: optional(BackendId),
  promptTokens: optional(Tokens),
  completionTokens: optional(Tokens),
  usageSource: optional(UsageSource),
  cost: optional(Schema.NullOr(Cost))
}) {}

/** Given up on and parked for an operator (terminal for the request). */
export class DeadLettered extends Schema.TaggedClass<DeadLettered>()("DeadLettered", {
  reason: Schema.String,
  attempts: Schema.NonNegativeInt,
  lastError: Schema.String
}) {}

/**
 * An operator sent a dead-lettered request again; `by` names who. The new run's events follow
 * on the same stream (RequestRouted, AttemptStarted … RequestCompleted or RequestFailed); it is
 * appended at the stream's next version, so two concurrent retries cannot both start.
 */
export class DeadLetterRetried extends Schema.TaggedClass<DeadLetterRetried>()("DeadLetterRetried", {
  by: Schema.String,
  /** Which retry of the request this is, from 1 (absent in early records). */
  retry: optional(PositiveInt),
  /** The failure being retried: its status and reason (absent in early records). */
  previousStatus: optional(Schema.Int),
  previousReason: optional(Schema.String)
}) {}

/** An operator dropped a dead-lettered request for good. */
export class DeadLetterDiscarded extends Schema.TaggedClass<DeadLetterDiscarded>()("DeadLetterDiscarded", {
  reason: Schema.String,
  by: Schema.String
}) {}

/** Any event on a `request-<id>` stream. */
export const RequestEvent = Schema.Union(
  RequestReceived,
  RequestRejected,
  RequestRouted,
  RequestClassified,
  AttemptStarted,
  AttemptFailed,
  RequestCompleted,
  RequestFailed,
  RequestCancelled,
  DeadLettered,
  DeadLetterRetried,
  DeadLetterDiscarded
).annotations({ identifier: "RequestEvent" })
export type RequestEvent = typeof RequestEvent.Type
export type RequestEventType = RequestEvent["_tag"]

/** The events that end a request's lifecycle; exactly one of them settles a request. */
export const terminalTags = [
  "RequestCompleted",
  "RequestFailed",
  "RequestCancelled",
  "RequestRejected",
  "DeadLettered"
] as const satisfies ReadonlyArray<RequestEventType>
export type TerminalEvent = Extract<RequestEvent, { readonly _tag: (typeof terminalTags)[number] }>

const terminal: ReadonlySet<string> = new Set(terminalTags)

export const isTerminal = (event: RequestEvent): event is TerminalEvent => terminal.has(event._tag)

/** The stream holding one request's lifecycle. */
export const streamIdOf = (requestId: RequestId): `request-${string}` => `request-${requestId}`

// ---------------------------------------------------------------------------------------------
// Metadata
// ---------------------------------------------------------------------------------------------

const IsoTimestamp = Schema.String.pipe(
  Schema.pattern(/^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$/, {
    message: () => "must be an ISO 8601 timestamp"
  })
)

/** Stored beside every event (jsonb `metadata`); ties it to its request, trace and key. */
export const EventMetadata = Schema.Struct({
  requestId: RequestId,
  /** Groups related requests; the request's own id unless it was caused by another (a retry). */
  correlationId: Schema.String,
  /** The event or command that caused this one, when known. */
  causationId: Schema.NullOr(Schema.String),
  traceId: Schema.NullOr(Schema.String),
  spanId: Schema.NullOr(Schema.String),
  keyId: optional(KeyId),
  tenantId: optional(TenantId),
  /** When it happened in the gateway (the store's own time is `recordedAt`). */
  occurredAt: IsoTimestamp
}).annotations({ identifier: "EventMetadata" })
export type EventMetadata = typeof EventMetadata.Type

export interface MetadataInput {
  readonly requestId: RequestId
  readonly correlationId?: string | undefined
  readonly causationId?: string | null | undefined
  readonly traceId?: string | null | undefined
  readonly spanId?: string | null | undefined
  readonly keyId?: KeyId | undefined
  readonly tenantId?: TenantId | undefined
  /** A `Date` or epoch milliseconds. */
  readonly occurredAt: Date | number
}

/** Builds metadata without `undefined` values; `correlationId` defaults to the request id. */
export const makeMetadata = (input: MetadataInput): EventMetadata => ({
  requestId: input.requestId,
  correlationId: input.correlationId ?? input.requestId,
  causationId: input.causationId ?? null,
  traceId: input.traceId ?? null,
  spanId: input.spanId ?? null,
  ...(input.keyId === undefined ? {} : { keyId: input.keyId }),
  ...(input.tenantId === undefined ? {} : { tenantId: input.tenantId }),
  occurredAt: new Date(input.occurredAt).toISOString()
})

/** `makeMetadata` with the time from `Clock` and trace and span ids from the current span. */
export const currentMetadata = (
  input: Omit<MetadataInput, "occurredAt" | "traceId" | "spanId">
): Effect.Effect<EventMetadata> =>
  Effect.map(Effect.zip(Clock.currentTimeMillis, Effect.option(Effect.currentSpan)), ([now, span]) =>
    makeMetadata({
      ...input,
      occurredAt: now,
      traceId: Option.isSome(span) ? span.value.traceId : null,
      spanId: Option.isSome(span) ? span.value.spanId : null
    })
  )

export const decodeEventMetadata = Schema.decodeUnknownEither(EventMetadata)

// ---------------------------------------------------------------------------------------------
// Storage
// ---------------------------------------------------------------------------------------------

/** An event ready to insert: `type` is the tag, `data` plain JSON without it. */
export interface EncodedEvent {
  readonly type: RequestEventType
  readonly data: { readonly [key: string]: unknown }
}

type Encoder = (event: RequestEvent) => { readonly _tag: RequestEventType; readonly [key: string]: unknown }
type Decoder = (data: unknown) => Either.Either<RequestEvent, ParseResult.ParseError>

// Per type rather than through the union: cheaper, and the union's errors can point at the wrong
// field (it narrows on `RequestReceived.endpoint` before `_tag`).
const encoders = new Map<string, Encoder>(
  RequestEvent.members.map((member) => [member._tag, Schema.encodeSync(member as any) as Encoder])
)
const decoders = new Map<string, Decoder>(
  RequestEvent.members.map((member) => [member._tag, Schema.decodeUnknownEither(member as any) as Decoder])
)
const EventType = Schema.Literal(
  ...(RequestEvent.members.map((member) => member._tag) as [RequestEventType, ...Array<RequestEventType>])
)

/** Plain JSON for the insert (no class instances, no `undefined`); throws only on an invalid event. */
export const encodeRequestEvent = (event: RequestEvent): EncodedEvent => {
  const { _tag, ...data } = encoders.get(event._tag)!(event)
  return { type: _tag, data }
}

/** Decodes a stored row's `type` and `data` back into an event; errors name the bad field. */
export const decodeRequestEvent = (
  type: string,
  data: unknown
): Either.Either<RequestEvent, ParseResult.ParseError> => {
  const decode = decoders.get(type)
  if (decode === undefined) {
    const issue = new ParseResult.Type(EventType.ast, type, `unknown request event type '${type}'`)
    return Either.left(ParseResult.parseError(new ParseResult.Pointer("_tag", data, issue)))
  }
  return decode(
    typeof data === "object" && data !== null && !Array.isArray(data) ? { ...data, _tag: type } : data
  )
}
