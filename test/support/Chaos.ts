/**
 * Faults under load for the resilience tests: many chat requests through the gateway at a bounded
 * concurrency, each answer read to its end as the client saw it (status, routing headers, body or
 * SSE events, wall time); the events of those requests and of the replicas, read from the
 * gateway's database; and `GET /admin/backends`.
 */
import { SimServer } from "@gateway/backend-sim"
import { Effect, type Scope } from "effect"
import type { EventLog } from "./EventLog.js"
import { messages } from "./Http.js"
import * as Processes from "./Processes.js"

/** One chat answer as its client got it. */
export interface Answer {
  /** `x-gateway-request-id`: the gateway's stream is `request-<id>`. */
  readonly id: string
  readonly stream: boolean
  readonly status: number
  readonly contentType: string | null
  /** `x-request-id` (the client's, or the gateway's id when the client sent none). */
  readonly requestId: string | null
  /** `x-gateway-backend`, `x-gateway-model`, `x-gateway-fallback`, `x-gateway-attempts`. */
  readonly backend: string | null
  readonly model: string | null
  readonly fallback: string | null
  readonly attempts: string | null
  /** The JSON body (a whole answer or an error). */
  readonly json: any
  /** A stream's `data:` payloads in order, each parsed as JSON, `[DONE]` left out. */
  readonly events: ReadonlyArray<any>
  /** A stream ended with `data: [DONE]`. */
  readonly done: boolean
  /** From sending the request to the end of its body. */
  readonly elapsedMs: number
}

/**
 * `POST /v1/chat/completions` for `model`, read to its end within `timeoutMs` (a body that does
 * not end fails the test). Every `data:` line of a stream must be JSON or `[DONE]`.
 */
export const chat = (
  baseUrl: string,
  model: string,
  stream: boolean,
  timeoutMs = 10_000
): Effect.Effect<Answer> =>
  Effect.promise(async () => {
    const start = performance.now()
    const res = await fetch(`${baseUrl}/v1/chat/completions`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ model, messages, stream }),
      signal: AbortSignal.timeout(timeoutMs)
    })
    const text = await res.text()
    const elapsedMs = performance.now() - start
    const isSse = (res.headers.get("content-type") ?? "").startsWith("text/event-stream")
    const data = isSse
      ? text
          .split("\n")
          .filter((line) => line.startsWith("data:"))
          .map((line) => line.slice("data:".length).trim())
      : []
    return {
      id: res.headers.get("x-gateway-request-id") ?? "",
      stream,
      status: res.status,
      contentType: res.headers.get("content-type"),
      requestId: res.headers.get("x-request-id"),
      backend: res.headers.get("x-gateway-backend"),
      model: res.headers.get("x-gateway-model"),
      fallback: res.headers.get("x-gateway-fallback"),
      attempts: res.headers.get("x-gateway-attempts"),
      json: isSse ? undefined : JSON.parse(text),
      events: data.filter((d) => d !== "[DONE]").map((d) => JSON.parse(d)),
      done: data.includes("[DONE]"),
      elapsedMs
    }
  })

/**
 * `n` chat requests for `model`, at most `concurrency` at once; request `i` streams when
 * `stream(i)` (by default every other one).
 */
export const load = (
  baseUrl: string,
  model: string,
  options: {
    readonly n: number
    readonly concurrency: number
    readonly stream?: (i: number) => boolean
    readonly timeoutMs?: number
  }
): Effect.Effect<ReadonlyArray<Answer>> =>
  Effect.forEach(
    Array.from({ length: options.n }, (_, i) => (options.stream ?? ((i) => i % 2 === 1))(i)),
    (stream) => chat(baseUrl, model, stream, options.timeoutMs),
    { concurrency: options.concurrency }
  )

/** How many answers came from each backend (`x-gateway-backend`). */
export const countByBackend = (answers: ReadonlyArray<Answer>): Record<string, number> => {
  const counts: Record<string, number> = {}
  for (const a of answers) counts[a.backend ?? "none"] = (counts[a.backend ?? "none"] ?? 0) + 1
  return counts
}

