/**
 * An HTTP proxy put between the gateway and a backend that keeps a copy of every request it
 * forwards, so a test can see what the backend received (the simulator does not tell).
 */
import * as Http from "node:http"
import { Effect, type Scope } from "effect"

export interface RecordedRequest {
  readonly method: string
  readonly path: string
  readonly headers: Http.IncomingHttpHeaders
  readonly body: string
}

export interface RecordingProxy {
  readonly url: string
  readonly requests: ReadonlyArray<RecordedRequest>
}

/** Listens on a loopback port and forwards everything to `target` (e.g. `http://127.0.0.1:9001`). */
export const make = (target: string): Effect.Effect<RecordingProxy, never, Scope.Scope> =>
  Effect.acquireRelease(
    Effect.async<{ readonly server: Http.Server; readonly proxy: RecordingProxy }>((resume) => {
      const requests: Array<RecordedRequest> = []
      const server = Http.createServer((req, res) => {
        const chunks: Array<Buffer> = []
        req.on("data", (chunk: Buffer) => chunks.push(chunk))
        req.on("end", () => {
          const body = Buffer.concat(chunks)
          const path = req.url ?? "/"
          requests.push({ method: req.method ?? "", path, headers: req.headers, body: body.toString("utf8") })
          const upstream = Http.request(
            new URL(path, target),
            { method: req.method ?? "GET", headers: req.headers },
            (answer) => {
              res.writeHead(answer.statusCode ?? 502, answer.headers)
              answer.pipe(res)
            }
          )
          upstream.on("error", () => res.destroy())
          // The client went away: drop the upstream request too, as the gateway would.
          res.on("close", () => upstream.destroy())
          upstream.end(body)
        })
      })
      server.listen(0, "127.0.0.1", () => {
        const address = server.address()
        const port = typeof address === "object" && address !== null ? address.port : 0
        resume(Effect.succeed({ server, proxy: { url: `http://127.0.0.1:${port}`, requests } }))
      })
    }),
    ({ server }) =>
      Effect.async<void>((resume) => {
        server.close(() => resume(Effect.void))
        server.closeAllConnections()
      })
  ).pipe(Effect.map(({ proxy }) => proxy))
