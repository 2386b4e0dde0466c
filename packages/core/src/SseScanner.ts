/**
 * Watches a chat-completions SSE stream go by without slowing it: substring checks per chunk,
 * and a JSON parse only for the line that carries `usage`. It learns what the terminal event
 * needs: the usage (when the backend sent it), the finish reason, how many content chunks were
 * delivered (an estimate of the tokens when there is no usage), and when the first one arrived.
 */
import type { OpenAi } from "@gateway/domain"

const contentMarker = '"content":"'
const finishMarker = /"finish_reason":"([a-z_]+)"/

export class SseScanner {
  /** Chunks that carried non-empty content: about one token each for vLLM and OpenAI. */
  contentChunks = 0
  usage: OpenAi.Usage | undefined
  finishReason: string | null = null
  /** `performance.now()` of the first content, if any arrived. */
  firstContentAt: number | undefined
  /** The message of an error event the backend sent inside the stream (the answer failed). */
  error: string | undefined
  /** The start of a line split across chunks. */
  private carry = ""
  /** The chunks so far, kept (not copied) until usage arrives: the text to count if it never does. */
  private kept: Array<Uint8Array> | undefined = []

  /** The answer's text, for counting its tokens when the backend gave no usage. */
  completionText(): string {
    if (this.kept === undefined) return ""
    let text = ""
    const lines = Buffer.concat(this.kept).toString("utf8").split("\n")
    for (const line of lines) {
      if (!line.startsWith("data: {")) continue
      try {
        const chunk = JSON.parse(line.slice(6)) as {
          choices?: ReadonlyArray<{ delta?: { content?: string | null; reasoning_content?: string | null } }>
        }
        for (const choice of chunk.choices ?? []) {
          text += (choice.delta?.content ?? "") + (choice.delta?.reasoning_content ?? "")
        }
      } catch {
        // A line split across the end: its text is lost to the estimate.
      }
    }
    return text
  }

  push(chunk: Uint8Array): void {
    this.kept?.push(chunk)
    // Latin-1 maps bytes 1:1, enough to find ASCII markers; only the usage line is decoded.
    const text = this.carry + Buffer.from(chunk.buffer, chunk.byteOffset, chunk.byteLength).toString("latin1")
    const lastBreak = text.lastIndexOf("\n")
    this.carry = lastBreak === -1 ? text : text.slice(lastBreak + 1)
    if (lastBreak === -1) return
    const lines = text.slice(0, lastBreak)
    let at = lines.indexOf(contentMarker)
    while (at !== -1) {
      if (lines.charCodeAt(at + contentMarker.length) !== 34 /* an empty string */) {
        this.contentChunks++
        this.firstContentAt ??= performance.now()
      }
      at = lines.indexOf(contentMarker, at + contentMarker.length)
    }
    if (lines.includes('"finish_reason":"')) {
      const match = finishMarker.exec(lines)
      if (match !== null) this.finishReason = match[1]!
    }
    if (lines.includes('"usage":{')) this.readUsage(lines)
    if (
      this.error === undefined &&
      (lines.includes('data: {"error"') || lines.includes('data: {"object":"error"'))
    ) {
      this.readError(lines)
    }
  }

  private readError(lines: string) {
    for (const line of lines.split("\n")) {
      if (!line.startsWith('data: {"error"') && !line.startsWith('data: {"object":"error"')) continue
      try {
        const event = JSON.parse(Buffer.from(line.slice(6), "latin1").toString("utf8")) as {
          error?: { message?: unknown }
          message?: unknown
        }
        const message = event.error?.message ?? event.message
        this.error = typeof message === "string" ? message.slice(0, 500) : "error event"
      } catch {
        this.error = "error event"
      }
      return
    }
  }

  private readUsage(lines: string) {
    for (const line of lines.split("\n")) {
      if (!line.startsWith("data: ") || !line.includes('"usage":{')) continue
      try {
        const chunk = JSON.parse(Buffer.from(line.slice(6), "latin1").toString("utf8")) as {
          usage?: OpenAi.Usage | null
        }
        if (chunk.usage != null && typeof chunk.usage.prompt_tokens === "number") {
          this.usage = chunk.usage
          this.kept = undefined
        }
      } catch {
        // Not JSON after all: the usage stays unknown and is estimated.
      }
    }
  }
}

const eventEnd = Buffer.from("\n\n")
const crlfEnd = Buffer.from("\r\n\r\n")
const usageMarker = Buffer.from('"usage":{')
const noChoices = Buffer.from('"choices":[]')
const empty = new Uint8Array(0)

/**
 * Takes out of a stream the usage-only chunk (`"choices":[]` with `usage`) that the gateway asked
 * the backend for when the client did not: the client gets the stream it asked for. An event
 * split across reads is held back until it is complete.
 */
export class UsageFilter {
  private carry: Buffer | undefined
  /** A CRLF-framed stream: passed through as is (the usage chunk stays; clients ignore it). */
  private crlf = false

  push(chunk: Uint8Array): Uint8Array {
    if (this.crlf) return chunk
    let bytes = Buffer.from(chunk.buffer, chunk.byteOffset, chunk.byteLength)
    if (bytes.indexOf(crlfEnd) !== -1) {
      this.crlf = true
      return this.carry === undefined ? bytes : Buffer.concat([this.flush(), bytes])
    }
    if (this.carry !== undefined) {
      bytes = Buffer.concat([this.carry, bytes])
      this.carry = undefined
    }
    const last = bytes.lastIndexOf(eventEnd)
    if (last === -1) {
      this.carry = bytes
      return empty
    }
    const cut = last + eventEnd.length
    if (cut < bytes.length) this.carry = bytes.subarray(cut)
    const complete = cut < bytes.length ? bytes.subarray(0, cut) : bytes
    return complete.indexOf(usageMarker) === -1 ? complete : withoutUsageEvents(complete)
  }

  flush(): Uint8Array {
    const held = this.carry ?? empty
    this.carry = undefined
    return held
  }
}

/** Complete events, minus those that carry only usage. */
const withoutUsageEvents = (events: Buffer): Buffer => {
  const kept: Array<Buffer> = []
  let start = 0
  while (start < events.length) {
    const end = events.indexOf(eventEnd, start)
    const stop = end === -1 ? events.length : end + eventEnd.length
    const event = events.subarray(start, stop)
    if (event.indexOf(usageMarker) === -1 || event.indexOf(noChoices) === -1) kept.push(event)
    start = stop
  }
  return kept.length === 1 ? kept[0]! : Buffer.concat(kept)
}
