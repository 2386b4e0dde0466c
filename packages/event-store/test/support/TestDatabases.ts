/**
 * Databases for the contract suite: a fresh database on the machine's PostgreSQL (dropped at the
 * end), and an in-memory PGlite. `TEST_DATABASE_URL` names the server's admin database.
 */
import { SqlClient } from "@effect/sql"
import { PgClient } from "@effect/sql-pg"
import { Database } from "@gateway/event-store"
import { Effect, Layer, Redacted } from "effect"

const adminUrl = process.env.TEST_DATABASE_URL ?? "postgres://postgres@127.0.0.1:5432/postgres"

const admin = (statement: string) =>
  Effect.flatMap(SqlClient.SqlClient, (sql) => sql.unsafe(statement)).pipe(
    Effect.provide(PgClient.layer({ url: Redacted.make(adminUrl), maxConnections: 1 })),
    Effect.orDie
  )

/** A database of its own on the real server, with the migrations run. */
export const postgres = Layer.unwrapScoped(
  Effect.gen(function* () {
    const name = `gateway_test_${process.pid}_${Math.floor(Math.random() * 1e9)}`
    yield* Effect.acquireRelease(admin(`CREATE DATABASE ${name}`), () =>
      admin(`DROP DATABASE IF EXISTS ${name} WITH (FORCE)`)
    )
    const url = new URL(adminUrl)
    url.pathname = `/${name}`
    return Database.layerPostgres(Redacted.make(url.toString()), { maxConnections: 8 })
  })
)

export const embedded = Database.layerEmbedded(undefined)

export const all = [
  ["PostgreSQL", postgres],
  ["PGlite", embedded]
] as const
