/**
 * Tokens to money, with a versioned price table. The version is a hash of the prices, recorded on
 * every `RequestCompleted` and stored in `price_tables`, so the projections can compute cost from
 * tokens and the exact prices in force — and a corrected price table is applied by a replay.
 */
import { createHash } from "node:crypto"
import type { Pricing } from "@gateway/domain"
import { Effect } from "effect"
import { Settings } from "./Settings.js"

export interface Price {
  readonly inputPerMillionUsd: number
  readonly outputPerMillionUsd: number
}

export interface PriceTable {
  readonly version: string
  readonly prices: Readonly<Record<string, Price>>
}

/** The version of a set of prices: the same prices always give the same version. */
export const versionOf = (prices: Readonly<Record<string, Price>>): string => {
  const canonical = JSON.stringify(
    Object.keys(prices)
      .sort()
      .map((model) => [model, prices[model]!.inputPerMillionUsd, prices[model]!.outputPerMillionUsd])
  )
  return createHash("sha256").update(canonical).digest("hex").slice(0, 16)
}

export class Meter extends Effect.Service<Meter>()("@gateway/core/Meter", {
  effect: Effect.gen(function* () {
    const config = yield* Settings
    const prices: Record<string, Price> = {}
    for (const model of config.models) {
      if (model.pricing !== undefined) {
        prices[model.name] = {
          inputPerMillionUsd: model.pricing.inputPerMillionUsd,
          outputPerMillionUsd: model.pricing.outputPerMillionUsd
        }
      }
    }
    const table: PriceTable = { version: versionOf(prices), prices }

    /** The cost of a request, rounded to whole micro-USD; `null` for a model without a price. */
    const cost = (model: string, promptTokens: number, completionTokens: number): Pricing.Cost | null => {
      const price = table.prices[model]
      if (price === undefined) return null
      // USD per million tokens is micro-USD per token.
      const amount = Math.round(
        promptTokens * price.inputPerMillionUsd + completionTokens * price.outputPerMillionUsd
      )
      return { amountMicroUsd: amount as Pricing.MicroUsd, priceVersion: table.version }
    }

    return { table, cost } as const
  })
}) {}
