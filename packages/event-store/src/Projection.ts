/**
 * A projection: a read model kept from the event log. `evolve` folds one event into the batch's
 * delta — pure code, no I/O — and `apply` writes that delta with SQL in the same transaction as
 * the checkpoint, so a projection is applied exactly once per event even across crashes.
 * Tables are named through `tables`, so a rebuild can fill fresh copies and swap them in.
 */
import type { SqlClient, SqlError } from "@effect/sql"
import type { Effect } from "effect"
import type { RecordedEvent } from "./EventStore.js"

/** Maps a projection's base table name to the table used (e.g. `usage_hourly_rebuild`). */
export type Tables = (base: string) => string

export const liveTables: Tables = (base) => base

export interface Projection<Delta> {
  /** Also the checkpoint's name and, hashed, the advisory lock's key. */
  readonly name: string
  /** Base names of the tables it owns. */
  readonly tables: ReadonlyArray<string>
  /** Creates its tables if they do not exist. */
  readonly create: (tables: Tables) => Effect.Effect<void, SqlError.SqlError, SqlClient.SqlClient>
  /** A fresh, empty delta for a batch. */
  readonly empty: () => Delta
  /** Folds one event into the batch's delta (which it may update in place) and returns it. */
  readonly evolve: (delta: Delta, event: RecordedEvent) => Delta
  /** Writes the delta. Runs inside the batch's transaction. */
  readonly apply: (
    delta: Delta,
    tables: Tables
  ) => Effect.Effect<void, SqlError.SqlError, SqlClient.SqlClient>
}

/** A projection of any delta type, for lists of them. */
// biome-ignore lint/suspicious/noExplicitAny: the delta type is each projection's own business
export type Any = Projection<any>
