/**
 * Options of the simulated backend: their type, defaults, validation, and parsing from CLI flags and
 * `SIM_*` environment variables.
 */
import { parseArgs } from "node:util"
import * as Either from "effect/Either"
import * as ParseResult from "effect/ParseResult"
import * as Schema from "effect/Schema"

/** Every knob of the simulator; all of them except `port` and `host` can change at runtime. */
export interface SimOptions {
  /** TCP port; 0 picks an ephemeral port. */
  readonly port: number
  readonly host: string
  /** Model id reported in responses, `/v1/models` and metric labels. */
  readonly model: string
  /** When set, content and fault decisions depend only on the seed and the order of requests. */
  readonly seed: number | undefined
  /** Time to first token, in ms. */
  readonly ttftMs: number
  /** Inter-token latency, in ms; 0 sends all remaining tokens in one write. */
  readonly itlMs: number
  /** `fixed`: `outputTokens` per completion; `prompt`: `ceil(promptTokens * outputRatio)`. */
  readonly outputMode: "fixed" | "prompt"
  readonly outputTokens: number
  readonly outputRatio: number
  /** Upper bound of a completion's length in `prompt` mode. */
  readonly maxOutputTokens: number
  /** Requests generated concurrently (the batch size); more wait in FIFO order. */
  readonly capacity: number
  /** Fraction of chat requests answered with `errorStatus` and an OpenAI error body. */
  readonly errorRate: number
  readonly errorStatus: number
  /**
   * How an injected error is answered: `status` (an HTTP error), or `event` (a stream gets
   * 200 and one error event, as vLLM does when generation fails; a whole answer gets the status).
   */
  readonly errorMode: "status" | "event"
  /** Fraction of chat requests never answered until the client goes away. */
  readonly hangRate: number
  /** Fraction of chat requests whose first token comes `slowFirstTokenMs` later than `ttftMs`. */
  readonly slowFirstTokenRate: number
  readonly slowFirstTokenMs: number
  /** When set, a fraction `breakRate` of streams lose their connection after this many content chunks. */
  readonly breakAfterChunks: number | undefined
  readonly breakRate: number
  /** When true nothing listens on the port, so clients get ECONNREFUSED. */
  readonly refuseConnections: boolean
}

/** A partial update of the options; `seed` and `breakAfterChunks` may be cleared with `undefined`. */
export type SimOptionsPatch = { readonly [K in keyof SimOptions]?: SimOptions[K] }

export const defaults: SimOptions = {
  port: 0,
  host: "127.0.0.1",
  model: "sim-small",
  seed: undefined,
  ttftMs: 20,
  itlMs: 5,
  outputMode: "fixed",
  outputTokens: 16,
  outputRatio: 1,
  maxOutputTokens: 4096,
  capacity: 256,
  errorRate: 0,
  errorStatus: 500,
  errorMode: "status",
  hangRate: 0,
  slowFirstTokenRate: 0,
  slowFirstTokenMs: 1000,
  breakAfterChunks: undefined,
  breakRate: 1,
  refuseConnections: false
}

const Rate = Schema.Number.pipe(Schema.between(0, 1))
const Millis = Schema.NonNegativeInt
const Tokens = Schema.Int.pipe(Schema.between(1, 1_000_000))
const exact = { exact: true } as const

/** The shape accepted by `POST /sim/config` and `update`: null clears `seed` / `breakAfterChunks`. */
export const SimOptionsPatchSchema = Schema.Struct({
  port: Schema.optionalWith(Schema.Int.pipe(Schema.between(0, 65535)), exact),
  host: Schema.optionalWith(Schema.NonEmptyString, exact),
  model: Schema.optionalWith(Schema.NonEmptyString, exact),
  seed: Schema.optionalWith(Schema.NullishOr(Schema.Int), exact),
  ttftMs: Schema.optionalWith(Millis, exact),
  itlMs: Schema.optionalWith(Millis, exact),
  outputMode: Schema.optionalWith(Schema.Literal("fixed", "prompt"), exact),
  outputTokens: Schema.optionalWith(Tokens, exact),
  outputRatio: Schema.optionalWith(Schema.Number.pipe(Schema.between(0, 1000)), exact),
  maxOutputTokens: Schema.optionalWith(Tokens, exact),
  capacity: Schema.optionalWith(Schema.Int.pipe(Schema.between(1, 1_000_000)), exact),
  errorRate: Schema.optionalWith(Rate, exact),
  errorStatus: Schema.optionalWith(Schema.Int.pipe(Schema.between(400, 599)), exact),
  errorMode: Schema.optionalWith(Schema.Literal("status", "event"), exact),
  hangRate: Schema.optionalWith(Rate, exact),
  slowFirstTokenRate: Schema.optionalWith(Rate, exact),
  slowFirstTokenMs: Schema.optionalWith(Millis, exact),
  breakAfterChunks: Schema.optionalWith(Schema.NullishOr(Schema.NonNegativeInt), exact),
  breakRate: Schema.optionalWith(Rate, exact),
  refuseConnections: Schema.optionalWith(Schema.Boolean, exact)
})

