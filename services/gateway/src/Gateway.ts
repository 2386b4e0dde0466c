/**
 * The gateway process's composition root: config file, logging, the HTTP server and the
 * services behind it. Environment variables are read here and nowhere else.
 */
import { createServer, type IncomingMessage, type Server, type ServerResponse } from "node:http"
import type { Socket } from "node:net"
import { hostname } from "node:os"
import { HttpServerRequest, HttpServerResponse } from "@effect/platform"
import { NodeContext, NodeHttpServer } from "@effect/platform-node"
import {
  AdminApi,
  Auth,
  BackendJournal,
  BackendPool,
  ConfigLoader,
  Dispatcher,
  HttpApp,
  KeyAdmin,
  KeyRegistry,
  type LimiterStore,
  MemoryLimiterStore,
  Meter,
  Metrics,
  Models,
  OpenAiCompatible,
  RateLimiter,
  Readiness,
  Recording,
  RedisLimiterStore,
  Router,
  Settings,
  Tracing
} from "@gateway/core"
import { GatewayConfig, Ids } from "@gateway/domain"
import {
  Config,
  ConfigError,
  Context,
  Data,
  Effect,
  Either,
  Layer,
  LogLevel,
  Option,
  Redacted,
  Schedule
} from "effect"

/** How the process was asked to run (from the environment, or from a test). */
export interface Options {
  readonly configPath: string
  /** Overrides `server.port` from the config file. */
  readonly port?: number | undefined
  /** Overrides `server.host` from the config file. */
  readonly host?: string | undefined
  /** Record every request in the event log (default). Off only to measure what it costs. */
  readonly recording?: boolean | undefined
  /** API keys and rate limits on `/v1/*` (default). Off only to measure what they cost. */
  readonly auth?: boolean | undefined
  /** The admin key (`ADMIN_KEY`); without it only keys with the `admin` scope reach `/admin/*`. */
  readonly adminKey?: Redacted.Redacted<string> | undefined
  /** Where the rate limits live (`REDIS_URL`); in this process's memory when absent. */
  readonly redisUrl?: Redacted.Redacted<string> | undefined
  /** Create the tenant `dev` and its key on first start (the embedded default). */
  readonly devKey?: boolean | undefined
  /** Names this instance on the backend events it records (`GATEWAY_ID`, else host:pid). */
  readonly gatewayId?: string | undefined
  /**
   * Export traces over OTLP/HTTP (set when `OTEL_EXPORTER_OTLP_ENDPOINT` or
   * `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is, unless `OTEL_SDK_DISABLED=true`); spans are off otherwise.
   */
  readonly tracing?: { readonly serviceName: string; readonly sampleRatio?: number | undefined } | undefined
  /** Overrides `server.shutdown_grace_ms` from the config file (`SHUTDOWN_GRACE_MS`). */
  readonly shutdownGraceMs?: number | undefined
  /** Overrides `server.metrics_port` from the config file (`METRICS_PORT`). */
  readonly metricsPort?: number | undefined
}

