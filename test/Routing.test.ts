/**
 * Complexity-based routing end to end: an application using the official `openai` SDK sends
 * `"model": "auto"` to a real gateway process in front of two real simulators (`small`, `large`).
 * A greeting goes to `small`, a multi-part design question with code to `large`; the answers say
 * which tier and model served them, and the gateway's database says why (`RequestClassified` with
 * the score and features, `RequestRouted` with the tier). A concrete model bypasses the classifier;
 * a policy in shadow mode and a policy observing a model classify without acting; and a routing
 * config that names a model that does not exist, or is otherwise invalid, stops the gateway at
 * start-up, naming the field.
 */
import { describe, expect, it, layer } from "@effect/vitest"
import { Context, Effect, Layer } from "effect"
import OpenAI from "openai"
import type { ChatCompletionChunk, ChatCompletionMessageParam } from "openai/resources"
import * as Chaos from "./support/Chaos.js"
import * as EventLog from "./support/EventLog.js"
import * as Processes from "./support/Processes.js"

const outputTokens = 8

/** A one-line greeting: nothing to think about. */
const greeting: Array<ChatCompletionMessageParam> = [{ role: "user", content: "Hi there!" }]

/** A question that asks for reasoning but is short, with no code and no constraints. */
const whyQuestion: Array<ChatCompletionMessageParam> = [
  { role: "user", content: "Explain why the sky is blue, step by step." }
]

/**
 * A design question: a system prompt, a fenced code block, three numbered requirements, reasoning
 * cues (design, compare, explain, trade-offs, step by step, why) and exactly three questions.
 */
const designQuestion: Array<ChatCompletionMessageParam> = [
  {
    role: "system",
    content: "You are a senior backend engineer who reviews designs for production systems."
  },
  {
    role: "user",
    content: [
      "We rate-limit an API with the token bucket below, kept in one process:",
      "",
      "```ts",
      "class TokenBucket {",
      "  constructor(private capacity: number, private refillPerSecond: number) {}",
      "  take(now: number): boolean {",
      "    this.refill(now);",
      "    return this.tokens-- > 0;",
      "  }",
      "}",
      "```",
      "",
      "Design a distributed version for 20 gateway replicas sharing Redis. Requirements:",
      "1. It must stay correct when two replicas take the last token at the same moment.",
      "2. It should add at most one Redis round trip per request.",
      "3. It must keep working, without blocking requests, when Redis is unreachable.",
      "",
      "Compare a Lua script with a sliding-window log and explain the trade-offs step by step.",
      "Why would you pick one over the other? What happens to fairness under load? How would you test it?"
    ].join("\n")
  }
]

/** The default thresholds between tiers (the config leaves the classifier at its defaults). */
const thresholds = { moderate: 0.05, complex: 0.23 }

const tiers = { simple: "small", moderate: "small", complex: "large" }

const gatewayConfig = (urls: { readonly small: string; readonly large: string }) => ({
  server: { host: "127.0.0.1" },
  pool: Processes.singleAttempt,
  models: [
    { name: "small", backends: [{ id: "small-1", url: urls.small }] },
    { name: "large", backends: [{ id: "large-1", url: urls.large }] }
  ],
  routing: {
    policies: [
      // `auto` also classifies, without acting, what clients send to `large` by name.
      { name: "auto", tiers, observe: ["large"] },
      { name: "auto-shadow", tiers, shadow: true }
    ]
  }
})

class Stack extends Context.Tag("test/Routing/Stack")<
  Stack,
  {
    readonly gateway: Processes.Gateway
    readonly client: OpenAI
    /** The gateway's database. */
    readonly log: EventLog.EventLog
  }
>() {
  static readonly layer = Layer.scoped(
    Stack,
    Effect.gen(function* () {
      // Two different ports (a port just released could be handed out twice).
      const ports = yield* Effect.all({ small: Processes.freePort, large: Processes.freePort }).pipe(
        Effect.repeat({ until: (p) => p.small !== p.large })
      )
      const url = (port: number) => `http://127.0.0.1:${port}`
      // Each simulator answers with the name of the gateway model it serves.
      const sim = (port: number, model: string, seed: number) =>
        Processes.startSim({ port, model, ttftMs: 5, itlMs: 1, outputTokens, seed })
      const [, , gateway] = yield* Effect.all(
        [
          sim(ports.small, "small", 1),
          sim(ports.large, "large", 2),
          Processes.startGateway(gatewayConfig({ small: url(ports.small), large: url(ports.large) }))
        ],
        { concurrency: "unbounded" }
      )
      const client = new OpenAI({
        baseURL: `${gateway.url}/v1`,
        apiKey: "unused",
        maxRetries: 0,
        timeout: 10_000
      })
      const log = yield* EventLog.make(gateway.databaseUrl)
      return { gateway, client, log }
    })
  )
}

