/**
 * The gateway's Prometheus metrics, on a registry of its own (prom-client). Per request, once it
 * is over: counts by model, status class, tier, cache outcome and tenant; histograms of latency,
 * time to first token, inter-token latency and the gateway's own overhead; tokens and cost; limit
 * rejections; retries and fallbacks. Each backend replica's health, breaker state, in-flight count
 * and latency estimate are read from the pool at scrape time. The event log's writer reports each
 * insert statement; its queue, spool and the projections' lag are read at scrape time. Label values
 * are bounded: models and policies from the config (anything else is `other`), tenants from the
 * admin API, projections from the code.
 */
import { type EventWriter, ProjectionRunner } from "@gateway/event-store"
import { Clock, Effect, Fiber, Option, Ref, type Scope } from "effect"
import * as Prom from "prom-client"
import { BackendPool } from "./BackendPool.js"
import type { RequestInfo } from "./CurrentRequest.js"
import { Settings } from "./Settings.js"

/** Seconds; LLM requests run from tens of milliseconds to minutes. */
const durationBuckets = [0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320]
const ttftBuckets = [0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1, 2, 4, 8, 16]
const itlBuckets = [0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32]
/** The gateway's own time per request: tens of microseconds to tens of milliseconds. */
const overheadBuckets = [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1]

/** Events per insert statement: up to the writer's 1,000 stream writes, each of one or more events. */
const batchSizeBuckets = [1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000]
/** One insert statement: half a millisecond on a quiet database, seconds on one in trouble. */
const appendBuckets = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5]

/** How long a scrape waits for the projections' lag before showing the last values read. */
const lagWait = "1 second"
/** How long a lag read may run on in the background; no other starts meanwhile. */
const lagGiveUp = "10 seconds"

/** What recording shows at scrape time: its writer's state and the projections' lag. */
export interface EventLogSource {
  readonly writer: Effect.Effect<EventWriter.Status>
  readonly lag: Effect.Effect<ReadonlyArray<ProjectionRunner.Lag>, unknown>
}

const circuitStates = { closed: 0, open: 1, half_open: 2 } as const

const statusClass = (status: number) => `${Math.floor(status / 100)}xx`

