/** The two databases the contract suite runs on: a fresh one on real PostgreSQL, and PGlite. */
import { Database } from "@gateway/event-store"

export const postgres = Database.layerTest

export const embedded = Database.layerEmbedded(undefined)

export const all = [
  ["PostgreSQL", postgres],
  ["PGlite", embedded]
] as const
