/**
 * The dead-letter queue: find, inspect, retry and discard requests that failed after every
 * attempt and fallback. The letters are the `dead_letters` projection; the truth is each
 * request's stream, which a retry or a discard continues.
 *
 * A retry takes the payload recorded on RequestReceived (`store_payloads: full`), appends
 * DeadLetterRetried right after the stream's last event — guarded by that version, so of two
 * concurrent retries (here or on another replica) exactly one runs, the other is told
 * `DeadLetterRetryInProgress` — and runs the payload through the same pipeline as
 * `POST /v1/chat/completions` (`ChatCompletions.complete`) under the original key, recording on
 * the same stream: RequestRouted, AttemptStarted … then RequestCompleted (billed once: the
 * failure billed nothing) or RequestFailed, which keeps the letter (no DeadLettered is added:
 * RequestFailed with a 5xx or 429 is what dead-letters a request, first time or after a retry).
 *
 * A key revoked since is not used: the letter is refused (`key_revoked`) and can be discarded.
 * Retries run in the service's scope, not the caller's: a caller that goes away does not cut a
 * retry short; a gateway shutting down does (recorded as RequestCancelled, the letter stays).
 */
import type { Readable } from "node:stream"
import { SqlClient } from "@effect/sql"
import { DeadLetters, Errors, Events, Ids } from "@gateway/domain"
import { EventStore } from "@gateway/event-store"
import { Cause, Effect, FiberSet, Option, Schema } from "effect"
import { Auth, type Principal } from "./Auth.js"
import { type Answer, ChatCompletions, type CompletionError } from "./ChatCompletions.js"
import { accessFields, type RequestInfo } from "./CurrentRequest.js"
import * as ErrorResponse from "./ErrorResponse.js"
import { KeyRegistry } from "./KeyRegistry.js"
import { Metrics } from "./Metrics.js"
import { Recorder } from "./Recorder.js"

interface LetterRow {
  readonly request_id: string
  readonly tenant_id: string | null
  readonly key_id: string | null
  readonly model: string | null
  readonly status: number
  readonly reason: string
  readonly attempts: number
  readonly last_error: string
  readonly dead_at: Date
  readonly retries: number
  readonly last_retry_at: Date | null
  readonly last_retry_by: string | null
  readonly last_retry_outcome: string | null
  readonly retryable: boolean
}

const decodeLetter = Schema.decodeUnknownSync(DeadLetters.DeadLetter)

const letterOf = (row: LetterRow): DeadLetters.DeadLetter =>
  decodeLetter({
    requestId: row.request_id,
    tenantId: row.tenant_id,
    keyId: row.key_id,
    model: row.model,
    status: row.status,
    reason: row.reason,
    attempts: row.attempts,
    lastError: row.last_error,
    deadAt: row.dead_at.toISOString(),
    retries: row.retries,
    lastRetryAt: row.last_retry_at?.toISOString() ?? null,
    lastRetryBy: row.last_retry_by,
    lastRetryOutcome: row.last_retry_outcome,
    retryable: row.retryable
  })

const letterColumns = `request_id, tenant_id, key_id, model, status, reason, attempts, last_error, dead_at,
  retries, last_retry_at, last_retry_by, last_retry_outcome, retryable`

/** A page's cursor: the last letter's time and id, opaque to callers. */
const encodeCursor = (letter: DeadLetters.DeadLetter) =>
  Buffer.from(`${letter.deadAt.toISOString()}|${letter.requestId}`).toString("base64url")

const decodeCursor = (
  cursor: string
): { readonly deadAt: string; readonly requestId: string } | undefined => {
  const text = Buffer.from(cursor, "base64url").toString()
  const bar = text.indexOf("|")
  if (bar <= 0) return undefined
  const deadAt = text.slice(0, bar)
  return Number.isNaN(new Date(deadAt).getTime()) ? undefined : { deadAt, requestId: text.slice(bar + 1) }
}

const recoverable = (status: number) => status >= 500 || status === 429

/** Where a request's stream stands, as far as the queue is concerned. */
export type StreamState =
  | { readonly _tag: "DeadLettered"; readonly status: number; readonly reason: string }
  | { readonly _tag: "Retrying" }
  | { readonly _tag: "Settled" }

