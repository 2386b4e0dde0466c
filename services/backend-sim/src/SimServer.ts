/**
 * The simulated vLLM-like OpenAI-compatible HTTP server.
 *
 * The request path is plain `node:http` with callbacks and string templates, on purpose: benchmarks of the
 * gateway push thousands of requests per second through this server, and they must measure the gateway,
 * not the simulator. So there is no Effect runtime, no schema decoding and no per-chunk `JSON.stringify`
 * per request; chunk strings are concatenated from precomputed pieces, a running generation owns at most
 * one timer, and connections are kept alive. The Effect API lives in `BackendSim.ts`.
 */
import * as Http from "node:http"
import type { Socket } from "node:net"
import * as Either from "effect/Either"
import { BackendSimError } from "./BackendSimError.js"
import * as Prng from "./Prng.js"
import * as SimConfig from "./SimConfig.js"
import * as SimText from "./SimText.js"

/** Counters since start; `running`, `waiting` and `hanging` are the current values. */
export interface SimStats {
  /** Well-formed chat completion requests received. */
  readonly requests: number
  /** Chat completions answered to the end. */
  readonly completed: number
  readonly errorsInjected: number
  readonly hangsInjected: number
  readonly breaksInjected: number
  /** Requests whose client went away before the answer was complete (waiting, running or hanging). */
  readonly aborted: number
  /** Requests answered 400 (invalid JSON, no `messages`, bad `max_tokens`). */
  readonly badRequests: number
  readonly running: number
  readonly waiting: number
  readonly hanging: number
  readonly peakRunning: number
  readonly peakWaiting: number
  readonly promptTokens: number
  /** Content tokens sent (streams) or answered (non-streaming). */
  readonly completionTokens: number
}

/** A running simulator, controlled with plain Promises. */
export interface SimServer {
  readonly port: number
  /** Base URL, e.g. `http://127.0.0.1:9001`; the OpenAI base URL is `${url}/v1`. */
  readonly url: string
  readonly stats: () => SimStats
  readonly options: () => SimConfig.SimOptions
  /** Validates and applies a partial update; rejects with `BackendSimError` ("InvalidOptions"). */
  readonly update: (patch: SimConfig.SimOptionsPatch) => Promise<SimConfig.SimOptions>
  /** Closes the listener (clients get ECONNREFUSED) or reopens it on the same port. */
  readonly setRefusing: (refusing: boolean) => Promise<void>
  /** Stops listening and destroys every open connection. */
  readonly close: () => Promise<void>
}

/** Starts a simulator; rejects with `BackendSimError` on invalid options or when it cannot listen. */
export const start = async (options: SimConfig.SimOptionsPatch = {}): Promise<SimServer> => {
  const resolved = SimConfig.resolve(options)
  if (Either.isLeft(resolved)) throw new BackendSimError({ reason: "InvalidOptions", detail: resolved.left })
  const sim = new Sim(resolved.right)
  await sim.open()
  return {
    port: sim.port,
    url: `http://${urlHost(resolved.right.host)}:${sim.port}`,
    stats: () => ({ ...sim.stats }),
    options: () => sim.options,
    update: (patch) => sim.update(patch),
    setRefusing: (refusing) => sim.setRefusing(refusing),
    close: () => sim.close()
  }
}

const urlHost = (host: string): string =>
  host.includes(":") ? `[${host}]` : host === "0.0.0.0" ? "127.0.0.1" : host

const maxBodyBytes = 32 * 1024 * 1024

enum State {
  Waiting,
  Running,
  Hanging,
  Done
}

/** One chat completion from arrival to its last byte. */
interface Job {
  readonly res: Http.ServerResponse
  state: State
  readonly stream: boolean
  readonly includeUsage: boolean
  readonly promptTokens: number
  /** Content tokens of the full completion. */
  readonly tokens: number
  readonly finishReason: "stop" | "length"
  readonly slow: boolean
  /** Content chunks after which the connection is broken, or -1. */
  readonly breakAt: number
  readonly contentSeed: number
  /** Set when the job starts running. */
  words: Array<number>
  /** `data: {"id":...,"choices":[{"index":0,"delta":` — the common start of every content chunk. */
  chunkHead: string
  id: string
  created: number
  model: string
  /** Content tokens sent so far (streams). */
  sent: number
  timer: NodeJS.Timeout | undefined
  interval: NodeJS.Timeout | undefined
}

