/**
 * Request-like events for the event-store benchmark: the four events the gateway records for a
 * completed request (`RequestReceived`, `RequestRouted`, `AttemptStarted`, `RequestCompleted`),
 * with the metadata of an authenticated request (tenant, key, trace). Shapes are the domain
 * catalogue's; `check` decodes one request's events with the catalogue's schemas. Field values
 * come from a seeded generator, so a run is repeatable and a replay can be checked against what
 * was written.
 */
import { Events } from "@gateway/domain"
import type { EventStore } from "@gateway/event-store"
import { Either } from "effect"

interface ModelSpec {
  readonly name: string
  readonly upstream: string
  readonly backends: ReadonlyArray<string>
  /** Micro-USD per 1,000 prompt / completion tokens. */
  readonly promptPrice: number
  readonly completionPrice: number
}

const modelSpecs: ReadonlyArray<ModelSpec> = [
  {
    name: "llama-3.1-70b-instruct",
    upstream: "meta-llama/Meta-Llama-3.1-70B-Instruct",
    backends: ["vllm-eu-west-1a-01", "vllm-eu-west-1b-02"],
    promptPrice: 590,
    completionPrice: 790
  },
  {
    name: "llama-3.1-8b-instruct",
    upstream: "meta-llama/Meta-Llama-3.1-8B-Instruct",
    backends: ["vllm-eu-west-1a-03", "vllm-eu-west-1b-04"],
    promptPrice: 50,
    completionPrice: 80
  },
  {
    name: "qwen2.5-72b-instruct",
    upstream: "Qwen/Qwen2.5-72B-Instruct",
    backends: ["vllm-eu-west-1a-05"],
    promptPrice: 400,
    completionPrice: 800
  },
  {
    name: "mistral-large-2407",
    upstream: "mistralai/Mistral-Large-Instruct-2407",
    backends: ["tgi-eu-west-1a-01", "tgi-eu-west-1b-02"],
    promptPrice: 2000,
    completionPrice: 6000
  },
  {
    name: "gpt-oss-120b",
    upstream: "openai/gpt-oss-120b",
    backends: ["sglang-eu-west-1a-01"],
    promptPrice: 150,
    completionPrice: 600
  }
]

export const tenants = 20
export const keysPerTenant = 3
export const priceVersion = "2026-11-01"

/** mulberry32: a small, fast, seeded generator of floats in [0, 1). */
export const rng = (seed: number): (() => number) => {
  let a = seed >>> 0
  return () => {
    a = (a + 0x6d2b79f5) >>> 0
    let t = a
    t = Math.imul(t ^ (t >>> 15), t | 1)
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61)
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296
  }
}

const hex = (): string => crypto.randomUUID().replaceAll("-", "")

/** One request's four events as one stream write (versions 1–4), as the recorder would stamp them. */
export const requestWrite = (random: () => number, occurredAt: number): EventStore.StreamWrite => {
  const spec = modelSpecs[Math.floor(random() * modelSpecs.length)]!
  const backend = spec.backends[Math.floor(random() * spec.backends.length)]!
  const tenant = Math.floor(random() * tenants)
  const tenantId = `tenant-${String(tenant).padStart(3, "0")}`
  const keyId = `key-${String(tenant).padStart(3, "0")}-${Math.floor(random() * keysPerTenant)}`
  const stream = random() < 0.6
  const promptTokens = 20 + Math.floor(random() * 4000)
  const completionTokens = 1 + Math.floor(random() * 1000)
  const ttftMs = stream ? Math.round(100 + random() * 900) : null
  const latencyMs = Math.round((ttftMs ?? 100) + completionTokens * (5 + random() * 20))
  const requestId = crypto.randomUUID()
  const ids = [crypto.randomUUID(), crypto.randomUUID(), crypto.randomUUID(), crypto.randomUUID()] as const
  const traceId = hex()
  const spanId = hex().slice(0, 16)
  const start = new Date(occurredAt).toISOString()
  const end = new Date(occurredAt + latencyMs).toISOString()
  const metadata = (causationId: string | null, at: string) => ({
    requestId,
    correlationId: requestId,
    causationId,
    traceId,
    spanId,
    keyId,
    tenantId,
    occurredAt: at
  })
  const data: ReadonlyArray<readonly [string, Record<string, unknown>]> = [
    [
      "RequestReceived",
      {
        model: spec.name,
        stream,
        endpoint: "chat.completions",
        user: `user-${Math.floor(random() * 100000)}`,
        payload: { kind: "hash", sha256: hex() + hex(), bytes: promptTokens * 4 + 180 }
      }
    ],
    [
      "RequestRouted",
      {
        model: spec.name,
        backend,
        upstreamModel: spec.upstream,
        why: "round_robin",
        detail: `tier=standard candidates=${spec.backends.length} inflight=${Math.floor(random() * 64)}`
      }
    ],
    ["AttemptStarted", { attempt: 1, backend, model: spec.name }],
    [
      "RequestCompleted",
      {
        model: spec.name,
        backend,
        promptTokens,
        completionTokens,
        usageSource: "backend",
        cost: {
          amountMicroUsd: Math.round(
            (promptTokens * spec.promptPrice + completionTokens * spec.completionPrice) / 1000
          ),
          priceVersion
        },
        latencyMs,
        ttftMs,
        finishReason: "stop",
        cached: false,
        stream,
        status: 200
      }
    ]
  ]
  return {
    streamId: Events.streamIdOf(requestId as never),
    firstVersion: 1,
    events: data.map(([type, d], i) => ({
      eventId: ids[i]!,
      type,
      data: d,
      metadata: metadata(i === 0 ? null : ids[i - 1]!, i === 3 ? end : start)
    }))
  }
}

