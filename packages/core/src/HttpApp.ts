/**
 * The gateway's HTTP surface: the OpenAI-compatible routes plus health and readiness, each
 * response tagged with `x-request-id`, and one JSON access-log line per request once the
 * response (a whole stream included) has been sent or the client has gone away.
 */
import { HttpServer, HttpServerRequest, HttpServerResponse } from "@effect/platform"
import { NodeHttpServerRequest } from "@effect/platform-node"
import { Errors, Ids } from "@gateway/domain"
import type * as OtelApi from "@opentelemetry/api"
import { Cause, Effect, Either, Exit, Layer, type Scope, type Tracer } from "effect"
import { AdminApi } from "./AdminApi.js"
import { Auth } from "./Auth.js"
import { BackendPool } from "./BackendPool.js"
import { ChatCompletions } from "./ChatCompletions.js"
import { accessFields, CurrentRequest, type RequestInfo } from "./CurrentRequest.js"
import * as ErrorResponse from "./ErrorResponse.js"
import { Metrics } from "./Metrics.js"
import { Models } from "./Models.js"
import { Readiness } from "./Readiness.js"
import type * as Replica from "./Replica.js"
import * as RpcServer from "./RpcServer.js"
import * as Tracing from "./Tracing.js"

const json = (body: unknown, status = 200) =>
  HttpServerResponse.text(JSON.stringify(body), { status, contentType: "application/json" })

const isChatPath = (url: string) => {
  const path = pathOf(url)
  return path === "/v1/chat/completions" || path === "/chat/completions"
}

const pathOf = (url: string) => {
  const q = url.indexOf("?")
  return q === -1 ? url : url.slice(0, q)
}

const iso = (ms: number | null) => (ms === null ? null : new Date(ms).toISOString())

/** One replica as `GET /admin/backends` shows it. */
const backendView = (r: Replica.Status) => ({
  id: r.id,
  model: r.model,
  url: r.url,
  weight: r.weight,
  health: r.health,
  ejected_at: iso(r.ejectedAt),
  circuit: {
    state: r.breaker.state,
    since: iso(r.breaker.since),
    consecutive_failures: r.breaker.consecutiveFailures,
    window_requests: r.breaker.windowRequests,
    window_failures: r.breaker.windowFailures,
    opens: r.breaker.opens,
    retry_after_ms: r.breaker.retryAfterMs,
    probes_in_flight: r.breaker.probesInFlight
  },
  in_flight: r.inFlight,
  ttft_ewma_ms: r.ttftMs,
  latency_ewma_ms: r.latencyMs,
  balancer_latency_ms: r.balancerLatencyMs,
  queue_waiting: r.queueWaiting,
  queue_running: r.queueRunning,
  requests: r.requests,
  failures: r.failures,
  last_error: r.lastError,
  last_check_at: iso(r.lastCheckAt),
  last_check_ok: r.lastCheckOk
})

/** The routes, as one app needing the current request's info. */
export const make = Effect.gen(function* () {
  const chat = yield* ChatCompletions
  const admin = yield* AdminApi
  const models = yield* Models
  const pool = yield* BackendPool
  const metrics = yield* Metrics
  const readiness = yield* Readiness
  const auth = yield* Auth
  const rpc = yield* RpcServer.RpcServer
  const modelList = json(models.list)

  /** The authenticated caller of an API route, noted for the access log. */
  const caller = (request: HttpServerRequest.HttpServerRequest, info: RequestInfo) => {
    const result = auth.authenticate(request.headers)
    if (Either.isRight(result) && result.right !== undefined) {
      info.keyId = result.right.keyId
      info.keyName = result.right.keyName
      info.tenantId = result.right.tenantId
    }
    return result
  }
  const healthy = json({ status: "ok" })

  const route = (
    request: HttpServerRequest.HttpServerRequest,
    info: RequestInfo
  ): Effect.Effect<HttpServerResponse.HttpServerResponse, Errors.GatewayError, Scope.Scope> => {
    const path = pathOf(request.url)
    switch (path) {
      case "/v1/chat/completions":
      case "/chat/completions":
        if (request.method === "POST") return chat.handle(request, info)
        break
      case "/v1/models":
      case "/models":
        if (request.method === "GET") {
          return Effect.map(caller(request, info), (principal) =>
            principal === undefined || principal.key.models === null
              ? modelList
              : json({
                  ...models.list,
                  data: models.list.data.filter((m) => principal.key.models!.has(m.id))
                })
          )
        }
        break
      case "/health":
        if (request.method === "GET") return Effect.succeed(healthy)
        break
      case "/ready":
        if (request.method === "GET") {
          return Effect.map(readiness.report, (report) =>
            json(
              { status: report.ready ? "ready" : "not_ready", checks: report.checks },
              report.ready ? 200 : 503
            )
          )
        }
        break
    }
    if (path === "/metrics" && request.method === "GET") {
      // On the API's port, the admin key guards it (it names tenants and models).
      const caller = auth.authenticateAdmin(request.headers)
      if (Either.isLeft(caller)) return Effect.fail(caller.left)
      info.keyName = caller.right === "admin" ? "admin" : caller.right
      return Effect.map(metrics.render, (text) =>
        HttpServerResponse.text(text, { contentType: metrics.contentType })
      )
    }
    if (path === "/admin/backends" && request.method === "GET") {
      const caller = auth.authenticateAdmin(request.headers)
      if (Either.isLeft(caller)) return Effect.fail(caller.left)
      info.keyName = caller.right === "admin" ? "admin" : caller.right
      return Effect.map(pool.status, (replicas) => json({ object: "list", data: replicas.map(backendView) }))
    }
    // The internal RPC API authenticates each call itself.
    if (path === RpcServer.path && request.method === "POST") {
      return Effect.provideService(rpc.app, HttpServerRequest.HttpServerRequest, request)
    }
    if (path.startsWith("/admin/")) {
      const q = request.url.indexOf("?")
      return admin.handle(request, info, path, q === -1 ? "" : request.url.slice(q + 1))
    }
    if (path.startsWith("/v1/models/") && request.method === "GET") {
      return Effect.flatMap(caller(request, info), (principal) => {
        const id = decodeURIComponent(path.slice("/v1/models/".length))
        const model = models.list.data.find((m) => m.id === id)
        return model === undefined || Either.isLeft(auth.authorizeModel(principal, id))
          ? Effect.fail(new Errors.ModelNotFound({ model: id }))
          : Effect.succeed(json(model))
      })
    }
    // Any other API path: the caller must be known before it learns what exists.
    if (path.startsWith("/v1/")) {
      return Effect.flatMap(caller(request, info), () =>
        Effect.fail(new Errors.RouteNotFound({ method: request.method, path }))
      )
    }
    return Effect.fail(new Errors.RouteNotFound({ method: request.method, path }))
  }

  const app = Effect.gen(function* () {
    const request = yield* HttpServerRequest.HttpServerRequest
    const info = yield* CurrentRequest
    // The platform runs apps uninterruptibly; the route must yield to a client that goes away.
    const response = yield* route(request, info).pipe(
      Effect.interruptible,
      Effect.onInterrupt(() =>
        Effect.sync(() => {
          info.clientClosed = true
        })
      ),
      Effect.catchAll((error) => {
        info.error = error.message
        const response = ErrorResponse.fromError(error)
        return Effect.succeed(
          error._tag === "PayloadTooLarge"
            ? HttpServerResponse.setHeader(response, "connection", "close")
            : response
        )
      }),
      Effect.catchAllDefect((defect) =>
        Effect.as(
          Effect.logError("unhandled failure", Cause.die(defect)),
          ErrorResponse.toResponse(ErrorResponse.internal)
        )
      )
    )
    return HttpServerResponse.setHeaders(response, {
      "x-request-id": info.clientRequestId ?? info.requestId,
      "x-gateway-request-id": info.requestId
    })
  })
  return { app, metrics }
})

