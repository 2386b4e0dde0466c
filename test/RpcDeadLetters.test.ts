/**
 * The dead-letter calls of the internal RPC API through the typed client, against a real gateway
 * (`store_payloads: full`) in front of a real simulator made to fail every attempt and then
 * healed: `DeadLetters.list` shows a letter with its reason, `get` its events; `retry` completes
 * it on the same stream (recorded under the caller's key id, billed once) and a second retry is
 * a typed `DeadLetterNotFound`; `discard` records its reason and who; a bulk retry by a service
 * key takes only its own tenant's letters; another tenant's service key is `Forbidden`
 * (`other_tenant`) for every call; bad input is an `InvalidRequest` naming the field.
 */
import { expect, layer } from "@effect/vitest"
import { createGatewayClient, GatewayClient } from "@gateway/client"
import { Context, Effect, Either, Layer } from "effect"
import * as Admin from "./support/Admin.js"
import { messages, postChat } from "./support/Http.js"
import * as Processes from "./support/Processes.js"

const model = "small"

class Stack extends Context.Tag("test/RpcDeadLetters/Stack")<
  Stack,
  {
    readonly sim: Processes.Sim
    readonly gateway: Processes.Gateway
    readonly adminKey: string
    readonly admin: GatewayClient.Client
    /** Service keys (`internal` scope) of tenants `alpha` and `beta`. */
    readonly alpha: GatewayClient.Client
    readonly alphaKey: { readonly id: string; readonly key: string }
    readonly beta: GatewayClient.Client
    readonly betaKey: { readonly id: string; readonly key: string }
  }
>() {
  static readonly layer = Layer.scoped(
    Stack,
    Effect.gen(function* () {
      const simPort = yield* Processes.freePort
      const adminKey = Admin.newAdminKey()
      const [sim, gateway] = yield* Effect.all(
        [
          Processes.startSim({ port: simPort, model, ttftMs: 5, itlMs: 1, outputTokens: 8, seed: 1 }),
          Processes.startGateway(
            {
              server: { host: "127.0.0.1" },
              // Two attempts, no breaker or ejection in the way of the healed backend.
              pool: {
                retry: { max_attempts: 2, base_delay_ms: 5, max_delay_ms: 10 },
                circuit_breaker: { consecutive_failures: 1_000_000, minimum_requests: 1_000_000 },
                health: { active: false, eject_after_failures: 0 }
              },
              events: { store_payloads: "full" },
              models: [
                {
                  name: model,
                  pricing: { input_per_million_usd: 0.15, output_per_million_usd: 0.6 },
                  backends: [{ id: "small-1", url: `http://127.0.0.1:${simPort}` }]
                }
              ]
            },
            Admin.authEnv(adminKey)
          )
        ],
        { concurrency: "unbounded" }
      )
      const [alphaKey, betaKey] = yield* Effect.all(
        ["alpha", "beta"].map((tenant) =>
          Admin.createKey(gateway.url, adminKey, { tenant, name: `${tenant}-service`, scopes: ["internal"] })
        )
      )
      return {
        sim,
        gateway,
        adminKey,
        admin: yield* clientFor(gateway.url, adminKey),
        alpha: yield* clientFor(gateway.url, alphaKey!.key),
        alphaKey: alphaKey!,
        beta: yield* clientFor(gateway.url, betaKey!.key),
        betaKey: betaKey!
      }
    })
  )
}

const clientFor = (url: string, key: string) =>
  Effect.map(Layer.build(GatewayClient.layer({ url, key })), (context) =>
    Context.get(context, GatewayClient.GatewayClient)
  )

/** The typed failure of `effect`, which must fail. */
const failure = <A, E, R>(effect: Effect.Effect<A, E, R>) =>
  Effect.flatMap(Effect.either(effect), (result) =>
    Either.isLeft(result)
      ? Effect.succeed(result.left)
      : Effect.dieMessage("expected a failure, got a success")
  )

/** A chat request with `key`; its gateway request id and status. */
const ask = (key: string) =>
  Effect.flatMap(Stack, ({ gateway }) =>
    Effect.flatMap(postChat(gateway.url, { model, messages }, { headers: Admin.bearer(key) }), (res) =>
      Effect.map(
        Effect.promise(() => res.text()),
        () => ({ id: res.headers.get("x-gateway-request-id")!, status: res.status })
      )
    )
  )

