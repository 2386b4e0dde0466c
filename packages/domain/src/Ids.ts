import { Schema } from "effect"

/** Identifies one request end to end: logs, headers, and (later) its event stream `request-<id>`. */
export const RequestId = Schema.String.pipe(
  Schema.pattern(/^[A-Za-z0-9._:-]{1,128}$/),
  Schema.brand("@gateway/RequestId")
)
export type RequestId = typeof RequestId.Type

/** The public name of a model as clients send it in the `model` field. */
export const ModelName = Schema.NonEmptyTrimmedString.pipe(Schema.brand("@gateway/ModelName"))
export type ModelName = typeof ModelName.Type

/** A configured backend replica, unique across the whole config. */
export const BackendId = Schema.String.pipe(
  Schema.pattern(/^[A-Za-z0-9._-]{1,64}$/),
  Schema.brand("@gateway/BackendId")
)
export type BackendId = typeof BackendId.Type

const isRequestId = Schema.is(RequestId)

/** A fresh request id. The gateway always makes its own: ids clients send need not be unique. */
export const newRequestId = (): RequestId => RequestId.make(crypto.randomUUID(), { disableValidation: true })

/** A client's `x-request-id` when it is well-formed (safe to echo and log), else `undefined`. */
export const clientRequestId = (header: string | undefined): string | undefined =>
  header !== undefined && isRequestId(header) ? header : undefined

/** A tenant (organisation) that owns API keys; usage and budgets roll up to it. */
export const TenantId = Schema.String.pipe(
  Schema.pattern(/^[A-Za-z0-9._-]{1,64}$/),
  Schema.brand("@gateway/TenantId")
)
export type TenantId = typeof TenantId.Type

/** An API key's public id (never the secret); its events live on the stream `key-<id>`. */
export const KeyId = Schema.String.pipe(
  Schema.pattern(/^[A-Za-z0-9._-]{1,64}$/),
  Schema.brand("@gateway/KeyId")
)
export type KeyId = typeof KeyId.Type
