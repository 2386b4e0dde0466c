/**
 * Metering on a real gateway with keys on, in front of a real simulator: what `usage_hourly`
 * (the table billing reads, through `GET /admin/usage` and in SQL) holds for a key is exactly
 * what its clients were told they used — non-streamed answers, streams with and without
 * `include_usage`, and a client that hung up mid-stream (billed for what the backend generated,
 * read from the backend's usage while the gateway drained the answer) — priced at the configured
 * rates. The stream each client gets is the one it asked for, and each request's events name its
 * key and tenant.
 */
import { SqlClient } from "@effect/sql"
import { PgClient } from "@effect/sql-pg"
import { expect, layer } from "@effect/vitest"
import { Events } from "@gateway/domain"
import { Context, Effect, Layer, Redacted } from "effect"
import * as Admin from "./support/Admin.js"
import { contentChunks, postChat, readSse, readThenHangUp } from "./support/Http.js"
import * as Processes from "./support/Processes.js"

const outputTokens = 8
/** USD per million tokens: micro-USD per token. */
const price = { input: 2.5, output: 10 }
const drainMs = 2000

class Stack extends Context.Tag("test/Usage/Stack")<
  Stack,
  {
    readonly sim: Processes.Sim
    readonly gateway: Processes.Gateway
    readonly adminKey: string
    /** The gateway's own database. */
    readonly sql: SqlClient.SqlClient
  }
>() {
  static readonly layer = Layer.scoped(
    Stack,
    Effect.gen(function* () {
      const simPort = yield* Processes.freePort
      const simUrl = `http://127.0.0.1:${simPort}`
      const adminKey = Admin.newAdminKey()
      const pricing = { input_per_million_usd: price.input, output_per_million_usd: price.output }
      const [sim, gateway] = yield* Effect.all(
        [
          Processes.startSim({ port: simPort, model: "small", ttftMs: 2, itlMs: 1, outputTokens, seed: 1 }),
          Processes.startGateway(
            {
              server: { host: "127.0.0.1" },
              pool: Processes.singleAttempt,
              metering: { drain_after_disconnect_ms: drainMs },
              models: [
                { name: "small", pricing, backends: [{ id: "small-1", url: simUrl }] },
                { name: "large", pricing, backends: [{ id: "large-1", url: simUrl }] }
              ]
            },
            Admin.authEnv(adminKey)
          )
        ],
        { concurrency: "unbounded" }
      )
      const database = yield* Layer.build(
        PgClient.layer({ url: Redacted.make(gateway.databaseUrl), maxConnections: 2 })
      ).pipe(Effect.orDie)
      return { sim, gateway, adminKey, sql: Context.get(database, SqlClient.SqlClient) }
    })
  )
}

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

interface Usage {
  readonly prompt: number
  readonly completion: number
}

const newKey = (input: Parameters<typeof Admin.createKey>[2]) =>
  Effect.flatMap(Stack, ({ gateway, adminKey }) => Admin.createKey(gateway.url, adminKey, input))

const query = <A extends object>(statement: string, params: ReadonlyArray<unknown> = []) =>
  Effect.flatMap(Stack, ({ sql }) => sql.unsafe<A>(statement, params)).pipe(Effect.orDie)

interface EventRow {
  readonly stream_id: string
  readonly type: string
  readonly data: any
  readonly metadata: any
}

const eventsOf = (requestId: string) =>
  query<EventRow>(
    "SELECT stream_id, type, data, metadata FROM events WHERE stream_id = $1 ORDER BY stream_version",
    [`request-${requestId}`]
  )

const terminal: ReadonlySet<string> = new Set(Events.terminalTags)

/** The request's events once its terminal one is committed. */
const settled = (requestId: string) =>
  Processes.eventually(
    `a terminal event on request-${requestId}`,
    Effect.map(eventsOf(requestId), (rows) => (rows.some((r) => terminal.has(r.type)) ? rows : undefined)),
    "5 seconds"
  )

