/**
 * The gateway's config file (JSON or YAML): models, their backend replicas, limits and timeouts.
 * Keys are snake_case in the file and camelCase in code; decoding errors name the bad field.
 */
import { Schema } from "effect"
import { BackendId, ModelName } from "./Ids.js"
import { RoutingConfig } from "./Routing.js"
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

/**
 * Per-attempt timeouts; a model may override any of them. Before the first byte of the answer
 * has gone to the client a timeout is a retryable failure; after it, a clean stream error.
 */
export class Timeouts extends Schema.Class<Timeouts>("Timeouts")({
  connectMs: snakeWithDefault("connect_ms", PositiveInt, () => 5_000),
  /**
   * Time to first token: until the first event of a streamed answer, or the response of a whole
   * one (a server sends that only once it has generated everything).
   */
  firstByteMs: snakeWithDefault("first_byte_ms", PositiveInt, () => 60_000),
  /** The longest silence between two chunks of a streamed answer. */
  idleMs: snakeWithDefault("idle_ms", PositiveInt, () => 30_000),
  /** The whole attempt, body included. */
  totalMs: snakeWithDefault("total_ms", PositiveInt, () => 600_000)
}) {}

const TimeoutsOverride = Schema.Struct({
  connectMs: snake("connect_ms", PositiveInt),
  firstByteMs: snake("first_byte_ms", PositiveInt),
  idleMs: snake("idle_ms", PositiveInt),
  totalMs: snake("total_ms", PositiveInt)
})

const NonNegativeInt = Schema.Int.pipe(Schema.nonNegative())
const Rate = Schema.Number.pipe(Schema.greaterThan(0), Schema.lessThanOrEqualTo(1))
const Factor = Schema.Number.pipe(Schema.greaterThanOrEqualTo(1), Schema.finite())

/** How a model's replica is chosen: `p2c` (power of two choices on load × latency) by default. */
export const BalancerStrategy = Schema.Literal("p2c", "round_robin", "weighted")
export type BalancerStrategy = typeof BalancerStrategy.Type

/** The `circuit_breaker` section (of `pool`, or of one model over it); every key has a default. */
export class CircuitBreakerConfig extends Schema.Class<CircuitBreakerConfig>("CircuitBreakerConfig")({
  /** Opens after this many failures in a row. */
  consecutiveFailures: snakeWithDefault("consecutive_failures", PositiveInt, () => 5),
  /** Opens when this share of the calls in the window failed (0 < rate ≤ 1) … */
  failureRate: snakeWithDefault("failure_rate", Rate, () => 0.5),
  /** … over the last `window_ms` … */
  windowMs: snakeWithDefault("window_ms", PositiveInt, () => 10_000),
  /** … once the window holds at least this many calls. */
  minimumRequests: snakeWithDefault("minimum_requests", PositiveInt, () => 20),
  /** How long the first open lasts. */
  cooldownMs: snakeWithDefault("cooldown_ms", PositiveInt, () => 30_000),
  /** Each re-open without closing in between multiplies the cooldown by this (1: no growth) … */
  cooldownFactor: snakeWithDefault("cooldown_factor", Factor, () => 2),
  /** … up to this. */
  maxCooldownMs: snakeWithDefault("max_cooldown_ms", PositiveInt, () => 300_000),
  /** Calls let through at once while half-open. */
  halfOpenProbes: snakeWithDefault("half_open_probes", PositiveInt, () => 1),
  /** Successful probes that close the breaker again. */
  successesToClose: snakeWithDefault("successes_to_close", PositiveInt, () => 2)
}) {}

const CircuitBreakerOverride = Schema.Struct({
  consecutiveFailures: snake("consecutive_failures", PositiveInt),
  failureRate: snake("failure_rate", Rate),
  windowMs: snake("window_ms", PositiveInt),
  minimumRequests: snake("minimum_requests", PositiveInt),
  cooldownMs: snake("cooldown_ms", PositiveInt),
  cooldownFactor: snake("cooldown_factor", Factor),
  maxCooldownMs: snake("max_cooldown_ms", PositiveInt),
  halfOpenProbes: snake("half_open_probes", PositiveInt),
  successesToClose: snake("successes_to_close", PositiveInt)
})

/** The `retry` section: when a failed attempt is tried again (before the answer's first byte). */
export class RetryConfig extends Schema.Class<RetryConfig>("RetryConfig")({
  /** Attempts on one model, the first included; 1 means no retry (fallback models get their own). */
  maxAttempts: snakeWithDefault("max_attempts", PositiveInt, () => 3),
  /** Delay before the first retry; doubled for each one after it. */
  baseDelayMs: snakeWithDefault("base_delay_ms", NonNegativeInt, () => 50),
  /** Ceiling of the backoff (a backend's `retry-after` may ask for more). */
  maxDelayMs: snakeWithDefault("max_delay_ms", NonNegativeInt, () => 2_000),
  /** From the start of the request: no retry or fallback begins after it. */
  deadlineMs: snakeWithDefault("deadline_ms", PositiveInt, () => 30_000),
  /** Each delay is drawn uniformly from [½, 1] × the backoff, so retries of many requests spread out. */
  jitter: snakeWithDefault("jitter", Schema.Boolean, () => true)
}) {}

