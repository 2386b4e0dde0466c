/**
 * `/metrics` after a scripted mix of requests — answers streamed and not, a fallback, a backend
 * error, a rate-limit refusal — read by parsing the Prometheus exposition format, sample by sample.
 */
import { expect, layer } from "@effect/vitest"
import { Context, Effect, Layer } from "effect"
import * as Admin from "./support/Admin.js"
import * as Processes from "./support/Processes.js"

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
      // And the process itself.
      expect(valueOf(samples, "gateway_process_cpu_seconds_total")).toBeGreaterThan(0)
    })
  )
})
