/**
 * What the routing commands (`classify explain|eval`, `report savings`) share: the gateway config
 * they read the classifier, the policies and the prices from (`--config`, else `GATEWAY_CONFIG`,
 * else the embedded default), the policy chosen with `--policy`, and how tiers and money print.
 */
import { fileURLToPath } from "node:url"
import { Options } from "@effect/cli"
import type { FileSystem } from "@effect/platform"
// The loader alone, not the whole core barrel: a faster start.
import * as ConfigLoader from "@gateway/core/ConfigLoader"
import type { GatewayConfig, Routing } from "@gateway/domain"
import { Config, Effect, Option, Schema } from "effect"
import * as TextTable from "./TextTable.js"

/** The config `pnpm start` uses without `GATEWAY_CONFIG`. */
export const embeddedConfig = fileURLToPath(new URL("../../gateway/config/embedded.yaml", import.meta.url))

export const config = Options.text("config").pipe(
  Options.withFallbackConfig(Config.string("GATEWAY_CONFIG")),
  Options.withDefault(embeddedConfig),
  Options.withDescription(
    "The gateway config (YAML or JSON) to take the classifier, policies and prices from; " +
      "GATEWAY_CONFIG, else the embedded default, by default."
  )
)

export const policy = Options.text("policy").pipe(
  Options.optional,
  Options.withDescription("The routing policy; `auto` if the config has one, else its first policy.")
)

export const json = Options.boolean("json").pipe(Options.withDescription("Print JSON instead of text."))

/** The config names no such policy, or none at all. */
export class PolicyNotFound extends Schema.TaggedError<PolicyNotFound>()("PolicyNotFound", {
  path: Schema.String,
  policy: Schema.optional(Schema.String),
  known: Schema.Array(Schema.String)
}) {
  override get message() {
    if (this.known.length === 0) return `${this.path} has no routing policies (routing.policies is empty).`
    return `${this.path} has no routing policy '${this.policy}'; it has ${this.known.join(", ")}.`
  }
}

/** A loaded config and where it came from. */
export interface Loaded {
  readonly path: string
  readonly config: GatewayConfig.GatewayConfig
}

export const load = (path: string): Effect.Effect<Loaded, ConfigLoader.ConfigError, FileSystem.FileSystem> =>
  Effect.map(ConfigLoader.load(path), (config) => ({ path, config }))

/** The policy named `name`; without a name, `auto` if there is one, else the first. */
export const choosePolicy = (
  loaded: Loaded,
  name: Option.Option<string>
): Effect.Effect<Routing.PolicyConfig, PolicyNotFound> => {
  const policies = loaded.config.routing.policies
  const known = policies.map((p) => p.name as string)
  const wanted = Option.getOrElse(name, () => (known.includes("auto") ? "auto" : known[0]))
  const found = policies.find((p) => p.name === wanted)
  return found === undefined
    ? Effect.fail(new PolicyNotFound({ path: loaded.path, policy: wanted, known }))
    : Effect.succeed(found)
}

/** USD per million tokens, which is micro-USD per token. */
export interface Price {
  readonly inputPerMillionUsd: number
  readonly outputPerMillionUsd: number
}

/** The config's prices by model; models without `pricing` are absent. */
export const prices = (config: GatewayConfig.GatewayConfig): ReadonlyMap<string, Price> =>
  new Map(
    config.models.flatMap((m) => (m.pricing === undefined ? [] : [[m.name as string, m.pricing] as const]))
  )

/** `simple → small, moderate → small, complex → large` */
export const tiersText = (policy: { readonly tiers: Routing.PolicyConfig["tiers"] }) =>
  `simple → ${policy.tiers.simple}, moderate → ${policy.tiers.moderate}, complex → ${policy.tiers.complex}`

/** An amount of micro-USD as USD with 6 decimals. */
export const usd = (microUsd: number) => `$${(microUsd / 1e6).toFixed(6)}`

/** A share as a percentage with one decimal; `-` when there is no whole. */
export const percent = (part: number, whole: number) =>
  whole === 0 ? "-" : `${((100 * part) / whole).toFixed(1)}%`

/** `text` on one line, at most `max` characters. */
export const excerpt = (text: string, max = 72) => {
  const flat = text.replace(/\s+/g, " ").trim()
  return flat.length <= max ? flat : `${flat.slice(0, max - 1)}…`
}

/** A table whose columns from `numbersFrom` on hold numbers: right-aligned, headers included. */
export const table = (
  headers: ReadonlyArray<string>,
  rows: ReadonlyArray<ReadonlyArray<string>>,
  numbersFrom: number
): ReadonlyArray<string> => {
  const all = [headers, ...rows]
  const aligned = all.map((row) =>
    row.map((cell, i) =>
      i < numbersFrom ? cell : cell.padStart(Math.max(...all.map((r) => (r[i] ?? "").length)))
    )
  )
  return TextTable.render(aligned[0]!, aligned.slice(1))
}
