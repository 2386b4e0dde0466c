/**
 * `server.metrics_port` (or `METRICS_PORT`): a second port that serves only `GET /metrics`,
 * without auth, for Prometheus; the API port's `/metrics` keeps asking for the admin key, and a
 * metrics port that cannot be listened on stops the start with a one-line reason.
 */
import * as Net from "node:net"
import { expect, layer } from "@effect/vitest"
import { Context, Effect, Layer } from "effect"
import * as Admin from "./support/Admin.js"
import * as Processes from "./support/Processes.js"

class Stack extends Context.Tag("test/MetricsPort/Stack")<
  Stack,
  {
    readonly gateway: Processes.Gateway
    readonly adminKey: string
    /** The metrics port's base URL. */
    readonly metricsUrl: string
    readonly simUrl: string
  }
>() {
  static readonly layer = Layer.scoped(
    Stack,
    Effect.gen(function* () {
      const sim = yield* Processes.startSim({ model: "small", ttftMs: 5, itlMs: 2, outputTokens: 8, seed: 1 })
      const metricsPort = yield* Processes.freePort
      const adminKey = Admin.newAdminKey()
      // The port comes from the environment, over the file's.
      const gateway = yield* Processes.startGateway(
        {
          server: { host: "127.0.0.1", metrics_port: 1 },
          pool: Processes.singleAttempt,
          models: [{ name: "small", backends: [{ id: "small-1", url: sim.url }] }]
        },
        { ...Admin.authEnv(adminKey), METRICS_PORT: String(metricsPort) }
      )
      return { gateway, adminKey, metricsUrl: `http://127.0.0.1:${metricsPort}`, simUrl: sim.url }
    })
  )
}

const get = (url: string, init: RequestInit = {}) =>
  Effect.promise(async () => {
    const res = await fetch(url, init)
    return { status: res.status, contentType: res.headers.get("content-type"), body: await res.text() }
  })

/** Samples of `name` in a text exposition, as their lines. */
const samples = (text: string, name: string) => text.split("\n").filter((line) => line.startsWith(`${name}{`))

layer(Stack.layer, { excludeTestServices: true, timeout: "60 seconds" })("metrics port", (it) => {
  it.effect("GET /metrics on the metrics port answers without auth, counting the API's requests", () =>
    Effect.gen(function* () {
      const { gateway, adminKey, metricsUrl } = yield* Stack
      const { key } = yield* Admin.createKey(gateway.url, adminKey, { tenant: "acme", name: "scraped" })
      const chat = yield* Effect.promise(async () => {
        const res = await fetch(`${gateway.url}/v1/chat/completions`, {
          method: "POST",
          headers: { "content-type": "application/json", ...Admin.bearer(key) },
          body: JSON.stringify({ model: "small", messages: [{ role: "user", content: "Hi" }] })
        })
        await res.text()
        return res.status
      })
      expect(chat).toBe(200)

      const scrape = yield* get(`${metricsUrl}/metrics`)
      expect(scrape.status, scrape.body).toBe(200)
      expect(scrape.contentType).toMatch(/^text\/plain/)
      const requests = samples(scrape.body, "gateway_requests_total")
      expect(
        requests.some((line) => line.includes('model="small"') && line.includes('status_class="2xx"'))
      ).toBe(true)
      // The same registry as the API port's.
      const viaApi = yield* get(`${gateway.url}/metrics`, { headers: Admin.bearer(adminKey) })
      expect(viaApi.status).toBe(200)
      expect(samples(viaApi.body, "gateway_requests_total")).toEqual(requests)
    })
  )

  it.effect("anything else on the metrics port is 404, and serves nothing of the API", () =>
    Effect.gen(function* () {
      const { metricsUrl, adminKey } = yield* Stack
      for (const path of ["/", "/health", "/ready", "/v1/models", "/admin/keys", "/metrics/x"]) {
        const res = yield* get(`${metricsUrl}${path}`, { headers: Admin.bearer(adminKey) })
        expect(res.status, path).toBe(404)
      }
      const post = yield* get(`${metricsUrl}/metrics`, { method: "POST", body: "{}" })
      expect(post.status).toBe(404)
      const withQuery = yield* get(`${metricsUrl}/metrics?name[]=gateway_requests_total`)
      expect(withQuery.status).toBe(200)
    })
  )

  it.effect("the API port's /metrics still needs the admin key", () =>
    Effect.gen(function* () {
      const { gateway, adminKey } = yield* Stack
      const anonymous = yield* get(`${gateway.url}/metrics`)
      expect(anonymous.status).toBe(401)
      const wrong = yield* get(`${gateway.url}/metrics`, { headers: Admin.bearer(`${adminKey}x`) })
      expect(wrong.status).toBe(401)
      const admin = yield* get(`${gateway.url}/metrics`, { headers: Admin.bearer(adminKey) })
      expect(admin.status).toBe(200)
    })
  )

  it.scoped("a metrics port already in use stops the start with a one-line reason", () =>
    Effect.gen(function* () {
      const { simUrl } = yield* Stack
      const taken = yield* Effect.acquireRelease(
        Effect.async<Net.Server>((resume) => {
          const server = Net.createServer()
          server.listen(0, "127.0.0.1", () => resume(Effect.succeed(server)))
        }),
        (server) =>
          Effect.async<void>((resume) => {
            server.close(() => resume(Effect.void))
          })
      )
      const address = taken.address()
      const port = typeof address === "object" && address !== null ? address.port : 0
      const configPath = yield* Processes.writeConfig({
        server: { host: "127.0.0.1", metrics_port: port },
        models: [{ name: "small", backends: [{ id: "small-1", url: simUrl }] }]
      })
      const { code, output } = yield* Processes.runGatewayToExit(configPath)
      expect(code, output).toBe(1)
      const failed = output.split("\n").filter((line) => line.includes("gateway failed to start"))
      expect(failed, output).toHaveLength(1)
      expect(failed[0]).toContain("cannot listen for metrics")
      expect(failed[0]).toContain("EADDRINUSE")
      expect(failed[0]).toContain("metrics_port")
    })
  )
})
