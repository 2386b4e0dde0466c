/**
 * The typed client for callers not on Effect: the same calls as `GatewayClient`, as async
 * functions (`await gateway.keys.create({...})`) and, for a streamed completion, an async
 * iterable of chunks. A failed call rejects with the typed error itself (`error._tag` is
 * `"Unauthorized"`, `"InvalidRequest"` …, and it is an `Error`), never a wrapper. `close()` ends
 * the client's connections.
 */
import type { OpenAi, RpcSchemas } from "@gateway/domain"
import { Cause, Effect, Exit, ManagedRuntime, Runtime, Stream } from "effect"
import { type Client, GatewayClient, layer, type Options } from "./GatewayClient.js"

/** A call of the Effect client as an async function. */
type Promised<F> = F extends (input: infer I, ...rest: ReadonlyArray<any>) => Effect.Effect<infer A, any, any>
  ? // biome-ignore lint/suspicious/noConfusingVoidType: a call without a payload takes `void`
    (...input: [I] extends [void] ? [] : [input: I]) => Promise<A>
  : never

type Namespace<T> = { readonly [K in keyof T]: Promised<T[K]> }

export interface PromiseClient {
  readonly keys: Namespace<Client["Keys"]>
  readonly tenants: Namespace<Client["Tenants"]>
  readonly usage: Namespace<Client["Usage"]>
  readonly backends: Namespace<Client["Backends"]>
  readonly projections: Namespace<Client["Projections"]>
  readonly events: Namespace<Client["Events"]>
  /** `list`, `get`, `retry` (`{ requestId }` or `{ filter }`), `discard`: the dead-letter queue. */
  readonly deadLetters: Namespace<Client["DeadLetters"]>
  readonly chat: {
    /**
     * A streamed completion: its chunks as they arrive (the first with `gateway_request_id`);
     * breaking out of the loop cancels it.
     */
    readonly stream: (request: OpenAi.ChatCompletionRequest) => AsyncIterable<RpcSchemas.CompletionChunk>
    /** A whole completion, with `gateway_request_id`. A failure's error has it as `requestId`. */
    readonly create: (request: OpenAi.ChatCompletionRequest) => Promise<RpcSchemas.Completion>
  }
  /** Ends the client (open calls are interrupted). */
  readonly close: () => Promise<void>
}

/** The error a failed call rejects with: the typed error when there is one, else the defect. */
const failure = (cause: Cause.Cause<unknown>): unknown => Cause.squash(cause)

/** A client of the gateway at `url` calling with `key`. */
export const createGatewayClient = (options: Options): PromiseClient => {
  const runtime = ManagedRuntime.make(layer(options))

  const run = <A, E>(effect: Effect.Effect<A, E, GatewayClient>): Promise<A> =>
    runtime.runPromiseExit(effect).then((exit) => {
      if (Exit.isSuccess(exit)) return exit.value
      throw failure(exit.cause)
    })

  const namespace = <
    N extends "Keys" | "Tenants" | "Usage" | "Backends" | "Projections" | "Events" | "DeadLetters"
  >(
    name: N
  ): Namespace<Client[N]> =>
    new Proxy({} as Namespace<Client[N]>, {
      get: (_, method) =>
        typeof method !== "string"
          ? undefined
          : (input?: unknown) =>
              run(
                Effect.flatMap(GatewayClient, (client) => {
                  const call = (client[name] as Record<string, unknown>)[method]
                  return typeof call === "function"
                    ? (call(input) as Effect.Effect<unknown, unknown>)
                    : Effect.dieMessage(`There is no call ${name}.${method}.`)
                })
              )
    })

  const stream = (request: OpenAi.ChatCompletionRequest): AsyncIterable<RpcSchemas.CompletionChunk> => ({
    async *[Symbol.asyncIterator]() {
      const chunks = Stream.toAsyncIterableRuntime(
        Stream.unwrap(Effect.map(GatewayClient, (client) => client.ChatCompletion(request))),
        await runtime.runtime()
      )
      try {
        yield* chunks
      } catch (error) {
        // The typed error, not the FiberFailure around it.
        throw Runtime.isFiberFailure(error) ? failure(error[Runtime.FiberFailureCauseId]) : error
      }
    }
  })

  return {
    keys: namespace("Keys"),
    tenants: namespace("Tenants"),
    usage: namespace("Usage"),
    backends: namespace("Backends"),
    projections: namespace("Projections"),
    events: namespace("Events"),
    deadLetters: namespace("DeadLetters"),
    chat: {
      stream,
      create: (request) => run(Effect.flatMap(GatewayClient, (client) => client.ChatCompletionOnce(request)))
    },
    close: () => runtime.dispose()
  }
}
