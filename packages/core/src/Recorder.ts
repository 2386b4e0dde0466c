/**
 * Records each request's lifecycle on its stream `request-<id>`. The opening events are queued
 * and written with whatever else is in flight; the terminal event is waited for, because the
 * client may only see the end of its answer once that answer is on the books (the durability
 * rule). Rejections are recorded without waiting: nothing is billed, and a flood of bad
 * requests must not make the gateway wait on the database.
 */
import { createHash } from "node:crypto"
import { Events, type Ids } from "@gateway/domain"
import { EventStore, EventWriter, type Spool } from "@gateway/event-store"
import { Clock, Context, Effect, Layer } from "effect"

export type PayloadMode = Events.PayloadMode

/** One request's recording, owned by the request's fiber. */
export interface Recording {
  /** Queues events; returns once they are queued. */
  readonly record: (...events: ReadonlyArray<Events.RequestEvent>) => Effect.Effect<void>
  /** Queues events ending with the terminal one, and waits until they are committed. */
  readonly finish: (
    ...events: ReadonlyArray<Events.RequestEvent>
  ) => Effect.Effect<void, EventStore.EventStoreError | Spool.SpoolError>
  /** How the request body is kept on the `RequestReceived` event, per `store_payloads`. */
  readonly payload: (raw: Uint8Array, body: unknown) => Events.Payload
}

/** Who and what a request's events belong to, stamped on each event's metadata. */
export interface RecordingContext {
  /** The client's `x-request-id`; the request's own id when absent. */
  readonly correlationId?: string | undefined
  readonly keyId?: Ids.KeyId | undefined
  readonly tenantId?: Ids.TenantId | undefined
  /** The request's span, when it is traced. */
  readonly traceId?: string | undefined
  readonly spanId?: string | undefined
}

/** Where a resumed recording continues: after `version`, its first event caused by `causationId`. */
export interface ResumeAt {
  /** The stream's last version as the caller read it: the append is guarded by it. */
  readonly version: number
  /** The id of the stream's last event (the first new event's cause). */
  readonly causationId?: string | undefined
}

export class Recorder extends Context.Tag("@gateway/core/Recorder")<
  Recorder,
  {
    readonly start: (requestId: Ids.RequestId, context?: RecordingContext) => Recording
    /**
     * Continues the existing stream of `requestId` (a dead-letter retry): appends `opening` right
     * after `at.version`, guarded by that version and committed before it returns — a
     * `StreamVersionConflict` when someone else continued the stream first, and nothing written —
     * then records the rest of the new run after it, as `start` does.
     */
    readonly resume: (
      requestId: Ids.RequestId,
      at: ResumeAt,
      opening: ReadonlyArray<Events.RequestEvent>,
      context?: RecordingContext
    ) => Effect.Effect<Recording, EventStore.StreamVersionConflict | EventStore.EventStoreError>
    /** `false` while nothing can be recorded (database away, spool unwritable): refuse requests. */
    readonly accepting: Effect.Effect<boolean>
  }
>() {}

const payloadOf =
  (mode: PayloadMode) =>
  (raw: Uint8Array, body: unknown): Events.Payload => {
    switch (mode) {
      case "none":
        return { kind: "none" }
      case "hash":
        return { kind: "hash", sha256: createHash("sha256").update(raw).digest("hex"), bytes: raw.length }
      case "full":
        return { kind: "full", body, bytes: raw.length }
    }
  }

export const make = (options: { readonly payloads: PayloadMode }) =>
  Effect.gen(function* () {
    const writer = yield* EventWriter.EventWriter
    const store = yield* EventStore.EventStore
    const payload = payloadOf(options.payloads)

    /** A recording of `requestId` whose next event takes version `after + 1`. */
    const open = (
      requestId: Ids.RequestId,
      context: RecordingContext,
      after: number,
      causedBy: string | null
    ) => {
      const { correlationId, keyId, tenantId, traceId, spanId } = context
      const streamId = Events.streamIdOf(requestId)
      let version = after
      let causationId: string | null = causedBy

      /** Stamps the events with their ids, versions and metadata, in order. */
      const prepare = (events: ReadonlyArray<Events.RequestEvent>) =>
        Effect.map(Clock.currentTimeMillis, (now): EventStore.StreamWrite => {
          const firstVersion = version + 1
          const prepared = events.map((event): EventStore.NewEvent => {
            const eventId = crypto.randomUUID()
            const { type, data } = Events.encodeRequestEvent(event)
            const metadata = Events.makeMetadata({
              requestId,
              ...(correlationId === undefined ? {} : { correlationId }),
              ...(keyId === undefined ? {} : { keyId }),
              ...(tenantId === undefined ? {} : { tenantId }),
              causationId,
              traceId,
              spanId,
              occurredAt: now
            })
            causationId = eventId
            return { eventId, type, data, metadata }
          })
          version += events.length
          return { streamId, firstVersion, events: prepared }
        })

      const recording: Recording = {
        record: (...events) =>
          events.length === 0 ? Effect.void : Effect.asVoid(Effect.flatMap(prepare(events), writer.write)),
        finish: (...events) => Effect.flatMap(prepare(events), writer.writeAndWait),
        payload
      }
      return { recording, prepare }
    }

    const start = (requestId: Ids.RequestId, context: RecordingContext = {}): Recording =>
      open(requestId, context, 0, null).recording

    const resume = (
      requestId: Ids.RequestId,
      at: ResumeAt,
      opening: ReadonlyArray<Events.RequestEvent>,
      context: RecordingContext = {}
    ) => {
      const { recording, prepare } = open(requestId, context, at.version, at.causationId ?? null)
      // Straight to the store, not through the writer: the version guard is the point, and a
      // conflicting write must not share a statement with other requests' events.
      return Effect.flatMap(prepare(opening), (write) =>
        Effect.as(store.append(write.streamId, write.events, at.version), recording)
      )
    }

    return Recorder.of({ start, resume, accepting: Effect.map(writer.status, (s) => !s.refusing) })
  })

export const layer = (options: {
  readonly payloads: PayloadMode
}): Layer.Layer<Recorder, never, EventWriter.EventWriter | EventStore.EventStore> =>
  Layer.effect(Recorder, make(options))

const nothing: Recording = {
  record: () => Effect.void,
  finish: () => Effect.void,
  payload: () => ({ kind: "none" })
}

/** Records nothing: for benchmarks that measure what recording costs. */
export const layerDisabled: Layer.Layer<Recorder> = Layer.succeed(
  Recorder,
  Recorder.of({
    start: () => nothing,
    resume: () => Effect.succeed(nothing),
    accepting: Effect.succeed(true)
  })
)