/** The options from `GATEWAY_CONFIG`, `PORT`, `HOST` and the other variables named above. */
export const optionsFromEnv = (defaultConfigPath: string) =>
  Effect.gen(function* () {
    const configPath = yield* Config.string("GATEWAY_CONFIG").pipe(Config.withDefault(defaultConfigPath))
    const port = yield* Config.port("PORT").pipe(Config.option)
    const host = yield* Config.string("HOST").pipe(Config.option)
    const recording = yield* Config.literal("on", "off")("GATEWAY_RECORDING").pipe(Config.withDefault("on"))
    const auth = yield* Config.literal("on", "off")("GATEWAY_AUTH").pipe(Config.withDefault("on"))
    const adminKey = yield* Config.redacted("ADMIN_KEY").pipe(Config.option)
    const redisUrl = yield* Config.redacted("REDIS_URL").pipe(Config.option)
    const gatewayId = yield* Config.string("GATEWAY_ID").pipe(Config.option)
    const otlpEndpoint = yield* Config.string("OTEL_EXPORTER_OTLP_ENDPOINT").pipe(
      Config.orElse(() => Config.string("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")),
      Config.option
    )
    const otelDisabled = yield* Config.boolean("OTEL_SDK_DISABLED").pipe(Config.withDefault(false))
    const serviceName = yield* Config.string("OTEL_SERVICE_NAME").pipe(Config.withDefault("llm-gateway"))
    // The standard sampler variables, as far as they apply: requests are traced at this ratio.
    const sampler = yield* Config.string("OTEL_TRACES_SAMPLER").pipe(Config.option)
    const samplerArg = yield* Config.number("OTEL_TRACES_SAMPLER_ARG").pipe(
      Config.validate({ message: "expected a ratio between 0 and 1", validation: (r) => r >= 0 && r <= 1 }),
      Config.option
    )
    const sampleRatio = Option.match(sampler, {
      onNone: () => 1,
      onSome: (name) =>
        name === "always_off" || name === "parentbased_always_off"
          ? 0
          : name.endsWith("traceidratio")
            ? Option.getOrElse(samplerArg, () => 1)
            : 1
    })
    const shutdownGraceMs = yield* Config.integer("SHUTDOWN_GRACE_MS").pipe(
      Config.validate({ message: "expected a positive number of milliseconds", validation: (ms) => ms >= 1 }),
      Config.option
    )
    const metricsPort = yield* Config.port("METRICS_PORT").pipe(Config.option)
    return {
      tracing: Option.isSome(otlpEndpoint) && !otelDisabled ? { serviceName, sampleRatio } : undefined,
      gatewayId: Option.getOrUndefined(gatewayId),
      configPath,
      port: Option.getOrUndefined(port),
      host: Option.getOrUndefined(host),
      recording: recording === "on",
      auth: auth === "on",
      adminKey: Option.getOrUndefined(adminKey),
      redisUrl: Option.getOrUndefined(redisUrl),
      shutdownGraceMs: Option.getOrUndefined(shutdownGraceMs),
      metricsPort: Option.getOrUndefined(metricsPort)
    } satisfies Options
  })

const levels: Record<string, LogLevel.LogLevel> = {
  trace: LogLevel.Trace,
  debug: LogLevel.Debug,
  info: LogLevel.Info,
  warn: LogLevel.Warning,
  warning: LogLevel.Warning,
  error: LogLevel.Error,
  fatal: LogLevel.Fatal,
  none: LogLevel.None
}

/** `LOG_LEVEL` (trace, debug, info, warn, error, none; any case), info by default. */
export const logLevelFromEnv = Config.string("LOG_LEVEL").pipe(
  Config.mapOrFail((name) => {
    const level = levels[name.toLowerCase()]
    return level === undefined
      ? Either.left(
          ConfigError.InvalidData(
            ["LOG_LEVEL"],
            `expected one of ${Object.keys(levels).join(", ")}, got '${name}'`
          )
        )
      : Either.right(level)
  }),
  Config.withDefault(LogLevel.Info)
)

/**
 * `close` also drops connections that never sent a request (a load balancer's or an HTTP client's
 * spare ones): Node closes idle keep-alive connections on `close`, but not those, and they would
 * hold a graceful shutdown until their headers timeout.
 */
const closingUnusedConnections = (s: Server): Server => {
  const unused = new Set<Socket>()
  s.on("connection", (socket: Socket) => {
    unused.add(socket)
    socket.once("close", () => unused.delete(socket))
  })
  s.on("request", (request: IncomingMessage) => unused.delete(request.socket))
  const close = s.close.bind(s)
  s.close = (callback?: (error?: Error) => void) => {
    close(callback)
    for (const socket of unused) socket.destroy()
    return s
  }
  return s
}

/**
 * Counts the requests in flight on a node server (one listener per response), for a graceful
 * shutdown to wait for them. While draining, an answer closes its connection after it.
 */
class InFlight {
  count = 0
  draining = false
  private waiter: (() => void) | undefined