export class Metrics extends Effect.Service<Metrics>()("@gateway/core/Metrics", {
  scoped: Effect.gen(function* () {
    const settings = yield* Settings
    const pool = yield* BackendPool
    const known = new Set<string>([
      ...settings.models.map((m) => m.name as string),
      ...settings.routing.policies.map((p) => p.name as string)
    ])
    /** A model label: a configured model or policy, else `other` (clients send any string). */
    const modelLabel = (model: string | undefined) =>
      model === undefined ? "none" : known.has(model) ? model : "other"

    const registry = new Prom.Registry()
    Prom.collectDefaultMetrics({ register: registry, prefix: "gateway_" })
    const registers = [registry]

    const requests = new Prom.Counter({
      name: "gateway_requests_total",
      help: "Chat completion requests, once over, by model (that answered), status class, tier, cache outcome and tenant.",
      labelNames: ["model", "status_class", "tier", "cache", "tenant"] as const,
      registers
    })
    const duration = new Prom.Histogram({
      name: "gateway_request_duration_seconds",
      help: "From the request's arrival to the end of its answer.",
      labelNames: ["model", "stream"] as const,
      buckets: durationBuckets,
      registers
    })
    const ttft = new Prom.Histogram({
      name: "gateway_time_to_first_token_seconds",
      help: "From the request's arrival to the first token of a streamed answer.",
      labelNames: ["model"] as const,
      buckets: ttftBuckets,
      registers
    })
    const itl = new Prom.Histogram({
      name: "gateway_inter_token_latency_seconds",
      help: "Mean time between tokens of a streamed answer, one observation per request.",
      labelNames: ["model"] as const,
      buckets: itlBuckets,
      registers
    })
    const overhead = new Prom.Histogram({
      name: "gateway_overhead_seconds",
      help: "The gateway's own time per request: its latency minus the time spent waiting on backends.",
      labelNames: ["stream"] as const,
      buckets: overheadBuckets,
      registers
    })
    const tokens = new Prom.Counter({
      name: "gateway_tokens_total",
      help: "Tokens of completed requests, by model, tenant and type (prompt, completion).",
      labelNames: ["model", "tenant", "type"] as const,
      registers
    })
    const cost = new Prom.Counter({
      name: "gateway_cost_usd_total",
      help: "Cost of completed requests in USD, by model and tenant.",
      labelNames: ["model", "tenant"] as const,
      registers
    })
    const rejections = new Prom.Counter({
      name: "gateway_rate_limit_rejections_total",
      help: "Requests refused by a rate limit or a budget, by reason.",
      labelNames: ["reason"] as const,
      registers
    })
    const inFlight = new Prom.Gauge({
      name: "gateway_requests_in_flight",
      help: "Chat completion requests being served now.",
      registers
    })
    const retries = new Prom.Counter({
      name: "gateway_retries_total",
      help: "Backend attempts beyond the first, by the model the request named.",
      labelNames: ["model"] as const,
      registers
    })
    const fallbacks = new Prom.Counter({
      name: "gateway_fallbacks_total",
      help: "Requests answered by a fallback model, by the model named and the one that answered.",
      labelNames: ["from", "to"] as const,
      registers
    })

    // Backend replicas, read from the pool when Prometheus scrapes.
    const backendLabels = ["backend", "model"] as const
    const healthy = new Prom.Gauge({
      name: "gateway_backend_healthy",
      help: "1 when the replica gets traffic by its health checks, 0 while ejected.",
      labelNames: backendLabels,
      registers
    })
    const circuit = new Prom.Gauge({
      name: "gateway_backend_circuit_state",
      help: "The replica's circuit breaker: 0 closed, 1 open, 2 half-open.",
      labelNames: backendLabels,
      registers
    })
    const backendInFlight = new Prom.Gauge({
      name: "gateway_backend_in_flight",
      help: "Requests this gateway has on the replica now.",
      labelNames: backendLabels,
      registers
    })
    const latencyEstimate = new Prom.Gauge({
      name: "gateway_backend_latency_estimate_seconds",
      help: "The replica's latency estimates (EWMA): whole requests and time to first token.",
      labelNames: [...backendLabels, "kind"] as const,
      registers
    })
    const backendQueue = new Prom.Gauge({
      name: "gateway_backend_queue_requests",
      help: "The model server's own queue, as its /metrics last said (pool.queue_metrics): waiting and running requests.",
      labelNames: [...backendLabels, "state"] as const,
      registers
    })
    const readBackends = Effect.map(pool.status, (replicas) => {
      for (const r of replicas) {
        const labels = { backend: r.id, model: r.model }
        healthy.set(labels, r.health === "healthy" ? 1 : 0)
        circuit.set(labels, circuitStates[r.breaker.state])
        backendInFlight.set(labels, r.inFlight)
        latencyEstimate.set({ ...labels, kind: "request" }, r.latencyMs / 1000)
        latencyEstimate.set({ ...labels, kind: "ttft" }, r.ttftMs / 1000)
        // Only replicas whose queue is scraped: an absent series says "unknown", not "empty".
        if (r.queueWaiting !== null) backendQueue.set({ ...labels, state: "waiting" }, r.queueWaiting)
        if (r.queueRunning !== null) backendQueue.set({ ...labels, state: "running" }, r.queueRunning)
      }
    })

    // The event log: the writer reports each statement; the rest is read when Prometheus scrapes.
    const batchSize = new Prom.Histogram({
      name: "gateway_event_writer_batch_size",
      help: "Events per insert statement of the event writer (spool drains included).",
      buckets: batchSizeBuckets,
      registers
    })
    const appendDuration = new Prom.Histogram({
      name: "gateway_event_append_duration_seconds",
      help: "Time of one insert statement of the event writer, from sending it to its commit.",
      buckets: appendBuckets,
      registers
    })
    const appendFailures = new Prom.Counter({
      name: "gateway_event_append_failures_total",
      help: "Insert statements of the event writer that failed, by reason (unavailable: the database is away, a retry or the spool follows; rejected: it refused them).",
      labelNames: ["reason"] as const,
      registers
    })
    const spooledBatches = new Prom.Counter({
      name: "gateway_event_spooled_batches_total",
      help: "Batches the event writer put in its local spool because the database was away.",
      registers
    })
    const queueDepth = new Prom.Gauge({
      name: "gateway_event_writer_queue_depth",
      help: "Stream writes waiting in the event writer's queue.",
      registers
    })
    const spoolBytes = new Prom.Gauge({
      name: "gateway_event_spool_bytes",
      help: "Bytes of events in the local spool, waiting for the database.",
      registers
    })
    const refusing = new Prom.Gauge({
      name: "gateway_event_writer_refusing",
      help: "1 while nothing can be made durable (database away, spool unwritable) and requests are refused.",
      registers
    })
    const projectionLag = new Prom.Gauge({
      name: "gateway_projection_lag_events",
      help: `Events in the log not yet applied by the projection, whichever replica runs it (exact up to ${ProjectionRunner.lagCountLimit}, estimated beyond).`,
      labelNames: ["projection"] as const,
      registers
    })
    const lagReadAt = new Prom.Gauge({
      name: "gateway_projection_lag_read_timestamp_seconds",
      help: "When the projections' lag was last read (Unix time; 0 before the first read): while the database is away the lag shows that read's values.",
      registers
    })
    appendFailures.inc({ reason: "unavailable" }, 0)
    appendFailures.inc({ reason: "rejected" }, 0)
    const unavailable = appendFailures.labels({ reason: "unavailable" })
    const rejected = appendFailures.labels({ reason: "rejected" })

    /** For the event writer (recording provides it): one call per statement or spooled batch. */
    const eventWriterObserver: EventWriter.Observer = {
      appended: (events, seconds) => {
        batchSize.observe(events)
        appendDuration.observe(seconds)
      },
      appendFailed: (reason) => (reason === "Unavailable" ? unavailable : rejected).inc(),
      spooled: () => spooledBatches.inc()
    }

    const eventLog = yield* Ref.make(Option.none<EventLogSource>())
    /** Shows recording's writer and projections on `/metrics` for the lifetime of the caller's scope. */
    const attachEventLog = (source: EventLogSource): Effect.Effect<void, never, Scope.Scope> =>
      Effect.acquireRelease(Ref.set(eventLog, Option.some(source)), () => Ref.set(eventLog, Option.none()))

    const scope = yield* Effect.scope
    const lagReads = yield* Effect.makeSemaphore(1)
    /** One lag read at a time, in the background; while the database cannot answer, the last values stay. */
    const refreshLag = (lag: EventLogSource["lag"]) =>
      lagReads.withPermitsIfAvailable(1)(
        lag.pipe(
          Effect.timeout(lagGiveUp),
          Effect.tap((rows) =>
            Effect.map(Clock.currentTimeMillis, (now) => {
              for (const row of rows) projectionLag.set({ projection: row.name }, row.events)
              lagReadAt.set(now / 1000)
            })
          ),
          Effect.exit
        )
      )
    const readEventLog = Effect.flatMap(
      Ref.get(eventLog),
      Option.match({
        onNone: () => Effect.void,
        onSome: (source) =>
          Effect.gen(function* () {
            const status = yield* source.writer
            queueDepth.set(status.queued)
            spoolBytes.set(status.spoolBytes)
            refusing.set(status.refusing ? 1 : 0)
            const read = yield* Effect.forkIn(refreshLag(source.lag), scope)
            yield* Fiber.await(read).pipe(Effect.timeout(lagWait), Effect.ignore)
          })
      })
    )

    /** A chat completion request began. */
    const started = () => inFlight.inc()

    /** A chat completion request is over (answered, failed, refused or abandoned) with `status`. */
    const finished = (info: RequestInfo, status: number, latencyMs: number) => {
      inFlight.dec()
      const model = modelLabel(info.model)
      const tenant = info.tenantId ?? "none"
      const stream = info.stream === true ? "true" : "false"
      requests.inc({
        model,
        status_class: statusClass(status),
        tier: info.tier ?? "none",
        cache: "none",
        tenant
      })
      duration.observe({ model, stream }, latencyMs / 1000)
      if (info.rejection !== undefined) rejections.inc({ reason: info.rejection })
      if (info.upstreamMs !== undefined)
        overhead.observe({ stream }, Math.max(0, latencyMs - info.upstreamMs) / 1000)
      if (info.attempts !== undefined && info.attempts > 1) {
        retries.inc(
          { model: modelLabel(info.fallbackFrom ?? info.requested ?? info.model) },
          info.attempts - 1
        )
      }
      if (info.fallbackFrom !== undefined) fallbacks.inc({ from: modelLabel(info.fallbackFrom), to: model })
      if (info.ttftMs !== undefined) {
        ttft.observe({ model }, info.ttftMs / 1000)
        if (info.completionTokens !== undefined && info.completionTokens > 1) {
          itl.observe({ model }, (latencyMs - info.ttftMs) / (info.completionTokens - 1) / 1000)
        }
      }
      if (info.promptTokens !== undefined) tokens.inc({ model, tenant, type: "prompt" }, info.promptTokens)
      if (info.completionTokens !== undefined) {
        tokens.inc({ model, tenant, type: "completion" }, info.completionTokens)
      }
      if (info.costMicroUsd !== undefined) cost.inc({ model, tenant }, info.costMicroUsd / 1e6)
    }

    /** The exposition text, with the backends and the event log read now. */
    const render = readBackends.pipe(
      Effect.zipRight(readEventLog),
      Effect.zipRight(Effect.promise(() => registry.metrics()))
    )

    return {
      started,
      finished,
      render,
      contentType: registry.contentType,
      eventWriterObserver,
      attachEventLog
    } as const
  })
}) {}
