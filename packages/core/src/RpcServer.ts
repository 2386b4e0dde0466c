/**
 * The internal RPC API (`RpcApi.GatewayRpcs`) as an HTTP app, mounted by the gateway's HTTP
 * server at `POST /rpc`. NDJSON both ways: a streamed call's chunks go out as they are produced
 * (the JSON serialization would hold them until the call ends).
 */
import type { HttpApp } from "@effect/platform"
import { RpcSerialization, RpcServer as Server } from "@effect/rpc"
import { RpcApi } from "@gateway/domain"
import { Context, Effect, Layer, type Scope } from "effect"
import * as RpcCompletions from "./RpcCompletions.js"
import * as RpcHandlers from "./RpcHandlers.js"

/** Where the gateway's HTTP server mounts the RPC API. */
export const path = "/rpc"

export class RpcServer extends Context.Tag("@gateway/core/RpcServer")<
  RpcServer,
  {
    /** Answers one `POST /rpc` (a batch of calls from one client, NDJSON). */
    readonly app: HttpApp.Default<never, Scope.Scope>
  }
>() {}

/** The RPC server, running in the layer's scope, with every handler. */
export const layer = Layer.scoped(
  RpcServer,
  Effect.map(Server.toHttpApp(RpcApi.GatewayRpcs, { spanPrefix: "Rpc" }), (app) => RpcServer.of({ app }))
).pipe(Layer.provide([RpcHandlers.adminLayer, RpcCompletions.layer, RpcSerialization.layerNdjson]))
