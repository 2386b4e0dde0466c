/**
 * CLI entry of the simulated backend:
 * `node --import tsx services/backend-sim/src/main.ts --port 9001 --model sim-large --ttft-ms 50`.
 * Flags are the options in kebab-case (`--help` lists them); `SIM_*` variables give defaults.
 * Prints one JSON line once listening and exits cleanly on SIGINT/SIGTERM.
 */
import * as NodeRuntime from "@effect/platform-node/NodeRuntime"
import * as Effect from "effect/Effect"
import * as Either from "effect/Either"
import * as BackendSim from "./BackendSim.js"
import * as SimConfig from "./SimConfig.js"

const args = process.argv.slice(2)
if (args.includes("--help") || args.includes("-h")) {
  process.stdout.write(`${SimConfig.usage()}\n`)
  process.exit(0)
}

const parsed = SimConfig.fromArgs(args, process.env)
if (Either.isLeft(parsed)) {
  process.stderr.write(`backend-sim: ${parsed.left}\n\n${SimConfig.usage()}\n`)
  process.exit(2)
}
const options = parsed.right

const program = Effect.gen(function* () {
  const sim = yield* BackendSim.make(options)
  yield* Effect.sync(() =>
    process.stdout.write(
      `${JSON.stringify({
        msg: "backend-sim listening",
        url: sim.url,
        port: sim.port,
        model: options.model,
        refusing: options.refuseConnections
      })}\n`
    )
  )
  return yield* Effect.never
}).pipe(Effect.scoped)

NodeRuntime.runMain(program, { disableErrorReporting: false })