/** Mean JSON bytes of `data` and `metadata` per event over `n` generated requests. */
export const sizes = (n: number): { readonly dataBytes: number; readonly metadataBytes: number } => {
  const random = rng(7)
  let data = 0
  let metadata = 0
  for (let i = 0; i < n; i++) {
    for (const e of requestWrite(random, Date.now()).events) {
      data += JSON.stringify(e.data).length
      metadata += JSON.stringify(e.metadata).length
    }
  }
  return { dataBytes: data / (4 * n), metadataBytes: metadata / (4 * n) }
}

/** Throws unless one generated request's events decode with the domain catalogue's schemas. */
export const check = (): void => {
  for (const e of requestWrite(rng(1), Date.now()).events) {
    const event = Events.decodeRequestEvent(e.type, e.data)
    if (Either.isLeft(event)) throw new Error(`bench event ${e.type} is not a catalogue event: ${event.left}`)
    const metadata = Events.decodeEventMetadata(e.metadata)
    if (Either.isLeft(metadata)) throw new Error(`bench metadata is not valid: ${metadata.left}`)
  }
}

/** An in-memory `usage_hourly`: per hour, tenant, key and model. */
export interface UsageRow {
  requests: number
  promptTokens: number
  completionTokens: number
  costMicroUsd: number
}

export interface Usage {
  readonly rows: Map<string, UsageRow>
  /** Every event seen, completed or not. */
  events: number
}

export const emptyUsage = (): Usage => ({ rows: new Map(), events: 0 })

/** Folds one stored event into the aggregate (reads the stored JSON as is, no decoding). */
export const foldUsage = (usage: Usage, event: EventStore.RecordedEvent): Usage => {
  usage.events++
  if (event.type !== "RequestCompleted") return usage
  const m = event.metadata as {
    readonly occurredAt: string
    readonly tenantId?: string
    readonly keyId?: string
  }
  const d = event.data as {
    readonly model: string
    readonly promptTokens: number
    readonly completionTokens: number
    readonly cost: { readonly amountMicroUsd: number } | null
  }
  const key = `${m.occurredAt.slice(0, 13)}\u0000${m.tenantId ?? ""}\u0000${m.keyId ?? ""}\u0000${d.model}`
  let row = usage.rows.get(key)
  if (row === undefined) {
    row = { requests: 0, promptTokens: 0, completionTokens: 0, costMicroUsd: 0 }
    usage.rows.set(key, row)
  }
  row.requests += 1
  row.promptTokens += d.promptTokens
  row.completionTokens += d.completionTokens
  row.costMicroUsd += d.cost?.amountMicroUsd ?? 0
  return usage
}

export interface UsageTotals {
  readonly groups: number
  readonly requests: number
  readonly promptTokens: number
  readonly completionTokens: number
  readonly costMicroUsd: number
}

export const totals = (usage: Usage): UsageTotals => {
  let requests = 0
  let promptTokens = 0
  let completionTokens = 0
  let costMicroUsd = 0
  for (const row of usage.rows.values()) {
    requests += row.requests
    promptTokens += row.promptTokens
    completionTokens += row.completionTokens
    costMicroUsd += row.costMicroUsd
  }
  return { groups: usage.rows.size, requests, promptTokens, completionTokens, costMicroUsd }
}

/** The same totals computed by PostgreSQL over the stored events, to check a replay against. */
export const totalsSql = `
  SELECT count(DISTINCT (substr(metadata->>'occurredAt', 1, 13), metadata->>'tenantId', metadata->>'keyId', data->>'model'))::int AS groups,
    count(*)::int AS requests,
    sum((data->>'promptTokens')::bigint)::text AS prompt_tokens,
    sum((data->>'completionTokens')::bigint)::text AS completion_tokens,
    sum((data->'cost'->>'amountMicroUsd')::bigint)::text AS cost_micro_usd
  FROM events WHERE type = 'RequestCompleted'`
