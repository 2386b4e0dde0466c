import { describe, expect, it } from "@effect/vitest"
import { BackendJournal } from "@gateway/core/BackendJournal"
import * as BackendPool from "@gateway/core/BackendPool"
import { Models } from "@gateway/core/Models"
import { Router } from "@gateway/core/Router"
import * as SecondOpinion from "@gateway/core/SecondOpinion"
import * as Settings from "@gateway/core/Settings"
import { type ChatRequest, type ChatResponse, Upstream } from "@gateway/core/Upstream"
import { type Errors, GatewayConfig, Ids, type OpenAi } from "@gateway/domain"
import { Effect, Fiber, Layer, Schema, TestClock } from "effect"

const encoder = new TextEncoder()

/** A whole answer of the small model whose content is `content`. */
const answering = (content: string): ChatResponse => ({
  _tag: "Complete",
  status: 200,
  body: encoder.encode(JSON.stringify({ choices: [{ index: 0, message: { role: "assistant", content } }] }))
})

/** A router over small and large with `auto`, asking `small` for a second opinion in `band`. */
const harness = (
  band: readonly [number, number],
  chat: (request: ChatRequest) => Effect.Effect<ChatResponse, Errors.BackendError>
) => {
  const asked: Array<ChatRequest> = []
  const config = Schema.decodeUnknownSync(GatewayConfig.GatewayConfig)({
    pool: { health: { active: false } },
    routing: {
      classifier: { second_opinion: { model: "small", band, timeout_ms: 300 } },
      policies: [{ name: "auto", tiers: { simple: "small", moderate: "small", complex: "large" } }]
    },
    models: [
      { name: "small", backends: [{ id: "small-1", url: "http://127.0.0.1:9001" }] },
      { name: "large", backends: [{ id: "large-1", url: "http://127.0.0.1:9002" }] }
    ]
  })
  const upstream = Layer.succeed(
    Upstream,
    Upstream.of({
      chat: (request) =>
        Effect.suspend(() => {
          asked.push(request)
          return chat(request)
        }),
      probe: () => Effect.succeed({ status: 200, body: "ok" })
    })
  )
  const journal = Layer.succeed(BackendJournal, BackendJournal.of({ record: () => {} }))
  const layer = Router.Default.pipe(
    Layer.provideMerge(BackendPool.layer({ gateway: "test" })),
    Layer.provide(journal),
    Layer.provide(Models.Default),
    Layer.provide(Settings.layer(config)),
    Layer.provide(upstream)
  )
  return { layer, asked }
}

const greeting: OpenAi.ChatCompletionRequest = {
  model: "auto",
  messages: [{ role: "user", content: "Hello there!" }]
}

const route = (body: OpenAi.ChatCompletionRequest) =>
  Effect.flatMap(Router, (router) => router.route(body, Ids.newRequestId()))

const inFlight = Effect.map(BackendPool.BackendPool, (pool) => pool.model("small")!.replicas[0]!.inFlight)

describe("Router second opinion", () => {
  it.effect("in the band, the small model's tier decides, and the request goes to that tier's model", () => {
    const { layer, asked } = harness([0, 1], () => Effect.succeed(answering('{"tier":"complex"}')))
    return Effect.gen(function* () {
      const routed = yield* route(greeting)
      expect(routed.decision?.classification.tier).toBe("complex")
      expect(routed.decision?.classification.secondOpinion).toBe("complex")
      expect(routed.decision?.model).toBe("large")
      expect(routed.primary.name).toBe("large")
      // One short question to the second-opinion model, with the user's words in it.
      expect(asked).toHaveLength(1)
      expect(asked[0]!.target.backend.id).toBe("small-1")
      expect(asked[0]!.body.max_tokens).toBeLessThanOrEqual(16)
      expect(JSON.stringify(asked[0]!.body.messages)).toContain("Hello there!")
      expect(yield* inFlight).toBe(0)
    }).pipe(Effect.provide(layer))
  })

  it.effect("an answer that is not a tier in strict JSON leaves the heuristic decision as it was", () => {
    const { layer, asked } = harness([0, 1], () =>
      Effect.succeed(answering("It looks rather complex to me."))
    )
    return Effect.gen(function* () {
      const routed = yield* route(greeting)
      expect(asked).toHaveLength(1)
      expect(routed.decision?.classification.tier).toBe("simple")
      expect(routed.decision?.classification.secondOpinion).toBeUndefined()
      expect(routed.primary.name).toBe("small")
    }).pipe(Effect.provide(layer))
  })

  it.effect("no answer within timeout_ms: the heuristic decision stands and the call is given up", () => {
    const { layer } = harness([0, 1], () => Effect.never)
    return Effect.gen(function* () {
      const fiber = yield* Effect.fork(route(greeting))
      yield* TestClock.adjust("299 millis")
      expect(fiber.unsafePoll()).toBeNull()
      yield* TestClock.adjust("1 millis")
      const routed = yield* Fiber.join(fiber)
      expect(routed.decision?.classification.tier).toBe("simple")
      expect(routed.decision?.classification.secondOpinion).toBeUndefined()
      expect(routed.primary.name).toBe("small")
      // The abandoned call holds no slot on the replica.
      expect(yield* inFlight).toBe(0)
    }).pipe(Effect.provide(layer))
  })

  it.effect("outside the band, nobody is asked", () => {
    const { layer, asked } = harness([0.9, 1], () => Effect.succeed(answering('{"tier":"complex"}')))
    return Effect.gen(function* () {
      const routed = yield* route(greeting)
      expect(asked).toHaveLength(0)
      expect(routed.decision?.classification.tier).toBe("simple")
    }).pipe(Effect.provide(layer))
  })
})

describe("SecondOpinion.tierOf", () => {
  const of = (content: unknown) =>
    SecondOpinion.tierOf(encoder.encode(JSON.stringify({ choices: [{ message: { content } }] })))
  it("reads a tier in strict JSON and nothing else", () => {
    expect(of('{"tier":"moderate"}')).toBe("moderate")
    expect(of(' {"tier": "simple"} ')).toBe("simple")
    expect(of('{"tier":"hard"}')).toBeUndefined()
    expect(of("complex")).toBeUndefined()
    expect(of('{"level":"complex"}')).toBeUndefined()
    expect(of(null)).toBeUndefined()
    expect(SecondOpinion.tierOf(encoder.encode("not json"))).toBeUndefined()
  })
})
