/**
 * The typed client (`@gateway/client`) against a real gateway process with keys on, in front of
 * a real simulator: every admin operation, usage, status and a request's events through the RPC
 * API; completions through the same pipeline as the HTTP endpoint (a stream arriving chunk by
 * chunk with the HTTP endpoint's content for the same seed); typed errors for bad input, missing
 * or wrong keys, keys without the `internal` scope and another tenant's data; and the
 * Promise-based wrapper.
 */
import { expect, layer } from "@effect/vitest"
import { createGatewayClient, GatewayClient } from "@gateway/client"
import { Context, Effect, Either, Layer, Stream } from "effect"
import * as Admin from "./support/Admin.js"
import { contentChunks, postChat, readSse } from "./support/Http.js"
import * as Processes from "./support/Processes.js"

const outputTokens = 8
const itlMs = 25
const messages = [{ role: "user" as const, content: "Say something about gateways." }]

class Stack extends Context.Tag("test/Rpc/Stack")<
  Stack,
  {
    readonly sim: Processes.Sim
    readonly gateway: Processes.Gateway
    readonly adminKey: string
    /** The admin key's client. */
    readonly admin: GatewayClient.Client
    /** A service key (`internal` scope) of tenant `alpha`, and its secret. */
    readonly alpha: GatewayClient.Client
    readonly alphaKey: { readonly id: string; readonly key: string }
    /** A service key of tenant `beta`. */
    readonly beta: GatewayClient.Client
    readonly betaKey: { readonly id: string; readonly key: string }
  }
>() {
  static readonly layer = Layer.scoped(
    Stack,
    Effect.gen(function* () {
      const simPort = yield* Processes.freePort
      const simUrl = `http://127.0.0.1:${simPort}`
      const adminKey = Admin.newAdminKey()
      const [sim, gateway] = yield* Effect.all(
        [
          Processes.startSim({ port: simPort, model: "small", ttftMs: 5, itlMs, outputTokens, seed: 1 }),
          Processes.startGateway(
            {
              server: { host: "127.0.0.1" },
              pool: Processes.singleAttempt,
              models: [{ name: "small", backends: [{ id: "small-1", url: simUrl }] }]
            },
            Admin.authEnv(adminKey)
          )
        ],
        { concurrency: "unbounded" }
      )
      const alphaKey = yield* Admin.createKey(gateway.url, adminKey, {
        tenant: "alpha",
        name: "alpha-service",
        scopes: ["internal"]
      })
      const betaKey = yield* Admin.createKey(gateway.url, adminKey, {
        tenant: "beta",
        name: "beta-service",
        scopes: ["internal"]
      })
      return {
        sim,
        gateway,
        adminKey,
        admin: yield* clientFor(gateway.url, adminKey),
        alpha: yield* clientFor(gateway.url, alphaKey.key),
        alphaKey,
        beta: yield* clientFor(gateway.url, betaKey.key),
        betaKey
      }
    })
  )
}

/** A client of the gateway at `url` with `key`, for the rest of the scope. */
const clientFor = (url: string, key: string) =>
  Effect.map(Layer.build(GatewayClient.layer({ url, key })), (context) =>
    Context.get(context, GatewayClient.GatewayClient)
  )

/** The typed failure of `effect`, which must fail. */
const failure = <A, E, R>(effect: Effect.Effect<A, E, R>) =>
  Effect.flatMap(Effect.either(effect), (result) =>
    Either.isLeft(result)
      ? Effect.succeed(result.left)
      : Effect.dieMessage(`expected a failure, got a success`)
  )

/** The request id on a failure, when it has one (a completion's errors do). */
const requestIdOf = (error: unknown): string | undefined =>
  (error as { readonly requestId?: string }).requestId

/** An HTTP completion with this key; its `x-gateway-request-id`. */
const httpCompletion = (url: string, key: string) =>
  Effect.gen(function* () {
    const res = yield* postChat(url, { model: "small", messages }, { headers: Admin.bearer(key) })
    expect(res.status).toBe(200)
    yield* Effect.promise(() => res.text())
    return res.headers.get("x-gateway-request-id")!
  })

