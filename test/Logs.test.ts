/**
 * The gateway's logs as an operator's log shipper reads them: every line on stdout is one JSON
 * object; each API request has one `info` line with who (tenant, key name), what (model, tier,
 * backend, status, tokens, latency, time to first token) and its ids; retries and fallbacks are
 * warnings; and no line ever holds an API key, the admin key or a prompt. `LOG_LEVEL` sets the
 * level.
 */
import { expect, layer } from "@effect/vitest"
import { Context, Effect, Layer } from "effect"
import * as Admin from "./support/Admin.js"
import * as Http from "./support/Http.js"
import * as Processes from "./support/Processes.js"

/** Words no log line may contain: they are only in the prompts. */
const secretPrompt = `The launch code is ${crypto.randomUUID()}`

const tiers = { simple: "small", moderate: "small", complex: "large" }

const config = (urls: { readonly small: string; readonly large: string; readonly broken: string }) => ({
  server: { host: "127.0.0.1" },
  pool: {
    retry: { max_attempts: 2, base_delay_ms: 1, max_delay_ms: 2 },
    health: { active: false }
  },
  models: [
    // `small` has a replica that always fails: the other one answers after a retry.
    {
      name: "small",
      balancer: "round_robin",
      backends: [
        { id: "small-broken", url: urls.broken },
        { id: "small-1", url: urls.small }
      ]
    },
    { name: "large", backends: [{ id: "large-1", url: urls.large }] },
    // Nothing answers `gone`: it falls back to `large`.
    { name: "gone", backends: [{ id: "gone-1", url: urls.broken }], fallbacks: ["large"] }
  ],
  routing: { policies: [{ name: "auto", tiers }] }
})

class Stack extends Context.Tag("test/Logs/Stack")<
  Stack,
  {
    readonly gateway: Processes.Gateway
    readonly quiet: Processes.Gateway
    readonly adminKey: string
    readonly key: string
  }
>() {
  static readonly layer = Layer.scoped(
    Stack,
    Effect.gen(function* () {
      const ports = yield* Effect.all({
        small: Processes.freePort,
        large: Processes.freePort,
        broken: Processes.freePort
      }).pipe(Effect.repeat({ until: (p) => new Set([p.small, p.large, p.broken]).size === 3 }))
      const sim = (port: number, model: string, seed: number, errorRate = 0) =>
        Processes.startSim({ port, model, ttftMs: 5, itlMs: 1, outputTokens: 5, seed, errorRate })
      const [small, large, broken] = yield* Effect.all(
        [sim(ports.small, "small", 1), sim(ports.large, "large", 2), sim(ports.broken, "broken", 3, 1)],
        { concurrency: "unbounded" }
      )
      const urls = { small: small.url, large: large.url, broken: broken.url }
      const adminKey = Admin.newAdminKey()
      const gateway = yield* Processes.startGateway(config(urls), Admin.authEnv(adminKey))
      const quiet = yield* Processes.startGateway(config(urls), {
        ...Admin.authEnv(adminKey),
        LOG_LEVEL: "warn"
      })
      const { key } = yield* Admin.createKey(gateway.url, adminKey, { tenant: "acme", name: "billing-app" })
      return { gateway, quiet, adminKey, key }
    })
  )
}

const ask = (
  url: string,
  key: string,
  requestId: string,
  body: Record<string, unknown>
): Effect.Effect<Response> =>
  Http.postChat(
    url,
    { messages: [{ role: "user", content: secretPrompt }], ...body },
    { headers: { ...Admin.bearer(key), "x-request-id": requestId } }
  )

