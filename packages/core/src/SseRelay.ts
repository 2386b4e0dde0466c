/**
 * Relays a backend's SSE bytes to the client as they arrive, with back-pressure, and holds back
 * only the end: at `data: [DONE]` (or the end of the body) it waits for `beforeEnd` — the
 * commit of the request's terminal event — before the client gets `[DONE]`, or the event
 * `beforeEnd` gives instead when it could not commit. If the backend breaks off, the client gets
 * one final event from `onBreak` (an OpenAI error) and a clean end, never a `[DONE]`. If the client goes away first, `onClientGone` is told
 * and the backend's body is destroyed, which aborts the upstream request.
 *
 * A `[DONE]` split across two reads is not held back; backends write each event at once, so that
 * would take a TCP segment boundary inside those twelve bytes.
 */
import { Readable } from "node:stream"
import { StreamIdle } from "./Upstream.js"

export interface Hooks {
  /** Sees every chunk before it is forwarded (e.g. an `SseScanner`). */
  readonly onChunk?: (chunk: Uint8Array) => void
  /** Resolves with `undefined` to send the end as is, or with the event to end with instead. */
  readonly beforeEnd?: () => Promise<Uint8Array | undefined>
  /** The event to end with when the backend breaks off; the stream ends once it resolves. */
  readonly onBreak: (cause: unknown) => Promise<Uint8Array> | Uint8Array
  /**
   * The client went away: mid-answer (`true`, called once the backend's answer was drained, see
   * `drainMs`), or while the end was being recorded (`false`; the answer was delivered and is on
   * the books).
   */
  readonly onClientGone?: (midAnswer: boolean) => void
  /** The client went away (called at once, before any draining). */
  readonly onDisconnect?: () => void
  /**
   * After the client went away mid-answer, keep reading the backend's answer (to `onChunk` only)
   * for up to this long — its usage comes last, and what was generated is billed. 0: stop at once.
   */
  readonly drainMs?: number
  /** Rewrites what the client gets (e.g. without the usage chunk it did not ask for). */
  readonly filter?: Filter
  /**
   * The backend breaks off (`onBreak` with a `StreamIdle`) when it sends nothing for this long
   * while the client is reading; a pause the client's back-pressure causes does not count.
   */
  readonly idleMs?: number
}

/** A rewrite of the forwarded bytes that may hold back an incomplete event until the next chunk. */
export interface Filter {
  readonly push: (chunk: Uint8Array) => Uint8Array
  /** What was held back, at the end. */
  readonly flush: () => Uint8Array
}

const done = Buffer.from("data: [DONE]")

/**
 * Where `data: [DONE]` starts an event in `chunk` (at its start, or after a line break), or -1:
 * the same text inside an answer's content (a model may write it) is not the end.
 */
const doneAt = (chunk: Buffer): number => {
  let at = chunk.indexOf(done)
  while (at > 0 && chunk[at - 1] !== 10 /* \n */) at = chunk.indexOf(done, at + done.length)
  return at
}

export const relay = (source: Readable, hooks: Hooks): Readable => {
  /** The backend's part is over: it ended, broke, or we are waiting to send the end. */
  let upstreamOver = false
  let ended = false
  /** The client is gone and the backend's answer is being read to its end (bounded). */
  let draining = false
  let drainTimer: ReturnType<typeof setTimeout> | undefined
  const idleMs = hooks.idleMs ?? 0
  const idleTimer =
    idleMs > 0
      ? setTimeout(function idle() {
          if (upstreamOver || draining) return
          // Paused by the client's back-pressure: the silence is ours, not the backend's.
          if (source.isPaused()) idleTimer!.refresh()
          else source.destroy(new StreamIdle(idleMs))
        }, idleMs)
      : undefined
  const stopDraining = () => {
    if (!draining) return
    draining = false
    upstreamOver = true
    if (drainTimer !== undefined) clearTimeout(drainTimer)
    source.destroy()
    hooks.onClientGone?.(true)
  }
  const out = new Readable({
    read() {
      if (!upstreamOver) source.resume()
    },
    destroy(error, callback) {
      if (!ended) {
        ended = true
        hooks.onDisconnect?.()
        const midAnswer = !upstreamOver
        if (midAnswer && (hooks.drainMs ?? 0) > 0) {
          draining = true
          drainTimer = setTimeout(stopDraining, hooks.drainMs)
          source.resume()
        } else {
          upstreamOver = true
          source.destroy()
          hooks.onClientGone?.(midAnswer)
        }
      }
      callback(error)
    }
  })
  const forward = (chunk: Uint8Array) => {
    const bytes = hooks.filter === undefined ? chunk : hooks.filter.push(chunk)
    return bytes.length === 0 || out.push(bytes)
  }
  if (idleTimer !== undefined) source.once("close", () => clearTimeout(idleTimer))
  const end = (last: Uint8Array | undefined) => {
    if (ended) return
    ended = true
    const held = hooks.filter?.flush()
    if (held !== undefined && held.length > 0) out.push(held)
    if (last !== undefined && last.length > 0) out.push(last)
    out.push(null)
  }
  const finish = (tail: Uint8Array | undefined) => {
    upstreamOver = true
    if (hooks.beforeEnd === undefined) return end(tail)
    // A hook that could not run (its runtime shut down) must neither hang the stream nor crash the
    // process: the answer ends without its tail (`[DONE]`), which tells the client it is not whole.
    hooks.beforeEnd().then(
      (instead) => end(instead ?? tail),
      () => end(undefined)
    )
  }
  source.on("data", (chunk: Buffer) => {
    if (upstreamOver) return
    idleTimer?.refresh()
    const at = doneAt(chunk)
    const head = at === -1 ? chunk : chunk.subarray(0, at)
    if (draining) {
      if (head.length > 0) hooks.onChunk?.(head)
      if (at !== -1) stopDraining()
      return
    }
    if (head.length > 0) {
      hooks.onChunk?.(head)
      if (!forward(head)) source.pause()
    }
    if (at !== -1) finish(chunk.subarray(at))
  })
  source.once("end", () => {
    if (draining) stopDraining()
    else if (!upstreamOver) finish(undefined)
  })
  source.once("error", (cause) => {
    if (draining) return stopDraining()
    if (upstreamOver) return
    upstreamOver = true
    Promise.resolve(hooks.onBreak(cause)).then(end, () => end(undefined))
  })
  return out
}
