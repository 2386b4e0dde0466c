/**
 * The official `openai` SDK against a real gateway process in front of a real simulator process:
 * what an application using the SDK with `baseURL` pointed at the gateway gets.
 */
import { expect, layer } from "@effect/vitest"
import { Context, Effect, Layer } from "effect"
import OpenAI from "openai"
import type { ChatCompletionChunk, ChatCompletionCreateParamsNonStreaming } from "openai/resources"
import * as Processes from "./support/Processes.js"
import * as RecordingProxy from "./support/RecordingProxy.js"

const outputTokens = 12
const messages = [{ role: "user" as const, content: "Say something about gateways." }]

/**
 * `small` goes straight to the simulator; `recorded` and `renamed` (known upstream as
 * `sim-model`) go through a recording proxy, so tests can see what the backend received.
 */
class Stack extends Context.Tag("test/OpenAiClient/Stack")<
  Stack,
  {
    readonly sim: Processes.Sim
    readonly gateway: Processes.Gateway
    readonly proxy: RecordingProxy.RecordingProxy
    readonly client: OpenAI
  }
>() {
  static readonly layer = Layer.scoped(
    Stack,
    Effect.gen(function* () {
      const simPort = yield* Processes.freePort
      const simUrl = `http://127.0.0.1:${simPort}`
      const proxy = yield* RecordingProxy.make(simUrl)
      const [sim, gateway] = yield* Effect.all(
        [
          Processes.startSim({ port: simPort, model: "small", ttftMs: 5, itlMs: 1, outputTokens, seed: 1 }),
          Processes.startGateway({
            server: { host: "127.0.0.1" },
            models: [
              { name: "small", backends: [{ id: "small-1", url: simUrl }] },
              { name: "recorded", backends: [{ id: "recorded-1", url: proxy.url }] },
              {
                name: "renamed",
                upstream_model: "sim-model",
                backends: [{ id: "renamed-1", url: proxy.url }]
              }
            ]
          })
        ],
        { concurrency: "unbounded" }
      )
      const client = new OpenAI({
        baseURL: `${gateway.url}/v1`,
        apiKey: "unused",
        maxRetries: 0,
        timeout: 10_000
      })
      return { sim, gateway, proxy, client }
    })
  )
}

/** Runs a streamed completion to its end and returns its chunks. */
const collect = async (stream: AsyncIterable<ChatCompletionChunk>): Promise<Array<ChatCompletionChunk>> => {
  const chunks: Array<ChatCompletionChunk> = []
  for await (const chunk of stream) chunks.push(chunk)
  return chunks
}

const contentOf = (chunks: ReadonlyArray<ChatCompletionChunk>) =>
  chunks.map((c) => c.choices[0]?.delta?.content ?? "").join("")

const contentChunkCount = (chunks: ReadonlyArray<ChatCompletionChunk>) =>
  chunks.filter((c) => (c.choices[0]?.delta?.content ?? "") !== "").length

/** The request the backend received with this `x-request-id` (via the recording proxy). */
const receivedBy = (proxy: RecordingProxy.RecordingProxy, requestId: string) => {
  const request = proxy.requests.find((r) => r.headers["x-request-id"] === requestId)
  expect(request, `the backend received request ${requestId}`).toBeDefined()
  return { ...request!, json: JSON.parse(request!.body) }
}

