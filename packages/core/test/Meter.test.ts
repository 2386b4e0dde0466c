import { describe, expect, it } from "@effect/vitest"
import { ConfigLoader, Meter, Settings } from "@gateway/core"
import { Effect } from "effect"

const config = (pricing: Record<string, { input_per_million_usd: number; output_per_million_usd: number }>) =>
  ConfigLoader.fromUnknown("test", {
    models: ["small", "large", "free"].map((name) => ({
      name,
      backends: [{ id: `${name}-1`, url: "http://127.0.0.1:1" }],
      ...(pricing[name] === undefined ? {} : { pricing: pricing[name] })
    }))
  })

const meterOf = (pricing: Parameters<typeof config>[0]) =>
  Effect.flatMap(config(pricing), (c) =>
    Meter.Meter.pipe(Effect.provide(Meter.Meter.Default), Effect.provide(Settings.layer(c)))
  )

describe("Meter", () => {
  it.effect("prices tokens in micro-USD from USD per million tokens, and knows unpriced models", () =>
    Effect.gen(function* () {
      const meter = yield* meterOf({
        small: { input_per_million_usd: 0.15, output_per_million_usd: 0.6 },
        large: { input_per_million_usd: 2.5, output_per_million_usd: 10 }
      })
      expect(meter.cost("small", 1_000_000, 1_000_000)?.amountMicroUsd).toBe(750_000)
      expect(meter.cost("large", 1200, 300)?.amountMicroUsd).toBe(6000)
      // 43 × 0.15 + 64 × 0.6 = 44.85 micro-USD, rounded for the event (projections keep it exact).
      expect(meter.cost("small", 43, 64)?.amountMicroUsd).toBe(45)
      expect(meter.cost("free", 10, 10)).toBeNull()
      expect(meter.cost("small", 1, 1)?.priceVersion).toBe(meter.table.version)
    })
  )

  it.effect("gives the same prices the same version, and other prices another", () =>
    Effect.gen(function* () {
      const a = yield* meterOf({ small: { input_per_million_usd: 0.15, output_per_million_usd: 0.6 } })
      const b = yield* meterOf({ small: { input_per_million_usd: 0.15, output_per_million_usd: 0.6 } })
      const c = yield* meterOf({ small: { input_per_million_usd: 0.2, output_per_million_usd: 0.6 } })
      expect(a.table.version).toBe(b.table.version)
      expect(a.table.version).not.toBe(c.table.version)
      expect(a.table.version).toMatch(/^[0-9a-f]{16}$/)
    })
  )
})
