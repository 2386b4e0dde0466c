/**
 * The running gateway as the operator commands reach it: the typed client of its internal RPC
 * API (`@gateway/client`) at `--url`, with the admin key as bearer token. The API's typed errors
 * reach the command as they are (their message is what the operator reads); a gateway that cannot
 * be reached, or answers something else than the API, is a `GatewayError` saying why. The admin
 * key never appears in a message.
 */
import { HttpClient, type HttpClientError } from "@effect/platform"
import { NodeHttpClient } from "@effect/platform-node"
import { GatewayClient } from "@gateway/client"
import { Context, Duration, Effect, Layer, Predicate, type Redacted, Schema } from "effect"

/** Why the gateway could not answer; `message` is for the operator. */
export class GatewayError extends Schema.TaggedError<GatewayError>()("GatewayError", {
  reason: Schema.Literal(
    /** Nothing answered at the URL (refused, unknown host, timeout), or not the RPC API. */
    "Unreachable",
    /** No admin key was given. */
    "NoAdminKey"
  ),
  message: Schema.String
}) {}

/** Where the gateway is and the key its calls are made with. */
export interface Connection {
  /** The gateway's base URL, e.g. `http://127.0.0.1:8080`. */
  readonly url: string
  readonly adminKey: Redacted.Redacted<string>
}

export class Gateway extends Context.Tag("@gateway/cli/Gateway")<
  Gateway,
  {
    /** The gateway's base URL, for messages. */
    readonly url: string
    readonly client: GatewayClient.Client
  }
>() {}

/** The client's own failure (`RpcClientError` of `@effect/rpc`): the call did not get through. */
interface RpcClientError {
  readonly _tag: "RpcClientError"
  readonly message: string
  readonly cause?: unknown
}

/** How long one call may take before the gateway counts as unreachable. */
export const requestTimeout = Duration.seconds(30)

/** The `code` of a Node system error somewhere in a chain of causes (`ECONNREFUSED` …). */
const systemCode = (error: unknown): string | undefined => {
  for (
    let e = error, depth = 0;
    Predicate.isObject(e) && depth < 6;
    e = (e as { cause?: unknown }).cause, depth++
  ) {
    const code = (e as { code?: unknown }).code
    if (typeof code === "string") return code
  }
  return undefined
}

const isHttpClientError = (u: unknown): u is HttpClientError.HttpClientError =>
  Predicate.isTagged(u, "RequestError") || Predicate.isTagged(u, "ResponseError")

/** Why a call did not get through, said for the operator. */
export const unreachable = (url: string, error: RpcClientError): GatewayError => {
  const cause = error.cause
  if (!isHttpClientError(cause)) {
    return new GatewayError({
      reason: "Unreachable",
      message: `the gateway at ${url} answered something else than its RPC API (${error.message})`
    })
  }
  if (cause._tag === "RequestError" && cause.reason === "InvalidUrl") {
    return new GatewayError({ reason: "Unreachable", message: `'${url}' is not a valid gateway URL.` })
  }
  if (cause._tag === "ResponseError" && cause.reason === "StatusCode") {
    return new GatewayError({
      reason: "Unreachable",
      message: `the gateway at ${url} answered HTTP ${cause.response.status} at /rpc (is it a gateway with the internal RPC API?)`
    })
  }
  const code = systemCode(cause.cause)
  const why =
    code === "ECONNREFUSED"
      ? "connection refused (is the gateway running there? set --url or GATEWAY_URL)"
      : code === "ENOTFOUND" || code === "EAI_AGAIN"
        ? "host not found"
        : code !== undefined
          ? code
          : String((cause.cause as { message?: unknown } | undefined)?.message ?? cause.reason)
  return new GatewayError({ reason: "Unreachable", message: `cannot reach the gateway at ${url}: ${why}` })
}

/**
 * The client over an undici agent of its own, closed with the layer's scope (the global one of
 * `fetch` would keep the gateway's keep-alive connection, and so the CLI process, open); an
 * answer that is not 2xx fails the call instead of being read as the API's.
 */
export const layer = (connection: Connection): Layer.Layer<Gateway> => {
  const url = connection.url.replace(/\/+$/, "")
  return Layer.effect(
    Gateway,
    Effect.map(GatewayClient.GatewayClient, (client) => Gateway.of({ url, client }))
  ).pipe(
    Layer.provide(GatewayClient.layerHttpClient({ url, key: connection.adminKey })),
    Layer.provide(
      Layer.effect(HttpClient.HttpClient, Effect.map(HttpClient.HttpClient, HttpClient.filterStatusOk))
    ),
    Layer.provide(NodeHttpClient.layerUndici)
  )
}

/**
 * One call of the gateway's client: its typed errors as they are, a transport failure or no
 * answer within `timeout` a `GatewayError`.
 */
export const call = <A, E>(
  f: (client: GatewayClient.Client) => Effect.Effect<A, E>,
  timeout: Duration.DurationInput = requestTimeout
): Effect.Effect<A, Exclude<E, RpcClientError> | GatewayError, Gateway> =>
  Effect.flatMap(Gateway, ({ url, client }) =>
    f(client).pipe(
      Effect.catchIf(
        (error): error is Extract<E, RpcClientError> => Predicate.isTagged(error, "RpcClientError"),
        (error) => Effect.fail(unreachable(url, error as RpcClientError))
      ),
      Effect.timeoutFail({
        duration: timeout,
        onTimeout: () =>
          new GatewayError({
            reason: "Unreachable",
            message: `the gateway at ${url} did not answer within ${Duration.format(timeout)}`
          })
      })
    )
  ) as Effect.Effect<A, Exclude<E, RpcClientError> | GatewayError, Gateway>
