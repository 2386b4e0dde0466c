import { SqlClient } from "@effect/sql"
import { expect, layer } from "@effect/vitest"
import { KeyAdmin } from "@gateway/core/KeyAdmin"
import { hashSecret, type KeyRecord, KeyRegistry } from "@gateway/core/KeyRegistry"
import * as Settings from "@gateway/core/Settings"
import { GatewayConfig, Ids, Tenancy } from "@gateway/domain"
import { Database, EventStore } from "@gateway/event-store"
import { Chunk, Context, Effect, FiberRef, HashSet, Layer, Logger, Schedule, Schema, Stream } from "effect"

const config = Schema.decodeUnknownSync(GatewayConfig.GatewayConfig)({
  models: [{ name: "small", backends: [{ id: "s1", url: "http://127.0.0.1:8101" }] }],
  limits: { key_defaults: { requests_per_minute: 60 } },
  routing: {
    policies: [
      { name: "auto", tiers: { simple: "small", moderate: "small", complex: "small" } },
      { name: "auto-cheap", tiers: { simple: "small", moderate: "small", complex: "small" } }
    ]
  }
})

const Store = Layer.provideMerge(Database.eventStore, Database.layerTest)

const Env = KeyAdmin.Default.pipe(
  Layer.provideMerge(KeyRegistry.Default),
  Layer.provideMerge(Settings.layer(config)),
  Layer.provideMerge(Store),
  // The registry's own follower logs the malformed event below too; the test checks a replica's.
  Layer.provide(Logger.replace(Logger.defaultLogger, Logger.none))
)

const unique = (prefix: string) => `${prefix}-${crypto.randomUUID().slice(0, 8)}`
const rid = () => Ids.newRequestId()

/** Another replica on the same database: its own event store (LISTEN) and its own registry. */
const replica = Layer.build(Layer.provide(KeyRegistry.Default, Database.eventStore)).pipe(
  Effect.map((context) => Context.get(context, KeyRegistry))
)

/** Polls `probe` on the live clock until it gives a value; fails after a second. */
const eventually = <A>(what: string, probe: () => A | undefined | null) =>
  Effect.suspend(() => {
    const value = probe()
    return value === undefined || value === null ? Effect.fail("not yet" as const) : Effect.succeed(value)
  }).pipe(
    Effect.retry(Schedule.spaced("10 millis")),
    Effect.timeoutFail({ duration: "1 second", onTimeout: () => new Error(`${what}: not within a second`) })
  )

const collect = <A, E>(stream: Stream.Stream<A, E>) =>
  Effect.map(Stream.runCollect(stream), Chunk.toReadonlyArray)

