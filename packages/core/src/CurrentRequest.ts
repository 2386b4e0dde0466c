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
  /** The answer's finish reason (its first choice's), when it completed. */
  finishReason?: string
  promptTokens?: number
  completionTokens?: number
  costMicroUsd?: number
  /** The request's trace (its span's, or an unsampled client's): stamped on its events and log lines. */
  traceId?: string | undefined
  spanId?: string
  /** The client's own `traceparent`, passed on to backends when the gateway does not trace. */
  traceparent?: string
  /** Time spent waiting on backends (attempts, backoff, the answer), ms: the rest is the gateway's own. */
  upstreamMs?: number
}

const ms = (value: number) => Math.round(value * 100) / 100

/**
 * The request's access-log fields (one `info` line per request, whatever its transport): its ids,
 * who called, what answered, its status, latency, time to first token and tokens. Never a key.
 */
export const accessFields = (
  info: RequestInfo,
  request: { readonly method: string; readonly path: string },
  status: number,
  latencyMs: number
): Record<string, unknown> => {
  const fields: Record<string, unknown> = {
    request_id: info.requestId,
    ...(info.clientRequestId === undefined ? {} : { client_request_id: info.clientRequestId }),
    method: request.method,
    path: request.path,
    status,
    latency_ms: ms(latencyMs)
  }
  // A traced request's line gets its span from the logger; an unsampled one its client's trace.
  if (info.traceId !== undefined) fields.trace_id = info.traceId
  if (info.tenantId !== undefined) fields.tenant = info.tenantId
  if (info.keyId !== undefined) fields.key_id = info.keyId
  if (info.keyName !== undefined) fields.key_name = info.keyName
  if (info.model !== undefined) fields.model = info.model
  if (info.requested !== undefined) fields.requested_model = info.requested
  if (info.tier !== undefined) fields.tier = info.tier
  if (info.backend !== undefined) fields.backend = info.backend
  if (info.attempts !== undefined) fields.attempts = info.attempts
  if (info.stream !== undefined) fields.stream = info.stream
  if (info.ttftMs !== undefined) fields.ttft_ms = ms(info.ttftMs)
  if (info.promptTokens !== undefined) fields.prompt_tokens = info.promptTokens
  if (info.completionTokens !== undefined) fields.completion_tokens = info.completionTokens
  if (info.finishReason !== undefined) fields.finish_reason = info.finishReason
  if (info.rejection !== undefined) fields.rejection = info.rejection
  if (info.error !== undefined) fields.error = info.error
  return fields
}

export class CurrentRequest extends Context.Tag("@gateway/core/CurrentRequest")<
  CurrentRequest,
  RequestInfo
>() {}