const gatewayIdOf = (res: Response): string => {
  const id = res.headers.get("x-gateway-request-id")
  expect(id).toEqual(expect.any(String))
  return id!
}

/** What the simulator generated while `effect` ran (nothing else uses it meanwhile). */
const generatedDuring = <A, E, R>(effect: Effect.Effect<A, E, R>) =>
  Effect.gen(function* () {
    const { sim } = yield* Stack
    const before = yield* sim.stats
    const result = yield* effect
    const after = yield* sim.stats
    return {
      result,
      generated: {
        prompt: after.promptTokens - before.promptTokens,
        completion: after.completionTokens - before.completionTokens
      } satisfies Usage,
      completed: after.completed - before.completed,
      aborted: after.aborted - before.aborted
    }
  })

const usageOf = (usage: any): Usage => {
  expect(usage).toMatchObject({
    prompt_tokens: expect.any(Number),
    completion_tokens: expect.any(Number),
    total_tokens: usage.prompt_tokens + usage.completion_tokens
  })
  return { prompt: usage.prompt_tokens, completion: usage.completion_tokens }
}

/** The cost in micro-USD, as the gateway rounds it on each event. */
const microUsd = (u: Usage) => Math.round(u.prompt * price.input + u.completion * price.output)

/** The exact cost as `numeric(24, 9)` text (`0.000123500`), from the tokens in nano-USD. */
const exactUsd = (u: Usage) => {
  const nano = u.prompt * price.input * 1000 + u.completion * price.output * 1000
  return `${Math.trunc(nano / 1e9)}.${String(nano % 1e9).padStart(9, "0")}`
}

const sum = (usages: ReadonlyArray<Usage>): Usage => ({
  prompt: usages.reduce((n, u) => n + u.prompt, 0),
  completion: usages.reduce((n, u) => n + u.completion, 0)
})

/** A prompt of its own for each request, so that the sums mean something. */
const ask = (text: string) => [{ role: "user", content: text }]

// ---------------------------------------------------------------------------------------------
// The tests
// ---------------------------------------------------------------------------------------------

