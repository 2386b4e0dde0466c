import { describe, expect, it } from "@effect/vitest"
import { Events, Ids, Pricing } from "@gateway/domain"
import { Effect, Either, ParseResult, TestClock } from "effect"

const model = Ids.ModelName.make("small")
const backend = Ids.BackendId.make("small-1")
const requestId = Ids.RequestId.make("req-1")
const sha256 = "a".repeat(64)

const completed = new Events.RequestCompleted({
  model,
  backend,
  promptTokens: 12,
  completionTokens: 34,
  cachedTokens: 5,
  usageSource: "backend",
  cost: { amountMicroUsd: Pricing.MicroUsd.make(1_234), priceVersion: "2025-06-01" },
  latencyMs: 812.5,
  ttftMs: 40.25,
  finishReason: "stop",
  cached: false,
  stream: true,
  status: 200
})

/** One or more instances of every event type, optional fields both present and absent. */
const samples: ReadonlyArray<Events.RequestEvent> = [
  new Events.RequestReceived({
    model: "auto",
    stream: false,
    endpoint: "chat.completions",
    payload: { kind: "hash", sha256, bytes: 120 }
  }),
  new Events.RequestReceived({
    model: "small",
    stream: true,
    endpoint: "chat.completions",
    user: "user-42",
    payload: {
      kind: "full",
      body: { model: "small", messages: [{ role: "user", content: "hi ✓" }], temperature: 0.5, stop: null },
      bytes: 80
    }
  }),
  new Events.RequestReceived({
    model: "small",
    stream: false,
    endpoint: "chat.completions",
    payload: { kind: "none" }
  }),
  new Events.RequestRejected({ reason: "rate_limited", status: 429, message: "Slow down." }),
  new Events.RequestRouted({ model, backend, upstreamModel: "Qwen/Qwen3-0.6B", why: "tier" }),
  new Events.RequestClassified({
    policy: "auto",
    tier: "complex",
    score: 0.4127,
    features: {
      lastTurnTokens: 120,
      contextTokens: 180,
      turns: 1,
      systemTokens: 60,
      code: 2,
      math: 0,
      reasoning: 3,
      questions: 2,
      constraints: 4,
      outputTokens: 0,
      tools: 0,
      jsonSchema: false
    },
    model,
    acted: true
  }),
  new Events.RequestClassified({
    policy: "auto-trial",
    tier: "simple",
    score: 0.02,
    features: {
      lastTurnTokens: 3,
      contextTokens: 3,
      turns: 1,
      systemTokens: 0,
      code: 0,
      math: 0,
      reasoning: 0,
      questions: 1,
      constraints: 0,
      outputTokens: 16,
      tools: 0,
      jsonSchema: true
    },
    model,
    acted: false,
    secondOpinion: "moderate"
  }),
  new Events.RequestRouted({
    model,
    backend,
    upstreamModel: "Qwen/Qwen3-0.6B",
    why: "fallback",
    detail: "large timed out"
  }),
  new Events.AttemptStarted({ attempt: 1, backend, model }),
  new Events.AttemptFailed({
    attempt: 1,
    backend,
    error: { reason: "Http", status: 503, message: "overloaded" },
    retryable: true,
    afterFirstByte: false
  }),
  new Events.AttemptFailed({
    attempt: 2,
    backend,
    error: { reason: "StreamBroken", message: "socket hang up" },
    retryable: false,
    afterFirstByte: true
  }),
  completed,
  new Events.RequestCompleted({
    model,
    backend,
    promptTokens: 0,
    completionTokens: 0,
    usageSource: "estimated",
    cost: null,
    latencyMs: 0,
    ttftMs: null,
    finishReason: null,
    cached: true,
    stream: false,
    status: 200
  }),
  new Events.RequestFailed({
    status: 502,
    error: { code: "backend_error", message: "all backends failed", reason: "Timeout" },
    attempts: 3,
    lastBackend: backend
  }),
  new Events.RequestFailed({ status: 503, error: { code: "unavailable", message: "draining" }, attempts: 0 }),
  new Events.RequestCancelled({ tokensDelivered: 17, latencyMs: 1500, afterFirstByte: true }),
  new Events.DeadLettered({
    reason: "terminal event not written",
    attempts: 3,
    lastError: "connection reset"
  }),
  new Events.DeadLetterRetried({ by: "admin" }),
  new Events.DeadLetterDiscarded({ reason: "duplicate", by: "admin" })
]

const throughJson = (event: Events.RequestEvent) => {
  const encoded = Events.encodeRequestEvent(event)
  const row = JSON.parse(JSON.stringify(encoded)) as { type: string; data: unknown }
  return { encoded, decoded: Events.decodeRequestEvent(row.type, row.data) }
}

const issues = (result: Either.Either<unknown, ParseResult.ParseError>) => {
  if (Either.isRight(result)) throw new Error("expected a decoding failure")
  return ParseResult.ArrayFormatter.formatErrorSync(result.left)
}