/** Status recorded for a client that went away before the response was complete (as nginx). */
const CLIENT_CLOSED = 499

/**
 * Gives each request its info, and logs it (and counts a chat completion in the metrics) after
 * the response has been sent or abandoned. Traced, the request's span gets its ids (for its
 * events) and, at the end, what the request turned out to be.
 */
const withAccessLog =
  (metrics: Metrics, traced: boolean, sampleRatio: number) =>
  <E, R>(
    app: Effect.Effect<HttpServerResponse.HttpServerResponse, E, R>
  ): Effect.Effect<
    HttpServerResponse.HttpServerResponse,
    E,
    Exclude<R, CurrentRequest> | HttpServerRequest.HttpServerRequest
  > =>
    Effect.flatMap(HttpServerRequest.HttpServerRequest, (request) => {
      const info: RequestInfo = {
        requestId: Ids.newRequestId(),
        clientRequestId: Ids.clientRequestId(request.headers["x-request-id"]),
        startedAt: performance.now()
      }
      const chat = request.method === "POST" && isChatPath(request.url)
      if (chat) metrics.started()
      let span: Tracer.Span | undefined
      let otel: OtelApi.Span | undefined
      const served = app.pipe(
        Effect.provideService(CurrentRequest, info),
        Effect.onExit((exit) => {
          const status = info.clientClosed
            ? CLIENT_CLOSED
            : Exit.isSuccess(exit)
              ? exit.value.status
              : NodeHttpServerRequest.toServerResponse(request).statusCode
          if (info.clientClosed && info.error === undefined) info.error = "client closed the connection"
          const latencyMs = performance.now() - info.startedAt
          if (chat) metrics.finished(info, status, latencyMs)
          if (span !== undefined) {
            span.attribute("http.response.status_code", status)
            Tracing.annotate(span, otel, info)
          }
          const fields = accessFields(
            info,
            { method: request.method, path: pathOf(request.url) },
            status,
            latencyMs
          )
          const api = fields.path !== "/health" && fields.path !== "/ready"
          return api ? Effect.logInfo("request", fields) : Effect.logDebug("request", fields)
        })
      )
      if (!traced || !Tracing.traces(request.url)) return served
      return Tracing.serverSpan(request, sampleRatio, (current) => {
        if (current === undefined) {
          // Not sampled: no spans, and the client's own trace (if any) goes on to the backend;
          // its id still goes on the access line and the events, to find them from the client's.
          const traceparent = request.headers.traceparent
          if (traceparent !== undefined && Tracing.isTraceparent(traceparent)) {
            info.traceparent = traceparent
            info.traceId = Tracing.traceIdOf(traceparent)
          }
          return served
        }
        span = current.span
        otel = current.otel
        info.traceId = current.span.traceId
        info.spanId = current.span.spanId
        return served
      })
    })

/** Serves the gateway on whatever `HttpServer` is provided. */
export const layer = Layer.unwrapEffect(
  Effect.map(Effect.all([make, Tracing.enabled, Tracing.SampleRatio]), ([{ app, metrics }, traced, ratio]) =>
    HttpServer.serve(app, withAccessLog(metrics, traced, ratio))
  )
).pipe(Layer.provide([RpcServer.layer.pipe(Layer.provideMerge(ChatCompletions.Default)), Readiness.Default]))
