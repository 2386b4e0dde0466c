/**
 * The admin routes (`/admin/*`, admin key only): tenants and API keys — create, list, change
 * limits and allowed models, revoke — usage by key, tenant, model and hour from the
 * `usage_hourly` projection, and the rate limiter's status. Answers are JSON in snake_case;
 * errors are in the OpenAI shape like everywhere else.
 */

import { type HttpServerRequest, HttpServerResponse } from "@effect/platform"
import { SqlClient } from "@effect/sql"
import { Errors, Tenancy } from "@gateway/domain"
import { Context, Effect, Either, Layer, ParseResult, Schema } from "effect"
import { Auth } from "./Auth.js"
import type { RequestInfo } from "./CurrentRequest.js"
import { KeyAdmin } from "./KeyAdmin.js"
import { type KeyRecord, KeyRegistry, type TenantRecord } from "./KeyRegistry.js"
import { RateLimiter } from "./RateLimiter.js"
import * as RequestBody from "./RequestBody.js"

const json = (body: unknown, status = 200) =>
  HttpServerResponse.text(JSON.stringify(body), { status, contentType: "application/json" })

export const keyView = (key: KeyRecord) => ({
  id: key.keyId,
  object: "api_key" as const,
  tenant: key.tenantId,
  name: key.name,
  prefix: key.prefix,
  models: key.models === null ? null : Array.from(key.models),
  limits: Tenancy.limitsOutput(key.limits),
  scopes: key.scopes,
  metadata: key.metadata,
  policy: key.policy,
  created_at: key.createdAt.toISOString(),
  revoked_at: key.revoked === null ? null : key.revoked.at.toISOString(),
  revoked_reason: key.revoked?.reason ?? null
})

export const tenantView = (tenant: TenantRecord) => ({
  id: tenant.tenantId,
  object: "tenant" as const,
  name: tenant.name,
  limits: Tenancy.limitsOutput(tenant.limits),
  metadata: tenant.metadata,
  policy: tenant.policy,
  created_at: tenant.createdAt.toISOString()
})

const Models = Schema.NullOr(Schema.Array(Schema.String.pipe(Schema.minLength(1))))

const NewTenantBody = Schema.Struct({
  id: Schema.String,
  name: Schema.optional(Schema.String),
  limits: Schema.optional(Tenancy.LimitsInput),
  metadata: Schema.optional(Tenancy.Metadata),
  policy: Schema.optional(Schema.NullOr(Schema.String))
})
const TenantPatch = Schema.Struct({
  limits: Schema.optional(Tenancy.LimitsInput),
  policy: Schema.optional(Schema.NullOr(Schema.String))
})
const NewKeyBody = Schema.Struct({
  tenant: Schema.String.pipe(Schema.minLength(1)),
  name: Schema.String,
  models: Schema.optional(Models),
  limits: Schema.optional(Tenancy.LimitsInput),
  scopes: Schema.optional(Schema.Array(Tenancy.Scope)),
  metadata: Schema.optional(Tenancy.Metadata),
  policy: Schema.optional(Schema.NullOr(Schema.String))
})
const KeyPatch = Schema.Struct({
  limits: Schema.optional(Tenancy.LimitsInput),
  models: Schema.optional(Models),
  policy: Schema.optional(Schema.NullOr(Schema.String))
})
const RevokeBody = Schema.Struct({ reason: Schema.optional(Schema.String) })

const decoder = new TextDecoder()

/** The request's JSON body decoded with `schema`; an empty body is `{}`. */
const bodyOf = <A, I>(request: HttpServerRequest.HttpServerRequest, schema: Schema.Schema<A, I>) =>
  Effect.flatMap(RequestBody.read(request, 1024 * 1024), (raw) => {
    let value: unknown = {}
    if (raw.length > 0) {
      try {
        value = JSON.parse(decoder.decode(raw))
      } catch {
        return Effect.fail(
          new Errors.InvalidRequest({ message: "The body must be JSON.", param: null, code: "invalid_json" })
        )
      }
    }
    return Either.mapLeft(
      Schema.decodeUnknownEither(schema, { errors: "first", onExcessProperty: "error" })(value),
      (error) => {
        const issue = ParseResult.ArrayFormatter.formatErrorSync(error)[0]
        const param = issue === undefined || issue.path.length === 0 ? null : issue.path.join(".")
        return new Errors.InvalidRequest({
          message:
            param === null
              ? `Invalid body: ${issue?.message}`
              : `Invalid value for '${param}': ${issue?.message}`,
          param,
          code: "invalid_value"
        })
      }
    )
  })

