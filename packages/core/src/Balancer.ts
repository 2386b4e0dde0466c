/**
 * Choosing a replica among the healthy replicas of a model, from each replica's load view.
 * `p2c` (power of two choices on in-flight × latency) is the default; `round_robin` and
 * `weighted` (smooth weighted round-robin, as nginx does it) are there for operators who want
 * them. Groundwork for the BackendPool: a pick runs per request, so it allocates nothing.
 */
import { GatewayConfig } from "@gateway/domain"
import { Clock, Effect } from "effect"

/** How a model's replica is chosen (`balancer` in the config); `p2c` by default. */
export const Strategy = GatewayConfig.BalancerStrategy
export type Strategy = GatewayConfig.BalancerStrategy

export const defaultStrategy: Strategy = "p2c"

/** What the balancer knows of one replica at the moment of a pick. */
export interface ReplicaLoad<Id extends string = string> {
  readonly id: Id
  /** Relative share for `weighted` (the config's `weight`, positive). */
  readonly weight: number
  /** Requests this gateway has on the replica now. */
  readonly inFlight: number
  /** Estimated time to first byte (an {@link Ewma}). */
  readonly ttftEwmaMs: number
  /** Estimated duration of a whole request (an {@link Ewma}). */
  readonly latencyEwmaMs: number
  /** vLLM's `num_requests_waiting`, when its metrics are scraped. */
  readonly queueDepth?: number | undefined
}

/**
 * Expected cost of sending one more request to a replica: (inFlight + 1 + queueDepth) × latency.
 * Requests waiting in the server's own queue count like ours in flight (a queue means the server
 * is saturated); the latency is floored at 1 ms so load still counts before any sample.
 */
export const cost = (replica: ReplicaLoad): number =>
  (replica.inFlight + 1 + (replica.queueDepth ?? 0)) * Math.max(replica.latencyEwmaMs, 1)

/**
 * Chooses a replica. `exclude` holds the replicas this request has already failed on: they are
 * skipped while any other candidate is left; when every candidate is excluded, the least costly
 * of them is chosen (a retry goes to another replica when there is one, else to the same one —
 * `RetryPolicy` bounds the attempts). `undefined` only when there are no candidates at all.
 */
export interface Balancer {
  readonly strategy: Strategy
  readonly pick: <Id extends string>(
    candidates: ReadonlyArray<ReplicaLoad<Id>>,
    exclude?: ReadonlySet<Id>
  ) => Effect.Effect<Id | undefined>
}

const eligibleCount = <Id extends string>(
  candidates: ReadonlyArray<ReplicaLoad<Id>>,
  exclude: ReadonlySet<Id> | undefined
): number => {
  if (exclude === undefined || exclude.size === 0) return candidates.length
  let n = 0
  for (const c of candidates) if (!exclude.has(c.id)) n++
  return n
}

/** The `nth` (0-based) candidate not excluded. */
const nthEligible = <Id extends string>(
  candidates: ReadonlyArray<ReplicaLoad<Id>>,
  exclude: ReadonlySet<Id> | undefined,
  nth: number
): ReplicaLoad<Id> => {
  if (exclude === undefined || exclude.size === 0) return candidates[nth]!
  let seen = 0
  for (const c of candidates) {
    if (exclude.has(c.id)) continue
    if (seen === nth) return c
    seen++
  }
  return candidates[candidates.length - 1]!
}

/** The least costly candidate (the first on a tie): the fallback when every one is excluded. */
export const leastLoaded = <Id extends string>(
  candidates: ReadonlyArray<ReplicaLoad<Id>>
): Id | undefined => {
  let best: ReplicaLoad<Id> | undefined
  let bestCost = Number.POSITIVE_INFINITY
  for (const c of candidates) {
    const k = cost(c)
    if (best === undefined || k < bestCost) {
      best = c
      bestCost = k
    }
  }
  return best?.id
}

/**
 * Power of two choices: two distinct candidates drawn by Effect's `Random` (so tests seed or
 * fix it), the less costly one kept (the first drawn on a tie).
 */
const pickP2c = <Id extends string>(
  candidates: ReadonlyArray<ReplicaLoad<Id>>,
  exclude?: ReadonlySet<Id>
): Effect.Effect<Id | undefined> => {
  const n = eligibleCount(candidates, exclude)
  if (n === 0) return Effect.succeed(leastLoaded(candidates))
  if (n === 1) return Effect.succeed(nthEligible(candidates, exclude, 0).id)
  if (n === 2) {
    // Both are drawn whatever the draw: the cheaper wins, and only a tie needs a coin.
    const a = nthEligible(candidates, exclude, 0)
    const b = nthEligible(candidates, exclude, 1)
    const ca = cost(a)
    const cb = cost(b)
    if (ca !== cb) return Effect.succeed(ca < cb ? a.id : b.id)
    return Effect.randomWith((random) =>
      Effect.map(random.nextIntBetween(0, 2), (i) => (i === 0 ? a.id : b.id))
    )
  }
  return Effect.randomWith((random) =>
    Effect.flatMap(random.nextIntBetween(0, n), (i) =>
      Effect.map(random.nextIntBetween(0, n - 1), (drawn) => {
        const a = nthEligible(candidates, exclude, i)
        const b = nthEligible(candidates, exclude, drawn >= i ? drawn + 1 : drawn)
        return cost(b) < cost(a) ? b.id : a.id
      })
    )
  )
}

