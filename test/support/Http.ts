/**
 * Plain HTTP against the gateway (global `fetch`), for what the OpenAI SDK would hide: raw
 * status codes, headers, malformed bodies and SSE events as sent.
 */
import { expect } from "@effect/vitest"
import { Effect } from "effect"

export const messages = [{ role: "user", content: "Say something about gateways." }]

/** `POST /v1/chat/completions` with a raw string body, or any value serialized as JSON. */
export const postChat = (
  baseUrl: string,
  body: unknown,
  init: { readonly headers?: Record<string, string>; readonly signal?: AbortSignal } = {}
): Effect.Effect<Response> =>
  Effect.promise(() =>
    fetch(`${baseUrl}/v1/chat/completions`, {
      method: "POST",
      headers: { "content-type": "application/json", ...init.headers },
      body: typeof body === "string" ? body : JSON.stringify(body),
      ...(init.signal === undefined ? {} : { signal: init.signal })
    })
  )

/** What an SSE body held: its `data:` payloads in order, `[DONE]` left out. */
export interface SseEvents {
  readonly events: ReadonlyArray<any>
  readonly done: boolean
}

/** Reads an SSE response to its end and parses its `data:` events. */
export const readSse = (res: Response): Effect.Effect<SseEvents> =>
  Effect.promise(async () => {
    const text = await res.text()
    const data = text
      .split("\n\n")
      .filter((event) => event.startsWith("data: "))
      .map((event) => event.slice("data: ".length))
    return {
      events: data.filter((d) => d !== "[DONE]").map((d) => JSON.parse(d)),
      done: data.includes("[DONE]")
    }
  })

/** Chunks carrying content (not the role, finish or usage chunks). */
export const contentChunks = (chunks: ReadonlyArray<any>): ReadonlyArray<any> =>
  chunks.filter(
    (c) => typeof c.choices?.[0]?.delta?.content === "string" && c.choices[0].delta.content !== ""
  )

const requestIdPattern = /^[A-Za-z0-9._:-]{1,128}$/

/**
 * Asserts an error answer as an OpenAI client expects it: the status, a JSON content type, an
 * `x-request-id`, and exactly `{ error: { message, type, param, code } }`; returns the `error`.
 */
export const expectOpenAiError = (
  res: Response,
  expected: { readonly status: number; readonly code: string | null; readonly param?: string | null }
): Effect.Effect<{ message: string; type: string; param: string | null; code: string | null }> =>
  Effect.promise(async () => {
    const text = await res.text()
    expect({ status: res.status, body: text }).toMatchObject({ status: expected.status })
    expect(res.headers.get("content-type")).toMatch(/^application\/json/)
    expect(res.headers.get("x-request-id")).toMatch(requestIdPattern)
    const body = JSON.parse(text)
    expect(Object.keys(body)).toEqual(["error"])
    expect(Object.keys(body.error).sort()).toEqual(["code", "message", "param", "type"])
    expect(body.error.message).toEqual(expect.any(String))
    expect(body.error.message.length).toBeGreaterThan(0)
    expect(body.error.type).toEqual(expect.any(String))
    expect(body.error.code).toBe(expected.code)
    if (expected.param !== undefined) expect(body.error.param).toBe(expected.param)
    return body.error
  })

/** Reads an SSE body until `until` holds for what arrived, then hangs up; returns what arrived. */
export const readThenHangUp = (
  res: Response,
  controller: AbortController,
  until: (text: string) => boolean
) =>
  Effect.promise(async () => {
    const reader = res.body!.getReader()
    const decoder = new TextDecoder()
    let text = ""
    while (!until(text)) {
      const { done, value } = await reader.read()
      if (done) throw new Error(`the stream ended before the client hung up:\n${text}`)
      text += decoder.decode(value, { stream: true })
    }
    controller.abort()
    return text
  })
