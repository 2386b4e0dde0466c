/**
 * The admin routes (`/admin/*`, admin key only): tenants and API keys — create, list, change
 * limits and allowed models, revoke — usage by key, tenant, model and hour from the
 * `usage_hourly` projection, the rate limiter's status, and the dead-letter queue (list, show,
 * retry one or a filter, discard). Answers are JSON in snake_case; errors are in the OpenAI
 * shape like everywhere else.
 */

import { type HttpServerRequest, HttpServerResponse } from "@effect/platform"
import { SqlClient } from "@effect/sql"
import { DeadLetters, Errors, Tenancy } from "@gateway/domain"
import { Context, Effect, Either, Layer, ParseResult, Schema } from "effect"
import { Auth } from "./Auth.js"
import { ChatCompletions } from "./ChatCompletions.js"
import type { RequestInfo } from "./CurrentRequest.js"
import { DeadLetterQueue } from "./DeadLetterQueue.js"
import * as ErrorResponse from "./ErrorResponse.js"
import { KeyAdmin } from "./KeyAdmin.js"
import { type KeyRecord, KeyRegistry, type TenantRecord } from "./KeyRegistry.js"
import { RateLimiter } from "./RateLimiter.js"
import * as RequestBody from "./RequestBody.js"
import * as UsageReport from "./UsageReport.js"

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
const DiscardBody = Schema.Struct({ reason: Schema.String.pipe(Schema.minLength(1)) })
/** `POST /admin/dead-letters/retry`: which letters to retry (at most `maxRetryBatch`). */
const RetryFilterBody = Schema.Struct({
  tenant: Schema.optional(Schema.String),
  model: Schema.optional(Schema.String),
  reason: Schema.optional(Schema.String),
  since: Schema.optional(Schema.String),
  until: Schema.optional(Schema.String),
  limit: Schema.optional(Schema.Int.pipe(Schema.between(1, DeadLetters.maxRetryBatch)))
})

const iso = (date: Date | null) => (date === null ? null : date.toISOString())

/** A dead letter as the admin API (and the CLI's `--json`) shows it. */
export const deadLetterView = (letter: DeadLetters.DeadLetter) => ({
  id: letter.requestId,
  object: "dead_letter" as const,
  tenant: letter.tenantId,
  key_id: letter.keyId,
  model: letter.model,
  status: letter.status,
  reason: letter.reason,
  attempts: letter.attempts,
  last_error: letter.lastError,
  dead_at: letter.deadAt.toISOString(),
  retries: letter.retries,
  last_retry_at: iso(letter.lastRetryAt),
  last_retry_by: letter.lastRetryBy,
  last_retry_outcome: letter.lastRetryOutcome,
  retryable: letter.retryable
})

/** A retry's outcome as the admin API (and the CLI's `--json`) shows it. */
export const retryOutcomeView = (outcome: DeadLetters.RetryOutcome) => ({
  id: outcome.requestId,
  object: "dead_letter.retry" as const,
  outcome: outcome.outcome,
  retry: outcome.retry,
  status: outcome.status,
  error: outcome.error
})

