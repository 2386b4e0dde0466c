/**
 * The handlers of the internal RPC API (`RpcApi` in the domain). Each call is authenticated from
 * the bearer token of its HTTP request: the admin key or an `admin`-scoped key is an operator
 * (everything); an `internal`-scoped key is a service of its tenant (that tenant's keys, usage,
 * requests and dead letters; it cannot create tenants, change a tenant's limits, or hand out the
 * `admin` scope); any other key is refused. Changes go through `KeyAdmin` with the admin API's
 * validation, recorded under the caller's id like the admin API's.
 *
 * The gateway may run without parts (no event store, auth off): a call needing a missing part
 * answers `ServiceUnavailable`.
 */
import type { Headers } from "@effect/platform"
import { SqlClient } from "@effect/sql"
import { DeadLetters, Errors, Events, Ids, RpcApi, type RpcSchemas, Tenancy } from "@gateway/domain"
import { EventStore, ProjectionRunner } from "@gateway/event-store"
import { Context, Effect, Either, Layer, Option, ParseResult, Schema } from "effect"
import { Auth, type Principal } from "./Auth.js"
import { BackendPool } from "./BackendPool.js"
import { DeadLetterQueue } from "./DeadLetterQueue.js"
import { KeyAdmin } from "./KeyAdmin.js"
import { type KeyRecord, KeyRegistry, type TenantRecord } from "./KeyRegistry.js"
import type * as Replica from "./Replica.js"
import * as UsageReport from "./UsageReport.js"

/** Who is calling. */
export type Caller =
  /** The admin key or a key with the `admin` scope: everything. */
  | { readonly _tag: "Operator"; readonly by: string }
  /** A key with the `internal` scope: its own tenant's data. */
  | { readonly _tag: "Service"; readonly by: string; readonly principal: Principal }

const internalOnly = new Errors.Forbidden({
  message: "This API key may not use the internal API: it needs the 'internal' scope.",
  code: "internal_only"
})

/** The caller of an RPC from its request's headers. */
export const callerOf = (
  auth: Auth["Type"],
  headers: Headers.Headers
): Either.Either<Caller, Errors.Unauthorized | Errors.Forbidden> => {
  const key = auth.authenticate(headers)
  if (Either.isRight(key) && key.right !== undefined) {
    const principal = key.right
    if (principal.key.scopes.includes("admin")) return Either.right({ _tag: "Operator", by: principal.keyId })
    if (principal.key.scopes.includes("internal"))
      return Either.right({ _tag: "Service", by: principal.keyId, principal })
    return Either.left(internalOnly)
  }
  // Not a key of the registry (or auth off): the admin key, else the key's own problem.
  const admin = auth.authenticateAdmin(headers)
  if (Either.isRight(admin)) return Either.right({ _tag: "Operator", by: admin.right })
  return Either.left(Either.isLeft(key) ? key.left : admin.left)
}

const otherTenant = (what: string) =>
  new Errors.Forbidden({ message: `This API key may not see or change ${what}.`, code: "other_tenant" })

const operatorOnly = (what: string) =>
  new Errors.Forbidden({ message: `Only an administrator may ${what}.`, code: "admin_only" })

/** Fails unless the caller may see `tenantId`'s data. */
const ownTenant = (caller: Caller, tenantId: string | null | undefined, what: string) =>
  caller._tag === "Operator" || caller.principal.tenantId === tenantId
    ? Effect.void
    : Effect.fail(otherTenant(what))

const unavailable = (part: string) =>
  new Errors.ServiceUnavailable({ message: `This gateway runs without ${part}.` })

/** `value` decoded with `schema` (the admin API's rules); a bad field is an `InvalidRequest` naming it. */
const check = <A, I>(schema: Schema.Schema<A, I>, value: unknown, prefix: string) =>
  Either.mapLeft(Schema.decodeUnknownEither(schema, { errors: "first" })(value), (error) => {
    const issue = ParseResult.ArrayFormatter.formatErrorSync(error)[0]
    const path = [...(prefix === "" ? [] : [prefix]), ...(issue?.path ?? []).map(String)]
    const param = path.length === 0 ? null : path.join(".")
    return new Errors.InvalidRequest({
      message:
        param === null
          ? `Invalid input: ${issue?.message}`
          : `Invalid value for '${param}': ${issue?.message}`,
      param,
      code: "invalid_value"
    })
  })