/** What the SDK gave back for one chat request, streamed or not. */
interface Answer {
  /** `x-gateway-request-id`: the request's events are on `request-<id>`. */
  readonly id: string
  readonly headers: Headers
  /** The `model` of the body (every chunk's, when streamed). */
  readonly bodyModels: ReadonlyArray<string>
  readonly content: string
}

/** One chat request through the SDK, read to its end. */
const ask = (model: string, messages: Array<ChatCompletionMessageParam>, stream: boolean) =>
  Effect.gen(function* () {
    const { client } = yield* Stack
    return yield* Effect.promise(async (): Promise<Answer> => {
      if (stream) {
        const { data, response } = await client.chat.completions
          .create({ model, messages, stream: true })
          .withResponse()
        const chunks: Array<ChatCompletionChunk> = []
        for await (const chunk of data) chunks.push(chunk)
        return {
          id: response.headers.get("x-gateway-request-id") ?? "",
          headers: response.headers,
          bodyModels: [...new Set(chunks.map((c) => c.model))],
          content: chunks.map((c) => c.choices[0]?.delta?.content ?? "").join("")
        }
      }
      const { data, response } = await client.chat.completions.create({ model, messages }).withResponse()
      return {
        id: response.headers.get("x-gateway-request-id") ?? "",
        headers: response.headers,
        bodyModels: [data.model],
        content: data.choices[0]?.message.content ?? ""
      }
    })
  })

/** The events of the request once it has its terminal event, in order. */
const eventsOf = (id: string) =>
  Effect.gen(function* () {
    const { log } = yield* Stack
    expect(id).not.toBe("")
    const byId = yield* Chaos.settledEvents(log, [id])
    return byId.get(id) ?? []
  })

const types = (events: ReadonlyArray<Chaos.Stored>) => events.map((e) => e.type)

const one = (events: ReadonlyArray<Chaos.Stored>, type: string) => {
  const found = events.filter((e) => e.type === type)
  expect(found, `exactly one ${type} in ${types(events).join(", ")}`).toHaveLength(1)
  return found[0]!.data
}

/** Served by `model`: its replica answered, in full, under its name. */
const expectServedBy = (answer: Answer, model: string) => {
  expect(answer.headers.get("x-gateway-model")).toBe(model)
  expect(answer.headers.get("x-gateway-backend")).toBe(`${model}-1`)
  expect(answer.bodyModels).toEqual([model])
  expect(answer.content.split(" ")).toHaveLength(outputTokens)
}

const routedCases = [
  { prompt: "a one-line greeting", messages: greeting, tier: "simple", model: "small" },
  { prompt: "a short why question", messages: whyQuestion, tier: "moderate", model: "small" },
  { prompt: "a design question with code", messages: designQuestion, tier: "complex", model: "large" }
].flatMap((c) => [
  { ...c, stream: false, mode: "whole" },
  { ...c, stream: true, mode: "streamed" }
])

