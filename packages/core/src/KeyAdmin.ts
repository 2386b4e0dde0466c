/**
 * Creating, changing and revoking tenants and API keys: each change is an event appended to the
 * tenant's or key's own stream (with optimistic concurrency, so two admins cannot both create the
 * same tenant), then read back into this replica's registry. Other replicas learn it from the log.
 *
 * A key's secret is `gw-` and 32 random bytes in base62; it is returned once, here, and only its
 * SHA-256 is recorded.
 */
import { randomBytes } from "node:crypto"
import { Errors, Events, Ids, Tenancy } from "@gateway/domain"
import { EventStore } from "@gateway/event-store"
import { Clock, Effect } from "effect"
import { hashSecret, type KeyRecord, KeyRegistry, type TenantRecord } from "./KeyRegistry.js"
import { Settings } from "./Settings.js"

const alphabet = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"

/** `bytes` random bytes in base62 (about 1.34 characters a byte). */
const base62 = (bytes: number): string => {
  let n = BigInt(`0x${randomBytes(bytes).toString("hex")}`)
  const width = Math.ceil((bytes * 8) / Math.log2(62))
  let out = ""
  for (let i = 0; i < width; i++) {
    out = alphabet[Number(n % 62n)]! + out
    n /= 62n
  }
  return out
}

/** A new secret: `gw-` + 32 random bytes, base62 (43 characters). */
export const newSecret = (): string => `gw-${base62(32)}`

const newKeyId = () => Ids.KeyId.make(`key_${base62(9)}`)

export interface NewTenant {
  readonly id: string
  readonly name?: string | undefined
  readonly limits?: Tenancy.LimitsInput | undefined
  readonly metadata?: Tenancy.Metadata | undefined
  readonly policy?: string | null | undefined
}

export interface TenantChange {
  readonly limits?: Tenancy.LimitsInput | undefined
  readonly policy?: string | null | undefined
}

export interface NewKey {
  readonly tenant: string
  readonly name: string
  readonly models?: ReadonlyArray<string> | null | undefined
  readonly limits?: Tenancy.LimitsInput | undefined
  readonly scopes?: ReadonlyArray<Tenancy.Scope> | undefined
  readonly metadata?: Tenancy.Metadata | undefined
  readonly policy?: string | null | undefined
}

export interface KeyChange {
  readonly limits?: Tenancy.LimitsInput | undefined
  readonly models?: ReadonlyArray<string> | null | undefined
  readonly policy?: string | null | undefined
}

const isTenantId = (id: string) => /^[A-Za-z0-9._-]{1,64}$/.test(id)

/** `input` over `base`, refusing a budget period without a budget to apply it to. */
const limitsOver = (
  base: Tenancy.Limits,
  input: Tenancy.LimitsInput
): Effect.Effect<Tenancy.Limits, Errors.InvalidRequest> =>
  input.budget_period !== undefined && input.budget_usd == null && base.budget === undefined
    ? Effect.fail(
        new Errors.InvalidRequest({
          message: "'budget_period' needs a budget: set 'budget_usd' too.",
          param: "limits.budget_period",
          code: "invalid_value"
        })
      )
    : Effect.succeed(Tenancy.applyLimits(base, input))