const RetryOverride = Schema.Struct({
  maxAttempts: snake("max_attempts", PositiveInt),
  baseDelayMs: snake("base_delay_ms", NonNegativeInt),
  maxDelayMs: snake("max_delay_ms", NonNegativeInt),
  deadlineMs: snake("deadline_ms", PositiveInt),
  jitter: snake("jitter", Schema.Boolean)
})

const UrlPath = Schema.String.pipe(
  Schema.pattern(/^\/[^\s]*$/, { message: () => "must be a path starting with '/'" })
)

/**
 * The `health` section: active checks (a `GET` of `path` every `interval_ms`) and passive ones
 * (requests that fail to connect or time out). An ejected replica gets no traffic; it is probed
 * every `interval_ms` and restored after `healthy_threshold` good probes in a row.
 */
export class HealthConfig extends Schema.Class<HealthConfig>("HealthConfig")({
  /** `GET` this on the replica's origin (`/health` for vLLM and TGI, `/v1/models` elsewhere). */
  path: snakeWithDefault("path", UrlPath, () => "/health"),
  /** Check healthy replicas too; ejected ones are always probed. */
  active: snakeWithDefault("active", Schema.Boolean, () => true),
  intervalMs: snakeWithDefault("interval_ms", PositiveInt, () => 5_000),
  timeoutMs: snakeWithDefault("timeout_ms", PositiveInt, () => 2_000),
  /** Failed checks in a row that eject a replica. */
  unhealthyThreshold: snakeWithDefault("unhealthy_threshold", PositiveInt, () => 2),
  /** Good probes in a row that restore it. */
  healthyThreshold: snakeWithDefault("healthy_threshold", PositiveInt, () => 2),
  /** Requests in a row that could not connect or timed out, that eject a replica (0: never). */
  ejectAfterFailures: snakeWithDefault("eject_after_failures", NonNegativeInt, () => 3)
}) {}

const HealthOverride = Schema.Struct({
  path: snake("path", UrlPath),
  active: snake("active", Schema.Boolean),
  intervalMs: snake("interval_ms", PositiveInt),
  timeoutMs: snake("timeout_ms", PositiveInt),
  unhealthyThreshold: snake("unhealthy_threshold", PositiveInt),
  healthyThreshold: snake("healthy_threshold", PositiveInt),
  ejectAfterFailures: snake("eject_after_failures", NonNegativeInt)
})

/**
 * The `queue_metrics` section: scrape a vLLM-style `/metrics` (`vllm:num_requests_waiting`,
 * `vllm:num_requests_running`) so the balancer counts the server's own queue. Off unless set.
 */
export class QueueMetricsConfig extends Schema.Class<QueueMetricsConfig>("QueueMetricsConfig")({
  path: snakeWithDefault("path", UrlPath, () => "/metrics"),
  intervalMs: snakeWithDefault("interval_ms", PositiveInt, () => 2_000),
  timeoutMs: snakeWithDefault("timeout_ms", PositiveInt, () => 1_000)
}) {}

/** How every model's replicas are balanced, checked and retried, unless the model says otherwise. */
export class PoolConfig extends Schema.Class<PoolConfig>("PoolConfig")({
  balancer: Schema.optionalWith(BalancerStrategy, { default: () => "p2c" as const }),
  circuitBreaker: snakeWithDefault("circuit_breaker", CircuitBreakerConfig, () =>
    CircuitBreakerConfig.make({})
  ),
  retry: Schema.optionalWith(RetryConfig, { default: () => RetryConfig.make({}) }),
  health: Schema.optionalWith(HealthConfig, { default: () => HealthConfig.make({}) }),
  queueMetrics: snake("queue_metrics", QueueMetricsConfig)
}) {}

/** The pool settings that apply to one model: its own keys over the `pool` section's. */
export interface ModelPolicy {
  readonly balancer: BalancerStrategy
  readonly circuitBreaker: CircuitBreakerConfig
  readonly retry: RetryConfig
  readonly health: HealthConfig
  readonly queueMetrics: QueueMetricsConfig | undefined
  /** Models to try, in order, when none of this model's replicas can answer. */
  readonly fallbacks: ReadonlyArray<string>
}

/** `base` with the keys `override` sets (absent keys keep `base`'s value). */
const overlay = <A extends object>(
  base: A,
  override: { readonly [K in keyof A]?: A[K] | undefined } | undefined,
  make: (a: A) => A
): A => {
  if (override === undefined) return base
  const merged: Record<string, unknown> = { ...(base as Record<string, unknown>) }
  for (const [key, value] of Object.entries(override)) if (value !== undefined) merged[key] = value
  return make(merged as A)
}

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
  pricing: Schema.optional(ModelPricing),
  /** Models to fall back to, in order, when none of this one's replicas can answer. */
  fallbacks: Schema.optionalWith(Schema.Array(ModelName), { default: () => [] }),
  balancer: Schema.optional(BalancerStrategy),
  circuitBreaker: snake("circuit_breaker", CircuitBreakerOverride),
  retry: Schema.optional(RetryOverride),
  health: Schema.optional(HealthOverride),
  queueMetrics: snake("queue_metrics", QueueMetricsConfig)
}) {}

