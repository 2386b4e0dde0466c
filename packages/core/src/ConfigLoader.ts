/**
 * Loads and validates the gateway config file (JSON, or YAML by extension). Any problem stops
 * start-up with a `ConfigError` whose message names the file and the bad field.
 */
import { FileSystem } from "@effect/platform"
import { GatewayConfig } from "@gateway/domain"
import { Effect, ParseResult, Schema } from "effect"
import * as Yaml from "yaml"

export class ConfigError extends Schema.TaggedError<ConfigError>()("ConfigError", {
  path: Schema.String,
  detail: Schema.String
}) {
  override get message() {
    return `Invalid gateway config ${this.path}:\n${this.detail}`
  }
}

const decode = Schema.decodeUnknown(GatewayConfig.GatewayConfig, { errors: "all", onExcessProperty: "error" })

/** Parses text as YAML for `.yaml`/`.yml` paths, JSON otherwise. */
export const parse = (path: string, text: string): Effect.Effect<unknown, ConfigError> =>
  Effect.try({
    try: () => (/\.ya?ml$/i.test(path) ? Yaml.parse(text) : JSON.parse(text)),
    catch: (cause) =>
      new ConfigError({ path, detail: cause instanceof Error ? cause.message : String(cause) })
  })

/** Validates an already-parsed document; `path` is only used in the error message. */
export const fromUnknown = (
  path: string,
  document: unknown
): Effect.Effect<GatewayConfig.GatewayConfig, ConfigError> =>
  decode(document).pipe(
    Effect.mapError(
      (error) =>
        new ConfigError({
          path,
          detail: ParseResult.ArrayFormatter.formatErrorSync(error).map(formatIssue).join("\n")
        })
    )
  )

const formatIssue = (issue: ParseResult.ArrayFormatterIssue): string =>
  `  at ${issue.path.length === 0 ? "(root)" : issue.path.join(".")}: ${issue.message}`

/** Reads, parses and validates the config file at `path`. */
export const load = (
  path: string
): Effect.Effect<GatewayConfig.GatewayConfig, ConfigError, FileSystem.FileSystem> =>
  Effect.gen(function* () {
    const fs = yield* FileSystem.FileSystem
    const text = yield* fs
      .readFileString(path)
      .pipe(
        Effect.mapError((cause) => new ConfigError({ path, detail: `cannot read file: ${cause.message}` }))
      )
    return yield* fromUnknown(path, yield* parse(path, text))
  })
