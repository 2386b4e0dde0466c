/**
 * Where the events live: PostgreSQL at `DATABASE_URL` in production, or, when it is not set, an
 * embedded PGlite served over a Unix socket to the same `pg` driver (data under `./.data`). Both
 * run the migrations at start-up and offer the same `SqlClient`, so all SQL is shared.
 */
import { mkdirSync, mkdtempSync, rmSync } from "node:fs"
import { tmpdir } from "node:os"
import { join } from "node:path"
import { NodeContext } from "@effect/platform-node"
import { SqlClient } from "@effect/sql"
import { PgClient } from "@effect/sql-pg"
import { PGlite } from "@electric-sql/pglite"
import { PGLiteSocketServer } from "@electric-sql/pglite-socket"
import { Config, Context, Effect, Layer, Option, Redacted } from "effect"
import * as EventStore from "./EventStore.js"
import * as Migrations from "./Migrations.js"

export class Database extends Context.Tag("@gateway/event-store/Database")<
  Database,
  {
    readonly kind: "postgres" | "embedded"
    /** For logs and the start-up banner; never contains a password. */
    readonly description: string
  }
>() {}

const migrated = <E, R>(client: Layer.Layer<PgClient.PgClient | SqlClient.SqlClient, E, R>) =>
  Layer.effectDiscard(Migrations.run).pipe(Layer.provide(NodeContext.layer), Layer.provideMerge(client))

const redactUrl = (url: string) => {
  try {
    const parsed = new URL(url)
    if (parsed.password !== "") parsed.password = "***"
    return parsed.toString()
  } catch {
    return "postgres"
  }
}

/** PostgreSQL at `url`, migrated. */
export const layerPostgres = (url: Redacted.Redacted, options: { readonly maxConnections?: number } = {}) =>
  Layer.merge(
    migrated(
      PgClient.layer({
        url,
        maxConnections: options.maxConnections ?? 10,
        applicationName: "llm-gateway"
      })
    ),
    Layer.succeed(Database, { kind: "postgres", description: redactUrl(Redacted.value(url)) })
  )

/**
 * PGlite with its data in `dataDir` (in memory when undefined), served over a Unix socket to a
 * pool of one connection: PGlite runs one query at a time, and an open transaction would block
 * every other connection.
 */
export const layerEmbedded = (dataDir: string | undefined) =>
  Layer.unwrapScoped(
    Effect.gen(function* () {
      const db = yield* Effect.acquireRelease(
        Effect.promise(() => {
          if (dataDir !== undefined) mkdirSync(dataDir, { recursive: true })
          return PGlite.create(dataDir === undefined ? {} : { dataDir })
        }),
        (db) => Effect.promise(() => db.close()).pipe(Effect.timeout("5 seconds"), Effect.ignore)
      )
      const socketDir = yield* Effect.acquireRelease(
        Effect.sync(() => mkdtempSync(join(tmpdir(), "gateway-pglite-"))),
        (dir) => Effect.sync(() => rmSync(dir, { recursive: true, force: true }))
      )
      const port = 5432
      yield* Effect.acquireRelease(
        Effect.promise(async () => {
          const server = new PGLiteSocketServer({ db, path: join(socketDir, `.s.PGSQL.${port}`) })
          await server.start()
          return server
        }),
        // It waits for its clients to hang up; the pool's connection may outlive it at shutdown.
        (server) => Effect.promise(() => server.stop()).pipe(Effect.timeout("2 seconds"), Effect.ignore)
      )
      return Layer.merge(
        migrated(
          PgClient.layer({
            host: socketDir,
            port,
            database: "postgres",
            username: "postgres",
            maxConnections: 1
          })
        ),
        Layer.succeed(Database, {
          kind: "embedded",
          description: dataDir === undefined ? "embedded PGlite (in memory)" : `embedded PGlite (${dataDir})`
        })
      )
    })
  )

const adminStatement = (adminUrl: string, statement: string) =>
  Effect.flatMap(SqlClient.SqlClient, (sql) => sql.unsafe(statement)).pipe(
    Effect.provide(PgClient.layer({ url: Redacted.make(adminUrl), maxConnections: 1 })),
    Effect.orDie
  )

/**
 * A throwaway database on the PostgreSQL server at `adminUrl`, dropped when the scope closes;
 * returns its URL. For tests that need a real server but must not share its data.
 */
export const freshPostgres = (adminUrl: string) =>
  Effect.gen(function* () {
    const name = `gateway_test_${process.pid}_${Math.floor(Math.random() * 1e9)}`
    yield* Effect.acquireRelease(adminStatement(adminUrl, `CREATE DATABASE ${name}`), () =>
      adminStatement(adminUrl, `DROP DATABASE IF EXISTS ${name} WITH (FORCE)`)
    )
    const url = new URL(adminUrl)
    url.pathname = `/${name}`
    return url.toString()
  })

/** A fresh, migrated database on the test server (`TEST_DATABASE_URL`, the local one by default). */
export const layerTest = Layer.unwrapScoped(
  Effect.gen(function* () {
    const adminUrl = yield* Config.string("TEST_DATABASE_URL").pipe(
      Config.withDefault("postgres://postgres@127.0.0.1:5432/postgres")
    )
    return layerPostgres(Redacted.make(yield* freshPostgres(adminUrl)), { maxConnections: 8 })
  })
).pipe(Layer.orDie)

/** `DATABASE_URL` when set, otherwise PGlite under `DATA_DIR` (default `./.data`). */
export const layerConfig = Layer.unwrapEffect(
  Effect.gen(function* () {
    const url = yield* Config.option(Config.redacted("DATABASE_URL"))
    if (Option.isSome(url)) return layerPostgres(url.value)
    const dataDir = yield* Config.string("DATA_DIR").pipe(Config.withDefault("./.data"))
    return layerEmbedded(join(dataDir, "pglite"))
  })
)

/**
 * The event store on the database: on PostgreSQL it also follows other replicas' appends
 * with LISTEN; embedded, this process is the only writer.
 */
export const eventStore: Layer.Layer<
  EventStore.EventStore,
  never,
  Database | PgClient.PgClient | SqlClient.SqlClient
> = Layer.unwrapEffect(
  Effect.gen(function* () {
    const { kind } = yield* Database
    const pg = yield* PgClient.PgClient
    return EventStore.layer(kind === "postgres" ? { notifications: pg.listen(Migrations.notifyChannel) } : {})
  })
)

/** Everything at once: the database from the environment, migrated, and the store on it. */
export const layerStoreConfig = Layer.provideMerge(eventStore, layerConfig)
