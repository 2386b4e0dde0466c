/**
 * Starts the gateway. With `GATEWAY_CONFIG` it serves the backends named there; without it, the
 * embedded default: the bundled config plus two simulated model servers in this process.
 */
import { fileURLToPath } from "node:url"
import { NodeRuntime } from "@effect/platform-node"
import { Logging } from "@gateway/core"
import { Config, Effect, Layer, Logger, LogLevel, Option } from "effect"
import * as Embedded from "./Embedded.js"
import * as Gateway from "./Gateway.js"

const embeddedConfig = fileURLToPath(new URL("../config/embedded.yaml", import.meta.url))

const program = Effect.gen(function* () {
  const explicit = yield* Config.string("GATEWAY_CONFIG").pipe(Config.option)
  const options = yield* Gateway.optionsFromEnv(embeddedConfig)
  const level = yield* Gateway.logLevelFromEnv
  const gateway = Gateway.layer(options)
  const app = Option.isSome(explicit) ? gateway : Embedded.layer(options, gateway)
  return yield* Layer.launch(app).pipe(Effect.provide(Logger.minimumLogLevel(level)))
})

NodeRuntime.runMain(
  program.pipe(Effect.tapErrorCause(Effect.logError), Effect.provide(Logging.layer(LogLevel.Info))),
  { disableErrorReporting: true, disablePrettyLogger: true }
)
