/**
 * A simulated vLLM-like OpenAI-compatible backend for tests, benchmarks and the demo: an Effect API
 * (`make`, `layer`) whose server lives as long as its scope, and a Promise API (`start`) for scripts.
 */
import * as Context from "effect/Context"
import * as Effect from "effect/Effect"
import * as Layer from "effect/Layer"
import type * as Scope from "effect/Scope"
import { BackendSimError } from "./BackendSimError.js"
import type * as SimConfig from "./SimConfig.js"
import * as SimServer from "./SimServer.js"

export { BackendSimError } from "./BackendSimError.js"
export type { SimStats } from "./SimServer.js"

/** A running simulated backend. */
export interface BackendSim {
  readonly port: number
  /** Base URL, e.g. `http://127.0.0.1:9001`; the OpenAI base URL is `${url}/v1`. */
  readonly url: string
  readonly stats: Effect.Effect<SimServer.SimStats>
  readonly options: Effect.Effect<SimConfig.SimOptions>
  /** Changes latencies, output length and faults for the requests that arrive from now on. */
  readonly update: (patch: SimConfig.SimOptionsPatch) => Effect.Effect<SimConfig.SimOptions, BackendSimError>
  /** `true` closes the listener so clients get ECONNREFUSED; `false` listens again on the same port. */
  readonly setRefusing: (refusing: boolean) => Effect.Effect<void, BackendSimError>
}

/** The running simulator as a service, for tests that start one with `layer`. */
export const BackendSim = Context.GenericTag<BackendSim>("@gateway/backend-sim/BackendSim")

/** A simulator controlled with Promises, for scripts that do not run Effect (benchmarks). */
export type Handle = SimServer.SimServer

const toError = (error: unknown): BackendSimError =>
  error instanceof BackendSimError
    ? error
    : new BackendSimError({
        reason: "Listen",
        detail: error instanceof Error ? error.message : String(error)
      })

/** Starts a simulator; it stops listening and drops its connections when the scope closes. */
export const make = (
  options: SimConfig.SimOptionsPatch = {}
): Effect.Effect<BackendSim, BackendSimError, Scope.Scope> =>
  Effect.acquireRelease(
    Effect.tryPromise({ try: () => SimServer.start(options), catch: toError }),
    (server) => Effect.promise(() => server.close())
  ).pipe(
    Effect.map(
      (server): BackendSim => ({
        port: server.port,
        url: server.url,
        stats: Effect.sync(() => server.stats()),
        options: Effect.sync(() => server.options()),
        update: (patch) =>
          Effect.tryPromise({ try: () => server.update(patch), catch: toError }).pipe(
            Effect.withSpan("BackendSim.update")
          ),
        setRefusing: (refusing) =>
          Effect.tryPromise({ try: () => server.setRefusing(refusing), catch: toError }).pipe(
            Effect.withSpan("BackendSim.setRefusing", { attributes: { refusing } })
          )
      })
    ),
    Effect.withSpan("BackendSim.make")
  )

/** Provides a `BackendSim` that runs for the lifetime of the layer. */
export const layer = (options: SimConfig.SimOptionsPatch = {}): Layer.Layer<BackendSim, BackendSimError> =>
  Layer.scoped(BackendSim, make(options))

/** Starts a simulator without Effect; call `close()` when done. */
export const start = (options: SimConfig.SimOptionsPatch = {}): Promise<Handle> => SimServer.start(options)