  constructor(server: Server) {
    const closed = () => {
      this.count--
      if (this.count === 0) this.waiter?.()
    }
    server.on("request", (_request: IncomingMessage, response: ServerResponse) => {
      this.count++
      if (this.draining) response.setHeader("connection", "close")
      response.on("close", closed)
    })
  }

  /** Completes once no request is in flight. */
  readonly idle: Effect.Effect<void> = Effect.async((resume) => {
    if (this.count === 0) return resume(Effect.void)
    this.waiter = () => {
      this.waiter = undefined
      resume(Effect.void)
    }
    return Effect.sync(() => {
      this.waiter = undefined
    })
  })
}

/** The API port's node server and its requests in flight, for the graceful shutdown. */
class ApiServer extends Context.Tag("@gateway/gateway/ApiServer")<
  ApiServer,
  { readonly server: Server; readonly requests: InFlight }
>() {}

const server = Layer.unwrapEffect(
  Effect.gen(function* () {
    const settings = yield* Settings.Settings
    const s = createServer({ keepAliveTimeout: 65_000 })
    s.headersTimeout = 66_000
    const api = { server: closingUnusedConnections(s), requests: new InFlight(s) }
    return Layer.merge(
      NodeHttpServer.layer(() => api.server, { port: settings.server.port, host: settings.server.host }),
      Layer.succeed(ApiServer, api)
    )
  })
)

/**
 * The graceful shutdown. Built after everything else, its finalizer runs first, while backends,
 * recorder and database all still work: it closes the listening socket (a new connection is
 * refused) and the idle connections, and lets the requests in flight finish for up to
 * `server.shutdown_grace_ms`; meanwhile a request on a kept-alive connection is still answered
 * (with `connection: close`) and `/ready` says not ready. Then it cuts what is left: those
 * requests end as if their clients had gone (recorded as cancelled, their backends' answers drained
 * for usage for up to `metering.drain_after_disconnect_ms`). Then the layers close in order, and
 * the event writer commits what was queued.
 */
const drainOnShutdown = Layer.scopedDiscard(
  Effect.gen(function* () {
    const { server, requests } = yield* ApiServer
    const settings = yield* Settings.Settings
    const pool = yield* BackendPool.BackendPool
    const readiness = yield* Readiness.Readiness
    yield* readiness.register(
      "serving",
      Effect.suspend(() => (requests.draining ? Effect.fail("shutting down") : Effect.void))
    )
    const { shutdownGraceMs } = settings.server
    /** Every backend answer has been released: finished, or cut and drained for its usage. */
    const backendsDone = Effect.map(pool.status, (replicas) => replicas.every((r) => r.inFlight === 0))
    yield* Effect.addFinalizer(() =>
      Effect.gen(function* () {
        requests.draining = true
        yield* Effect.logInfo("shutting down", { in_flight: requests.count, grace_ms: shutdownGraceMs })
        server.close()
        // A finalizer is uninterruptible: the waits must be made interruptible to time out.
        const finished = yield* requests.idle.pipe(
          Effect.interruptible,
          Effect.timeoutOption(shutdownGraceMs)
        )
        if (Option.isSome(finished)) {
          server.closeIdleConnections()
        } else {
          yield* Effect.logWarning("shutdown grace period over: cutting the requests still in flight", {
            in_flight: requests.count
          })
          server.closeAllConnections()
        }
        // Answers cut short (here, or by clients just before) are drained for their usage, then
        // recorded: their backend leases are released just before their terminal events are queued.
        if (!(yield* backendsDone)) {
          yield* backendsDone.pipe(
            Effect.repeat({ schedule: Schedule.spaced("20 millis"), until: (done) => done }),
            Effect.interruptible,
            Effect.timeoutOption(settings.metering.drainAfterDisconnectMs + cutMarginMs)
          )
          yield* Effect.sleep("50 millis")
        }
      })
    )
  })
).pipe(Layer.provide(Readiness.Readiness.Default))

/** How much longer than `metering.drain_after_disconnect_ms` cut answers may take to be recorded. */
const cutMarginMs = 1_000

/**
 * Closing the layers after the drain: the event writer's flush is bounded at 10 s, then the
 * database and the backends close.
 */
