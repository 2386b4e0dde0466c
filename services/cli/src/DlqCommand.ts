/**
 * `dlq list|show|retry|discard`: the dead-letter queue of a running gateway, through its RPC API
 * (`DeadLetters.*`). A retry runs a letter's recorded payload again on its own request stream and
 * waits for how it ended; `retry --all` takes the letters matching the filters (at most
 * `maxRetryBatch` a time) and needs `--yes`. `retry` exits 1 when a run did not complete.
 */
import { Args, Command, HelpDoc, Options, ValidationError } from "@effect/cli"
import type { DeadLetters, RpcSchemas } from "@gateway/client"
import { AdminApi } from "@gateway/core"
import { Duration, Effect, Option, Schema } from "effect"
import * as AdminOptions from "./AdminOptions.js"
import * as Gateway from "./Gateway.js"
import * as RequestLifecycle from "./RequestLifecycle.js"
import * as TextTable from "./TextTable.js"

const { connection, json, printJson, printLines } = AdminOptions

/** Most letters one `retry --all` takes (the gateway's bound). */
export const maxRetryBatch = 100

/** How long a retry may run: the whole completion, every attempt of it. */
const retryTimeout = Duration.minutes(15)

/** Some retries did not complete: each outcome has been printed. */
export class RetriesIncomplete extends Schema.TaggedError<RetriesIncomplete>()("RetriesIncomplete", {
  incomplete: Schema.Number
}) {
  override get message() {
    return `${this.incomplete} retr${this.incomplete === 1 ? "y" : "ies"} did not complete.`
  }
}

/** Options that do not go together; said on stderr like any error. */
export class InvalidUse extends Schema.TaggedError<InvalidUse>()("InvalidUse", {
  message: Schema.String
}) {}

// ---------------------------------------------------------------------------------------------
// What --json prints: the admin API's shapes
// ---------------------------------------------------------------------------------------------

/** The admin API's own views, so `--json` prints what `GET /admin/dead-letters` would. */
const letterView = AdminApi.deadLetterView
const outcomeView = AdminApi.retryOutcomeView

// ---------------------------------------------------------------------------------------------
// Text
// ---------------------------------------------------------------------------------------------

const orDash = (value: string | null) => (value === null || value === "" ? "-" : value)

/** The last retry, as `outcome (by, time)`; `-` before the first. */
const lastRetryText = (letter: DeadLetters.DeadLetter) =>
  letter.lastRetryOutcome === null
    ? "-"
    : `${letter.lastRetryOutcome}${letter.lastRetryBy === null ? "" : ` by ${letter.lastRetryBy}`}`

/** The letters as a table, newest first; a last line saying how to get the next page. */
export const renderList = (page: DeadLetters.DeadLetterPage): ReadonlyArray<string> => {
  if (page.data.length === 0) return ["No dead letters."]
  return [
    ...TextTable.render(
      [
        "request",
        "tenant",
        "model",
        "status",
        "reason",
        "attempts",
        "dead at",
        "retries",
        "last retry",
        "retryable"
      ],
      page.data.map((l) => [
        l.requestId,
        orDash(l.tenantId),
        orDash(l.model),
        String(l.status),
        orDash(l.reason),
        String(l.attempts),
        AdminOptions.time(l.deadAt.toISOString()),
        String(l.retries),
        lastRetryText(l),
        l.retryable ? "yes" : "no"
      ])
    ),
    ...(page.nextCursor === null ? [] : ["", `More: add --cursor ${page.nextCursor}`])
  ]
}

/** A letter's fields, then its request's lifecycle as `events show` prints one. */
export const renderDetail = (detail: DeadLetters.DeadLetterDetail): ReadonlyArray<string> => {
  const l = detail.letter
  return [
    ...AdminOptions.fields([
      ["request", l.requestId],
      ["tenant", orDash(l.tenantId)],
      ["key", orDash(l.keyId)],
      ["model", orDash(l.model)],
      ["status", String(l.status)],
      ["reason", orDash(l.reason)],
      ["attempts", String(l.attempts)],
      ["last error", orDash(l.lastError)],
      ["dead at", AdminOptions.time(l.deadAt.toISOString())],
      ["retries", String(l.retries)],
      [
        "last retry",
        l.lastRetryAt === null
          ? "-"
          : `${lastRetryText(l)} at ${AdminOptions.time(l.lastRetryAt.toISOString())}`
      ],
      [
        "retryable",
        l.retryable ? "yes" : "no (its payload was not stored in full: events.store_payloads is not 'full')"
      ]
    ]),
    "",
    `lifecycle (${detail.events.length} event${detail.events.length === 1 ? "" : "s"})`,
    ...RequestLifecycle.eventLines(
      detail.events.map((e) => ({ version: e.version, time: e.occurredAt, type: e.type, data: e.data }))
    )
  ]
}

