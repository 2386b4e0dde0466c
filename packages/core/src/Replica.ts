/**
 * One backend replica as an actor: its in-flight count, latency estimates (EWMA of time to first
 * token and of whole requests), health and circuit breaker belong to this object alone and change
 * only through its methods, each one synchronous step (so atomic). Its fiber, forked by the pool
 * into the pool's scope, runs the health checks and the queue-metrics scrape and sends their
 * results to the same methods. Ejections, restorations and breaker transitions go to `journal`.
 */
import { BackendEvents, type Errors, type GatewayConfig, type Ids } from "@gateway/domain"
import { Duration, Effect, Either, Schedule } from "effect"
import { Ewma, type Ewma as EwmaState, type ReplicaLoad } from "./Balancer.js"
import * as CircuitBreaker from "./CircuitBreaker.js"
import type { Target } from "./Models.js"
import type { Upstream } from "./Upstream.js"

export type Health = "healthy" | "ejected"

/** What `GET /admin/backends` shows of one replica. */
export interface Status {
  readonly id: string
  readonly model: string
  readonly url: string
  readonly weight: number
  readonly health: Health
  /** Epoch milliseconds of the ejection, while ejected. */
  readonly ejectedAt: number | null
  readonly breaker: CircuitBreaker.Snapshot
  readonly inFlight: number
  /** Estimates as the balancer sees them now (they drift back to the prior without samples). */
  readonly ttftMs: number
  readonly latencyMs: number
  /** What the balancer weighs: the latency with failures counted as slow answers. */
  readonly balancerLatencyMs: number
  /** From the backend's own metrics (`queue_metrics`), when scraped. */
  readonly queueWaiting: number | null
  readonly queueRunning: number | null
  readonly requests: number
  readonly failures: number
  readonly lastError: string | null
  /** The last active check or probe: when, and whether it passed. */
  readonly lastCheckAt: number | null
  readonly lastCheckOk: boolean | null
}

/**
 * The right to make one call, from `Replica.begin`. Complete it once: `succeed` (the answer was
 * whole), `fail` (the backend's fault), or `release` (the client left; says nothing about the
 * backend). Later completions are ignored.
 */
export interface Lease {
  /** The first token arrived (a stream's first event): its time feeds the TTFT estimate. */
  readonly firstToken: () => void
  readonly succeed: Effect.Effect<void>
  readonly fail: (error: Errors.BackendError) => Effect.Effect<void>
  readonly release: Effect.Effect<void>
}

/** Where a replica's events go (the pool records them on `backend-<id>`). */
export type Journal = (backend: string, event: BackendEvents.BackendEvent) => void

export interface Options {
  readonly target: Target
  readonly policy: GatewayConfig.ModelPolicy
  readonly journal: Journal
  /** Names this gateway instance on the events it records. */
  readonly gateway: string
}

/**
 * A failed call enters the balancer's estimate as this many times the latency of the replica's
 * answers (or its own time, if longer): bounded, so a run of failures cannot compound.
 */
const FAILURE_PENALTY = 5

/** Failures that say the replica is gone (not merely unhappy with one request): passive ejection. */
const unreachable = (error: Errors.BackendError) => error.reason === "Connect" || error.reason === "Timeout"

/**
 * The sum of a metric's samples in Prometheus text (`name{labels} value [timestamp]`, fields
 * separated by spaces or tabs), or `undefined` when it has none.
 */
export const metricSum = (text: string, name: string): number | undefined => {
  let sum: number | undefined
  let at = text.indexOf(name)
  while (at !== -1) {
    const lineStart = at === 0 || text[at - 1] === "\n"
    const next = text[at + name.length]
    if (lineStart && (next === "{" || next === " " || next === "\t")) {
      const end = text.indexOf("\n", at)
      let rest = text.slice(at + name.length, end === -1 ? undefined : end)
      // Label values may hold spaces: the value starts after the closing brace.
      if (next === "{") rest = rest.slice(rest.lastIndexOf("}") + 1)
      const value = Number(rest.trim().split(/[ \t]+/)[0])
      if (Number.isFinite(value)) sum = (sum ?? 0) + value
    }
    at = text.indexOf(name, at + name.length)
  }
  return sum
}

