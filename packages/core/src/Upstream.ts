/**
 * The port to a model server. An adapter (OpenAI-compatible today; Anthropic and others later)
 * maps the OpenAI request onto its backend and the backend's answer back onto the OpenAI format.
 */
import type { Errors, Ids, OpenAi } from "@gateway/domain"
import { Context, type Effect, type Stream } from "effect"
import type { Target } from "./Models.js"

export interface ChatRequest {
  readonly requestId: Ids.RequestId
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

/** An SSE answer (`stream: true`): bytes forwarded as they arrive; a break fails the stream. */
export interface Streaming {
  readonly _tag: "Streaming"
  readonly body: Stream.Stream<Uint8Array, Errors.BackendError>
}

export type ChatResponse = Complete | Streaming

export class Upstream extends Context.Tag("@gateway/core/Upstream")<
  Upstream,
  {
    /** One attempt against `request.target`; fails for connect errors, timeouts and non-2xx. */
    readonly chat: (request: ChatRequest) => Effect.Effect<ChatResponse, Errors.BackendError>
  }
>() {}
