/**
 * The gateway process's composition root: config file, logging, the HTTP server and the
 * services behind it. Environment variables are read here and nowhere else.
 */
import { createServer, type IncomingMessage, type Server } from "node:http"
import type { Socket } from "node:net"
import { hostname } from "node:os"
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
import { Config, ConfigError, Context, Effect, Either, Layer, LogLevel, Option, Redacted } from "effect"

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
}

/** The options from `GATEWAY_CONFIG`, `PORT` and `HOST`. */
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
    return {
      gatewayId: Option.getOrUndefined(gatewayId),
      configPath,
      port: Option.getOrUndefined(port),
      host: Option.getOrUndefined(host),
      recording: recording === "on",
      auth: auth === "on",
      adminKey: Option.getOrUndefined(adminKey),
      redisUrl: Option.getOrUndefined(redisUrl)
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

const server = Layer.unwrapEffect(
  Effect.gen(function* () {
    const settings = yield* Settings.Settings
    return NodeHttpServer.layer(
      () => {
        const s = createServer({ keepAliveTimeout: 65_000 })
        s.headersTimeout = 66_000
        return closingUnusedConnections(s)
      },
      { port: settings.server.port, host: settings.server.host }
    )
  })
)

/** The config file with the process's own overrides (`PORT`, `HOST`) applied. */
const settings = (options: Options) =>
  Layer.effect(
    Settings.Settings,
    Effect.map(ConfigLoader.load(options.configPath), (config) =>
      options.port === undefined && options.host === undefined
        ? config
        : GatewayConfig.GatewayConfig.make({
            ...config,
            server: GatewayConfig.ServerConfig.make({
              ...config.server,
              port: options.port ?? config.server.port,
              host: options.host ?? config.server.host
            })
          })
    )
  ).pipe(Layer.provide(NodeContext.layer))

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
            Layer.mergeAll(
              auth
                ? options.devKey === true
                  ? Layer.provideMerge(devKey, tenancy(options))
                  : Layer.merge(tenancy(options), noDevAccess)
                : Layer.merge(tenancyDisabled(options), noDevAccess),
              recording ? Recording.layer : Recording.layerDisabled
            )
          ),
          Layer.provide(Recording.database)
        )
      : HttpApp.layer.pipe(
          Layer.provideMerge(Layer.mergeAll(tenancyDisabled(options), Recording.layerDisabled, noDevAccess)),
          Layer.provide(Layer.mergeAll(Readiness.Readiness.Default, Meter.Meter.Default))
        )
  const backends = BackendPool.layer({ gateway: options.gatewayId ?? `${hostname()}:${process.pid}` }).pipe(
    Layer.provide(
      recording ? BackendJournal.layer.pipe(Layer.provide(Recording.database)) : BackendJournal.layerNone
    )
  )
  return app.pipe(
    Layer.provide(
      Layer.mergeAll(Dispatcher.Dispatcher.Default, Router.Router.Default, Metrics.Metrics.Default)
    ),
    Layer.provideMerge(backends),
    Layer.provideMerge(Models.Models.Default),
    Layer.provide(OpenAiCompatible.layer),
    Layer.provideMerge(server),
    Layer.provide(settings(options)),
    // Spans cost allocations on every request; tracing turns them on when an exporter is set.
    Layer.provide(Tracing.layerDisabled)
  )
}
