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
  readonly body: Readable
  readonly failure: (cause: unknown) => Errors.BackendError
}

export type ChatResponse = Complete | Streaming

export class Upstream extends Context.Tag("@gateway/core/Upstream")<
  Upstream,
  {
    /** One attempt against `request.target`; fails for connect errors, timeouts and non-2xx. */
    readonly chat: (request: ChatRequest) => Effect.Effect<ChatResponse, Errors.BackendError>
  }
>() {}
