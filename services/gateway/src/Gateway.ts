/**
 * The gateway process's composition root: config file, logging, the HTTP server and the
 * services behind it. Environment variables are read here and nowhere else.
 */
import { createServer } from "node:http"
import { NodeContext, NodeHttpServer } from "@effect/platform-node"
import { ConfigLoader, HttpApp, Models, OpenAiCompatible, Recording, Settings, Tracing } from "@gateway/core"
import { GatewayConfig } from "@gateway/domain"
import { Config, ConfigError, Effect, Either, Layer, LogLevel, Option } from "effect"

/** How the process was asked to run (from the environment, or from a test). */
export interface Options {
  readonly configPath: string
  /** Overrides `server.port` from the config file. */
  readonly port?: number | undefined
  /** Overrides `server.host` from the config file. */
  readonly host?: string | undefined
  /** Record every request in the event log (default). Off only to measure what it costs. */
  readonly recording?: boolean | undefined
}

/** The options from `GATEWAY_CONFIG`, `PORT` and `HOST`. */
export const optionsFromEnv = (defaultConfigPath: string) =>
  Effect.gen(function* () {
    const configPath = yield* Config.string("GATEWAY_CONFIG").pipe(Config.withDefault(defaultConfigPath))
    const port = yield* Config.port("PORT").pipe(Config.option)
    const host = yield* Config.string("HOST").pipe(Config.option)
    const recording = yield* Config.literal("on", "off")("GATEWAY_RECORDING").pipe(Config.withDefault("on"))
    return {
      configPath,
      port: Option.getOrUndefined(port),
      host: Option.getOrUndefined(host),
      recording: recording === "on"
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

const server = Layer.unwrapEffect(
  Effect.gen(function* () {
    const settings = yield* Settings.Settings
    return NodeHttpServer.layer(
      () => {
        const s = createServer({ keepAliveTimeout: 65_000 })
        s.headersTimeout = 66_000
        return s
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

/** The whole gateway: serves until interrupted. */
export const layer = (options: Options) =>
  HttpApp.layer.pipe(
    Layer.provide(options.recording === false ? Recording.layerDisabled : Recording.layer),
    Layer.provide(Models.Models.Default),
    Layer.provide(OpenAiCompatible.layer),
    Layer.provideMerge(server),
    Layer.provide(settings(options)),
    // Spans cost allocations on every request; tracing turns them on when an exporter is set.
    Layer.provide(Tracing.layerDisabled)
  )
