/**
 * An OTLP/HTTP trace receiver on a loopback port that keeps every span it is sent in memory, so
 * a test sees exactly what the gateway's exporter would hand a collector (OTLP JSON, as the
 * `@opentelemetry/exporter-trace-otlp-http` exporter sends it).
 */
import * as Http from "node:http"
import { Effect, type Scope } from "effect"

/** One received span, its attributes decoded from OTLP's `AnyValue`s. */
export interface ReceivedSpan {
  readonly traceId: string
  readonly spanId: string
  readonly parentSpanId: string | undefined
  readonly name: string
  /** OTLP's enum: 1 internal, 2 server, 3 client. */
  readonly kind: number
  readonly attributes: Readonly<Record<string, unknown>>
  /** OTLP's status code: 0 unset, 1 ok, 2 error. */
  readonly statusCode: number
  /** The resource's attributes (`service.name` …). */
  readonly resource: Readonly<Record<string, unknown>>
}

export interface OtlpReceiver {
  /** The base URL, for `OTEL_EXPORTER_OTLP_ENDPOINT`. */
  readonly url: string
  readonly spans: () => ReadonlyArray<ReceivedSpan>
}

type AnyValue = {
  readonly stringValue?: string
  readonly intValue?: number | string
  readonly doubleValue?: number
  readonly boolValue?: boolean
  readonly arrayValue?: { readonly values?: ReadonlyArray<AnyValue> }
}

const decodeValue = (value: AnyValue): unknown => {
  if (value.stringValue !== undefined) return value.stringValue
  if (value.intValue !== undefined) return Number(value.intValue)
  if (value.doubleValue !== undefined) return value.doubleValue
  if (value.boolValue !== undefined) return value.boolValue
  if (value.arrayValue !== undefined) return (value.arrayValue.values ?? []).map(decodeValue)
  return undefined
}

const decodeAttributes = (
  attributes: ReadonlyArray<{ readonly key: string; readonly value: AnyValue }> | undefined
): Record<string, unknown> =>
  Object.fromEntries((attributes ?? []).map(({ key, value }) => [key, decodeValue(value)]))

/** The spans of one OTLP JSON `ExportTraceServiceRequest`. */
const spansOf = (request: any): Array<ReceivedSpan> =>
  (request.resourceSpans ?? []).flatMap((rs: any) => {
    const resource = decodeAttributes(rs.resource?.attributes)
    return (rs.scopeSpans ?? []).flatMap((ss: any) =>
      (ss.spans ?? []).map(
        (span: any): ReceivedSpan => ({
          traceId: span.traceId,
          spanId: span.spanId,
          parentSpanId:
            span.parentSpanId === undefined || span.parentSpanId === "" ? undefined : span.parentSpanId,
          name: span.name,
          kind: span.kind,
          attributes: decodeAttributes(span.attributes),
          statusCode: span.status?.code ?? 0,
          resource
        })
      )
    )
  })

/** Listens on a loopback port (closed with the scope) and keeps what arrives on `/v1/traces`. */
export const make: Effect.Effect<OtlpReceiver, never, Scope.Scope> = Effect.acquireRelease(
  Effect.async<{ readonly server: Http.Server; readonly receiver: OtlpReceiver }>((resume) => {
    const received: Array<ReceivedSpan> = []
    const server = Http.createServer((req, res) => {
      const chunks: Array<Buffer> = []
      req.on("data", (chunk: Buffer) => chunks.push(chunk))
      req.on("end", () => {
        const type = req.headers["content-type"] ?? ""
        if (req.method !== "POST" || req.url !== "/v1/traces" || !type.includes("json")) {
          res
            .writeHead(415)
            .end(`expected OTLP JSON on POST /v1/traces, got ${req.method} ${req.url} ${type}`)
          return
        }
        received.push(...spansOf(JSON.parse(Buffer.concat(chunks).toString("utf8"))))
        res.writeHead(200, { "content-type": "application/json" }).end("{}")
      })
    })
    server.listen(0, "127.0.0.1", () => {
      const address = server.address()
      const port = typeof address === "object" && address !== null ? address.port : 0
      resume(Effect.succeed({ server, receiver: { url: `http://127.0.0.1:${port}`, spans: () => received } }))
    })
  }),
  ({ server }) =>
    Effect.async<void>((resume) => {
      server.close(() => resume(Effect.void))
      server.closeAllConnections()
    })
).pipe(Effect.map(({ receiver }) => receiver))
