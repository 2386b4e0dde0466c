/**
 * The attempt loop behind every completion: which replica and model each attempt goes to, when
 * a failed attempt is retried (another replica, after the retry schedule's backoff) or falls back
 * (the model's `fallbacks`), and the record of every attempt and why it was made. An attempt
 * commits when it is sure to answer (a whole answer, or a stream's first event): until then it
 * can be retried without the client seeing anything.
 */
import { Errors, Events, Ids, type OpenAi } from "@gateway/domain"
import { Clock, type Duration, Effect, Either, Schedule } from "effect"
import { BackendPool, type ModelPool } from "./BackendPool.js"
import type { RequestInfo } from "./CurrentRequest.js"
import * as ErrorResponse from "./ErrorResponse.js"
import type { Recording } from "./Recorder.js"
import type { Lease, Replica } from "./Replica.js"
import * as RetryPolicy from "./RetryPolicy.js"
import * as Tracing from "./Tracing.js"
import { type ChatRequest, type ChatResponse, Upstream } from "./Upstream.js"

/** The attempt that answers: its answer, replica and lease, and the model it belongs to. */
export interface Committed {
  readonly answer: ChatResponse
  readonly replica: Replica
  readonly lease: Lease
  readonly pool: ModelPool
  /** Attempts made in all, this one included. */
  readonly attempts: number
}

/** A failed attempt as the `AttemptFailed` event has it. */
export const attemptError = (error: Errors.BackendError): Events.AttemptError => ({
  reason: error.reason,
  message: error.detail,
  ...(error.status === undefined ? {} : { status: error.status })
})

const noAttributes: Record<string, unknown> = {}

