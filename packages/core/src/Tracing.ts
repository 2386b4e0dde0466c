/**
 * Tracing. With an OTLP endpoint configured, every sampled request is a server span (continuing
 * the client's `traceparent`) with child spans for its steps, exported in batches over OTLP/HTTP.
 * Without one, spans are off entirely: Effect's own, and the platform's per-request server span,
 * which otherwise parses the URL and copies the headers of every request even when nothing
 * records it. Services read `enabled` once when built and add no span work at all when off.
 */

import { NodeSdk, Tracer as OtelTracer, Resource } from "@effect/opentelemetry"
import { Headers, HttpMiddleware, type HttpServerRequest } from "@effect/platform"
import * as OtelApi from "@opentelemetry/api"
import { OTLPTraceExporter } from "@opentelemetry/exporter-trace-otlp-http"
import {
  AlwaysOnSampler,
  BatchSpanProcessor,
  ParentBasedSampler,
  type Sampler,
  SamplingDecision,
  type SpanProcessor
} from "@opentelemetry/sdk-trace-base"
import { Context, Effect, FiberRef, Layer, Option, Tracer } from "effect"
import type { RequestInfo } from "./CurrentRequest.js"

export const layerDisabled: Layer.Layer<never> = Layer.mergeAll(
  Layer.setTracerEnabled(false),
  Layer.locallyScoped(HttpMiddleware.currentTracerDisabledWhen, () => true)
)

/** Who is exporting: the OTel resource (the `OTEL_SERVICE_NAME` / `OTEL_RESOURCE_ATTRIBUTES` env wins). */
export interface Options {
  readonly serviceName: string
  readonly serviceVersion?: string | undefined
  /** This gateway replica (`service.instance.id`). */
  readonly instanceId: string
  /** The share of requests traced when the client sent no trace of its own (1 by default). */
  readonly sampleRatio?: number | undefined
}

/**
 * Traces start only at requests: a span with neither a parent nor the server kind (a projection's
 * polling query, the event writer's batch) is not recorded, so a tracing backend shows requests,
 * not the background's chatter. Everything else goes to `inner` (requests were sampled before
 * their span was made: see `serverSpan`).
 */
class RequestTraces implements Sampler {
  constructor(private readonly inner: Sampler) {}
  shouldSample(...args: Parameters<Sampler["shouldSample"]>) {
    const [context, , , kind] = args
    if (kind !== OtelApi.SpanKind.SERVER && OtelApi.trace.getSpanContext(context) === undefined) {
      return { decision: SamplingDecision.NOT_RECORD }
    }
    return this.inner.shouldSample(...args)
  }
  toString() {
    return `RequestTraces{${this.inner.toString()}}`
  }
}

/** Routes as span names: bounded, unlike raw paths (`POST /v1/chat/completions`). */
const routeOf = (url: string): string => {
  const q = url.indexOf("?")
  const path = q === -1 ? url : url.slice(0, q)
  switch (path) {
    case "/v1/chat/completions":
    case "/chat/completions":
    case "/v1/models":
    case "/models":
    case "/metrics":
    case "/health":
    case "/ready":
    case "/rpc":
      return path
  }
  if (path.startsWith("/v1/models/")) return "/v1/models/{model}"
  if (path.startsWith("/admin/")) return "/admin/*"
  return "other"
}

/**
 * The client's span from its W3C `traceparent`, its sampled flag kept where OpenTelemetry reads
 * it (the platform's own parser's external span would pass as sampled whatever the flag said).
 */
const clientParent = (traceparent: string | undefined): Tracer.ExternalSpan | undefined => {
  if (traceparent === undefined || !isTraceparent(traceparent)) return undefined
  const [, traceId, spanId, flags] = traceparent.split("-") as [string, string, string, string]
  if (/^0+$/.test(traceId) || /^0+$/.test(spanId)) return undefined
  return OtelTracer.makeExternalSpan({ traceId, spanId, traceFlags: Number.parseInt(flags, 16) & 1 })
}

/** The share of requests without a client trace that are traced (`OTEL_TRACES_SAMPLER_ARG`). */
export class SampleRatio extends Context.Reference<SampleRatio>()("@gateway/core/Tracing/SampleRatio", {
  defaultValue: () => 1
}) {}

/** Whether requests to `url` are traced: not health and readiness probes (most of the spans, saying nothing). */
export const traces = (url: string): boolean => url !== "/health" && url !== "/ready"

