/**
 * One request's whole lifecycle from its stream `request-<id>`, found by the gateway's request
 * id or by the client's own `x-request-id` (kept as the correlation id; several requests may
 * share one, so each is shown).
 */
import { SqlClient } from "@effect/sql"
import { EventStore } from "@gateway/event-store"
import { Effect, Schema } from "effect"
import * as EventFormat from "./EventFormat.js"

export class RequestNotFound extends Schema.TaggedError<RequestNotFound>()("RequestNotFound", {
  id: Schema.String
}) {
  override get message() {
    return `No request has id or x-request-id '${this.id}'.`
  }
}

const streamOf = (requestId: string) => `request-${requestId}`

/** At most this many requests shown for one client id. */
const maxRequests = 20

/** Streams of the requests whose correlation id is `id`, oldest first (scans the log). */
const byCorrelationId = (id: string) =>
  Effect.flatMap(SqlClient.SqlClient, (sql) =>
    sql<{ stream_id: string }>`
      SELECT stream_id FROM events
      WHERE stream_version = 1 AND stream_id LIKE 'request-%' AND metadata->>'correlationId' = ${id}
      ORDER BY events.position LIMIT ${maxRequests}`.pipe(Effect.map((rows) => rows.map((r) => r.stream_id)))
  )

const render = (events: ReadonlyArray<EventStore.RecordedEvent>): ReadonlyArray<string> => {
  const first = events[0]!
  const meta = EventFormat.metadataOf(first)
  const context = [
    meta.correlationId !== undefined && meta.correlationId !== meta.requestId
      ? `x-request-id ${meta.correlationId}`
      : undefined,
    meta.tenantId === undefined ? undefined : `tenant ${meta.tenantId}`,
    meta.keyId === undefined ? undefined : `key ${meta.keyId}`,
    meta.traceId == null ? undefined : `trace ${meta.traceId}`
  ].filter((part) => part !== undefined)
  return [
    `request ${meta.requestId ?? first.streamId.replace(/^request-/, "")}  (${events.length} event${events.length === 1 ? "" : "s"})`,
    ...(context.length > 0 ? [`  ${context.join("  ")}`] : []),
    ...eventLines(
      events.map((event) => ({
        version: event.streamVersion,
        time: EventFormat.timeOf(event),
        type: event.type,
        data: event.data
      }))
    )
  ]
}

/** A stream's events, one indented line each: version, time, time since the first, type, data. */
export const eventLines = (
  events: ReadonlyArray<{
    readonly version: number
    readonly time: string
    readonly type: string
    readonly data: unknown
  }>
): ReadonlyArray<string> => {
  if (events.length === 0) return []
  const start = Date.parse(events[0]!.time)
  const typeWidth = Math.max(...events.map((e) => e.type.length))
  return events.map((event) => {
    const offset = `+${Math.round(Date.parse(event.time) - start)}ms`
    return `  v${event.version}  ${event.time}  ${offset.padStart(8)}  ${event.type.padEnd(typeWidth)}  ${EventFormat.summarize(event.data)}`
  })
}

/** The lifecycles of the request `id` (one, or several sharing a client id), as text lines. */
export const show = Effect.fn("RequestLifecycle.show")(function* (id: string) {
  const store = yield* EventStore.EventStore
  const own = yield* store.readStream(streamOf(id))
  const streams = own.length > 0 ? [own] : yield* Effect.forEach(yield* byCorrelationId(id), store.readStream)
  const found = streams.filter((events) => events.length > 0)
  if (found.length === 0) return yield* Effect.fail(new RequestNotFound({ id }))
  return found.flatMap((events, i) => [...(i > 0 ? [""] : []), ...render(events)])
})