const Models = Schema.NullOr(Schema.Array(Schema.String.pipe(Schema.minLength(1))))

/** The optional parts of a change, checked; absent ones stay absent. */
const checkChange = (input: {
  readonly limits?: RpcSchemas.LimitsChange | undefined
  readonly models?: ReadonlyArray<string> | null | undefined
}) =>
  Effect.gen(function* () {
    const limits =
      input.limits === undefined ? undefined : yield* check(Tenancy.LimitsInput, input.limits, "limits")
    const models = input.models === undefined ? undefined : yield* check(Models, input.models, "models")
    return {
      ...(limits === undefined ? {} : { limits }),
      ...(models === undefined ? {} : { models })
    }
  })

export const keyView = (key: KeyRecord): RpcSchemas.ApiKey => ({
  id: key.keyId,
  tenant: key.tenantId,
  name: key.name,
  prefix: key.prefix,
  models: key.models === null ? null : Array.from(key.models),
  limits: Tenancy.limitsOutput(key.limits),
  scopes: key.scopes,
  metadata: key.metadata,
  policy: key.policy,
  createdAt: key.createdAt,
  revokedAt: key.revoked?.at ?? null,
  revokedReason: key.revoked?.reason ?? null
})

export const tenantView = (tenant: TenantRecord): RpcSchemas.Tenant => ({
  id: tenant.tenantId,
  name: tenant.name,
  limits: Tenancy.limitsOutput(tenant.limits),
  metadata: tenant.metadata,
  policy: tenant.policy,
  createdAt: tenant.createdAt
})

const date = (ms: number | null) => (ms === null ? null : new Date(ms))

export const backendView = (r: Replica.Status): RpcSchemas.BackendStatus => ({
  id: r.id,
  model: r.model,
  url: r.url,
  weight: r.weight,
  health: r.health,
  ejectedAt: date(r.ejectedAt),
  circuit: {
    state: r.breaker.state,
    since: new Date(r.breaker.since),
    consecutiveFailures: r.breaker.consecutiveFailures,
    windowRequests: r.breaker.windowRequests,
    windowFailures: r.breaker.windowFailures,
    opens: r.breaker.opens,
    retryAfterMs: r.breaker.retryAfterMs,
    probesInFlight: r.breaker.probesInFlight
  },
  inFlight: r.inFlight,
  ttftEwmaMs: r.ttftMs,
  latencyEwmaMs: r.latencyMs,
  balancerLatencyMs: r.balancerLatencyMs,
  queueWaiting: r.queueWaiting,
  queueRunning: r.queueRunning,
  requests: r.requests,
  failures: r.failures,
  lastError: r.lastError,
  lastCheckAt: date(r.lastCheckAt),
  lastCheckOk: r.lastCheckOk
})

