/**
 * Composition root of the operator CLI: the database from `DATABASE_URL` (or the embedded
 * PGlite under `DATA_DIR`, as the gateway uses), progress on stderr, the exit code.
 *
 *   pnpm cli replay usage_hourly [--verify] [--from 12000|2026-11-21T18:00Z] [--batch-size 1000]
 *   pnpm cli events show <request-id>      pnpm cli events tail [--from …]
 *   pnpm cli projections status         pnpm cli report savings [--from …] [--to …]
 *   pnpm cli classify explain "<prompt>"  pnpm cli classify eval <file.jsonl>
 *   through a running gateway (GATEWAY_URL, ADMIN_KEY): keys, tenants, usage, backends, status,
 *   dlq list|show|retry|discard
 *
 * Against the embedded PGlite, stop the gateway first: one data directory, one process.
 */
import { NodeContext, NodeRuntime } from "@effect/platform-node"
import { Database, EventStore } from "@gateway/event-store"
import { Cause, Console, Effect, Layer, Option } from "effect"
import * as Cli from "./Cli.js"
import * as Progress from "./Progress.js"

const databases = {
  // Without LISTEN: a command that ends quickly could otherwise leave the listening connection
  // (still being opened when the command finished) holding the process open.
  store: Layer.provideMerge(EventStore.layer(), Database.layerConfig),
  following: Database.layerStoreConfig
}

Cli.run(databases)(process.argv).pipe(
  Effect.tapErrorCause((cause) => {
    if (Cause.isInterruptedOnly(cause)) return Effect.void
    return Option.match(Cause.failureOption(cause), {
      // A defect: on stderr with the rest of the errors, where an operator's script looks.
      onNone: () => Console.error(Cause.pretty(cause)),
      onSome: (error) =>
        Option.match(Cli.describeFailure(error), { onNone: () => Effect.void, onSome: Console.error })
    })
  }),
  Effect.provide(process.stderr.isTTY ? Progress.layerTty(process.stderr) : Progress.layerLines()),
  Effect.provide(NodeContext.layer),
  NodeRuntime.runMain({ disableErrorReporting: true })
)
