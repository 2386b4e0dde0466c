/**
 * `usage`: requests, tokens and cost by tenant, key, model and/or hour, from the gateway's
 * `usage_hourly` projection (completed requests, and cancelled ones for what was generated).
 */
import { Command, HelpDoc, Options, ValidationError } from "@effect/cli"
import { Effect, Option } from "effect"
import * as AdminOptions from "./AdminOptions.js"
import * as AdminViews from "./AdminViews.js"
import { type UsageGroup, type UsageReport, usageGroups } from "./AdminViews.js"
import * as Gateway from "./Gateway.js"
import * as TextTable from "./TextTable.js"

const { connection, json, printJson, printLines } = AdminOptions

const text = (name: string, description: string) =>
  Options.text(name).pipe(Options.optional, Options.withDescription(description))

const groupBy = Options.text("by").pipe(
  Options.mapEffect((value) => {
    const groups = value
      .split(",")
      .map((g) => g.trim())
      .filter((g) => g.length > 0)
    const unknown = groups.find((g) => !(usageGroups as ReadonlyArray<string>).includes(g))
    return unknown === undefined && groups.length > 0
      ? Effect.succeed(Array.from(new Set(groups)) as ReadonlyArray<UsageGroup>)
      : Effect.fail(
          ValidationError.invalidValue(
            HelpDoc.p(`--by takes ${usageGroups.join(", ")}, separated by commas; got '${value}'.`)
          )
        )
  }),
  Options.optional,
  Options.withDescription(
    `Group by ${usageGroups.join(", ")} (separated by commas); tenant,key,model by default.`
  )
)

const hour = (iso: string) => iso.replace(/^(\d{4}-\d{2}-\d{2})T(\d{2}:\d{2}).*$/, "$1 $2")

const numbers = ["requests", "prompt_tokens", "completion_tokens", "total_tokens", "cost_usd"] as const

/** The report as a table, one row per group and a total line; numbers right-aligned. */
export const render = (report: UsageReport): ReadonlyArray<string> => {
  const range = `Usage from ${AdminOptions.time(report.from)} to ${AdminOptions.time(report.to)}`
  if (report.data.length === 0) return [`${range}: nothing recorded.`]
  const groups = report.group_by
  const cells = (totals: UsageReport["total"]) =>
    numbers.map((n) => (n === "cost_usd" ? totals.cost_usd.toFixed(6) : String(totals[n])))
  const rows = report.data.map((row) => [
    ...groups.map((g) => {
      const value = row[g]
      if (value === undefined || value === null || value === "") return "-"
      return g === "hour" ? hour(value) : value
    }),
    ...cells(row)
  ])
  const total = [
    ...(groups.length === 0 ? [] : ["total", ...groups.slice(1).map(() => "")]),
    ...cells(report.total)
  ]
  const headers = [...groups, ...numbers]
  const all = [headers, ...rows, total]
  // Right-align the number columns: pad them to their widest cell before the table pads the rest.
  const aligned = all.map((row) =>
    row.map((cell, i) => {
      if (i < groups.length) return cell
      const width = Math.max(...all.map((r) => (r[i] ?? "").length))
      return cell.padStart(width)
    })
  )
  return [range, "", ...TextTable.render(aligned[0]!, aligned.slice(1))]
}

export const command = AdminOptions.withClient(
  Command.make(
    "usage",
    {
      connection,
      from: AdminOptions.timeOption(
        "from",
        "From this ISO 8601 date or time (its hour); 30 days ago by default."
      ),
      to: AdminOptions.timeOption(
        "to",
        "Up to this ISO 8601 date or time (exclusive); the next hour by default."
      ),
      by: groupBy,
      tenant: text("tenant", "Only this tenant."),
      key: text("key", "Only this key (its id)."),
      model: text("model", "Only this model."),
      json
    },
    (options) =>
      Effect.gen(function* () {
        const optional = <K extends string, V>(key: K, value: Option.Option<V>) =>
          Option.match(value, { onNone: () => ({}), onSome: (v) => ({ [key]: v }) as { [P in K]: V } })
        const answer = yield* Gateway.call((client) =>
          client.Usage.query({
            ...optional("from", options.from),
            ...optional("to", options.to),
            ...optional("tenant", options.tenant),
            ...optional("key", options.key),
            ...optional("model", options.model),
            ...optional("groupBy", options.by)
          })
        )
        const report = AdminViews.usage(answer)
        yield* options.json ? printJson(report) : printLines(render(report))
      })
  ).pipe(
    Command.withDescription(
      "Requests, tokens and cost (USD) by tenant, key, model and/or hour, with a total."
    )
  )
)