/** Usage from `usage_hourly`, as `GET /admin/usage` reads it. */
const usageQuery = (sql: SqlClient.SqlClient, query: RpcSchemas.UsageQuery) =>
  Effect.gen(function* () {
    const now = Date.now()
    const from = query.from ?? new Date(now - 30 * 86_400_000)
    const to = query.to ?? new Date(now + 3_600_000)
    for (const [name, value] of [
      ["from", from],
      ["to", to]
    ] as const) {
      if (Number.isNaN(value.getTime())) {
        return yield* new Errors.InvalidRequest({
          message: `'${name}' is not a valid time.`,
          param: name,
          code: "invalid_value"
        })
      }
    }
    const groups = Array.from(new Set<RpcSchemas.UsageGroup>(query.groupBy ?? ["tenant", "key", "model"]))
    const rows = yield* UsageReport.read(sql, {
      from,
      to,
      groups,
      tenant: query.tenant,
      key: query.key,
      model: query.model
    })
    const total = { requests: 0, promptTokens: 0, completionTokens: 0, totalTokens: 0, costUsd: 0 }
    const data = rows.map((row): RpcSchemas.UsageRow => {
      const out: {
        -readonly [K in keyof RpcSchemas.UsageRow]: RpcSchemas.UsageRow[K]
      } = {
        requests: row.requests,
        promptTokens: row.promptTokens,
        completionTokens: row.completionTokens,
        totalTokens: row.promptTokens + row.completionTokens,
        costUsd: row.costUsd
      }
      for (const g of groups) {
        if (g === "hour") {
          if (row.hour !== undefined) out.hour = row.hour
        } else out[g] = row[g] ?? null
      }
      total.requests += out.requests
      total.promptTokens += out.promptTokens
      total.completionTokens += out.completionTokens
      total.totalTokens += out.totalTokens
      total.costUsd += out.costUsd
      return out
    })
    return {
      from,
      to,
      groupBy: groups,
      rows: data,
      total: { ...total, costUsd: Math.round(total.costUsd * 1e9) / 1e9 }
    } satisfies RpcSchemas.UsageReport
  })

const isRequestId = Schema.is(Ids.RequestId)

/** A request's stream, decoded; events this version cannot decode are kept as `UndecodedEvent`. */
const decodeStream = (
  events: ReadonlyArray<EventStore.RecordedEvent>
): ReadonlyArray<RpcSchemas.RecordedRequestEvent> =>
  events.map((e) => {
    const decoded = Events.decodeRequestEvent(e.type, e.data)
    const metadata = Events.decodeEventMetadata(e.metadata)
    return {
      position: e.position,
      streamVersion: e.streamVersion,
      event: Either.isRight(decoded)
        ? decoded.right
        : {
            _tag: "UndecodedEvent" as const,
            type: e.type,
            data: e.data,
            problem: ParseResult.TreeFormatter.formatErrorSync(decoded.left)
          },
      metadata: Either.getOrNull(metadata),
      recordedAt: e.recordedAt
    }
  })

/** The tenant a request was made for, from its events' metadata (`null`: made without a key). */
const tenantOfStream = (events: ReadonlyArray<RpcSchemas.RecordedRequestEvent>) =>
  events.find((e) => e.metadata?.tenantId !== undefined)?.metadata?.tenantId ?? null

/** A dead-letter filter checked as the admin API checks its query; `maxLimit` bounds `limit`. */
const checkFilter = (query: RpcSchemas.DeadLetterQuery, maxLimit: number, prefix: string) =>
  Effect.gen(function* () {
    const Limit = Schema.Int.pipe(Schema.between(1, maxLimit))
    const tenantId =
      query.tenantId === undefined
        ? undefined
        : yield* check(Ids.TenantId, query.tenantId, `${prefix}tenantId`)
    const limit =
      query.limit === undefined
        ? Math.min(DeadLetters.defaultLimit, maxLimit)
        : yield* check(Limit, query.limit, `${prefix}limit`)
    for (const name of ["since", "until"] as const) {
      const value = query[name]
      if (value !== undefined && Number.isNaN(value.getTime())) {
        return yield* new Errors.InvalidRequest({
          message: `'${prefix}${name}' is not a valid time.`,
          param: `${prefix}${name}`,
          code: "invalid_value"
        })
      }
    }
    return {
      limit,
      ...(tenantId === undefined ? {} : { tenantId }),
      ...(query.model === undefined ? {} : { model: query.model }),
      ...(query.reason === undefined ? {} : { reason: query.reason }),
      ...(query.since === undefined ? {} : { since: query.since }),
      ...(query.until === undefined ? {} : { until: query.until }),
      ...(query.cursor === undefined ? {} : { cursor: query.cursor })
    } satisfies DeadLetters.DeadLetterFilter
  })

