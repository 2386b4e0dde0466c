/**
 * What the commands that call a running gateway (`keys`, `tenants`, `usage`, `backends`,
 * `status`, `dlq`) share: where the gateway is and its admin key, the limit and policy options,
 * and how keys, tenants and limits are printed. The URL and key fall back to `GATEWAY_URL` and
 * `ADMIN_KEY` through `Config`, i.e. the composition root's provider.
 */
import { Command, HelpDoc, Options, ValidationError } from "@effect/cli"
import type { RpcSchemas } from "@gateway/domain"
import { Config, Console, Effect, HashMap, Layer, Option, type Redacted } from "effect"
import type * as AdminViews from "./AdminViews.js"
import * as Gateway from "./Gateway.js"

export const defaultUrl = "http://127.0.0.1:8080"

/** `--url` and `--admin-key`; the key is optional here so that its absence is explained, not usage-dumped. */
export const connection = Options.all({
  url: Options.text("url").pipe(
    Options.withFallbackConfig(Config.string("GATEWAY_URL")),
    Options.withDefault(defaultUrl),
    Options.withDescription(`The gateway's base URL; GATEWAY_URL, else ${defaultUrl}, by default.`)
  ),
  adminKey: Options.redacted("admin-key").pipe(
    Options.withFallbackConfig(Config.redacted("ADMIN_KEY")),
    Options.optional,
    Options.withDescription(
      "The gateway's admin key; ADMIN_KEY by default (better: arguments show in process lists)."
    )
  )
})

export interface ConnectionOptions {
  readonly url: string
  readonly adminKey: Option.Option<Redacted.Redacted<string>>
}

/** The gateway's client for these options; fails, when the command runs, if there is no admin key. */
export const clientLayer = (options: ConnectionOptions): Layer.Layer<Gateway.Gateway, Gateway.GatewayError> =>
  Option.match(options.adminKey, {
    onNone: () =>
      Layer.fail(
        new Gateway.GatewayError({
          reason: "NoAdminKey",
          message: "no admin key: set ADMIN_KEY or pass --admin-key (the gateway's ADMIN_KEY)."
        })
      ),
    onSome: (adminKey) => Gateway.layer({ url: options.url, adminKey })
  })

/** Gives a command whose options include `connection` the gateway's client. */
export const withClient = <Name extends string, R, E, A extends { readonly connection: ConnectionOptions }>(
  command: Command.Command<Name, R, E, A>
) => Command.provide(command, (config: A) => clientLayer(config.connection))

export const json = Options.boolean("json").pipe(
  Options.withDescription("Print the API's answer as JSON instead of text.")
)

export const printJson = (value: unknown) => Console.log(JSON.stringify(value, null, 2))
export const printLines = (lines: ReadonlyArray<string>) => Console.log(lines.join("\n"))

const invalid = (message: string) => Effect.fail(ValidationError.invalidValue(HelpDoc.p(message)))

// ---------------------------------------------------------------------------------------------
// Limits
// ---------------------------------------------------------------------------------------------

type Kind = "count" | "usd"

/** A limit's value: a positive integer, or an amount of USD; `none` (when clearable) is `null`. */
const limitValue = <Clearable extends boolean>(
  name: string,
  kind: Kind,
  clearable: Clearable,
  description: string
): Options.Options<Option.Option<Clearable extends true ? number | null : number>> =>
  Options.text(name).pipe(
    Options.mapEffect((text) => {
      const trimmed = text.trim()
      if (clearable && trimmed === "none") return Effect.succeed(null)
      const n = Number(trimmed)
      const valid =
        trimmed.length > 0 &&
        Number.isFinite(n) &&
        (kind === "count" ? Number.isInteger(n) && n >= 1 : n >= 0)
      if (valid) return Effect.succeed(n)
      const expected = kind === "count" ? "a positive integer" : "an amount of USD (0 or more)"
      return invalid(`--${name} takes ${expected}${clearable ? " or 'none'" : ""}, got '${text}'.`)
    }),
    Options.optional,
    Options.withDescription(clearable ? `${description} 'none' removes the limit.` : description)
  ) as Options.Options<Option.Option<Clearable extends true ? number | null : number>>

