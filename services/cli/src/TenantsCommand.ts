/**
 * `tenants list|create|limits`: tenants, their limits (which every key of the tenant shares) and
 * their routing policy (which every key of the tenant without one of its own follows) through the
 * gateway's RPC API.
 */
import { Args, Command, HelpDoc, Options, ValidationError } from "@effect/cli"
import { Effect, Option } from "effect"
import * as AdminOptions from "./AdminOptions.js"
import * as AdminViews from "./AdminViews.js"
import * as Gateway from "./Gateway.js"
import * as TextTable from "./TextTable.js"

const { connection, json, printJson, printLines } = AdminOptions

const tenantId = Args.text({ name: "tenant-id" }).pipe(
  Args.withDescription("1 to 64 letters, digits, '.', '_' or '-'.")
)

const list = Command.make("list", { connection, json }, (options) =>
  Effect.gen(function* () {
    const tenants = (yield* Gateway.call((client) => client.Tenants.list())).map(AdminViews.tenant)
    if (options.json) return yield* printJson({ object: "list", data: tenants })
    if (tenants.length === 0) return yield* printLines(["No tenants."])
    yield* printLines(
      TextTable.render(
        ["id", "name", "policy", "rpm", "tpm", "concurrency", "budget", "created"],
        tenants.map((tenant) => [
          tenant.id,
          tenant.name,
          AdminOptions.policyText(tenant.policy),
          ...AdminOptions.limitCells(tenant.limits),
          AdminOptions.time(tenant.created_at)
        ])
      )
    )
  })
).pipe(Command.withDescription("List the tenants, their routing policy and their limits."))

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
    policy: AdminOptions.policy(
      false,
      "Bind the tenant to this routing policy (a routing.policies name in the gateway's config): its keys without a policy of their own follow it."
    ),
    json
  },
  (options) =>
    Effect.gen(function* () {
      const created = yield* Gateway.call((client) =>
        client.Tenants.create({
          id: options.id,
          ...Option.match(options.name, { onNone: () => ({}), onSome: (name) => ({ name }) }),
          ...(options.limits === undefined ? {} : { limits: options.limits }),
          ...(options.metadata === undefined ? {} : { metadata: options.metadata }),
          ...Option.match(options.policy, { onNone: () => ({}), onSome: (policy) => ({ policy }) })
        })
      )
      const tenant = AdminViews.tenant(created)
      yield* options.json ? printJson(tenant) : printLines(AdminOptions.tenantFields(tenant))
    })
).pipe(
  Command.withDescription(
    "Create a tenant, with limits shared by all of its keys and, optionally, a routing policy."
  )
)

const limits = Command.make(
  "limits",
  {
    connection,
    id: tenantId,
    change: Options.all({
      limits: AdminOptions.limits(true),
      policy: AdminOptions.policy(
        true,
        "Bind the tenant to this routing policy (a routing.policies name in the gateway's config)."
      )
    }).pipe(
      Options.mapEffect(({ limits, policy }) =>
        limits === undefined && Option.isNone(policy)
          ? Effect.fail(
              ValidationError.missingValue(
                HelpDoc.p(
                  "Nothing to change: give --rpm, --tpm, --concurrency, --budget-usd, --budget-period or --policy."
                )
              )
            )
          : Effect.succeed({
              ...(limits === undefined ? {} : { limits }),
              ...Option.match(policy, { onNone: () => ({}), onSome: (policy) => ({ policy }) })
            })
      )
    ),
    json
  },
  (options) =>
    Effect.gen(function* () {
      const tenant = AdminViews.tenant(
        yield* Gateway.call((client) => client.Tenants.update({ id: options.id, ...options.change }))
      )
      yield* options.json ? printJson(tenant) : printLines(AdminOptions.tenantFields(tenant))
    })
).pipe(
  Command.withDescription("Change a tenant's limits or routing policy; what is not given stays as it is.")
)

export const command = Command.make("tenants").pipe(
  Command.withDescription(
    "List and create tenants and change their limits and policy (through the gateway at --url)."
  ),
  Command.withSubcommands([
    AdminOptions.withClient(list),
    AdminOptions.withClient(create),
    AdminOptions.withClient(limits)
  ])
)