layer(Stack.layer, { excludeTestServices: true })("complexity-based routing through the gateway", (it) => {
  it.effect.each(routedCases)(
    "auto sends $prompt ($mode) to the $tier tier's model, $model, and records why",
    (c) =>
      Effect.gen(function* () {
        const answer = yield* ask("auto", c.messages, c.stream)
        expectServedBy(answer, c.model)
        expect(answer.headers.get("x-gateway-tier")).toBe(c.tier)

        const events = yield* eventsOf(answer.id)
        expect(types(events)).toEqual([
          "RequestReceived",
          "RequestClassified",
          "RequestRouted",
          "AttemptStarted",
          "RequestCompleted"
        ])
        expect(one(events, "RequestReceived")).toMatchObject({ model: "auto", stream: c.stream })
        const classified = one(events, "RequestClassified")
        expect(classified).toMatchObject({ policy: "auto", tier: c.tier, model: c.model, acted: true })
        // The score is what put the request in its tier.
        const { score } = classified
        if (c.tier === "simple") expect(score).toBeLessThan(thresholds.moderate)
        if (c.tier === "moderate") {
          expect(score).toBeGreaterThanOrEqual(thresholds.moderate)
          expect(score).toBeLessThan(thresholds.complex)
        }
        if (c.tier === "complex") expect(score).toBeGreaterThanOrEqual(thresholds.complex)
        expect(one(events, "RequestRouted")).toEqual({
          model: c.model,
          backend: `${c.model}-1`,
          upstreamModel: c.model,
          why: "tier",
          detail: `auto: ${c.tier} (score ${score})`
        })
        expect(one(events, "AttemptStarted")).toMatchObject({
          attempt: 1,
          backend: `${c.model}-1`,
          model: c.model
        })
        expect(one(events, "RequestCompleted")).toMatchObject({
          model: c.model,
          backend: `${c.model}-1`,
          stream: c.stream,
          status: 200
        })
      })
  )

  it.effect("the features behind a decision are what the prompt has", () =>
    Effect.gen(function* () {
      const simple = one(yield* eventsOf((yield* ask("auto", greeting, false)).id), "RequestClassified")
      expect(simple.features).toMatchObject({
        turns: 1,
        systemTokens: 0,
        code: 0,
        math: 0,
        reasoning: 0,
        questions: 0,
        constraints: 0,
        outputTokens: 0,
        tools: 0,
        jsonSchema: false
      })
      expect(simple.features.lastTurnTokens).toBeGreaterThan(0)
      expect(simple.features.lastTurnTokens).toBeLessThan(10)

      const complex = one(
        yield* eventsOf((yield* ask("auto", designQuestion, false)).id),
        "RequestClassified"
      )
      const f = complex.features
      expect(f).toMatchObject({
        turns: 1,
        questions: 3,
        math: 0,
        tools: 0,
        outputTokens: 0,
        jsonSchema: false
      })
      // The fence and the lines of the class are code.
      expect(f.code).toBeGreaterThanOrEqual(3)
      // design, compare, explain, trade-offs, step by step, why.
      expect(f.reasoning).toBeGreaterThanOrEqual(3)
      // Three numbered requirements, with must / should / at most / without in them.
      expect(f.constraints).toBeGreaterThanOrEqual(3)
      expect(f.systemTokens).toBeGreaterThan(0)
      expect(f.lastTurnTokens).toBeGreaterThan(100)
      // The context is the system prompt and the question.
      expect(f.contextTokens).toBeGreaterThan(f.lastTurnTokens)
      expect(f.contextTokens).toBeLessThanOrEqual(f.lastTurnTokens + f.systemTokens)
      // The tokens the client caps the answer at count as a feature.
      const capped = yield* Effect.flatMap(Stack, ({ client }) =>
        Effect.promise(() =>
          client.chat.completions.create({ model: "auto", messages: greeting, max_tokens: 5 }).withResponse()
        )
      )
      const cappedEvents = yield* eventsOf(capped.response.headers.get("x-gateway-request-id") ?? "")
      expect(one(cappedEvents, "RequestClassified").features.outputTokens).toBe(5)
    })
  )

  it.effect.each([
    { mode: "whole", stream: false },
    { mode: "streamed", stream: true }
  ])(
    "naming a model bypasses the classifier: a design question for small stays on small ($mode)",
    ({ stream }) =>
      Effect.gen(function* () {
        const answer = yield* ask("small", designQuestion, stream)
        expectServedBy(answer, "small")
        expect(answer.headers.get("x-gateway-tier")).toBeNull()
        const events = yield* eventsOf(answer.id)
        expect(types(events)).toEqual([
          "RequestReceived",
          "RequestRouted",
          "AttemptStarted",
          "RequestCompleted"
        ])
        expect(one(events, "RequestReceived")).toMatchObject({ model: "small" })
        const routed = one(events, "RequestRouted")
        expect(routed).toMatchObject({ model: "small", backend: "small-1", why: "requested" })
        expect(routed.detail ?? "").not.toMatch(/auto|tier|simple|moderate|complex/)
      })
  )

  it.effect.each([
    { mode: "whole", stream: false },
    { mode: "streamed", stream: true }
  ])(
    "a policy in shadow mode serves a greeting with its complex model and records its choice ($mode)",
    ({ stream }) =>
      Effect.gen(function* () {
        const answer = yield* ask("auto-shadow", greeting, stream)
        expectServedBy(answer, "large")
        expect(answer.headers.get("x-gateway-tier")).toBeNull()
        const events = yield* eventsOf(answer.id)
        expect(types(events)).toEqual([
          "RequestReceived",
          "RequestClassified",
          "RequestRouted",
          "AttemptStarted",
          "RequestCompleted"
        ])
        expect(one(events, "RequestReceived")).toMatchObject({ model: "auto-shadow" })
        const classified = one(events, "RequestClassified")
        expect(classified).toMatchObject({
          policy: "auto-shadow",
          tier: "simple",
          model: "small",
          acted: false
        })
        expect(classified.score).toBeLessThan(thresholds.moderate)
        const routed = one(events, "RequestRouted")
        expect(routed).toMatchObject({ model: "large", backend: "large-1", why: "requested" })
        expect(routed.detail).toBe(
          `auto-shadow in shadow mode: would send this simple request (score ${classified.score}) to small`
        )
        expect(one(events, "RequestCompleted")).toMatchObject({ model: "large", backend: "large-1" })
      })
  )

  it.effect("a policy observing large classifies what is sent to large, and large answers", () =>
    Effect.gen(function* () {
      const answer = yield* ask("large", greeting, false)
      expectServedBy(answer, "large")
      expect(answer.headers.get("x-gateway-tier")).toBeNull()
      const events = yield* eventsOf(answer.id)
      expect(types(events)).toEqual([
        "RequestReceived",
        "RequestClassified",
        "RequestRouted",
        "AttemptStarted",
        "RequestCompleted"
      ])
      expect(one(events, "RequestReceived")).toMatchObject({ model: "large" })
      // `auto` would have sent the greeting to small.
      expect(one(events, "RequestClassified")).toMatchObject({
        policy: "auto",
        tier: "simple",
        model: "small",
        acted: false
      })
      expect(one(events, "RequestRouted")).toMatchObject({
        model: "large",
        backend: "large-1",
        why: "requested"
      })
    })
  )

  it.effect("a model no policy observes is not classified", () =>
    Effect.gen(function* () {
      const answer = yield* ask("small", greeting, false)
      expectServedBy(answer, "small")
      const events = yield* eventsOf(answer.id)
      expect(types(events)).not.toContain("RequestClassified")
    })
  )

  it.effect("/v1/models lists the policies, owned by the router, next to the models", () =>
    Effect.gen(function* () {
      const { client } = yield* Stack
      const page = yield* Effect.promise(() => client.models.list())
      expect(page.data.map((m) => [m.id, m.owned_by])).toEqual([
        ["small", expect.any(String)],
        ["large", expect.any(String)],
        ["auto", "router"],
        ["auto-shadow", "router"]
      ])
      const auto = yield* Effect.promise(() => client.models.retrieve("auto"))
      expect(auto).toMatchObject({ id: "auto", object: "model", owned_by: "router" })
    })
  )
})