const teardownMs = 15_000

/**
 * The longest a shutdown may take: the grace period, the drain of the answers cut at its end,
 * and the teardown. The process exits anyway once it is over (see main.ts).
 */
export const shutdownBudgetMs = (config: GatewayConfig.GatewayConfig): number =>
  config.server.shutdownGraceMs + config.metering.drainAfterDisconnectMs + cutMarginMs + teardownMs

/** Start-up failed: the metrics port (`server.metrics_port`) could not be listened on. */
export class MetricsPortError extends Data.TaggedError("MetricsPortError")<{ readonly message: string }> {}

const pathOf = (url: string) => {
  const q = url.indexOf("?")
  return q === -1 ? url : url.slice(0, q)
}

/**
 * `server.metrics_port`: a second port on the same host serving only `GET /metrics`, without
 * auth, for Prometheus (the API port's `/metrics` needs the admin key). It closes after the drain.
 */
const metricsEndpoint = Layer.scopedDiscard(
  Effect.gen(function* () {
    const { metricsPort, host } = (yield* Settings.Settings).server
    if (metricsPort === undefined) return
    const metrics = yield* Metrics.Metrics
    const endpoint = yield* NodeHttpServer.make(() => createServer(), { port: metricsPort, host }).pipe(
      Effect.mapError(
        (error) =>
          new MetricsPortError({
            message: `cannot listen for metrics: ${error.cause instanceof Error ? error.cause.message : String(error.cause)} (set server.metrics_port or METRICS_PORT to another port)`
          })
      )
    )
    yield* endpoint.serve(
      Effect.flatMap(HttpServerRequest.HttpServerRequest, (request) =>
        request.method === "GET" && pathOf(request.url) === "/metrics"
          ? Effect.map(metrics.render, (text) =>
              HttpServerResponse.text(text, { contentType: metrics.contentType })
            )
          : Effect.succeed(HttpServerResponse.text("not found\n", { status: 404 }))
      )
    )
    const address = endpoint.address
    if (address._tag === "TcpAddress") {
      yield* Effect.logInfo("metrics served", { url: `http://${address.hostname}:${address.port}/metrics` })
    }
  })
)

/** The config file with the process's own overrides (`PORT`, `HOST`, `SHUTDOWN_GRACE_MS`, `METRICS_PORT`). */
export const loadConfig = (options: Options) =>
  Effect.map(ConfigLoader.load(options.configPath), (config) => {
    const { port, host, shutdownGraceMs, metricsPort } = options
    if (
      port === undefined &&
      host === undefined &&
      shutdownGraceMs === undefined &&
      metricsPort === undefined
    ) {
      return config
    }
    return GatewayConfig.GatewayConfig.make({
      ...config,
      server: GatewayConfig.ServerConfig.make({
        ...config.server,
        port: port ?? config.server.port,
        host: host ?? config.server.host,
        shutdownGraceMs: shutdownGraceMs ?? config.server.shutdownGraceMs,
        ...(metricsPort === undefined ? {} : { metricsPort })
      })
    })
  }).pipe(Effect.provide(NodeContext.layer))

const settings = (options: Options) => Layer.effect(Settings.Settings, loadConfig(options))

/** Where the buckets live: Redis shared by every replica, or this process's memory. */
const limiterStore = (options: Options): Layer.Layer<LimiterStore.LimiterStore, never, Settings.Settings> =>
  options.redisUrl === undefined
    ? MemoryLimiterStore.layer
    : Layer.unwrapScoped(
        Effect.gen(function* () {
          const { redisTimeoutMs } = (yield* Settings.Settings).limits
          const redis = yield* RedisLimiterStore.connect(Redacted.value(options.redisUrl!), {
            commandTimeoutMs: redisTimeoutMs
          })
          return RedisLimiterStore.layer({ redis, timeoutMs: redisTimeoutMs })
        })
      )

/** Everyone anonymous and unlimited, no admin API: a benchmark's baseline. */
const tenancyDisabled = (options: Options) =>
  Layer.mergeAll(
    Auth.layerDisabled(Option.fromNullable(options.adminKey)),
    RateLimiter.layerDisabled,
    AdminApi.layerDisabled
  )

