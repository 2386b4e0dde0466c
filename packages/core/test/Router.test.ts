import { describe, expect, it } from "@effect/vitest"
import { BackendJournal } from "@gateway/core/BackendJournal"
import * as BackendPool from "@gateway/core/BackendPool"
import { Models } from "@gateway/core/Models"
import { Router } from "@gateway/core/Router"
import * as Settings from "@gateway/core/Settings"
import { Upstream } from "@gateway/core/Upstream"
import { GatewayConfig, Ids, OpenAi } from "@gateway/domain"
import { Effect, Layer, Schema } from "effect"

const decodeConfig = Schema.decodeUnknownSync(GatewayConfig.GatewayConfig)
const decodeRequest = Schema.decodeUnknownSync(OpenAi.ChatCompletionRequest)

const model = (name: string, port: number) => ({
  name,
  backends: [{ id: `${name}-1`, url: `http://127.0.0.1:${port}` }]
})
const models = [model("small", 9001), model("mid", 9002), model("large", 9003)]
const tiers = { simple: "small", moderate: "mid", complex: "large" }

/**
 * Questions alone decide, 4 at the scale: no question is simple, 1 is moderate (0.25), 3 are
 * complex (0.75). The tests steer the tier with question marks.
 */
const classifier = {
  weights: {
    last_turn_tokens: 0,
    context_tokens: 0,
    turns: 0,
    system_tokens: 0,
    code: 0,
    math: 0,
    reasoning: 0,
    questions: 1,
    constraints: 0,
    output_tokens: 0,
    tools: 0,
    json_schema: 0
  },
  thresholds: { moderate: 0.25, complex: 0.75 }
}

/**
 * The router over `routing` (the file's shape) and three models, with a pool that never calls out
 * (no second opinion is configured, and active health checks are off).
 */
const harness = (routing: Record<string, unknown>) => {
  const upstream = Layer.succeed(
    Upstream,
    Upstream.of({
      chat: () => Effect.die("chat is not called by the router"),
      probe: () => Effect.succeed({ status: 200, body: "ok" })
    })
  )
  const journal = Layer.succeed(BackendJournal, BackendJournal.of({ record: () => undefined }))
  const settings = Settings.layer(
    decodeConfig({ models, pool: { health: { active: false } }, routing: { classifier, ...routing } })
  )
  return Router.Default.pipe(
    Layer.provide(BackendPool.layer({ gateway: "gw-test" })),
    Layer.provide(journal),
    Layer.provide(Models.Default),
    Layer.provide(settings),
    Layer.provide(upstream)
  )
}

const chat = (model: string, content: string) =>
  decodeRequest({ model, messages: [{ role: "user", content }] })

const requestId = Ids.RequestId.make("req-router-test")

const route = (model: string, content: string) =>
  Effect.flatMap(Router, (router) => router.route(chat(model, content), requestId))

