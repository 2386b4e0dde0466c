/**
 * `POST /v1/chat/completions`: read and validate the body, resolve the model to a replica, make
 * the attempt, and answer with the backend's JSON or forward its SSE stream chunk by chunk.
 *
 * The pipeline does not depend on HTTP: `handle` serves it to an HTTP request, `complete` to
 * any other caller (the RPC API, a dead-letter retry) — the same limits, routing, recording,
 * attempts and durability rule, with the answer handed back as bytes instead of a response.
 */
import type { Readable } from "node:stream"
import { type HttpServerRequest, HttpServerResponse } from "@effect/platform"
import { Errors, Events, OpenAi } from "@gateway/domain"
import { Effect, Either, Exit, ParseResult, Runtime } from "effect"
import { Auth, type Principal } from "./Auth.js"
import type { RequestInfo } from "./CurrentRequest.js"
import * as Dispatcher from "./Dispatcher.js"
import * as ErrorResponse from "./ErrorResponse.js"
import { Meter } from "./Meter.js"
import { type Admission, RateLimiter } from "./RateLimiter.js"
import { Recorder, type Recording } from "./Recorder.js"
import * as RequestBody from "./RequestBody.js"
import { type Decision, Router } from "./Router.js"
import { Settings } from "./Settings.js"
import * as SseRelay from "./SseRelay.js"
import { SseScanner, UsageFilter } from "./SseScanner.js"
import * as Tokenizer from "./Tokenizer.js"
import * as Tracing from "./Tracing.js"

const decoder = new TextDecoder()

/** Field path as OpenAI writes it: `messages.[0].content`. */
const paramOf = (path: ReadonlyArray<PropertyKey>): string | null =>
  path.length === 0 ? null : path.map((key) => (typeof key === "number" ? `[${key}]` : String(key))).join(".")

const parseJson = (raw: Uint8Array): Either.Either<unknown, Errors.InvalidRequest> => {
  try {
    return Either.right(JSON.parse(decoder.decode(raw)))
  } catch (cause) {
    return Either.left(
      new Errors.InvalidRequest({
        message: `We could not parse the JSON body of your request (${(cause as Error).message}). The API expects a JSON object.`,
        param: null,
        code: "invalid_json"
      })
    )
  }
}

const validate = (json: unknown): Either.Either<OpenAi.ChatCompletionRequest, Errors.InvalidRequest> => {
  if (typeof json !== "object" || json === null || Array.isArray(json)) {
    return Either.left(
      new Errors.InvalidRequest({
        message: "The request body must be a JSON object.",
        param: null,
        code: "invalid_request"
      })
    )
  }
  return Either.mapLeft(OpenAi.decodeChatCompletionRequest(json), (error) => {
    const issue = ParseResult.ArrayFormatter.formatErrorSync(error)[0]
    const param = issue === undefined ? null : paramOf(issue.path)
    const problem = issue?.message ?? "invalid request"
    return new Errors.InvalidRequest({
      message: param === null ? `Invalid request: ${problem}` : `Invalid value for '${param}': ${problem}`,
      param,
      code: issue?._tag === "Missing" ? "missing_required_parameter" : "invalid_value"
    })
  })
}

const sseHeaders = { "cache-control": "no-cache", "x-accel-buffering": "no" }

/** Why a request was turned away, as the `RequestRejected` event names it. */
const rejection = (error: Errors.GatewayError): Events.RejectionReason | undefined => {
  switch (error._tag) {
    case "InvalidRequest":
      return "invalid_request"
    case "PayloadTooLarge":
      return "payload_too_large"
    case "ModelNotFound":
      return "model_not_found"
    case "ServiceUnavailable":
      return "unavailable"
    case "Forbidden":
      return "forbidden"
    case "RateLimited":
      return "rate_limited"
    case "QuotaExceeded":
      return "quota_exceeded"
    default:
      return undefined
  }
}

/** Usage and finish reason from a whole JSON answer; `undefined` where the backend gave none. */
const summarize = (body: Uint8Array) => {
  try {
    const parsed = JSON.parse(decoder.decode(body)) as {
      usage?: OpenAi.Usage | null
      choices?: ReadonlyArray<{ finish_reason?: string | null; message?: { content?: string | null } }>
    }
    const choices = parsed.choices ?? []
    return {
      usage: parsed.usage ?? undefined,
      finishReason: choices[0]?.finish_reason ?? null,
      text: () => choices.map((c) => c.message?.content ?? "").join("")
    }
  } catch {
    return { usage: undefined, finishReason: null, text: () => "" }
  }
}