export class ServerConfig extends Schema.Class<ServerConfig>("ServerConfig")({
  host: Schema.optionalWith(Schema.String, { default: () => "0.0.0.0" }),
  port: Schema.optionalWith(Schema.Int.pipe(Schema.between(0, 65535)), { default: () => 8080 }),
  /** Larger request bodies are refused with 413 before they are read. */
  maxBodyBytes: snakeWithDefault("max_body_bytes", PositiveInt, () => 4 * 1024 * 1024),
  /**
   * A second port serving only `GET /metrics`, without auth, for Prometheus inside the cluster
   * (the API port's `/metrics` needs the admin key). Off when absent.
   */
  metricsPort: snake("metrics_port", Schema.Int.pipe(Schema.between(0, 65535))),
  /**
   * After SIGTERM: how long in-flight requests (streams included) may take to finish before the
   * gateway closes them and exits. Keep it below the orchestrator's grace period.
   */
  shutdownGraceMs: snakeWithDefault("shutdown_grace_ms", PositiveInt, () => 25_000)
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
  for (const [i, model] of models.entries()) {
    for (const [j, fallback] of model.fallbacks.entries()) {
      if (fallback === model.name) {
        return { path: [i, "fallbacks", j], message: `model '${model.name}' cannot fall back to itself` }
      }
      if (!seen.has(fallback)) {
        return { path: [i, "fallbacks", j], message: `unknown model '${fallback}'` }
      }
    }
  }
  return true
}

/** Policies name models that exist, and no policy is named like a model (or another policy). */
const routesToModels = (config: {
  readonly routing: RoutingConfig
  readonly models: ReadonlyArray<ModelConfig>
}) => {
  const models = new Set(config.models.map((m) => m.name as string))
  const names = new Set<string>()
  for (const [i, policy] of config.routing.policies.entries()) {
    const at = ["routing", "policies", i]
    if (models.has(policy.name))
      return { path: [...at, "name"], message: `'${policy.name}' is a model's name` }
    if (names.has(policy.name)) return { path: [...at, "name"], message: `duplicate policy '${policy.name}'` }
    names.add(policy.name)
    for (const [tier, model] of Object.entries(policy.tiers)) {
      if (!models.has(model)) return { path: [...at, "tiers", tier], message: `unknown model '${model}'` }
    }
    for (const [j, model] of policy.observe.entries()) {
      if (!models.has(model)) return { path: [...at, "observe", j], message: `unknown model '${model}'` }
    }
  }
  const second = config.routing.classifier.secondOpinion
  if (second !== undefined && !models.has(second.model)) {
    return {
      path: ["routing", "classifier", "second_opinion", "model"],
      message: `unknown model '${second.model}'`
    }
  }
  return true
}

export class GatewayConfig extends Schema.Class<GatewayConfig>("GatewayConfig")(
  Schema.Struct({
    server: Schema.optionalWith(ServerConfig, { default: () => ServerConfig.make({}) }),
    timeouts: Schema.optionalWith(Timeouts, { default: () => Timeouts.make({}) }),
    events: Schema.optionalWith(EventsConfig, { default: () => EventsConfig.make({}) }),
    limits: Schema.optionalWith(LimitsConfig, { default: () => LimitsConfig.make({}) }),
    metering: Schema.optionalWith(MeteringConfig, { default: () => MeteringConfig.make({}) }),
    pool: Schema.optionalWith(PoolConfig, { default: () => PoolConfig.make({}) }),
    routing: Schema.optionalWith(RoutingConfig, { default: () => RoutingConfig.make({}) }),
    models: Schema.NonEmptyArray(ModelConfig).pipe(Schema.filter(uniqueNames))
  }).pipe(Schema.filter(routesToModels))
) {
  /** The timeouts that apply to one model: its overrides over the global ones. */
  timeoutsFor(model: ModelConfig): Timeouts {
    const o = model.timeouts
    return o === undefined
      ? this.timeouts
      : Timeouts.make({
          connectMs: o.connectMs ?? this.timeouts.connectMs,
          firstByteMs: o.firstByteMs ?? this.timeouts.firstByteMs,
          idleMs: o.idleMs ?? this.timeouts.idleMs,
          totalMs: o.totalMs ?? this.timeouts.totalMs
        })
  }

  /** The balancer, breaker, retry and health settings of one model: its keys over `pool`'s. */
  policyFor(model: ModelConfig): ModelPolicy {
    const pool = this.pool
    return {
      balancer: model.balancer ?? pool.balancer,
      circuitBreaker: overlay(pool.circuitBreaker, model.circuitBreaker, (c) => CircuitBreakerConfig.make(c)),
      retry: overlay(pool.retry, model.retry, (c) => RetryConfig.make(c)),
      health: overlay(pool.health, model.health, (c) => HealthConfig.make(c)),
      queueMetrics: model.queueMetrics ?? pool.queueMetrics,
      fallbacks: model.fallbacks
    }
  }
}
