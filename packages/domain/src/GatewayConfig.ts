/**
 * The gateway's config file (JSON or YAML): models, their backend replicas, limits and timeouts.
 * Keys are snake_case in the file and camelCase in code; decoding errors name the bad field.
 */
import { Schema } from "effect"
import { BackendId, ModelName } from "./Ids.js"
import { LimitsInput } from "./Tenancy.js"

const PositiveInt = Schema.Int.pipe(Schema.greaterThanOrEqualTo(1))

/** `field` in the file is `snake` (with a default when given). */
const snake = <S extends Schema.Schema.Any>(key: string, schema: S) =>
  Schema.optional(schema).pipe(Schema.fromKey(key))
const snakeWithDefault = <S extends Schema.Schema.AnyNoContext>(
  key: string,
  schema: S,
  value: () => Schema.Schema.Type<S>
) => Schema.optionalWith(schema, { default: value }).pipe(Schema.fromKey(key))

const HttpUrl = Schema.String.pipe(
  Schema.filter((s) => {
    try {
      const url = new URL(s)
      return url.protocol === "http:" || url.protocol === "https:" || `must be an http(s) URL, got '${s}'`
    } catch {
      return `must be an absolute http(s) URL, got '${s}'`
    }
  })
)

/** Per-attempt timeouts; a model may override any of them. */
export class Timeouts extends Schema.Class<Timeouts>("Timeouts")({
  connectMs: snakeWithDefault("connect_ms", PositiveInt, () => 5_000),
  /** Until the backend's response headers arrive. */
  firstByteMs: snakeWithDefault("first_byte_ms", PositiveInt, () => 60_000),
  /** The whole attempt, body included. */
  totalMs: snakeWithDefault("total_ms", PositiveInt, () => 600_000)
}) {}

const TimeoutsOverride = Schema.Struct({
  connectMs: snake("connect_ms", PositiveInt),
  firstByteMs: snake("first_byte_ms", PositiveInt),
  totalMs: snake("total_ms", PositiveInt)
})

/** One replica of a model: an OpenAI-compatible server (vLLM, TGI, Ollama, OpenAI …). */
export class BackendConfig extends Schema.Class<BackendConfig>("BackendConfig")({
  id: BackendId,
  url: HttpUrl,
  /** Name of the environment variable holding the backend's API key, if it needs one. */
  apiKeyEnv: snake("api_key_env", Schema.String.pipe(Schema.pattern(/^[A-Za-z_][A-Za-z0-9_]*$/))),
  weight: Schema.optionalWith(Schema.Number.pipe(Schema.positive()), { default: () => 1 })
}) {}

/** What a model costs, in USD per million tokens; the source of every request's cost. */
export class ModelPricing extends Schema.Class<ModelPricing>("ModelPricing")({
  inputPerMillionUsd: Schema.Number.pipe(
    Schema.nonNegative(),
    Schema.finite(),
    Schema.propertySignature,
    Schema.fromKey("input_per_million_usd")
  ),
  outputPerMillionUsd: Schema.Number.pipe(
    Schema.nonNegative(),
    Schema.finite(),
    Schema.propertySignature,
    Schema.fromKey("output_per_million_usd")
  )
}) {}

export class ModelConfig extends Schema.Class<ModelConfig>("ModelConfig")({
  name: ModelName,
  /** The name the backends know the model by, when it differs from the public name. */
  upstreamModel: snake("upstream_model", Schema.NonEmptyTrimmedString),
  ownedBy: snakeWithDefault("owned_by", Schema.String, () => "gateway"),
  backends: Schema.NonEmptyArray(BackendConfig),
  timeouts: Schema.optional(TimeoutsOverride),
  pricing: Schema.optional(ModelPricing)
}) {}

export class ServerConfig extends Schema.Class<ServerConfig>("ServerConfig")({
  host: Schema.optionalWith(Schema.String, { default: () => "0.0.0.0" }),
  port: Schema.optionalWith(Schema.Int.pipe(Schema.between(0, 65535)), { default: () => 8080 }),
  /** Larger request bodies are refused with 413 before they are read. */
  maxBodyBytes: snakeWithDefault("max_body_bytes", PositiveInt, () => 4 * 1024 * 1024)
}) {}