layer(Stack.layer, { excludeTestServices: true })("metering", (it) => {
  it.effect("a stream ends with the usage chunk when the client asked for it, and has none otherwise", () =>
    Effect.gen(function* () {
      const { gateway } = yield* Stack
      const key = yield* newKey({ tenant: "shape", name: "stream-shape" })
      const stream = (options: Record<string, unknown>) =>
        Effect.gen(function* () {
          const res = yield* postChat(
            gateway.url,
            { model: "small", messages: ask("Tell me about streams."), stream: true, ...options },
            { headers: Admin.bearer(key.key) }
          )
          expect(res.status).toBe(200)
          expect(res.headers.get("content-type")).toMatch(/^text\/event-stream/)
          return yield* readSse(res)
        })

      const asked = yield* stream({ stream_options: { include_usage: true } })
      expect(asked.done).toBe(true)
      const last = asked.events.at(-1)
      expect(last.choices).toEqual([])
      const usage = usageOf(last.usage)
      expect(usage.completion).toBe(outputTokens)
      expect(contentChunks(asked.events)).toHaveLength(outputTokens)
      // Only the last chunk carries usage (the sim sends none on the others).
      expect(asked.events.slice(0, -1).filter((c) => "usage" in c)).toEqual([])

      for (const options of [{}, { stream_options: { include_usage: false } }, { stream_options: {} }]) {
        const plain = yield* stream(options)
        expect(plain.done).toBe(true)
        expect(
          plain.events.filter((c) => "usage" in c),
          `usage in a stream with ${JSON.stringify(options)}`
        ).toEqual([])
        expect(plain.events.filter((c) => c.choices?.length === 0)).toEqual([])
        expect(contentChunks(plain.events)).toHaveLength(outputTokens)
        expect(plain.events.at(-1).choices[0].finish_reason).toBe("stop")
      }
    })
  )

  it.scoped("usage_hourly for a key is exactly the usage its clients saw, a hung-up stream included", () =>
    Effect.gen(function* () {
      const { gateway, adminKey, sim } = yield* Stack
      const key = yield* newKey({ tenant: "acme", name: "billing", models: ["small"] })
      const headers = Admin.bearer(key.key)
      /** What each billable request used, as its client or the simulator tells. */
      const billed: Array<Usage> = []
      const requestIds: Array<string> = []

      // N = 3 non-streamed: their `usage` field.
      for (const [i, maxTokens] of [3, 5, undefined].entries()) {
        const { result, generated } = yield* generatedDuring(
          Effect.gen(function* () {
            const res = yield* postChat(
              gateway.url,
              {
                model: "small",
                messages: ask(`Non-streamed question number ${i}${" and more".repeat(i * 7)}?`),
                ...(maxTokens === undefined ? {} : { max_tokens: maxTokens })
              },
              { headers }
            )
            expect(res.status).toBe(200)
            requestIds.push(gatewayIdOf(res))
            return usageOf((yield* Effect.promise(() => res.json() as Promise<any>)).usage)
          })
        )
        expect(result.completion).toBe(maxTokens ?? outputTokens)
        expect(result).toEqual(generated)
        billed.push(result)
      }

      // M = 2 streamed with include_usage: their usage chunk. K = 2 streamed without it, with the
      // same prompts: no usage chunk; they used what the simulator generated, which is what the
      // matching include_usage request was told.
      const streamed = [
        { text: "A streamed question?", maxTokens: 6 },
        { text: `A longer streamed question${" with more words".repeat(12)}?`, maxTokens: undefined }
      ]
      const told: Array<Usage> = []
      for (const { text, maxTokens } of streamed) {
        const { result, generated } = yield* generatedDuring(
          Effect.gen(function* () {
            const res = yield* postChat(
              gateway.url,
              {
                model: "small",
                messages: ask(text),
                stream: true,
                stream_options: { include_usage: true },
                ...(maxTokens === undefined ? {} : { max_tokens: maxTokens })
              },
              { headers }
            )
            expect(res.status).toBe(200)
            requestIds.push(gatewayIdOf(res))
            const { events, done } = yield* readSse(res)
            expect(done).toBe(true)
            expect(events.at(-1).choices).toEqual([])
            const usage = usageOf(events.at(-1).usage)
            expect(contentChunks(events)).toHaveLength(usage.completion)
            return usage
          })
        )
        expect(result).toEqual(generated)
        told.push(result)
        billed.push(result)
      }
      for (const [i, { text, maxTokens }] of streamed.entries()) {
        const { result, generated } = yield* generatedDuring(
          Effect.gen(function* () {
            const res = yield* postChat(
              gateway.url,
              {
                model: "small",
                messages: ask(text),
                stream: true,
                ...(maxTokens === undefined ? {} : { max_tokens: maxTokens })
              },
              { headers }
            )
            expect(res.status).toBe(200)
            requestIds.push(gatewayIdOf(res))
            const { events, done } = yield* readSse(res)
            expect(done).toBe(true)
            expect(events.filter((c) => "usage" in c)).toEqual([])
            return contentChunks(events).length
          })
        )
        expect(result).toBe(generated.completion)
        expect(generated).toEqual(told[i])
        billed.push(generated)
      }

      // Turned away (a model the key may not use): nothing generated, nothing billed.
      const { generated: refused } = yield* generatedDuring(
        Effect.gen(function* () {
          const res = yield* postChat(gateway.url, { model: "large", messages: ask("No.") }, { headers })
          yield* Effect.promise(() => res.text())
          expect(res.status).toBe(403)
        })
      )
      expect(refused).toEqual({ prompt: 0, completion: 0 })

      // One client hangs up after the first content chunk of a slow answer (~0.8 s); the gateway
      // drains the backend (up to 2 s) for its usage and bills it.
      const hangUp = yield* generatedDuring(
        Effect.gen(function* () {
          yield* sim.withConfig({ itlMs: 100 })
          const controller = new AbortController()
          const res = yield* postChat(
            gateway.url,
            { model: "small", messages: ask("A question whose answer nobody waits for."), stream: true },
            { headers: { ...headers, "x-request-id": "usage-hang-up" }, signal: controller.signal }
          )
          expect(res.status).toBe(200)
          const hungUpAt = performance.now()
          yield* readThenHangUp(res, controller, (t) => /"content":"[^"]/.test(t))
          const requestId = gatewayIdOf(res)
          const rows = yield* settled(requestId)
          return { requestId, rows, settledMs: performance.now() - hungUpAt }
        })
      )
      const { requestId, rows, settledMs } = hangUp.result
      requestIds.push(requestId)
      expect(rows.map((r) => r.type)).toEqual([
        "RequestReceived",
        "RequestRouted",
        "AttemptStarted",
        "RequestCancelled"
      ])
      const cancelled = rows[3]!.data
      // The backend ran to its end (drained, not aborted): the whole answer is billed.
      expect({ completed: hangUp.completed, aborted: hangUp.aborted }).toEqual({ completed: 1, aborted: 0 })
      expect(hangUp.generated.completion).toBe(outputTokens)
      expect(cancelled).toMatchObject({
        afterFirstByte: true,
        model: "small",
        backend: "small-1",
        promptTokens: hangUp.generated.prompt,
        completionTokens: outputTokens,
        usageSource: "backend",
        cost: { amountMicroUsd: microUsd(hangUp.generated) }
      })
      // What the client got before it left, not what the drain read after.
      expect(cancelled.tokensDelivered).toBeGreaterThanOrEqual(1)
      expect(cancelled.tokensDelivered, "tokens delivered to the client").toBeLessThan(outputTokens)
      expect(settledMs).toBeLessThan(drainMs + 1000)
      const line = yield* gateway.accessLog("usage-hang-up")
      expect(line).toMatchObject({ status: 499, key_id: key.id, tenant: "acme" })
      billed.push(hangUp.generated)

      // Every billable request is on the books as the client saw it.
      const terminals = yield* Effect.forEach(requestIds, (id) =>
        Effect.map(settled(id), (events) => events.at(-1)!)
      )
      terminals.forEach((event, i) => {
        expect(event.type).toBe(i === requestIds.length - 1 ? "RequestCancelled" : "RequestCompleted")
        expect(event.data).toMatchObject({
          promptTokens: billed[i]!.prompt,
          completionTokens: billed[i]!.completion,
          usageSource: "backend",
          cost: { amountMicroUsd: microUsd(billed[i]!) }
        })
      })

      // The projection, through the admin API: one row for the key and model, the exact sums.
      const total = sum(billed)
      const requests = billed.length
      expect(requests).toBe(3 + 2 + 2 + 1)
      const report = yield* Processes.eventually(
        "usage_hourly has every request of the key",
        Effect.map(Admin.usage(gateway.url, adminKey, { key: key.id, group_by: "key,model" }), (u) =>
          u.total.requests >= requests ? u : undefined
        ),
        "5 seconds"
      )
      const expectedUsd = (total.prompt * price.input + total.completion * price.output) / 1e6
      expect(report.data).toHaveLength(1)
      expect(report.data[0]).toMatchObject({
        key: key.id,
        model: "small",
        requests,
        prompt_tokens: total.prompt,
        completion_tokens: total.completion,
        total_tokens: total.prompt + total.completion
      })
      expect(report.data[0]!.cost_usd).toBeCloseTo(expectedUsd, 12)
      expect(report.total).toMatchObject({ requests, prompt_tokens: total.prompt })
      expect(report.total.cost_usd).toBeCloseTo(expectedUsd, 12)

      // And in SQL, to the nano-dollar; nothing under another key, tenant or model.
      const [row] = yield* query<{
        requests: number
        prompt: number
        completion: number
        cost: string
        tenants: Array<string>
        models: Array<string>
      }>(
        `SELECT sum(requests)::int AS requests, sum(prompt_tokens)::int AS prompt,
           sum(completion_tokens)::int AS completion, sum(cost_usd)::text AS cost,
           array_agg(DISTINCT tenant_id) AS tenants, array_agg(DISTINCT model) AS models
         FROM usage_hourly WHERE key_id = $1`,
        [key.id]
      )
      expect(row).toEqual({
        requests,
        prompt: total.prompt,
        completion: total.completion,
        cost: exactUsd(total),
        tenants: ["acme"],
        models: ["small"]
      })
      console.info(
        `billed ${requests} requests, ${total.prompt}+${total.completion} tokens, $${row!.cost}; ` +
          `hang-up settled ${settledMs.toFixed(0)} ms after the client left`
      )
    })
  )

  it.effect(
    "a client that leaves before any content, or for longer than the drain, is billed all the same",
    () =>
      Effect.gen(function* () {
        const { gateway, adminKey, sim } = yield* Stack
        const key = yield* newKey({ tenant: "acme", name: "leavers" })
        /** A stream whose client hangs up once `until` holds for what it got; its terminal event. */
        const leave = (clientId: string, until: (text: string) => boolean) =>
          generatedDuring(
            Effect.gen(function* () {
              const controller = new AbortController()
              const res = yield* postChat(
                gateway.url,
                { model: "small", messages: ask(`Leaving: ${clientId}`), stream: true },
                { headers: { ...Admin.bearer(key.key), "x-request-id": clientId }, signal: controller.signal }
              )
              expect(res.status).toBe(200)
              const hungUpAt = performance.now()
              const received = yield* readThenHangUp(res, controller, until)
              const rows = yield* settled(gatewayIdOf(res))
              // The backend has finished or been let go of, either way.
              yield* Processes.eventually(
                "the backend is idle",
                Effect.map(sim.stats, (s) => (s.running === 0 && s.waiting === 0 ? true : undefined))
              )
              return {
                event: rows.at(-1)!,
                contentSeen: received.match(/"content":"[^"]/g)?.length ?? 0,
                settledMs: performance.now() - hungUpAt
              }
            })
          )

        // Gone as soon as the headers are in, while the backend still thinks (0.3 s to the first
        // token): the drain reads the whole answer and its usage.
        const early = yield* Effect.scoped(
          Effect.zipRight(
            sim.withConfig({ ttftMs: 300, itlMs: 10 }),
            leave("usage-leave-early", () => true)
          )
        )
        expect({ completed: early.completed, aborted: early.aborted }).toEqual({ completed: 1, aborted: 0 })
        expect(early.result.event.type).toBe("RequestCancelled")
        expect(early.result.event.data).toMatchObject({
          promptTokens: early.generated.prompt,
          completionTokens: outputTokens,
          usageSource: "backend",
          cost: { amountMicroUsd: microUsd(early.generated) }
        })
        // Delivered is what went to the client's connection before the gateway learned it was gone:
        // Node notices a closed connection only when a write fails, which on a short answer can be
        // after its last chunk. Billed is what the backend generated, either way.
        const { tokensDelivered, afterFirstByte } = early.result.event.data
        expect(tokensDelivered).toBeLessThanOrEqual(outputTokens)
        expect(afterFirstByte).toBe(tokensDelivered > 0)

        // Gone after the first token of an answer longer than the drain (8 × 400 ms > 2 s): the
        // gateway stops reading after 2 s and bills what it had seen, estimated — never nothing.
        const late = yield* Effect.scoped(
          Effect.zipRight(
            sim.withConfig({ itlMs: 400 }),
            leave("usage-leave-slow", (t) => /"content":"[^"]/.test(t))
          )
        )
        expect({ completed: late.completed, aborted: late.aborted }).toEqual({ completed: 0, aborted: 1 })
        const slow = late.result.event
        expect(slow.type).toBe("RequestCancelled")
        expect(slow.data).toMatchObject({ afterFirstByte: true, usageSource: "estimated" })
        expect(slow.data.promptTokens).toBeGreaterThan(0)
        expect(slow.data.completionTokens).toBeGreaterThan(late.result.contentSeen)
        expect(slow.data.completionTokens).toBeLessThanOrEqual(late.generated.completion)
        const estimated = { prompt: slow.data.promptTokens, completion: slow.data.completionTokens }
        expect(slow.data.cost.amountMicroUsd).toBe(microUsd(estimated))
        expect(slow.data.cost.amountMicroUsd).toBeGreaterThan(0)
        expect(late.result.settledMs).toBeGreaterThanOrEqual(drainMs - 100)
        expect(late.result.settledMs).toBeLessThan(drainMs + 1000)
        // What it saw, or one more: the chunk whose write told the gateway the client was gone.
        expect(slow.data.tokensDelivered, "tokens delivered to the client").toBeGreaterThanOrEqual(
          late.result.contentSeen
        )
        expect(slow.data.tokensDelivered).toBeLessThanOrEqual(late.result.contentSeen + 1)

        // Both on the books of the key, as their events say.
        const billed = [
          {
            prompt: early.result.event.data.promptTokens,
            completion: early.result.event.data.completionTokens
          },
          estimated
        ]
        const total = sum(billed)
        const report = yield* Processes.eventually(
          "usage_hourly has both cancelled requests",
          Effect.map(Admin.usage(gateway.url, adminKey, { key: key.id, group_by: "key,model" }), (u) =>
            u.total.requests >= 2 ? u : undefined
          ),
          "5 seconds"
        )
        expect(report.data).toEqual([
          expect.objectContaining({
            key: key.id,
            model: "small",
            requests: 2,
            prompt_tokens: total.prompt,
            completion_tokens: total.completion
          })
        ])
        expect(report.total.cost_usd).toBeCloseTo(
          (total.prompt * price.input + total.completion * price.output) / 1e6,
          12
        )
      })
  )
  it.effect("every event of a request names its key and tenant", () =>
    Effect.gen(function* () {
      const { gateway } = yield* Stack
      const key = yield* newKey({ tenant: "initech", name: "metadata", models: ["small"] })
      const ids: Array<string> = []
      for (const body of [
        { model: "small", messages: ask("Plain.") },
        { model: "small", messages: ask("Streamed."), stream: true },
        { model: "large", messages: ask("Refused.") }
      ]) {
        const res = yield* postChat(gateway.url, body, { headers: Admin.bearer(key.key) })
        yield* Effect.promise(() => res.text())
        ids.push(gatewayIdOf(res))
      }
      const types: Array<ReadonlyArray<string>> = []
      for (const id of ids) {
        const rows = yield* settled(id)
        types.push(rows.map((r) => r.type))
        for (const row of rows) {
          expect(row.metadata, `${row.type} of request-${id}`).toMatchObject({
            requestId: id,
            keyId: key.id,
            tenantId: "initech"
          })
        }
      }
      expect(types.map((t) => t.at(-1))).toEqual(["RequestCompleted", "RequestCompleted", "RequestRejected"])

      // A caller without a valid key leaves nothing on the books.
      const anonymous = yield* postChat(gateway.url, { model: "small", messages: ask("Who?") })
      expect(anonymous.status).toBe(401)
      yield* Effect.promise(() => anonymous.text())
      expect(yield* eventsOf(gatewayIdOf(anonymous))).toEqual([])
    })
  )
})
