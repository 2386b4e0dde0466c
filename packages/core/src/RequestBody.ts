/**
 * Reads a request body into memory under a byte limit: a declared `content-length` over the limit
 * is refused before reading; a chunked body that crosses the limit is read to its end and thrown
 * away (up to `drainLimitBytes`) so the client, still sending, receives the 413 rather than a
 * reset connection.
 */
import type { HttpServerRequest } from "@effect/platform"
import { NodeHttpServerRequest } from "@effect/platform-node"
import { Errors } from "@gateway/domain"
import { Effect } from "effect"

/** How much of an oversized chunked body is drained before giving up on the connection. */
const drainLimitBytes = 16 * 1024 * 1024

export const read = (
  request: HttpServerRequest.HttpServerRequest,
  limitBytes: number
): Effect.Effect<Uint8Array, Errors.PayloadTooLarge | Errors.InvalidRequest> => {
  const declared = request.headers["content-length"]
  if (declared !== undefined && Number(declared) > limitBytes) {
    return Effect.fail(new Errors.PayloadTooLarge({ limitBytes }))
  }
  const source = NodeHttpServerRequest.toIncomingMessage(request)
  return Effect.async<Uint8Array, Errors.PayloadTooLarge | Errors.InvalidRequest>((resume) => {
    const chunks: Array<Buffer> = []
    let size = 0
    const cleanup = () => {
      source.off("data", onData)
      source.off("end", onEnd)
      source.off("error", onError)
    }
    const onData = (chunk: Buffer) => {
      size += chunk.length
      if (size <= limitBytes) {
        chunks.push(chunk)
      } else if (size > limitBytes + drainLimitBytes) {
        cleanup()
        source.pause()
        resume(Effect.fail(new Errors.PayloadTooLarge({ limitBytes })))
      } else {
        chunks.length = 0
      }
    }
    const onEnd = () => {
      cleanup()
      resume(
        size > limitBytes
          ? Effect.fail(new Errors.PayloadTooLarge({ limitBytes }))
          : Effect.succeed(chunks.length === 1 ? chunks[0]! : Buffer.concat(chunks, size))
      )
    }
    const onError = (error: Error) => {
      cleanup()
      resume(
        Effect.fail(
          new Errors.InvalidRequest({
            message: `Could not read the request body: ${error.message}`,
            param: null,
            code: null
          })
        )
      )
    }
    source.on("data", onData)
    source.on("end", onEnd)
    source.on("error", onError)
    return Effect.sync(cleanup)
  })
}
