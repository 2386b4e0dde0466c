/**
 * `backends`: every backend replica as the gateway sees it — health, circuit breaker, load,
 * latency estimates, the backend's own queue and its last error — from the RPC `Backends.status`.
 * Health and breakers are per gateway replica: the one at `--url` answers for itself.
 */
import { Command } from "@effect/cli"
import { Effect } from "effect"
import * as AdminOptions from "./AdminOptions.js"
import type { Backend, BackendsReport } from "./AdminViews.js"
import * as AdminViews from "./AdminViews.js"
import * as Gateway from "./Gateway.js"
import * as TextTable from "./TextTable.js"

const { connection, json, printJson, printLines } = AdminOptions

/** How much of a replica's last error the table shows. */
const errorWidth = 60

const headers = [
  "id",
  "model",
  "health",
  "circuit",
  "in_flight",
  "ttft ms",
  "latency ms",
  "queue",
  "requests",
  "failures",
  "last error"
] as const

/** The columns right-aligned: the numbers. */
const numeric = new Set(["in_flight", "ttft ms", "latency ms", "queue", "requests", "failures"])

/** The breaker's state; while open, when it lets a probe through (rounded up to the second). */
const circuitText = (circuit: Backend["circuit"]) =>
  circuit.state === "open" ? `open, retry in ${Math.ceil(circuit.retry_after_ms / 1000)}s` : circuit.state

/** `waiting/running` from the backend's metrics; `-` when they are not scraped. */
const queueText = (backend: Backend) =>
  backend.queue_waiting === null && backend.queue_running === null
    ? "-"
    : `${backend.queue_waiting ?? "-"}/${backend.queue_running ?? "-"}`

/** On one line, cut to `errorWidth` characters with an ellipsis. */
const errorText = (error: string | null) => {
  if (error === null) return "-"
  const line = error.replace(/\s+/g, " ").trim()
  return line.length <= errorWidth ? line : `${line.slice(0, errorWidth - 1)}…`
}

/** The replicas as a table, one row each in the gateway's order; numbers right-aligned. */
export const render = (report: BackendsReport): ReadonlyArray<string> => {
  if (report.data.length === 0) return ["No backends configured."]
  const rows = report.data.map((b) => [
    b.id,
    b.model,
    b.health,
    circuitText(b.circuit),
    String(b.in_flight),
    String(Math.round(b.ttft_ewma_ms)),
    String(Math.round(b.latency_ewma_ms)),
    queueText(b),
    String(b.requests),
    String(b.failures),
    errorText(b.last_error)
  ])
  const all = [headers, ...rows]
  const aligned = all.map((row) =>
    row.map((cell, i) => {
      if (!numeric.has(headers[i]!)) return cell
      const width = Math.max(...all.map((r) => (r[i] ?? "").length))
      return cell.padStart(width)
    })
  )
  return TextTable.render(aligned[0]!, aligned.slice(1))
}

export const command = AdminOptions.withClient(
  Command.make("backends", { connection, json }, (options) =>
    Effect.gen(function* () {
      const report = AdminViews.backends(yield* Gateway.call((client) => client.Backends.status()))
      yield* options.json ? printJson(report) : printLines(render(report))
    })
  ).pipe(
    Command.withDescription(
      "Each backend replica: health, circuit breaker, in-flight requests, TTFT and latency estimates, " +
        "queue, requests, failures and last error, as the gateway at --url sees them."
    )
  )
)
