/**
 * The one place where gateway errors become HTTP answers in the OpenAI error shape
 * `{ error: { message, type, param, code } }`, with the status clients expect.
 */
import { HttpServerResponse } from "@effect/platform"
import type { Errors, OpenAi } from "@gateway/domain"
import { Schema } from "effect"

export interface Rendered {
  readonly status: number
  readonly body: OpenAi.ErrorBody
  readonly headers?: Readonly<Record<string, string>>
}

const body = (
  message: string,
  type: string,
  code: string | null,
  param: string | null = null
): OpenAi.ErrorBody => ({
  error: { message, type, param, code }
})

const isErrorBody = Schema.is(
  Schema.Struct({
    error: Schema.Struct({ message: Schema.String, type: Schema.optional(Schema.NullOr(Schema.String)) })
  })
)

/** A backend's error status and body; OpenAI-shaped bodies are passed on, anything else wrapped. */
const renderBackend = (error: Errors.BackendError): Rendered => {
  switch (error.reason) {
    case "Http": {
      const status = error.status ?? 502
      if (isErrorBody(error.upstream)) {
        const e = error.upstream.error as Record<string, unknown>
        return {
          status,
          body: body(
            String(e.message),
            typeof e.type === "string" ? e.type : status >= 500 ? "api_error" : "invalid_request_error",
            typeof e.code === "string" || typeof e.code === "number" ? String(e.code) : null,
            typeof e.param === "string" ? e.param : null
          )
        }
      }
      return {
        status,
        body: body(
          `The model backend answered with HTTP ${status}.`,
          status >= 500 ? "api_error" : "invalid_request_error",
          "upstream_error"
        )
      }
    }
    case "Connect":
      return {
        status: 502,
        body: body("The model backend could not be reached.", "api_error", "backend_unavailable")
      }
    case "Timeout":
      return {
        status: 504,
        body: body(
          `The model backend did not answer in time (${error.detail}).`,
          "timeout_error",
          "backend_timeout"
        )
      }
    case "StreamBroken":
      return {
        status: 502,
        body: body("The model backend broke off its answer.", "api_error", "backend_stream_broken")
      }
    case "Protocol":
      return {
        status: 502,
        body: body("The model backend sent an invalid answer.", "api_error", "backend_protocol_error")
      }
    case "StreamError":
      return {
        status: 502,
        body: body(
          `The model backend reported an error in its answer (${error.detail}).`,
          "api_error",
          "backend_error"
        )
      }
    case "Unavailable":
      return {
        status: 503,
        body: body(
          `No backend of the model can take the request now (${error.detail}).`,
          "api_error",
          "backend_unavailable"
        )
      }
  }
}

/** `retry-after` in whole seconds (as HTTP has it) and `retry-after-ms` (as OpenAI's SDKs read it). */
const retryAfter = (ms: number) => ({
  "retry-after": String(Math.max(1, Math.ceil(ms / 1000))),
  "retry-after-ms": String(Math.max(1, Math.ceil(ms)))
})

/** Status and OpenAI error body for any gateway error. */
export const render = (error: Errors.GatewayError): Rendered => {
  switch (error._tag) {
    case "NotFound":
      return { status: 404, body: body(error.message, "invalid_request_error", "not_found") }
    case "Conflict":
      return { status: 409, body: body(error.message, "invalid_request_error", "conflict") }
    case "Unauthorized":
      return { status: 401, body: body(error.message, "invalid_request_error", "invalid_api_key") }
    case "Forbidden":
      return { status: 403, body: body(error.message, "permission_error", error.code) }
    case "RateLimited":
      return {
        status: 429,
        body: body(error.message, error.limit === "tokens" ? "tokens" : "requests", "rate_limit_exceeded"),
        headers: retryAfter(error.retryAfterMs)
      }
    case "QuotaExceeded":
      return {
        status: 429,
        body: body(error.message, "insufficient_quota", "insufficient_quota"),
        headers: retryAfter(error.retryAfterMs)
      }
    case "InvalidRequest":
      return { status: 400, body: body(error.message, "invalid_request_error", error.code, error.param) }
    case "PayloadTooLarge":
      return { status: 413, body: body(error.message, "invalid_request_error", "request_too_large") }
    case "ModelNotFound":
      return { status: 404, body: body(error.message, "invalid_request_error", "model_not_found", "model") }
    case "RouteNotFound":
      return { status: 404, body: body(error.message, "invalid_request_error", "unknown_url") }
    case "ServiceUnavailable":
      return { status: 503, body: body(error.message, "api_error", "service_unavailable") }
    case "BackendError": {
      const rendered = renderBackend(error)
      return error.retryAfter === undefined
        ? rendered
        : { ...rendered, headers: { "retry-after": error.retryAfter } }
    }
  }
}

/** An unexpected defect: never leaks internals, still in the OpenAI shape. */
export const internal: Rendered = {
  status: 500,
  body: body(
    "The gateway failed to process the request. It has been logged.",
    "server_error",
    "internal_error"
  )
}

export const toResponse = (rendered: Rendered): HttpServerResponse.HttpServerResponse =>
  HttpServerResponse.text(JSON.stringify(rendered.body), {
    status: rendered.status,
    contentType: "application/json",
    ...(rendered.headers === undefined ? {} : { headers: rendered.headers })
  })

/** One SSE event carrying an error, sent when a stream breaks after its first byte. */
export const toSseEvent = (rendered: Rendered): Uint8Array =>
  new TextEncoder().encode(`data: ${JSON.stringify(rendered.body)}\n\n`)

export const fromError = (error: Errors.GatewayError) => toResponse(render(error))