describe("Router.route", () => {
  const routing = {
    policies: [
      { name: "auto", tiers },
      { name: "auto-shadow", tiers, shadow: true },
      { name: "watch-mid", tiers: { simple: "small", moderate: "small", complex: "mid" }, observe: ["mid"] },
      { name: "watch-mid-too", tiers, observe: ["mid", "small"] }
    ]
  }

  it.effect("sends a request naming a policy to its tier's model, and says so", () =>
    Effect.gen(function* () {
      for (const [content, tier, target] of [
        ["hello", "simple", "small"],
        ["hello?", "moderate", "mid"],
        ["who? what? why?", "complex", "large"]
      ] as const) {
        const r = yield* route("auto", content)
        expect(r.primary.name).toBe(target)
        expect(r.decision).toMatchObject({
          policy: "auto",
          model: target,
          acted: true,
          classification: { tier }
        })
        expect(r.observed).toEqual([])
      }
    }).pipe(Effect.provide(harness(routing)))
  )

  it.effect("lets a request naming a model bypass the classifier", () =>
    Effect.gen(function* () {
      // Complex by the classifier's measure, yet it goes where it asks, undecided.
      const r = yield* route("large", "who? what? why?")
      expect(r.primary.name).toBe("large")
      expect(r.decision).toBeUndefined()
      expect(r.observed).toEqual([])
      const s = yield* route("small", "who? what? why?")
      expect(s.primary.name).toBe("small")
      expect(s.decision).toBeUndefined()
    }).pipe(Effect.provide(harness({ policies: [{ name: "auto", tiers }] })))
  )

  it.effect(
    "in shadow mode, records where the policy would go and sends the request to its complex model",
    () =>
      Effect.gen(function* () {
        const simple = yield* route("auto-shadow", "hello")
        expect(simple.primary.name).toBe("large")
        expect(simple.decision).toMatchObject({
          policy: "auto-shadow",
          model: "small",
          acted: false,
          classification: { tier: "simple" }
        })
        expect(simple.observed).toEqual([])
        const moderate = yield* route("auto-shadow", "hello?")
        expect(moderate.primary.name).toBe("large")
        expect(moderate.decision).toMatchObject({
          model: "mid",
          acted: false,
          classification: { tier: "moderate" }
        })
      }).pipe(Effect.provide(harness(routing)))
  )

  it.effect("has the policies observing a model classify its requests without acting, and no others", () =>
    Effect.gen(function* () {
      const mid = yield* route("mid", "hello?")
      expect(mid.primary.name).toBe("mid")
      expect(mid.decision).toBeUndefined()
      // Both observers of `mid`, in config order, each with its own tiers.
      expect(mid.observed).toHaveLength(2)
      expect(mid.observed[0]).toMatchObject({
        policy: "watch-mid",
        model: "small",
        acted: false,
        classification: { tier: "moderate" }
      })
      expect(mid.observed[1]).toMatchObject({
        policy: "watch-mid-too",
        model: "mid",
        acted: false,
        classification: { tier: "moderate" }
      })

      const small = yield* route("small", "who? what? why?")
      expect(small.primary.name).toBe("small")
      expect(small.observed.map((d) => [d.policy, d.model, d.acted])).toEqual([
        ["watch-mid-too", "large", false]
      ])

      // Nobody observes `large`.
      const large = yield* route("large", "who? what? why?")
      expect(large.observed).toEqual([])
      // A request naming a policy is not observed by the others.
      const auto = yield* route("auto", "hello?")
      expect(auto.observed).toEqual([])
    }).pipe(Effect.provide(harness(routing)))
  )

  it.effect("fails with ModelNotFound for a name that is neither a model nor a policy", () =>
    Effect.gen(function* () {
      for (const name of ["gpt-4o", "Auto", "auto "]) {
        const error = yield* Effect.flip(route(name, "hello"))
        expect(error._tag).toBe("ModelNotFound")
        expect(error.model).toBe(name)
      }
    }).pipe(Effect.provide(harness(routing)))
  )

  it.effect("without policies, routes by model name only", () =>
    Effect.gen(function* () {
      const r = yield* route("mid", "who? what? why?")
      expect([r.primary.name, r.decision, r.observed]).toEqual(["mid", undefined, []])
      expect((yield* Effect.flip(route("auto", "hello")))._tag).toBe("ModelNotFound")
    }).pipe(Effect.provide(harness({})))
  )
})

describe("GatewayConfig routing validation", () => {
  /** The error text of decoding a config with three models and `routing`, or "" when it decodes. */
  const rejection = (routing: Record<string, unknown>): string => {
    try {
      decodeConfig({ models, routing })
      return ""
    } catch (error) {
      return String(error)
    }
  }

  it("accepts policies over existing models", () => {
    const config = decodeConfig({
      models,
      routing: {
        policies: [
          { name: "auto", tiers, observe: ["small"] },
          { name: "auto-cheap", tiers }
        ]
      }
    })
    expect(config.routing.policies.map((p) => [p.name, p.shadow, p.observe])).toEqual([
      ["auto", false, ["small"]],
      ["auto-cheap", false, []]
    ])
  })

  it("rejects a policy named like a model", () => {
    const error = rejection({
      policies: [
        { name: "auto", tiers },
        { name: "mid", tiers }
      ]
    })
    expect(error).toContain(`["routing"]["policies"][1]["name"]`)
    expect(error).toContain("'mid' is a model's name")
  })

  it("rejects a duplicate policy", () => {
    const error = rejection({
      policies: [
        { name: "auto", tiers },
        { name: "auto", tiers, shadow: true }
      ]
    })
    expect(error).toContain(`["routing"]["policies"][1]["name"]`)
    expect(error).toContain("duplicate policy 'auto'")
  })

  it("rejects a tier naming an unknown model", () => {
    const error = rejection({ policies: [{ name: "auto", tiers: { ...tiers, complex: "huge" } }] })
    expect(error).toContain(`["routing"]["policies"][0]["tiers"]["complex"]`)
    expect(error).toContain("unknown model 'huge'")
  })

  it("rejects observing an unknown model", () => {
    const error = rejection({ policies: [{ name: "auto", tiers, observe: ["small", "nope"] }] })
    expect(error).toContain(`["routing"]["policies"][0]["observe"][1]`)
    expect(error).toContain("unknown model 'nope'")
  })

  it("rejects a second opinion from an unknown model", () => {
    const error = rejection({ classifier: { second_opinion: { model: "judge", band: [0.1, 0.3] } } })
    expect(error).toContain(`["routing"]["classifier"]["second_opinion"]["model"]`)
    expect(error).toContain("unknown model 'judge'")
  })

  it("rejects a moderate threshold above the complex one, and accepts them equal", () => {
    const error = rejection({ classifier: { thresholds: { moderate: 0.5, complex: 0.4 } } })
    expect(error).toMatch(/\["routing"\][\s\S]*\["classifier"\][\s\S]*\["thresholds"\]/)
    expect(error).toContain("thresholds.moderate must not exceed thresholds.complex")
    expect(rejection({ classifier: { thresholds: { moderate: 0.4, complex: 0.4 } } })).toBe("")
  })
})