export class Replica implements ReplicaLoad {
  readonly id: string
  readonly model: Ids.ModelName
  readonly weight: number
  readonly target: Target
  readonly breaker: CircuitBreaker.CircuitBreaker
  private readonly now: () => number
  private readonly options: Options
  private inFlightCount = 0
  private ttft: EwmaState
  private latency: EwmaState
  /** `latency` with failures as penalty samples: what the balancer weighs. */
  private weighed: EwmaState
  private health: Health = "healthy"
  private ejectedAt: number | null = null
  /** Requests in a row that could not connect or timed out (passive health). */
  private unreachableInARow = 0
  /** Active checks in a row that failed (healthy) or passed (ejected). */
  private checksInARow = 0
  private queueWaiting: number | undefined
  private queueRunning: number | undefined
  private requests = 0
  private failures = 0
  private lastError: string | null = null
  private lastCheckAt: number | null = null
  private lastCheckOk: boolean | null = null

  private constructor(options: Options, breaker: CircuitBreaker.CircuitBreaker, now: () => number) {
    this.options = options
    this.id = options.target.backend.id
    this.model = options.target.model.name
    this.weight = options.target.backend.weight
    this.target = options.target
    this.breaker = breaker
    this.now = now
    this.ttft = Ewma.make({}, now())
    this.latency = Ewma.make({}, now())
    this.weighed = this.latency
  }

  /** A replica with a closed breaker, healthy until its checks say otherwise. */
  static make(options: Options): Effect.Effect<Replica> {
    return Effect.gen(function* () {
      const clock = yield* Effect.clock
      const { target, policy, journal, gateway } = options
      const common = { model: target.model.name, gateway }
      const breaker = yield* CircuitBreaker.make({
        backend: target.backend.id,
        config: policy.circuitBreaker,
        onTransition: (t) =>
          Effect.sync(() => {
            const event = transitionEvent(t, common)
            journal(target.backend.id, event)
          }).pipe(
            Effect.zipRight(
              (t.to === "closed" ? Effect.logInfo : Effect.logWarning)(
                `circuit ${t.to.replace("_", "-")}`
              ).pipe(
                Effect.annotateLogs({
                  backend: t.backend,
                  model: target.model.name,
                  from: t.from,
                  cause: t.reason._tag
                })
              )
            )
          )
      })
      return new Replica(options, breaker, () => clock.unsafeCurrentTimeMillis())
    })
  }

  // The balancer's view (`ReplicaLoad`).
  get inFlight(): number {
    return this.inFlightCount
  }
  get ttftEwmaMs(): number {
    return Ewma.valueAt(this.ttft, this.now())
  }
  get latencyEwmaMs(): number {
    return Ewma.valueAt(this.weighed, this.now())
  }
  get queueDepth(): number | undefined {
    return this.queueWaiting
  }

  /** May get traffic now: not ejected, and its breaker would let a call through. */
  available(): boolean {
    return this.health === "healthy" && this.breaker.unsafeAvailable()
  }

  /** Not ejected (its breaker may still refuse). */
  get healthy(): boolean {
    return this.health === "healthy"
  }

