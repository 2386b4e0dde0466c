/**
 * Relays a backend's SSE bytes to the client as they arrive, with back-pressure. If the backend
 * breaks off, the client gets one final event from `onBreak` (an OpenAI error) and a clean end;
 * if the client goes away (the relay is destroyed first), `onClientGone` is told and the backend's
 * body is destroyed too, which aborts the upstream request.
 */
import { Readable } from "node:stream"

export const relay = (
  source: Readable,
  onBreak: (cause: unknown) => Uint8Array,
  onClientGone: () => void = () => {}
): Readable => {
  let finished = false
  const out = new Readable({
    read() {
      if (!finished) source.resume()
    },
    destroy(error, callback) {
      if (!finished) {
        finished = true
        source.destroy()
        onClientGone()
      }
      callback(error)
    }
  })
  source.on("data", (chunk: Buffer) => {
    if (!out.push(chunk)) source.pause()
  })
  source.once("end", () => {
    finished = true
    out.push(null)
  })
  source.once("error", (cause) => {
    if (finished) return
    finished = true
    out.push(onBreak(cause))
    out.push(null)
  })
  return out
}