/** The filter a caller may use: a service key's is held to its own tenant. */
const ownFilter = (caller: Caller, filter: DeadLetters.DeadLetterFilter) =>
  Effect.gen(function* () {
    if (caller._tag === "Operator") return filter
    if (filter.tenantId !== undefined) {
      yield* ownTenant(caller, filter.tenantId, "another tenant's dead letters")
    }
    return { ...filter, tenantId: caller.principal.tenantId }
  })

const requestIdParam = (requestId: string, param: string) =>
  isRequestId(requestId)
    ? Effect.succeed(requestId)
    : Effect.fail(
        new Errors.InvalidRequest({
          message: "A request id is 1 to 128 letters, digits, '.', '_', ':' or '-'.",
          param,
          code: "invalid_value"
        })
      )

/**
 * The dead-letter queue: the gateway's own when it provides one, else one of the handlers' over
 * the same event store (the stream-version guard keeps two queues from running one retry twice);
 * none without an event store.
 */
const deadLetterQueue = Effect.gen(function* () {
  const provided = yield* Effect.serviceOption(DeadLetterQueue)
  if (Option.isSome(provided)) return provided
  const sql = yield* Effect.serviceOption(SqlClient.SqlClient)
  const store = yield* Effect.serviceOption(EventStore.EventStore)
  if (Option.isNone(sql) || Option.isNone(store)) return Option.none()
  const context = yield* Layer.build(DeadLetterQueue.Default).pipe(
    Effect.provideService(SqlClient.SqlClient, sql.value),
    Effect.provideService(EventStore.EventStore, store.value)
  )
  return Option.some(Context.get(context, DeadLetterQueue))
})

