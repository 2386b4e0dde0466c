/**
 * Puts a rebuilt table in place of the live one, inside the caller's transaction: the live table
 * is renamed away and dropped, the rebuilt one takes its name, and its indexes (with the
 * constraints they back) and owned sequences take the live names too — so the next rebuild can
 * create `<table>_rebuild` again without a name clash.
 */
import { SqlClient } from "@effect/sql"
import { Effect } from "effect"

const quote = (identifier: string) => `"${identifier.replaceAll('"', '""')}"`

/** Indexes of `table` and sequences owned by its columns (serial or identity). */
const dependents = (table: string) =>
  Effect.flatMap(
    SqlClient.SqlClient,
    (sql) =>
      sql<{ name: string; kind: "index" | "sequence" }>`
      SELECT c.relname AS name, 'index' AS kind
      FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
      WHERE i.indrelid = to_regclass(${table})
      UNION ALL
      SELECT c.relname AS name, 'sequence' AS kind
      FROM pg_depend d JOIN pg_class c ON c.oid = d.objid
      WHERE d.refobjid = to_regclass(${table}) AND d.classid = 'pg_class'::regclass
        AND c.relkind = 'S' AND d.deptype IN ('a', 'i')`
  )

/** Replaces table `live` by table `rebuilt`; run it in a transaction. */
export const swap = (live: string, rebuilt: string) =>
  Effect.gen(function* () {
    const sql = yield* SqlClient.SqlClient
    const old = `${live}_old`
    yield* sql.unsafe(`ALTER TABLE ${quote(live)} RENAME TO ${quote(old)}`)
    yield* sql.unsafe(`ALTER TABLE ${quote(rebuilt)} RENAME TO ${quote(live)}`)
    // Dropped first, so its index names are free for the new table's.
    yield* sql.unsafe(`DROP TABLE ${quote(old)}`)
    for (const { name, kind } of yield* dependents(live)) {
      if (!name.startsWith(rebuilt)) continue
      const renamed = live + name.slice(rebuilt.length)
      // Renaming an index renames the constraint (primary key, unique) it backs.
      yield* sql.unsafe(
        `ALTER ${kind === "index" ? "INDEX" : "SEQUENCE"} ${quote(name)} RENAME TO ${quote(renamed)}`
      )
    }
  }).pipe(Effect.withSpan("TableSwap.swap", { attributes: { live, rebuilt } }))
