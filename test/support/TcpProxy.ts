/**
 * A TCP proxy on a loopback port in front of a service (PostgreSQL), for tests that take the
 * service away without touching it: `pause` drops every open connection and stops listening (new
 * connections are refused), `resume` listens again on the same port. Closed with its scope.
 */
import * as Net from "node:net"
import { Effect, type Scope } from "effect"
import { freePort } from "./Processes.js"

export interface TcpProxy {
  /** The loopback port clients connect to. */
  readonly port: number
  /** Destroys every open connection (both sides) and refuses new ones until `resume`. */
  readonly pause: Effect.Effect<void>
  /** Listens again on the same port. */
  readonly resume: Effect.Effect<void>
  /** Client connections currently open through the proxy. */
  readonly open: () => number
}

/** Starts a proxy from a free loopback port to `target`; stopped when the scope closes. */
export const make = (target: {
  readonly host: string
  readonly port: number
}): Effect.Effect<TcpProxy, never, Scope.Scope> =>
  Effect.gen(function* () {
    const port = yield* freePort
    /** How to drop each open connection (client and upstream sockets together). */
    const connections = new Set<() => void>()
    let server: Net.Server | undefined

    const forward = (client: Net.Socket) => {
      const upstream = Net.connect(target.port, target.host)
      const drop = () => {
        client.destroy()
        upstream.destroy()
        connections.delete(drop)
      }
      connections.add(drop)
      client.on("error", drop).on("close", drop)
      upstream.on("error", drop).on("close", drop)
      client.pipe(upstream)
      upstream.pipe(client)
    }

    const listen = Effect.async<void>((resume) => {
      const s = Net.createServer(forward)
      s.once("error", (error) => resume(Effect.die(error)))
      s.listen(port, "127.0.0.1", () => {
        server = s
        resume(Effect.void)
      })
    })

    const pause = Effect.async<void>((resume) => {
      const s = server
      server = undefined
      for (const drop of Array.from(connections)) drop()
      if (s === undefined) resume(Effect.void)
      else s.close(() => resume(Effect.void))
    })

    yield* Effect.acquireRelease(listen, () => pause)
    return {
      port,
      pause,
      resume: listen,
      open: () => connections.size
    }
  })
