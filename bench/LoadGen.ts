/**
 * Closed-loop HTTP load generator on undici: `concurrency` workers, each sending its next request
 * as soon as the previous one has been read to the end, over keep-alive connections. A run stops
 * issuing requests after `maxRequests` or `maxDurationMs`, whichever comes first, then waits for
 * the requests in flight (each bounded by undici's headers and body timeouts).
 */
import { Agent, request } from "undici"

export interface LoadSpec {
  /** Full URL of `POST /v1/chat/completions`. */
  readonly url: string
  readonly body: string
  readonly stream: boolean
  readonly concurrency: number
  readonly maxRequests: number
  readonly maxDurationMs: number
  /** Extra request headers (e.g. `authorization`), on top of `content-type: application/json`. */
  readonly headers?: Readonly<Record<string, string>>
}

export interface LoadResult {
  /** Requests answered 200 with a complete body. */
  readonly ok: number
  readonly errors: number
  /** From the first request sent to the last one finished. */
  readonly elapsedMs: number
  /** Latency of each successful request (send to last byte), ascending. */
  readonly latencyMs: Float64Array
  /** Streaming only: time to the first `data:` chunk with non-empty content, ascending. */
  readonly ttftMs: Float64Array | undefined
  readonly firstError: string | undefined
}

/** The benchmarks' chat request to the simulated backend's model (`sim` unless told). */
export const chatBody = (stream: boolean, model = "sim"): string =>
  JSON.stringify({
    model,
    messages: [
      { role: "system", content: "You are a helpful assistant." },
      { role: "user", content: "Hello there, how are you today? Tell me something about latency." }
    ],
    stream
  })

/** A keep-alive connection pool sized for `connections` concurrent requests. */
export const makeAgent = (connections: number): Agent =>
  new Agent({
    connections,
    pipelining: 1,
    keepAliveTimeout: 30_000,
    headersTimeout: 15_000,
    bodyTimeout: 15_000
  })

const jsonHeaders: Readonly<Record<string, string>> = { "content-type": "application/json" }
/** A content delta with at least one character (the role chunk carries `"content":""`). */
const contentful = /"content":"(?:[^"\\]|\\.)/
const carryLength = 64

/** Runs one bounded closed-loop load against `spec.url` through `agent`. */
export const run = async (agent: Agent, spec: LoadSpec): Promise<LoadResult> => {
  const latency = new Float64Array(spec.maxRequests)
  const ttft = spec.stream ? new Float64Array(spec.maxRequests) : undefined
  let issued = 0
  let ok = 0
  let ttftCount = 0
  let errors = 0
  let firstError: string | undefined
  const start = performance.now()
  const deadline = start + spec.maxDurationMs
  const headers = spec.headers === undefined ? jsonHeaders : { ...jsonHeaders, ...spec.headers }

  const fail = (reason: string): void => {
    errors++
    firstError ??= reason
  }

  const once = async (): Promise<void> => {
    const sent = performance.now()
    const res = await request(spec.url, { method: "POST", body: spec.body, headers, dispatcher: agent })
    if (res.statusCode !== 200) {
      const text = await res.body.text()
      return fail(`HTTP ${res.statusCode}: ${text.slice(0, 200)}`)
    }
    if (ttft === undefined) {
      const text = await res.body.text()
      if (!text.includes('"choices"')) return fail(`unexpected body: ${text.slice(0, 200)}`)
      latency[ok++] = performance.now() - sent
      return
    }
    let first: number | undefined
    let carry = ""
    for await (const chunk of res.body) {
      // latin1 keeps bytes as they are; only ASCII patterns are searched for.
      const text = carry + (chunk as Buffer).toString("latin1")
      if (first === undefined && contentful.test(text)) first = performance.now() - sent
      carry = text.slice(-carryLength)
    }
    const done = performance.now() - sent
    if (!carry.includes("data: [DONE]")) return fail(`stream did not end with [DONE]: ${carry}`)
    if (first === undefined) return fail("stream without content")
    ttft[ttftCount++] = first
    latency[ok++] = done
  }

  const worker = async (): Promise<void> => {
    while (issued < spec.maxRequests && performance.now() < deadline) {
      issued++
      try {
        await once()
      } catch (error) {
        fail(error instanceof Error ? `${error.name}: ${error.message}` : String(error))
      }
    }
  }

  await Promise.all(Array.from({ length: spec.concurrency }, worker))
  const elapsedMs = performance.now() - start
  return {
    ok,
    errors,
    elapsedMs,
    latencyMs: latency.slice(0, ok).sort(),
    ttftMs: ttft?.slice(0, ttftCount).sort(),
    firstError
  }
}