layer(Stack.layer, { excludeTestServices: true })("the OpenAI SDK through the gateway", (it) => {
  it.effect("gets a chat completion with content, consistent usage and the backend's model", () =>
    Effect.gen(function* () {
      const { client } = yield* Stack
      const { data, response } = yield* Effect.promise(() =>
        client.chat.completions.create({ model: "small", messages }).withResponse()
      )
      expect(response.headers.get("x-gateway-backend")).toBe("small-1")
      expect(data.object).toBe("chat.completion")
      expect(data.model).toBe("small")
      const choice = data.choices[0]!
      expect(choice.message.role).toBe("assistant")
      expect(choice.finish_reason).toBe("stop")
      const content = choice.message.content ?? ""
      expect(content.length).toBeGreaterThan(0)
      // The simulator's tokens are words.
      expect(content.split(" ")).toHaveLength(outputTokens)
      const usage = data.usage!
      expect(usage.prompt_tokens).toBeGreaterThan(0)
      expect(usage.completion_tokens).toBe(outputTokens)
      expect(usage.total_tokens).toBe(usage.prompt_tokens + usage.completion_tokens)
    })
  )

  it.effect("passes max_tokens on: a shorter answer that finishes with 'length'", () =>
    Effect.gen(function* () {
      const { client } = yield* Stack
      const completion = yield* Effect.promise(() =>
        client.chat.completions.create({ model: "small", messages, max_tokens: 3 })
      )
      expect(completion.choices[0]!.finish_reason).toBe("length")
      expect(completion.usage!.completion_tokens).toBe(3)
      expect(completion.choices[0]!.message.content!.split(" ")).toHaveLength(3)
    })
  )

  it.scoped("streams the same content as the non-streamed answer, and no usage unless asked", () =>
    Effect.gen(function* () {
      const { client, sim } = yield* Stack
      // Reseeding the simulator before each request makes both draw the same words.
      yield* sim.withConfig({ seed: 42 })
      const whole = yield* Effect.promise(() => client.chat.completions.create({ model: "small", messages }))
      yield* sim.withConfig({ seed: 42 })
      const chunks = yield* Effect.promise(() =>
        client.chat.completions.create({ model: "small", messages, stream: true }).then(collect)
      )
      expect(contentOf(chunks)).toBe(whole.choices[0]!.message.content)
      expect(contentChunkCount(chunks)).toBe(outputTokens)
      expect(chunks.every((c) => c.object === "chat.completion.chunk" && c.model === "small")).toBe(true)
      expect(chunks.filter((c) => c.choices[0]?.finish_reason === "stop")).toHaveLength(1)
      expect(chunks.filter((c) => c.usage != null)).toEqual([])
    })
  )

  it.effect("stream_options.include_usage adds one final usage chunk matching the content", () =>
    Effect.gen(function* () {
      const { client } = yield* Stack
      const chunks = yield* Effect.promise(() =>
        client.chat.completions
          .create({ model: "small", messages, stream: true, stream_options: { include_usage: true } })
          .then(collect)
      )
      const withUsage = chunks.filter((c) => c.usage != null)
      expect(withUsage).toHaveLength(1)
      expect(chunks.at(-1)).toBe(withUsage[0])
      expect(withUsage[0]!.choices).toEqual([])
      const usage = withUsage[0]!.usage!
      expect(contentOf(chunks).length).toBeGreaterThan(0)
      expect(usage.completion_tokens).toBe(contentChunkCount(chunks))
      expect(usage.total_tokens).toBe(usage.prompt_tokens + usage.completion_tokens)
    })
  )

  it.scoped("delivers chunks as the backend produces them, not all at the end", () =>
    Effect.gen(function* () {
      const { client, sim } = yield* Stack
      // 10 tokens 30 ms apart: about 270 ms between the first and the last.
      yield* sim.withConfig({ ttftMs: 50, itlMs: 30, outputTokens: 10 })
      const arrivals = yield* Effect.promise(async () => {
        const times: Array<number> = []
        const stream = await client.chat.completions.create({ model: "small", messages, stream: true })
        for await (const chunk of stream) {
          if ((chunk.choices[0]?.delta?.content ?? "") !== "") times.push(performance.now())
        }
        return times
      })
      expect(arrivals).toHaveLength(10)
      expect(arrivals.at(-1)! - arrivals[0]!).toBeGreaterThanOrEqual(150)
    })
  )

  it.effect("lists the configured models, and retrieves one", () =>
    Effect.gen(function* () {
      const { client } = yield* Stack
      const page = yield* Effect.promise(() => client.models.list())
      expect(page.data.map((m) => m.id)).toEqual(["small", "recorded", "renamed"])
      expect(page.data.every((m) => m.object === "model")).toBe(true)
      const model = yield* Effect.promise(() => client.models.retrieve("renamed"))
      expect(model).toMatchObject({ id: "renamed", object: "model" })
    })
  )

  it.effect("reports an unknown model as the SDK's NotFoundError", () =>
    Effect.gen(function* () {
      const { client } = yield* Stack
      const error = yield* Effect.promise(() =>
        client.chat.completions.create({ model: "no-such-model", messages }).then(
          () => undefined,
          (e: unknown) => e
        )
      )
      expect(error).toBeInstanceOf(OpenAI.NotFoundError)
      expect(error).toMatchObject({ status: 404, code: "model_not_found", param: "model" })
    })
  )

  it.effect("echoes the client's x-request-id, logs it, and forwards it to the backend", () =>
    Effect.gen(function* () {
      const { client, gateway, proxy } = yield* Stack
      const requestId = "e2e-openai-request-1"
      const { request_id } = yield* Effect.promise(() =>
        client.chat.completions
          .create({ model: "recorded", messages }, { headers: { "x-request-id": requestId } })
          .withResponse()
      )
      expect(request_id).toBe(requestId)
      expect(receivedBy(proxy, requestId).path).toBe("/v1/chat/completions")
      const line = yield* gateway.accessLog(requestId)
      expect(line).toMatchObject({
        level: "info",
        method: "POST",
        path: "/v1/chat/completions",
        status: 200,
        model: "recorded",
        backend: "recorded-1",
        stream: false
      })
      expect(line.latency_ms).toEqual(expect.any(Number))
    })
  )

  it.effect("replaces a malformed x-request-id with a generated one", () =>
    Effect.gen(function* () {
      const { client } = yield* Stack
      const { request_id } = yield* Effect.promise(() =>
        client.chat.completions
          .create({ model: "small", messages }, { headers: { "x-request-id": "not valid!" } })
          .withResponse()
      )
      expect(request_id).toMatch(/^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/)
    })
  )

  it.effect("forwards fields it does not know (vLLM's top_k, custom flags) to the backend untouched", () =>
    Effect.gen(function* () {
      const { client, proxy } = yield* Stack
      const params = {
        model: "recorded",
        messages,
        top_k: 5,
        vllm_custom_flag: true,
        chat_template_kwargs: { enable_thinking: false }
      }
      const requestId = "e2e-unknown-fields"
      const completion = yield* Effect.promise(() =>
        client.chat.completions.create(params as ChatCompletionCreateParamsNonStreaming, {
          headers: { "x-request-id": requestId }
        })
      )
      expect(completion.choices[0]!.message.content).not.toBe("")
      expect(receivedBy(proxy, requestId).json).toEqual(params)
    })
  )

  it.effect("sends upstream_model to the backend and keeps the unknown fields while rewriting", () =>
    Effect.gen(function* () {
      const { client, proxy } = yield* Stack
      const params = { model: "renamed", messages, top_k: 5, vllm_custom_flag: true }
      const requestId = "e2e-renamed"
      const { response } = yield* Effect.promise(() =>
        client.chat.completions
          .create(params as ChatCompletionCreateParamsNonStreaming, {
            headers: { "x-request-id": requestId }
          })
          .withResponse()
      )
      expect(response.headers.get("x-gateway-backend")).toBe("renamed-1")
      expect(receivedBy(proxy, requestId).json).toEqual({ ...params, model: "sim-model" })
    })
  )
})