  /** Starts a call: a breaker permit and one more in flight, or `BreakerOpen` without a call. */
  begin(): Effect.Effect<Lease, CircuitBreaker.BreakerOpen> {
    return Effect.map(this.breaker.acquire, (permit) => {
      const startedAt = this.now()
      this.inFlightCount++
      this.requests++
      let done = false
      let firstTokenAt: number | undefined
      const end = () => {
        if (done) return false
        done = true
        this.inFlightCount--
        return true
      }
      return {
        firstToken: () => {
          if (firstTokenAt !== undefined || done) return
          firstTokenAt = this.now()
          this.ttft = Ewma.observe(this.ttft, firstTokenAt - startedAt, firstTokenAt)
        },
        succeed: Effect.suspend(() => {
          if (!end()) return Effect.void
          const now = this.now()
          this.latency = Ewma.observe(this.latency, now - startedAt, now)
          this.weighed = Ewma.observe(this.weighed, now - startedAt, now)
          this.unreachableInARow = 0
          return permit.succeed
        }),
        fail: (error) =>
          Effect.suspend(() => {
            if (!end()) return Effect.void
            // A refusal the client caused (400, 401 …) says the replica is up and answering.
            if (!error.retryable) {
              this.unreachableInARow = 0
              return permit.succeed
            }
            this.failures++
            this.lastError = `${error.reason}: ${error.detail}`
            // A failure counts as a slow answer: a replica that fails fast must not look fast
            // (and free) to the balancer, which would then send it most of the traffic.
            const now = this.now()
            const penalty = Math.max(now - startedAt, FAILURE_PENALTY * Ewma.valueAt(this.latency, now))
            this.weighed = Ewma.observe(this.weighed, penalty, now)
            if (unreachable(error)) {
              this.unreachableInARow++
              const threshold = this.options.policy.health.ejectAfterFailures
              if (threshold > 0 && this.unreachableInARow >= threshold && this.health === "healthy") {
                this.eject("request_failures", this.unreachableInARow, this.lastError)
                return Effect.zipRight(
                  permit.fail,
                  Effect.logWarning("backend ejected").pipe(
                    Effect.annotateLogs({
                      backend: this.id,
                      model: this.model,
                      cause: "request_failures",
                      detail: this.lastError
                    })
                  )
                )
              }
            } else {
              this.unreachableInARow = 0
            }
            return permit.fail
          }),
        release: Effect.suspend(() => (end() ? permit.release : Effect.void))
      }
    })
  }

  private eject(cause: BackendEvents.EjectionCause, failures: number, detail: string): void {
    this.health = "ejected"
    this.ejectedAt = this.now()
    this.checksInARow = 0
    this.options.journal(
      this.id,
      new BackendEvents.BackendEjected({
        model: this.model,
        gateway: this.options.gateway,
        cause,
        failures,
        detail
      })
    )
  }

  /** The result of one active check or probe of the health path. */
  checked(ok: boolean, detail: string): "ejected" | "restored" | undefined {
    const now = this.now()
    this.lastCheckAt = now
    this.lastCheckOk = ok
    const { healthyThreshold, unhealthyThreshold } = this.options.policy.health
    if (this.health === "healthy") {
      this.checksInARow = ok ? 0 : this.checksInARow + 1
      if (this.checksInARow >= unhealthyThreshold) {
        this.lastError = detail
        this.eject("health_check", this.checksInARow, detail)
        return "ejected"
      }
      return undefined
    }
    this.checksInARow = ok ? this.checksInARow + 1 : 0
    if (this.checksInARow < healthyThreshold) return undefined
    const ejectedForMs = now - (this.ejectedAt ?? now)
    this.options.journal(
      this.id,
      new BackendEvents.BackendRestored({
        model: this.model,
        gateway: this.options.gateway,
        probes: this.checksInARow,
        ejectedForMs
      })
    )
    this.health = "healthy"
    this.ejectedAt = null
    // Proven by its probes: the failures that ejected it no longer weigh against it.
    this.weighed = this.latency
    this.checksInARow = 0
    this.unreachableInARow = 0
    return "restored"
  }

  /** The backend's own queue, from its metrics. */
  scraped(waiting: number | undefined, running: number | undefined): void {
    this.queueWaiting = waiting
    this.queueRunning = running
  }