const model = (name: string) => ({ name, backends: [{ id: `${name}-1`, url: "http://127.0.0.1:9" }] })
const models = [model("small"), model("large")]

const badConfigs = [
  {
    problem: "a policy tier naming an unknown model",
    routing: { policies: [{ name: "auto", tiers: { simple: "small", moderate: "small", complex: "huge" } }] },
    field: "routing.policies.0.tiers.complex",
    message: "unknown model 'huge'"
  },
  {
    problem: "a policy observing an unknown model",
    routing: { policies: [{ name: "auto", tiers, observe: ["large", "medium"] }] },
    field: "routing.policies.0.observe.1",
    message: "unknown model 'medium'"
  },
  {
    problem: "a policy named like a model",
    routing: { policies: [{ name: "large", tiers }] },
    field: "routing.policies.0.name",
    message: "'large' is a model's name"
  },
  {
    problem: "thresholds in the wrong order",
    routing: {
      classifier: { thresholds: { moderate: 0.5, complex: 0.2 } },
      policies: [{ name: "auto", tiers }]
    },
    field: "routing.classifier.thresholds",
    message: "thresholds.moderate must not exceed thresholds.complex"
  }
]

describe("an invalid routing config", () => {
  it.scopedLive.each(badConfigs)(
    "$problem: the gateway exits non-zero naming '$field'",
    ({ routing, field, message }) =>
      Effect.gen(function* () {
        const { code, output } = yield* Processes.runGatewayToExit(
          yield* Processes.writeConfig({ models, routing })
        )
        expect(code).not.toBe(0)
        expect(code).not.toBeNull()
        expect(output).toContain(field)
        expect(output).toContain(message)
      })
  )
})
