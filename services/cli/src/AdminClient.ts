/**
 * The gateway's admin HTTP API (`/admin/*`) as the operator CLI calls it: one method per route,
 * answers decoded from their snake_case JSON (fields the CLI does not know are kept, so `--json`
 * shows the answer whole), and every failure one `AdminError` whose message is what the operator
 * reads: the API's own message, or why the gateway could not be reached. The admin key is sent
 * as a bearer token and never appears in a message.
 */
import { HttpClient, type HttpClientError, HttpClientRequest } from "@effect/platform"
import { NodeHttpClient } from "@effect/platform-node"
import type { Tenancy } from "@gateway/domain"
import { Context, Duration, Effect, Layer, ParseResult, Predicate, type Redacted, Schema } from "effect"

// ---------------------------------------------------------------------------------------------
// What the API answers
// ---------------------------------------------------------------------------------------------

/** Limits as the API shows them: `null` is no limit. */
export const Limits = Schema.Struct({
  requests_per_minute: Schema.NullOr(Schema.Number),
  tokens_per_minute: Schema.NullOr(Schema.Number),
  concurrent_requests: Schema.NullOr(Schema.Number),
  budget_usd: Schema.NullOr(Schema.Number),
  budget_period: Schema.NullOr(Schema.String)
})
export type Limits = typeof Limits.Type

const Metadata = Schema.Record({ key: Schema.String, value: Schema.String })

/**
 * The routing policy bound to a key or tenant (`null`: none). Optional so that gateways from
 * before policy bindings, which do not send it, are still understood (absent: none).
 */
const Policy = Schema.optional(Schema.NullOr(Schema.String))

export const ApiKey = Schema.Struct({
  id: Schema.String,
  object: Schema.Literal("api_key"),
  tenant: Schema.String,
  name: Schema.String,
  /** The first characters of the secret. */
  prefix: Schema.String,
  /** `null`: every model. */
  models: Schema.NullOr(Schema.Array(Schema.String)),
  limits: Limits,
  scopes: Schema.Array(Schema.String),
  metadata: Schema.optional(Metadata),
  policy: Policy,
  created_at: Schema.String,
  revoked_at: Schema.NullOr(Schema.String),
  revoked_reason: Schema.NullOr(Schema.String)
})
export type ApiKey = typeof ApiKey.Type

/** A key just created, with its secret: the only time the secret is ever shown. */
export const CreatedKey = Schema.extend(ApiKey, Schema.Struct({ key: Schema.String }))
export type CreatedKey = typeof CreatedKey.Type

export const Tenant = Schema.Struct({
  id: Schema.String,
  object: Schema.Literal("tenant"),
  name: Schema.String,
  limits: Limits,
  metadata: Schema.optional(Metadata),
  policy: Policy,
  created_at: Schema.String
})
export type Tenant = typeof Tenant.Type

const ListOf = <A, I>(item: Schema.Schema<A, I>) =>
  Schema.Struct({ object: Schema.Literal("list"), data: Schema.Array(item) })

/** What `usage` can be grouped by. */
export const usageGroups = ["tenant", "key", "model", "hour"] as const
export type UsageGroup = (typeof usageGroups)[number]

const UsageTotals = Schema.Struct({
  requests: Schema.Number,
  prompt_tokens: Schema.Number,
  completion_tokens: Schema.Number,
  total_tokens: Schema.Number,
  cost_usd: Schema.Number
})

export const UsageRow = Schema.extend(
  Schema.Struct({
    tenant: Schema.optional(Schema.NullOr(Schema.String)),
    key: Schema.optional(Schema.NullOr(Schema.String)),
    model: Schema.optional(Schema.NullOr(Schema.String)),
    hour: Schema.optional(Schema.NullOr(Schema.String))
  }),
  UsageTotals
)
export type UsageRow = typeof UsageRow.Type

export const UsageReport = Schema.Struct({
  object: Schema.Literal("usage"),
  from: Schema.String,
  to: Schema.String,
  group_by: Schema.Array(Schema.Literal(...usageGroups)),
  data: Schema.Array(UsageRow),
  total: UsageTotals
})
export type UsageReport = typeof UsageReport.Type