/** Content text of a stream's chunks. */
export const streamedText = (events: ReadonlyArray<any>): string =>
  events.map((e) => e.choices?.[0]?.delta?.content ?? "").join("")

/** An event as stored: its type and data. */
export interface Stored {
  readonly type: string
  readonly data: any
}

/** The events of each request's stream, in version order (a request with none maps to []). */
export const requestEvents = (
  log: EventLog,
  ids: ReadonlyArray<string>
): Effect.Effect<ReadonlyMap<string, ReadonlyArray<Stored>>> =>
  Effect.map(
    log.query<{ stream_id: string; type: string; data: any }>(
      `SELECT stream_id, type, data FROM events WHERE stream_id = ANY($1::text[])
       ORDER BY stream_id, stream_version`,
      [ids.map((id) => `request-${id}`)]
    ),
    (rows) => {
      const byId = new Map<string, Array<Stored>>(ids.map((id) => [id, []]))
      for (const row of rows) byId.get(row.stream_id.slice("request-".length))?.push(row)
      return byId
    }
  )

const terminal = new Set(["RequestCompleted", "RequestFailed", "RequestCancelled", "RequestRejected"])

/** Waits until every one of these requests has its terminal event, then returns their events. */
export const settledEvents = (log: EventLog, ids: ReadonlyArray<string>) =>
  Processes.eventually(
    `a terminal event on each of ${ids.length} request streams`,
    Effect.map(requestEvents(log, ids), (byId) =>
      [...byId.values()].every((events) => events.some((e) => terminal.has(e.type))) ? byId : undefined
    ),
    "5 seconds"
  )

/** The events of `backend-<id>`, in order. */
export const backendEvents = (log: EventLog, backend: string): Effect.Effect<ReadonlyArray<Stored>> =>
  log.query<Stored>(`SELECT type, data FROM events WHERE stream_id = $1 ORDER BY stream_version`, [
    `backend-${backend}`
  ])

/** Waits (bounded) until `backend-<id>` has an event for which `found` holds; returns the stream. */
export const awaitBackendEvent = (
  log: EventLog,
  backend: string,
  what: string,
  found: (events: ReadonlyArray<Stored>) => boolean,
  timeout: `${number} seconds` = "5 seconds"
) =>
  Processes.eventually(
    `${what} on backend-${backend}`,
    Effect.map(backendEvents(log, backend), (events) => (found(events) ? events : undefined)),
    timeout
  )

/** One replica as `GET /admin/backends` shows it (the fields the tests read). */
export interface BackendView {
  readonly id: string
  readonly model: string
  readonly health: "healthy" | "ejected"
  readonly circuit: {
    readonly state: "closed" | "open" | "half_open"
    readonly retry_after_ms: number
    readonly opens: number
  }
  readonly in_flight: number
  readonly requests: number
  readonly failures: number
  readonly last_error: string | null
}

/** `GET /admin/backends` with the admin key; dies unless it answers 200. */
export const adminBackends = (
  baseUrl: string,
  adminKey: string
): Effect.Effect<ReadonlyMap<string, BackendView>> =>
  Effect.promise(async () => {
    const res = await fetch(`${baseUrl}/admin/backends`, {
      headers: { authorization: `Bearer ${adminKey}` }
    })
    const text = await res.text()
    if (res.status !== 200) throw new Error(`GET /admin/backends: HTTP ${res.status}: ${text}`)
    const body = JSON.parse(text) as { object: string; data: ReadonlyArray<BackendView> }
    if (body.object !== "list") throw new Error(`GET /admin/backends: not a list: ${text}`)
    return new Map(body.data.map((b) => [b.id, b]))
  })

/**
 * A simulator in this process (closed with the scope): unlike the child process, it can stop
 * listening (`setRefusing(true)`: connections are refused) and listen again on the same port.
 */
export const inProcessSim = (
  options: Parameters<typeof SimServer.start>[0]
): Effect.Effect<SimServer.SimServer, never, Scope.Scope> =>
  Effect.acquireRelease(
    Effect.promise(() => SimServer.start({ host: "127.0.0.1", ...options })),
    (sim) => Effect.promise(() => sim.close())
  )
