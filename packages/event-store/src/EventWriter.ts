/**
 * The hot path's way into the log: events from many concurrent requests go through one bounded
 * queue to one writer fiber, which inserts whatever has gathered in one statement (group
 * commit). While a batch is being written the next one gathers, so the batch size follows the
 * load. A full queue makes callers wait (back-pressure) rather than grow without bound.
 *
 * When the database cannot be reached, batches go to a durable local spool instead (fsynced
 * before their writers are told), and keep going there — so nothing overtakes what is spooled —
 * until the spool has been drained into the database, oldest first. Only when the spool cannot
 * be written either do writers get an error.
 */
import { Context, Deferred, type Duration, Effect, Layer, Option, Queue, Ref, Schedule } from "effect"
import { EventStore, type EventStoreError, type StreamWrite } from "./EventStore.js"
import * as Spool from "./Spool.js"

export interface Options {
  /** Stream writes waiting to be written before callers wait (default 10,000). */
  readonly capacity?: number
  /** Stream writes per statement at most (default 1,000). */
  readonly maxBatch?: number
  /** Directory of the spool used while the database is unreachable; without it, writers fail. */
  readonly spoolDir?: string | undefined
  /** How often to try draining the spool into the database (default 1 s). */
  readonly drainInterval?: Duration.DurationInput
}

export interface Status {
  /** Stream writes queued and not yet taken by the writer fiber. */
  readonly queued: number
  /** Bytes of events waiting in the spool (0 when the database is taking writes). */
  readonly spoolBytes: number
  /**
   * Nothing can be made durable: the database is away and the spool cannot be written either.
   * Until a write goes through again, the gateway should take no new requests.
   */
  readonly refusing: boolean
}

export class EventWriter extends Context.Tag("@gateway/event-store/EventWriter")<
  EventWriter,
  {
    /**
     * Queues the events and returns at once (after back-pressure, if any) with an effect that
     * waits for them to be durable: committed, or spooled while the database is away. Events of
     * one stream become durable in the order queued.
     */
    readonly write: (
      write: StreamWrite
    ) => Effect.Effect<Effect.Effect<void, EventStoreError | Spool.SpoolError>>
    /** Queues the events and waits until they are durable. */
    readonly writeAndWait: (write: StreamWrite) => Effect.Effect<void, EventStoreError | Spool.SpoolError>
    readonly status: Effect.Effect<Status>
  }
>() {}

/**
 * What the writer tells metrics: one call per statement or spooled batch, never per write.
 * Called on the writer's fiber, so it must return at once and never throw.
 */
export interface Observer {
  /** `events` went into the database in one statement that took `seconds`. */
  readonly appended: (events: number, seconds: number) => void
  /** A statement failed (each attempt counts; a retry may still succeed). */
  readonly appendFailed: (reason: EventStoreError["reason"]) => void
  /** A batch of `events` went to the spool because the database was away. */
  readonly spooled: (events: number) => void
}

const unobserved: Observer = { appended: () => {}, appendFailed: () => {}, spooled: () => {} }

/** The observer the writer reports to; nobody listens unless one is provided. */
export class CurrentObserver extends Context.Reference<CurrentObserver>()(
  "@gateway/event-store/EventWriter/CurrentObserver",
  { defaultValue: (): Observer => unobserved }
) {}

const eventsIn = (writes: ReadonlyArray<StreamWrite>) => {
  let n = 0
  for (const w of writes) n += w.events.length
  return n
}

interface Pending {
  readonly write: StreamWrite
  readonly done: Deferred.Deferred<void, EventStoreError | Spool.SpoolError>
}

/** Retries of a batch whose statement failed, before it is spooled or its writers are told. */
const batchRetry = Schedule.exponential("20 millis").pipe(
  Schedule.jittered,
  Schedule.intersect(Schedule.recurs(3))
)