const sseHeaders = { "content-type": "text/event-stream; charset=utf-8", "cache-control": "no-cache" }
const sseHeadersClosing = { ...sseHeaders, connection: "close" }
const contentMid = ',"logprobs":null,"finish_reason":null}]}\n\n'
const roleDelta = '{"role":"assistant","content":""}' + contentMid
const contentOpen = '{"content":"'
const contentClose = '"}' + contentMid
const done = "data: [DONE]\n\n"
/** Precomputed token texts: the first token has no leading space, the others do. */
const firstTokens = SimText.words.map((_, i) => SimText.tokenText(i, 0))
const laterTokens = SimText.words.map((_, i) => SimText.tokenText(i, 1))

const errorType = (status: number): { type: string; code: string | null } =>
  status === 429
    ? { type: "requests", code: "rate_limit_exceeded" }
    : status >= 500
      ? { type: "server_error", code: "injected_error" }
      : { type: "invalid_request_error", code: "injected_error" }

const errorBody = (message: string, type: string, param: string | null, code: string | null): string =>
  JSON.stringify({ error: { message, type, param, code } })

const escapeLabel = (value: string): string =>
  value.replace(/\\/g, "\\\\").replace(/\n/g, "\\n").replace(/"/g, '\\"')

interface ChatRequest {
  readonly messages: ReadonlyArray<unknown>
  readonly stream: boolean
  readonly includeUsage: boolean
  /** `max_completion_tokens`, else `max_tokens`. */
  readonly limit: number | undefined
}

/** The fields of an OpenAI chat request the simulator uses, or what is wrong with it. */
const parseChatRequest = (
  body: string
): ChatRequest | { readonly message: string; readonly param: string } | string => {
  let request: {
    messages?: unknown
    stream?: unknown
    stream_options?: { include_usage?: unknown } | null
    max_tokens?: unknown
    max_completion_tokens?: unknown
  }
  try {
    request = JSON.parse(body)
  } catch {
    return "Request body is not valid JSON"
  }
  if (request === null || typeof request !== "object") return "Request body must be a JSON object"
  const messages = request.messages
  if (!Array.isArray(messages) || messages.length === 0) {
    return { message: "'messages' must be a non-empty array", param: "messages" }
  }
  const param =
    request.max_completion_tokens !== undefined && request.max_completion_tokens !== null
      ? "max_completion_tokens"
      : "max_tokens"
  const limit = request[param]
  if (
    limit !== undefined &&
    limit !== null &&
    !(typeof limit === "number" && Number.isInteger(limit) && limit >= 1)
  ) {
    return { message: `'${param}' must be an integer of at least 1`, param }
  }
  const stream = request.stream === true
  return {
    messages,
    stream,
    includeUsage: stream && request.stream_options?.include_usage === true,
    limit: typeof limit === "number" ? limit : undefined
  }
}

class Sim {
  options: SimConfig.SimOptions
  port = 0
  readonly stats = {
    requests: 0,
    completed: 0,
    errorsInjected: 0,
    hangsInjected: 0,
    breaksInjected: 0,
    aborted: 0,
    badRequests: 0,
    running: 0,
    waiting: 0,
    hanging: 0,
    peakRunning: 0,
    peakWaiting: 0,
    promptTokens: 0,
    completionTokens: 0
  }
  private prng: Prng.Prng
  private modelJson = ""
  private modelsBody = ""
  private readonly queue: Array<Job> = []
  private queueHead = 0
  private draining = false
  private nextId = 0
  private readonly idPrefix = Math.floor(Math.random() * 0x100000000)
    .toString(16)
    .padStart(8, "0")
  private server: Http.Server | undefined
  private readonly servers = new Set<Http.Server>()
  private readonly sockets = new Set<Socket>()
  private refusing = false
  private closed = false
  private readonly startedAt = Math.floor(Date.now() / 1000)

  constructor(options: SimConfig.SimOptions) {
    this.options = options
    this.prng = options.seed === undefined ? Prng.makeUnseeded() : Prng.make(options.seed)
    this.setModel(options.model)
  }

  async open(): Promise<void> {
    await this.listen()
    if (this.options.refuseConnections) {
      this.refusing = true
      this.unlisten()
    }
  }

  async update(input: SimConfig.SimOptionsPatch): Promise<SimConfig.SimOptions> {
    const decoded = SimConfig.decodePatch(input)
    if (Either.isLeft(decoded)) throw new BackendSimError({ reason: "InvalidOptions", detail: decoded.left })
    const patch = decoded.right
    if (
      (patch.port !== undefined && patch.port !== this.port) ||
      (patch.host !== undefined && patch.host !== this.options.host)
    ) {
      throw new BackendSimError({
        reason: "InvalidOptions",
        detail: "port and host cannot change at runtime"
      })
    }
    const { port: _port, host: _host, ...rest } = patch
    this.options = SimConfig.merge(this.options, rest)
    if ("seed" in patch) {
      this.prng = patch.seed === undefined ? Prng.makeUnseeded() : Prng.make(patch.seed)
    }
    if (patch.model !== undefined) this.setModel(patch.model)
    if (patch.capacity !== undefined) this.drain()
    if (patch.refuseConnections !== undefined) await this.setRefusing(patch.refuseConnections)
    return this.options
  }

  async setRefusing(refusing: boolean): Promise<void> {
    this.options = { ...this.options, refuseConnections: refusing }
    if (refusing === this.refusing || this.closed) return
    this.refusing = refusing
    if (refusing) this.unlisten()
    else {
      try {
        await this.listen()
      } catch (error) {
        this.refusing = true
        this.options = { ...this.options, refuseConnections: true }
        throw error
      }
    }
  }

  async close(): Promise<void> {
    if (this.closed) return
    this.closed = true
    const closing = [...this.servers].map(
      (server) => new Promise<void>((resolve) => server.close(() => resolve()))
    )
    this.server = undefined
    for (const socket of this.sockets) socket.destroy()
    await Promise.all(closing)
  }

  private setModel(model: string): void {
    this.modelJson = JSON.stringify(model)
    this.modelsBody = `{"object":"list","data":[{"id":${this.modelJson},"object":"model","created":${this.startedAt},"owned_by":"backend-sim","root":${this.modelJson},"parent":null}]}`
  }

  private listen(): Promise<void> {
    const server = Http.createServer({ keepAliveTimeout: 65_000, requestTimeout: 0 }, (req, res) =>
      this.route(req, res)
    )
    server.keepAliveTimeout = 65_000
    server.headersTimeout = 66_000
    server.on("connection", (socket: Socket) => {
      this.sockets.add(socket)
      socket.once("close", () => this.sockets.delete(socket))
    })
    return new Promise<void>((resolve, reject) => {
      const onError = (error: Error) => {
        reject(new BackendSimError({ reason: "Listen", detail: error.message }))
      }
      server.once("error", onError)
      server.listen(this.port === 0 ? this.options.port : this.port, this.options.host, () => {
        server.off("error", onError)
        server.on("error", () => {})
        const address = server.address()
        if (address !== null && typeof address === "object") this.port = address.port
        this.options = { ...this.options, port: this.port }
        this.server = server
        this.servers.add(server)
        server.once("close", () => this.servers.delete(server))
        resolve()
      })
    })
  }

  /** Stops accepting connections; idle keep-alive connections are closed now, busy ones after their answer. */
  private unlisten(): void {
    const server = this.server
    if (server === undefined) return
    this.server = undefined
    // The listening socket is gone right away; `close` only reports once every connection has ended.
    server.close()
    server.closeIdleConnections()
  }

  private route(req: Http.IncomingMessage, res: Http.ServerResponse): void {
    const url = req.url ?? "/"
    const q = url.indexOf("?")
    const path = q === -1 ? url : url.slice(0, q)
    const method = req.method
    if (method === "POST" && path === "/v1/chat/completions") this.readBody(req, res, this.chat)
    else if (method === "POST" && path === "/sim/config") this.readBody(req, res, this.configure)
    else if (method === "GET" && path === "/v1/models") this.send(res, 200, this.modelsBody)
    else if (method === "GET" && path === "/health") this.send(res, 200, '{"status":"ok"}')
    else if (method === "GET" && path === "/metrics") this.sendMetrics(res)
    else if (method === "GET" && path === "/sim/stats") this.send(res, 200, JSON.stringify(this.stats))
    else if (method === "GET" && path === "/sim/config") this.send(res, 200, JSON.stringify(this.options))
    else {
      req.resume()
      const message = `Invalid URL (${method} ${path})`
      this.send(res, 404, errorBody(message, "invalid_request_error", null, "not_found"))
    }
  }

  private send(res: Http.ServerResponse, status: number, body: string, extra?: Record<string, string>): void {
    const headers: Record<string, string | number> = {
      "content-type": "application/json",
      "content-length": Buffer.byteLength(body),
      ...extra
    }
    if (this.refusing) headers.connection = "close"
    res.writeHead(status, headers)
    res.end(body)
  }

  private badRequest(res: Http.ServerResponse, message: string, param: string | null): void {
    this.stats.badRequests++
    this.send(res, 400, errorBody(message, "invalid_request_error", param, null))
  }

  private readBody(
    req: Http.IncomingMessage,
    res: Http.ServerResponse,
    handler: (res: Http.ServerResponse, body: string) => void
  ): void {
    let body = ""
    let tooLarge = false
    req.setEncoding("utf8")
    req.on("data", (chunk: string) => {
      if (tooLarge) return
      body += chunk
      if (body.length > maxBodyBytes) {
        tooLarge = true
        this.send(res, 413, errorBody("Request body too large", "invalid_request_error", null, null), {
          connection: "close"
        })
      }
    })
    req.on("end", () => {
      if (!tooLarge) handler.call(this, res, body)
    })
  }

  private configure(res: Http.ServerResponse, body: string): void {
    let patch: unknown
    const invalid = (message: string) =>
      this.send(res, 400, errorBody(message, "invalid_request_error", null, null))
    try {
      patch = JSON.parse(body)
    } catch {
      invalid("Request body is not valid JSON")
      return
    }
    this.update(patch as SimConfig.SimOptionsPatch).then(
      (options) => this.send(res, 200, JSON.stringify(options)),
      (error: unknown) => invalid(error instanceof Error ? error.message : String(error))
    )
  }

  private chat(res: Http.ServerResponse, body: string): void {
    const request = parseChatRequest(body)
    if (typeof request === "string") {
      this.badRequest(res, request, null)
      return
    }
    if ("param" in request) {
      this.badRequest(res, request.message, request.param)
      return
    }
    const { messages, limit, stream } = request
    this.stats.requests++
    const o = this.options
    // A fixed number of draws per request, whatever the options, keeps seeded runs aligned.
    const prng = this.prng
    const errorDraw = prng.next()
    const hangDraw = prng.next()
    const slowDraw = prng.next()
    const breakDraw = prng.next()
    const contentSeed = prng.nextUint32()
    if (errorDraw < o.errorRate) {
      this.stats.errorsInjected++
      const { type, code } = errorType(o.errorStatus)
      const message = `Simulated backend error (status ${o.errorStatus})`
      if (stream && o.errorMode === "event") {
        // vLLM's way: the stream has begun (200), and its one event is the error.
        res.writeHead(200, this.refusing ? sseHeadersClosing : sseHeaders)
        res.end(
          `data: {"object":"error","message":${JSON.stringify(message)},"type":"${type}","param":null,"code":${o.errorStatus}}\n\n`
        )
        return
      }
      const retryAfter = o.errorStatus === 429 || o.errorStatus === 503 ? { "retry-after": "1" } : undefined
      this.send(res, o.errorStatus, errorBody(message, type, null, code), retryAfter)
      return
    }
    const promptTokens = SimText.promptTokens(messages)
    const natural =
      o.outputMode === "fixed"
        ? o.outputTokens
        : Math.min(o.maxOutputTokens, Math.max(1, Math.ceil(promptTokens * o.outputRatio)))
    const truncated = limit !== undefined && limit < natural
    const job: Job = {
      res,
      state: State.Waiting,
      stream,
      includeUsage: request.includeUsage,
      promptTokens,
      tokens: truncated ? limit : natural,
      finishReason: truncated ? "length" : "stop",
      slow: slowDraw < o.slowFirstTokenRate,
      breakAt:
        stream && o.breakAfterChunks !== undefined && breakDraw < o.breakRate ? o.breakAfterChunks : -1,
      contentSeed,
      words: [],
      chunkHead: "",
      id: "",
      created: 0,
      model: "",
      sent: 0,
      timer: undefined,
      interval: undefined
    }
    res.once("close", () => this.onClose(job))
    if (hangDraw < o.hangRate) {
      job.state = State.Hanging
      this.stats.hangsInjected++
      this.stats.hanging++
      return
    }
    if (stream) {
      res.writeHead(200, this.refusing ? sseHeadersClosing : sseHeaders)
      res.flushHeaders()
    }
    if (this.stats.running < o.capacity) this.run(job)
    else {
      this.queue.push(job)
      this.stats.waiting++
      if (this.stats.waiting > this.stats.peakWaiting) this.stats.peakWaiting = this.stats.waiting
    }
  }

  private onClose(job: Job): void {
    switch (job.state) {
      case State.Done:
        return
      case State.Hanging:
        this.stats.hanging--
        break
      case State.Waiting:
        // Left in the queue; `drain` skips it.
        this.stats.waiting--
        break
      case State.Running:
        if (job.timer !== undefined) clearTimeout(job.timer)
        if (job.interval !== undefined) clearInterval(job.interval)
        this.stats.running--
        break
    }
    job.state = State.Done
    this.stats.aborted++
    this.drain()
  }

  /** Starts queued jobs while there is capacity, in arrival order. */
  private drain(): void {
    if (this.draining) return
    this.draining = true
    const queue = this.queue
    while (this.queueHead < queue.length && this.stats.running < this.options.capacity) {
      const job = queue[this.queueHead]!
      queue[this.queueHead++] = undefined as unknown as Job
      if (job.state !== State.Waiting) continue
      this.stats.waiting--
      this.run(job)
    }
    if (this.queueHead === queue.length) {
      queue.length = 0
      this.queueHead = 0
    } else if (this.queueHead > 1024 && this.queueHead * 2 > queue.length) {
      queue.splice(0, this.queueHead)
      this.queueHead = 0
    }
    this.draining = false
  }

  private finish(job: Job): void {
    job.state = State.Done
    this.stats.running--
    this.drain()
  }

  private run(job: Job): void {
    const o = this.options
    job.state = State.Running
    const stats = this.stats
    stats.running++
    if (stats.running > stats.peakRunning) stats.peakRunning = stats.running
    stats.promptTokens += job.promptTokens
    job.words = SimText.drawWords(Prng.make(job.contentSeed), job.tokens)
    job.id = `chatcmpl-${this.idPrefix}${(this.nextId++).toString(16).padStart(8, "0")}`
    job.created = Math.floor(Date.now() / 1000)
    job.model = this.modelJson
    const firstDelay = o.ttftMs + (job.slow ? o.slowFirstTokenMs : 0)
    if (job.stream) {
      job.chunkHead = `data: {"id":"${job.id}","object":"chat.completion.chunk","created":${job.created},"model":${job.model},"choices":[{"index":0,"delta":`
      const itl = o.itlMs
      if (firstDelay === 0) this.streamStep(job, itl)
      else job.timer = setTimeout(() => this.streamStep(job, itl), firstDelay)
    } else {
      const total = firstDelay + Math.max(0, job.tokens - 1) * o.itlMs
      if (total === 0) this.respond(job)
      else job.timer = setTimeout(() => this.respond(job), total)
    }
  }

  private respond(job: Job): void {
    job.timer = undefined
    let content = ""
    const words = job.words
    for (let i = 0; i < words.length; i++) content += (i === 0 ? firstTokens : laterTokens)[words[i]!]
    const body = `{"id":"${job.id}","object":"chat.completion","created":${job.created},"model":${job.model},"choices":[{"index":0,"message":{"role":"assistant","content":"${content}"},"logprobs":null,"finish_reason":"${job.finishReason}"}],"usage":{"prompt_tokens":${job.promptTokens},"completion_tokens":${job.tokens},"total_tokens":${job.promptTokens + job.tokens}}}`
    this.stats.completionTokens += job.tokens
    this.stats.completed++
    this.finish(job)
    this.send(job.res, 200, body)
  }

  /**
   * Sends the next content chunk (the role chunk first), or every remaining one when `itl` is 0; at the end
   * sends the finish chunk, the usage chunk if asked, and `[DONE]`, or breaks the connection.
   */
  private streamStep(job: Job, itl: number): void {
    job.timer = undefined
    const head = job.chunkHead
    const end = job.breakAt >= 0 && job.breakAt < job.tokens ? job.breakAt : job.tokens
    let out = job.sent === 0 ? head + roleDelta : ""
    const upto = itl === 0 ? end : Math.min(end, job.sent + 1)
    const words = job.words
    for (let i = job.sent; i < upto; i++) {
      out += head + contentOpen + (i === 0 ? firstTokens : laterTokens)[words[i]!] + contentClose
    }
    this.stats.completionTokens += upto - job.sent
    job.sent = upto
    if (upto < end) {
      job.res.write(out)
      if (job.interval === undefined) job.interval = setInterval(() => this.streamStep(job, itl), itl)
      return
    }
    if (job.interval !== undefined) {
      clearInterval(job.interval)
      job.interval = undefined
    }
    if (job.breakAt >= 0) {
      this.stats.breaksInjected++
      this.finish(job)
      const socket = job.res.socket
      if (out === "") socket?.destroy()
      else job.res.write(out, () => socket?.destroy())
      return
    }
    out += `${head}{},"logprobs":null,"finish_reason":"${job.finishReason}","stop_reason":null}]}\n\n`
    if (job.includeUsage) {
      out += `data: {"id":"${job.id}","object":"chat.completion.chunk","created":${job.created},"model":${job.model},"choices":[],"usage":{"prompt_tokens":${job.promptTokens},"completion_tokens":${job.tokens},"total_tokens":${job.promptTokens + job.tokens}}}\n\n`
    }
    this.stats.completed++
    this.finish(job)
    const res = job.res
    const socket = res.socket
    // Headers promised keep-alive before the listener closed: do not leave this connection open for reuse.
    if (this.refusing && socket !== null) res.end(out + done, () => socket.end())
    else res.end(out + done)
  }

  private sendMetrics(res: Http.ServerResponse): void {
    const s = this.stats
    const label = `{model_name="${escapeLabel(this.options.model)}"}`
    const body = `# HELP vllm:num_requests_running Number of requests currently running.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running${label} ${s.running}
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting${label} ${s.waiting}
# HELP vllm:prompt_tokens_total Number of prefill tokens processed.
# TYPE vllm:prompt_tokens_total counter
vllm:prompt_tokens_total${label} ${s.promptTokens}
# HELP vllm:generation_tokens_total Number of generation tokens processed.
# TYPE vllm:generation_tokens_total counter
vllm:generation_tokens_total${label} ${s.completionTokens}
# HELP sim_requests_total Chat completion requests received.
# TYPE sim_requests_total counter
sim_requests_total${label} ${s.requests}
# HELP sim_requests_aborted_total Requests whose client went away before the end of the answer.
# TYPE sim_requests_aborted_total counter
sim_requests_aborted_total${label} ${s.aborted}
# HELP sim_errors_injected_total Error responses injected.
# TYPE sim_errors_injected_total counter
sim_errors_injected_total${label} ${s.errorsInjected}
`
    res.writeHead(200, {
      "content-type": "text/plain; version=0.0.4; charset=utf-8",
      "content-length": Buffer.byteLength(body)
    })
    res.end(body)
  }
}