export class KeyAdmin extends Effect.Service<KeyAdmin>()("@gateway/core/KeyAdmin", {
  effect: Effect.gen(function* () {
    const store = yield* EventStore.EventStore
    const registry = yield* KeyRegistry
    const settings = yield* Settings
    const defaults = settings.limits.keyDefaults
    const policies = new Set(settings.routing.policies.map((p) => p.name as string))
    /** A binding to a policy the config does not have would route nowhere: refused. */
    const checkPolicy = (policy: string | null | undefined) =>
      policy === undefined || policy === null || policies.has(policy)
        ? Effect.void
        : Effect.fail(
            new Errors.InvalidRequest({
              message: `There is no routing policy '${policy}' (configured: ${[...policies].join(", ") || "none"}).`,
              param: "policy",
              code: "invalid_value"
            })
          )
    const defaultLimits =
      defaults === undefined ? Tenancy.noLimits : Tenancy.applyLimits(Tenancy.noLimits, defaults)

    /** Appends to a stream expecting `expected`, then applies the stream's new events here. */
    const append = (
      streamId: string,
      event: Tenancy.TenancyEvent,
      expected: number,
      requestId: Ids.RequestId
    ) =>
      Effect.gen(function* () {
        const { type, data } = Tenancy.encodeTenancyEvent(event)
        const metadata = Events.makeMetadata({ requestId, occurredAt: yield* Clock.currentTimeMillis })
        yield* store.append(streamId, [{ eventId: crypto.randomUUID(), type, data, metadata }], expected)
        yield* registry.refresh(streamId, expected + 1)
      })

    const conflict = (message: string) => () => Effect.fail(new Errors.Conflict({ message }))
    const unavailable = (error: EventStore.EventStoreError) =>
      Effect.fail(
        new Errors.ServiceUnavailable({
          message: `The change could not be recorded (${error.reason}); retry.`
        })
      )

    const createTenant = (input: NewTenant, by: string, requestId: Ids.RequestId) =>
      Effect.gen(function* () {
        if (!isTenantId(input.id)) {
          return yield* new Errors.InvalidRequest({
            message: "A tenant id is 1 to 64 letters, digits, '.', '_' or '-'.",
            param: "id",
            code: "invalid_value"
          })
        }
        yield* checkPolicy(input.policy)
        const tenantId = Ids.TenantId.make(input.id)
        const limits =
          input.limits === undefined ? Tenancy.noLimits : yield* limitsOver(Tenancy.noLimits, input.limits)
        const event = new Tenancy.TenantCreated({
          tenantId,
          name: input.name ?? input.id,
          limits,
          ...(input.metadata === undefined ? {} : { metadata: input.metadata }),
          ...(typeof input.policy === "string" ? { policy: input.policy } : {}),
          by
        })
        yield* append(Tenancy.tenantStream(tenantId), event, 0, requestId).pipe(
          Effect.catchTags({
            StreamVersionConflict: conflict(`The tenant '${input.id}' exists already.`),
            EventStoreError: unavailable
          })
        )
        return registry.tenant(tenantId)!
      })

    const tenantOf = (id: string): Effect.Effect<TenantRecord, Errors.NotFound> => {
      const tenant = registry.tenant(id)
      return tenant === undefined
        ? Effect.fail(new Errors.NotFound({ what: "tenant", id }))
        : Effect.succeed(tenant)
    }

    const keyOf = (id: string): Effect.Effect<KeyRecord, Errors.NotFound> => {
      const key = registry.key(id)
      return key === undefined ? Effect.fail(new Errors.NotFound({ what: "key", id })) : Effect.succeed(key)
    }

    const changeTenant = (id: string, change: TenantChange, by: string, requestId: Ids.RequestId) =>
      Effect.gen(function* () {
        const tenant = yield* tenantOf(id)
        yield* checkPolicy(change.policy)
        const event = new Tenancy.TenantLimitsChanged({
          tenantId: tenant.tenantId,
          limits:
            change.limits === undefined ? tenant.limits : yield* limitsOver(tenant.limits, change.limits),
          ...(change.policy === undefined ? {} : { policy: change.policy }),
          by
        })
        yield* append(Tenancy.tenantStream(tenant.tenantId), event, tenant.version, requestId).pipe(
          Effect.catchTags({
            StreamVersionConflict: conflict(`The tenant '${id}' changed meanwhile; read it again and retry.`),
            EventStoreError: unavailable
          })
        )
        return registry.tenant(tenant.tenantId)!
      })

    /** Creates a key (and its tenant, if new); the secret is in the result and nowhere else. */
    const createKey = (input: NewKey, by: string, requestId: Ids.RequestId) =>
      Effect.gen(function* () {
        if (input.name.trim().length === 0) {
          return yield* new Errors.InvalidRequest({
            message: "A key needs a name.",
            param: "name",
            code: "missing_required_parameter"
          })
        }
        yield* checkPolicy(input.policy)
        if (registry.tenant(input.tenant) === undefined) {
          yield* createTenant({ id: input.tenant }, by, requestId).pipe(
            Effect.catchTag("Conflict", () => Effect.void)
          )
        }
        const tenant = yield* tenantOf(input.tenant)
        const secret = newSecret()
        const keyId = newKeyId()
        const event = new Tenancy.KeyCreated({
          keyId,
          tenantId: tenant.tenantId,
          name: input.name,
          hash: hashSecret(secret),
          prefix: secret.slice(0, 7),
          models: input.models === undefined || input.models === null ? null : [...input.models],
          // The configured defaults, with what the request sets over them (`null` removes one).
          limits: input.limits === undefined ? defaultLimits : yield* limitsOver(defaultLimits, input.limits),
          scopes: [...(input.scopes ?? [])],
          ...(input.metadata === undefined ? {} : { metadata: input.metadata }),
          ...(typeof input.policy === "string" ? { policy: input.policy } : {}),
          by
        })
        yield* append(Tenancy.keyStream(keyId), event, 0, requestId).pipe(
          Effect.catchTags({
            StreamVersionConflict: conflict("A key with this id exists already; retry."),
            EventStoreError: unavailable
          })
        )
        return { key: registry.key(keyId)!, secret }
      })

    const changeKey = (id: string, change: KeyChange, by: string, requestId: Ids.RequestId) =>
      Effect.gen(function* () {
        const key = yield* keyOf(id)
        if (change.limits === undefined && change.models === undefined && change.policy === undefined) {
          return yield* new Errors.InvalidRequest({
            message: "Nothing to change: give 'limits', 'models' or 'policy'.",
            param: null,
            code: "missing_required_parameter"
          })
        }
        yield* checkPolicy(change.policy)
        const limits = change.limits === undefined ? undefined : yield* limitsOver(key.limits, change.limits)
        const event = new Tenancy.KeyLimitsChanged({
          keyId: key.keyId,
          ...(limits === undefined ? {} : { limits }),
          ...(change.models === undefined
            ? {}
            : { models: change.models === null ? null : [...change.models] }),
          ...(change.policy === undefined ? {} : { policy: change.policy }),
          by
        })
        yield* append(Tenancy.keyStream(key.keyId), event, key.version, requestId).pipe(
          Effect.catchTags({
            StreamVersionConflict: conflict(`The key '${id}' changed meanwhile; read it again and retry.`),
            EventStoreError: unavailable
          })
        )
        return registry.key(key.keyId)!
      })

    /**
     * Revokes a key, whatever this replica has seen of it: a change made elsewhere meanwhile (a
     * version conflict) is read in and the revoke appended after it — a revoke is never dropped.
     */
    const revokeKey = (id: string, reason: string, by: string, requestId: Ids.RequestId) => {
      const attempt = (
        triesLeft: number
      ): Effect.Effect<KeyRecord, Errors.NotFound | Errors.Conflict | Errors.ServiceUnavailable> =>
        Effect.gen(function* () {
          const key = yield* keyOf(id)
          if (key.revoked !== null) return key
          const event = new Tenancy.KeyRevoked({ keyId: key.keyId, reason, by })
          const stream = Tenancy.keyStream(key.keyId)
          return yield* append(stream, event, key.version, requestId).pipe(
            Effect.map(() => registry.key(key.keyId)!),
            Effect.catchTags({
              StreamVersionConflict: () =>
                triesLeft === 0
                  ? Effect.fail(
                      new Errors.Conflict({ message: `The key '${id}' keeps changing; retry the revoke.` })
                    )
                  : Effect.zipRight(
                      registry.refresh(stream, key.version + 1).pipe(Effect.catchAll(() => Effect.void)),
                      attempt(triesLeft - 1)
                    ),
              EventStoreError: unavailable
            })
          )
        })
      return attempt(5)
    }

    return { createTenant, changeTenant, createKey, changeKey, revokeKey, keyOf, tenantOf } as const
  })
}) {}