/** How requests are recorded in the event log. */
export class EventsConfig extends Schema.Class<EventsConfig>("EventsConfig")({
  /**
   * What of the request body goes on `RequestReceived`: `hash` (default; a SHA-256 and the size),
   * `full` (the body itself — needed to retry dead letters, but prompts can hold private data),
   * or `none`.
   */
  storePayloads: snakeWithDefault(
    "store_payloads",
    Schema.Literal("full", "hash", "none"),
    () => "hash" as const
  )
}) {}

/** How the rate limiter behaves; the buckets live in Redis when `REDIS_URL` is set. */
export class LimitsConfig extends Schema.Class<LimitsConfig>("LimitsConfig")({
  /** Completion tokens reserved for a request that sets no `max_tokens`. */
  defaultMaxTokens: snakeWithDefault("default_max_tokens", PositiveInt, () => 4096),
  /**
   * When Redis cannot be reached: `fail_open` serves, each replica guarding with a local bucket
   * of the same limits; `fail_closed` answers 503.
   */
  redisFailure: snakeWithDefault(
    "redis_failure",
    Schema.Literal("fail_open", "fail_closed"),
    () => "fail_open" as const
  ),
  /** How long an admission may wait for Redis before the failure policy applies. */
  redisTimeoutMs: snakeWithDefault("redis_timeout_ms", PositiveInt, () => 250),
  /** Limits of keys created without any (a tenant has none until some are set). */
  keyDefaults: snake("key_defaults", LimitsInput)
}) {}

/** How usage is measured. */
export class MeteringConfig extends Schema.Class<MeteringConfig>("MeteringConfig")({
  /**
   * After a streaming client disconnects, how long to keep reading the backend's answer to learn
   * the real usage (else it is estimated).
   */
  drainAfterDisconnectMs: snakeWithDefault("drain_after_disconnect_ms", Schema.NonNegativeInt, () => 2_000)
}) {}

const uniqueNames = (models: ReadonlyArray<ModelConfig>) => {
  const seen = new Set<string>()
  for (const [i, model] of models.entries()) {
    if (seen.has(model.name)) {
      return { path: [i, "name"], message: `duplicate model name '${model.name}'` }
    }
    seen.add(model.name)
  }
  const ids = new Set<string>()
  for (const [i, model] of models.entries()) {
    for (const [j, backend] of model.backends.entries()) {
      if (ids.has(backend.id)) {
        return { path: [i, "backends", j, "id"], message: `duplicate backend id '${backend.id}'` }
      }
      ids.add(backend.id)
    }
  }
  return true
}

export class GatewayConfig extends Schema.Class<GatewayConfig>("GatewayConfig")({
  server: Schema.optionalWith(ServerConfig, { default: () => ServerConfig.make({}) }),
  timeouts: Schema.optionalWith(Timeouts, { default: () => Timeouts.make({}) }),
  events: Schema.optionalWith(EventsConfig, { default: () => EventsConfig.make({}) }),
  limits: Schema.optionalWith(LimitsConfig, { default: () => LimitsConfig.make({}) }),
  metering: Schema.optionalWith(MeteringConfig, { default: () => MeteringConfig.make({}) }),
  models: Schema.NonEmptyArray(ModelConfig).pipe(Schema.filter(uniqueNames))
}) {
  /** The timeouts that apply to one model: its overrides over the global ones. */
  timeoutsFor(model: ModelConfig): Timeouts {
    const o = model.timeouts
    return o === undefined
      ? this.timeouts
      : Timeouts.make({
          connectMs: o.connectMs ?? this.timeouts.connectMs,
          firstByteMs: o.firstByteMs ?? this.timeouts.firstByteMs,
          totalMs: o.totalMs ?? this.timeouts.totalMs
        })
  }
}