/**
 * `use` inside the request's server span (`POST /v1/chat/completions`), which continues the
 * client's `traceparent`. The gateway makes this span itself rather than through the platform's
 * tracer middleware, which copies every request and response header into attributes.
 */
export const serverSpan = <A, E, R>(
  request: HttpServerRequest.HttpServerRequest,
  sampleRatio: number,
  use: (
    spans: { readonly span: Tracer.Span; readonly otel: OtelApi.Span | undefined } | undefined
  ) => Effect.Effect<A, E, R>
): Effect.Effect<A, E, R> => {
  const route = routeOf(request.url)
  const parent = clientParent(request.headers.traceparent)
  // Sampled here, before any span exists: a request not traced costs no span work at all. The
  // client's decision stands; without one, `sampleRatio` of the requests are traced.
  const sampled = parent !== undefined ? parent.sampled : sampleRatio >= 1 || Math.random() < sampleRatio
  if (!sampled) return use(undefined)
  return Effect.useSpan(
    `${request.method} ${route}`,
    {
      kind: "server",
      captureStackTrace: false,
      ...(parent === undefined ? {} : { parent }),
      attributes: { "http.request.method": request.method, "http.route": route }
    },
    (span) =>
      Effect.withParentSpan(
        Effect.flatMap(currentSpans, (spans) => use(spans ?? { span, otel: undefined })),
        span
      )
  )
}

/**
 * Effect's spans as OpenTelemetry spans, without making each span the active OpenTelemetry
 * context around every step of its fiber (an AsyncLocalStorage switch per step, measured at
 * about a tenth of a traced request's CPU). That context only serves libraries instrumented by
 * OpenTelemetry itself; the gateway has none, and passes `traceparent` to backends by hand.
 */
const effectTracer = Layer.unwrapEffect(
  Effect.map(OtelTracer.make, (otel) =>
    Layer.setTracer(Tracer.make({ span: otel.span, context: (execution) => execution() }))
  )
)

/**
 * Spans through `processor` (an OTLP batch exporter, or a test's in-memory one). Health and
 * readiness probes are not traced: they would be most of the spans and say nothing.
 */
export const layerProcessor = (processor: () => SpanProcessor, options: Options): Layer.Layer<never> =>
  Layer.mergeAll(
    effectTracer.pipe(
      Layer.provide(OtelTracer.layerTracer),
      Layer.provide(
        Layer.suspend(() =>
          NodeSdk.layerTracerProvider(processor(), {
            // Requests are sampled before their span is made (`serverSpan`): what reaches the
            // sampler is to be recorded, unless it is background work.
            sampler: new RequestTraces(new ParentBasedSampler({ root: new AlwaysOnSampler() }))
          })
        )
      ),
      Layer.provide(
        Resource.layerFromEnv(
          Resource.configToAttributes({
            serviceName: options.serviceName,
            ...(options.serviceVersion === undefined ? {} : { serviceVersion: options.serviceVersion }),
            attributes: { "service.instance.id": options.instanceId }
          })
        )
      )
    ),
    Layer.setTracerEnabled(true),
    Layer.succeed(SampleRatio, options.sampleRatio ?? 1),
    // The request span is the gateway's own (`serverSpan`), not the platform middleware's.
    Layer.locallyScoped(HttpMiddleware.currentTracerDisabledWhen, () => true),
    // Wherever the platform still records headers, Azure-style `api-key` carries a gateway key too.
    Layer.locallyScoped(Headers.currentRedactedNames, [
      "authorization",
      "api-key",
      "x-api-key",
      "cookie",
      "set-cookie",
      "proxy-authorization"
    ] as const)
  )

/**
 * Spans exported over OTLP/HTTP in batches. The exporter takes the standard variables
 * (`OTEL_EXPORTER_OTLP_ENDPOINT`, `…_TRACES_ENDPOINT`, `…_HEADERS`, `…_TIMEOUT`).
 */
export const layerOtlp = (options: Options): Layer.Layer<never> =>
  layerProcessor(() => new BatchSpanProcessor(new OTLPTraceExporter()), options)

/** Whether spans are recorded here: read once by services when they are built. */
export const enabled: Effect.Effect<boolean> = FiberRef.get(FiberRef.currentTracerEnabled)

/** The W3C `traceparent` naming `span` as the parent of whatever receives it. */
export const traceparent = (span: Tracer.Span): string =>
  `00-${span.traceId}-${span.spanId}-${span.sampled ? "01" : "00"}`

const traceparentPattern = /^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$/