  get status(): Effect.Effect<Status> {
    return Effect.map(this.breaker.state, (breaker) => ({
      id: this.id,
      model: this.model,
      url: this.target.backend.url,
      weight: this.weight,
      health: this.health,
      ejectedAt: this.ejectedAt,
      breaker,
      inFlight: this.inFlightCount,
      ttftMs: Math.round(this.ttftEwmaMs * 100) / 100,
      latencyMs: Math.round(Ewma.valueAt(this.latency, this.now()) * 100) / 100,
      balancerLatencyMs: Math.round(this.latencyEwmaMs * 100) / 100,
      queueWaiting: this.queueWaiting ?? null,
      queueRunning: this.queueRunning ?? null,
      requests: this.requests,
      failures: this.failures,
      lastError: this.lastError,
      lastCheckAt: this.lastCheckAt,
      lastCheckOk: this.lastCheckOk
    }))
  }

  /**
   * The replica's own fiber: a health check every `interval_ms` (ejected replicas are always
   * probed, healthy ones when `active`), and the metrics scrape when `queue_metrics` is set.
   * Runs until interrupted with the pool's scope.
   */
  run(upstream: Upstream["Type"]): Effect.Effect<void> {
    const { health, queueMetrics } = this.options.policy
    const check = Effect.suspend(() => {
      if (this.health === "healthy" && !health.active) return Effect.void
      return upstream.probe(this.target, health.path, health.timeoutMs).pipe(
        Effect.either,
        Effect.flatMap((result) => {
          const ok = Either.isRight(result) && result.right.status >= 200 && result.right.status < 300
          const detail = Either.isLeft(result)
            ? `${result.left.reason}: ${result.left.detail}`
            : `GET ${health.path}: HTTP ${result.right.status}`
          const change = this.checked(ok, detail)
          if (change === "ejected") {
            return Effect.logWarning("backend ejected").pipe(
              Effect.annotateLogs({ backend: this.id, model: this.model, cause: "health_check", detail })
            )
          }
          if (change === "restored") {
            return Effect.logInfo("backend restored").pipe(
              Effect.annotateLogs({ backend: this.id, model: this.model })
            )
          }
          return Effect.void
        })
      )
    })
    const checks = Effect.repeat(check, Schedule.spaced(Duration.millis(health.intervalMs))).pipe(
      Effect.delay(Duration.millis(health.intervalMs))
    )
    if (queueMetrics === undefined) return Effect.asVoid(checks)
    const scrape = upstream.probe(this.target, queueMetrics.path, queueMetrics.timeoutMs).pipe(
      Effect.match({
        onFailure: () => this.scraped(undefined, undefined),
        onSuccess: (result) =>
          result.status === 200
            ? this.scraped(
                metricSum(result.body, "vllm:num_requests_waiting"),
                metricSum(result.body, "vllm:num_requests_running")
              )
            : this.scraped(undefined, undefined)
      })
    )
    const scrapes = Effect.repeat(scrape, Schedule.spaced(Duration.millis(queueMetrics.intervalMs)))
    return Effect.asVoid(Effect.all([checks, scrapes], { concurrency: 2, discard: true }))
  }
}

/** The breaker's transition as the event on `backend-<id>`. */
const transitionEvent = (
  t: CircuitBreaker.Transition,
  common: { readonly model: Ids.ModelName; readonly gateway: string }
): BackendEvents.BackendEvent => {
  const r = t.reason
  switch (r._tag) {
    case "ConsecutiveFailures":
      return new BackendEvents.CircuitOpened({
        ...common,
        from: t.from === "half_open" ? "half_open" : "closed",
        cause: "consecutive_failures",
        failures: r.failures,
        cooldownMs: r.cooldownMs
      })
    case "FailureRate":
      return new BackendEvents.CircuitOpened({
        ...common,
        from: "closed",
        cause: "failure_rate",
        failures: r.failures,
        requests: r.requests,
        cooldownMs: r.cooldownMs
      })
    case "ProbeFailed":
      return new BackendEvents.CircuitOpened({
        ...common,
        from: "half_open",
        cause: "probe_failed",
        failures: 1,
        cooldownMs: r.cooldownMs
      })
    case "CooldownElapsed":
      return new BackendEvents.CircuitHalfOpened({ ...common })
    case "ProbesSucceeded":
      return new BackendEvents.CircuitClosed({ ...common, successes: r.successes })
  }
}