const usageMarker = ',"stream_options":{"include_usage":true}'
const encoder = new TextEncoder()

/**
 * The body to send upstream: a stream always asks for usage (`stream_options.include_usage`),
 * which is what billing reads; `strip` says the client did not ask for it and must not get it.
 * When the client sent no `stream_options`, the option is spliced into its bytes (no re-encode).
 */
const withUsageRequested = (raw: Uint8Array, body: OpenAi.ChatCompletionRequest) => {
  if (body.stream !== true || body.stream_options?.include_usage === true) return { raw, body, strip: false }
  const upstreamBody = { ...body, stream_options: { ...body.stream_options, include_usage: true } }
  if (body.stream_options === undefined) {
    let end = raw.length - 1
    while (end > 0 && raw[end] !== 125 /* } */) end--
    if (end > 0) {
      const marker = encoder.encode(usageMarker)
      const spliced = new Uint8Array(raw.length + marker.length)
      spliced.set(raw.subarray(0, end), 0)
      spliced.set(marker, end)
      spliced.set(raw.subarray(end), end + marker.length)
      return { raw: spliced, body: upstreamBody, strip: true }
    }
  }
  return { raw: encoder.encode(JSON.stringify(upstreamBody)), body: upstreamBody, strip: true }
}

const nothingUsed = { tokens: 0, costMicroUsd: 0 }

const none: ReadonlyArray<never> = []

/** A policy's decision as the `RequestClassified` event has it. */
const classified = (decision: Decision) =>
  new Events.RequestClassified(
    {
      policy: decision.policy,
      tier: decision.classification.tier,
      score: decision.classification.score,
      features: decision.classification.features,
      model: decision.model as Events.RequestClassified["model"],
      acted: decision.acted,
      ...(decision.classification.secondOpinion === undefined
        ? {}
        : { secondOpinion: decision.classification.secondOpinion })
    },
    true
  )

/** Why the first attempt goes where it goes, when a policy decided (acting or in shadow mode). */
const routeReason = (decision: Decision | undefined) => {
  if (decision === undefined) return undefined
  const { tier, score } = decision.classification
  return decision.acted
    ? { why: "tier" as const, detail: `${decision.policy}: ${tier} (score ${score})` }
    : {
        why: "requested" as const,
        detail: `${decision.policy} in shadow mode: would send this ${tier} request (score ${score}) to ${decision.model}`
      }
}

/** Ends a stream with nothing more (instead of `[DONE]`). */
const noBytes = new Uint8Array(0)

const elapsed = (since: number) => Math.round((performance.now() - since) * 100) / 100

/**
 * What `complete` answers: a whole JSON answer, or an SSE stream. `headers` are the gateway's
 * own (`x-ratelimit-*`, `x-gateway-backend`, `x-gateway-model`, `x-gateway-attempts` …), the
 * same an HTTP client gets, without the transport's (content type, caching).
 */
export type Answer =
  | {
      readonly _tag: "Whole"
      /** The backend's status (2xx). */
      readonly status: number
      /** The OpenAI `chat.completion` JSON, as the backend sent it. */
      readonly body: Uint8Array
      readonly headers: Readonly<Record<string, string>>
    }
  | {
      readonly _tag: "Stream"
      /**
       * The SSE bytes exactly as an HTTP client gets them (`data: {chunk}\n\n` … `data: [DONE]`).
       * Read it to its end: the terminal event is recorded when the backend's answer ends, just
       * before `[DONE]`. Destroying it early is a client going away: the backend's answer is
       * drained for its usage and the request is recorded as cancelled.
       */
      readonly body: Readable
      readonly headers: Readonly<Record<string, string>>
    }

/** Every way the pipeline can fail (what `complete` fails with). */
export type CompletionError =
  | Errors.InvalidRequest
  | Errors.PayloadTooLarge
  | Errors.ModelNotFound
  | Errors.Forbidden
  | Errors.RateLimited
  | Errors.QuotaExceeded
  | Errors.BackendError
  | Errors.ServiceUnavailable