export class Dispatcher extends Effect.Service<Dispatcher>()("@gateway/core/Dispatcher", {
  effect: Effect.gen(function* () {
    const pool = yield* BackendPool
    const upstream = yield* Upstream
    const traced = yield* Tracing.enabled

    /**
     * One call to a backend. Traced, it is a client span whose context the backend receives in
     * `traceparent`; otherwise the client's own `traceparent` (if any) is passed on as it came.
     */
    const call = (
      request: ChatRequest,
      info: RequestInfo,
      attributes: Record<string, unknown>
    ): Effect.Effect<ChatResponse, Errors.BackendError> =>
      traced
        ? Effect.flatMap(Tracing.currentSpan, (span) =>
            upstream.chat(
              span !== undefined
                ? { ...request, traceparent: Tracing.traceparent(span) }
                : info.traceparent === undefined
                  ? request
                  : { ...request, traceparent: info.traceparent }
            )
          ).pipe(Tracing.spanned(true, "gateway.attempt", { kind: "client", attributes }))
        : upstream.chat(
            info.traceparent === undefined ? request : { ...request, traceparent: info.traceparent }
          )

    /**
     * Makes attempts until one answers: on the requested model's replicas as its balancer picks
     * them (a retry goes to another replica when there is one, after the retry schedule's
     * backoff), then along its fallback chain, until an attempt commits (a whole answer, or a
     * stream's first event) or the attempts, the deadline or the chain run out. Every attempt
     * and why it was made is recorded; the last failure is recorded and returned.
     */
    const dispatch = (
      primary: ModelPool,
      recording: Recording,
      info: RequestInfo,
      outgoing: { readonly raw: Uint8Array; readonly body: OpenAi.ChatCompletionRequest },
      /** Why the first attempt goes to `primary` (a policy's tier), for its `RequestRouted`. */
      reason?: { readonly why: Events.RouteReason; readonly detail: string }
    ): Effect.Effect<Committed, Errors.BackendError> =>
      Effect.gen(function* () {
        const startedAt = yield* Clock.currentTimeMillis
        const deadlineAt = startedAt + primary.policy.retry.deadlineMs
        const fallbacks = primary.policy.fallbacks
        /** The requested model, then its fallbacks (validated at start-up: all exist). */
        const chain = (m: number): ModelPool | undefined =>
          m === 0 ? primary : pool.model(fallbacks[m - 1]!)
        const chainLength = fallbacks.length + 1
        let attempt = 0
        let lastError: Errors.BackendError | undefined
        let lastBackend: string | undefined
        let why: Events.RouteReason = reason?.why ?? "requested"
        let detail: string | undefined = reason?.detail
        for (let m = 0; m < chainLength; m++) {
          const target = chain(m)
          if (target === undefined) continue
          const last = m === chainLength - 1
          const { maxAttempts } = target.policy.retry
          /** Replicas this model's attempts failed on, or whose breaker refused (made on need). */
          let tried: Set<string> | undefined
          let refused: Set<string> | undefined
          /** The retry schedule's state, made at the first failure (most requests never need it). */
          let backoff: Schedule.ScheduleDriver<Duration.Duration, unknown> | undefined
          let here = 0
          while (here < maxAttempts) {
            // Nothing else can answer: ejected replicas are tried too (the checks may be wrong).
            const replica =
              (yield* target.pick(tried)) ??
              (last && here === 0 ? yield* target.pick(tried, true) : undefined)
            if (replica === undefined || refused?.has(replica.id)) break
            // Every replica failed once and another model may answer: fall back rather than retry.
            if (tried?.has(replica.id) && !last) break
            const begun = yield* Effect.either(replica.begin())
            if (Either.isLeft(begun)) {
              // Its breaker changed its mind since the pick (a half-open probe slot was taken).
              refused ??= new Set()
              refused.add(replica.id)
              tried ??= new Set()
              tried.add(replica.id)
              continue
            }
            const lease = begun.right
            attempt++
            here++
            info.attempts = attempt
            lastBackend = replica.id
            info.backend = replica.id
            yield* recording.record(
              new Events.RequestRouted(
                {
                  model: target.entry.config.name,
                  backend: replica.target.backend.id,
                  upstreamModel: replica.target.upstreamModel,
                  why,
                  detail: detail ?? `balancer ${target.policy.balancer}`
                },
                true
              ),
              new Events.AttemptStarted(
                { attempt, backend: replica.target.backend.id, model: target.entry.config.name },
                true
              )
            )
            const result = yield* call(
              {
                requestId: info.requestId,
                clientRequestId: info.clientRequestId,
                target: replica.target,
                body: outgoing.body,
                raw: outgoing.raw
              },
              info,
              traced
                ? {
                    "gen_ai.operation.name": "chat",
                    "gen_ai.request.model": replica.target.upstreamModel,
                    "url.full": replica.target.backend.url,
                    "gateway.backend": replica.target.backend.id,
                    "gateway.model": target.entry.config.name,
                    "gateway.attempt": attempt,
                    "gateway.why": why
                  }
                : noAttributes
            ).pipe(
              Effect.onInterrupt(() => lease.release),
              Effect.either
            )
            if (Either.isRight(result)) {
              if (result.right._tag === "Streaming") lease.firstToken()
              return { answer: result.right, replica, lease, pool: target, attempts: attempt }
            }
            const error = result.left
            yield* lease.fail(error)
            lastError = error
            tried ??= new Set()
            tried.add(replica.id)
            yield* recording.record(
              new Events.AttemptFailed(
                {
                  attempt,
                  backend: replica.target.backend.id,
                  error: attemptError(error),
                  retryable: error.retryable,
                  afterFirstByte: false
                },
                true
              )
            )
            // The backend refused the request itself (400 …): another replica would too.
            if (!error.retryable) break
            yield* Effect.logWarning("backend attempt failed").pipe(
              Effect.annotateLogs({ backend: replica.id, model: target.name, attempt, error: error.message })
            )
            if (here >= maxAttempts) break
            if (!last && target.replicas.every((r) => tried!.has(r.id) || !r.available())) break
            // Waits out the backoff; done when the attempts or the deadline are used up.
            backoff ??= yield* Schedule.driver(RetryPolicy.schedule(target.policy.retry, startedAt))
            if (Either.isLeft(yield* Effect.either(backoff.next(error)))) break
            why = "retry"
            detail = `${error.reason}${error.status === undefined ? "" : ` ${error.status}`} on ${replica.id}`
          }
          if (lastError !== undefined && !lastError.retryable) break
          if (last || (yield* Clock.currentTimeMillis) >= deadlineAt) break
          why = "fallback"
          detail =
            lastError !== undefined && lastBackend !== undefined && tried?.has(lastBackend)
              ? `${target.name}: no replica answered (last: ${lastError.reason}${lastError.status === undefined ? "" : ` ${lastError.status}`} on ${lastBackend})`
              : `${target.name}: no replica available (${target.unavailable()})`
          yield* Effect.logWarning("falling back to another model").pipe(
            Effect.annotateLogs({ from: target.name, to: fallbacks[m]!, why: detail })
          )
        }
        const retryAfterMs = primary.retryAfterMs()
        const error =
          lastError ??
          new Errors.BackendError({
            reason: "Unavailable",
            backend: primary.replicas[0]?.id ?? primary.name,
            detail: Array.from({ length: chainLength }, (_, m) => chain(m)?.unavailable() ?? "").join("; "),
            ...(retryAfterMs === undefined
              ? {}
              : { retryAfter: String(Math.max(1, Math.ceil(retryAfterMs / 1000))) })
          })
        info.error = error.message
        const rendered = ErrorResponse.render(error)
        yield* recording
          .finish(
            new Events.RequestFailed(
              {
                status: rendered.status,
                error: {
                  code: String(rendered.body.error.code ?? "backend_error"),
                  message: error.message,
                  reason: error.reason
                },
                attempts: attempt,
                ...(lastBackend === undefined ? {} : { lastBackend: Ids.BackendId.make(lastBackend) })
              },
              true
            )
          )
          .pipe(
            Tracing.spanned(traced, "gateway.settle"),
            Effect.catchAll((e) => Effect.logWarning("could not record a failed request", e.message))
          )
        return yield* Effect.fail(error)
      })

    return { dispatch } as const
  })
}) {}
