/**
 * Starts the gateway. With `GATEWAY_CONFIG` it serves the backends named there; without it, the
 * embedded default: the bundled config plus two simulated model servers in this process.
 * SIGTERM or SIGINT shuts it down gracefully (see `drainOnShutdown` in Gateway.ts), then it exits 0.
 */
import { fileURLToPath } from "node:url"
import { NodeRuntime } from "@effect/platform-node"
import { BackendSim } from "@gateway/backend-sim"
import { ConfigLoader, KeyAdmin, Logging } from "@gateway/core"
import { Cause, Config, Effect, Layer, Logger, LogLevel, Option, Redacted } from "effect"
import * as Embedded from "./Embedded.js"
import * as Gateway from "./Gateway.js"

const embeddedConfig = fileURLToPath(new URL("../config/embedded.yaml", import.meta.url))

/**
 * After SIGTERM or SIGINT the shutdown gets `budgetMs` (the grace period for requests, then the
 * flush); past it the process exits anyway, as an orchestrator would kill it. A second signal
 * finds no handler left and ends the process at once.
 */
const exitAfterSignal = (budgetMs: number) =>
  Effect.sync(() => {
    const onSignal = () => {
      process.off("SIGTERM", onSignal)
      process.off("SIGINT", onSignal)
      setTimeout(() => {
        process.stderr.write(`gateway: shutdown took over ${budgetMs / 1000} s; exiting\n`)
        process.exit(1)
      }, budgetMs).unref()
    }
    process.on("SIGTERM", onSignal)
    process.on("SIGINT", onSignal)
  })

const program = Effect.gen(function* () {
  const explicit = yield* Config.string("GATEWAY_CONFIG").pipe(Config.option)
  const fromEnv = yield* Gateway.optionsFromEnv(embeddedConfig)
  const level = yield* Gateway.logLevelFromEnv
  const embedded = Option.isNone(explicit)
  // The embedded default: a dev key on first start, and an admin key for this run unless one is set.
  const generatedAdminKey = embedded && fromEnv.adminKey === undefined ? KeyAdmin.newSecret() : undefined
  const options: Gateway.Options = embedded
    ? {
        ...fromEnv,
        devKey: true,
        adminKey:
          fromEnv.adminKey ?? (generatedAdminKey === undefined ? undefined : Redacted.make(generatedAdminKey))
      }
    : fromEnv
  const config = yield* Gateway.loadConfig(options)
  yield* exitAfterSignal(Gateway.shutdownBudgetMs(config))
  const app = embedded
    ? Embedded.layer(config, Gateway.layer(options), generatedAdminKey)
    : Gateway.layer(options)
  return yield* Layer.launch(app).pipe(
    // Interrupted by a signal: every layer has closed (the event writer has flushed) by now.
    Effect.onInterrupt(() => Effect.logInfo("shut down")),
    Effect.provide(Logger.minimumLogLevel(level))
  )
})

/** A one-line reason for a failed start, naming the remedy where there is an obvious one. */
const reason = (error: unknown): string => {
  if (error instanceof ConfigLoader.ConfigError) return error.message
  if (error instanceof Gateway.MetricsPortError) return error.message
  if (error instanceof BackendSim.BackendSimError)
    return `a simulated backend could not start: ${error.message}`
  const cause = (error as { cause?: unknown }).cause
  if ((error as { _tag?: unknown })._tag === "ServeError" && cause instanceof Error) {
    return `cannot listen: ${cause.message} (set PORT or HOST to use another address)`
  }
  return error instanceof Error ? error.message : String(error)
}

NodeRuntime.runMain(
  program.pipe(
    Effect.tapError((error) => Effect.logError(`gateway failed to start: ${reason(error)}`)),
    Effect.tapDefect((defect) => Effect.logError("gateway crashed", Cause.die(defect))),
    Effect.provide(Logging.layer(LogLevel.Info))
  ),
  { disableErrorReporting: true, disablePrettyLogger: true }
)
