/**
 * Readiness: named checks that must all pass before the gateway takes traffic (`GET /ready`).
 * Stores register their own checks (the event store, Redis) when their layers start.
 */
import { Effect, Option, Ref } from "effect"

export type Check = Effect.Effect<void, string>

export interface Report {
  readonly ready: boolean
  readonly checks: Record<string, "ok" | string>
}

export class Readiness extends Effect.Service<Readiness>()("@gateway/core/Readiness", {
  effect: Effect.gen(function* () {
    const checks = yield* Ref.make(new Map<string, Check>([["config", Effect.void]]))

    const register = (name: string, check: Check) => Ref.update(checks, (m) => new Map(m).set(name, check))

    const report: Effect.Effect<Report> = Effect.gen(function* () {
      const results: Record<string, string> = {}
      let ready = true
      for (const [name, check] of yield* Ref.get(checks)) {
        const failure = yield* check.pipe(Effect.timeout("2 seconds"), Effect.flip, Effect.option)
        if (Option.isSome(failure)) {
          ready = false
          results[name] = typeof failure.value === "string" ? failure.value : "timed out"
        } else {
          results[name] = "ok"
        }
      }
      return { ready, checks: results }
    })

    return { register, report } as const
  })
}) {}
