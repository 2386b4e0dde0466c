/**
 * The hot path's way into the log: events from many concurrent requests go through one bounded
 * queue to one writer fiber, which inserts whatever has gathered in one statement (group
 * commit). While a batch is being written the next one gathers, so the batch size follows the
 * load. A full queue makes callers wait (back-pressure) rather than grow without bound.
 */
import { Context, Deferred, Effect, Layer, Queue, Schedule } from "effect"
import { EventStore, type EventStoreError, type StreamWrite } from "./EventStore.js"

export interface Options {
  /** Stream writes waiting to be written before callers wait (default 10,000). */
  readonly capacity?: number
  /** Stream writes per statement at most (default 1,000). */
  readonly maxBatch?: number
}

export class EventWriter extends Context.Tag("@gateway/event-store/EventWriter")<
  EventWriter,
  {
    /**
     * Queues the events and returns at once (after back-pressure, if any) with an effect that
     * waits for them to be committed. Events of one stream are committed in the order queued.
     */
    readonly write: (write: StreamWrite) => Effect.Effect<Effect.Effect<void, EventStoreError>>
    /** Queues the events and waits until they are committed. */
    readonly writeAndWait: (write: StreamWrite) => Effect.Effect<void, EventStoreError>
  }
>() {}

interface Pending {
  readonly write: StreamWrite
  readonly done: Deferred.Deferred<void, EventStoreError>
}

/** Retries of a batch whose statement failed, before its writers are told. */
const batchRetry = Schedule.exponential("20 millis").pipe(
  Schedule.jittered,
  Schedule.intersect(Schedule.recurs(4))
)

export const make = (options: Options = {}) =>
  Effect.gen(function* () {
    const store = yield* EventStore
    const queue = yield* Effect.acquireRelease(
      Queue.bounded<Pending>(options.capacity ?? 10_000),
      Queue.shutdown
    )
    const maxBatch = options.maxBatch ?? 1_000

    const commit = (batch: ReadonlyArray<Pending>): Effect.Effect<void> =>
      store.appendBatch(batch.map((p) => p.write)).pipe(
        Effect.retry(batchRetry),
        Effect.matchEffect({
          onSuccess: () =>
            Effect.forEach(batch, (p) => Deferred.succeed(p.done, undefined), { discard: true }),
          // One bad write must not sink the others: write them one by one to find it.
          onFailure: (error) =>
            batch.length === 1
              ? Deferred.fail(batch[0]!.done, error)
              : Effect.forEach(batch, (p) => commit([p]), { discard: true })
        })
      )

    yield* Queue.takeBetween(queue, 1, maxBatch).pipe(
      Effect.flatMap((batch) => commit(Array.from(batch))),
      Effect.forever,
      Effect.interruptible,
      Effect.forkScoped
    )

    // On shutdown, what is queued is written before the scope closes.
    yield* Effect.addFinalizer(() =>
      Queue.takeAll(queue).pipe(
        Effect.flatMap((rest) => (rest.length === 0 ? Effect.void : commit(Array.from(rest)))),
        Effect.timeout("10 seconds"),
        Effect.ignore
      )
    )

    const write = (write: StreamWrite) =>
      Effect.flatMap(Deferred.make<void, EventStoreError>(), (done) =>
        Effect.as(Queue.offer(queue, { write, done }), Deferred.await(done))
      )

    return EventWriter.of({ write, writeAndWait: (w) => Effect.flatten(write(w)) })
  })

export const layer = (options: Options = {}): Layer.Layer<EventWriter, never, EventStore> =>
  Layer.scoped(EventWriter, make(options))
