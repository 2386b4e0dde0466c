import { describe, expect, it } from "@effect/vitest"
import { Readiness } from "@gateway/core"
import { Effect } from "effect"

describe("Readiness", () => {
  it.effect("a failing required check makes the gateway unready, naming it", () =>
    Effect.gen(function* () {
      const readiness = yield* Readiness.Readiness
      yield* readiness.register("redis", Effect.fail("connection refused"))
      const report = yield* readiness.report
      expect(report).toEqual({ ready: false, checks: { config: "ok", redis: "connection refused" } })
    }).pipe(Effect.provide(Readiness.Readiness.Default))
  )

  it.effect("a failing check that is not required is reported, and the gateway stays ready", () =>
    Effect.gen(function* () {
      const readiness = yield* Readiness.Readiness
      yield* readiness.register("database", Effect.fail("connection refused"), { required: false })
      yield* readiness.register("event_log", Effect.void)
      const report = yield* readiness.report
      expect(report).toEqual({
        ready: true,
        checks: { config: "ok", database: "connection refused", event_log: "ok" }
      })
    }).pipe(Effect.provide(Readiness.Readiness.Default))
  )
})
