/**
 * When a failed backend attempt is tried again: exponential backoff with jitter, at most
 * `max_attempts` attempts in all, none started after the request's deadline, and only for errors
 * worth another attempt (connect errors, timeouts, 429, 5xx). A backend's `retry-after` is a lower
 * bound of the next delay. Groundwork for the BackendPool, which retries only before the first
 * byte has gone to the client.
 */
import { Errors, GatewayConfig } from "@gateway/domain"
import { Clock, Duration, Effect, Schedule } from "effect"

/** The `retry` section of the config file (snake_case there, camelCase here). */
export const RetryConfig = GatewayConfig.RetryConfig
export type RetryConfig = GatewayConfig.RetryConfig

export const defaultConfig: RetryConfig = new RetryConfig({})

/** Worth another attempt: a `BackendError` that is retryable (connect, timeout, 429, 5xx …). */
export const retryable = (error: unknown): boolean => error instanceof Errors.BackendError && error.retryable

/**
 * How long the backend asked us to wait (its `retry-after`: seconds, or an HTTP date), 0 when it
 * did not say or said something unreadable.
 */
export const retryAfterMs = (error: unknown, now: number): number => {
  if (!(error instanceof Errors.BackendError) || error.retryAfter === undefined) return 0
  const value = error.retryAfter.trim()
  if (/^\d+(\.\d+)?$/.test(value)) return Number(value) * 1000
  const at = Date.parse(value)
  return Number.isNaN(at) ? 0 : Math.max(0, at - now)
}

/**
 * The retry schedule of a request whose first attempt started at `startedAtMs` (Clock time). Its
 * input is the error of the failed attempt, its output the delay before the next one. A retry
 * whose start (backoff or `retry-after`, whichever is later) would fall after the deadline is not
 * made: the error goes to the caller at once instead of after a wait that cannot end in time.
 */
export const schedule = (
  config: RetryConfig,
  startedAtMs: number
): Schedule.Schedule<Duration.Duration, unknown> => {
  const ceiling = Duration.millis(config.maxDelayMs)
  const backoff = Schedule.exponential(Duration.millis(config.baseDelayMs), 2).pipe(
    Schedule.modifyDelay((_, delay) => Duration.min(delay, ceiling))
  )
  const deadlineAt = startedAtMs + config.deadlineMs
  return (config.jitter ? Schedule.jitteredWith(backoff, { min: 0.5, max: 1 }) : backoff).pipe(
    Schedule.passthrough,
    Schedule.modifyDelayEffect((error, delay) =>
      Effect.map(Clock.currentTimeMillis, (now) =>
        Duration.max(delay, Duration.millis(retryAfterMs(error, now)))
      )
    ),
    Schedule.delays,
    Schedule.checkEffect((_, delay) =>
      Effect.map(Clock.currentTimeMillis, (now) => now + Duration.toMillis(delay) <= deadlineAt)
    ),
    Schedule.intersect(Schedule.recurs(config.maxAttempts - 1)),
    Schedule.map(([delay]) => delay),
    Schedule.whileInput(retryable)
  )
}

/** The retry schedule of a request starting now: its deadline counts from this moment. */
export const make = (
  config: RetryConfig = defaultConfig
): Effect.Effect<Schedule.Schedule<Duration.Duration, unknown>> =>
  Effect.map(Clock.currentTimeMillis, (now) => schedule(config, now))

/** Runs `self`, retrying it by the policy of `config`; the deadline counts from the first attempt. */
export const retry =
  (config: RetryConfig = defaultConfig) =>
  <A, E, R>(self: Effect.Effect<A, E, R>): Effect.Effect<A, E, R> =>
    Effect.flatMap(make(config), (policy) => Effect.retry(self, policy))