const budgetPeriod = Options.choice("budget-period", ["day", "month"] as const).pipe(
  Options.optional,
  Options.withDescription("The budget starts again every day or month (UTC); month by default.")
)

/**
 * `--rpm --tpm --concurrency --budget-usd --budget-period` as the API's limits, or `undefined`
 * when none is given. With `clearable`, `none` clears a limit (`null`).
 */
export const limits = <Clearable extends boolean>(clearable: Clearable) =>
  Options.all({
    rpm: limitValue("rpm", "count", clearable, "Requests per minute."),
    tpm: limitValue("tpm", "count", clearable, "Tokens (prompt + completion) per minute."),
    concurrency: limitValue("concurrency", "count", clearable, "Requests at the same time."),
    budgetUsd: limitValue("budget-usd", "usd", clearable, "Spend per budget period, in USD."),
    budgetPeriod
  }).pipe(
    Options.mapEffect(
      (o): Effect.Effect<RpcSchemas.LimitsChange | undefined, ValidationError.ValidationError> => {
        if (!clearable && Option.isSome(o.budgetPeriod) && Option.isNone(o.budgetUsd)) {
          return invalid("--budget-period needs --budget-usd.")
        }
        const input: RpcSchemas.LimitsChange = {
          ...Option.match(o.rpm, { onNone: () => ({}), onSome: (v) => ({ requests_per_minute: v }) }),
          ...Option.match(o.tpm, { onNone: () => ({}), onSome: (v) => ({ tokens_per_minute: v }) }),
          ...Option.match(o.concurrency, { onNone: () => ({}), onSome: (v) => ({ concurrent_requests: v }) }),
          ...Option.match(o.budgetUsd, { onNone: () => ({}), onSome: (v) => ({ budget_usd: v }) }),
          ...Option.match(o.budgetPeriod, { onNone: () => ({}), onSome: (v) => ({ budget_period: v }) })
        }
        return Effect.succeed(Object.keys(input).length === 0 ? undefined : input)
      }
    )
  )

/** `--<name>`: an ISO 8601 date or time, as a `Date`. */
export const timeOption = (name: string, description: string) =>
  Options.text(name).pipe(
    Options.mapEffect((text) => {
      const time = new Date(text.trim())
      return Number.isNaN(time.getTime())
        ? invalid(`--${name} takes an ISO 8601 date or time, got '${text}'.`)
        : Effect.succeed(time)
    }),
    Options.optional,
    Options.withDescription(description)
  )

/** `--meta k=v` (repeatable), as a record; `undefined` when not given. */
export const metadata = Options.keyValueMap("meta").pipe(
  Options.optional,
  Options.map(
    Option.match({ onNone: () => undefined, onSome: (map) => Object.fromEntries(HashMap.toEntries(map)) })
  ),
  Options.withDescription(
    "A label for reporting, key=value (repeatable): --meta team=search --meta env=prod."
  )
)

/** A comma-separated list of model names; `all` (when allowed) is `null`, every model. */
export const models = <All extends boolean>(all: All, description: string) =>
  Options.text("models").pipe(
    Options.mapEffect((text) => {
      if (all && text.trim() === "all") return Effect.succeed(null)
      const names = text
        .split(",")
        .map((name) => name.trim())
        .filter((name) => name.length > 0)
      return names.length > 0
        ? Effect.succeed(names)
        : invalid(`--models takes model names separated by commas${all ? ", or 'all'" : ""}.`)
    }),
    Options.optional,
    Options.withDescription(description)
  ) as Options.Options<Option.Option<All extends true ? ReadonlyArray<string> | null : ReadonlyArray<string>>>

/**
 * `--policy NAME`: a routing policy (`routing.policies[].name` in the gateway's config) to bind
 * to; with `clearable`, `none` unbinds (`null`). The gateway refuses a name it does not know.
 */
