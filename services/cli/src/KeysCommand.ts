/**
 * `keys create|list|show|revoke|limits`: API keys through the gateway's RPC API. The secret of
 * a new key is printed once, when it is created; the gateway keeps only its hash.
 */
import { Args, Command, HelpDoc, Options, ValidationError } from "@effect/cli"
import { Effect, Option } from "effect"
import * as AdminOptions from "./AdminOptions.js"
import * as AdminViews from "./AdminViews.js"
import * as Gateway from "./Gateway.js"
import * as TextTable from "./TextTable.js"

const { connection, json, printJson, printLines } = AdminOptions

const keyId = Args.text({ name: "key-id" }).pipe(
  Args.withDescription("The key's id (key_…), as `keys list` shows it.")
)

/** What `keys create` prints: the secret first and set apart, then the key. */
export const createdLines = (
  key: { readonly key: string } & Parameters<typeof AdminOptions.keyFields>[0]
) => [
  `Created API key ${key.id} for tenant ${key.tenant}. Its secret:`,
  "",
  `    ${key.key}`,
  "",
  "Copy it now: it will not be shown again (the gateway keeps only its hash).",
  "",
  ...AdminOptions.keyFields(key)
]

const create = Command.make(
  "create",
  {
    connection,
    tenant: Options.text("tenant").pipe(
      Options.withDescription("The tenant the key belongs to; created (without limits) if new.")
    ),
    name: Options.text("name").pipe(Options.withDescription("What the key is for, to recognise it by.")),
    models: AdminOptions.models(
      false,
      "The only models the key may call, separated by commas; all by default."
    ),
    limits: AdminOptions.limits(false),
    scopes: Options.choice("scope", ["admin", "internal"] as const).pipe(
      Options.repeated,
      Options.withDescription("Also allow: admin (the admin API), internal (service RPC). Repeatable.")
    ),
    metadata: AdminOptions.metadata,
    policy: AdminOptions.policy(
      false,
      "Bind the key to this routing policy (a routing.policies name in the gateway's config): any policy name it sends as model means this one."
    ),
    json
  },
  (options) =>
    Effect.gen(function* () {
      const created = yield* Gateway.call((client) =>
        client.Keys.create({
          tenant: options.tenant,
          name: options.name,
          ...Option.match(options.models, { onNone: () => ({}), onSome: (models) => ({ models }) }),
          ...(options.limits === undefined ? {} : { limits: options.limits }),
          ...(options.scopes.length === 0 ? {} : { scopes: Array.from(new Set(options.scopes)) }),
          ...(options.metadata === undefined ? {} : { metadata: options.metadata }),
          ...Option.match(options.policy, { onNone: () => ({}), onSome: (policy) => ({ policy }) })
        })
      )
      const key = AdminViews.createdKey(created)
      yield* options.json ? printJson(key) : printLines(createdLines(key))
    })
).pipe(
  Command.withDescription(
    "Create an API key and print its secret, once. Without limits it gets the gateway's default key limits."
  )
)

const listHeaders = [
  "id",
  "tenant",
  "name",
  "prefix",
  "models",
  "policy",
  "rpm",
  "tpm",
  "concurrency",
  "budget",
  "created",
  "revoked"
]