/** A replica's circuit breaker: its state since when, the counts that open it, and how long it stays open. */
export const BackendCircuit = Schema.Struct({
  state: Schema.Literal("closed", "open", "half_open"),
  since: Schema.String,
  consecutive_failures: Schema.Number,
  window_requests: Schema.Number,
  window_failures: Schema.Number,
  /** Opens in a row without closing in between. */
  opens: Schema.Number,
  /** While open: milliseconds until half-open, else 0. */
  retry_after_ms: Schema.Number,
  probes_in_flight: Schema.Number
})
export type BackendCircuit = typeof BackendCircuit.Type

/** One backend replica as this gateway replica sees it (health and breaker are per gateway replica). */
export const Backend = Schema.Struct({
  id: Schema.String,
  model: Schema.String,
  url: Schema.String,
  weight: Schema.Number,
  health: Schema.Literal("healthy", "ejected"),
  ejected_at: Schema.NullOr(Schema.String),
  circuit: BackendCircuit,
  in_flight: Schema.Number,
  /** The balancer's estimates now (they drift back to the prior without samples). */
  ttft_ewma_ms: Schema.Number,
  latency_ewma_ms: Schema.Number,
  /** The latency the balancer weighs (failures counted as slow answers). */
  balancer_latency_ms: Schema.Number,
  /** From the backend's own metrics, when scraped (`queue_metrics`). */
  queue_waiting: Schema.NullOr(Schema.Number),
  queue_running: Schema.NullOr(Schema.Number),
  requests: Schema.Number,
  failures: Schema.Number,
  last_error: Schema.NullOr(Schema.String),
  last_check_at: Schema.NullOr(Schema.String),
  last_check_ok: Schema.NullOr(Schema.Boolean)
})
export type Backend = typeof Backend.Type

/** `GET /admin/backends`: every model's replicas. */
export const BackendsReport = ListOf(Backend)
export type BackendsReport = typeof BackendsReport.Type

/** The OpenAI error shape every failed admin call answers with. */
const ErrorBody = Schema.Struct({
  error: Schema.Struct({
    message: Schema.String,
    code: Schema.optional(Schema.NullOr(Schema.String))
  })
})

// ---------------------------------------------------------------------------------------------
// What the CLI sends
// ---------------------------------------------------------------------------------------------

export interface NewKey {
  readonly tenant: string
  readonly name: string
  /** `null` or left out: every model. */
  readonly models?: ReadonlyArray<string> | null
  /** Left out: the gateway's default key limits. */
  readonly limits?: Tenancy.LimitsInput
  readonly scopes?: ReadonlyArray<Tenancy.Scope>
  readonly metadata?: Tenancy.Metadata
  /** A routing policy's name (`routing.policies[].name`) the key is bound to. */
  readonly policy?: string
}

/**
 * A change of a key; `null` clears (a limit; the model list: every model; the policy: unbound).
 */
export interface KeyChange {
  readonly limits?: Tenancy.LimitsInput
  readonly models?: ReadonlyArray<string> | null
  readonly policy?: string | null
}

export interface NewTenant {
  readonly id: string
  readonly name?: string
  readonly limits?: Tenancy.LimitsInput
  readonly metadata?: Tenancy.Metadata
  /** A routing policy's name the tenant (every key of it without one of its own) is bound to. */
  readonly policy?: string
}

/** A change of a tenant; `null` clears (a limit; the policy: unbound). */
export interface TenantChange {
  readonly limits?: Tenancy.LimitsInput
  readonly policy?: string | null
}

export interface UsageQuery {
  /** ISO 8601 date or time. */
  readonly from?: string
  readonly to?: string
  /** Left out: the API's default (tenant, key, model). */
  readonly groupBy?: ReadonlyArray<UsageGroup>
  readonly tenant?: string
  readonly key?: string
  readonly model?: string
}

// ---------------------------------------------------------------------------------------------
// The client
// ---------------------------------------------------------------------------------------------

/** Why an admin call failed; `message` is for the operator. */
export class AdminError extends Schema.TaggedError<AdminError>()("AdminError", {
  reason: Schema.Literal(
    /** The API answered with an error (`status`, `code` as it sent them). */
    "Api",
    /** Nothing answered at the URL (refused, unknown host, timeout). */
    "Unreachable",
    /** An answer the CLI does not understand. */
    "InvalidResponse",
    /** No admin key was given. */
    "NoAdminKey"
  ),
  message: Schema.String,
  status: Schema.optional(Schema.Number),
  code: Schema.optional(Schema.NullOr(Schema.String))
}) {}