/** Input of `complete`: a chat completion from a caller that is not an HTTP request. */
export interface CompleteInput {
  /** Who calls, already authenticated (`undefined` only when auth is off). */
  readonly principal: Principal | undefined
  /** The request body: OpenAI `chat.completions` JSON, as bytes. */
  readonly body: Uint8Array
  /**
   * The request's info: `requestId` names its stream, `clientRequestId` is its correlation id,
   * `startedAt` (`performance.now()`) its start. The pipeline fills in the rest as it goes.
   */
  readonly info: RequestInfo
  /**
   * Continue this recording instead of starting the stream (`Recorder.resume`, a dead-letter
   * retry): the stream already has its RequestReceived, so the run records from routing on.
   */
  readonly recording?: Recording | undefined
  /** Why the first attempt is made, on its RequestRouted (when no routing policy decided). */
  readonly route?: { readonly why: Events.RouteReason; readonly detail: string } | undefined
}

/** Makes the pipeline's answer: an HTTP response, or an `Answer`. */
interface Responder<A> {
  readonly whole: (status: number, body: Uint8Array, headers: Record<string, string>) => A
  readonly stream: (body: Readable, headers: Record<string, string>) => A
}

const httpResponse: Responder<HttpServerResponse.HttpServerResponse> = {
  whole: (status, body, headers) =>
    HttpServerResponse.uint8Array(body, { status, contentType: "application/json", headers }),
  stream: (body, headers) =>
    HttpServerResponse.raw(body, { contentType: "text/event-stream", headers: { ...sseHeaders, ...headers } })
}

const answer: Responder<Answer> = {
  whole: (status, body, headers) => ({ _tag: "Whole", status, body, headers }),
  stream: (body, headers) => ({ _tag: "Stream", body, headers })
}