/** API keys from the log, limits in the store, the admin API. */
const tenancy = (options: Options) => {
  const adminKey = Option.fromNullable(options.adminKey)
  const limiter = Layer.unwrapEffect(
    Effect.map(Settings.Settings, (settings) => RateLimiter.layer({ failure: settings.limits.redisFailure }))
  ).pipe(Layer.provide(limiterStore(options)))
  return AdminApi.layer.pipe(
    Layer.provideMerge(Auth.layer(adminKey)),
    Layer.provideMerge(limiter),
    Layer.provideMerge(KeyAdmin.KeyAdmin.Default),
    Layer.provideMerge(KeyRegistry.KeyRegistry.Default)
  )
}

/** The embedded default's dev key: its secret when it was just created (shown once), else its prefix. */
export class DevAccess extends Context.Tag("@gateway/gateway/DevAccess")<
  DevAccess,
  { readonly secret: string | undefined; readonly prefix: string | undefined }
>() {}

const noDevAccess = Layer.succeed(DevAccess, { secret: undefined, prefix: undefined })

/** Makes sure the tenant `dev` has a key named `dev` (the embedded default's first start). */
const devKey = Layer.effect(
  DevAccess,
  Effect.gen(function* () {
    const registry = yield* KeyRegistry.KeyRegistry
    const existing = registry
      .keys()
      .find((k) => k.tenantId === "dev" && k.name === "dev" && k.revoked === null)
    if (existing !== undefined) return { secret: undefined, prefix: existing.prefix }
    const admin = yield* KeyAdmin.KeyAdmin
    const { key, secret } = yield* admin.createKey(
      { tenant: "dev", name: "dev" },
      "embedded-default",
      Ids.newRequestId()
    )
    return { secret, prefix: key.prefix }
  }).pipe(Effect.orDie)
)

/** The whole gateway: serves until interrupted. */
export const layer = (options: Options) => {
  const recording = options.recording !== false
  const auth = options.auth !== false
  const app =
    recording || auth
      ? HttpApp.layer.pipe(
          Layer.provideMerge(
            auth
              ? options.devKey === true
                ? Layer.provideMerge(devKey, tenancy(options))
                : Layer.merge(tenancy(options), noDevAccess)
              : Layer.merge(tenancyDisabled(options), noDevAccess)
          ),
          // Under the admin API: its dead-letter queue records retries.
          Layer.provideMerge(recording ? Recording.layer : Recording.layerDisabled),
          Layer.provide(Recording.database)
        )
      : HttpApp.layer.pipe(
          Layer.provideMerge(Layer.mergeAll(tenancyDisabled(options), Recording.layerDisabled, noDevAccess)),
          Layer.provide(Layer.mergeAll(Readiness.Readiness.Default, Meter.Meter.Default))
        )
  const gatewayId = options.gatewayId ?? `${hostname()}:${process.pid}`
  const backends = BackendPool.layer({ gateway: gatewayId }).pipe(
    Layer.provide(
      recording ? BackendJournal.layer.pipe(Layer.provide(Recording.database)) : BackendJournal.layerNone
    )
  )
  // The drain is built last so that, on shutdown, it runs before anything else closes.
  return drainOnShutdown.pipe(
    Layer.provideMerge(Layer.merge(app, metricsEndpoint)),
    Layer.provide(
      Layer.mergeAll(Dispatcher.Dispatcher.Default, Router.Router.Default, Metrics.Metrics.Default)
    ),
    Layer.provideMerge(backends),
    Layer.provideMerge(Models.Models.Default),
    Layer.provide(OpenAiCompatible.layer),
    Layer.provideMerge(server),
    Layer.provide(settings(options)),
    // Spans cost allocations on every request: on only when there is somewhere to export them.
    Layer.provide(
      options.tracing === undefined
        ? Tracing.layerDisabled
        : Tracing.layerOtlp({ ...options.tracing, instanceId: gatewayId })
    )
  )
}
