/**
 * What the gateway learns about one request as it handles it. Owned by that request's fiber:
 * the handler fills it in, the access log reads it once the response has been sent.
 */
import type { Ids } from "@gateway/domain"
import { Context } from "effect"

export interface RequestInfo {
  /** The gateway's own id: unique, names the request's event stream. */
  readonly requestId: Ids.RequestId
  /** The client's `x-request-id`, echoed back and kept as the correlation id. */
  readonly clientRequestId: string | undefined
  /** `performance.now()` when the request arrived. */
  readonly startedAt: number
  /** The caller's key (its id and name, never the secret) and tenant, once authenticated. */
  keyId?: string
  keyName?: string
  tenantId?: string
  model?: string
  backend?: string
  stream?: boolean
  /** Why the request failed, or why its stream broke after the first byte. */
  error?: string
  /** The client went away before the whole answer was sent. */
  clientClosed?: boolean
  /** The model the client named, when another one answered (a fallback or a routing policy). */
  requested?: string
  /** The tier a routing policy gave the request and acted on. */
  tier?: string
  /** Backend calls made (retries and fallbacks included). */
  attempts?: number
  /** The model fallen back from, when a fallback answered. */
  fallbackFrom?: string
  /** Why the request was turned away by a limit (`rate_limited`, `quota_exceeded`). */
  rejection?: string
  /** Time to the first token of a stream, ms. */
  ttftMs?: number
  promptTokens?: number
  completionTokens?: number
  costMicroUsd?: number
  /** Time spent waiting on backends (attempts, backoff, the answer), ms: the rest is the gateway's own. */
  upstreamMs?: number
}

export class CurrentRequest extends Context.Tag("@gateway/core/CurrentRequest")<
  CurrentRequest,
  RequestInfo
>() {}