const decodePatchSchema = Schema.decodeUnknownEither(SimOptionsPatchSchema, { onExcessProperty: "error" })

/** Validates an untrusted partial update (JSON body, programmatic call); `Left` holds a readable message. */
export const decodePatch = (input: unknown): Either.Either<SimOptionsPatch, string> =>
  Either.match(decodePatchSchema(input), {
    onLeft: (error) =>
      Either.left(
        ParseResult.ArrayFormatter.formatErrorSync(error)
          .map((issue) =>
            issue.path.length === 0 ? issue.message : `${issue.path.join(".")}: ${issue.message}`
          )
          .join("; ")
      ),
    onRight: (decoded) => {
      const patch: Record<string, unknown> = {}
      for (const [key, value] of Object.entries(decoded)) patch[key] = value === null ? undefined : value
      return Either.right(patch as SimOptionsPatch)
    }
  })

/** Applies a validated patch on top of `base`. */
export const merge = (base: SimOptions, patch: SimOptionsPatch): SimOptions => ({ ...base, ...patch })

/** Validates `patch` and applies it on top of `base` (the defaults unless given). */
export const resolve = (patch: unknown, base: SimOptions = defaults): Either.Either<SimOptions, string> =>
  Either.map(decodePatch(patch), (decoded) => merge(base, decoded))

/** Kebab-case flag name of each option: `ttftMs` ⇔ `--ttft-ms` ⇔ `SIM_TTFT_MS`. */
const flagName = (key: string): string => key.replace(/[A-Z]/g, (c) => `-${c.toLowerCase()}`)
const envName = (key: string): string => `SIM_${flagName(key).replace(/-/g, "_").toUpperCase()}`

const optionKeys = Object.keys(defaults) as ReadonlyArray<keyof SimOptions>
const numericKeys = new Set<string>(optionKeys.filter((k) => typeof defaults[k] === "number" || k === "seed"))
numericKeys.add("breakAfterChunks")

const parseValue = (key: string, raw: string): unknown => {
  if (key === "refuseConnections") return raw === "" || raw === "1" || raw.toLowerCase() === "true"
  if (numericKeys.has(key)) {
    const n = Number(raw)
    return raw.trim() === "" || Number.isNaN(n) ? raw : n
  }
  return raw
}

/** Help text listing every flag with its default. */
export const usage = (): string =>
  [
    "Usage: backend-sim [--flag value]...   (each flag also reads SIM_<FLAG> from the environment)",
    ...optionKeys.map((k) => `  --${flagName(k)}`.padEnd(26) + `default: ${String(defaults[k])}`)
  ].join("\n")

/**
 * Parses CLI flags (kebab-case, e.g. `--ttft-ms 50`) over `SIM_*` variables of `env` over the defaults.
 * `Left` holds a readable message (unknown flag, bad value).
 */
export const fromArgs = (
  args: ReadonlyArray<string>,
  env: Readonly<Record<string, string | undefined>> = {}
): Either.Either<SimOptions, string> => {
  const options: Record<string, { type: "string" | "boolean" }> = {}
  for (const key of optionKeys)
    options[flagName(key)] = { type: key === "refuseConnections" ? "boolean" : "string" }
  let values: Record<string, string | boolean | undefined>
  try {
    values = parseArgs({ args: [...args], options, strict: true, allowPositionals: false }).values as Record<
      string,
      string | boolean | undefined
    >
  } catch (error) {
    return Either.left(error instanceof Error ? error.message : String(error))
  }
  const patch: Record<string, unknown> = {}
  for (const key of optionKeys) {
    const fromEnv = env[envName(key)]
    if (fromEnv !== undefined) patch[key] = parseValue(key, fromEnv)
    const fromFlag = values[flagName(key)]
    if (typeof fromFlag === "boolean") patch[key] = fromFlag
    else if (fromFlag !== undefined) patch[key] = parseValue(key, fromFlag)
  }
  return resolve(patch)
}
