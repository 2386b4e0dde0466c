/**
 * Where backend replicas' events go: the stream `backend-<id>` of the event store. Appends are
 * queued and written in order by one fiber in the layer's scope, so a breaker opening inside a
 * request never waits on the database; a write that fails is retried, then logged and dropped
 * (a replica's state is rebuilt by its checks, not from these events).
 */
import { BackendEvents, Events, Ids } from "@gateway/domain"
import { EventStore } from "@gateway/event-store"
import { Clock, Context, Duration, Effect, Layer, Queue, Schedule } from "effect"

export class BackendJournal extends Context.Tag("@gateway/core/BackendJournal")<
  BackendJournal,
  {
    /** Queues `event` for `backend-<backend>`; returns at once. */
    readonly record: (backend: string, event: BackendEvents.BackendEvent) => void
  }
>() {}

/** A failed append is tried again a few times (the database may be restarting). */
const appendRetry = Schedule.exponential(Duration.millis(200)).pipe(Schedule.intersect(Schedule.recurs(5)))

/** Records on the event store, in order, from a fiber of the layer's scope. */
export const layer: Layer.Layer<BackendJournal, never, EventStore.EventStore> = Layer.scoped(
  BackendJournal,
  Effect.gen(function* () {
    const store = yield* EventStore.EventStore
    const queue = yield* Effect.acquireRelease(
      Queue.unbounded<readonly [string, BackendEvents.BackendEvent]>(),
      Queue.shutdown
    )
    const write = ([backend, event]: readonly [string, BackendEvents.BackendEvent]) =>
      Effect.gen(function* () {
        const { type, data } = BackendEvents.encodeBackendEvent(event)
        const now = yield* Clock.currentTimeMillis
        const metadata = Events.makeMetadata({ requestId: Ids.newRequestId(), occurredAt: now })
        yield* store
          .append(
            BackendEvents.streamOf(backend),
            [{ eventId: crypto.randomUUID(), type, data, metadata }],
            "any"
          )
          .pipe(Effect.retry(appendRetry))
      }).pipe(
        Effect.catchAll((error) =>
          Effect.logWarning("could not record a backend event", error.message).pipe(
            Effect.annotateLogs({ backend, event: event._tag })
          )
        )
      )
    yield* Queue.take(queue).pipe(Effect.flatMap(write), Effect.forever, Effect.forkScoped)
    // At shutdown, what is still queued is written (for a bounded time) before the store goes.
    yield* Effect.addFinalizer(() =>
      Queue.takeAll(queue).pipe(
        Effect.flatMap((left) => Effect.forEach(left, write, { discard: true })),
        Effect.timeout(Duration.seconds(2)),
        Effect.ignore
      )
    )
    return BackendJournal.of({ record: (backend, event) => void Queue.unsafeOffer(queue, [backend, event]) })
  })
)

/** Records nothing (no event store): the log lines remain. */
export const layerNone: Layer.Layer<BackendJournal> = Layer.succeed(
  BackendJournal,
  BackendJournal.of({ record: () => {} })
)