layer(Env, { excludeTestServices: true, timeout: 60_000 })("KeyRegistry and KeyAdmin", (it) => {
  it.scoped(
    "keys and tenants are bound to routing policies, changed and unbound; an unknown policy is refused",
    () =>
      Effect.gen(function* () {
        const admin = yield* KeyAdmin
        const tenantId = unique("routed")
        const tenant = yield* admin.createTenant({ id: tenantId, policy: "auto-cheap" }, "admin", rid())
        expect(tenant.policy).toBe("auto-cheap")
        const { key } = yield* admin.createKey(
          { tenant: tenantId, name: "app", policy: "auto" },
          "admin",
          rid()
        )
        expect(key.policy).toBe("auto")
        // A limits change leaves the binding; `null` removes it.
        expect((yield* admin.changeKey(key.keyId, { models: ["auto"] }, "admin", rid())).policy).toBe("auto")
        expect((yield* admin.changeKey(key.keyId, { policy: null }, "admin", rid())).policy).toBeNull()
        expect((yield* admin.changeTenant(tenantId, { policy: "auto" }, "admin", rid())).policy).toBe("auto")
        expect(
          (yield* admin.changeTenant(tenantId, { limits: { requests_per_minute: 5 } }, "admin", rid())).policy
        ).toBe("auto")

        const refused = yield* Effect.flip(
          admin.changeKey(key.keyId, { policy: "auto-typo" }, "admin", rid())
        )
        expect(refused).toMatchObject({ _tag: "InvalidRequest", param: "policy" })
        expect(refused.message).toContain("auto-typo")
        const noTenant = yield* Effect.flip(
          admin.createTenant({ id: unique("t"), policy: "nope" }, "admin", rid())
        )
        expect(noTenant).toMatchObject({ _tag: "InvalidRequest", param: "policy" })
        // Another replica reads the bindings from the log.
        const other = yield* replica
        const mine = yield* KeyRegistry
        const version = mine.key(key.keyId)!.version
        const seen = yield* eventually("the key's binding elsewhere", () =>
          other.key(key.keyId)?.version === version ? other.key(key.keyId) : undefined
        )
        expect(seen.policy).toBeNull()
        expect(other.tenant(tenantId)?.policy).toBe("auto")
      })
  )

  it.effect("createKey returns a gw- secret of 46 base62 characters, found by its hash at once", () =>
    Effect.gen(function* () {
      const admin = yield* KeyAdmin
      const registry = yield* KeyRegistry
      const { key, secret } = yield* admin.createKey({ tenant: unique("acme"), name: "ci" }, "admin", rid())
      expect(secret).toMatch(/^gw-[0-9A-Za-z]{43}$/)
      expect(secret).toHaveLength(46)
      expect(registry.byHash(hashSecret(secret))).toEqual(key)
      expect(key.prefix).toBe(secret.slice(0, 7))
      // Created without limits: the configured key defaults apply.
      expect(key.limits).toEqual({ requestsPerMinute: 60 })
      const again = yield* admin.createKey({ tenant: key.tenantId, name: "ci 2" }, "admin", rid())
      expect(again.secret).not.toBe(secret)
      expect(again.key.keyId).not.toBe(key.keyId)
    })
  )

  it.effect("records the secret's hash in the log, never the secret", () =>
    Effect.gen(function* () {
      const admin = yield* KeyAdmin
      const sql = yield* SqlClient.SqlClient
      const { key, secret } = yield* admin.createKey({ tenant: unique("acme"), name: "ci" }, "admin", rid())
      const rows = yield* sql<{ data: string }>`SELECT data::text AS data FROM events
        WHERE stream_id = ${Tenancy.keyStream(key.keyId)}`
      expect(rows).toHaveLength(1)
      expect(rows[0]!.data).toContain(hashSecret(secret))
      // Beyond the prefix shown in listings, no part of the secret is anywhere in the log.
      const leaks = yield* sql<{ n: number }>`SELECT count(*)::int AS n FROM events
        WHERE data::text LIKE ${`%${secret.slice(7)}%`} OR metadata::text LIKE ${`%${secret.slice(7)}%`}`
      expect(leaks[0]!.n).toBe(0)
    })
  )

  it.scoped("another replica sees existing keys at start-up and later changes within a second", () =>
    Effect.gen(function* () {
      const admin = yield* KeyAdmin
      const tenant = unique("acme")
      const early = yield* admin.createKey({ tenant, name: "early" }, "admin", rid())
      const other = yield* replica
      expect(other.byHash(hashSecret(early.secret))?.keyId).toBe(early.key.keyId)
      expect(other.tenant(tenant)?.tenantId).toBe(tenant)

      const late = yield* admin.createKey({ tenant, name: "late" }, "admin", rid())
      const seen = yield* eventually("the new key", () => other.byHash(hashSecret(late.secret)))
      expect(seen.name).toBe("late")

      yield* admin.revokeKey(early.key.keyId, "leaked", "admin", rid())
      const revoked = yield* eventually("the revocation", () => other.key(early.key.keyId)?.revoked)
      expect(revoked.reason).toBe("leaked")

      yield* admin.changeTenant(tenant, { limits: { requests_per_minute: 5 } }, "admin", rid())
      yield* eventually("the tenant's new limit", () => other.tenant(tenant)?.limits.requestsPerMinute)
    })
  )

  it.effect("changeKey: null clears a limit, a field left out keeps it", () =>
    Effect.gen(function* () {
      const admin = yield* KeyAdmin
      const registry = yield* KeyRegistry
      const { key } = yield* admin.createKey(
        {
          tenant: unique("acme"),
          name: "limited",
          models: ["small"],
          limits: { requests_per_minute: 10, tokens_per_minute: 1000, budget_usd: 5 }
        },
        "admin",
        rid()
      )
      const budget = { amountMicroUsd: 5_000_000, period: "month" }
      expect(key.limits).toEqual({ requestsPerMinute: 10, tokensPerMinute: 1000, budget })

      const cleared = yield* admin.changeKey(
        key.keyId,
        { limits: { requests_per_minute: null } },
        "admin",
        rid()
      )
      expect(cleared.limits).toEqual({ tokensPerMinute: 1000, budget })
      expect(cleared.models).toEqual(new Set(["small"]))

      const allModels = yield* admin.changeKey(key.keyId, { models: null }, "admin", rid())
      expect(allModels.models).toBeNull()
      expect(allModels.limits).toEqual({ tokensPerMinute: 1000, budget })

      const raised = yield* admin.changeKey(
        key.keyId,
        { limits: { tokens_per_minute: 2000, budget_usd: null } },
        "admin",
        rid()
      )
      expect(raised.limits).toEqual({ tokensPerMinute: 2000 })
      expect(registry.key(key.keyId)).toEqual(raised)
    })
  )

  it.effect("revokeKey is idempotent: the first reason stays, one event is recorded", () =>
    Effect.gen(function* () {
      const admin = yield* KeyAdmin
      const registry = yield* KeyRegistry
      const store = yield* EventStore.EventStore
      const { key, secret } = yield* admin.createKey({ tenant: unique("acme"), name: "ci" }, "admin", rid())
      const first = yield* admin.revokeKey(key.keyId, "leaked", "admin", rid())
      const second = yield* admin.revokeKey(key.keyId, "again", "admin", rid())
      expect(first.revoked?.reason).toBe("leaked")
      expect(second).toEqual(first)
      expect(registry.byHash(hashSecret(secret))?.revoked?.reason).toBe("leaked")
      expect(yield* store.version(Tenancy.keyStream(key.keyId))).toBe(2)
    })
  )

  it.effect("a revoke made while another replica's change is not yet seen here still revokes", () =>
    Effect.gen(function* () {
      const admin = yield* KeyAdmin
      const registry = yield* KeyRegistry
      const store = yield* EventStore.EventStore
      const { key, secret } = yield* admin.createKey({ tenant: unique("acme"), name: "ci" }, "admin", rid())
      // Another replica changes the key (written straight to the log, as it would be); this
      // replica's revoke right after still expects the version it knows, and conflicts.
      const change = Tenancy.encodeTenancyEvent(
        new Tenancy.KeyLimitsChanged({ keyId: key.keyId, limits: { requestsPerMinute: 7 }, by: "elsewhere" })
      )
      yield* store.append(
        Tenancy.keyStream(key.keyId),
        [
          {
            eventId: crypto.randomUUID(),
            ...change,
            metadata: { requestId: rid(), correlationId: "x", occurredAt: new Date().toISOString() }
          }
        ],
        1
      )
      const revoked = yield* admin.revokeKey(key.keyId, "leaked", "admin", rid())
      expect(revoked.revoked?.reason).toBe("leaked")
      expect(revoked.limits).toEqual({ requestsPerMinute: 7 })
      expect(registry.byHash(hashSecret(secret))?.revoked?.reason).toBe("leaked")
      const events = yield* store.readStream(Tenancy.keyStream(key.keyId))
      expect(events.map((e) => e.type)).toEqual(["KeyCreated", "KeyLimitsChanged", "KeyRevoked"])
    })
  )

  it.effect("creating a tenant twice is a Conflict", () =>
    Effect.gen(function* () {
      const admin = yield* KeyAdmin
      const id = unique("acme")
      const tenant = yield* admin.createTenant(
        { id, name: "Acme Inc.", limits: { tokens_per_minute: 100 } },
        "admin",
        rid()
      )
      expect(tenant).toMatchObject({ tenantId: id, name: "Acme Inc.", limits: { tokensPerMinute: 100 } })
      const error = yield* Effect.flip(admin.createTenant({ id, name: "Other" }, "admin", rid()))
      expect(error._tag).toBe("Conflict")
      expect(error.message).toContain(id)
      expect((yield* KeyRegistry).tenant(id)?.name).toBe("Acme Inc.")
    })
  )

  it.effect("createKey for an unknown tenant creates the tenant", () =>
    Effect.gen(function* () {
      const admin = yield* KeyAdmin
      const registry = yield* KeyRegistry
      const id = unique("new")
      expect(registry.tenant(id)).toBeUndefined()
      const { key } = yield* admin.createKey({ tenant: id, name: "first" }, "admin", rid())
      expect(key.tenantId).toBe(id)
      expect(registry.tenant(id)).toMatchObject({ tenantId: id, name: id })
      expect((yield* admin.tenantOf(id)).tenantId).toBe(id)
    })
  )

  it.scoped("follows only the tenancy streams, not request events", () =>
    Effect.gen(function* () {
      const admin = yield* KeyAdmin
      const store = yield* EventStore.EventStore
      const following = yield* replica
      // A request stream event that would be a valid key if the registry read it.
      const sneaky = Tenancy.encodeTenancyEvent(
        new Tenancy.KeyCreated({
          keyId: Ids.KeyId.make(unique("key_sneaky")),
          tenantId: Ids.TenantId.make("acme"),
          name: "sneaky",
          hash: hashSecret("gw-sneaky"),
          prefix: "gw-snea",
          models: null,
          limits: {},
          scopes: ["admin"],
          by: "nobody"
        })
      )
      const requestStream = `request-${crypto.randomUUID()}`
      yield* store.append(
        requestStream,
        [{ eventId: crypto.randomUUID(), type: sneaky.type, data: sneaky.data, metadata: {} }],
        0
      )
      const marker = yield* admin.createKey({ tenant: unique("acme"), name: "marker" }, "admin", rid())

      const tenancy = yield* collect(store.readAll(EventStore.start, { tenancyOnly: true }))
      expect(tenancy.some((e) => e.streamId === requestStream)).toBe(false)
      expect(tenancy.some((e) => e.streamId === Tenancy.keyStream(marker.key.keyId))).toBe(true)
      const everything = yield* collect(store.readAll(EventStore.start))
      expect(everything.some((e) => e.streamId === requestStream)).toBe(true)

      // The follower got past the request event (it saw the key after it) without taking it in.
      yield* eventually("the marker key", () => following.key(marker.key.keyId))
      const isSneaky = (k: KeyRecord) => k.name === "sneaky"
      expect(following.byHash(hashSecret("gw-sneaky"))).toBeUndefined()
      expect(following.keys().some(isSneaky)).toBe(false)
      expect((yield* replica).byHash(hashSecret("gw-sneaky"))).toBeUndefined()
    })
  )

  it.scoped("skips a malformed tenancy event with an error log and keeps following", () =>
    Effect.gen(function* () {
      const admin = yield* KeyAdmin
      const store = yield* EventStore.EventStore
      const logs: Array<{ readonly level: string; readonly message: string }> = []
      const capture = Logger.make(({ logLevel, message }) => {
        logs.push({ level: logLevel.label, message: JSON.stringify(message) })
      })
      yield* Effect.locallyScopedWith(FiberRef.currentLoggers, () => HashSet.make(capture))
      const unreadable = () => logs.filter((l) => l.level === "ERROR" && l.message.includes("unreadable"))

      const following = yield* replica
      yield* store.append(
        `key-${unique("bad")}`,
        [{ eventId: crypto.randomUUID(), type: "KeyCreated", data: { keyId: 42 }, metadata: {} }],
        0
      )
      const after = yield* admin.createKey({ tenant: unique("acme"), name: "after" }, "admin", rid())
      yield* eventually("the key after the bad event", () => following.key(after.key.keyId))
      expect(unreadable()).toHaveLength(1)

      // A replica starting with the bad event in the log loads everything else.
      const starting = yield* replica
      expect(starting.key(after.key.keyId)?.name).toBe("after")
      expect(unreadable()).toHaveLength(2)
    })
  )
})