/** Waits until the admin's list has `id` (the projection has caught up) matching `check`. */
const listed = (id: string, check: (letter: { readonly requestId: string }) => boolean = () => true) =>
  Effect.flatMap(Stack, ({ admin }) =>
    Processes.eventually(
      `dead letter ${id} listed`,
      Effect.map(admin.DeadLetters.list({ limit: 500 }), (page) =>
        page.data.find((l) => l.requestId === id && check(l))
      ),
      "10 seconds"
    )
  )

const unlisted = (id: string) =>
  Effect.flatMap(Stack, ({ admin }) =>
    Processes.eventually(
      `dead letter ${id} cleared`,
      Effect.map(admin.DeadLetters.list({ limit: 500 }), (page) =>
        page.data.some((l) => l.requestId === id) ? undefined : true
      ),
      "10 seconds"
    )
  )

layer(Stack.layer, { excludeTestServices: true, timeout: "90 seconds" })("Rpc DeadLetters", (it) => {
  it.effect("list, get, retry, discard through the client; each tenant's service key sees only its own", () =>
    Effect.gen(function* () {
      const { sim, admin, alpha, alphaKey, beta, betaKey, gateway } = yield* Stack

      // Three requests while the backend fails every attempt: alpha's through the RPC API, whose
      // typed error names the request it was recorded as, and two of beta's over HTTP.
      const [a1, b1, b2] = yield* Effect.scoped(
        Effect.gen(function* () {
          yield* sim.withConfig({ errorRate: 1, errorStatus: 503 })
          const [failed, ...sent] = yield* Effect.all([
            failure(alpha.ChatCompletionOnce({ model, messages: [{ role: "user", content: "Hello" }] })),
            ask(betaKey.key),
            ask(betaKey.key)
          ])
          expect(failed).toMatchObject({ _tag: "BackendError", status: 503, requestId: expect.any(String) })
          expect(sent.map((s) => s.status)).toEqual([503, 503])
          return [(failed as { readonly requestId?: string }).requestId!, ...sent.map((s) => s.id)]
        })
      )

      // list: the letter with its reason, to the admin; to its tenant's key; not to another's.
      const letter = yield* listed(a1!)
      expect(letter).toMatchObject({
        requestId: a1,
        tenantId: "alpha",
        keyId: alphaKey.id,
        model,
        status: 503,
        reason: "Http",
        attempts: 2,
        retries: 0,
        lastRetryOutcome: null,
        retryable: true
      })
      yield* Effect.all([listed(b1!), listed(b2!)])
      const [alphaList, betaList, byReason] = yield* Effect.all([
        alpha.DeadLetters.list({}),
        beta.DeadLetters.list({}),
        admin.DeadLetters.list({ reason: "Http", model, tenantId: "beta" })
      ])
      expect(alphaList.data.map((l) => l.requestId)).toEqual([a1])
      expect(betaList.data.map((l) => l.requestId).sort()).toEqual([b1, b2].sort())
      expect(byReason.data.map((l) => l.tenantId)).toEqual(["beta", "beta"])
      // Paging: one at a time, newest first, with a cursor to the next.
      const first = yield* admin.DeadLetters.list({ tenantId: "beta", limit: 1 })
      expect(first.data).toHaveLength(1)
      expect(first.nextCursor).not.toBeNull()
      const second = yield* admin.DeadLetters.list({ tenantId: "beta", limit: 1, cursor: first.nextCursor! })
      expect([...first.data, ...second.data].map((l) => l.requestId).sort()).toEqual([b1, b2].sort())

      // get: the letter and its request's events, in order.
      const detail = yield* alpha.DeadLetters.get({ requestId: a1! })
      expect(detail.letter.requestId).toBe(a1)
      expect(detail.events.map((e) => e.type)).toEqual([
        "RequestReceived",
        "RequestRouted",
        "AttemptStarted",
        "AttemptFailed",
        "RequestRouted",
        "AttemptStarted",
        "AttemptFailed",
        "RequestFailed"
      ])
      expect(detail.events.map((e) => e.version)).toEqual([1, 2, 3, 4, 5, 6, 7, 8])

      // Another tenant's service key: Forbidden for each call on alpha's letter, and its list
      // never shows it (a filter naming alpha is refused too).
      const refusals = yield* Effect.all([
        failure(beta.DeadLetters.get({ requestId: a1! })),
        failure(beta.DeadLetters.retry({ requestId: a1! })),
        failure(beta.DeadLetters.discard({ requestId: a1!, reason: "not mine" })),
        failure(beta.DeadLetters.list({ tenantId: "alpha" })),
        failure(beta.DeadLetters.retry({ filter: { tenantId: "alpha" } }))
      ])
      for (const refusal of refusals) {
        expect(refusal).toMatchObject({ _tag: "Forbidden", code: "other_tenant" })
      }

      // Bad input: typed, naming the field; an unknown letter is DeadLetterNotFound.
      const [badLimit, badReason, badId, unknown, badBatch] = yield* Effect.all([
        failure(admin.DeadLetters.list({ limit: 0 })),
        failure(admin.DeadLetters.discard({ requestId: b2!, reason: "  " })),
        failure(admin.DeadLetters.get({ requestId: "not an id" })),
        failure(admin.DeadLetters.retry({ requestId: "no-such-request" })),
        failure(admin.DeadLetters.retry({ filter: { limit: 101 } }))
      ])
      expect(badLimit).toMatchObject({ _tag: "InvalidRequest", param: "limit" })
      expect(badReason).toMatchObject({ _tag: "InvalidRequest", param: "reason" })
      expect(badId).toMatchObject({ _tag: "InvalidRequest", param: "requestId" })
      expect(unknown).toMatchObject({ _tag: "DeadLetterNotFound", requestId: "no-such-request" })
      expect(badBatch).toMatchObject({ _tag: "InvalidRequest", param: "filter.limit" })

      // Healed: alpha's own service key retries its letter, which completes on the same stream.
      const retried = yield* alpha.DeadLetters.retry({ requestId: a1! })
      expect(retried.more).toBe(false)
      expect(retried.outcomes).toHaveLength(1)
      expect(retried.outcomes[0]).toMatchObject({
        requestId: a1,
        outcome: "completed",
        retry: 1,
        status: 200,
        error: null
      })
      // Again: it is no dead letter any more, a typed refusal, nothing run.
      const again = yield* failure(alpha.DeadLetters.retry({ requestId: a1! }))
      expect(again).toMatchObject({ _tag: "DeadLetterNotFound", requestId: a1 })
      const lifecycle = yield* admin.Events.forRequest({ requestId: a1! })
      const tags = lifecycle.map((e) => e.event._tag)
      expect(tags.slice(8)).toEqual([
        "DeadLetterRetried",
        "RequestRouted",
        "AttemptStarted",
        "RequestCompleted"
      ])
      expect(lifecycle[8]!.event).toMatchObject({ by: alphaKey.id, retry: 1, previousStatus: 503 })
      expect(JSON.stringify(lifecycle)).not.toContain(alphaKey.key)
      yield* unlisted(a1!)
      // Billed once: the failure billed nothing, the retry one request.
      const usage = yield* Processes.eventually(
        "the retried request in usage",
        Effect.map(admin.Usage.query({ key: alphaKey.id, groupBy: ["key"] }), (report) =>
          report.total.requests >= 1 ? report : undefined
        ),
        "10 seconds"
      )
      expect(usage.total.requests).toBe(1)

      // discard (by the admin key): the letter as it was; the reason and "admin" on the stream.
      const discarded = yield* admin.DeadLetters.discard({ requestId: b2!, reason: "customer gave up" })
      expect(discarded).toMatchObject({ requestId: b2, tenantId: "beta" })
      const b2Events = yield* beta.Events.forRequest({ requestId: b2! })
      expect(b2Events.at(-1)!.event).toMatchObject({
        _tag: "DeadLetterDiscarded",
        reason: "customer gave up",
        by: "admin"
      })
      yield* unlisted(b2!)
      expect(yield* failure(admin.DeadLetters.get({ requestId: b2! }))).toMatchObject({
        _tag: "DeadLetterNotFound"
      })

      // A bulk retry with beta's service key and no filter: beta's letters only (b1), through the
      // Promise wrapper, recorded under beta's key id.
      const promised = createGatewayClient({ url: gateway.url, key: betaKey.key })
      try {
        const batch = yield* Effect.promise(() => promised.deadLetters.retry({ filter: {} }))
        expect(batch.more).toBe(false)
        expect(batch.outcomes.map((o) => [o.requestId, o.outcome])).toEqual([[b1, "completed"]])
        const rejected = yield* Effect.promise(() =>
          promised.deadLetters.list({ tenantId: "alpha" }).then(
            () => undefined,
            (error: unknown) => error
          )
        )
        expect(rejected).toMatchObject({ _tag: "Forbidden", code: "other_tenant" })
      } finally {
        yield* Effect.promise(() => promised.close())
      }
      const b1Events = yield* admin.Events.forRequest({ requestId: b1! })
      expect(b1Events.find((e) => e.event._tag === "DeadLetterRetried")?.event).toMatchObject({
        by: betaKey.id
      })
    })
  )
})