/**
 * Read from its events (the truth; the projection may lag): dead-lettered by its last failure,
 * a retry under way (DeadLetterRetried with no end after it), or settled (completed, discarded,
 * or never failed on the server's side). A retry that was cut off or turned away is over: the
 * failure before it stands.
 */
export const streamState = (
  events: ReadonlyArray<Pick<EventStore.RecordedEvent, "type" | "data">>
): StreamState => {
  /** A later retry was cut off or turned away: it is over, and the failure before it stands. */
  let ended = false
  for (let i = events.length - 1; i >= 0; i--) {
    const event = events[i]!
    const data = event.data as any
    switch (event.type) {
      case "RequestCancelled":
      case "RequestRejected":
        ended = true
        break
      case "DeadLetterRetried":
        if (!ended) return { _tag: "Retrying" }
        ended = false
        break
      case "DeadLetterDiscarded":
      case "RequestCompleted":
        return { _tag: "Settled" }
      case "RequestFailed":
        return recoverable(data.status)
          ? {
              _tag: "DeadLettered",
              status: data.status,
              reason: data.error?.reason ?? data.error?.code ?? ""
            }
          : { _tag: "Settled" }
      case "DeadLettered":
        return { _tag: "DeadLettered", status: 0, reason: data.reason }
    }
  }
  return { _tag: "Settled" }
}

const unavailable = (error: { readonly message: string }) =>
  new Errors.ServiceUnavailable({
    message: `The dead-letter queue cannot be read right now (${error.message}).`
  })

const encoder = new TextEncoder()

/** Reads an SSE answer to its end (its terminal event is recorded before the end comes). */
const drain = (body: Readable) =>
  Effect.async<void>((resume) => {
    const done = () => resume(Effect.void)
    body.on("data", () => {})
    body.once("end", done)
    body.once("error", done)
    body.once("close", done)
    return Effect.sync(() => body.destroy())
  })

