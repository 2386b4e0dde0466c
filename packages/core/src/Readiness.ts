/**
 * Readiness: named checks that must all pass before the gateway takes traffic (`GET /ready`).
 * Stores register their own checks (the event store, Redis) when their layers start. A check
 * registered as not required is reported but does not make the gateway unready: something it can
 * serve without for a while (the database, while events go to the spool).
 */
import { Effect, Option, Ref } from "effect"

export type Check = Effect.Effect<void, string>

export interface Report {
  readonly ready: boolean
  readonly checks: Record<string, "ok" | string>
}

export class Readiness extends Effect.Service<Readiness>()("@gateway/core/Readiness", {
  effect: Effect.gen(function* () {
    const checks = yield* Ref.make(
      new Map<string, { readonly check: Check; readonly required: boolean }>([
        ["config", { check: Effect.void, required: true }]
      ])
    )

    const register = (name: string, check: Check, options: { readonly required?: boolean } = {}) =>
      Ref.update(checks, (m) => new Map(m).set(name, { check, required: options.required !== false }))

    const report: Effect.Effect<Report> = Effect.gen(function* () {
      const results: Record<string, string> = {}
      let ready = true
      for (const [name, { check, required }] of yield* Ref.get(checks)) {
        const failure = yield* check.pipe(Effect.timeout("2 seconds"), Effect.flip, Effect.option)
        if (Option.isSome(failure)) {
          if (required) ready = false
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
