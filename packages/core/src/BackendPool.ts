/**
 * The backend pool: every configured replica as a `Replica` actor, grouped by model with the
 * model's balancer. A pick chooses among the replicas that may get traffic (healthy, breaker not
 * open); each replica's health checks run on its own fiber in the pool's scope.
 */
import type { GatewayConfig } from "@gateway/domain"
import { Context, Effect, Layer } from "effect"
import { BackendJournal } from "./BackendJournal.js"
import * as Balancer from "./Balancer.js"
import { type Entry, Models } from "./Models.js"
import { Replica, type Status } from "./Replica.js"
import { Upstream } from "./Upstream.js"

/** One model's replicas and how a replica is chosen among them. */
export interface ModelPool {
  readonly name: string
  readonly entry: Entry
  readonly policy: GatewayConfig.ModelPolicy
  readonly timeouts: GatewayConfig.Timeouts
  readonly replicas: ReadonlyArray<Replica>
  /**
   * A replica for the next attempt among those that may get traffic, avoiding `tried` while
   * another is left; `undefined` when none may get traffic. With `panic`, ejected replicas are
   * candidates too (every one is ejected and nothing else can answer: the checks may be wrong).
   */
  readonly pick: (tried?: ReadonlySet<string>, panic?: boolean) => Effect.Effect<Replica | undefined>
  /** Each replica's state, for the record of why none could be tried (`a: circuit open; b: ejected`). */
  readonly unavailable: () => string
  /** The soonest an open breaker of this model half-opens, in ms (undefined: none is open). */
  readonly retryAfterMs: () => number | undefined
}

export class BackendPool extends Context.Tag("@gateway/core/BackendPool")<
  BackendPool,
  {
    readonly model: (name: string) => ModelPool | undefined
    /** Every replica's state, in config order. */
    readonly status: Effect.Effect<ReadonlyArray<Status>>
  }
>() {}

const makeModelPool = (
  entry: Entry,
  replicas: ReadonlyArray<Replica>,
  balancer: Balancer.Balancer
): ModelPool => {
  const pick = (tried?: ReadonlySet<string>, panic = false): Effect.Effect<Replica | undefined> =>
    Effect.suspend(() => {
      let candidates: ReadonlyArray<Replica> = replicas
      let all = true
      for (const r of replicas) {
        if (!(panic ? r.breaker.unsafeAvailable() : r.available())) {
          all = false
          break
        }
      }
      if (!all) candidates = replicas.filter((r) => (panic ? r.breaker.unsafeAvailable() : r.available()))
      if (candidates.length === 0) return Effect.succeed(undefined)
      if (candidates.length === 1) return Effect.succeed(candidates[0])
      return Effect.map(balancer.pick(candidates, tried), (id) => candidates.find((r) => r.id === id))
    })
  const unavailable = () =>
    replicas
      .map(
        (r) =>
          `${r.id}: ${r.healthy ? (r.breaker.unsafeAvailable() ? "available" : "circuit open") : "ejected"}`
      )
      .join("; ")
  const retryAfterMs = () => {
    let soonest: number | undefined
    for (const r of replicas) {
      const ms = r.breaker.unsafeRetryAfterMs()
      if (ms > 0 && (soonest === undefined || ms < soonest)) soonest = ms
    }
    return soonest
  }
  return {
    name: entry.config.name,
    entry,
    policy: entry.policy,
    timeouts: entry.timeouts,
    replicas,
    pick,
    unavailable,
    retryAfterMs
  }
}

/**
 * The pool of every configured model; `gateway` names this instance on the events it records.
 * The replicas' fibers stop with the layer.
 */
export const layer = (options: {
  readonly gateway: string
}): Layer.Layer<BackendPool, never, Models | Upstream | BackendJournal> =>
  Layer.scoped(
    BackendPool,
    Effect.gen(function* () {
      const models = yield* Models
      const upstream = yield* Upstream
      const journal = yield* BackendJournal
      const pools = new Map<string, ModelPool>()
      const all: Array<Replica> = []
      for (const entry of models.entries.values()) {
        const replicas: Array<Replica> = []
        for (const target of entry.targets) {
          const replica = yield* Replica.make({
            target,
            policy: entry.policy,
            journal: journal.record,
            gateway: options.gateway
          })
          replicas.push(replica)
          all.push(replica)
          yield* Effect.forkScoped(
            replica.run(upstream).pipe(Effect.annotateLogs({ backend: replica.id, model: replica.model }))
          )
        }
        const balancer = yield* Balancer.make(entry.policy.balancer)
        pools.set(entry.config.name, makeModelPool(entry, replicas, balancer))
      }
      return BackendPool.of({
        model: (name) => pools.get(name),
        status: Effect.forEach(all, (r) => r.status)
      })
    })
  )