/** Where the gateway is and the key that opens its admin routes. */
export interface Connection {
  /** The gateway's base URL, e.g. `http://127.0.0.1:8080`. */
  readonly url: string
  readonly adminKey: Redacted.Redacted<string>
}

export class AdminClient extends Context.Tag("@gateway/cli/AdminClient")<
  AdminClient,
  {
    /** The gateway's base URL, for messages. */
    readonly url: string
    readonly createKey: (key: NewKey) => Effect.Effect<CreatedKey, AdminError>
    readonly listKeys: (query: {
      readonly tenant?: string
      readonly includeRevoked?: boolean
    }) => Effect.Effect<ReadonlyArray<ApiKey>, AdminError>
    readonly getKey: (id: string) => Effect.Effect<ApiKey, AdminError>
    readonly changeKey: (id: string, change: KeyChange) => Effect.Effect<ApiKey, AdminError>
    readonly revokeKey: (id: string, reason?: string) => Effect.Effect<ApiKey, AdminError>
    readonly listTenants: Effect.Effect<ReadonlyArray<Tenant>, AdminError>
    readonly createTenant: (tenant: NewTenant) => Effect.Effect<Tenant, AdminError>
    readonly changeTenant: (id: string, change: TenantChange) => Effect.Effect<Tenant, AdminError>
    readonly usage: (query: UsageQuery) => Effect.Effect<UsageReport, AdminError>
    readonly backends: () => Effect.Effect<BackendsReport, AdminError>
  }
>() {}

/** How long one admin call may take before the gateway counts as unreachable. */
const requestTimeout = Duration.seconds(30)

/** The `code` of a Node system error somewhere in a chain of causes (`ECONNREFUSED` …). */
const systemCode = (error: unknown): string | undefined => {
  for (
    let e = error, depth = 0;
    Predicate.isObject(e) && depth < 5;
    e = (e as { cause?: unknown }).cause, depth++
  ) {
    const code = (e as { code?: unknown }).code
    if (typeof code === "string") return code
  }
  return undefined
}

const unreachable = (url: string, error: HttpClientError.HttpClientError): AdminError => {
  if (error._tag === "RequestError" && error.reason === "InvalidUrl") {
    return new AdminError({ reason: "Unreachable", message: `'${url}' is not a valid gateway URL.` })
  }
  const code = systemCode(error.cause)
  const why =
    code === "ECONNREFUSED"
      ? "connection refused (is the gateway running there? set --url or GATEWAY_URL)"
      : code === "ENOTFOUND" || code === "EAI_AGAIN"
        ? "host not found"
        : code !== undefined
          ? code
          : error._tag === "RequestError"
            ? String((error.cause as { message?: unknown } | undefined)?.message ?? error.reason)
            : error.reason
  return new AdminError({ reason: "Unreachable", message: `cannot reach the gateway at ${url}: ${why}` })
}

const decodeOptions = { onExcessProperty: "preserve" } as const