layer(Stack.layer, { excludeTestServices: true, timeout: 60_000 })("Logs", (it) => {
  it.effect("one JSON line per request with its fields, warnings for retries and fallbacks, no secrets", () =>
    Effect.gen(function* () {
      const { gateway, adminKey, key } = yield* Stack
      const ids = {
        streamed: `logs-${crypto.randomUUID()}`,
        whole: `logs-${crypto.randomUUID()}`,
        fallback: `logs-${crypto.randomUUID()}`,
        unknown: `logs-${crypto.randomUUID()}`
      }
      const streamed = yield* ask(gateway.url, key, ids.streamed, { model: "auto", stream: true })
      expect(streamed.status).toBe(200)
      expect((yield* Http.readSse(streamed)).done).toBe(true)
      // Round robin: one of the next two goes to the broken replica first and is retried.
      const whole = yield* ask(gateway.url, key, ids.whole, { model: "small" })
      expect(whole.status).toBe(200)
      yield* Effect.promise(() => whole.text())
      const again = yield* ask(gateway.url, key, `logs-${crypto.randomUUID()}`, { model: "small" })
      yield* Effect.promise(() => again.text())
      const fallback = yield* ask(gateway.url, key, ids.fallback, { model: "gone" })
      expect(fallback.status).toBe(200)
      yield* Effect.promise(() => fallback.text())
      const unknown = yield* ask(gateway.url, "gw-not-a-real-key-0123456789", ids.unknown, { model: "small" })
      expect(unknown.status).toBe(401)
      yield* Effect.promise(() => unknown.text())

      const line = yield* gateway.accessLog(ids.streamed)
      expect(line).toMatchObject({
        level: "info",
        msg: "request",
        client_request_id: ids.streamed,
        method: "POST",
        path: "/v1/chat/completions",
        status: 200,
        tenant: "acme",
        key_name: "billing-app",
        model: "small",
        requested_model: "auto",
        tier: "simple",
        backend: expect.stringMatching(/^small-/),
        stream: true,
        completion_tokens: 5
      })
      expect(line.request_id).toMatch(/^[0-9a-z-]+$/)
      expect(line.prompt_tokens as number).toBeGreaterThan(0)
      expect(line.latency_ms as number).toBeGreaterThan(0)
      expect(line.ttft_ms as number).toBeGreaterThan(0)
      expect(line.ttft_ms as number).toBeLessThanOrEqual(line.latency_ms as number)
      expect(Date.parse(line.time as string)).not.toBeNaN()

      const fell = yield* gateway.accessLog(ids.fallback)
      expect(fell).toMatchObject({ status: 200, model: "large", requested_model: "gone", backend: "large-1" })
      const refused = yield* gateway.accessLog(ids.unknown)
      expect(refused).toMatchObject({ status: 401 })
      expect(refused.key_name).toBeUndefined()

      // Retries and fallbacks are warnings naming the backend or the models.
      const lines = gateway.logs()
      expect(
        lines.some(
          (l) => l.level === "warn" && l.msg === "backend attempt failed" && l.backend === "small-broken"
        )
      ).toBe(true)
      expect(
        lines.some((l) => l.level === "warn" && l.msg === "falling back to another model" && l.to === "large")
      ).toBe(true)

      // Every line is a JSON object, and none holds a key or a prompt.
      const raw = gateway.child.stdout.filter((l) => l.trim() !== "")
      expect(raw.length).toBeGreaterThan(5)
      for (const text of raw) {
        const parsed = JSON.parse(text) as Record<string, unknown>
        expect(typeof parsed.time).toBe("string")
        expect(typeof parsed.level).toBe("string")
        expect(typeof parsed.msg).toBe("string")
        expect(text).not.toContain(key)
        expect(text).not.toContain(key.slice(8))
        expect(text).not.toContain(adminKey)
        expect(text).not.toContain(secretPrompt)
        expect(text).not.toContain("launch code")
      }
      expect(gateway.child.stderr.join("\n")).not.toContain(key)
    })
  )

  it.effect("LOG_LEVEL=warn drops the request lines and keeps the warnings", () =>
    Effect.gen(function* () {
      const { quiet, adminKey } = yield* Stack
      // Each gateway has a database of its own: the key is made on this one.
      const own = yield* Admin.createKey(quiet.url, adminKey, { tenant: "acme", name: "quiet-app" })
      for (let i = 0; i < 2; i++) {
        const res = yield* ask(quiet.url, own.key, `quiet-${crypto.randomUUID()}`, { model: "small" })
        expect(res.status).toBe(200)
        yield* Effect.promise(() => res.text())
      }
      const lines = yield* Processes.eventually(
        "a warning from the broken replica",
        Effect.sync(() => {
          const all = quiet.logs()
          return all.some((l) => l.level === "warn") ? all : undefined
        })
      )
      expect(lines.filter((l) => l.level === "info" || l.level === "debug")).toEqual([])
      expect(lines.some((l) => l.msg === "request")).toBe(false)
    })
  )
})
