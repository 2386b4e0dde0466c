/**
 * The event store's schema, as numbered migrations run by `PgMigrator` at start-up. The events
 * table is append-only; `transaction_id` lets readers follow the log without skipping events of
 * transactions still in flight (they read below `pg_snapshot_xmin(pg_current_snapshot())`).
 */

import { SqlClient } from "@effect/sql"
import { PgMigrator } from "@effect/sql-pg"
import { Effect } from "effect"

/** Channel on which every insert into `events` is announced (payload: the last position). */
export const notifyChannel = "gateway_events"

export const loader = PgMigrator.fromRecord({
  "0001_events": Effect.gen(function* () {
    const sql = yield* SqlClient.SqlClient
    yield* sql`
      CREATE TABLE events (
        position bigserial PRIMARY KEY,
        event_id uuid NOT NULL UNIQUE,
        stream_id text NOT NULL,
        stream_version integer NOT NULL CHECK (stream_version > 0),
        type text NOT NULL,
        data jsonb NOT NULL,
        metadata jsonb NOT NULL,
        transaction_id xid8 NOT NULL DEFAULT pg_current_xact_id(),
        recorded_at timestamptz NOT NULL DEFAULT now(),
        UNIQUE (stream_id, stream_version)
      )`
    yield* sql`CREATE INDEX events_transaction_position ON events (transaction_id, position)`
    yield* sql.unsafe(`
      CREATE FUNCTION events_notify() RETURNS trigger LANGUAGE plpgsql AS $$
      BEGIN
        PERFORM pg_notify('${notifyChannel}', '1');
        RETURN NULL;
      END $$`)
    yield* sql`
      CREATE TRIGGER events_notify AFTER INSERT ON events
      FOR EACH STATEMENT EXECUTE FUNCTION events_notify()`
    // Append-only: updates and deletes are refused at the database.
    yield* sql.unsafe(`
      CREATE FUNCTION events_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
      BEGIN
        RAISE EXCEPTION 'events are append-only';
      END $$`)
    yield* sql`
      CREATE TRIGGER events_append_only BEFORE UPDATE OR DELETE ON events
      FOR EACH ROW EXECUTE FUNCTION events_append_only()`
  }),
  "0002_projection_checkpoints": Effect.gen(function* () {
    const sql = yield* SqlClient.SqlClient
    yield* sql`
      CREATE TABLE projection_checkpoints (
        name text PRIMARY KEY,
        transaction_id xid8 NOT NULL DEFAULT '0',
        position bigint NOT NULL DEFAULT 0,
        events_applied bigint NOT NULL DEFAULT 0,
        last_error text,
        updated_at timestamptz NOT NULL DEFAULT now()
      )`
  }),
  "0003_price_tables": Effect.gen(function* () {
    const sql = yield* SqlClient.SqlClient
    // Each version of the gateway's prices, by the hash recorded on the events it priced.
    yield* sql`
      CREATE TABLE price_tables (
        version text PRIMARY KEY,
        prices jsonb NOT NULL,
        recorded_at timestamptz NOT NULL DEFAULT now()
      )`
  }),
  "0004_tenancy_index": Effect.gen(function* () {
    const sql = yield* SqlClient.SqlClient
    // Every replica follows the tenancy streams (keys, tenants) among millions of request events:
    // a small partial index makes that read cheap. Its predicate is `tenancyFilter`, verbatim.
    yield* sql.unsafe(
      `CREATE INDEX events_tenancy ON events (transaction_id, position) WHERE ${tenancyFilter}`
    )
  })
})

/** Selects the tenancy streams; a read with exactly this predicate uses the partial index. */
export const tenancyFilter = "(stream_id LIKE 'key-%' OR stream_id LIKE 'tenant-%')"

/** Held while the schema is changed: replicas starting together on an empty database take turns. */
const schemaLock = 7_243_118_950_031n

/**
 * Runs `effect` in a transaction holding the schema lock. Concurrent `CREATE TABLE`s of one name
 * collide in PostgreSQL's catalog even with `IF NOT EXISTS`; under the lock they run one by one.
 */
export const exclusively = <A, E, R>(effect: Effect.Effect<A, E, R>) =>
  Effect.flatMap(SqlClient.SqlClient, (sql) =>
    sql.withTransaction(
      Effect.zipRight(sql`SELECT pg_advisory_xact_lock(${String(schemaLock)}::bigint)`, effect)
    )
  )

const migrationsTable = "gateway_migrations"

/**
 * Brings the schema up to date; safe to run from several replicas at once. `PgMigrator` creates
 * its own table unguarded (two replicas on an empty database collide); it is created here first,
 * as `PgMigrator` defines it, under the lock. The migrations then run under `PgMigrator`'s lock.
 */
export const run = Effect.zipRight(
  exclusively(
    Effect.flatMap(
      SqlClient.SqlClient,
      (sql) => sql`
        CREATE TABLE IF NOT EXISTS ${sql(migrationsTable)} (
          migration_id integer primary key,
          created_at timestamp with time zone not null default now(),
          name text not null
        )`
    )
  ),
  PgMigrator.run({ loader, table: migrationsTable })
)
