/**
 * Row-level comparison of two tables with the same columns: the rows of each that the other
 * lacks (`EXCEPT` both ways), counted, with a few of them as JSON to show an operator.
 */
import { SqlClient } from "@effect/sql"
import { Effect } from "effect"

export interface OneWay {
  /** Rows of this side missing from the other (a changed row counts once on each side). */
  readonly count: number
  readonly sample: ReadonlyArray<Record<string, unknown>>
}

export interface TableDiff {
  readonly table: string
  readonly rebuiltRows: number
  readonly liveRows: number
  readonly onlyRebuilt: OneWay
  readonly onlyLive: OneWay
}

export const identical = (diff: TableDiff) => diff.onlyRebuilt.count === 0 && diff.onlyLive.count === 0

const quote = (identifier: string) => `"${identifier.replaceAll('"', '""')}"`

/** The columns of `table`, in order. */
const columnsOf = (table: string) =>
  Effect.flatMap(SqlClient.SqlClient, (sql) =>
    sql<{ column_name: string }>`
      SELECT column_name FROM information_schema.columns
      WHERE table_schema = current_schema() AND table_name = ${table}
      ORDER BY ordinal_position`.pipe(Effect.map((rows) => rows.map((r) => r.column_name)))
  )

/** The rows of `a` not in `b` over `columns`: how many, and up to `limit` of them. */
const except = (a: string, b: string, columns: string, limit: number) =>
  Effect.flatMap(SqlClient.SqlClient, (sql) =>
    sql
      .unsafe<{ n: number; r: Record<string, unknown> }>(
        `SELECT count(*) OVER ()::int AS n, to_jsonb(d) AS r
         FROM (SELECT ${columns} FROM ${quote(a)} EXCEPT SELECT ${columns} FROM ${quote(b)}) d
         ORDER BY 2 LIMIT $1`,
        [limit]
      )
      .pipe(Effect.map((rows): OneWay => ({ count: rows[0]?.n ?? 0, sample: rows.map((row) => row.r) })))
  )

const count = (table: string) =>
  Effect.flatMap(SqlClient.SqlClient, (sql) =>
    sql
      .unsafe<{ n: number }>(`SELECT count(*)::int AS n FROM ${quote(table)}`)
      .pipe(Effect.map(([row]) => row?.n ?? 0))
  )

/** Compares the rebuilt table with the live one over the live table's columns. */
export const compare = (live: string, rebuilt: string, sampleSize = 10) =>
  Effect.gen(function* () {
    const columns = (yield* columnsOf(live)).map(quote).join(", ")
    return {
      table: live,
      rebuiltRows: yield* count(rebuilt),
      liveRows: yield* count(live),
      onlyRebuilt: yield* except(rebuilt, live, columns, sampleSize),
      onlyLive: yield* except(live, rebuilt, columns, sampleSize)
    } satisfies TableDiff
  }).pipe(Effect.withSpan("TableDiff.compare", { attributes: { live, rebuilt } }))