export class ChatCompletions extends Effect.Service<ChatCompletions>()("@gateway/core/ChatCompletions", {
  effect: Effect.gen(function* () {
    const router = yield* Router
    const dispatcher = yield* Dispatcher.Dispatcher
    const recorder = yield* Recorder
    const meter = yield* Meter
    const auth = yield* Auth
    const limiter = yield* RateLimiter
    const settings = yield* Settings
    const { maxBodyBytes } = settings.server
    const { defaultMaxTokens } = settings.limits
    const { drainAfterDisconnectMs } = settings.metering
    const counter = Tokenizer.makeCounter()
    const traced = yield* Tracing.enabled
    const authSpan = Tracing.spanned(traced, "gateway.auth")
    const limitSpan = Tracing.spanned(traced, "gateway.limit")
    const settleSpan = Tracing.spanned(traced, "gateway.settle")

    /** The caller, noted for the access log; a failure turns the request away unrecorded. */
    const authenticate = (request: HttpServerRequest.HttpServerRequest, info: RequestInfo) => {
      const caller = auth.authenticate(request.headers)
      if (Either.isLeft(caller)) {
        info.error = caller.left.message
        return caller
      }
      const principal = caller.right
      if (principal !== undefined) {
        info.keyId = principal.keyId
        info.keyName = principal.keyName
        info.tenantId = principal.tenantId
      }
      return caller
    }

    const handle = (
      request: HttpServerRequest.HttpServerRequest,
      info: RequestInfo
    ): Effect.Effect<HttpServerResponse.HttpServerResponse, Errors.GatewayError> => {
      // Unauthenticated calls are turned away before anything is read or recorded.
      if (traced) {
        return Effect.suspend(() => authenticate(request, info)).pipe(
          authSpan,
          Effect.flatMap((principal) => serve(request, info, principal))
        )
      }
      // Without a tracer, a client's own trace still reaches the backends.
      const traceparent = request.headers.traceparent
      if (traceparent !== undefined && Tracing.isTraceparent(traceparent)) info.traceparent = traceparent
      const caller = authenticate(request, info)
      return Either.isLeft(caller) ? Effect.fail(caller.left) : serve(request, info, caller.right)
    }

    const serve = (
      request: HttpServerRequest.HttpServerRequest,
      info: RequestInfo,
      principal: Principal | undefined
    ) =>
      pipeline(RequestBody.read(request, maxBodyBytes), info, principal, undefined, undefined, httpResponse)

    /**
     * The whole pipeline after authentication: body → route → limits → record → attempts →
     * answer, the terminal event committed before the caller gets the end. `body` is read only
     * once the event log accepts requests; `resumed` continues a stream instead of starting one.
     */
    const pipeline = <A>(
      readBody: Effect.Effect<Uint8Array, Errors.PayloadTooLarge | Errors.InvalidRequest>,
      info: RequestInfo,
      principal: Principal | undefined,
      resumed: Recording | undefined,
      firstRoute: { readonly why: Events.RouteReason; readonly detail: string } | undefined,
      respond: Responder<A>
    ): Effect.Effect<A, CompletionError> => {
      const recording =
        resumed ??
        recorder.start(info.requestId, {
          correlationId: info.clientRequestId,
          keyId: principal?.keyId,
          tenantId: principal?.tenantId,
          traceId: info.traceId,
          spanId: info.spanId
        })
      /** The request's hold on its limits; settled on every way out (only the first settle counts). */
      let admission: Admission | undefined
      const cancelledAt = (tokensDelivered: number, afterFirstByte: boolean) => ({
        tokensDelivered,
        latencyMs: elapsed(info.startedAt),
        afterFirstByte
      })
      const cancelled = (tokensDelivered: number, afterFirstByte: boolean) =>
        new Events.RequestCancelled(cancelledAt(tokensDelivered, afterFirstByte), true)
      return Effect.gen(function* () {
        // Serve nothing that could not be put on the books.
        if (!(yield* recorder.accepting)) return yield* unrecorded()
        const raw = yield* readBody
        const body = yield* Either.flatMap(parseJson(raw), validate)
        const stream = body.stream === true
        info.model = body.model
        info.stream = stream
        const allowed = auth.authorizeModel(principal, body.model)
        if (Either.isLeft(allowed)) return yield* allowed.left
        const { primary, decision, observed } = yield* router.route(body, info.requestId, principal)

        // Reserve the worst case: the prompt as the tokenizer counts it, and every token the
        // answer may have. Counted only for callers with token or spend limits.
        let promptEstimate: number | undefined
        const promptTokens = () => (promptEstimate ??= counter.countPrompt(body))
        const estimate = limiter.needsEstimate(principal)
          ? (() => {
              const prompt = promptTokens()
              const completion = Tokenizer.maxCompletion(body, defaultMaxTokens)
              return {
                tokens: prompt + completion,
                costMicroUsd: meter.cost(primary.name, prompt, completion)?.amountMicroUsd ?? 0
              }
            })()
          : nothingUsed
        admission = yield* limiter
          .admit(
            principal,
            estimate,
            primary.policy.retry.deadlineMs + primary.timeouts.totalMs + drainAfterDisconnectMs + 30_000
          )
          .pipe(limitSpan)
        const held = admission
        const limitHeaders = held.headers
        /** Settles the reservation to what the answer used. */
        const settle = (
          promptTokens: number,
          completionTokens: number,
          cost: { amountMicroUsd: number } | null
        ) => held.settle({ tokens: promptTokens + completionTokens, costMicroUsd: cost?.amountMicroUsd ?? 0 })

        if (resumed === undefined) {
          yield* recording.record(
            new Events.RequestReceived(
              {
                model: body.model,
                stream,
                endpoint: "chat.completions",
                ...(typeof body.user === "string" ? { user: body.user } : {}),
                payload: recording.payload(raw, body)
              },
              true
            ),
            ...(decision === undefined ? none : [classified(decision)]),
            ...observed.map(classified)
          )
        } else {
          yield* recording.record(
            ...(decision === undefined ? none : [classified(decision)]),
            ...observed.map(classified)
          )
        }

        const outgoing = withUsageRequested(raw, body)
        // Taken before the attempt: from the answer to the relay below there is no yield, so no
        // interruption can leave a backend body without a reader.
        const run = Runtime.runPromise(yield* Effect.runtime<never>())
        if (decision?.acted === true) info.tier = decision.classification.tier
        const upstreamFrom = performance.now()
        const committed = yield* dispatcher
          .dispatch(primary, recording, info, outgoing, routeReason(decision) ?? firstRoute)
          .pipe(
            // A failed request's time went to its backends too, for the gateway's own time.
            Effect.tapError(() =>
              Effect.sync(() => {
                info.upstreamMs = performance.now() - upstreamFrom
              })
            ),
            Effect.onInterrupt(() => recording.record(cancelled(0, false)))
          )
        const committedAt = performance.now()
        const { answer, replica, lease, attempts } = committed
        const model = committed.pool.entry.config.name
        const backend = replica.target.backend.id
        info.backend = backend
        info.model = model
        if (model !== body.model) info.requested = body.model
        if (committed.pool !== primary) info.fallbackFrom = primary.name
        /** The gateway's own time so far: before the first attempt, and since the answer came. */
        const ownMs = () =>
          Math.round((upstreamFrom - info.startedAt + performance.now() - committedAt) * 100) / 100
        /** Usage of a whole answer, for the metrics. */
        const noteUsage = (prompt: number, completion: number, cost: { amountMicroUsd: number } | null) => {
          info.promptTokens = prompt
          info.completionTokens = completion
          if (cost !== null) info.costMicroUsd = cost.amountMicroUsd
        }
        const answerHeaders: Record<string, string> = {
          ...limitHeaders,
          "x-gateway-backend": backend,
          "x-gateway-model": model
        }
        if (committed.pool !== primary) answerHeaders["x-gateway-fallback"] = primary.name
        if (decision?.acted === true) answerHeaders["x-gateway-tier"] = decision.classification.tier
        if (attempts > 1) answerHeaders["x-gateway-attempts"] = String(attempts)

        if (answer._tag === "Complete") {
          yield* lease.succeed
          const summary = summarize(answer.body)
          const prompt = summary.usage?.prompt_tokens ?? promptTokens()
          const completion = summary.usage?.completion_tokens ?? Tokenizer.countText(summary.text())
          const cost = meter.cost(model, prompt, completion)
          settle(prompt, completion, cost)
          info.upstreamMs = committedAt - upstreamFrom
          noteUsage(prompt, completion, cost)
          if (summary.finishReason !== null) info.finishReason = summary.finishReason
          yield* recording
            .finish(
              new Events.RequestCompleted(
                {
                  model,
                  backend,
                  promptTokens: prompt,
                  completionTokens: completion,
                  usageSource: summary.usage === undefined ? "estimated" : "backend",
                  cost,
                  latencyMs: elapsed(info.startedAt),
                  ttftMs: null,
                  finishReason: summary.finishReason,
                  cached: false,
                  stream: false,
                  status: answer.status,
                  attempts
                },
                true
              )
            )
            .pipe(settleSpan, Effect.mapError(unrecorded))
          answerHeaders["x-gateway-overhead-ms"] = String(ownMs())
          return respond.whole(answer.status, answer.body, answerHeaders)
        }

        const scanner = new SseScanner()
        /** Content chunks the client had been sent when it went away. */
        let deliveredChunks = 0
        /** Tokens of the streamed answer and their cost (settled at once), once it is over. */
        const usageOf = (scanned: SseScanner) => {
          const prompt = scanned.usage?.prompt_tokens ?? promptTokens()
          const completion = scanned.usage?.completion_tokens ?? Tokenizer.countText(scanned.completionText())
          const cost = meter.cost(model, prompt, completion)
          settle(prompt, completion, cost)
          info.upstreamMs = performance.now() - upstreamFrom
          if (scanned.firstContentAt !== undefined) info.ttftMs = scanned.firstContentAt - info.startedAt
          if (scanned.finishReason !== null) info.finishReason = scanned.finishReason
          noteUsage(prompt, completion, cost)
          return { promptTokens: prompt, completionTokens: completion, cost }
        }
        /**
         * The answer failed after its first byte (too late to retry unseen): recorded before the
         * client's stream ends, as any terminal event is. What was generated is not billed: the
         * client got no whole answer.
         */
        const failedAfterFirstByte = (error: Errors.BackendError) => {
          info.error = error.message
          info.upstreamMs = performance.now() - upstreamFrom
          held.settle(nothingUsed)
          const rendered = ErrorResponse.render(error)
          return lease.fail(error).pipe(
            Effect.zipRight(
              recording.finish(
                new Events.AttemptFailed(
                  {
                    attempt: attempts,
                    backend,
                    error: Dispatcher.attemptError(error),
                    retryable: error.retryable,
                    afterFirstByte: true
                  },
                  true
                ),
                new Events.RequestFailed(
                  {
                    status: 200,
                    error: {
                      code: String(rendered.body.error.code ?? "backend_error"),
                      message: error.message,
                      reason: error.reason
                    },
                    attempts,
                    lastBackend: backend,
                    tokensDelivered: Tokenizer.countText(scanner.completionText())
                  },
                  true
                )
              )
            ),
            settleSpan,
            Effect.ignore
          )
        }
        const relayed = SseRelay.relay(answer.body, {
          onChunk: (chunk) => scanner.push(chunk),
          drainMs: drainAfterDisconnectMs,
          idleMs: committed.pool.timeouts.idleMs,
          ...(outgoing.strip ? { filter: new UsageFilter() } : {}),
          // The answer is complete: it goes on the books before the client gets [DONE]. Unless
          // the backend reported an error inside it: then it failed, and no [DONE] follows.
          beforeEnd: () =>
            scanner.error !== undefined
              ? run(
                  failedAfterFirstByte(
                    new Errors.BackendError({ reason: "StreamError", backend, detail: scanner.error })
                  ).pipe(Effect.as(noBytes))
                )
              : run(
                  lease.succeed.pipe(
                    Effect.zipRight(
                      recording.finish(
                        new Events.RequestCompleted(
                          {
                            model,
                            backend,
                            ...usageOf(scanner),
                            usageSource: scanner.usage === undefined ? "estimated" : "backend",
                            latencyMs: elapsed(info.startedAt),
                            ttftMs:
                              scanner.firstContentAt === undefined
                                ? null
                                : Math.round((scanner.firstContentAt - info.startedAt) * 100) / 100,
                            finishReason: scanner.finishReason,
                            cached: false,
                            stream: true,
                            status: 200,
                            attempts
                          },
                          true
                        )
                      )
                    ),
                    Effect.as(undefined),
                    settleSpan,
                    Effect.catchAll((error) => {
                      info.error = `the completed answer could not be recorded: ${error.message}`
                      return Effect.succeed(ErrorResponse.toSseEvent(ErrorResponse.render(unrecorded())))
                    })
                  )
                ),
          onBreak: (cause) => {
            // The backend broke off (or fell silent) after the first byte.
            const error = answer.failure(cause)
            return run(
              failedAfterFirstByte(error).pipe(
                Effect.as(ErrorResponse.toSseEvent(ErrorResponse.render(error)))
              )
            )
          },
          onDisconnect: () => {
            info.clientClosed = true
            // What the client got is what had gone by when it left; draining reads on for billing.
            deliveredChunks = scanner.contentChunks
          },
          onClientGone: (midAnswer) => {
            if (!midAnswer) return
            // Gone mid-answer: billed for what the backend generated (it was drained for its usage).
            const usage = usageOf(scanner)
            void run(
              lease.release.pipe(
                Effect.zipRight(
                  recording.record(
                    new Events.RequestCancelled(
                      {
                        ...cancelledAt(deliveredChunks, deliveredChunks > 0),
                        model,
                        backend,
                        ...usage,
                        usageSource: scanner.usage === undefined ? "estimated" : "backend"
                      },
                      true
                    )
                  )
                )
              )
            )
          }
        })
        answerHeaders["x-gateway-overhead-ms"] = String(ownMs())
        return respond.stream(relayed, answerHeaders)
      }).pipe(
        // Failed or cut off before an answer: nothing was used, the reservation goes back.
        Effect.onExit((exit) => {
          if (Exit.isFailure(exit)) admission?.settle(nothingUsed)
          return Effect.void
        }),
        Effect.tapError((error) => {
          const reason = rejection(error)
          if (reason === undefined) return Effect.void
          if (reason === "rate_limited" || reason === "quota_exceeded") info.rejection = reason
          const { status, body } = ErrorResponse.render(error)
          return recording.record(
            new Events.RequestRejected({ reason, status, message: body.error.message }, true)
          )
        })
      )
    }

    /**
     * A chat completion for a caller that is not an HTTP request (the RPC API, a dead-letter
     * retry), through exactly the pipeline `POST /v1/chat/completions` runs after
     * authentication: the body is checked against `server.max_body_bytes` and validated, the
     * model authorized for `principal`, routed, admitted by its limits, recorded on the stream
     * `request-<info.requestId>` (or on `input.recording`), and attempted with retries and
     * fallbacks. It succeeds with the answer once an attempt commits — for a whole answer, after
     * its RequestCompleted is on the books; for a stream, the terminal event is committed before
     * `[DONE]` comes out of `Answer.body`. It fails with the error an HTTP client would get
     * (`ErrorResponse.render` gives its status and OpenAI body), every rejection recorded as
     * RequestRejected and a failure after all attempts as RequestFailed. No access-log line or
     * request metrics are emitted: those belong to the transport.
     */
    const complete = (input: CompleteInput): Effect.Effect<Answer, CompletionError> =>
      pipeline(
        input.body.length > maxBodyBytes
          ? Effect.fail(new Errors.PayloadTooLarge({ limitBytes: maxBodyBytes }))
          : Effect.succeed(input.body),
        input.info,
        input.principal,
        input.recording,
        input.route,
        answer
      )

    return { handle, complete } as const
  })
}) {}

/** The answer exists but could not be put on the books: the client must not get it. */
const unrecorded = () =>
  new Errors.ServiceUnavailable({ message: "The gateway could not record the request; please retry." })