/** The handlers of `RpcApi.AdminRpcs`. */
export const adminLayer = RpcApi.AdminRpcs.toLayer(
  Effect.gen(function* () {
    const auth = yield* Auth
    const pool = yield* BackendPool
    const admin = yield* Effect.serviceOption(KeyAdmin)
    const registry = yield* Effect.serviceOption(KeyRegistry)
    const sql = yield* Effect.serviceOption(SqlClient.SqlClient)
    const store = yield* Effect.serviceOption(EventStore.EventStore)
    const runner = yield* Effect.serviceOption(ProjectionRunner.ProjectionRunner)
    const letters = yield* deadLetterQueue

    const authorize = (headers: Headers.Headers) => callerOf(auth, headers)
    const need = <A>(part: Option.Option<A>, name: string) =>
      Option.isSome(part) ? Effect.succeed(part.value) : Effect.fail(unavailable(name))
    const tenancy = Effect.all([need(admin, "API keys"), need(registry, "API keys")])

    /** A key the caller may see. */
    const visibleKey = (caller: Caller, id: string) =>
      Effect.gen(function* () {
        const [keys] = yield* tenancy
        const key = yield* keys.keyOf(id)
        yield* ownTenant(caller, key.tenantId, "another tenant's keys")
        return key
      })

    return {
      "Keys.create": (input, { headers }) =>
        Effect.gen(function* () {
          const caller = yield* authorize(headers)
          const [keys] = yield* tenancy
          yield* ownTenant(caller, input.tenant, "another tenant's keys")
          if (caller._tag === "Service" && input.scopes?.includes("admin")) {
            return yield* operatorOnly("create a key with the 'admin' scope")
          }
          const tenant = yield* check(Schema.String.pipe(Schema.minLength(1)), input.tenant, "tenant")
          const change = yield* checkChange(input)
          const { key, secret } = yield* keys.createKey(
            {
              tenant,
              name: input.name,
              ...change,
              ...(input.scopes === undefined ? {} : { scopes: input.scopes }),
              ...(input.metadata === undefined ? {} : { metadata: input.metadata }),
              ...(input.policy === undefined ? {} : { policy: input.policy })
            },
            caller.by,
            Ids.newRequestId()
          )
          return { key: keyView(key), secret }
        }),

      "Keys.list": (filter, { headers }) =>
        Effect.gen(function* () {
          const caller = yield* authorize(headers)
          const [, keys] = yield* tenancy
          const tenant = caller._tag === "Service" ? caller.principal.tenantId : filter.tenant
          if (filter.tenant !== undefined) yield* ownTenant(caller, filter.tenant, "another tenant's keys")
          return keys
            .keys()
            .filter(
              (k) =>
                (tenant === undefined || k.tenantId === tenant) &&
                (filter.includeRevoked === true || k.revoked === null)
            )
            .sort((a, b) => a.createdAt.getTime() - b.createdAt.getTime())
            .map(keyView)
        }),

      "Keys.get": ({ id }, { headers }) =>
        Effect.flatMap(authorize(headers), (caller) => Effect.map(visibleKey(caller, id), keyView)),

      "Keys.update": (input, { headers }) =>
        Effect.gen(function* () {
          const caller = yield* authorize(headers)
          const [keys] = yield* tenancy
          yield* visibleKey(caller, input.id)
          const change = yield* checkChange(input)
          const key = yield* keys.changeKey(
            input.id,
            { ...change, ...(input.policy === undefined ? {} : { policy: input.policy }) },
            caller.by,
            Ids.newRequestId()
          )
          return keyView(key)
        }),

      "Keys.revoke": (input, { headers }) =>
        Effect.gen(function* () {
          const caller = yield* authorize(headers)
          const [keys] = yield* tenancy
          yield* visibleKey(caller, input.id)
          const key = yield* keys.revokeKey(
            input.id,
            input.reason ??
              (caller._tag === "Operator" ? "revoked by an administrator" : "revoked by a service"),
            caller.by,
            Ids.newRequestId()
          )
          return keyView(key)
        }),

      "Tenants.create": (input, { headers }) =>
        Effect.gen(function* () {
          const caller = yield* authorize(headers)
          if (caller._tag === "Service") return yield* operatorOnly("create tenants")
          const [keys] = yield* tenancy
          const { limits } = yield* checkChange(input)
          const tenant = yield* keys.createTenant(
            {
              id: input.id,
              ...(input.name === undefined ? {} : { name: input.name }),
              ...(limits === undefined ? {} : { limits }),
              ...(input.metadata === undefined ? {} : { metadata: input.metadata }),
              ...(input.policy === undefined ? {} : { policy: input.policy })
            },
            caller.by,
            Ids.newRequestId()
          )
          return tenantView(tenant)
        }),

      "Tenants.list": (_, { headers }) =>
        Effect.gen(function* () {
          const caller = yield* authorize(headers)
          const [, keys] = yield* tenancy
          return keys
            .tenants()
            .filter((t) => caller._tag === "Operator" || t.tenantId === caller.principal.tenantId)
            .map(tenantView)
        }),

      "Tenants.get": ({ id }, { headers }) =>
        Effect.gen(function* () {
          const caller = yield* authorize(headers)
          const [keys] = yield* tenancy
          yield* ownTenant(caller, id, "another tenant")
          return tenantView(yield* keys.tenantOf(id))
        }),

      "Tenants.update": (input, { headers }) =>
        Effect.gen(function* () {
          const caller = yield* authorize(headers)
          if (caller._tag === "Service") return yield* operatorOnly("change a tenant's limits or policy")
          const [keys] = yield* tenancy
          const { limits } = yield* checkChange(input)
          const tenant = yield* keys.changeTenant(
            input.id,
            {
              ...(limits === undefined ? {} : { limits }),
              ...(input.policy === undefined ? {} : { policy: input.policy })
            },
            caller.by,
            Ids.newRequestId()
          )
          return tenantView(tenant)
        }),

      "Usage.query": (query, { headers }) =>
        Effect.gen(function* () {
          const caller = yield* authorize(headers)
          const db = yield* need(sql, "an event store")
          if (caller._tag === "Operator") return yield* usageQuery(db, query)
          if (query.tenant !== undefined) yield* ownTenant(caller, query.tenant, "another tenant's usage")
          return yield* usageQuery(db, { ...query, tenant: caller.principal.tenantId })
        }),

      "Backends.status": (_, { headers }) =>
        Effect.flatMap(authorize(headers), () =>
          Effect.map(pool.status, (replicas) => replicas.map(backendView))
        ),

      "Projections.status": (_, { headers }) =>
        Effect.gen(function* () {
          yield* authorize(headers)
          const projections = yield* need(runner, "projections (recording is off)")
          const failed = (error: { readonly message: string }) =>
            new Errors.ServiceUnavailable({
              message: `Projection status cannot be read right now (${error.message}).`
            })
          const status = yield* Effect.mapError(projections.status, failed)
          // The lag is a count on the log: when it cannot be had (the database is slow), say so.
          const lag = yield* projections.lag.pipe(Effect.option)
          return status.map(
            (s): RpcSchemas.ProjectionStatus => ({
              name: s.name,
              position: s.position,
              eventsApplied: s.eventsApplied,
              lag: Option.match(lag, {
                onNone: () => null,
                onSome: (rows) => rows.find((r) => r.name === s.name)?.events ?? null
              }),
              lastError: s.lastError,
              leader: s.leader
            })
          )
        }),

      "Events.forRequest": ({ requestId }, { headers }) =>
        Effect.gen(function* () {
          const caller = yield* authorize(headers)
          if (!isRequestId(requestId)) {
            return yield* new Errors.InvalidRequest({
              message: "A request id is 1 to 128 letters, digits, '.', '_', ':' or '-'.",
              param: "requestId",
              code: "invalid_value"
            })
          }
          const events = yield* need(store, "an event store")
          const recorded = yield* events.readStream(Events.streamIdOf(requestId)).pipe(
            Effect.mapError(
              (error) =>
                new Errors.ServiceUnavailable({
                  message: `The event log cannot be read right now (${error.reason}).`
                })
            )
          )
          if (recorded.length === 0) return yield* new RpcApi.RequestNotFound({ requestId })
          const decoded = decodeStream(recorded)
          yield* ownTenant(caller, tenantOfStream(decoded), "another tenant's requests")
          return decoded
        }),

      "DeadLetters.list": (query, { headers }) =>
        Effect.gen(function* () {
          const caller = yield* authorize(headers)
          const queue = yield* need(letters, "an event store")
          const filter = yield* checkFilter(query, DeadLetters.maxLimit, "")
          return yield* queue.list(yield* ownFilter(caller, filter))
        }),

      "DeadLetters.get": ({ requestId }, { headers }) =>
        Effect.gen(function* () {
          const caller = yield* authorize(headers)
          const queue = yield* need(letters, "an event store")
          const detail = yield* queue.get(yield* requestIdParam(requestId, "requestId"))
          yield* ownTenant(caller, detail.letter.tenantId, "another tenant's dead letters")
          return detail
        }),

      "DeadLetters.retry": (input, { headers }) =>
        Effect.gen(function* () {
          const caller = yield* authorize(headers)
          const queue = yield* need(letters, "an event store")
          if ("requestId" in input) {
            const id = yield* requestIdParam(input.requestId, "requestId")
            const { letter } = yield* queue.get(id)
            yield* ownTenant(caller, letter.tenantId, "another tenant's dead letters")
            const outcome = yield* queue.retry(id, caller.by)
            return { outcomes: [outcome], more: false }
          }
          const filter = yield* checkFilter(input.filter, DeadLetters.maxRetryBatch, "filter.")
          return yield* queue.retryMatching(yield* ownFilter(caller, filter), caller.by)
        }),

      "DeadLetters.discard": ({ requestId, reason }, { headers }) =>
        Effect.gen(function* () {
          const caller = yield* authorize(headers)
          const queue = yield* need(letters, "an event store")
          const id = yield* requestIdParam(requestId, "requestId")
          const why = yield* check(Schema.Trim.pipe(Schema.minLength(1)), reason, "reason")
          const { letter } = yield* queue.get(id)
          yield* ownTenant(caller, letter.tenantId, "another tenant's dead letters")
          return yield* queue.discard(id, why, caller.by)
        })
    }
  })
)

export type AdminHandlersRequirements = Layer.Layer.Context<typeof adminLayer>
