/**
 * Who is calling: the API key from `Authorization: Bearer <key>` (or `api-key: <key>`, as Azure
 * OpenAI clients send it), looked up by its hash in the key registry. A missing, unknown or
 * revoked key is a 401; a key calling a model it may not use is a 403. The admin key
 * (`ADMIN_KEY`) — or any key with the `admin` scope — opens the admin routes.
 *
 * With auth off (a benchmark's baseline only) every caller is anonymous and unlimited.
 */
import { createHash, timingSafeEqual } from "node:crypto"
import { Errors, type Ids, type Tenancy } from "@gateway/domain"
import { Context, Effect, Either, Layer, Option, Redacted } from "effect"
import { hashSecret, type KeyRecord, KeyRegistry, type TenantRecord } from "./KeyRegistry.js"

/** An authenticated caller. */
export interface Principal {
  readonly keyId: Ids.KeyId
  readonly tenantId: Ids.TenantId
  readonly keyName: string
  readonly key: KeyRecord
  readonly tenant: TenantRecord | undefined
}

/** The admin, when authenticated with `ADMIN_KEY` rather than a key of the registry. */
export const admin = "admin" as const

export class Auth extends Context.Tag("@gateway/core/Auth")<
  Auth,
  {
    /** `false` when auth is off: requests are anonymous. */
    readonly enabled: boolean
    /** The caller of an API route. */
    readonly authenticate: (
      headers: Readonly<Record<string, string | undefined>>
    ) => Either.Either<Principal | undefined, Errors.Unauthorized>
    /** May this caller use `model`? */
    readonly authorizeModel: (
      principal: Principal | undefined,
      model: string
    ) => Either.Either<void, Errors.Forbidden>
    /** The caller of an admin route: the admin, or a key with the `admin` scope (its id). */
    readonly authenticateAdmin: (
      headers: Readonly<Record<string, string | undefined>>
    ) => Either.Either<string, Errors.Unauthorized | Errors.Forbidden>
  }
>() {}

/** The secret a client sent, if any. */
export const secretOf = (headers: Readonly<Record<string, string | undefined>>): string | undefined => {
  const authorization = headers.authorization
  if (authorization !== undefined) {
    const space = authorization.indexOf(" ")
    if (space > 0 && authorization.slice(0, space).toLowerCase() === "bearer") {
      const secret = authorization.slice(space + 1).trim()
      if (secret.length > 0) return secret
    }
    return undefined
  }
  const apiKey = headers["api-key"]?.trim()
  return apiKey === undefined || apiKey.length === 0 ? undefined : apiKey
}

const missing = new Errors.Unauthorized({
  message:
    "You didn't provide an API key. You need to provide your API key in an Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
})
const invalid = new Errors.Unauthorized({
  message: "Incorrect API key provided. You can find your API keys with your gateway's administrator."
})
const revoked = new Errors.Unauthorized({ message: "This API key has been revoked." })
const noAdmin = new Errors.Unauthorized({
  message: "The admin API is disabled: the gateway was started without ADMIN_KEY."
})

const digest = (secret: string) => createHash("sha256").update(secret).digest()

const allows = (key: KeyRecord, scope: Tenancy.Scope) => key.scopes.includes(scope)

/** Auth over the registry's lookups (what `make` needs of it). */
export const make = (
  registry: Pick<KeyRegistry, "byHash" | "tenant">,
  adminKey: Option.Option<Redacted.Redacted<string>>
): Auth["Type"] => {
  const adminDigest = Option.map(adminKey, (k) => digest(Redacted.value(k)))
  const authenticate = (
    headers: Readonly<Record<string, string | undefined>>
  ): Either.Either<Principal, Errors.Unauthorized> => {
    const secret = secretOf(headers)
    if (secret === undefined) return Either.left(missing)
    const key = registry.byHash(hashSecret(secret))
    if (key === undefined) return Either.left(invalid)
    if (key.revoked !== null) return Either.left(revoked)
    return Either.right<Principal>({
      keyId: key.keyId,
      tenantId: key.tenantId,
      keyName: key.name,
      key,
      tenant: registry.tenant(key.tenantId)
    })
  }
  return {
    enabled: true,
    authenticate,
    authorizeModel: (principal, model) =>
      principal === undefined || principal.key.models === null || principal.key.models.has(model)
        ? Either.void
        : Either.left(
            new Errors.Forbidden({
              message: `This API key may not use the model '${model}'.`,
              code: "model_not_allowed"
            })
          ),
    authenticateAdmin: (headers) => {
      const secret = secretOf(headers)
      if (secret === undefined) return Either.left(missing)
      // Constant time: a comparison that stops at the first wrong byte would leak the admin key.
      if (Option.isSome(adminDigest) && timingSafeEqual(digest(secret), adminDigest.value)) {
        return Either.right(admin)
      }
      const caller = authenticate(headers)
      if (Either.isLeft(caller)) return Either.left(Option.isNone(adminDigest) ? noAdmin : caller.left)
      return allows(caller.right.key, "admin")
        ? Either.right(caller.right.keyId)
        : Either.left(
            new Errors.Forbidden({ message: "This API key may not use the admin API.", code: "admin_only" })
          )
    }
  }
}

/** Keys from the registry; the admin key from `adminKey` (none: only `admin`-scoped keys). */
export const layer = (
  adminKey: Option.Option<Redacted.Redacted<string>>
): Layer.Layer<Auth, never, KeyRegistry> =>
  Layer.effect(
    Auth,
    Effect.map(KeyRegistry, (registry) => make(registry, adminKey))
  )

/** Auth off: every caller anonymous and unlimited; admin routes still need the admin key. */
export const layerDisabled = (adminKey: Option.Option<Redacted.Redacted<string>>): Layer.Layer<Auth> =>
  Layer.succeed(Auth, {
    ...make({ byHash: () => undefined, tenant: () => undefined }, adminKey),
    enabled: false,
    authenticate: () => Either.right(undefined)
  })