/** The queue's refusals, in the OpenAI error shape. */
const deadLetterError = (error: DeadLetters.DeadLetterError) => {
  const [status, code] =
    error._tag === "DeadLetterNotFound"
      ? [404, "dead_letter_not_found"]
      : error._tag === "DeadLetterRetryInProgress"
        ? [409, "retry_in_progress"]
        : [409, `not_retryable_${error.reason}`]
  return ErrorResponse.toResponse({
    status,
    body: {
      error: {
        message: error.message,
        type: status === 404 ? "invalid_request_error" : "conflict_error",
        param: null,
        code
      }
    }
  })
}

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
  const queue = yield* DeadLetterQueue
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
      const unknown = requested.find((g) => !UsageReport.isGroup(g))
      if (unknown !== undefined) {
        return yield* new Errors.InvalidRequest({
          message: `'group_by' takes tenant, key, model and hour; got '${unknown}'.`,
          param: "group_by",
          code: "invalid_value"
        })
      }
      const groups = Array.from(new Set(requested)) as Array<UsageReport.Group>
      const optional = (name: string) => params.get(name) ?? undefined
      const rows = yield* UsageReport.read(sql, {
        from,
        to,
        groups,
        tenant: optional("tenant"),
        key: optional("key"),
        model: optional("model")
      })
      const data = rows.map((row) => {
        const out: Record<string, unknown> = {}
        for (const g of groups) out[g] = g === "hour" ? (row.hour?.toISOString() ?? null) : row[g]
        out.requests = row.requests
        out.prompt_tokens = row.promptTokens
        out.completion_tokens = row.completionTokens
        out.total_tokens = row.promptTokens + row.completionTokens
        out.cost_usd = row.costUsd
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

  /** The query's filter for a dead-letter list (`tenant`, `model`, `reason`, `since`, `until`, `limit`, `cursor`). */
  const letterFilter = (params: URLSearchParams) =>
    Effect.gen(function* () {
      const since = yield* timeParam(params, "since")
      const until = yield* timeParam(params, "until")
      const limitText = params.get("limit")
      const limit = limitText === null ? DeadLetters.defaultLimit : Number(limitText)
      if (!Number.isInteger(limit) || limit < 1 || limit > DeadLetters.maxLimit) {
        return yield* new Errors.InvalidRequest({
          message: `'limit' must be a whole number from 1 to ${DeadLetters.maxLimit}.`,
          param: "limit",
          code: "invalid_value"
        })
      }
      const text = (name: string) => {
        const value = params.get(name)
        return value === null || value.length === 0 ? undefined : value
      }
      const tenant = text("tenant")
      const model = text("model")
      const reason = text("reason")
      const cursor = text("cursor")
      return {
        limit,
        ...(tenant === undefined ? {} : { tenantId: tenant as DeadLetters.DeadLetter["tenantId"] & string }),
        ...(model === undefined ? {} : { model }),
        ...(reason === undefined ? {} : { reason }),
        ...(since === undefined ? {} : { since }),
        ...(until === undefined ? {} : { until }),
        ...(cursor === undefined ? {} : { cursor })
      } satisfies DeadLetters.DeadLetterFilter
    })

  /** `/admin/dead-letters[/{id}[/retry|/discard]]` and `/admin/dead-letters/retry`. */
  const deadLetters = (
    request: HttpServerRequest.HttpServerRequest,
    method: string,
    id: string | undefined,
    action: string | undefined,
    params: URLSearchParams,
    by: string,
    notFound: Effect.Effect<never, Errors.RouteNotFound>
  ): Effect.Effect<HttpServerResponse.HttpServerResponse, Errors.GatewayError> => {
    const answer = (
      effect: Effect.Effect<
        HttpServerResponse.HttpServerResponse,
        DeadLetters.DeadLetterError | Errors.GatewayError
      >
    ) =>
      Effect.catchIf(
        effect,
        (error): error is DeadLetters.DeadLetterError =>
          error._tag === "DeadLetterNotFound" ||
          error._tag === "DeadLetterNotRetryable" ||
          error._tag === "DeadLetterRetryInProgress",
        (error) => Effect.succeed(deadLetterError(error))
      )
    if (id === undefined) {
      if (method !== "GET") return notFound
      return Effect.flatMap(letterFilter(params), (filter) =>
        Effect.map(queue.list(filter), (page) =>
          json({ object: "list", data: page.data.map(deadLetterView), next_cursor: page.nextCursor })
        )
      )
    }
    if (id === "retry" && action === undefined && method === "POST") {
      return Effect.gen(function* () {
        const body = yield* bodyOf(request, RetryFilterBody)
        const query = new URLSearchParams()
        for (const [name, value] of Object.entries(body)) {
          if (value !== undefined) query.set(name, String(value))
        }
        const filter = yield* letterFilter(query)
        const batch = yield* queue.retryMatching(filter, by)
        return json({ object: "list", data: batch.outcomes.map(retryOutcomeView), more: batch.more })
      })
    }
    if (action === "retry" && method === "POST") {
      return answer(Effect.map(queue.retry(id, by), (outcome) => json(retryOutcomeView(outcome))))
    }
    if (action === "discard" && method === "POST") {
      return answer(
        Effect.flatMap(bodyOf(request, DiscardBody), (body) =>
          Effect.map(queue.discard(id, body.reason, by), (letter) =>
            json({ ...deadLetterView(letter), discarded: true, discard_reason: body.reason })
          )
        )
      )
    }
    if (action === undefined && method === "GET") {
      return answer(
        Effect.map(queue.get(id), (detail) =>
          json({
            ...deadLetterView(detail.letter),
            events: detail.events.map((e) => ({
              version: e.version,
              type: e.type,
              occurred_at: e.occurredAt,
              position: e.position,
              data: e.data
            }))
          })
        )
      )
    }
    return notFound
  }

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
      case "dead-letters":
        return deadLetters(request, method, id, action, params, by, notFound)
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

/**
 * The admin API, and its dead-letter queue (which runs retries through the chat pipeline) for the
 * other transports (the RPC API) to share.
 */
export const layer = Layer.effect(AdminApi, make).pipe(
  Layer.provideMerge(DeadLetterQueue.Default),
  Layer.provide(ChatCompletions.Default)
)

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