/** Fails unless every nested value is plain JSON: no class instances, no `undefined`. */
const assertPlainJson = (value: unknown, path = "data"): void => {
  if (value === undefined) throw new Error(`${path} is undefined`)
  if (typeof value !== "object" || value === null) return
  const proto = Object.getPrototypeOf(value)
  if (proto !== Object.prototype && proto !== Array.prototype) throw new Error(`${path} is not plain`)
  for (const [k, v] of Object.entries(value)) assertPlainJson(v, `${path}.${k}`)
}

describe("encode and decode", () => {
  it("covers every event type", () => {
    const tags = new Set(samples.map((e) => e._tag))
    expect([...tags].sort()).toEqual(Events.RequestEvent.members.map((m) => m._tag).sort())
  })

  it.each(samples.map((e) => [e._tag, e] as const))("%s round-trips through JSON unchanged", (_, event) => {
    const { encoded, decoded } = throughJson(event)
    expect(encoded.type).toBe(event._tag)
    expect(Either.getOrThrow(decoded)).toStrictEqual(event)
  })

  it("stores plain JSON without the tag or undefined values", () => {
    for (const event of samples) {
      const { data } = Events.encodeRequestEvent(event)
      expect(data).not.toHaveProperty("_tag")
      assertPlainJson(data)
    }
    expect(Events.encodeRequestEvent(completed).data).toEqual({
      model: "small",
      backend: "small-1",
      promptTokens: 12,
      completionTokens: 34,
      cachedTokens: 5,
      usageSource: "backend",
      cost: { amountMicroUsd: 1234, priceVersion: "2025-06-01" },
      latencyMs: 812.5,
      ttftMs: 40.25,
      finishReason: "stop",
      cached: false,
      stream: true,
      status: 200
    })
  })

  it("ignores fields it does not know (written by a newer gateway)", () => {
    const { data } = Events.encodeRequestEvent(completed)
    const decoded = Either.getOrThrow(
      Events.decodeRequestEvent("RequestCompleted", { ...data, reasoningTokens: 3 })
    )
    expect(decoded).toStrictEqual(completed)
  })

  it("takes the type from the row, not from the data", () => {
    const data = { ...Events.encodeRequestEvent(completed).data, _tag: "DeadLetterRetried" }
    expect(Either.getOrThrow(Events.decodeRequestEvent("RequestCompleted", data))._tag).toBe(
      "RequestCompleted"
    )
  })
})

describe("decoding rejects bad data, naming the field", () => {
  const completedData = Events.encodeRequestEvent(completed).data

  it("negative or fractional token counts", () => {
    const [negative] = issues(
      Events.decodeRequestEvent("RequestCompleted", { ...completedData, promptTokens: -1 })
    )
    expect(negative!.path).toEqual(["promptTokens"])
    const [fraction] = issues(
      Events.decodeRequestEvent("RequestCompleted", { ...completedData, completionTokens: 1.5 })
    )
    expect(fraction!.path).toEqual(["completionTokens"])
  })

  it("a cost that is not a whole number of micro-USD", () => {
    const data = { ...completedData, cost: { amountMicroUsd: 0.5, priceVersion: "v1" } }
    expect(issues(Events.decodeRequestEvent("RequestCompleted", data))[0]!.path).toEqual([
      "cost",
      "amountMicroUsd"
    ])
  })

  it("an unknown reason literal", () => {
    const rejected = issues(
      Events.decodeRequestEvent("RequestRejected", { reason: "bored", status: 400, message: "x" })
    )
    expect(rejected[0]!.path).toEqual(["reason"])
    const failed = issues(
      Events.decodeRequestEvent("AttemptFailed", {
        attempt: 1,
        backend: "b",
        error: { reason: "Gremlins", message: "x" },
        retryable: true,
        afterFirstByte: false
      })
    )
    expect(failed[0]!.path).toEqual(["error", "reason"])
  })

  it("attempt 0, a missing field, an impossible status", () => {
    const started = issues(
      Events.decodeRequestEvent("AttemptStarted", { attempt: 0, backend: "b", model: "m" })
    )
    expect(started[0]!.path).toEqual(["attempt"])
    const missing = issues(
      Events.decodeRequestEvent("RequestCancelled", { tokensDelivered: 1, latencyMs: 2 })
    )
    expect(missing[0]!.path).toEqual(["afterFirstByte"])
    const status = issues(
      Events.decodeRequestEvent("RequestRejected", { reason: "forbidden", status: 42, message: "x" })
    )
    expect(status[0]!.path).toEqual(["status"])
  })

  it("an unknown event type, or data that is not an object", () => {
    expect(issues(Events.decodeRequestEvent("KeyCreated", { by: "admin" }))[0]!.path).toEqual(["_tag"])
    expect(Either.isLeft(Events.decodeRequestEvent("RequestCancelled", null))).toBe(true)
    expect(Either.isLeft(Events.decodeRequestEvent("DeadLetterRetried", ["admin"]))).toBe(true)
  })
})

