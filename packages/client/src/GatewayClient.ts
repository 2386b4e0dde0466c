/**
 * The typed client of the gateway's internal RPC API: `GatewayClient` is an Effect service whose
 * methods are the API's calls (`client.Keys.create(...)`, `client.ChatCompletion(...)` …), each
 * failing with the typed errors that call declares, or `RpcClientError` when the gateway cannot
 * be reached. It speaks NDJSON over HTTP to `<url>/rpc` (streamed calls arrive chunk by chunk)
 * with the key as its bearer token, over the global `fetch`.
 */
import { FetchHttpClient, HttpClient, HttpClientRequest } from "@effect/platform"
import { RpcClient, type RpcClientError, RpcSerialization } from "@effect/rpc"
import { RpcApi } from "@gateway/domain"
import { Config, Context, Effect, Layer, Redacted } from "effect"

/** The client's calls, grouped as the API names them (`Keys.create` is `client.Keys.create`). */
export type Client = RpcClient.FromGroup<typeof RpcApi.GatewayRpcs, RpcClientError.RpcClientError>

export class GatewayClient extends Context.Tag("@gateway/client/GatewayClient")<GatewayClient, Client>() {}

export interface Options {
  /** The gateway's base URL (`http://127.0.0.1:8080`); the API is at `<url>/rpc`. */
  readonly url: string
  /** A service key (`internal` scope), an `admin`-scoped key, or the admin key. */
  readonly key: string | Redacted.Redacted<string>
}

/** `<url>/rpc`, absolute (a relative URL cannot be sent). */
export const rpcUrl = (url: string): string => new URL("rpc", url.endsWith("/") ? url : `${url}/`).toString()

/** The client on whatever `HttpClient` is provided (e.g. one with a proxy or a timeout). */
export const layerHttpClient = (options: Options): Layer.Layer<GatewayClient, never, HttpClient.HttpClient> =>
  Layer.scoped(GatewayClient, RpcClient.make(RpcApi.GatewayRpcs)).pipe(
    Layer.provide(
      RpcClient.layerProtocolHttp({
        url: rpcUrl(options.url),
        transformClient: HttpClient.mapRequest(
          HttpClientRequest.bearerToken(
            typeof options.key === "string" ? options.key : Redacted.value(options.key)
          )
        )
      })
    ),
    Layer.provide(RpcSerialization.layerNdjson)
  )

/** The client over the global `fetch`. */
export const layer = (options: Options): Layer.Layer<GatewayClient> =>
  layerHttpClient(options).pipe(Layer.provide(FetchHttpClient.layer))

/** The client from `GATEWAY_URL` and `GATEWAY_KEY`. */
export const layerConfig = (
  config: Config.Config.Wrap<Options> = {
    url: Config.string("GATEWAY_URL"),
    key: Config.redacted("GATEWAY_KEY")
  }
) => Layer.unwrapEffect(Effect.map(Config.unwrap(config), layer))
