/**
 * Starts the gateway. With `GATEWAY_CONFIG` it serves the backends named there; without it, the
 * embedded default: the bundled config plus two simulated model servers in this process.
 */
import { fileURLToPath } from "node:url"
import { NodeRuntime } from "@effect/platform-node"
import { BackendSim } from "@gateway/backend-sim"
import { ConfigLoader, KeyAdmin, Logging } from "@gateway/core"
import { Cause, Config, Effect, Layer, Logger, LogLevel, Option, Redacted } from "effect"
import * as Embedded from "./Embedded.js"
import * as Gateway from "./Gateway.js"

const embeddedConfig = fileURLToPath(new URL("../config/embedded.yaml", import.meta.url))

const program = Effect.gen(function* () {
  const explicit = yield* Config.string("GATEWAY_CONFIG").pipe(Config.option)
  const fromEnv = yield* Gateway.optionsFromEnv(embeddedConfig)
  const level = yield* Gateway.logLevelFromEnv
  if (Option.isSome(explicit)) {
    return yield* Layer.launch(Gateway.layer(fromEnv)).pipe(Effect.provide(Logger.minimumLogLevel(level)))
  }
  // The embedded default: a dev key on first start, and an admin key for this run unless one is set.
  const generatedAdminKey = fromEnv.adminKey === undefined ? KeyAdmin.newSecret() : undefined
  const options: Gateway.Options = {
    ...fromEnv,
    devKey: true,
    adminKey:
      fromEnv.adminKey ?? (generatedAdminKey === undefined ? undefined : Redacted.make(generatedAdminKey))
  }
  const app = Embedded.layer(options, Gateway.layer(options), generatedAdminKey)
  return yield* Layer.launch(app).pipe(Effect.provide(Logger.minimumLogLevel(level)))
})

/** A one-line reason for a failed start, naming the remedy where there is an obvious one. */
const reason = (error: unknown): string => {
  if (error instanceof ConfigLoader.ConfigError) return error.message
  if (error instanceof BackendSim.BackendSimError)
    return `a simulated backend could not start: ${error.message}`
  const cause = (error as { cause?: unknown }).cause
  if ((error as { _tag?: unknown })._tag === "ServeError" && cause instanceof Error) {
    return `cannot listen: ${cause.message} (set PORT or HOST to use another address)`
  }
  return error instanceof Error ? error.message : String(error)
}

/**
 * A graceful shutdown (in-flight answers, queued events, the embedded database) gets this long;
 * then the process exits anyway, as an orchestrator would kill it. Events not yet durable by then
 * are the only loss, and the writer's own flush is bounded well below it.
 */
const shutdownGraceMs = 15_000
for (const signal of ["SIGTERM", "SIGINT"] as const) {
  process.once(signal, () => {
    setTimeout(() => {
      process.stderr.write(`gateway: shutdown took over ${shutdownGraceMs / 1000} s; exiting\n`)
      process.exit(1)
    }, shutdownGraceMs).unref()
  })
}

NodeRuntime.runMain(
  program.pipe(
    Effect.tapError((error) => Effect.logError(`gateway failed to start: ${reason(error)}`)),
    Effect.tapDefect((defect) => Effect.logError("gateway crashed", Cause.die(defect))),
    Effect.provide(Logging.layer(LogLevel.Info))
  ),
  { disableErrorReporting: true, disablePrettyLogger: true }
)
