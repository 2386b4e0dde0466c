/**
 * The `dead_letters` projection on real PostgreSQL: given request streams (failed, retried,
 * cut off, turned away, completed, discarded), the letters it keeps — and the same table
 * whatever the batch boundaries, as a live runner and a replay cut the log differently.
 */
import { SqlClient } from "@effect/sql"
import { expect, layer } from "@effect/vitest"
import { DeadLetterQueue, Projections } from "@gateway/core"
import { Events, Ids } from "@gateway/domain"
import { Database, EventStore, ProjectionRunner } from "@gateway/event-store"
import { Effect, Layer, Stream } from "effect"
import { describe, it as unit } from "vitest"

const model = Ids.ModelName.make("small")
const backend = Ids.BackendId.make("small-1")
const keyId = Ids.KeyId.make("k1")
const tenantId = Ids.TenantId.make("acme")

const received = (kind: "full" | "hash") =>
  new Events.RequestReceived({
    model: "small",
    stream: false,
    endpoint: "chat.completions",
    payload:
      kind === "full"
        ? { kind: "full", body: { model: "small", messages: [] }, bytes: 40 }
        : { kind: "hash", sha256: "0".repeat(64), bytes: 40 }
  })

const failed = (status: number, message = `HTTP ${status}`) =>
  new Events.RequestFailed({
    status,
    error: { code: "upstream_error", message, reason: "Http" },
    attempts: 2
  })

const retried = (n: number) => new Events.DeadLetterRetried({ by: "ops", retry: n })

const completed = new Events.RequestCompleted({
  model,
  backend,
  promptTokens: 5,
  completionTokens: 8,
  usageSource: "backend",
  cost: null,
  latencyMs: 10,
  ttftMs: null,
  finishReason: "stop",
  cached: false,
  stream: false,
  status: 200
})

const cancelled = new Events.RequestCancelled({ tokensDelivered: 0, latencyMs: 5, afterFirstByte: false })
const rejected = new Events.RequestRejected({ reason: "rate_limited", status: 429, message: "slow down" })
const discarded = new Events.DeadLetterDiscarded({ reason: "gave up", by: "ops" })

/** Each request's stream, appended in rounds so that the streams interleave in the log. */
const streams: Record<string, ReadonlyArray<ReadonlyArray<Events.RequestEvent>>> = {
  // Failed, retried and failed again, retried and cut off, retried and turned away: still a letter.
  "r-stays": [
    [received("full"), failed(503)],
    [retried(1), failed(502, "bad gateway")],
    [retried(2), cancelled],
    [retried(3), rejected]
  ],
  // Failed, retried, completed: cleared.
  "r-recovered": [[received("full"), failed(500)], [retried(1)], [completed]],
  // Failed, discarded: cleared.
  "r-discarded": [[received("full"), failed(429)], [discarded]],
  // A hash payload: a letter that cannot be retried.
  "r-hashed": [[received("hash"), failed(504)]],
  // A client error, and a success: never letters.
  "r-client-error": [[received("full"), failed(400)]],
  "r-ok": [[received("full"), completed]],
  // Retry running: a letter with its retry under way.
  "r-running": [[received("full"), failed(503)], [retried(1)]]
}

interface LetterRow {
  readonly request_id: string
  readonly tenant_id: string | null
  readonly key_id: string | null
  readonly model: string | null
  readonly status: number
  readonly reason: string
  readonly last_error: string
  readonly retries: number
  readonly last_retry_by: string | null
  readonly last_retry_outcome: string | null
  readonly retryable: boolean
}

const Store = Layer.provideMerge(Database.eventStore, Database.layerTest)

layer(Store, { excludeTestServices: true, timeout: 60_000 })("dead_letters projection", (it) => {
  it.effect(
    "keeps failed requests with their retries, clears recovered and discarded ones, whatever the batches",
    () =>
      Effect.gen(function* () {
        const store = yield* EventStore.EventStore
        const sql = yield* SqlClient.SqlClient
        const rounds = Math.max(...Object.values(streams).map((s) => s.length))
        for (let round = 0; round < rounds; round++) {
          for (const [id, parts] of Object.entries(streams)) {
            const events = parts[round]
            if (events === undefined) continue
            const requestId = Ids.RequestId.make(id)
            const streamId = Events.streamIdOf(requestId)
            const version = yield* store.version(streamId)
            const metadata = Events.makeMetadata({ requestId, keyId, tenantId, occurredAt: Date.now() })
            yield* store.append(
              streamId,
              events.map((event) => ({
                eventId: crypto.randomUUID(),
                ...Events.encodeRequestEvent(event),
                metadata
              })),
              version
            )
          }
        }
        const log = Array.from(yield* Stream.runCollect(store.readAll(EventStore.start)))
        const projection = Projections.DeadLetters.projection

        const tablesFor = new Map<number, ReadonlyArray<LetterRow>>()
        for (const size of [1, 2, 3, 5, log.length]) {
          const tables = (base: string) => `${base}_b${size}`
          yield* projection.create(tables)
          let at = EventStore.start
          for (let i = 0; i < log.length; i += size) {
            at = yield* ProjectionRunner.applyBatch(
              projection,
              tables,
              `dead_letters:b${size}`,
              at,
              log.slice(i, i + size)
            )
          }
          tablesFor.set(
            size,
            yield* sql.unsafe<LetterRow>(`SELECT * FROM ${tables("dead_letters")} ORDER BY request_id`)
          )
        }
        const [first, ...others] = Array.from(tablesFor.values())
        for (const other of others) expect(other).toEqual(first)

        const rows = first!
        expect(rows.map((r) => r.request_id)).toEqual(["r-hashed", "r-running", "r-stays"])
        const byId = new Map(rows.map((r) => [r.request_id, r]))
        expect(byId.get("r-stays")).toMatchObject({
          tenant_id: "acme",
          key_id: "k1",
          model: "small",
          status: 502,
          reason: "Http",
          last_error: "bad gateway",
          retries: 3,
          last_retry_by: "ops",
          last_retry_outcome: "rejected",
          retryable: true
        })
        expect(byId.get("r-running")).toMatchObject({
          retries: 1,
          last_retry_outcome: "running",
          status: 503
        })
        expect(byId.get("r-hashed")).toMatchObject({ retries: 0, last_retry_outcome: null, retryable: false })
      })
  )
})

describe("DeadLetterQueue.streamState", () => {
  const state = (...events: ReadonlyArray<Events.RequestEvent>) =>
    DeadLetterQueue.streamState(events.map((e) => Events.encodeRequestEvent(e)))

  unit("is read from the stream's last events", () => {
    expect(state(received("full"), failed(503))).toEqual({
      _tag: "DeadLettered",
      status: 503,
      reason: "Http"
    })
    expect(state(received("full"), failed(400))._tag).toBe("Settled")
    expect(state(received("full"), completed)._tag).toBe("Settled")
    expect(state(received("full"), failed(503), retried(1))._tag).toBe("Retrying")
    expect(state(received("full"), failed(503), retried(1), completed)._tag).toBe("Settled")
    expect(state(received("full"), failed(503), discarded)._tag).toBe("Settled")
    expect(state(received("full"), failed(503), retried(1), failed(502))).toMatchObject({ status: 502 })
    // A retry cut off or turned away is over: the failure before it stands, and can be retried.
    expect(state(received("full"), failed(503), retried(1), cancelled)).toMatchObject({ status: 503 })
    expect(state(received("full"), failed(504), retried(1), rejected, retried(2), rejected)).toMatchObject({
      status: 504
    })
    expect(state(received("full"), cancelled)._tag).toBe("Settled")
  })
})