export const make = (
  connection: Connection
): Effect.Effect<AdminClient["Type"], never, HttpClient.HttpClient> =>
  Effect.gen(function* () {
    const base = connection.url.replace(/\/+$/, "")
    const client = (yield* HttpClient.HttpClient).pipe(
      HttpClient.mapRequest((request) =>
        request.pipe(
          HttpClientRequest.prependUrl(base),
          HttpClientRequest.bearerToken(connection.adminKey),
          HttpClientRequest.acceptJson
        )
      )
    )

    /** Sends `request`; a 2xx answer decoded with `schema`, anything else an `AdminError`. */
    const send = <A, I>(request: HttpClientRequest.HttpClientRequest, schema: Schema.Schema<A, I>) =>
      Effect.gen(function* () {
        const response = yield* client.execute(request)
        const body = yield* response.text
        let json: unknown
        try {
          json = body.length === 0 ? undefined : JSON.parse(body)
        } catch {
          json = undefined
        }
        if (response.status >= 400) {
          const error = Schema.decodeUnknownOption(ErrorBody)(json)
          return yield* new AdminError({
            reason: "Api",
            status: response.status,
            message:
              error._tag === "Some"
                ? error.value.error.message
                : `the gateway answered ${request.method} ${base}${request.url} with HTTP ${response.status}`,
            code: error._tag === "Some" ? (error.value.error.code ?? null) : null
          })
        }
        return yield* Schema.decodeUnknown(
          schema,
          decodeOptions
        )(json).pipe(
          Effect.mapError(
            (error) =>
              new AdminError({
                reason: "InvalidResponse",
                status: response.status,
                message: `unexpected answer to ${request.method} ${base}${request.url}: ${ParseResult.TreeFormatter.formatErrorSync(error)}`
              })
          )
        )
      }).pipe(
        Effect.timeoutFail({
          duration: requestTimeout,
          onTimeout: () =>
            new AdminError({
              reason: "Unreachable",
              message: `the gateway at ${base} did not answer within ${Duration.format(requestTimeout)}`
            })
        }),
        Effect.catchTags({
          RequestError: (error) => Effect.fail(unreachable(base, error)),
          ResponseError: (error) => Effect.fail(unreachable(base, error))
        })
      )

    const path = (...segments: ReadonlyArray<string>) =>
      `/admin/${segments.map(encodeURIComponent).join("/")}`
    const withBody = (request: HttpClientRequest.HttpClientRequest, body: unknown) =>
      HttpClientRequest.bodyUnsafeJson(request, body)
    const Keys = ListOf(ApiKey)
    const Tenants = ListOf(Tenant)

    return AdminClient.of({
      url: base,
      createKey: Effect.fn("AdminClient.createKey")((key: NewKey) =>
        send(withBody(HttpClientRequest.post(path("keys")), key), CreatedKey)
      ),
      listKeys: Effect.fn("AdminClient.listKeys")(
        (query: { readonly tenant?: string; readonly includeRevoked?: boolean }) =>
          Effect.map(
            send(
              HttpClientRequest.get(path("keys"), {
                urlParams: {
                  ...(query.tenant === undefined ? {} : { tenant: query.tenant }),
                  ...(query.includeRevoked === true ? { include_revoked: "true" } : {})
                }
              }),
              Keys
            ),
            (list) => list.data
          )
      ),
      getKey: Effect.fn("AdminClient.getKey")((id: string) =>
        send(HttpClientRequest.get(path("keys", id)), ApiKey)
      ),
      changeKey: Effect.fn("AdminClient.changeKey")((id: string, change: KeyChange) =>
        send(withBody(HttpClientRequest.patch(path("keys", id)), change), ApiKey)
      ),
      revokeKey: Effect.fn("AdminClient.revokeKey")((id: string, reason?: string) =>
        send(
          withBody(
            HttpClientRequest.post(path("keys", id, "revoke")),
            reason === undefined ? {} : { reason }
          ),
          ApiKey
        )
      ),
      listTenants: Effect.map(
        send(HttpClientRequest.get(path("tenants")), Tenants),
        (list) => list.data
      ).pipe(Effect.withSpan("AdminClient.listTenants")),
      createTenant: Effect.fn("AdminClient.createTenant")((tenant: NewTenant) =>
        send(withBody(HttpClientRequest.post(path("tenants")), tenant), Tenant)
      ),
      changeTenant: Effect.fn("AdminClient.changeTenant")((id: string, change: TenantChange) =>
        send(withBody(HttpClientRequest.patch(path("tenants", id)), change), Tenant)
      ),
      usage: Effect.fn("AdminClient.usage")((query: UsageQuery) =>
        send(
          HttpClientRequest.get(path("usage"), {
            urlParams: {
              ...(query.from === undefined ? {} : { from: query.from }),
              ...(query.to === undefined ? {} : { to: query.to }),
              ...(query.groupBy === undefined ? {} : { group_by: query.groupBy.join(",") }),
              ...(query.tenant === undefined ? {} : { tenant: query.tenant }),
              ...(query.key === undefined ? {} : { key: query.key }),
              ...(query.model === undefined ? {} : { model: query.model })
            }
          }),
          UsageReport
        )
      ),
      backends: Effect.fn("AdminClient.backends")(() =>
        send(HttpClientRequest.get(path("backends")), BackendsReport)
      )
    })
  })

/**
 * The client over an undici agent of its own, closed with the layer's scope: the global one of
 * `fetch` would keep the gateway's keep-alive connection, and so the CLI process, open.
 */
export const layer = (connection: Connection): Layer.Layer<AdminClient> =>
  Layer.effect(AdminClient, make(connection)).pipe(Layer.provide(NodeHttpClient.layerUndici))
