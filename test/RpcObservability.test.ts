/**
 * Completions over the internal RPC API are traffic like any other: each is counted in
 * `/metrics` (requests, tokens, in flight) and has its access-log line, with the RPC's name as
 * its path, the tenant and key name, the model, backend, status and tokens.
 */
import { expect, layer } from "@effect/vitest"
import { GatewayClient } from "@gateway/client"
import { Context, Effect, Layer, Stream } from "effect"
import * as Admin from "./support/Admin.js"
import * as Processes from "./support/Processes.js"

const outputTokens = 6
const messages = [{ role: "user" as const, content: "Say something about gateways." }]

class Stack extends Context.Tag("test/RpcObservability/Stack")<
  Stack,
  {
    readonly gateway: Processes.Gateway
    readonly adminKey: string
    readonly client: GatewayClient.Client
  }
>() {
  static readonly layer = Layer.scoped(
    Stack,
    Effect.gen(function* () {
      const simPort = yield* Processes.freePort
      const adminKey = Admin.newAdminKey()
      yield* Processes.startSim({ port: simPort, model: "small", ttftMs: 5, itlMs: 2, outputTokens, seed: 3 })
      const gateway = yield* Processes.startGateway(
        {
          server: { host: "127.0.0.1" },
          pool: Processes.singleAttempt,
          models: [{ name: "small", backends: [{ id: "small-1", url: `http://127.0.0.1:${simPort}` }] }]
        },
        Admin.authEnv(adminKey)
      )
      const service = yield* Admin.createKey(gateway.url, adminKey, {
        tenant: "gamma",
        name: "gamma-service",
        scopes: ["internal"]
      })
      const client = yield* Effect.map(
        Layer.build(GatewayClient.layer({ url: gateway.url, key: service.key })),
        (context) => Context.get(context, GatewayClient.GatewayClient)
      )
      return { gateway, adminKey, client }
    })
  )
}

/** The value of `name` with these labels in the exposition text (0 when absent). */
const sample = (text: string, name: string, labels: Record<string, string>) => {
  let total = 0
  for (const line of text.split("\n")) {
    if (!line.startsWith(`${name}{`)) continue
    const body = line.slice(name.length + 1, line.lastIndexOf("}"))
    const got = Object.fromEntries(
      Array.from(body.matchAll(/([a-zA-Z_]+)="([^"]*)"/g), (m) => [m[1]!, m[2]!] as const)
    )
    if (Object.entries(labels).every(([k, v]) => got[k] === v))
      total += Number(line.slice(line.lastIndexOf(" ") + 1))
  }
  return total
}

layer(Stack.layer, { excludeTestServices: true, timeout: "60 seconds" })("RPC completions observed", (it) => {
  it.effect("each RPC completion is counted in /metrics and logged with its fields", () =>
    Effect.gen(function* () {
      const { gateway, adminKey, client } = yield* Stack
      const once = yield* client.ChatCompletionOnce({ model: "small", messages })
      expect(once.choices[0]?.message.content).toBeTruthy()
      const chunks = yield* Stream.runCollect(client.ChatCompletion({ model: "small", messages }))
      expect(chunks.length).toBeGreaterThan(0)

      const lines = yield* Processes.eventually(
        "the access lines of both RPC completions",
        Effect.sync(() => {
          const found = gateway
            .logs()
            .filter((l) => l.msg === "request" && l.method === "RPC")
            .map((l) => l as Record<string, unknown>)
          return found.length >= 2 ? found : undefined
        })
      )
      const byPath = Object.fromEntries(lines.map((l) => [l.path as string, l]))
      for (const [path, stream] of [
        ["ChatCompletionOnce", false],
        ["ChatCompletion", true]
      ] as const) {
        expect(byPath[path]).toMatchObject({
          level: "info",
          status: 200,
          tenant: "gamma",
          key_name: "gamma-service",
          model: "small",
          backend: "small-1",
          stream,
          completion_tokens: outputTokens
        })
      }
      expect(byPath.ChatCompletion!.ttft_ms as number).toBeGreaterThan(0)

      const text = yield* Effect.promise(() =>
        fetch(`${gateway.url}/metrics`, { headers: Admin.bearer(adminKey) }).then((r) => r.text())
      )
      expect(
        sample(text, "gateway_requests_total", { model: "small", status_class: "2xx", tenant: "gamma" })
      ).toBe(2)
      expect(
        sample(text, "gateway_tokens_total", { model: "small", tenant: "gamma", type: "completion" })
      ).toBe(2 * outputTokens)
      expect(text).toMatch(/^gateway_requests_in_flight 0$/m)
    })
  )
})
