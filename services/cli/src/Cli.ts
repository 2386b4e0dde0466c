/**
 * The operator's command tree: on the database, `replay`, `events show|tail`, `projections
 * status` and `report savings`; through a running gateway's internal RPC API (the typed client),
 * `keys`, `tenants`, `usage`, `backends`, `dlq` and `status`; `classify explain|eval` reads only a config file.
 * Commands that touch the database get it from the layer given to `make`, built only when such a
 * command runs (so `--help` needs no database); the gateway's commands need no database, only
 * `--url` and `--admin-key`.
 */
import { Args, Command, HelpDoc, Options, ValidationError } from "@effect/cli"
import type { SqlClient } from "@effect/sql"
// The projections alone, not the whole core barrel (tokenizer, Redis client …): a faster start.
import * as Projections from "@gateway/core/projections/index"
import { Database, type EventStore } from "@gateway/event-store"
import { Console, Effect, Either, type Layer, Option, type Redacted } from "effect"
import * as AdminOptions from "./AdminOptions.js"
import * as BackendsCommand from "./BackendsCommand.js"
import * as ClassifyCommand from "./ClassifyCommand.js"
import * as DlqCommand from "./DlqCommand.js"
import * as KeysCommand from "./KeysCommand.js"
import * as LogCursor from "./LogCursor.js"
import * as LogTail from "./LogTail.js"
import * as ProjectionStatus from "./ProjectionStatus.js"
import * as Replay from "./Replay.js"
import * as RequestLifecycle from "./RequestLifecycle.js"
import * as RoutingOptions from "./RoutingOptions.js"
import * as Savings from "./Savings.js"
import * as StatusCommand from "./StatusCommand.js"
import * as TenantsCommand from "./TenantsCommand.js"
import * as UsageCommand from "./UsageCommand.js"

const printLines = (lines: ReadonlyArray<string>) => Console.log(lines.join("\n"))

const from = (description: string) =>
  Options.text("from").pipe(
    Options.withDescription(description),
    Options.mapEffect((text) =>
      Either.match(LogCursor.parse(text), {
        onLeft: (message) => Effect.fail(ValidationError.invalidValue(HelpDoc.p(message))),
        onRight: Effect.succeed
      })
    ),
    Options.optional
  )

const replay = Command.make(
  "replay",
  {
    projection: Args.choice(
      Projections.all.map((p) => [p.name, p] as [string, (typeof Projections.all)[number]]),
      { name: "projection" }
    ).pipe(Args.withDescription("The projection to rebuild from the event log.")),
    from: from(
      "Start at this global position, or at the first event recorded at/after this ISO 8601 time, " +
        "instead of the beginning. The rebuilt tables then hold only the events from there on."
    ),
    verify: Options.boolean("verify").pipe(
      Options.withDescription(
        "Compare the rebuilt tables with the live ones, report, and roll back: nothing is swapped. " +
          "Exit code 1 when they differ."
      )
    ),
    batchSize: Options.integer("batch-size").pipe(
      Options.withDefault(1000),
      Options.mapEffect((n) =>
        n > 0 ? Effect.succeed(n) : Effect.fail(ValidationError.invalidValue(HelpDoc.p("must be positive")))
      ),
      Options.withDescription("Events applied per transaction.")
    )
  },
  (args) =>
    Effect.gen(function* () {
      const outcome = yield* Replay.replay(args)
      yield* printLines(Replay.report(outcome))
      if (args.verify && !Replay.identical(outcome)) {
        return yield* Effect.fail(new Replay.DifferencesFound({ projection: outcome.projection }))
      }
    })
).pipe(
  Command.withDescription(
    "Rebuild a projection from the log into fresh tables, compare them with the live ones row by row, " +
      "and swap them in (or, with --verify, only report)."
  )
)

const show = Command.make(
  "show",
  {
    id: Args.text({ name: "request-id" }).pipe(
      Args.withDescription("The gateway's request id, or the client's x-request-id.")
    )
  },
  ({ id }) => Effect.flatMap(RequestLifecycle.show(id), printLines)
).pipe(Command.withDescription("Show one request's lifecycle: every event of its stream, in order."))

const tail = Command.make(
  "tail",
  { from: from("Start at this global position or ISO 8601 time instead of now.") },
  ({ from }) => LogTail.follow(from)
).pipe(Command.withDescription("Follow the event log live, one line per event, until Ctrl-C."))

const status = Command.make("status", {}, () =>
  Effect.flatMap(ProjectionStatus.read(Projections.all.map((p) => p.name)), (statuses) =>
    printLines(ProjectionStatus.render(statuses))
  )
).pipe(Command.withDescription("Each projection's checkpoint, events applied, lag and last error."))

