/**
 * Events as an operator reads them: the time, the type and the data's key fields on one line
 * (`model=gpt-4o status=200 tokens=12+40 cost=$0.000210 latency=532ms`), long values shortened.
 */
import type { EventStore } from "@gateway/event-store"

interface Metadata {
  readonly requestId?: string
  readonly correlationId?: string
  readonly tenantId?: string
  readonly keyId?: string
  readonly traceId?: string | null
  readonly occurredAt?: string
}

export const metadataOf = (event: EventStore.RecordedEvent): Metadata =>
  typeof event.metadata === "object" && event.metadata !== null ? (event.metadata as Metadata) : {}

/** When it happened in the gateway, or else when the store recorded it. */
export const timeOf = (event: EventStore.RecordedEvent) =>
  metadataOf(event).occurredAt ?? event.recordedAt.toISOString()

const shorten = (text: string, max: number) => (text.length <= max ? text : `${text.slice(0, max - 1)}…`)

const scalar = (value: unknown): string =>
  typeof value === "string" ? (/[\s"]/.test(value) ? JSON.stringify(value) : value) : JSON.stringify(value)

/** Fields shown in their own form, before the rest; `undefined` drops a field. */
const special: Record<string, (value: any, data: Record<string, any>) => string | undefined> = {
  cost: (cost) => (cost === null ? "cost=none" : `cost=$${(Number(cost.amountMicroUsd) / 1e6).toFixed(6)}`),
  payload: (payload) => `payload=${payload.kind}${payload.bytes === undefined ? "" : `(${payload.bytes}B)`}`,
  promptTokens: (prompt, data) => `tokens=${prompt}+${data.completionTokens ?? 0}`,
  completionTokens: (_, data) => (data.promptTokens === undefined ? `tokens=0+${_}` : undefined),
  latencyMs: (ms) => `latency=${Math.round(ms)}ms`,
  ttftMs: (ms) => (ms === null ? undefined : `ttft=${Math.round(ms)}ms`),
  error: (error) =>
    typeof error === "object" && error !== null
      ? `error=${scalar(shorten(`${error.reason ?? error.code ?? ""}: ${error.message ?? ""}`, 80))}`
      : `error=${scalar(error)}`
}

/** Fields an operator looks for first, in this order; the others follow as stored. */
const first = [
  "model",
  "backend",
  "upstreamModel",
  "why",
  "attempt",
  "status",
  "reason",
  "promptTokens",
  "completionTokens",
  "cost",
  "latencyMs",
  "ttftMs",
  "error",
  "message"
]

const rank = (key: string) => {
  const i = first.indexOf(key)
  return i === -1 ? first.length : i
}

/** The data's fields as `key=value` pairs, nulls left out, each value at most 60 characters. */
export const summarize = (data: unknown): string => {
  if (typeof data !== "object" || data === null) return data === undefined ? "" : scalar(data)
  const fields = data as Record<string, unknown>
  const parts: Array<string> = []
  // jsonb stores keys shortest first: put them back in an order that reads well.
  const entries = Object.entries(fields).sort(([a], [b]) => rank(a) - rank(b))
  for (const [key, value] of entries) {
    const show = special[key]
    if (show !== undefined) {
      const part = show(value, fields)
      if (part !== undefined) parts.push(part)
    } else if (value !== null && value !== undefined) {
      parts.push(`${key}=${shorten(scalar(value), 60)}`)
    }
  }
  return parts.join(" ")
}

/** `#1234  2026-11-21T18:25:03.120Z  request-7f3c…  RequestCompleted  model=… status=200` */
export const line = (event: EventStore.RecordedEvent, width = 160) =>
  shorten(
    `#${event.position}  ${timeOf(event)}  ${event.streamId}  ${event.type}  ${summarize(event.data)}`,
    width
  )