export const make = (options: Options = {}) =>
  Effect.gen(function* () {
    const store = yield* EventStore
    const observer = yield* CurrentObserver
    const queue = yield* Effect.acquireRelease(
      Queue.bounded<Pending>(options.capacity ?? 10_000),
      Queue.shutdown
    )
    const maxBatch = options.maxBatch ?? 1_000
    const spool = options.spoolDir === undefined ? undefined : yield* Spool.make(options.spoolDir)
    const spoolBytes = yield* Ref.make(spool?.bytes() ?? 0)
    const refusing = yield* Ref.make(false)

    /** One statement, reported to the observer: its events and time, or why it failed. */
    const append = (writes: ReadonlyArray<StreamWrite>) =>
      Effect.suspend(() => {
        const began = performance.now()
        return store.appendBatch(writes).pipe(
          Effect.tap(() => {
            const events = eventsIn(writes)
            if (events > 0) observer.appended(events, (performance.now() - began) / 1000)
          }),
          Effect.tapError((error) => Effect.sync(() => observer.appendFailed(error.reason)))
        )
      })

    const settle = (
      batch: ReadonlyArray<Pending>,
      outcome: Effect.Effect<void, EventStoreError | Spool.SpoolError>
    ) =>
      Effect.flatMap(Effect.exit(outcome), (exit) =>
        Effect.forEach(batch, (p) => Deferred.done(p.done, exit), { discard: true })
      )

    const toSpool = (batch: ReadonlyArray<Pending>) => {
      if (spool === undefined) return Effect.void
      const writes = batch.map((p) => p.write)
      return settle(
        batch,
        spool.append(writes).pipe(
          Effect.tap(() => {
            observer.spooled(eventsIn(writes))
            return Effect.zipRight(Ref.set(spoolBytes, spool.bytes()), Ref.set(refusing, false))
          }),
          Effect.tapError((e) =>
            Effect.zipRight(
              Ref.set(refusing, true),
              Effect.logError("event spool failed; writes are refused", e.message)
            )
          )
        )
      )
    }

    const commit = (batch: ReadonlyArray<Pending>): Effect.Effect<void> =>
      append(batch.map((p) => p.write)).pipe(
        Effect.retry({ schedule: batchRetry, while: (e) => e.reason === "Unavailable" }),
        Effect.matchEffect({
          onSuccess: () => Effect.zipRight(Ref.set(refusing, false), settle(batch, Effect.void)),
          onFailure: (error) => {
            if (error.reason === "Unavailable" && spool !== undefined) {
              return Effect.zipRight(
                Effect.logWarning("database unreachable; spooling events", { detail: error.detail }),
                toSpool(batch)
              )
            }
            // One bad write must not sink the others: write them one by one to find it.
            return batch.length === 1
              ? settle(batch, Effect.fail(error))
              : Effect.forEach(batch, (p) => commit([p]), { discard: true })
          }
        })
      )

    /** Moves spooled writes into the database, oldest segment first; stops at the first failure. */
    const drain = (s: Spool.Spool): Effect.Effect<void> =>
      Effect.gen(function* () {
        while (!s.isEmpty()) {
          const segment = yield* s.oldest()
          if (segment === undefined) break
          for (let i = 0; i < segment.writes.length; i += maxBatch) {
            yield* append(segment.writes.slice(i, i + maxBatch))
          }
          yield* s.remove(segment.name)
          yield* Ref.set(spoolBytes, s.bytes())
        }
        yield* Effect.logInfo("event spool drained into the database")
      }).pipe(Effect.catchAll(() => Effect.void))

    const drainEvery = options.drainInterval ?? "1 second"

    const direct = Effect.flatMap(Queue.takeBetween(queue, 1, maxBatch), (batch) => commit(Array.from(batch)))

    /** While the spool holds writes, new ones join it (keeping their order) until it drains. */
    const spooling = (s: Spool.Spool) =>
      Effect.gen(function* () {
        const batch = yield* Queue.takeBetween(queue, 1, maxBatch).pipe(Effect.timeoutOption(drainEvery))
        if (Option.isSome(batch)) yield* toSpool(Array.from(batch.value))
        yield* drain(s)
      })

    yield* Effect.suspend(() => (spool === undefined || spool.isEmpty() ? direct : spooling(spool))).pipe(
      Effect.forever,
      Effect.interruptible,
      Effect.forkScoped
    )

    // On shutdown, what is queued is made durable before the scope closes.
    yield* Effect.addFinalizer(() =>
      Queue.takeAll(queue).pipe(
        Effect.flatMap((rest) => (rest.length === 0 ? Effect.void : commit(Array.from(rest)))),
        Effect.timeout("10 seconds"),
        Effect.ignore
      )
    )

    /** Writes in the queue: fibers waiting to take count negative, and a queue shut down holds none. */
    const queued = () =>
      Math.max(
        0,
        Option.getOrElse(queue.unsafeSize(), () => 0)
      )

    const write = (write: StreamWrite) =>
      Effect.flatMap(Deferred.make<void, EventStoreError | Spool.SpoolError>(), (done) =>
        Effect.as(Queue.offer(queue, { write, done }), Deferred.await(done))
      )

    return EventWriter.of({
      write,
      writeAndWait: (w) => Effect.flatten(write(w)),
      status: Effect.zipWith(Ref.get(spoolBytes), Ref.get(refusing), (bytes, refused) => ({
        queued: queued(),
        spoolBytes: bytes,
        refusing: refused
      }))
    })
  })

export const layer = (options: Options = {}): Layer.Layer<EventWriter, Spool.SpoolError, EventStore> =>
  Layer.scoped(EventWriter, make(options))
