import { describe, expect, it } from "@effect/vitest"
import type { Principal } from "@gateway/core/Auth"
import { BackendJournal } from "@gateway/core/BackendJournal"
import * as BackendPool from "@gateway/core/BackendPool"
import type { KeyRecord, TenantRecord } from "@gateway/core/KeyRegistry"
import { Models } from "@gateway/core/Models"
import { Router } from "@gateway/core/Router"
import * as Settings from "@gateway/core/Settings"
import { Upstream } from "@gateway/core/Upstream"
import { GatewayConfig, Ids, type OpenAi } from "@gateway/domain"
import { Effect, Layer, Schema } from "effect"

const config = Schema.decodeUnknownSync(GatewayConfig.GatewayConfig)({
  pool: { health: { active: false } },
  routing: {
    policies: [
      { name: "auto", tiers: { simple: "small", moderate: "small", complex: "large" } },
      { name: "auto-cheap", tiers: { simple: "small", moderate: "small", complex: "small" } },
      { name: "auto-best", tiers: { simple: "large", moderate: "large", complex: "large" } }
    ]
  },
  models: [
    { name: "small", backends: [{ id: "small-1", url: "http://127.0.0.1:9001" }] },
    { name: "large", backends: [{ id: "large-1", url: "http://127.0.0.1:9002" }] }
  ]
})

const layer = Router.Default.pipe(
  Layer.provideMerge(BackendPool.layer({ gateway: "test" })),
  Layer.provide(Layer.succeed(BackendJournal, BackendJournal.of({ record: () => {} }))),
  Layer.provide(Models.Default),
  Layer.provide(Settings.layer(config)),
  Layer.provide(
    Layer.succeed(
      Upstream,
      Upstream.of({
        chat: () => Effect.die("not called"),
        probe: () => Effect.succeed({ status: 200, body: "" })
      })
    )
  )
)

const tenant = (policy: string | null): TenantRecord => ({
  tenantId: Ids.TenantId.make("acme"),
  name: "Acme",
  limits: {},
  metadata: {},
  policy,
  createdAt: new Date(0),
  version: 1
})

const caller = (keyPolicy: string | null, tenantPolicy: string | null): Principal => {
  const key: KeyRecord = {
    keyId: Ids.KeyId.make("key_1"),
    tenantId: Ids.TenantId.make("acme"),
    name: "app",
    hash: "0".repeat(64),
    prefix: "gw-abcd",
    models: null,
    limits: {},
    scopes: [],
    metadata: {},
    policy: keyPolicy,
    createdAt: new Date(0),
    revoked: null,
    version: 1
  }
  return { keyId: key.keyId, tenantId: key.tenantId, keyName: key.name, key, tenant: tenant(tenantPolicy) }
}

/** A design question the default classifier calls complex. */
const complex: OpenAi.ChatCompletionRequest = {
  model: "auto",
  messages: [
    {
      role: "user",
      content:
        "Design a distributed rate limiter. Explain the trade-offs step by step and compare token bucket with sliding window; it must be exact across replicas.\n```ts\nfunction admit(key: string) {\n  return redis.eval(script, 1, key);\n}\n```\n1. Why would it fail?\n2. How do you test it?"
    }
  ]
}

const route = (body: OpenAi.ChatCompletionRequest, principal?: Principal) =>
  Effect.flatMap(Router, (router) => router.route(body, Ids.newRequestId(), principal))

describe("Router policy bindings", () => {
  it.effect("a policy name means the key's bound policy, else its tenant's, else the one named", () =>
    Effect.gen(function* () {
      const unbound = yield* route(complex)
      expect([unbound.decision?.policy, unbound.primary.name]).toEqual(["auto", "large"])

      const tenantBound = yield* route(complex, caller(null, "auto-cheap"))
      expect([
        tenantBound.decision?.policy,
        tenantBound.decision?.classification.tier,
        tenantBound.primary.name
      ]).toEqual(["auto-cheap", "complex", "small"])

      const keyBound = yield* route(complex, caller("auto-best", "auto-cheap"))
      expect([keyBound.decision?.policy, keyBound.primary.name]).toEqual(["auto-best", "large"])
      // Any policy name the caller sends means its binding.
      const named = yield* route({ ...complex, model: "auto-cheap" }, caller("auto-best", null))
      expect(named.decision?.policy).toBe("auto-best")
    }).pipe(Effect.provide(layer))
  )

  it.effect("a concrete model bypasses the classifier, bound or not", () =>
    Effect.gen(function* () {
      const routed = yield* route({ ...complex, model: "small" }, caller("auto-best", "auto-best"))
      expect(routed.decision).toBeUndefined()
      expect(routed.primary.name).toBe("small")
    }).pipe(Effect.provide(layer))
  )
})
