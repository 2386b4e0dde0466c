import { describe, expect, it } from "@effect/vitest"
import * as Auth from "@gateway/core/Auth"
import { hashSecret, type KeyRecord, type KeyRegistry, type TenantRecord } from "@gateway/core/KeyRegistry"
import { Ids, type Tenancy } from "@gateway/domain"
import { Effect, Either, Option, Redacted } from "effect"

const keyRecord = (
  secret: string,
  options: {
    readonly keyId?: string
    readonly tenantId?: string
    readonly models?: ReadonlyArray<string>
    readonly scopes?: ReadonlyArray<Tenancy.Scope>
    readonly revoked?: boolean
  } = {}
): KeyRecord => ({
  keyId: Ids.KeyId.make(options.keyId ?? "key_user"),
  tenantId: Ids.TenantId.make(options.tenantId ?? "acme"),
  name: "ci",
  hash: hashSecret(secret),
  prefix: secret.slice(0, 7),
  models: options.models === undefined ? null : new Set(options.models),
  limits: { requestsPerMinute: 60 },
  scopes: options.scopes ?? [],
  metadata: {},
  policy: null,
  createdAt: new Date(0),
  revoked: options.revoked === true ? { at: new Date(1), reason: "leaked" } : null,
  version: 1
})

const acme: TenantRecord = {
  tenantId: Ids.TenantId.make("acme"),
  name: "Acme",
  limits: { tokensPerMinute: 1000 },
  metadata: {},
  policy: null,
  createdAt: new Date(0),
  version: 1
}

const userKey = keyRecord("gw-user-secret")
const adminScopedKey = keyRecord("gw-admin-scoped", { keyId: "key_ops", scopes: ["admin"] })
const revokedKey = keyRecord("gw-revoked", { keyId: "key_old", revoked: true })
const orphanKey = keyRecord("gw-orphan", { keyId: "key_orphan", tenantId: "gone" })

/** The two lookups `Auth` makes of the registry. */
const registry = (keys: ReadonlyArray<KeyRecord>, tenants: ReadonlyArray<TenantRecord>) =>
  ({
    byHash: (hash: string) => keys.find((k) => k.hash === hash),
    tenant: (id: string) => tenants.find((t) => t.tenantId === id)
  }) as unknown as KeyRegistry

const fakeRegistry = registry([userKey, adminScopedKey, revokedKey, orphanKey], [acme])
const adminKey = Option.some(Redacted.make("the-admin-key"))

const bearer = (secret: string) => ({ authorization: `Bearer ${secret}` })

const errorOf = <E>(result: Either.Either<unknown, E>): E => {
  if (Either.isRight(result)) throw new Error(`expected a failure, got ${JSON.stringify(result.right)}`)
  return result.left
}

describe("secretOf", () => {
  it("reads a Bearer token in any case, trimmed", () => {
    expect(Auth.secretOf({ authorization: "Bearer gw-abc" })).toBe("gw-abc")
    expect(Auth.secretOf({ authorization: "bearer gw-abc" })).toBe("gw-abc")
    expect(Auth.secretOf({ authorization: "BEARER gw-abc" })).toBe("gw-abc")
    expect(Auth.secretOf({ authorization: "Bearer    gw-abc  " })).toBe("gw-abc")
  })

  it("reads the api-key header that Azure OpenAI clients send", () => {
    expect(Auth.secretOf({ "api-key": "gw-abc" })).toBe("gw-abc")
    expect(Auth.secretOf({ "api-key": " gw-abc " })).toBe("gw-abc")
  })

  it("finds no secret in a missing, empty or malformed header", () => {
    expect(Auth.secretOf({})).toBeUndefined()
    expect(Auth.secretOf({ authorization: undefined })).toBeUndefined()
    expect(Auth.secretOf({ authorization: "" })).toBeUndefined()
    expect(Auth.secretOf({ authorization: "Bearer" })).toBeUndefined()
    expect(Auth.secretOf({ authorization: "Bearer    " })).toBeUndefined()
    expect(Auth.secretOf({ authorization: "gw-abc" })).toBeUndefined()
    expect(Auth.secretOf({ authorization: "Basic dXNlcjpwYXNz" })).toBeUndefined()
    expect(Auth.secretOf({ "api-key": "" })).toBeUndefined()
  })

  // A blank header is a missing key (the caller is told so), not an incorrect one.
  it("finds no secret in a blank api-key header", () => {
    expect(Auth.secretOf({ "api-key": "   " })).toBeUndefined()
  })
})

