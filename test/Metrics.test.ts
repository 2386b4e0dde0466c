/**
 * `/metrics` after a scripted mix of requests — answers streamed and not, a fallback, a backend
 * error, a rate-limit refusal — read by parsing the Prometheus exposition format, sample by sample,
 * and checked against the event log the gateway wrote.
 */
import { expect, layer } from "@effect/vitest"
import { Context, Effect, Layer } from "effect"
import * as Admin from "./support/Admin.js"
import * as EventLog from "./support/EventLog.js"
import * as Processes from "./support/Processes.js"
import * as TcpProxy from "./support/TcpProxy.js"

/** One sample: its metric name, its labels, its value. */
interface Sample {
  readonly name: string
  readonly labels: Readonly<Record<string, string>>
  readonly value: number
}

/** The samples of a text exposition (`# HELP`/`# TYPE` lines skipped; label values unescaped). */
const parseExposition = (text: string): ReadonlyArray<Sample> =>
  text
    .split("\n")
    .filter((line) => line !== "" && !line.startsWith("#"))
    .map((line) => {
      const match = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+\d+)?$/.exec(line)
      if (match === null) throw new Error(`not an exposition line: ${line}`)
      const labels: Record<string, string> = {}
      for (const pair of (match[2] ?? "").matchAll(/([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g)) {
        labels[pair[1]!] = pair[2]!.replace(/\\n/g, "\n").replace(/\\"/g, '"').replace(/\\\\/g, "\\")
      }
      const raw = match[3]!
      const value =
        raw === "+Inf" ? Number.POSITIVE_INFINITY : raw === "-Inf" ? Number.NEGATIVE_INFINITY : Number(raw)
      return { name: match[1]!, labels, value }
    })

/** The value of the one sample of `name` whose labels include `labels` (0 when there is none). */
const valueOf = (samples: ReadonlyArray<Sample>, name: string, labels: Record<string, string> = {}) => {
  const found = samples.filter(
    (s) => s.name === name && Object.entries(labels).every(([k, v]) => s.labels[k] === v)
  )
  return found.reduce((sum, s) => sum + s.value, 0)
}

/** The projections a gateway runs in its own process. */
const projections = ["dead_letters", "request_log", "usage_hourly"]

const scrape = (baseUrl: string, adminKey: string) =>
  Effect.promise(async () => {
    const response = await fetch(`${baseUrl}/metrics`, { headers: Admin.bearer(adminKey) })
    expect(response.status).toBe(200)
    return parseExposition(await response.text())
  })

class Stack extends Context.Tag("test/Metrics/Stack")<
  Stack,
  { readonly gateway: Processes.Gateway; readonly adminKey: string }
>() {
  static readonly layer = Layer.scoped(
    Stack,
    Effect.gen(function* () {
      const [small, broken, dead] = yield* Effect.all([
        Processes.freePort,
        Processes.freePort,
        Processes.freePort
      ])
      const url = (port: number) => `http://127.0.0.1:${port}`
      const adminKey = Admin.newAdminKey()
      const [, , gateway] = yield* Effect.all(
        [
          Processes.startSim({ port: small, model: "small", ttftMs: 5, itlMs: 2, outputTokens: 8, seed: 1 }),
          Processes.startSim({ port: broken, model: "broken", errorRate: 1, errorStatus: 500, seed: 2 }),
          Processes.startGateway(
            {
              server: { host: "127.0.0.1" },
              pool: Processes.singleAttempt,
              models: [
                {
                  name: "small",
                  pricing: { input_per_million_usd: 1, output_per_million_usd: 2 },
                  // The simulator serves vLLM's queue gauges: the gateway reads them.
                  queue_metrics: { interval_ms: 100 },
                  backends: [{ id: "small-1", url: url(small) }]
                },
                { name: "large", fallbacks: ["small"], backends: [{ id: "large-1", url: url(dead) }] },
                { name: "broken", backends: [{ id: "broken-1", url: url(broken) }] }
              ]
            },
            Admin.authEnv(adminKey)
          )
        ],
        { concurrency: "unbounded" }
      )
      return { gateway, adminKey }
    })
  )
}

const chat = (baseUrl: string, key: string, model: string, stream = false) =>
  Effect.promise(async () => {
    const response = await fetch(`${baseUrl}/v1/chat/completions`, {
      method: "POST",
      headers: { "content-type": "application/json", ...Admin.bearer(key) },
      body: JSON.stringify({ model, stream, messages: [{ role: "user", content: "Hello there" }] })
    })
    await response.text()
    return response
  })

layer(Stack.layer, { excludeTestServices: true, timeout: 60_000 })("metrics", (it) => {
  it.effect("after a mix of requests, /metrics counts each by model, status and cause", () =>
    Effect.gen(function* () {
      const { gateway, adminKey } = yield* Stack
      const app = yield* Admin.createKey(gateway.url, adminKey, { tenant: "acme", name: "app" })
      const limited = yield* Admin.createKey(gateway.url, adminKey, {
        tenant: "initech",
        name: "limited",
        limits: { requests_per_minute: 1 }
      })

      // Two answers from small (one streamed), one through the fallback, one backend error.
      const plain = yield* chat(gateway.url, app.key, "small")
      expect(plain.status).toBe(200)
      // The gateway's own time, in milliseconds, for users to check.
      expect(Number(plain.headers.get("x-gateway-overhead-ms"))).toBeGreaterThanOrEqual(0)
      expect(Number(plain.headers.get("x-gateway-overhead-ms"))).toBeLessThan(1000)
      expect((yield* chat(gateway.url, app.key, "small", true)).status).toBe(200)
      const fallback = yield* chat(gateway.url, app.key, "large")
      expect([fallback.status, fallback.headers.get("x-gateway-fallback")]).toEqual([200, "large"])
      expect((yield* chat(gateway.url, app.key, "broken")).status).toBe(500)
      // One answer, then a refusal by the key's requests-per-minute limit.
      expect((yield* chat(gateway.url, limited.key, "small")).status).toBe(200)
      expect((yield* chat(gateway.url, limited.key, "small")).status).toBe(429)
      // A model nobody configured does not become a label of its own.
      expect((yield* chat(gateway.url, app.key, "no-such-model")).status).toBe(404)

      // Without the admin key, no metrics on the API's port.
      const anonymous = yield* Effect.promise(() => fetch(`${gateway.url}/metrics`))
      expect(anonymous.status).toBe(401)
      const text = yield* Effect.promise(async () => {
        const response = await fetch(`${gateway.url}/metrics`, { headers: Admin.bearer(adminKey) })
        expect(response.status).toBe(200)
        expect(response.headers.get("content-type")).toContain("text/plain")
        return response.text()
      })
      const samples = parseExposition(text)
      const requests = (labels: Record<string, string>) => valueOf(samples, "gateway_requests_total", labels)

      expect(requests({ model: "small", status_class: "2xx", tenant: "acme" })).toBe(3)
      expect(requests({ model: "small", status_class: "2xx", tenant: "initech" })).toBe(1)
      expect(requests({ model: "small", status_class: "4xx", tenant: "initech" })).toBe(1)
      expect(requests({ model: "broken", status_class: "5xx" })).toBe(1)
      expect(requests({ model: "other", status_class: "4xx" })).toBe(1)
      expect(samples.some((s) => s.labels.model === "no-such-model")).toBe(false)
      expect(requests({})).toBe(7)

      expect(valueOf(samples, "gateway_rate_limit_rejections_total", { reason: "rate_limited" })).toBe(1)
      expect(valueOf(samples, "gateway_fallbacks_total", { from: "large", to: "small" })).toBe(1)
      expect(valueOf(samples, "gateway_requests_in_flight")).toBe(0)

      // Histograms: one observation per request in the counts, a non-decreasing +Inf bucket.
      expect(valueOf(samples, "gateway_request_duration_seconds_count")).toBe(7)
      expect(
        valueOf(samples, "gateway_request_duration_seconds_count", { model: "small", stream: "true" })
      ).toBe(1)
      expect(
        valueOf(samples, "gateway_request_duration_seconds_bucket", {
          model: "small",
          stream: "false",
          le: "+Inf"
        })
      ).toBe(4) // three answers and the refusal, all naming small
      expect(valueOf(samples, "gateway_time_to_first_token_seconds_count", { model: "small" })).toBe(1)
      expect(valueOf(samples, "gateway_inter_token_latency_seconds_count", { model: "small" })).toBe(1)
      // The gateway's own time, for every request that reached a backend.
      expect(valueOf(samples, "gateway_overhead_seconds_count")).toBe(5)

      // Tokens and cost of the four answers, all from small (8 completion tokens each).
      expect(valueOf(samples, "gateway_tokens_total", { model: "small", type: "completion" })).toBe(32)
      expect(valueOf(samples, "gateway_tokens_total", { model: "small", type: "prompt" })).toBeGreaterThan(0)
      expect(valueOf(samples, "gateway_cost_usd_total", { model: "small", tenant: "acme" })).toBeGreaterThan(
        0
      )

      // Each replica, read at the scrape.
      expect(valueOf(samples, "gateway_backend_healthy", { backend: "small-1", model: "small" })).toBe(1)
      expect(valueOf(samples, "gateway_backend_circuit_state", { backend: "small-1" })).toBe(0)
      expect(valueOf(samples, "gateway_backend_in_flight", { backend: "small-1" })).toBe(0)
      expect(
        valueOf(samples, "gateway_backend_latency_estimate_seconds", { backend: "small-1", kind: "request" })
      ).toBeGreaterThan(0)
      // The model server's own queue, only where it is scraped (small-1; not the others).
      const queue = samples.filter((s) => s.name === "gateway_backend_queue_requests")
      expect(queue.map((s) => `${s.labels.backend}/${s.labels.state}`).sort()).toEqual([
        "small-1/running",
        "small-1/waiting"
      ])
      for (const s of queue) expect(s.value).toBeGreaterThanOrEqual(0)
      // And the process itself.
      expect(valueOf(samples, "gateway_process_cpu_seconds_total")).toBeGreaterThan(0)
    })
  )

  it.scoped("the event log's writer and projections, against what is in the log", () =>
    Effect.gen(function* () {
      const { gateway, adminKey } = yield* Stack
      const log = yield* EventLog.make(gateway.databaseUrl)
      const app = yield* Admin.createKey(gateway.url, adminKey, { tenant: "acme", name: "writer" })
      yield* Effect.forEach(
        Array.from({ length: 12 }, (_, i) =>
          chat(gateway.url, app.key, i % 3 === 0 ? "broken" : "small", i % 2 === 0)
        ),
        (request) => request,
        { concurrency: 6, discard: true }
      )
      // Every request's events go through the writer; the key's go straight to the store.
      const requestEvents = Effect.map(
        log.query<{ n: number }>(`SELECT count(*)::int AS n FROM events WHERE stream_id LIKE 'request-%'`),
        (rows) => rows[0]?.n ?? 0
      )
      const lagOf = (samples: ReadonlyArray<Sample>) =>
        projections.map((projection) =>
          samples.find(
            (s) => s.name === "gateway_projection_lag_events" && s.labels.projection === projection
          )
        )
      // Settled: what was queued without waiting is written, the projections have applied it all.
      const [samples, written] = yield* Processes.eventually(
        "the writer's statements add up to the log and no projection is behind",
        Effect.gen(function* () {
          const written = yield* requestEvents
          const samples = yield* scrape(gateway.url, adminKey)
          const settled =
            valueOf(samples, "gateway_event_writer_batch_size_sum") === written &&
            lagOf(samples).every((lag) => lag?.value === 0)
          return settled ? ([samples, written] as const) : undefined
        }),
        "15 seconds"
      )

      expect(written).toBeGreaterThanOrEqual(12 * 2)
      const statements = valueOf(samples, "gateway_event_writer_batch_size_count")
      expect(statements).toBeGreaterThan(0)
      expect(statements).toBeLessThanOrEqual(written)
      expect(valueOf(samples, "gateway_event_writer_batch_size_sum")).toBe(written)
      expect(valueOf(samples, "gateway_event_writer_batch_size_bucket", { le: "+Inf" })).toBe(statements)
      // One duration per statement, each a real round trip to the database.
      expect(valueOf(samples, "gateway_event_append_duration_seconds_count")).toBe(statements)
      expect(valueOf(samples, "gateway_event_append_duration_seconds_sum")).toBeGreaterThan(0)
      // The database took everything: nothing queued, spooled, failed or refused.
      const present = (name: string) => samples.some((s) => s.name === name)
      for (const gauge of [
        "gateway_event_writer_queue_depth",
        "gateway_event_spool_bytes",
        "gateway_event_writer_refusing"
      ]) {
        expect(present(gauge), gauge).toBe(true)
        expect(valueOf(samples, gauge), gauge).toBe(0)
      }
      expect(valueOf(samples, "gateway_event_append_failures_total")).toBe(0)
      expect(valueOf(samples, "gateway_event_spooled_batches_total")).toBe(0)
      // One lag per projection the gateway runs, and no other.
      expect(lagOf(samples).map((lag) => lag?.value)).toEqual([0, 0, 0])
      expect(samples.filter((s) => s.name === "gateway_projection_lag_events")).toHaveLength(
        projections.length
      )
    })
  )
})

layer(Layer.empty, { excludeTestServices: true, timeout: 60_000 })("metrics without recording", (it) => {
  it.scoped("the event log's metrics are there, at zero, and no projection is reported", () =>
    Effect.gen(function* () {
      const adminKey = Admin.newAdminKey()
      const dead = yield* Processes.freePort
      const gateway = yield* Processes.startGateway(
        {
          server: { host: "127.0.0.1" },
          models: [{ name: "small", backends: [{ id: "small-1", url: `http://127.0.0.1:${dead}` }] }]
        },
        { GATEWAY_RECORDING: "off", GATEWAY_AUTH: "off", ADMIN_KEY: adminKey }
      )
      const samples = yield* scrape(gateway.url, adminKey)
      expect(valueOf(samples, "gateway_event_writer_batch_size_count")).toBe(0)
      expect(valueOf(samples, "gateway_event_append_duration_seconds_count")).toBe(0)
      for (const gauge of ["gateway_event_spool_bytes", "gateway_event_writer_refusing"]) {
        expect(
          samples.some((s) => s.name === gauge),
          gauge
        ).toBe(true)
        expect(valueOf(samples, gauge), gauge).toBe(0)
      }
      expect(samples.some((s) => s.name === "gateway_projection_lag_events")).toBe(false)
    })
  )
})

layer(Layer.empty, { excludeTestServices: true, timeout: 90_000 })("metrics with the database away", (it) => {
  it.scoped("/metrics answers at once, with the spool growing, and the spool back at 0 once drained", () =>
    Effect.gen(function* () {
      const sim = yield* Processes.startSim({ model: "small", ttftMs: 5, itlMs: 2, outputTokens: 8, seed: 1 })
      const databaseUrl = yield* Processes.freshDatabase
      const server = new URL(Processes.testDatabaseServer)
      const proxy = yield* TcpProxy.make({ host: server.hostname, port: Number(server.port || 5432) })
      const proxied = new URL(databaseUrl)
      proxied.hostname = "127.0.0.1"
      proxied.port = String(proxy.port)
      const adminKey = Admin.newAdminKey()
      const gateway = yield* Processes.startGatewayOn(
        {
          server: { host: "127.0.0.1" },
          models: [{ name: "small", backends: [{ id: "small-1", url: sim.url }] }]
        },
        { databaseUrl: proxied.toString(), spoolDir: yield* Processes.tempDir, env: { ADMIN_KEY: adminKey } }
      )
      const timedScrape = Effect.gen(function* () {
        const started = performance.now()
        const samples = yield* scrape(gateway.url, adminKey)
        return { samples, ms: performance.now() - started }
      })
      const lagSamples = (samples: ReadonlyArray<Sample>) =>
        samples.filter((s) => s.name === "gateway_projection_lag_events").length
      yield* Processes.eventually(
        "every projection's lag read once",
        Effect.map(scrape(gateway.url, adminKey), (samples) =>
          lagSamples(samples) === projections.length ? true : undefined
        ),
        "10 seconds"
      )

      const readAt = (samples: ReadonlyArray<Sample>) =>
        valueOf(samples, "gateway_projection_lag_read_timestamp_seconds")
      const before = readAt(yield* scrape(gateway.url, adminKey))
      expect(before * 1000).toBeGreaterThan(Date.now() - 60_000)

      yield* proxy.pause
      const pausedAt = Date.now() / 1000
      for (let i = 0; i < 4; i++) expect((yield* chat(gateway.url, "none", "small")).status).toBe(200)
      const during = yield* timedScrape
      expect(during.ms).toBeLessThan(3_000)
      expect(valueOf(during.samples, "gateway_event_spool_bytes")).toBeGreaterThan(0)
      expect(valueOf(during.samples, "gateway_event_spooled_batches_total")).toBeGreaterThan(0)
      expect(
        valueOf(during.samples, "gateway_event_append_failures_total", { reason: "unavailable" })
      ).toBeGreaterThan(0)
      expect(valueOf(during.samples, "gateway_event_writer_refusing")).toBe(0)
      // The projections' lag cannot be read: the last values read stay, and say how old they are.
      expect(lagSamples(during.samples)).toBe(projections.length)
      expect(readAt((yield* timedScrape).samples)).toBe(readAt(during.samples))

      yield* proxy.resume
      yield* Processes.eventually(
        "the spool drained and the lag read again, as /metrics shows",
        Effect.map(scrape(gateway.url, adminKey), (samples) =>
          valueOf(samples, "gateway_event_spool_bytes") === 0 && readAt(samples) > pausedAt ? true : undefined
        ),
        "30 seconds"
      )
    })
  )
})
