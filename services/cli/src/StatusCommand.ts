/**
 * `status`: a running gateway at a glance, through its RPC API — each projection's position,
 * events applied, lag behind the log, last error and whether this replica leads it
 * (`Projections.status`), and its backend replicas' health (`Backends.status`). `projections
 * status` reads the checkpoints on the database instead (rebuilds included, gateway stopped or not).
 */
import { Command } from "@effect/cli"
import type { RpcSchemas } from "@gateway/client"
import { Effect } from "effect"
import * as AdminOptions from "./AdminOptions.js"
import * as Gateway from "./Gateway.js"
import * as TextTable from "./TextTable.js"

const { connection, json, printJson, printLines } = AdminOptions

export interface Status {
  readonly projections: ReadonlyArray<RpcSchemas.ProjectionStatus>
  readonly backends: ReadonlyArray<RpcSchemas.BackendStatus>
}

/** What `--json` prints (snake_case, as the admin API would). */
export const view = (status: Status) => ({
  object: "status" as const,
  projections: status.projections.map((p) => ({
    name: p.name,
    position: p.position,
    events_applied: p.eventsApplied,
    lag: p.lag,
    last_error: p.lastError,
    leader: p.leader
  })),
  backends: {
    total: status.backends.length,
    healthy: status.backends.filter((b) => b.health === "healthy").length,
    ejected: status.backends.filter((b) => b.health === "ejected").length,
    circuit_open: status.backends.filter((b) => b.circuit.state === "open").length
  }
})

export const render = (status: Status): ReadonlyArray<string> => {
  const { backends } = view(status)
  return [
    ...TextTable.render(
      ["PROJECTION", "POSITION", "APPLIED", "LAG", "LEADER", "LAST ERROR"],
      status.projections.map((p) => [
        p.name,
        p.position,
        String(p.eventsApplied),
        p.lag === null ? "?" : String(p.lag),
        p.leader ? "this replica" : "another",
        p.lastError ?? "-"
      ])
    ),
    "",
    `backends: ${backends.total} replica${backends.total === 1 ? "" : "s"}, ${backends.healthy} healthy, ` +
      `${backends.ejected} ejected, ${backends.circuit_open} with the circuit open (details: backends)`
  ]
}

export const command = AdminOptions.withClient(
  Command.make("status", { connection, json }, (options) =>
    Effect.gen(function* () {
      const [projections, backends] = yield* Effect.all(
        [
          Gateway.call((client) => client.Projections.status()),
          Gateway.call((client) => client.Backends.status())
        ],
        { concurrency: 2 }
      )
      const status = { projections, backends }
      yield* options.json ? printJson(view(status)) : printLines(render(status))
    })
  ).pipe(
    Command.withDescription(
      "The gateway at --url: each projection's position, events applied, lag, leader and last error, " +
        "and its backends' health. (`projections status` reads the database directly.)"
    )
  )
)