layer(Stack.layer, { excludeTestServices: true, timeout: "60 seconds" })("Rpc", (it) => {
  it.effect("tenants: create, get, list, update limits and policy binding", () =>
    Effect.gen(function* () {
      const { admin } = yield* Stack
      const created = yield* admin.Tenants.create({
        id: "gamma",
        name: "Gamma Inc",
        limits: { requests_per_minute: 100, budget_usd: 12.5, budget_period: "day" },
        metadata: { team: "search" }
      })
      expect(created).toMatchObject({
        id: "gamma",
        name: "Gamma Inc",
        metadata: { team: "search" },
        policy: null,
        limits: {
          requests_per_minute: 100,
          tokens_per_minute: null,
          concurrent_requests: null,
          budget_usd: 12.5,
          budget_period: "day"
        }
      })
      expect(created.createdAt).toBeInstanceOf(Date)
      expect(yield* admin.Tenants.get({ id: "gamma" })).toEqual(created)
      const all = yield* admin.Tenants.list()
      expect(all.map((t) => t.id)).toEqual(expect.arrayContaining(["alpha", "beta", "gamma"]))
      const changed = yield* admin.Tenants.update({
        id: "gamma",
        limits: { requests_per_minute: null, tokens_per_minute: 5000 }
      })
      expect(changed.limits).toMatchObject({
        requests_per_minute: null,
        tokens_per_minute: 5000,
        budget_usd: 12.5
      })
      expect((yield* admin.Tenants.get({ id: "gamma" })).limits.tokens_per_minute).toBe(5000)
      // A second create of the same tenant is a conflict, an unknown one is not found.
      expect(yield* failure(admin.Tenants.create({ id: "gamma" }))).toMatchObject({ _tag: "Conflict" })
      expect(yield* failure(admin.Tenants.get({ id: "nobody" }))).toMatchObject({
        _tag: "NotFound",
        what: "tenant",
        id: "nobody"
      })
    })
  )

  it.effect("keys: create (secret once), get, list, update limits and models, revoke", () =>
    Effect.gen(function* () {
      const { admin, gateway } = yield* Stack
      const { key, secret } = yield* admin.Keys.create({
        tenant: "delta",
        name: "app",
        models: ["small"],
        limits: { requests_per_minute: 60 },
        metadata: { app: "search" }
      })
      expect(secret).toMatch(/^gw-/)
      expect(key).toMatchObject({
        tenant: "delta",
        name: "app",
        prefix: secret.slice(0, 7),
        models: ["small"],
        scopes: [],
        metadata: { app: "search" },
        revokedAt: null
      })
      expect(key.limits.requests_per_minute).toBe(60)
      // The tenant was created with it, and the key works on the HTTP endpoint.
      expect((yield* admin.Tenants.get({ id: "delta" })).id).toBe("delta")
      yield* httpCompletion(gateway.url, secret)

      expect(yield* admin.Keys.get({ id: key.id })).toEqual(key)
      expect((yield* admin.Keys.list({ tenant: "delta" })).map((k) => k.id)).toEqual([key.id])

      const updated = yield* admin.Keys.update({
        id: key.id,
        limits: { requests_per_minute: 30, concurrent_requests: 2 },
        models: null
      })
      expect(updated.limits).toMatchObject({ requests_per_minute: 30, concurrent_requests: 2 })
      expect(updated.models).toBeNull()

      const revoked = yield* admin.Keys.revoke({ id: key.id, reason: "rotated" })
      expect(revoked.revokedAt).toBeInstanceOf(Date)
      expect(revoked.revokedReason).toBe("rotated")
      expect(yield* admin.Keys.list({ tenant: "delta" })).toEqual([])
      expect((yield* admin.Keys.list({ tenant: "delta", includeRevoked: true })).map((k) => k.id)).toEqual([
        key.id
      ])
      // The revoked key no longer opens anything.
      const res = yield* postChat(
        gateway.url,
        { model: "small", messages },
        { headers: Admin.bearer(secret) }
      )
      expect(res.status).toBe(401)
    })
  )

  it.effect("usage by key, tenant, model and hour; a service key sees its own tenant only", () =>
    Effect.gen(function* () {
      const { admin, alpha, gateway, alphaKey, betaKey } = yield* Stack
      yield* httpCompletion(gateway.url, alphaKey.key)
      yield* httpCompletion(gateway.url, alphaKey.key)
      yield* httpCompletion(gateway.url, betaKey.key)
      const byKey = (id: string) =>
        Processes.eventually(
          `usage of ${id}`,
          Effect.map(admin.Usage.query({ key: id, groupBy: ["key"] }), (report) =>
            report.rows.length === 1 && report.rows[0]!.requests >= (id === alphaKey.id ? 2 : 1)
              ? report
              : undefined
          ),
          "10 seconds"
        )
      const alphaUsage = yield* byKey(alphaKey.id)
      yield* byKey(betaKey.id)
      expect(alphaUsage.groupBy).toEqual(["key"])
      expect(alphaUsage.rows[0]).toMatchObject({ key: alphaKey.id, requests: 2 })
      expect(alphaUsage.rows[0]!.completionTokens).toBe(2 * outputTokens)
      expect(alphaUsage.rows[0]!.totalTokens).toBe(
        alphaUsage.rows[0]!.promptTokens + alphaUsage.rows[0]!.completionTokens
      )
      expect(alphaUsage.total.requests).toBe(2)

      const byTenantModelHour = yield* admin.Usage.query({
        groupBy: ["tenant", "model", "hour"],
        from: new Date(Date.now() - 3_600_000),
        tenant: "alpha"
      })
      expect(byTenantModelHour.rows).toHaveLength(1)
      expect(byTenantModelHour.rows[0]).toMatchObject({ tenant: "alpha", model: "small", requests: 2 })
      expect(byTenantModelHour.rows[0]!.hour).toBeInstanceOf(Date)
      // A time range with nothing in it.
      const empty = yield* admin.Usage.query({ from: new Date("2020-01-01"), to: new Date("2020-01-02") })
      expect(empty.rows).toEqual([])
      expect(empty.total.requests).toBe(0)

      // The service key of alpha: only alpha, whatever it asks for.
      const own = yield* alpha.Usage.query({ groupBy: ["tenant"] })
      expect(own.rows.map((r) => r.tenant)).toEqual(["alpha"])
      expect(yield* failure(alpha.Usage.query({ tenant: "beta" }))).toMatchObject({
        _tag: "Forbidden",
        code: "other_tenant"
      })
      expect((yield* alpha.Usage.query({ key: betaKey.id })).rows).toEqual([])
    })
  )

  it.effect("backend and projection status", () =>
    Effect.gen(function* () {
      const { admin, alpha } = yield* Stack
      const backends = yield* admin.Backends.status()
      expect(backends).toHaveLength(1)
      expect(backends[0]).toMatchObject({ id: "small-1", model: "small", health: "healthy" })
      expect(backends[0]!.circuit.state).toBe("closed")
      expect(backends[0]!.circuit.since).toBeInstanceOf(Date)
      expect((yield* alpha.Backends.status()).map((b) => b.id)).toEqual(["small-1"])

      const projections = yield* Processes.eventually(
        "projections caught up",
        Effect.map(admin.Projections.status(), (all) => (all.every((p) => p.lag === 0) ? all : undefined)),
        "10 seconds"
      )
      expect(projections.map((p) => p.name)).toEqual(
        expect.arrayContaining(["dead_letters", "request_log", "usage_hourly"])
      )
      for (const p of projections) {
        expect(p.lastError).toBeNull()
        expect(p.leader).toBe(true)
        expect(BigInt(p.position)).toBeGreaterThan(0n)
      }
    })
  )

  it.effect("a request's events, decoded; another tenant's request is refused", () =>
    Effect.gen(function* () {
      const { admin, alpha, beta, gateway, alphaKey } = yield* Stack
      const requestId = yield* httpCompletion(gateway.url, alphaKey.key)
      const events = yield* Processes.eventually(
        "the request's terminal event",
        Effect.map(admin.Events.forRequest({ requestId }), (events) =>
          events.some((e) => e.event._tag === "RequestCompleted") ? events : undefined
        )
      )
      expect(events.map((e) => e.event._tag)).toEqual(
        expect.arrayContaining(["RequestReceived", "RequestRouted", "AttemptStarted", "RequestCompleted"])
      )
      expect(events.map((e) => e.streamVersion)).toEqual(events.map((_, i) => i + 1))
      const completed = events.find((e) => e.event._tag === "RequestCompleted")!
      expect(completed.metadata).toMatchObject({ requestId, keyId: alphaKey.id, tenantId: "alpha" })
      expect(completed.event).toMatchObject({ model: "small", completionTokens: outputTokens })

      expect(yield* alpha.Events.forRequest({ requestId })).toEqual(events)
      expect(yield* failure(beta.Events.forRequest({ requestId }))).toMatchObject({
        _tag: "Forbidden",
        code: "other_tenant"
      })
      expect(yield* failure(admin.Events.forRequest({ requestId: "no-such-request" }))).toMatchObject({
        _tag: "RequestNotFound",
        requestId: "no-such-request"
      })
      expect(yield* failure(admin.Events.forRequest({ requestId: "not a request id!" }))).toMatchObject({
        _tag: "InvalidRequest",
        param: "requestId"
      })
    })
  )

  it.effect("a streamed completion arrives chunk by chunk with the HTTP endpoint's content", () =>
    Effect.scoped(
      Effect.gen(function* () {
        const { alpha, gateway, sim, alphaKey } = yield* Stack
        // Reseeding before each request makes both draw the same words.
        yield* sim.withConfig({ seed: 42 })
        const res = yield* postChat(
          gateway.url,
          { model: "small", messages, stream: true },
          { headers: Admin.bearer(alphaKey.key) }
        )
        const http = yield* readSse(res)
        expect(http.done).toBe(true)
        yield* sim.withConfig({ seed: 42 })
        const arrivals: Array<number> = []
        const chunks = yield* alpha.ChatCompletion({ model: "small", messages }).pipe(
          Stream.tap(() => Effect.sync(() => arrivals.push(performance.now()))),
          Stream.runCollect,
          Effect.map((c) => Array.from(c))
        )
        const text = (cs: ReadonlyArray<any>) =>
          contentChunks(cs)
            .map((c) => c.choices[0].delta.content)
            .join("")
        expect(text(chunks)).toBe(text(http.events))
        expect(contentChunks(chunks)).toHaveLength(outputTokens)
        expect(chunks.every((c) => c.object === "chat.completion.chunk" && c.model === "small")).toBe(true)
        expect(chunks.filter((c) => c.choices[0]?.finish_reason === "stop")).toHaveLength(1)
        // The first chunk names the request the gateway recorded; its events end completed.
        const requestId = chunks[0]!.gateway_request_id!
        expect(requestId).toEqual(expect.any(String))
        expect(chunks.slice(1).every((c) => c.gateway_request_id === undefined)).toBe(true)
        const recorded = yield* Processes.eventually(
          "the streamed completion's events",
          Effect.map(alpha.Events.forRequest({ requestId }), (events) =>
            events.at(-1)?.event._tag === "RequestCompleted" ? events : undefined
          ),
          "10 seconds"
        )
        expect(recorded[0]!.event._tag).toBe("RequestReceived")
        // Chunk by chunk: the tokens come `itlMs` apart, and so do their arrivals.
        const spread = arrivals.at(-1)! - arrivals[0]!
        expect(spread).toBeGreaterThan((outputTokens - 2) * itlMs * 0.5)

        // With include_usage, the usage chunk comes last, as over HTTP.
        const withUsage = yield* Stream.runCollect(
          alpha.ChatCompletion({ model: "small", messages, stream_options: { include_usage: true } })
        )
        const last = Array.from(withUsage).at(-1)!
        expect(last.usage?.completion_tokens).toBe(outputTokens)
      })
    )
  )

  it.effect("ChatCompletionOnce answers the HTTP endpoint's content, and is recorded like it", () =>
    Effect.scoped(
      Effect.gen(function* () {
        const { alpha, admin, gateway, sim, alphaKey } = yield* Stack
        // Usage before both requests: the projection may take either at any time.
        const before = (yield* admin.Usage.query({ key: alphaKey.id, groupBy: [] })).total.requests
        yield* sim.withConfig({ seed: 7 })
        const res = yield* postChat(
          gateway.url,
          { model: "small", messages },
          { headers: Admin.bearer(alphaKey.key) }
        )
        const http = (yield* Effect.promise(() => res.json())) as any
        yield* sim.withConfig({ seed: 7 })
        const completion = yield* alpha.ChatCompletionOnce({ model: "small", messages })
        expect(completion.object).toBe("chat.completion")
        expect(completion.choices[0]!.message.content).toBe(http.choices[0].message.content)
        expect(completion.usage?.completion_tokens).toBe(outputTokens)
        // The gateway's id of the request, as HTTP's x-gateway-request-id: the key to its events.
        expect(completion.gateway_request_id).toMatch(
          /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/
        )
        const events = yield* alpha.Events.forRequest({ requestId: completion.gateway_request_id! })
        expect(events.map((e) => e.event._tag)).toEqual([
          "RequestReceived",
          "RequestRouted",
          "AttemptStarted",
          "RequestCompleted"
        ])
        // Billed to the service key, like the HTTP request.
        yield* Processes.eventually(
          "the HTTP and the RPC completion in usage",
          Effect.map(admin.Usage.query({ key: alphaKey.id, groupBy: [] }), (r) =>
            r.total.requests === before + 2 ? r : undefined
          ),
          "10 seconds"
        )
      })
    )
  )

  it.effect("typed errors for bad input", () =>
    Effect.gen(function* () {
      const { admin, alpha } = yield* Stack
      expect(
        yield* failure(admin.Keys.create({ tenant: "alpha", name: "x", limits: { requests_per_minute: -1 } }))
      ).toMatchObject({ _tag: "InvalidRequest", param: "limits.requests_per_minute" })
      expect(yield* failure(admin.Keys.create({ tenant: "alpha", name: " " }))).toMatchObject({
        _tag: "InvalidRequest",
        param: "name"
      })
      expect(yield* failure(admin.Keys.create({ tenant: "alpha", name: "x", models: [""] }))).toMatchObject({
        _tag: "InvalidRequest",
        param: "models.0"
      })
      expect(yield* failure(admin.Tenants.create({ id: "not a tenant id!" }))).toMatchObject({
        _tag: "InvalidRequest",
        param: "id"
      })
      expect(
        yield* failure(admin.Tenants.update({ id: "alpha", limits: { budget_period: "day" } }))
      ).toMatchObject({ _tag: "InvalidRequest", param: "limits.budget_period" })
      expect(yield* failure(admin.Keys.update({ id: "key_nope", limits: {} }))).toMatchObject({
        _tag: "NotFound",
        what: "key"
      })
      expect(
        yield* failure(admin.Keys.create({ tenant: "alpha", name: "x", policy: "no-such-policy" }))
      ).toMatchObject({ _tag: "InvalidRequest", param: "policy" })
      // A completion is validated as on the HTTP endpoint, field named the same way.
      expect(yield* failure(alpha.ChatCompletionOnce({ model: "small", messages: [] }))).toMatchObject({
        _tag: "InvalidRequest",
        param: "messages"
      })
      expect(
        yield* failure(Stream.runDrain(alpha.ChatCompletion({ model: "small", messages, temperature: 7 })))
      ).toMatchObject({ _tag: "InvalidRequest", param: "temperature" })
      // A completion's error names the request it was recorded as (an admin call's has none).
      const unknownModel = yield* failure(alpha.ChatCompletionOnce({ model: "nope", messages }))
      expect(unknownModel).toMatchObject({
        _tag: "ModelNotFound",
        model: "nope",
        requestId: expect.any(String)
      })
      const rejected = yield* alpha.Events.forRequest({ requestId: requestIdOf(unknownModel)! })
      expect(rejected.at(-1)!.event._tag).toBe("RequestRejected")
      expect(requestIdOf(yield* failure(admin.Tenants.create({ id: "not a tenant id!" })))).toBeUndefined()
    })
  )

  it.effect("typed errors for a missing, wrong or revoked key, and a key without the internal scope", () =>
    Effect.scoped(
      Effect.gen(function* () {
        const { gateway, adminKey } = yield* Stack
        const none = yield* clientFor(gateway.url, "")
        const wrong = yield* clientFor(gateway.url, "gw-not-a-key")
        expect(yield* failure(none.Tenants.list())).toMatchObject({ _tag: "Unauthorized" })
        expect(yield* failure(wrong.Keys.list({}))).toMatchObject({ _tag: "Unauthorized" })
        expect(
          yield* failure(Stream.runDrain(wrong.ChatCompletion({ model: "small", messages })))
        ).toMatchObject({ _tag: "Unauthorized" })
        const plain = yield* Admin.createKey(gateway.url, adminKey, { tenant: "alpha", name: "plain" })
        const app = yield* clientFor(gateway.url, plain.key)
        expect(yield* failure(app.Usage.query({}))).toMatchObject({
          _tag: "Forbidden",
          code: "internal_only"
        })
        expect(yield* failure(app.ChatCompletionOnce({ model: "small", messages }))).toMatchObject({
          _tag: "Forbidden",
          code: "internal_only"
        })
        yield* Admin.revokeKey(gateway.url, adminKey, plain.id)
        expect(yield* failure(app.Keys.list({}))).toMatchObject({
          _tag: "Unauthorized",
          message: "This API key has been revoked."
        })
        // The admin key manages, but has no tenant to bill a completion to.
        const admin = yield* clientFor(gateway.url, adminKey)
        expect(yield* failure(admin.ChatCompletionOnce({ model: "small", messages }))).toMatchObject({
          _tag: "Unauthorized"
        })
      })
    )
  )

  it.effect("a service key sees and changes its own tenant only", () =>
    Effect.gen(function* () {
      const { alpha, alphaKey, betaKey } = yield* Stack
      const otherTenant = { _tag: "Forbidden", code: "other_tenant" }
      const adminOnly = { _tag: "Forbidden", code: "admin_only" }
      expect(yield* failure(alpha.Keys.get({ id: betaKey.id }))).toMatchObject(otherTenant)
      expect(yield* failure(alpha.Keys.list({ tenant: "beta" }))).toMatchObject(otherTenant)
      expect(yield* failure(alpha.Keys.revoke({ id: betaKey.id }))).toMatchObject(otherTenant)
      expect(yield* failure(alpha.Keys.update({ id: betaKey.id, models: ["small"] }))).toMatchObject(
        otherTenant
      )
      expect(yield* failure(alpha.Keys.create({ tenant: "beta", name: "intruder" }))).toMatchObject(
        otherTenant
      )
      expect(yield* failure(alpha.Tenants.get({ id: "beta" }))).toMatchObject(otherTenant)
      expect(yield* failure(alpha.Tenants.create({ id: "epsilon" }))).toMatchObject(adminOnly)
      expect(
        yield* failure(alpha.Tenants.update({ id: "alpha", limits: { requests_per_minute: 1 } }))
      ).toMatchObject(adminOnly)
      expect(
        yield* failure(alpha.Keys.create({ tenant: "alpha", name: "root", scopes: ["admin"] }))
      ).toMatchObject(adminOnly)

      // Its own: listed, created, changed and revoked.
      expect((yield* alpha.Tenants.list()).map((t) => t.id)).toEqual(["alpha"])
      expect((yield* alpha.Tenants.get({ id: "alpha" })).id).toBe("alpha")
      const { key } = yield* alpha.Keys.create({ tenant: "alpha", name: "worker" })
      const listed = yield* alpha.Keys.list({})
      expect(listed.every((k) => k.tenant === "alpha")).toBe(true)
      expect(listed.map((k) => k.id)).toEqual(expect.arrayContaining([alphaKey.id, key.id]))
      expect((yield* alpha.Keys.update({ id: key.id, models: ["small"] })).models).toEqual(["small"])
      expect((yield* alpha.Keys.revoke({ id: key.id })).revokedAt).toBeInstanceOf(Date)
    })
  )

  it.effect(
    "the Promise client: async calls, a streamed completion as an async iterable, typed rejections",
    () =>
      Effect.gen(function* () {
        const { gateway, alphaKey } = yield* Stack
        const result = yield* Effect.promise(async () => {
          const client = createGatewayClient({ url: gateway.url, key: alphaKey.key })
          try {
            const keys = await client.keys.list({})
            const tenants = await client.tenants.list()
            const chunks: Array<unknown> = []
            for await (const chunk of client.chat.stream({ model: "small", messages })) chunks.push(chunk)
            const whole = await client.chat.create({ model: "small", messages })
            const rejected = await client.tenants.get({ id: "beta" }).then(
              () => undefined,
              (error: unknown) => error
            )
            // Leaving the loop early cancels the stream.
            let first: unknown
            for await (const chunk of client.chat.stream({ model: "small", messages })) {
              first = chunk
              break
            }
            return { keys, tenants, chunks, whole, rejected, first }
          } finally {
            await client.close()
          }
        })
        expect(result.keys.map((k) => k.tenant)).toContain("alpha")
        expect(result.tenants.map((t) => t.id)).toEqual(["alpha"])
        expect(contentChunks(result.chunks)).toHaveLength(outputTokens)
        expect(result.whole.usage?.completion_tokens).toBe(outputTokens)
        expect(result.rejected).toBeInstanceOf(Error)
        expect(result.rejected).toMatchObject({ _tag: "Forbidden", code: "other_tenant" })
        expect(result.first).toMatchObject({ object: "chat.completion.chunk" })
      })
  )
})
