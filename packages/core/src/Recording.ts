/**
 * The event log behind the gateway: the database (PostgreSQL at `DATABASE_URL`, or embedded
 * PGlite), the group-commit writer with its spool for database outages (`SPOOL_DIR`, by default
 * `./.data/spool`), the per-request recorder and the projections that follow
 * the log (`request_log`, `usage_hourly`, `dead_letters`), with the database's health on `/ready`
 * and, when the gateway has metrics, the writer and the projections on `/metrics`. Or nothing at
 * all, for benchmarks that measure what recording costs.
 */

import { join } from "node:path"
import { SqlClient } from "@effect/sql"
import { Database, type EventStore, EventWriter, ProjectionRunner } from "@gateway/event-store"
import { Config, Effect, Layer, Option } from "effect"
import { Meter } from "./Meter.js"
import { Metrics } from "./Metrics.js"
import * as Projections from "./projections/index.js"
import { Readiness } from "./Readiness.js"
import * as Recorder from "./Recorder.js"
import { Settings } from "./Settings.js"

const databaseReady = Layer.effectDiscard(
  Effect.gen(function* () {
    const readiness = yield* Readiness
    const sql = yield* SqlClient.SqlClient
    const database = yield* Database.Database
    const { table } = yield* Meter
    // The prices in force, under the version the events will carry.
    yield* sql`
      INSERT INTO price_tables (version, prices) VALUES (${table.version}, ${JSON.stringify(table.prices)}::jsonb)
      ON CONFLICT (version) DO NOTHING`
    // Reported, not required: while the database is away, events go to the spool and the gateway
    // serves on (`event_log` below says when even that fails). An orchestrator that took every
    // replica out of service during a database outage would turn it into a full one.
    yield* readiness.register(
      "database",
      sql`SELECT 1`.pipe(
        Effect.asVoid,
        Effect.mapError((e) => e.message)
      ),
      { required: false }
    )
    yield* Effect.logInfo("event store ready", { database: database.description })
  })
)

/** Not ready while nothing can be recorded: the database is away and the spool unwritable. */
const eventLogReady = Layer.effectDiscard(
  Effect.gen(function* () {
    const readiness = yield* Readiness
    const recorder = yield* Recorder.Recorder
    yield* readiness.register(
      "event_log",
      Effect.flatMap(recorder.accepting, (ok) =>
        ok ? Effect.void : Effect.fail("cannot record requests: database and spool unavailable")
      )
    )
  })
)

/** The writer's queue and spool and the projections' lag on `/metrics`, if there are metrics. */
const eventLogMetrics = Layer.scopedDiscard(
  Effect.gen(function* () {
    const metrics = yield* Effect.serviceOption(Metrics)
    if (Option.isNone(metrics)) return
    const writer = yield* EventWriter.EventWriter
    const runner = yield* ProjectionRunner.ProjectionRunner
    yield* metrics.value.attachEventLog({ writer: writer.status, lag: runner.lag })
  })
)

/** The group-commit writer spooling to `SPOOL_DIR`, reporting its statements to the metrics if any. */
const writer = Layer.unwrapEffect(
  Effect.gen(function* () {
    const dataDir = yield* Config.string("DATA_DIR").pipe(Config.withDefault("./.data"))
    const spoolDir = yield* Config.string("SPOOL_DIR").pipe(Config.withDefault(join(dataDir, "spool")))
    const metrics = yield* Effect.serviceOption(Metrics)
    const layer = EventWriter.layer({ spoolDir })
    return Option.isNone(metrics)
      ? layer
      : Layer.provide(layer, Layer.succeed(EventWriter.CurrentObserver, metrics.value.eventWriterObserver))
  })
)

/**
 * The event store on the database named by the environment (`DATABASE_URL`, else PGlite under
 * `DATA_DIR`), migrated, with its health on `/ready` and the price table in force recorded.
 */
export const database: Layer.Layer<
  Readiness | Meter | EventStore.EventStore | SqlClient.SqlClient | Database.Database,
  unknown,
  Settings
> = databaseReady.pipe(
  Layer.provideMerge(Database.layerStoreConfig),
  Layer.provideMerge(Readiness.Default),
  Layer.provideMerge(Meter.Default)
)

/** Recording on the event store: the writer (spooling to `SPOOL_DIR`), the recorder, the projections. */
export const layer: Layer.Layer<
  Recorder.Recorder | ProjectionRunner.ProjectionRunner,
  unknown,
  Settings | Readiness | EventStore.EventStore | SqlClient.SqlClient | Database.Database
> = Layer.merge(eventLogReady, eventLogMetrics).pipe(
  Layer.provideMerge(
    Layer.unwrapEffect(
      Effect.map(Settings, (config) => Recorder.layer({ payloads: config.events.storePayloads }))
    )
  ),
  Layer.provideMerge(ProjectionRunner.layer(Projections.all)),
  Layer.provide(writer)
)

/** No recording at all. */
export const layerDisabled: Layer.Layer<Recorder.Recorder> = Recorder.layerDisabled