/** An ISO 8601 date (midnight UTC) or time, as a `Date`. */
const time = (name: string, description: string) =>
  Options.text(name).pipe(
    Options.mapEffect((text) => {
      const time = new Date(text)
      return !/^\d{4}-\d{2}-\d{2}/.test(text) || Number.isNaN(time.getTime())
        ? Effect.fail(
            ValidationError.invalidValue(
              HelpDoc.p(`--${name} takes an ISO 8601 date or time, got '${text}'.`)
            )
          )
        : Effect.succeed(time)
    }),
    Options.optional,
    Options.withDescription(description)
  )

const savings = Command.make(
  "savings",
  {
    from: time(
      "from",
      "Requests completed at or after this ISO 8601 date or time; from the start by default."
    ),
    to: time("to", "Requests completed before this ISO 8601 date or time; up to now by default."),
    databaseUrl: Options.redacted("database-url").pipe(
      Options.optional,
      Options.withDescription("The PostgreSQL database of the event log; DATABASE_URL by default.")
    ),
    config: RoutingOptions.config,
    json: RoutingOptions.json
  },
  (options) =>
    Effect.gen(function* () {
      const { config } = yield* RoutingOptions.load(options.config)
      const report = yield* Savings.report({
        from: options.from,
        to: options.to,
        complexModels: new Map(
          config.routing.policies.map((p) => [p.name as string, p.tiers.complex as string])
        )
      })
      yield* options.json ? AdminOptions.printJson(report) : printLines(Savings.render(report))
    })
).pipe(
  Command.withDescription(
    "What routing saved: the cost of the requests a policy routed against the same tokens on its " +
      "complex model (priced with the price table each request was priced with), by tenant and tier."
  )
)

/** The database at `--database-url`, for a command that reads and ends. */
const at = (url: Redacted.Redacted) => Database.layerPostgres(url, { maxConnections: 2 })

/** What the database commands need; the composition root decides where it comes from. */
export type DatabaseServices = SqlClient.SqlClient | EventStore.EventStore

export interface Databases<E1, E2> {
  /** For commands that read and end. */
  readonly store: Layer.Layer<DatabaseServices, E1>
  /** For `events tail`: a store that also hears other processes' appends (LISTEN) as they happen. */
  readonly following: Layer.Layer<DatabaseServices, E2>
}

export const make = <E1, E2>(databases: Databases<E1, E2>) => {
  const withStore = <Name extends string, R, E, A>(command: Command.Command<Name, R, E, A>) =>
    Command.provide(command, databases.store)
  return Command.make("gateway").pipe(
    Command.withDescription(
      "Operator tools for the LLM gateway: its event log, projections, API keys, usage and backends."
    ),
    Command.withSubcommands([
      withStore(replay),
      Command.make("events").pipe(
        Command.withDescription("Read the event log."),
        Command.withSubcommands([withStore(show), Command.provide(tail, databases.following)])
      ),
      Command.make("projections").pipe(
        Command.withDescription("Inspect the projections."),
        Command.withSubcommands([withStore(status)])
      ),
      Command.make("report").pipe(
        Command.withDescription("Reports from the event log."),
        Command.withSubcommands([
          Command.provide(
            savings,
            ({
              databaseUrl
            }): Layer.Layer<SqlClient.SqlClient, E1 | Layer.Layer.Error<ReturnType<typeof at>>> =>
              Option.match(databaseUrl, { onNone: () => databases.store, onSome: at })
          )
        ])
      ),
      KeysCommand.command,
      TenantsCommand.command,
      UsageCommand.command,
      BackendsCommand.command,
      DlqCommand.command,
      StatusCommand.command,
      ClassifyCommand.command
    ])
  )
}

/** Runs the CLI on `argv` (`process.argv`: node, script, arguments). */
export const run = <E1, E2>(databases: Databases<E1, E2>) =>
  Command.run(make(databases), { name: "gateway", version: "0.1.0" })

/**
 * What to print on stderr for a failure, if anything: argument errors and differences found
 * by `--verify` and retries that did not complete were already reported.
 */
export const describeFailure = (error: unknown): Option.Option<string> => {
  if (ValidationError.isValidationError(error)) return Option.none()
  if (error instanceof Replay.DifferencesFound) return Option.none()
  if (error instanceof DlqCommand.RetriesIncomplete) return Option.none()
  return Option.some(`error: ${error instanceof Error ? error.message : String(error)}`)
}