const list = Command.make(
  "list",
  {
    connection,
    tenant: Options.text("tenant").pipe(
      Options.optional,
      Options.withDescription("Only this tenant's keys.")
    ),
    all: Options.boolean("all").pipe(Options.withDescription("Include revoked keys.")),
    json
  },
  (options) =>
    Effect.gen(function* () {
      const listed = yield* Gateway.call((client) =>
        client.Keys.list({
          ...Option.match(options.tenant, { onNone: () => ({}), onSome: (tenant) => ({ tenant }) }),
          includeRevoked: options.all
        })
      )
      const keys = listed.map(AdminViews.key)
      if (options.json) return yield* printJson({ object: "list", data: keys })
      if (keys.length === 0) {
        return yield* printLines([
          `No${options.all ? "" : " active"} keys${Option.match(options.tenant, { onNone: () => "", onSome: (t) => ` for tenant ${t}` })}.`
        ])
      }
      yield* printLines(
        TextTable.render(
          listHeaders,
          keys.map((key) => [
            key.id,
            key.tenant,
            key.name,
            `${key.prefix}…`,
            AdminOptions.modelsText(key.models),
            AdminOptions.policyText(key.policy),
            ...AdminOptions.limitCells(key.limits),
            AdminOptions.time(key.created_at),
            key.revoked_at === null ? "-" : AdminOptions.time(key.revoked_at)
          ])
        )
      )
    })
).pipe(Command.withDescription("List the API keys (not their secrets), oldest first."))

const show = Command.make("show", { connection, id: keyId, json }, (options) =>
  Effect.gen(function* () {
    const key = AdminViews.key(yield* Gateway.call((client) => client.Keys.get({ id: options.id })))
    yield* options.json ? printJson(key) : printLines(AdminOptions.keyFields(key))
  })
).pipe(Command.withDescription("Show one API key."))

const revoke = Command.make(
  "revoke",
  {
    connection,
    id: keyId,
    reason: Options.text("reason").pipe(Options.optional, Options.withDescription("Why, for the record.")),
    json
  },
  (options) =>
    Effect.gen(function* () {
      const key = AdminViews.key(
        yield* Gateway.call((client) =>
          client.Keys.revoke({
            id: options.id,
            ...Option.match(options.reason, { onNone: () => ({}), onSome: (reason) => ({ reason }) })
          })
        )
      )
      if (options.json) return yield* printJson(key)
      yield* printLines([
        `Revoked ${key.id} (${key.name}, tenant ${key.tenant}): every replica refuses it from now on.`,
        "",
        ...AdminOptions.keyFields(key)
      ])
    })
).pipe(Command.withDescription("Revoke an API key; requests with it get 401 from then on."))

/** The change `keys limits` asks for: limits, models, policy or any of them, never nothing. */
const change = Options.all({
  limits: AdminOptions.limits(true),
  models: AdminOptions.models(
    true,
    "The only models the key may call, separated by commas; 'all' for every model."
  ),
  policy: AdminOptions.policy(
    true,
    "Bind the key to this routing policy (a routing.policies name in the gateway's config)."
  )
}).pipe(
  Options.mapEffect(({ limits, models, policy }) =>
    limits === undefined && Option.isNone(models) && Option.isNone(policy)
      ? Effect.fail(
          ValidationError.missingValue(
            HelpDoc.p(
              "Nothing to change: give --rpm, --tpm, --concurrency, --budget-usd, --budget-period, --models or --policy."
            )
          )
        )
      : Effect.succeed({
          ...(limits === undefined ? {} : { limits }),
          ...Option.match(models, { onNone: () => ({}), onSome: (models) => ({ models }) }),
          ...Option.match(policy, { onNone: () => ({}), onSome: (policy) => ({ policy }) })
        })
  )
)

const limits = Command.make("limits", { connection, id: keyId, change, json }, (options) =>
  Effect.gen(function* () {
    const key = AdminViews.key(
      yield* Gateway.call((client) => client.Keys.update({ id: options.id, ...options.change }))
    )
    yield* options.json ? printJson(key) : printLines(AdminOptions.keyFields(key))
  })
).pipe(
  Command.withDescription(
    "Change a key's limits, allowed models or routing policy; what is not given stays as it is. Takes effect at once."
  )
)

export const command = Command.make("keys").pipe(
  Command.withDescription(
    "Create, list, revoke API keys and change their limits, models and policy (through the gateway at --url)."
  ),
  Command.withSubcommands([
    AdminOptions.withClient(create),
    AdminOptions.withClient(list),
    AdminOptions.withClient(show),
    AdminOptions.withClient(revoke),
    AdminOptions.withClient(limits)
  ])
)