describe("Auth.make", () => {
  const auth = Auth.make(fakeRegistry, adminKey)

  it("refuses a request without a key, in OpenAI's words", () => {
    const error = errorOf(auth.authenticate({}))
    expect(error._tag).toBe("Unauthorized")
    expect(error.message).toMatch(/^You didn't provide an API key\./)
  })

  it("refuses an unknown key, in OpenAI's words", () => {
    const error = errorOf(auth.authenticate(bearer("gw-nobody")))
    expect(error._tag).toBe("Unauthorized")
    expect(error.message).toMatch(/^Incorrect API key provided\./)
  })

  it("refuses a revoked key, saying so", () => {
    const error = errorOf(auth.authenticate(bearer("gw-revoked")))
    expect(error._tag).toBe("Unauthorized")
    expect(error.message).toMatch(/revoked/)
  })

  it("turns a valid key into a principal with its key and tenant", () => {
    const principal = Either.getOrThrow(auth.authenticate(bearer("gw-user-secret")))
    expect(principal).toEqual({
      keyId: "key_user",
      tenantId: "acme",
      keyName: "ci",
      key: userKey,
      tenant: acme
    })
    const viaApiKey = Either.getOrThrow(auth.authenticate({ "api-key": "gw-user-secret" }))
    expect(viaApiKey?.keyId).toBe("key_user")
    // A key whose tenant the registry does not (yet) know still authenticates, without tenant limits.
    expect(Either.getOrThrow(auth.authenticate(bearer("gw-orphan")))?.tenant).toBeUndefined()
  })

  it("authorizes models: all when the key lists none, else only those listed", () => {
    const principal = (models?: ReadonlyArray<string>) =>
      Either.getOrThrow(
        Auth.make(
          registry([keyRecord("s", models === undefined ? {} : { models })], [acme]),
          adminKey
        ).authenticate(bearer("s"))
      )
    expect(Either.isRight(auth.authorizeModel(undefined, "anything"))).toBe(true)
    expect(Either.isRight(auth.authorizeModel(principal(), "anything"))).toBe(true)
    const limited = principal(["small", "large"])
    expect(Either.isRight(auth.authorizeModel(limited, "large"))).toBe(true)
    const error = errorOf(auth.authorizeModel(limited, "huge"))
    expect(error).toMatchObject({ _tag: "Forbidden", code: "model_not_allowed" })
    expect(error.message).toContain("'huge'")
  })
})

describe("Auth.authenticateAdmin", () => {
  const auth = Auth.make(fakeRegistry, adminKey)

  it("accepts the admin key as the admin", () => {
    expect(auth.authenticateAdmin(bearer("the-admin-key"))).toEqual(Either.right("admin"))
    expect(auth.authenticateAdmin({ "api-key": "the-admin-key" })).toEqual(Either.right("admin"))
  })

  it("accepts a key with the admin scope as itself", () => {
    expect(auth.authenticateAdmin(bearer("gw-admin-scoped"))).toEqual(Either.right("key_ops"))
  })

  it("forbids a normal key", () => {
    expect(errorOf(auth.authenticateAdmin(bearer("gw-user-secret")))).toMatchObject({
      _tag: "Forbidden",
      code: "admin_only"
    })
  })

  it("refuses a missing or unknown key as unauthorized", () => {
    expect(errorOf(auth.authenticateAdmin({})).message).toMatch(/^You didn't provide an API key/)
    expect(errorOf(auth.authenticateAdmin(bearer("the-admin-kez"))).message).toMatch(
      /^Incorrect API key provided/
    )
  })

  it("without ADMIN_KEY, says the admin API is disabled to an unknown key; admin-scoped keys still work", () => {
    const noAdmin = Auth.make(fakeRegistry, Option.none())
    const error = errorOf(noAdmin.authenticateAdmin(bearer("the-admin-key")))
    expect(error._tag).toBe("Unauthorized")
    expect(error.message).toMatch(/admin API is disabled/)
    expect(noAdmin.authenticateAdmin(bearer("gw-admin-scoped"))).toEqual(Either.right("key_ops"))
    expect(errorOf(noAdmin.authenticateAdmin(bearer("gw-user-secret")))).toMatchObject({ code: "admin_only" })
  })
})

describe("Auth.layerDisabled", () => {
  it.effect("treats every caller as anonymous, and still guards the admin API with the admin key", () =>
    Effect.gen(function* () {
      const auth = yield* Auth.Auth
      expect(auth.enabled).toBe(false)
      expect(auth.authenticate({})).toEqual(Either.right(undefined))
      expect(auth.authenticate(bearer("gw-whatever"))).toEqual(Either.right(undefined))
      expect(Either.isRight(auth.authorizeModel(undefined, "any"))).toBe(true)
      expect(auth.authenticateAdmin(bearer("the-admin-key"))).toEqual(Either.right("admin"))
      expect(errorOf(auth.authenticateAdmin(bearer("gw-user-secret")))._tag).toBe("Unauthorized")
    }).pipe(Effect.provide(Auth.layerDisabled(adminKey)))
  )
})
