/**
 * `tenants list|create|limits`: tenants and their limits (which every key of the tenant shares)
 * through the gateway's admin API.
 */
import { Args, Command, HelpDoc, Options, ValidationError } from "@effect/cli"
import { Effect } from "effect"
import { AdminClient } from "./AdminClient.js"
import * as AdminOptions from "./AdminOptions.js"
import * as TextTable from "./TextTable.js"

const { connection, json, printJson, printLines } = AdminOptions

const tenantId = Args.text({ name: "tenant-id" }).pipe(
  Args.withDescription("1 to 64 letters, digits, '.', '_' or '-'.")
)

const list = Command.make("list", { connection, json }, (options) =>
  Effect.gen(function* () {
    const tenants = yield* (yield* AdminClient).listTenants
    if (options.json) return yield* printJson({ object: "list", data: tenants })
    if (tenants.length === 0) return yield* printLines(["No tenants."])
    yield* printLines(
      TextTable.render(
        ["id", "name", "rpm", "tpm", "concurrency", "budget", "created"],
        tenants.map((tenant) => [
          tenant.id,
          tenant.name,
          ...AdminOptions.limitCells(tenant.limits),
          AdminOptions.time(tenant.created_at)
        ])
      )
    )
  })
).pipe(Command.withDescription("List the tenants and their limits."))

const create = Command.make(
  "create",
  {
    connection,
    id: tenantId,
    name: Options.text("name").pipe(
      Options.optional,
      Options.withDescription("A display name; the id by default.")
    ),
    limits: AdminOptions.limits(false),
    metadata: AdminOptions.metadata,
    json
  },
  (options) =>
    Effect.gen(function* () {
      const tenant = yield* (yield* AdminClient).createTenant({
        id: options.id,
        ...(options.name._tag === "Some" ? { name: options.name.value } : {}),
        ...(options.limits === undefined ? {} : { limits: options.limits }),
        ...(options.metadata === undefined ? {} : { metadata: options.metadata })
      })
      yield* options.json ? printJson(tenant) : printLines(AdminOptions.tenantFields(tenant))
    })
).pipe(Command.withDescription("Create a tenant, with limits shared by all of its keys."))

const limits = Command.make(
  "limits",
  {
    connection,
    id: tenantId,
    limits: AdminOptions.limits(true).pipe(
      Options.mapEffect((limits) =>
        limits === undefined
          ? Effect.fail(
              ValidationError.missingValue(
                HelpDoc.p(
                  "Nothing to change: give --rpm, --tpm, --concurrency, --budget-usd or --budget-period."
                )
              )
            )
          : Effect.succeed(limits)
      )
    ),
    json
  },
  (options) =>
    Effect.gen(function* () {
      const tenant = yield* (yield* AdminClient).changeTenant(options.id, options.limits)
      yield* options.json ? printJson(tenant) : printLines(AdminOptions.tenantFields(tenant))
    })
).pipe(Command.withDescription("Change a tenant's limits; a limit not given stays as it is."))

export const command = Command.make("tenants").pipe(
  Command.withDescription(
    "List and create tenants and change their limits (through the gateway's admin API)."
  ),
  Command.withSubcommands([
    AdminOptions.withClient(list),
    AdminOptions.withClient(create),
    AdminOptions.withClient(limits)
  ])
)
