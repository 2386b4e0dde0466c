/**
 * A durable local spool for events the database cannot take right now: stream writes appended as
 * JSON lines to segment files, each append fsynced before the writers are told their events are
 * safe. Segments are drained oldest first and deleted once in the database; a drain that stops
 * half-way is safe to repeat, because appends skip events whose id is already stored.
 * Owned by the event writer's fiber: nothing else reads or writes it.
 */
import * as Fs from "node:fs"
import * as Path from "node:path"
import { Effect, Schema } from "effect"
import type { StreamWrite } from "./EventStore.js"

export class SpoolError extends Schema.TaggedError<SpoolError>()("SpoolError", {
  detail: Schema.String
}) {
  override get message() {
    return `Event spool failed: ${this.detail}`
  }
}

/** Segments roll over at this size, so a drain never has to hold a long outage in memory. */
const segmentBytes = 16 * 1024 * 1024

const segmentName = (n: number) => `events-${String(n).padStart(10, "0")}.ndjson`

export interface Spool {
  readonly dir: string
  /** Bytes waiting, across all segments. */
  readonly bytes: () => number
  readonly isEmpty: () => boolean
  /** Appends and fsyncs; when it succeeds the writes survive a crash. */
  readonly append: (writes: ReadonlyArray<StreamWrite>) => Effect.Effect<void, SpoolError>
  /** The oldest segment's writes, in order, or `undefined` when empty. */
  readonly oldest: () => Effect.Effect<
    { readonly name: string; readonly writes: ReadonlyArray<StreamWrite> } | undefined,
    SpoolError
  >
  /** Deletes a drained segment. */
  readonly remove: (name: string) => Effect.Effect<void, SpoolError>
}

const attempt = <A>(what: string, f: () => A) =>
  Effect.try({ try: f, catch: (cause) => new SpoolError({ detail: `${what}: ${(cause as Error).message}` }) })

export const make = (dir: string): Effect.Effect<Spool, SpoolError> =>
  attempt("open", () => {
    Fs.mkdirSync(dir, { recursive: true })
    const segments = Fs.readdirSync(dir)
      .filter((f) => /^events-\d{10}\.ndjson$/.test(f))
      .sort()
      .filter((f) => {
        // A segment opened but never written to is left over from a crash: nothing to keep.
        const empty = Fs.statSync(Path.join(dir, f)).size === 0
        if (empty) Fs.rmSync(Path.join(dir, f))
        return !empty
      })
    let bytes = segments.reduce((sum, f) => sum + Fs.statSync(Path.join(dir, f)).size, 0)
    let next = segments.length === 0 ? 1 : Number(segments[segments.length - 1]!.slice(7, 17)) + 1
    /** The segment being appended to, and its size. */
    let current: { name: string; fd: number; size: number } | undefined

    const open = () => {
      const name = segmentName(next++)
      current = { name, fd: Fs.openSync(Path.join(dir, name), "a"), size: 0 }
      return current
    }
    const close = () => {
      if (current !== undefined) Fs.closeSync(current.fd)
      current = undefined
    }

    const append = (writes: ReadonlyArray<StreamWrite>) =>
      attempt("append", () => {
        const segment = current !== undefined && current.size < segmentBytes ? current : (close(), open())
        const text = writes.map((w) => `${JSON.stringify(w)}\n`).join("")
        Fs.writeSync(segment.fd, text)
        Fs.fsyncSync(segment.fd)
        segment.size += Buffer.byteLength(text)
        bytes += Buffer.byteLength(text)
      })

    const names = () =>
      Fs.readdirSync(dir)
        .filter((f) => /^events-\d{10}\.ndjson$/.test(f))
        .sort()

    const oldest = () =>
      attempt("read", () => {
        const name = names()[0]
        if (name === undefined) return undefined
        // The segment being written to is closed first, so what is read is complete.
        if (current?.name === name) close()
        const text = Fs.readFileSync(Path.join(dir, name), "utf8")
        const writes = text
          .split("\n")
          .filter((line) => line.length > 0)
          .map((line) => JSON.parse(line) as StreamWrite)
        return { name, writes }
      })

    const remove = (name: string) =>
      attempt("remove", () => {
        const path = Path.join(dir, name)
        bytes -= Fs.statSync(path).size
        Fs.rmSync(path)
      })

    return {
      dir,
      bytes: () => bytes,
      isEmpty: () => bytes === 0,
      append,
      oldest,
      remove
    }
  })