/** One line per retry: `<id>  completed  retry 1, status 200` or why it did not complete. */
export const renderOutcomes = (batch: DeadLetters.RetryBatch): ReadonlyArray<string> => {
  if (batch.outcomes.length === 0) return ["No dead letters matched: nothing retried."]
  const width = Math.max(...batch.outcomes.map((o) => o.requestId.length))
  const kindWidth = Math.max(...batch.outcomes.map((o) => o.outcome.length))
  const completed = batch.outcomes.filter((o) => o.outcome === "completed").length
  return [
    ...batch.outcomes.map((o) => {
      const details = [
        ...(o.retry === null ? [] : [`retry ${o.retry}`]),
        ...(o.status === null ? [] : [`status ${o.status}`])
      ].join(", ")
      return `${o.requestId.padEnd(width)}  ${o.outcome.padEnd(kindWidth)}  ${details}${o.error === null ? "" : `${details === "" ? "" : ": "}${o.error}`}`.trimEnd()
    }),
    ...(batch.outcomes.length > 1 || batch.more
      ? [
          "",
          `${completed} of ${batch.outcomes.length} completed.${batch.more ? " More letters match: run it again to go on." : ""}`
        ]
      : [])
  ]
}

// ---------------------------------------------------------------------------------------------
// Commands
// ---------------------------------------------------------------------------------------------

const text = (name: string, description: string) =>
  Options.text(name).pipe(Options.optional, Options.withDescription(description))

/** `--tenant --model --reason --since --until`: which letters. */
const filters = Options.all({
  tenant: text("tenant", "Only this tenant's letters."),
  model: text("model", "Only requests for this model (as the client named it)."),
  reason: text("reason", "Only letters with this reason (Http, Timeout, Connect …, as listed)."),
  since: AdminOptions.timeOption("since", "Dead at or after this ISO 8601 date or time."),
  until: AdminOptions.timeOption("until", "Dead before this ISO 8601 date or time.")
})

const limit = (max: number, description: string) =>
  Options.integer("limit").pipe(
    Options.mapEffect((n) =>
      n >= 1 && n <= max
        ? Effect.succeed(n)
        : Effect.fail(ValidationError.invalidValue(HelpDoc.p(`--limit takes 1 to ${max}, got ${n}.`)))
    ),
    Options.optional,
    Options.withDescription(description)
  )

interface Filters {
  readonly tenant: Option.Option<string>
  readonly model: Option.Option<string>
  readonly reason: Option.Option<string>
  readonly since: Option.Option<Date>
  readonly until: Option.Option<Date>
}

const query = (
  f: Filters,
  more: { readonly limit: Option.Option<number>; readonly cursor?: Option.Option<string> }
): RpcSchemas.DeadLetterQuery => {
  const some = <K extends string, V>(key: K, value: Option.Option<V>) =>
    Option.match(value, { onNone: () => ({}), onSome: (v) => ({ [key]: v }) as { [P in K]: V } })
  return {
    ...some("tenantId", f.tenant),
    ...some("model", f.model),
    ...some("reason", f.reason),
    ...some("since", f.since),
    ...some("until", f.until),
    ...some("limit", more.limit),
    ...(more.cursor === undefined ? {} : some("cursor", more.cursor))
  }
}

const requestId = Args.text({ name: "request-id" }).pipe(
  Args.withDescription(
    "The dead-lettered request's gateway id (x-gateway-request-id), as `dlq list` shows it."
  )
)

const list = Command.make(
  "list",
  {
    connection,
    filters,
    limit: limit(500, "Letters per page, 1 to 500; 50 by default."),
    cursor: text("cursor", "The page after the one that printed this cursor."),
    json
  },
  (options) =>
    Effect.gen(function* () {
      const page = yield* Gateway.call((client) => client.DeadLetters.list(query(options.filters, options)))
      yield* options.json
        ? printJson({ object: "list", data: page.data.map(letterView), next_cursor: page.nextCursor })
        : printLines(renderList(page))
    })
).pipe(
  Command.withDescription(
    "List the requests that failed after every attempt and fallback and are not recovered or discarded, newest first."
  )
)