export const policy = <Clearable extends boolean>(clearable: Clearable, description: string) =>
  Options.text("policy").pipe(
    Options.mapEffect((text) => {
      const name = text.trim()
      if (clearable && name === "none") return Effect.succeed(null)
      return name.length > 0
        ? Effect.succeed(name)
        : invalid(`--policy takes a routing policy's name${clearable ? ", or 'none'" : ""}.`)
    }),
    Options.optional,
    Options.withDescription(clearable ? `${description} 'none' unbinds it.` : description)
  ) as Options.Options<Option.Option<Clearable extends true ? string | null : string>>

// ---------------------------------------------------------------------------------------------
// Printing
// ---------------------------------------------------------------------------------------------

/** An amount of USD with 2 to 6 decimals (`$12.50`, `$0.00015`). */
export const usd = (amount: number) => `$${amount.toFixed(6).replace(/(\.\d\d\d*?)0+$/, "$1")}`

export const budgetText = (limits: AdminViews.Limits) =>
  limits.budget_usd === null ? "-" : `${usd(limits.budget_usd)}/${limits.budget_period ?? "month"}`

const orDash = (n: number | null) => (n === null ? "-" : String(n))

/** The limits' cells in the order rpm, tpm, concurrency, budget; `-` is no limit. */
export const limitCells = (limits: AdminViews.Limits): ReadonlyArray<string> => [
  orDash(limits.requests_per_minute),
  orDash(limits.tokens_per_minute),
  orDash(limits.concurrent_requests),
  budgetText(limits)
]

export const limitsText = (limits: AdminViews.Limits) => {
  const [rpm, tpm, concurrency, budget] = limitCells(limits)
  return `rpm ${rpm}, tpm ${tpm}, concurrency ${concurrency}, budget ${budget}`
}

/** An ISO time to the second. */
export const time = (iso: string) => iso.replace(/\.\d+Z$/, "Z")

export const modelsText = (models: ReadonlyArray<string> | null) =>
  models === null ? "all" : models.join(",")

/** A bound routing policy, `-` when none (or when the gateway does not say: it predates them). */
export const policyText = (policy: string | null | undefined) => policy ?? "-"

export const metadataText = (metadata: Readonly<Record<string, string>> | undefined) => {
  const entries = Object.entries(metadata ?? {})
  return entries.length === 0 ? "-" : entries.map(([k, v]) => `${k}=${v}`).join(", ")
}

/** `label  value` lines, the labels padded to the widest. */
export const fields = (rows: ReadonlyArray<readonly [string, string]>): ReadonlyArray<string> => {
  const width = Math.max(...rows.map(([label]) => label.length))
  return rows.map(([label, value]) => `${label.padEnd(width)}  ${value}`)
}

/** A key's description, without its secret (which the API never shows after creation). */
export const keyFields = (key: AdminViews.ApiKey): ReadonlyArray<string> =>
  fields([
    ["id", key.id],
    ["tenant", key.tenant],
    ["name", key.name],
    ["prefix", `${key.prefix}…`],
    ["models", modelsText(key.models)],
    ["limits", limitsText(key.limits)],
    ["policy", policyText(key.policy)],
    ["scopes", key.scopes.length === 0 ? "-" : key.scopes.join(", ")],
    ["metadata", metadataText(key.metadata)],
    ["created", time(key.created_at)],
    ...(key.revoked_at === null
      ? []
      : [
          [
            "revoked",
            `${time(key.revoked_at)}${key.revoked_reason === null ? "" : ` (${key.revoked_reason})`}`
          ] as const
        ])
  ])

export const tenantFields = (tenant: AdminViews.Tenant): ReadonlyArray<string> =>
  fields([
    ["id", tenant.id],
    ["name", tenant.name],
    ["limits", limitsText(tenant.limits)],
    ["policy", policyText(tenant.policy)],
    ["metadata", metadataText(tenant.metadata)],
    ["created", time(tenant.created_at)]
  ])
