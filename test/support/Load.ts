/**
 * Client load for the resilience tests: chat requests through the gateway, each one's outcome as
 * the client saw it. An answer is complete when a JSON body was read and parsed to the end, or a
 * stream was read to `data: [DONE]`; the gateway's request id comes from `x-gateway-request-id`.
 */
import { Effect } from "effect"
import { messages } from "./Http.js"

export interface Outcome {
  /** `x-gateway-request-id`, or null when no response headers arrived. */
  readonly id: string | null
  readonly stream: boolean
  /** The HTTP status, or null when no response arrived. */
  readonly status: number | null
  /** A 200 whose whole answer arrived (the JSON body parsed, or the stream's `[DONE]` seen). */
  readonly complete: boolean
  /** The connection failed before the answer's end: no response, or its body broke off. */
  readonly broken: boolean
  /** What went wrong on the way, for messages. */
  readonly error: string | null
}

const describe = (error: unknown): string => {
  const cause = (error as { cause?: { code?: unknown; message?: unknown } }).cause
  return String(cause?.code ?? cause?.message ?? (error as Error).message ?? error)
}

/** One chat request, read to its end (or until it breaks); never fails. */
export const chat = (baseUrl: string, stream: boolean, timeoutMs = 10_000): Effect.Effect<Outcome> =>
  Effect.promise(async (): Promise<Outcome> => {
    let res: Response
    try {
      res = await fetch(`${baseUrl}/v1/chat/completions`, {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify({ model: "small", messages, stream }),
        signal: AbortSignal.timeout(timeoutMs)
      })
    } catch (error) {
      return { id: null, stream, status: null, complete: false, broken: true, error: describe(error) }
    }
    const id = res.headers.get("x-gateway-request-id")
    try {
      const text = await res.text()
      const complete =
        res.status === 200 &&
        (stream
          ? text.split("\n\n").some((event) => event.trim() === "data: [DONE]")
          : typeof JSON.parse(text)?.choices?.[0]?.message?.content === "string")
      return {
        id,
        stream,
        status: res.status,
        complete,
        broken: false,
        error: complete ? null : text.slice(0, 200)
      }
    } catch (error) {
      return { id, stream, status: res.status, complete: false, broken: true, error: describe(error) }
    }
  })