/** A round-robin balancer: each pick takes the next candidate after the previous pick's index. */
const makeRoundRobin = (): Balancer => {
  // Owned by this balancer alone; a pick is one synchronous step, so it is never seen half-updated.
  let cursor = 0
  return {
    strategy: "round_robin",
    pick: (candidates, exclude) =>
      Effect.sync(() => {
        const n = candidates.length
        if (eligibleCount(candidates, exclude) === 0) return leastLoaded(candidates)
        for (let step = 0; step < n; step++) {
          const index = (cursor + step) % n
          const c = candidates[index]!
          if (exclude?.has(c.id)) continue
          cursor = (index + 1) % n
          return c.id
        }
        return undefined
      })
  }
}

/**
 * Smooth weighted round-robin (nginx): every pick adds each candidate's weight to its running
 * score, takes the highest and subtracts the total from it — picks in proportion to the weights,
 * interleaved (3:1 gives a a b a, not a a a b).
 */
const makeWeighted = (): Balancer => {
  // Running scores by replica id, owned by this balancer (see `makeRoundRobin`).
  const current = new Map<string, number>()
  return {
    strategy: "weighted",
    pick: (candidates, exclude) =>
      Effect.sync(() => {
        if (eligibleCount(candidates, exclude) === 0) return leastLoaded(candidates)
        let total = 0
        let best: (typeof candidates)[number] | undefined
        let bestScore = Number.NEGATIVE_INFINITY
        for (const c of candidates) {
          if (exclude?.has(c.id)) continue
          const weight = Math.max(c.weight, 0)
          const score = (current.get(c.id) ?? 0) + weight
          current.set(c.id, score)
          total += weight
          if (score > bestScore) {
            best = c
            bestScore = score
          }
        }
        if (best === undefined) return undefined
        current.set(best.id, bestScore - total)
        return best.id
      })
  }
}

/** A balancer with its own state (the round-robin cursor, the weighted scores); one per model. */
export const make = (strategy: Strategy = defaultStrategy): Effect.Effect<Balancer> =>
  Effect.sync(() => {
    switch (strategy) {
      case "p2c":
        return { strategy, pick: pickP2c }
      case "round_robin":
        return makeRoundRobin()
      case "weighted":
        return makeWeighted()
    }
  })

/**
 * A time-decayed exponentially weighted moving average of a latency. A sample's weight grows with
 * the time since the previous one (`halfLifeMs`): after one half-life it moves the average half
 * way. An estimate not refreshed for a while drifts back to the prior at the same rate, so a
 * replica that was slow once gets tried again. Immutable: the replica's actor keeps it in its state.
 */
export interface Ewma {
  /** The estimate as of `updatedAt`. */
  readonly value: number
  readonly updatedAt: number
  readonly samples: number
  readonly options: EwmaOptions
}

export interface EwmaOptions {
  /** Time after which a new sample (or the prior, without samples) has half of the weight. */
  readonly halfLifeMs: number
  /** The estimate before any sample; low enough that a new replica is tried. */
  readonly priorMs: number
  /** The least weight of a sample, so a burst of samples within a millisecond still counts. */
  readonly minWeight?: number | undefined
}

export const defaultEwmaOptions: EwmaOptions = { halfLifeMs: 10_000, priorMs: 100, minWeight: 0.1 }

const decay = (self: Ewma, now: number): number =>
  self.options.halfLifeMs > 0 ? 2 ** (-Math.max(0, now - self.updatedAt) / self.options.halfLifeMs) : 0

/** A new average at the prior. */
const makeEwma = (options: Partial<EwmaOptions> = {}, now = 0): Ewma => ({
  value: options.priorMs ?? defaultEwmaOptions.priorMs,
  updatedAt: now,
  samples: 0,
  options: { ...defaultEwmaOptions, ...options }
})

/** The estimate as of `now`: the last value, drifted back towards the prior by the time since. */
const valueAt = (self: Ewma, now: number): number => {
  const keep = decay(self, now)
  return self.options.priorMs + (self.value - self.options.priorMs) * keep
}

/** Adds a sample taken at `now`; the first sample replaces the prior outright. */
const observe = (self: Ewma, sample: number, now: number): Ewma => {
  if (self.samples === 0) return { value: sample, updatedAt: now, samples: 1, options: self.options }
  const keep = Math.min(decay(self, now), 1 - (self.options.minWeight ?? 0))
  return {
    value: self.value * keep + sample * (1 - keep),
    updatedAt: Math.max(now, self.updatedAt),
    samples: self.samples + 1,
    options: self.options
  }
}

/** Time-decayed EWMA operations; the `…Now` forms read Effect's `Clock` (TestClock in tests). */
export const Ewma = {
  make: makeEwma,
  makeNow: (options: Partial<EwmaOptions> = {}): Effect.Effect<Ewma> =>
    Effect.map(Clock.currentTimeMillis, (now) => makeEwma(options, now)),
  observe,
  observeNow: (self: Ewma, sample: number): Effect.Effect<Ewma> =>
    Effect.map(Clock.currentTimeMillis, (now) => observe(self, sample, now)),
  valueAt,
  valueNow: (self: Ewma): Effect.Effect<number> =>
    Effect.map(Clock.currentTimeMillis, (now) => valueAt(self, now))
} as const
