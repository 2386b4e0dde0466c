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
  /** The start of a line split across chunks. */
  private carry = ""

  push(chunk: Uint8Array): void {
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
  }

  private readUsage(lines: string) {
    for (const line of lines.split("\n")) {
      if (!line.startsWith("data: ") || !line.includes('"usage":{')) continue
      try {
        const chunk = JSON.parse(Buffer.from(line.slice(6), "latin1").toString("utf8")) as {
          usage?: OpenAi.Usage | null
        }
        if (chunk.usage != null && typeof chunk.usage.prompt_tokens === "number") this.usage = chunk.usage
      } catch {
        // Not JSON after all: the usage stays unknown and is estimated.
      }
    }
  }
}
