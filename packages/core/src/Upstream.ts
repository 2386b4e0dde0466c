/**
 * The port to a model server. An adapter (OpenAI-compatible today; Anthropic and others later)
 * maps the OpenAI request onto its backend and the backend's answer back onto the OpenAI format.
 */

import type { Readable } from "node:stream"
import type { Errors, Ids, OpenAi } from "@gateway/domain"
import { Context, type Effect } from "effect"
import type { Target } from "./Models.js"

export interface ChatRequest {
  readonly requestId: Ids.RequestId
  /** The client's own `x-request-id`, passed on so the backend's logs match the client's. */
  readonly clientRequestId: string | undefined
  readonly target: Target
  /** The validated request, unknown fields preserved. */
  readonly body: OpenAi.ChatCompletionRequest
  /** The bytes the client sent, forwarded untouched when nothing needs rewriting. */
  readonly raw: Uint8Array
  /** W3C trace context for the backend: the attempt's span, or the client's own when not tracing. */
  readonly traceparent?: string | undefined
}

/** A whole JSON answer (`stream: false`): the bytes to return and the backend's status. */
export interface Complete {
  readonly _tag: "Complete"
  readonly status: number
  readonly body: Uint8Array
}

/**
 * An SSE answer (`stream: true`): the backend's bytes as a Node stream, relayed without Effect's
 * per-chunk machinery (the hot path). Destroying `body` aborts the attempt; `failure` types the
 * error `body` emits when it breaks.
 */
export interface Streaming {
  readonly _tag: "Streaming"
  /** Paused, with the first event (already seen, so the attempt is known to answer) unread. */
  readonly body: Readable
  readonly failure: (cause: unknown) => Errors.BackendError
}

/** What a `GET` of a backend's health or metrics path answered. */
export interface ProbeResult {
  readonly status: number
  readonly body: string
}

/** The reason a stream is destroyed with when it fell silent for longer than `idle_ms`. */
export class StreamIdle extends Error {
  constructor(readonly idleMs: number) {
    super(`no chunk for ${idleMs} ms`)
  }
}

export type ChatResponse = Complete | Streaming

export class Upstream extends Context.Tag("@gateway/core/Upstream")<
  Upstream,
  {
    /**
     * One attempt against `request.target`; fails for connect errors, timeouts, non-2xx, and a
     * stream whose first event is an error. A stream is returned once its first event arrived
     * (within `first_byte_ms`): until then the attempt can still be retried unseen.
     */
    readonly chat: (request: ChatRequest) => Effect.Effect<ChatResponse, Errors.BackendError>
    /** `GET path` on the target's origin (health checks, metrics), bounded by `timeoutMs`. */
    readonly probe: (
      target: Target,
      path: string,
      timeoutMs: number
    ) => Effect.Effect<ProbeResult, Errors.BackendError>
  }
>() {}