/** `2026-11-01` or a full ISO timestamp; `undefined` when absent. */
const timeParam = (
  params: URLSearchParams,
  name: string
): Either.Either<Date | undefined, Errors.InvalidRequest> => {
  const value = params.get(name)
  if (value === null) return Either.right(undefined)
  const date = new Date(value)
  return Number.isNaN(date.getTime())
    ? Either.left(
        new Errors.InvalidRequest({
          message: `'${name}' must be an ISO 8601 date or time, got '${value}'.`,
          param: name,
          code: "invalid_value"
        })
      )
    : Either.right(date)
}

const groupColumns = { tenant: "tenant_id", key: "key_id", model: "model", hour: "hour" } as const
type Group = keyof typeof groupColumns

export class AdminApi extends Context.Tag("@gateway/core/AdminApi")<
  AdminApi,
  {
    /** Answers an `/admin/...` request (after checking the admin key). */
    readonly handle: (
      request: HttpServerRequest.HttpServerRequest,
      info: RequestInfo,
      path: string,
      query: string
    ) => Effect.Effect<HttpServerResponse.HttpServerResponse, Errors.GatewayError>
  }
>() {}

export const make = Effect.gen(function* () {
  const auth = yield* Auth
  const admin = yield* KeyAdmin
  const registry = yield* KeyRegistry
  const limiter = yield* RateLimiter
  const sql = yield* SqlClient.SqlClient

  const usage = (params: URLSearchParams) =>
    Effect.gen(function* () {
      const from = (yield* timeParam(params, "from")) ?? new Date(Date.now() - 30 * 86_400_000)
      const to = (yield* timeParam(params, "to")) ?? new Date(Date.now() + 3_600_000)
      const requested = (params.get("group_by") ?? "tenant,key,model")
        .split(",")
        .map((g) => g.trim())
        .filter((g) => g.length > 0)
      const unknown = requested.find((g) => !Object.hasOwn(groupColumns, g))
      if (unknown !== undefined) {
        return yield* new Errors.InvalidRequest({
          message: `'group_by' takes tenant, key, model and hour; got '${unknown}'.`,
          param: "group_by",
          code: "invalid_value"
        })
      }
      const groups = Array.from(new Set(requested)) as Array<Group>
      const columns = groups.map((g) => groupColumns[g])
      const filters: Array<string> = []
      const values: Array<unknown> = [from.toISOString(), to.toISOString()]
      for (const [param, column] of [
        ["tenant", "tenant_id"],
        ["key", "key_id"],
        ["model", "model"]
      ] as const) {
        const value = params.get(param)
        if (value !== null) {
          values.push(value)
          filters.push(`AND ${column} = $${values.length}`)
        }
      }
      const select = columns.map((c) => (c === "hour" ? "hour AS hour" : c)).join(", ")
      const rows = yield* sql
        .unsafe<Record<string, unknown>>(
          `SELECT ${select}${columns.length > 0 ? "," : ""}
             sum(requests)::bigint AS requests, sum(prompt_tokens)::bigint AS prompt_tokens,
             sum(completion_tokens)::bigint AS completion_tokens, round(coalesce(sum(cost_usd), 0), 9)::text AS cost_usd
           FROM usage_hourly
           WHERE hour >= date_trunc('hour', $1::timestamptz) AND hour < $2::timestamptz ${filters.join(" ")}
           ${columns.length > 0 ? `GROUP BY ${columns.join(", ")} ORDER BY ${columns.join(", ")}` : ""}`,
          values
        )
        .pipe(
          Effect.mapError(
            (error) =>
              new Errors.ServiceUnavailable({ message: `Usage cannot be read right now (${error.message}).` })
          )
        )
      const data = rows.map((row) => {
        const out: Record<string, unknown> = {}
        for (const g of groups) {
          const value = row[groupColumns[g]]
          // Requests made without a key (auth off) are kept under the empty id: shown as null.
          out[g] = value instanceof Date ? value.toISOString() : value === "" ? null : value
        }
        const prompt = Number(row.prompt_tokens ?? 0)
        const completion = Number(row.completion_tokens ?? 0)
        out.requests = Number(row.requests ?? 0)
        out.prompt_tokens = prompt
        out.completion_tokens = completion
        out.total_tokens = prompt + completion
        out.cost_usd = Number(row.cost_usd ?? 0)
        return out
      })
      const total = data.reduce(
        (
          sum: {
            requests: number
            prompt_tokens: number
            completion_tokens: number
            total_tokens: number
            cost_usd: number
          },
          r
        ) => ({
          requests: sum.requests + (r.requests as number),
          prompt_tokens: sum.prompt_tokens + (r.prompt_tokens as number),
          completion_tokens: sum.completion_tokens + (r.completion_tokens as number),
          total_tokens: sum.total_tokens + (r.total_tokens as number),
          cost_usd: sum.cost_usd + (r.cost_usd as number)
        }),
        { requests: 0, prompt_tokens: 0, completion_tokens: 0, total_tokens: 0, cost_usd: 0 }
      )
      return json({
        object: "usage",
        from: from.toISOString(),
        to: to.toISOString(),
        group_by: groups,
        data,
        total: { ...total, cost_usd: Math.round(total.cost_usd * 1e9) / 1e9 }
      })
    })

  const routes = (
    request: HttpServerRequest.HttpServerRequest,
    info: RequestInfo,
    path: string,
    params: URLSearchParams,
    by: string
  ): Effect.Effect<HttpServerResponse.HttpServerResponse, Errors.GatewayError> => {
    const method = request.method
    const parts = path
      .split("/")
      .filter((p) => p.length > 0)
      .map(decodeURIComponent)
    // parts[0] is "admin"
    const [, resource, id, action] = parts
    const notFound = Effect.fail(new Errors.RouteNotFound({ method, path }))
    switch (resource) {
      case "tenants": {
        if (id === undefined) {
          if (method === "GET")
            return Effect.succeed(json({ object: "list", data: registry.tenants().map(tenantView) }))
          if (method === "POST") {
            return Effect.flatMap(bodyOf(request, NewTenantBody), (body) =>
              Effect.map(admin.createTenant(body, by, info.requestId), (t) => json(tenantView(t), 201))
            )
          }
          return notFound
        }
        if (action !== undefined) return notFound
        if (method === "GET") return Effect.map(admin.tenantOf(id), (t) => json(tenantView(t)))
        if (method === "PATCH") {
          return Effect.flatMap(bodyOf(request, TenantPatch), (body) =>
            Effect.map(admin.changeTenant(id, body, by, info.requestId), (t) => json(tenantView(t)))
          )
        }
        return notFound
      }
      case "keys": {
        if (id === undefined) {
          if (method === "GET") {
            const tenant = params.get("tenant")
            const all = params.get("include_revoked") === "true"
            const keys = registry
              .keys()
              .filter((k) => (tenant === null || k.tenantId === tenant) && (all || k.revoked === null))
              .sort((a, b) => a.createdAt.getTime() - b.createdAt.getTime())
            return Effect.succeed(json({ object: "list", data: keys.map(keyView) }))
          }
          if (method === "POST") {
            return Effect.flatMap(bodyOf(request, NewKeyBody), (body) =>
              Effect.map(admin.createKey(body, by, info.requestId), ({ key, secret }) =>
                json({ ...keyView(key), key: secret }, 201)
              )
            )
          }
          return notFound
        }
        if (action === "revoke" && method === "POST") {
          return Effect.flatMap(bodyOf(request, RevokeBody), (body) =>
            Effect.map(
              admin.revokeKey(id, body.reason ?? "revoked by an administrator", by, info.requestId),
              (k) => json(keyView(k))
            )
          )
        }
        if (action !== undefined) return notFound
        if (method === "GET") return Effect.map(admin.keyOf(id), (k) => json(keyView(k)))
        if (method === "PATCH") {
          return Effect.flatMap(bodyOf(request, KeyPatch), (body) =>
            Effect.map(admin.changeKey(id, body, by, info.requestId), (k) => json(keyView(k)))
          )
        }
        if (method === "DELETE") {
          return Effect.map(admin.revokeKey(id, "revoked by an administrator", by, info.requestId), (k) =>
            json(keyView(k))
          )
        }
        return notFound
      }
      case "usage":
        return method === "GET" && id === undefined ? usage(params) : notFound
      case "limiter":
        return method === "GET" && id === undefined ? Effect.map(limiter.status, (s) => json(s)) : notFound
      default:
        return notFound
    }
  }

  return AdminApi.of({
    handle: (request, info, path, query) => {
      const caller = auth.authenticateAdmin(request.headers)
      if (Either.isLeft(caller)) return Effect.fail(caller.left)
      info.keyName = caller.right === "admin" ? "admin" : caller.right
      return routes(request, info, path, new URLSearchParams(query), caller.right)
    }
  })
})

export const layer: Layer.Layer<
  AdminApi,
  never,
  Auth | KeyAdmin | KeyRegistry | RateLimiter | SqlClient.SqlClient
> = Layer.effect(AdminApi, make)

/** No database, no admin API (a benchmark's baseline). */
export const layerDisabled: Layer.Layer<AdminApi> = Layer.succeed(
  AdminApi,
  AdminApi.of({
    handle: () =>
      Effect.fail(
        new Errors.ServiceUnavailable({ message: "The admin API needs the event store; it is off." })
      )
  })
)