export class DeadLetterQueue extends Effect.Service<DeadLetterQueue>()("@gateway/core/DeadLetterQueue", {
  scoped: Effect.gen(function* () {
    const sql = yield* SqlClient.SqlClient
    const store = yield* EventStore.EventStore
    const recorder = yield* Recorder
    const chat = yield* ChatCompletions
    const auth = yield* Auth
    const registry = yield* Effect.serviceOption(KeyRegistry)
    const metrics = yield* Effect.serviceOption(Metrics)
    /** The retries running, owned by the service's scope (not the callers'). */
    const runs = yield* FiberSet.make<DeadLetters.RetryOutcome, never>()
    /** Requests this replica is retrying or discarding now: the in-process guard. */
    const busy = new Set<string>()

    const row = (requestId: string) =>
      sql
        .unsafe<LetterRow>(`SELECT ${letterColumns} FROM dead_letters WHERE request_id = $1`, [requestId])
        .pipe(
          Effect.mapError(unavailable),
          Effect.flatMap(([found]) =>
            found === undefined
              ? Effect.fail(new DeadLetters.DeadLetterNotFound({ requestId }))
              : Effect.succeed(letterOf(found))
          )
        )

    const readStream = (requestId: string) =>
      store.readStream(Events.streamIdOf(requestId as Ids.RequestId)).pipe(Effect.mapError(unavailable))

    /**
     * Appends `event` right after the stream's `last` event, stamped like the request's own; a
     * stream that moved on meanwhile (another retry or discard won) is a retry in progress.
     */
    const appendAfter = (
      requestId: string,
      last: EventStore.RecordedEvent,
      metadata: Partial<Events.EventMetadata>,
      event: Events.RequestEvent
    ) =>
      recorder
        .resume(
          requestId as Ids.RequestId,
          { version: last.streamVersion, causationId: last.eventId },
          [event],
          {
            correlationId: metadata.correlationId,
            keyId: metadata.keyId,
            tenantId: metadata.tenantId
          }
        )
        .pipe(
          Effect.catchTags({
            StreamVersionConflict: () =>
              Effect.fail(new DeadLetters.DeadLetterRetryInProgress({ requestId })),
            EventStoreError: (error) => Effect.fail(unavailable(error))
          })
        )

    /** Holds the in-process guard on `requestId` while `effect` runs. */
    const exclusively = <A, E, R>(requestId: string, effect: Effect.Effect<A, E, R>) =>
      Effect.acquireUseRelease(
        Effect.suspend(() => {
          if (busy.has(requestId))
            return Effect.fail(new DeadLetters.DeadLetterRetryInProgress({ requestId }))
          busy.add(requestId)
          return Effect.void
        }),
        () => effect,
        () => Effect.sync(() => busy.delete(requestId))
      )

    const list = (filter: DeadLetters.DeadLetterFilter) =>
      Effect.gen(function* () {
        const where: Array<string> = []
        const values: Array<unknown> = []
        const param = (value: unknown) => {
          values.push(value)
          return `$${values.length}`
        }
        if (filter.tenantId !== undefined) where.push(`tenant_id = ${param(filter.tenantId)}`)
        if (filter.model !== undefined) where.push(`model = ${param(filter.model)}`)
        if (filter.reason !== undefined) where.push(`reason = ${param(filter.reason)}`)
        if (filter.since !== undefined)
          where.push(`dead_at >= ${param(filter.since.toISOString())}::timestamptz`)
        if (filter.until !== undefined)
          where.push(`dead_at < ${param(filter.until.toISOString())}::timestamptz`)
        if (filter.cursor !== undefined) {
          const after = decodeCursor(filter.cursor)
          if (after === undefined) {
            return yield* new Errors.InvalidRequest({
              message: "'cursor' is not a cursor this API gave out.",
              param: "cursor",
              code: "invalid_value"
            })
          }
          where.push(
            `(dead_at, request_id) < (${param(after.deadAt)}::timestamptz, ${param(after.requestId)})`
          )
        }
        const limit = Math.min(Math.max(filter.limit, 1), DeadLetters.maxLimit)
        const rows = yield* sql
          .unsafe<LetterRow>(
            `SELECT ${letterColumns} FROM dead_letters
             ${where.length > 0 ? `WHERE ${where.join(" AND ")}` : ""}
             ORDER BY dead_at DESC, request_id DESC LIMIT ${param(limit + 1)}`,
            values
          )
          .pipe(Effect.mapError(unavailable))
        const data = rows.slice(0, limit).map(letterOf)
        const last = data[data.length - 1]
        return {
          data,
          nextCursor: rows.length > limit && last !== undefined ? encodeCursor(last) : null
        } satisfies DeadLetters.DeadLetterPage
      }).pipe(Effect.withSpan("DeadLetterQueue.list"))

    const get = (requestId: string) =>
      Effect.gen(function* () {
        const letter = yield* row(requestId)
        const events = yield* readStream(requestId)
        return {
          letter,
          events: events.map((event) => ({
            version: event.streamVersion,
            type: event.type,
            data: event.data,
            occurredAt:
              (event.metadata as { occurredAt?: string }).occurredAt ?? event.recordedAt.toISOString(),
            position: event.position
          }))
        } satisfies DeadLetters.DeadLetterDetail
      }).pipe(Effect.withSpan("DeadLetterQueue.get", { attributes: { requestId } }))

    /** The key the request was made with, as it is now; `undefined` when auth is off. */
    const principalOf = (requestId: string, metadata: Events.EventMetadata) => {
      if (!auth.enabled) return Effect.succeed<Principal | undefined>(undefined)
      const keyId = metadata.keyId
      const key = keyId === undefined || Option.isNone(registry) ? undefined : registry.value.key(keyId)
      if (key === undefined) {
        return Effect.fail(new DeadLetters.DeadLetterNotRetryable({ requestId, reason: "key_unknown" }))
      }
      if (key.revoked !== null) {
        return Effect.fail(new DeadLetters.DeadLetterNotRetryable({ requestId, reason: "key_revoked" }))
      }
      return Effect.succeed<Principal | undefined>({
        keyId: key.keyId,
        tenantId: key.tenantId,
        keyName: key.name,
        key,
        tenant: Option.isSome(registry) ? registry.value.tenant(key.tenantId) : undefined
      })
    }

    /** How the run of retry `n` ended, from its answer or error and the stream after it. */
    const settle = (
      requestId: Ids.RequestId,
      n: number,
      after: number,
      result: Effect.Effect<Answer, CompletionError>
    ) =>
      Effect.gen(function* () {
        const outcome = (
          kind: DeadLetters.RetryOutcomeKind,
          status: number | null,
          error: string | null
        ): DeadLetters.RetryOutcome =>
          DeadLetters.RetryOutcome.make({ requestId, outcome: kind, retry: n, status, error })
        const answered = yield* Effect.either(result)
        if (answered._tag === "Left") {
          const error = answered.left
          const { status } = ErrorResponse.render(error)
          return error._tag === "BackendError"
            ? outcome("dead_lettered_again", status, error.message)
            : outcome("rejected", status, error.message)
        }
        const answer = answered.right
        if (answer._tag === "Whole") return outcome("completed", answer.status, null)
        // A stream: its terminal event is on the books once it has ended.
        yield* drain(answer.body)
        const events = yield* store
          .readStream(Events.streamIdOf(requestId), after + 1)
          .pipe(Effect.orElseSucceed(() => []))
        const terminal = events.find((e) => (Events.terminalTags as ReadonlyArray<string>).includes(e.type))
        const data = terminal?.data as any
        return terminal?.type === "RequestCompleted"
          ? outcome("completed", 200, null)
          : terminal?.type === "RequestFailed"
            ? outcome("dead_lettered_again", data.status, data.error?.message ?? null)
            : outcome("cancelled", null, "the answer's stream ended without a terminal event")
      })

    /**
     * A retry is traffic like any request: counted in the request metrics (tokens, cost, latency)
     * and logged with its access line (`method: RETRY`); a retry cut off counts as 499, one that
     * died as 500.
     */
    const observed =
      (info: RequestInfo) =>
      <E, R>(run: Effect.Effect<DeadLetters.RetryOutcome, E, R>) =>
        Effect.suspend(() => {
          if (Option.isSome(metrics)) metrics.value.started()
          return Effect.onExit(run, (exit) => {
            const status =
              exit._tag === "Success"
                ? (exit.value.status ?? 499)
                : Cause.isInterruptedOnly(exit.cause)
                  ? 499
                  : 500
            const latencyMs = performance.now() - info.startedAt
            if (Option.isSome(metrics)) metrics.value.finished(info, status, latencyMs)
            return Effect.logInfo(
              "request",
              accessFields(info, { method: "RETRY", path: "DeadLetters.retry" }, status, latencyMs)
            )
          })
        })

    const retryOne = (requestId: string, by: string) =>
      exclusively(
        requestId,
        Effect.gen(function* () {
          const letter = yield* row(requestId)
          const events = yield* readStream(requestId)
          const state = streamState(events)
          if (state._tag === "Retrying")
            return yield* new DeadLetters.DeadLetterRetryInProgress({ requestId })
          if (state._tag === "Settled") return yield* new DeadLetters.DeadLetterNotFound({ requestId })
          const received = events.find((e) => e.type === "RequestReceived")
          const payload = (received?.data as any)?.payload
          if (received === undefined || payload?.kind !== "full") {
            return yield* new DeadLetters.DeadLetterNotRetryable({ requestId, reason: "payload_not_stored" })
          }
          const metadata = received.metadata as Events.EventMetadata
          const principal = yield* principalOf(requestId, metadata)
          const last = events[events.length - 1]!
          const n = events.filter((e) => e.type === "DeadLetterRetried").length + 1
          const id = letter.requestId
          const recording = yield* appendAfter(
            id,
            last,
            metadata,
            new Events.DeadLetterRetried(
              { by, retry: n, previousStatus: state.status, previousReason: state.reason },
              true
            )
          )
          const info: RequestInfo = {
            requestId: id,
            clientRequestId: metadata.correlationId === id ? undefined : metadata.correlationId,
            startedAt: performance.now()
          }
          if (principal !== undefined) {
            info.keyId = principal.keyId
            info.keyName = principal.keyName
            info.tenantId = principal.tenantId
          }
          const run = settle(
            id,
            n,
            last.streamVersion + 1,
            chat.complete({
              principal,
              body: encoder.encode(JSON.stringify(payload.body)),
              info,
              recording,
              route: { why: "retry", detail: `dead-letter retry ${n} by ${by}` }
            })
          ).pipe(
            observed(info),
            Effect.tap((outcome) =>
              Effect.logInfo("dead letter retried", {
                request_id: id,
                retry: n,
                by,
                outcome: outcome.outcome,
                status: outcome.status,
                ...(outcome.error === null ? {} : { error: outcome.error })
              })
            )
          )
          // In the service's scope: the caller going away does not cut the retry short.
          const fiber = yield* FiberSet.run(runs, run)
          return yield* fiber.await.pipe(
            Effect.flatMap((exit) =>
              exit._tag === "Success"
                ? Effect.succeed(exit.value)
                : Effect.succeed(
                    DeadLetters.RetryOutcome.make({
                      requestId: id,
                      outcome: "cancelled",
                      retry: n,
                      status: null,
                      error: "the retry was cut off (the gateway is shutting down)"
                    })
                  )
            )
          )
        })
      )

    const retry = (requestId: string, by: string) =>
      retryOne(requestId, by).pipe(
        Effect.withSpan("DeadLetterQueue.retry", { attributes: { requestId, by } })
      )

    /** A refusal as a bulk retry reports it. */
    const refused = (
      requestId: Ids.RequestId,
      error: DeadLetters.DeadLetterError | Errors.ServiceUnavailable
    ): DeadLetters.RetryOutcome =>
      DeadLetters.RetryOutcome.make({
        requestId,
        outcome:
          error._tag === "DeadLetterNotFound"
            ? "not_found"
            : error._tag === "DeadLetterNotRetryable"
              ? "not_retryable"
              : error._tag === "DeadLetterRetryInProgress"
                ? "already_running"
                : "rejected",
        retry: null,
        status: null,
        error: error.message
      })

    const retryMatching = (filter: DeadLetters.DeadLetterFilter, by: string) =>
      Effect.gen(function* () {
        const page = yield* list({ ...filter, limit: Math.min(filter.limit, DeadLetters.maxRetryBatch) })
        const outcomes = yield* Effect.forEach(
          page.data,
          (letter) =>
            retryOne(letter.requestId, by).pipe(
              Effect.catchAll((error) => Effect.succeed(refused(letter.requestId, error)))
            ),
          { concurrency: 4 }
        )
        return { outcomes, more: page.nextCursor !== null } satisfies DeadLetters.RetryBatch
      }).pipe(Effect.withSpan("DeadLetterQueue.retryMatching", { attributes: { by } }))

    const discard = (requestId: string, reason: string, by: string) =>
      exclusively(
        requestId,
        Effect.gen(function* () {
          const letter = yield* row(requestId)
          const events = yield* readStream(requestId)
          const state = streamState(events)
          if (state._tag === "Retrying")
            return yield* new DeadLetters.DeadLetterRetryInProgress({ requestId })
          if (state._tag === "Settled") return yield* new DeadLetters.DeadLetterNotFound({ requestId })
          const last = events[events.length - 1]!
          const metadata = (events[0]?.metadata ?? {}) as Partial<Events.EventMetadata>
          yield* appendAfter(
            letter.requestId,
            last,
            metadata,
            new Events.DeadLetterDiscarded({ reason, by }, true)
          )
          yield* Effect.logInfo("dead letter discarded", { request_id: requestId, by, reason })
          return letter
        })
      ).pipe(Effect.withSpan("DeadLetterQueue.discard", { attributes: { requestId, by } }))

    return {
      /** Letters matching `filter`, newest first, a page at a time. */
      list,
      /** A letter and every event of its request's stream. */
      get,
      /**
       * Runs a letter again and waits for how it ended (`completed`, `dead_lettered_again`,
       * `rejected`, `cancelled`); refuses with a typed error when there is no such letter, it
       * cannot be retried, or another retry of it is running.
       */
      retry,
      /** Retries up to `maxRetryBatch` letters matching `filter`, four at a time; refusals are outcomes. */
      retryMatching,
      /** Drops a letter for good, recording why and who (DeadLetterDiscarded); returns it as it was. */
      discard
    } as const
  })
}) {}

/** For callers that build ids from user input (routes, RPC). */
export const requestIdOf = (id: string): Option.Option<Ids.RequestId> =>
  Schema.decodeUnknownOption(Ids.RequestId)(id)