const show = Command.make("show", { connection, id: requestId, json }, (options) =>
  Effect.gen(function* () {
    const detail = yield* Gateway.call((client) => client.DeadLetters.get({ requestId: options.id }))
    yield* options.json
      ? printJson({
          ...letterView(detail.letter),
          events: detail.events.map((e) => ({
            version: e.version,
            type: e.type,
            occurred_at: e.occurredAt,
            position: e.position,
            data: e.data
          }))
        })
      : printLines(renderDetail(detail))
  })
).pipe(Command.withDescription("Show a dead letter and every event of its request, retries included."))

const retry = Command.make(
  "retry",
  {
    connection,
    id: Args.optional(requestId),
    all: Options.boolean("all").pipe(
      Options.withDescription(
        `Retry the letters matching the filters, at most ${maxRetryBatch} (needs --yes).`
      )
    ),
    filters,
    limit: limit(maxRetryBatch, `With --all: at most this many letters, 1 to ${maxRetryBatch}.`),
    yes: Options.boolean("yes").pipe(Options.withDescription("With --all: run them, without asking.")),
    json
  },
  (options) =>
    Effect.gen(function* () {
      const anyFilter =
        Object.values(options.filters).some((value: Option.Option<unknown>) => Option.isSome(value)) ||
        Option.isSome(options.limit)
      if (Option.isSome(options.id) === options.all || (Option.isSome(options.id) && anyFilter)) {
        return yield* new InvalidUse({
          message:
            "give one request id, or --all with filters (--tenant, --model, --reason, --since, --until, --limit)."
        })
      }
      if (options.all && !options.yes) {
        return yield* new InvalidUse({
          message:
            "--all runs every matching letter again (each billed when it completes): add --yes to go ahead; `dlq list` with the same filters shows which."
        })
      }
      const batch = yield* Option.match(options.id, {
        onSome: (id) => Gateway.call((client) => client.DeadLetters.retry({ requestId: id }), retryTimeout),
        onNone: () =>
          Gateway.call(
            (client) =>
              client.DeadLetters.retry({
                filter: query(options.filters, {
                  limit: Option.orElse(options.limit, () => Option.some(maxRetryBatch))
                })
              }),
            retryTimeout
          )
      })
      yield* options.json
        ? printJson({ object: "list", data: batch.outcomes.map(outcomeView), more: batch.more })
        : printLines(renderOutcomes(batch))
      const incomplete = batch.outcomes.filter((o) => o.outcome !== "completed").length
      if (incomplete > 0) return yield* new RetriesIncomplete({ incomplete })
    })
).pipe(
  Command.withDescription(
    "Run a dead letter again from its recorded payload, on its own request stream, and print how it ended; " +
      "--all --yes retries the letters matching the filters. Exit code 1 when a retry did not complete."
  )
)

const discard = Command.make(
  "discard",
  {
    connection,
    id: requestId,
    reason: Options.text("reason").pipe(
      Options.withDescription("Why it is dropped, for the record (required).")
    ),
    json
  },
  (options) =>
    Effect.gen(function* () {
      const letter = yield* Gateway.call((client) =>
        client.DeadLetters.discard({ requestId: options.id, reason: options.reason })
      )
      if (options.json) {
        return yield* printJson({ ...letterView(letter), discarded: true, discard_reason: options.reason })
      }
      yield* printLines([
        `Discarded ${letter.requestId} (tenant ${orDash(letter.tenantId)}, model ${orDash(letter.model)}, ${letter.reason} after ${letter.attempts} attempt${letter.attempts === 1 ? "" : "s"}): ${options.reason.trim()}`
      ])
    })
).pipe(Command.withDescription("Drop a dead letter for good, recording why (and that you did)."))

export const command = Command.make("dlq").pipe(
  Command.withDescription(
    "The dead-letter queue: find, inspect, retry and discard failed requests (through the gateway at --url)."
  ),
  Command.withSubcommands([
    AdminOptions.withClient(list),
    AdminOptions.withClient(show),
    AdminOptions.withClient(retry),
    AdminOptions.withClient(discard)
  ])
)