describe("payload", () => {
  const received = (payload: unknown) => ({
    model: "m",
    stream: false,
    endpoint: "chat.completions",
    payload
  })

  it("keeps a full body exactly, and a hash without the body", () => {
    const body = {
      model: "m",
      messages: [{ role: "user", content: "secret" }],
      n: null,
      extra: { deep: [1, "2"] }
    }
    const full = Either.getOrThrow(
      Events.decodeRequestEvent("RequestReceived", received({ kind: "full", body, bytes: 99 }))
    ) as Events.RequestReceived
    expect(full.payload).toEqual({ kind: "full", body, bytes: 99 })
    const hashed = Either.getOrThrow(
      Events.decodeRequestEvent("RequestReceived", received({ kind: "hash", sha256, bytes: 99, body }))
    ) as Events.RequestReceived
    expect(hashed.payload).toEqual({ kind: "hash", sha256, bytes: 99 })
    expect(JSON.stringify(Events.encodeRequestEvent(hashed).data)).not.toContain("secret")
  })

  it("rejects a malformed hash and an unknown kind", () => {
    const upper = issues(
      Events.decodeRequestEvent(
        "RequestReceived",
        received({ kind: "hash", sha256: "A".repeat(64), bytes: 1 })
      )
    )
    expect(upper[0]!.path).toEqual(["payload", "sha256"])
    const short = issues(
      Events.decodeRequestEvent("RequestReceived", received({ kind: "hash", sha256: "abc", bytes: 1 }))
    )
    expect(short[0]!.path).toEqual(["payload", "sha256"])
    const kind = issues(Events.decodeRequestEvent("RequestReceived", received({ kind: "partial" })))
    expect(kind[0]!.path).toEqual(["payload", "kind"])
  })
})

describe("isTerminal", () => {
  it("is true exactly for the events that end a request", () => {
    const terminal = samples.filter(Events.isTerminal).map((e) => e._tag)
    expect([...new Set(terminal)].sort()).toEqual([
      "DeadLettered",
      "RequestCancelled",
      "RequestCompleted",
      "RequestFailed",
      "RequestRejected"
    ])
    const ongoing = samples.filter((e) => !Events.isTerminal(e)).map((e) => e._tag)
    expect([...new Set(ongoing)].sort()).toEqual([
      "AttemptFailed",
      "AttemptStarted",
      "DeadLetterDiscarded",
      "DeadLetterRetried",
      "RequestClassified",
      "RequestReceived",
      "RequestRouted"
    ])
  })
})

describe("streamIdOf", () => {
  it("names the request's stream", () => {
    expect(Events.streamIdOf(requestId)).toBe("request-req-1")
  })
})

describe("EventMetadata", () => {
  const valid = {
    requestId: "req-1",
    correlationId: "req-1",
    causationId: null,
    traceId: null,
    spanId: null,
    occurredAt: "2025-06-01T12:00:00.000Z"
  }

  it("accepts the minimal shape and rejects a missing requestId", () => {
    expect(Either.isRight(Events.decodeEventMetadata(valid))).toBe(true)
    const { requestId: _, ...withoutRequestId } = valid
    expect(issues(Events.decodeEventMetadata(withoutRequestId))[0]!.path).toEqual(["requestId"])
  })

  it("rejects a time that is not ISO 8601 and a malformed key id", () => {
    expect(issues(Events.decodeEventMetadata({ ...valid, occurredAt: "yesterday" }))[0]!.path).toEqual([
      "occurredAt"
    ])
    expect(issues(Events.decodeEventMetadata({ ...valid, keyId: "" }))[0]!.path).toEqual(["keyId"])
  })

  it("makeMetadata fills defaults and leaves out absent ids", () => {
    const metadata = Events.makeMetadata({ requestId, occurredAt: Date.UTC(2025, 5, 1, 12) })
    expect(metadata).toStrictEqual(valid)
    const withKey = Events.makeMetadata({
      requestId,
      correlationId: "req-0",
      keyId: Ids.KeyId.make("key_1"),
      tenantId: Ids.TenantId.make("acme"),
      occurredAt: new Date(0)
    })
    expect(withKey).toMatchObject({ correlationId: "req-0", keyId: "key_1", tenantId: "acme" })
    expect(withKey.occurredAt).toBe("1970-01-01T00:00:00.000Z")
    expect(Either.getOrThrow(Events.decodeEventMetadata(withKey))).toStrictEqual(withKey)
  })

  it.effect("currentMetadata takes the time from the clock and ids from the current span", () =>
    Effect.gen(function* () {
      yield* TestClock.setTime(Date.UTC(2030, 0, 2, 3, 4, 5, 6))
      const outside = yield* Events.currentMetadata({ requestId })
      expect(outside.occurredAt).toBe("2030-01-02T03:04:05.006Z")
      expect(outside.traceId).toBeNull()
      const [inside, span] = yield* Effect.zip(
        Events.currentMetadata({ requestId }),
        Effect.currentSpan
      ).pipe(Effect.withSpan("test"))
      expect(inside.traceId).toBe(span.traceId)
      expect(inside.spanId).toBe(span.spanId)
      expect(inside.traceId).not.toBeNull()
    })
  )
})
