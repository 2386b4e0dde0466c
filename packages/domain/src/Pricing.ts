/**
 * Money as the gateway records it: whole micro-USD (1e-6 USD) in a safe integer, so sums over
 * years of usage stay exact in JSON, in JavaScript numbers and in a Postgres `bigint`.
 */
import { Schema } from "effect"

/** An amount in micro-USD; non-negative and at most `Number.MAX_SAFE_INTEGER` (~9 billion USD). */
export const MicroUsd = Schema.NonNegativeInt.pipe(Schema.brand("@gateway/MicroUsd"))
export type MicroUsd = typeof MicroUsd.Type

/** What one request cost, and which version of the price table priced it (for re-pricing audits). */
export const Cost = Schema.Struct({
  amountMicroUsd: MicroUsd,
  priceVersion: Schema.String
}).annotations({ identifier: "Cost" })
export type Cost = typeof Cost.Type
