/**
 * Every tenant and API key, in memory: a projection of the tenancy streams (`tenant-*`, `key-*`)
 * that each replica builds from the log at start-up and then follows live (LISTEN/NOTIFY, with
 * polling as a backstop), so a key created or revoked through any replica takes effect on all of
 * them within a second. Lookups are by the SHA-256 of the secret: one hash and one map read on
 * the request path, no round trip.
 *
 * One fiber owns the maps (the follower); admin writes made here are applied at once as well, so
 * a key works on this replica as soon as its creation returns. Each record keeps its stream
 * version, which makes applying the same event twice harmless.
 */
import { createHash } from "node:crypto"
import { type Ids, Tenancy } from "@gateway/domain"
import { EventStore } from "@gateway/event-store"
import { Effect, Either, Schedule, Stream } from "effect"

export interface TenantRecord {
  readonly tenantId: Ids.TenantId
  readonly name: string
  readonly limits: Tenancy.Limits
  readonly metadata: Tenancy.Metadata
  /** The routing policy bound to the tenant, if any. */
  readonly policy: string | null
  readonly createdAt: Date
  readonly version: number
}

export interface KeyRecord {
  readonly keyId: Ids.KeyId
  readonly tenantId: Ids.TenantId
  readonly name: string
  readonly hash: string
  readonly prefix: string
  /** Public model names it may call; `null` for all. */
  readonly models: ReadonlySet<string> | null
  readonly limits: Tenancy.Limits
  readonly scopes: ReadonlyArray<Tenancy.Scope>
  readonly metadata: Tenancy.Metadata
  /** The routing policy bound to the key, if any (over its tenant's). */
  readonly policy: string | null
  readonly createdAt: Date
  readonly revoked: { readonly at: Date; readonly reason: string } | null
  readonly version: number
}

/** The SHA-256 of a secret, hex: how keys are looked up and all that is stored of them. */
export const hashSecret = (secret: string): string => createHash("sha256").update(secret).digest("hex")

/** Retries of the live follow after the database went away (it resumes where it stopped). */
const followRetry = Schedule.exponential("200 millis").pipe(Schedule.union(Schedule.spaced("5 seconds")))

export class KeyRegistry extends Effect.Service<KeyRegistry>()("@gateway/core/KeyRegistry", {
  scoped: Effect.gen(function* () {
    const store = yield* EventStore.EventStore
    const tenants = new Map<string, TenantRecord>()
    const keys = new Map<string, KeyRecord>()
    const byHash = new Map<string, KeyRecord>()

    const putKey = (key: KeyRecord) => {
      keys.set(key.keyId, key)
      byHash.set(key.hash, key)
    }

    /** Folds one stored tenancy event in, unless it is already in (by stream version). */
    const fold = (event: EventStore.RecordedEvent, e: Tenancy.TenancyEvent): void => {
      const version = event.streamVersion
      switch (e._tag) {
        case "TenantCreated": {
          if (tenants.has(e.tenantId)) return
          tenants.set(e.tenantId, {
            tenantId: e.tenantId,
            name: e.name,
            limits: e.limits,
            metadata: e.metadata ?? {},
            policy: e.policy ?? null,
            createdAt: event.recordedAt,
            version
          })
          return
        }
        case "TenantLimitsChanged": {
          const tenant = tenants.get(e.tenantId)
          if (tenant === undefined || tenant.version >= version) return
          tenants.set(e.tenantId, {
            ...tenant,
            limits: e.limits,
            ...(e.policy === undefined ? {} : { policy: e.policy }),
            version
          })
          return
        }
        case "KeyCreated": {
          if (keys.has(e.keyId)) return
          putKey({
            keyId: e.keyId,
            tenantId: e.tenantId,
            name: e.name,
            hash: e.hash,
            prefix: e.prefix,
            models: e.models === null ? null : new Set(e.models),
            limits: e.limits,
            scopes: e.scopes,
            metadata: e.metadata ?? {},
            policy: e.policy ?? null,
            createdAt: event.recordedAt,
            revoked: null,
            version
          })
          return
        }
        case "KeyLimitsChanged": {
          const key = keys.get(e.keyId)
          if (key === undefined || key.version >= version) return
          putKey({
            ...key,
            ...(e.limits === undefined ? {} : { limits: e.limits }),
            ...(e.models === undefined ? {} : { models: e.models === null ? null : new Set(e.models) }),
            ...(e.policy === undefined ? {} : { policy: e.policy }),
            version
          })
          return
        }
        case "KeyRevoked": {
          const key = keys.get(e.keyId)
          if (key === undefined || key.version >= version) return
          putKey({ ...key, revoked: { at: event.recordedAt, reason: e.reason }, version })
          return
        }
      }
    }

    /** Applies one event; one this version cannot read is logged, never applied half-way. */
    const apply = (event: EventStore.RecordedEvent) => {
      const decoded = Tenancy.decodeTenancyEvent(event.type, event.data)
      if (decoded === undefined) return Effect.void
      if (Either.isRight(decoded)) return Effect.sync(() => fold(event, decoded.right))
      return Effect.logError("unreadable tenancy event", {
        position: event.position,
        type: event.type,
        error: decoded.left.message
      })
    }

    // Everything recorded so far, before the first request is served.
    let cursor: EventStore.Cursor = EventStore.start
    const follow = (from: EventStore.Cursor, live: boolean) =>
      (live
        ? store.subscribe(from, { tenancyOnly: true, pollInterval: "500 millis" })
        : store.readAll(from, { tenancyOnly: true })
      ).pipe(
        Stream.runForEach((event) =>
          Effect.zipRight(
            apply(event),
            Effect.sync(() => {
              cursor = EventStore.cursorOf(event)
            })
          )
        )
      )
    yield* follow(cursor, false).pipe(Effect.orDie)
    yield* Effect.logDebug("key registry loaded", { tenants: tenants.size, keys: keys.size })

    // Then every change, from whichever replica, as it is committed.
    yield* Effect.suspend(() => follow(cursor, true)).pipe(
      Effect.tapError((error) =>
        Effect.logWarning("key registry lost the event log; retrying", { error: error.message })
      ),
      Effect.retry(followRetry),
      Effect.forkScoped
    )

    return {
      /** The key whose secret hashes to `hash`, revoked or not. */
      byHash: (hash: string): KeyRecord | undefined => byHash.get(hash),
      key: (keyId: string): KeyRecord | undefined => keys.get(keyId),
      tenant: (tenantId: string): TenantRecord | undefined => tenants.get(tenantId),
      keys: (): ReadonlyArray<KeyRecord> => Array.from(keys.values()),
      tenants: (): ReadonlyArray<TenantRecord> => Array.from(tenants.values()),
      /** Reads back and applies a stream this replica has just appended to, without waiting for the follower. */
      refresh: (streamId: string, fromVersion: number) =>
        Effect.flatMap(store.readStream(streamId, fromVersion), (events) =>
          Effect.forEach(events, apply, { discard: true })
        )
    } as const
  })
}) {}