/** A well-formed W3C `traceparent` (only those are passed on). */
export const isTraceparent = (value: string): boolean => traceparentPattern.test(value)

/**
 * The trace id of a client's well-formed `traceparent` (not the invalid all-zero one), for the
 * logs and events of a request not traced here.
 */
export const clientTraceId = (traceparent: string | undefined): string | undefined =>
  traceparent === undefined || !isTraceparent(traceparent) ? undefined : traceIdOf(traceparent)

/** The trace id of a `traceparent` already found well-formed (`isTraceparent`), unless all zeros. */
export const traceIdOf = (traceparent: string): string | undefined => {
  const traceId = traceparent.slice(3, 35)
  return traceId === "00000000000000000000000000000000" ? undefined : traceId
}

/**
 * The current span when it is a real one (tracing on), for ids on logs and events; it may be one
 * not sampled (`span.sampled` false), whose ids are never exported.
 */
export const currentSpan: Effect.Effect<Tracer.Span | undefined> = Effect.map(
  Effect.option(Effect.currentSpan),
  (span) => (Option.isSome(span) && span.value.traceId !== "noop" ? span.value : undefined)
)

/**
 * A span with the OpenTelemetry span behind it: Effect's span API writes arrays as JSON text, and
 * the GenAI conventions want some attributes as string arrays.
 */
export interface Spans {
  readonly span: Tracer.Span
  readonly otel: OtelApi.Span | undefined
}

/** The current span (a real one: tracing on; sampled or not) with the OpenTelemetry span behind it. */
export const currentSpans: Effect.Effect<Spans | undefined> = Effect.flatMap(currentSpan, (span) =>
  span === undefined
    ? Effect.succeed(undefined)
    : Effect.map(Effect.option(OtelTracer.currentOtelSpan), (otel) => ({
        span,
        otel: Option.getOrUndefined(otel)
      }))
)

/**
 * `effect` in a child span when `on` and inside a sampled request; untouched otherwise (tracing
 * off: no span work at all; a request not sampled, or no request: no span that records nothing).
 */
export const spanned =
  (on: boolean, name: string, options?: Tracer.SpanOptions) =>
  <A, E, R>(effect: Effect.Effect<A, E, R>): Effect.Effect<A, E, R> =>
    on
      ? Effect.flatMap(Effect.serviceOption(Tracer.ParentSpan), (parent) =>
          Option.isSome(parent) && parent.value.sampled
            ? Effect.withSpan(effect, name, { captureStackTrace: false, ...options })
            : effect
        )
      : effect

/**
 * What a request turned out to be, on its span (HTTP's server span, an RPC call's `Rpc.*` span):
 * the GenAI (OpenTelemetry semantic conventions) and gateway attributes.
 */
export const annotate = (span: Tracer.Span, otel: OtelApi.Span | undefined, info: RequestInfo) => {
  span.attribute("gateway.request_id", info.requestId)
  if (info.tenantId !== undefined) span.attribute("gateway.tenant", info.tenantId)
  if (info.keyName !== undefined) span.attribute("gateway.key_name", info.keyName)
  if (info.model === undefined) return
  span.attribute("gen_ai.operation.name", "chat")
  span.attribute("gen_ai.request.model", info.requested ?? info.model)
  if (info.backend !== undefined) {
    span.attribute("gen_ai.response.model", info.model)
    span.attribute("gateway.backend", info.backend)
  }
  if (info.stream !== undefined) span.attribute("gateway.stream", info.stream)
  if (info.tier !== undefined) span.attribute("gateway.tier", info.tier)
  if (info.attempts !== undefined) span.attribute("gateway.attempts", info.attempts)
  if (info.fallbackFrom !== undefined) span.attribute("gateway.fallback_from", info.fallbackFrom)
  if (info.promptTokens !== undefined) span.attribute("gen_ai.usage.input_tokens", info.promptTokens)
  if (info.completionTokens !== undefined) span.attribute("gen_ai.usage.output_tokens", info.completionTokens)
  if (info.finishReason !== undefined)
    otel?.setAttribute("gen_ai.response.finish_reasons", [info.finishReason])
  if (info.ttftMs !== undefined) span.attribute("gen_ai.server.time_to_first_token", info.ttftMs / 1000)
  if (info.costMicroUsd !== undefined) span.attribute("gateway.cost_usd", info.costMicroUsd / 1e6)
  if (info.rejection !== undefined) span.attribute("gateway.rejection", info.rejection)
  if (info.error !== undefined) span.attribute("error.type", info.error)
}
