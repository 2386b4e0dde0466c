/**
 * What happens to a backend replica, on its stream `backend-<id>`: ejections and restorations
 * by the health checks, and its circuit breaker's transitions. Every gateway replica records
 * what it saw (the breaker and health state are per gateway replica), tagged with `gateway`.
 * Stored as jsonb and read back years later: only add optional fields or new literals.
 */
import { type Either, type ParseResult, Schema } from "effect"
import { type BackendId, ModelName } from "./Ids.js"

const optional = <S extends Schema.Schema.Any>(schema: S) => Schema.optionalWith(schema, { exact: true })

const Millis = Schema.NonNegative.pipe(Schema.finite())
const Count = Schema.NonNegativeInt

/** Who saw it: the replica's model and the gateway instance that recorded the event. */
const common = {
  model: ModelName,
  gateway: Schema.String
}

/** Why a replica stopped getting traffic. */
export const EjectionCause = Schema.Literal(
  /** `unhealthy_threshold` failed active checks in a row. */
  "health_check",
  /** `eject_after_failures` requests in a row could not connect or timed out. */
  "request_failures"
)
export type EjectionCause = typeof EjectionCause.Type

/** The replica gets no traffic until probes restore it. */
export class BackendEjected extends Schema.TaggedClass<BackendEjected>()("BackendEjected", {
  ...common,
  cause: EjectionCause,
  /** Failures in a row that led to it. */
  failures: Count,
  /** The last failure, e.g. `Connect: ECONNREFUSED` or `HTTP 503`. */
  detail: Schema.String
}) {}

/** `healthy_threshold` good probes in a row: the replica gets traffic again. */
export class BackendRestored extends Schema.TaggedClass<BackendRestored>()("BackendRestored", {
  ...common,
  probes: Count,
  /** How long it was out. */
  ejectedForMs: Millis
}) {}

/** Why a breaker opened. */
export const OpenCause = Schema.Literal("consecutive_failures", "failure_rate", "probe_failed")
export type OpenCause = typeof OpenCause.Type

/** The breaker opened: calls fail fast, without a network call, for `cooldownMs`. */
export class CircuitOpened extends Schema.TaggedClass<CircuitOpened>()("CircuitOpened", {
  ...common,
  from: Schema.Literal("closed", "half_open"),
  cause: OpenCause,
  failures: Count,
  /** Calls in the window (`failure_rate` only). */
  requests: optional(Count),
  cooldownMs: Millis
}) {}

/** The cooldown is over: a few probe requests decide between closed and open. */
export class CircuitHalfOpened extends Schema.TaggedClass<CircuitHalfOpened>()("CircuitHalfOpened", {
  ...common
}) {}

/** Enough probes succeeded: traffic flows again. */
export class CircuitClosed extends Schema.TaggedClass<CircuitClosed>()("CircuitClosed", {
  ...common,
  successes: Count
}) {}

export const BackendEvent = Schema.Union(
  BackendEjected,
  BackendRestored,
  CircuitOpened,
  CircuitHalfOpened,
  CircuitClosed
).annotations({ identifier: "BackendEvent" })
export type BackendEvent = typeof BackendEvent.Type
export type BackendEventType = BackendEvent["_tag"]

/** The stream of one backend replica's events. */
export const streamOf = (backend: BackendId | string): `backend-${string}` => `backend-${backend}`

const encodeEvent = Schema.encodeSync(BackendEvent)
const decodeEvent = Schema.decodeUnknownEither(BackendEvent)
const types: ReadonlySet<string> = new Set(BackendEvent.members.map((m) => m._tag))

/** `type` is the tag, `data` plain JSON without it. */
export const encodeBackendEvent = (
  event: BackendEvent
): { readonly type: BackendEventType; readonly data: Record<string, unknown> } => {
  const { _tag, ...data } = encodeEvent(event)
  return { type: _tag, data }
}

/** A stored backend event, or `undefined` for a type this version does not know. */
export const decodeBackendEvent = (
  type: string,
  data: unknown
): Either.Either<BackendEvent, ParseResult.ParseError> | undefined => {
  if (!types.has(type)) return undefined
  return decodeEvent(
    typeof data === "object" && data !== null && !Array.isArray(data) ? { ...data, _tag: type } : data
  )
}
