/**
 * `report savings` against a fresh PostgreSQL database holding crafted request lifecycles: routed
 * requests of two tenants on three tiers, priced with two price tables, and the ones that must not
 * count (shadow, failed, unrouted) or cannot be compared (no cost, a price table or a policy that
 * is missing). The expected amounts are worked out by hand below, in micro-USD.
 */
import { mkdtempSync, writeFileSync } from "node:fs"
import { tmpdir } from "node:os"
import { join } from "node:path"
import { NodeContext } from "@effect/platform-node"
import { SqlClient } from "@effect/sql"
import { expect, layer } from "@effect/vitest"
import { Events, Ids, type Routing } from "@gateway/domain"
import { Database, EventStore } from "@gateway/event-store"
import { Config, Effect, Either, Exit, Layer } from "effect"
import * as Cli from "../src/Cli.js"
import * as Progress from "../src/Progress.js"

// ---------------------------------------------------------------------------------------------
// The config and the price tables
// ---------------------------------------------------------------------------------------------

const configPath = (() => {
  const dir = mkdtempSync(join(tmpdir(), "savings-test-"))
  const path = join(dir, "gateway.json")
  const model = (name: string, input: number, output: number) => ({
    name,
    pricing: { input_per_million_usd: input, output_per_million_usd: output },
    backends: [{ id: `${name}-1`, url: "http://127.0.0.1:9" }]
  })
  writeFileSync(
    path,
    JSON.stringify({
      // Today's prices; the report must use the ones recorded with each request instead.
      models: [model("small", 1, 1), model("mid", 1, 1), model("large", 1, 1)],
      routing: { policies: [{ name: "auto", tiers: { simple: "small", moderate: "mid", complex: "large" } }] }
    })
  )
  return path
})()

const price = (input: number, output: number) => ({ inputPerMillionUsd: input, outputPerMillionUsd: output })
const priceTables = {
  v1: { small: price(0.1, 0.4), mid: price(0.5, 2), large: price(2.5, 10) },
  // Later prices: small and large went up.
  v2: { small: price(0.2, 0.8), mid: price(0.5, 2), large: price(5, 20) }
}

// ---------------------------------------------------------------------------------------------
// Request lifecycles
// ---------------------------------------------------------------------------------------------

const features: Routing.Features = {
  lastTurnTokens: 10,
  contextTokens: 10,
  turns: 1,
  systemTokens: 0,
  code: 0,
  math: 0,
  reasoning: 0,
  questions: 1,
  constraints: 0,
  outputTokens: 0,
  tools: 0,
  jsonSchema: false
}

const encode = (type: string, data: Record<string, unknown>) =>
  Events.encodeRequestEvent(Either.getOrThrow(Events.decodeRequestEvent(type, data)))

interface Request {
  readonly tenant: string
  readonly at: string
  /** The policy's decision; none for a request that named a model. */
  readonly classified?: { readonly policy: string; readonly tier: Routing.Tier; readonly acted: boolean }
  readonly model: string
  /** Completed with these tokens and cost (`null`: no price); failed when absent. */
  readonly completed?: {
    readonly promptTokens: number
    readonly completionTokens: number
    readonly cost: { readonly amountMicroUsd: number; readonly priceVersion: string } | null
  }
}

let sequence = 0

const write = (request: Request): EventStore.StreamWrite => {
  const requestId = Ids.RequestId.make(`savings-${++sequence}-${crypto.randomUUID().slice(0, 8)}`)
  const at = Date.parse(request.at)
  const event = (type: string, data: Record<string, unknown>, offsetMs: number) => {
    const encoded = encode(type, data)
    return {
      eventId: crypto.randomUUID(),
      type: encoded.type,
      data: encoded.data,
      metadata: Events.makeMetadata({
        requestId,
        keyId: Ids.KeyId.make(`key-${request.tenant}`),
        tenantId: Ids.TenantId.make(request.tenant),
        occurredAt: at + offsetMs
      })
    }
  }
  const model = request.classified?.policy ?? request.model
  const events = [
    event(
      "RequestReceived",
      { model, stream: false, endpoint: "chat.completions", payload: { kind: "none" } },
      0
    ),
    ...(request.classified === undefined
      ? []
      : [
          event("RequestClassified", { ...request.classified, score: 0.1, features, model: request.model }, 1)
        ]),
    event(
      "RequestRouted",
      { model: request.model, backend: `${request.model}-1`, upstreamModel: request.model, why: "requested" },
      2
    ),
    event("AttemptStarted", { attempt: 1, backend: `${request.model}-1`, model: request.model }, 3),
    request.completed === undefined
      ? event(
          "RequestFailed",
          {
            status: 502,
            error: { code: "upstream_error", message: "backend answered 500", reason: "Http" },
            attempts: 1,
            lastBackend: `${request.model}-1`
          },
          400
        )
      : event(
          "RequestCompleted",
          {
            model: request.model,
            backend: `${request.model}-1`,
            ...request.completed,
            usageSource: "backend",
            latencyMs: 400,
            ttftMs: null,
            finishReason: "stop",
            cached: false,
            stream: false,
            status: 200
          },
          400
        )
  ]
  return { streamId: `request-${requestId}`, firstVersion: 1, events }
}

const auto = (tier: Routing.Tier) => ({ policy: "auto", tier, acted: true })
const day = "2026-11-20T10:00:00.000Z"

/**
 * Each routed request's cost at its own price table, and at the complex model's (large) in the
 * same table, in micro-USD (tokens × USD per million tokens).
 */
const requests: ReadonlyArray<Request> = [
  // acme, simple on small at v1: 1000×0.1 + 200×0.4 = 180; on large 1000×2.5 + 200×10 = 4500.
  {
    tenant: "acme",
    at: day,
    classified: auto("simple"),
    model: "small",
    completed: {
      promptTokens: 1000,
      completionTokens: 200,
      cost: { amountMicroUsd: 180, priceVersion: "v1" }
    }
  },
  // acme, moderate on mid at v1: 2000×0.5 + 500×2 = 2000; on large 5000 + 5000 = 10000.
  {
    tenant: "acme",
    at: day,
    classified: auto("moderate"),
    model: "mid",
    completed: {
      promptTokens: 2000,
      completionTokens: 500,
      cost: { amountMicroUsd: 2000, priceVersion: "v1" }
    }
  },
  // acme, ten days earlier (outside --from 2026-11-15): simple at v1, 1000×0.1 = 100; on large 2500.
  {
    tenant: "acme",
    at: "2026-11-10T08:00:00.000Z",
    classified: auto("simple"),
    model: "small",
    completed: { promptTokens: 1000, completionTokens: 0, cost: { amountMicroUsd: 100, priceVersion: "v1" } }
  },
  // globex, complex on large at v1: 400×2.5 + 100×10 = 2000, the same on large.
  {
    tenant: "globex",
    at: day,
    classified: auto("complex"),
    model: "large",
    completed: {
      promptTokens: 400,
      completionTokens: 100,
      cost: { amountMicroUsd: 2000, priceVersion: "v1" }
    }
  },
  // globex, simple at v1: 10×0.1 + 5×0.4 = 3; on large 25 + 50 = 75.
  {
    tenant: "globex",
    at: day,
    classified: auto("simple"),
    model: "small",
    completed: { promptTokens: 10, completionTokens: 5, cost: { amountMicroUsd: 3, priceVersion: "v1" } }
  },
  // globex, simple at v2: 100×0.2 + 50×0.8 = 60; on large at v2's price 100×5 + 50×20 = 1500.
  {
    tenant: "globex",
    at: day,
    classified: auto("simple"),
    model: "small",
    completed: { promptTokens: 100, completionTokens: 50, cost: { amountMicroUsd: 60, priceVersion: "v2" } }
  },
  // Left out: no cost recorded.
  {
    tenant: "globex",
    at: day,
    classified: auto("simple"),
    model: "small",
    completed: { promptTokens: 100, completionTokens: 50, cost: null }
  },
  // Left out: priced with a table the database does not have.
  {
    tenant: "globex",
    at: day,
    classified: auto("simple"),
    model: "small",
    completed: { promptTokens: 100, completionTokens: 50, cost: { amountMicroUsd: 20, priceVersion: "v0" } }
  },
  // Left out: a policy the config does not have.
  {
    tenant: "acme",
    at: day,
    classified: { policy: "legacy", tier: "simple", acted: true },
    model: "small",
    completed: { promptTokens: 100, completionTokens: 50, cost: { amountMicroUsd: 30, priceVersion: "v1" } }
  },
  // Not counted: shadow mode (large answered anyway), a failed request, a request naming a model.
  {
    tenant: "acme",
    at: day,
    classified: { policy: "auto", tier: "simple", acted: false },
    model: "large",
    completed: { promptTokens: 100, completionTokens: 50, cost: { amountMicroUsd: 750, priceVersion: "v1" } }
  },
  { tenant: "acme", at: day, classified: auto("simple"), model: "small" },
  {
    tenant: "acme",
    at: day,
    model: "large",
    completed: { promptTokens: 100, completionTokens: 50, cost: { amountMicroUsd: 750, priceVersion: "v1" } }
  }
]

const record = Effect.gen(function* () {
  const sql = yield* SqlClient.SqlClient
  for (const [version, prices] of Object.entries(priceTables)) {
    yield* sql`INSERT INTO price_tables (version, prices) VALUES (${version}, ${JSON.stringify(prices)}::jsonb)`
  }
  yield* (yield* EventStore.EventStore).appendBatch(requests.map(write))
})

// ---------------------------------------------------------------------------------------------
// Running the CLI
// ---------------------------------------------------------------------------------------------

/** The CLI on `args` with `database` as its store, its output captured. */
const runWith = (
  database: Layer.Layer<SqlClient.SqlClient | EventStore.EventStore>,
  args: ReadonlyArray<string>
) =>
  Effect.gen(function* () {
    const stdout: Array<string> = []
    const stderr: Array<string> = []
    const capture =
      (into: Array<string>) =>
      (...parts: ReadonlyArray<unknown>) =>
        Effect.sync(() => {
          into.push(parts.map(String).join(" "))
        })
    const console = yield* Effect.console
    const exit = yield* Cli.run({ store: database, following: database })(["node", "gateway", ...args]).pipe(
      Effect.provide(Progress.layerLines(0)),
      Effect.provide(NodeContext.layer),
      Effect.withConsole({ ...console, log: capture(stdout), error: capture(stderr) }),
      Effect.exit
    )
    return {
      exit,
      stdout: stdout.join("\n"),
      stderr: stderr.join("\n"),
      failure: Exit.isFailure(exit) ? exit.cause.toString() : ""
    }
  })

/** `report savings` on this test's database. */
const savings = (...args: Array<string>) =>
  Effect.gen(function* () {
    const database = Layer.succeedContext(
      yield* Effect.context<SqlClient.SqlClient | EventStore.EventStore>()
    )
    return yield* runWith(database, ["report", "savings", "--config", configPath, ...args])
  })

const squeeze = (text: string) => text.split("\n").map((line) => line.trim().replace(/\s+/g, " "))

const TestDatabase = Layer.provideMerge(Database.eventStore, Database.layerTest)

layer(TestDatabase, { excludeTestServices: true, timeout: "30 seconds" })("report savings", (it) => {
  it.effect("the routed cost against the complex model's, by tenant and tier, at each request's prices", () =>
    Effect.gen(function* () {
      yield* record
      const { exit, stdout, failure } = yield* savings()
      expect(Exit.isSuccess(exit), failure).toBe(true)
      const lines = squeeze(stdout)
      expect(lines[0]).toBe(
        "Savings from routing, the start of the log to now: 6 routed requests; policies auto (complex: large), legacy (complex: not in the config)"
      )
      // acme: 180 + 2000 + 100 = 2280 against 4500 + 10000 + 2500 = 17000, saved 14720 (86.6%).
      // globex: 2000 + 3 + 60 = 2063 against 2000 + 75 + 1500 = 3575, saved 1512 (42.3%).
      // total: 4343 against 20575, saved 16232 (78.9%).
      expect(lines).toContain("tenant requests routed on complex saved saved %")
      expect(lines).toContain("acme 3 $0.002280 $0.017000 $0.014720 86.6%")
      expect(lines).toContain("globex 3 $0.002063 $0.003575 $0.001512 42.3%")
      // simple: 180 + 100 + 3 + 60 = 343 against 4500 + 2500 + 75 + 1500 = 8575, saved 8232 (96.0%).
      expect(lines).toContain("tier requests routed on complex saved saved %")
      expect(lines).toContain("simple 4 $0.000343 $0.008575 $0.008232 96.0%")
      expect(lines).toContain("moderate 1 $0.002000 $0.010000 $0.008000 80.0%")
      expect(lines).toContain("complex 1 $0.002000 $0.002000 $0.000000 0.0%")
      expect(lines.filter((l) => l === "total 6 $0.004343 $0.020575 $0.016232 78.9%")).toHaveLength(2)
      expect(lines).toContain("left out: 1 request, no cost recorded (the model that answered has no price)")
      expect(lines).toContain("left out: 1 request, policy legacy is not in the config")
      expect(lines).toContain("left out: 1 request, price table v0 is not in price_tables")
    })
  )

  it.effect("--from and --to bound the completion time; --json has the amounts in micro-USD", () =>
    Effect.gen(function* () {
      const { exit, stdout, failure } = yield* savings(
        "--from",
        "2026-11-15",
        "--to",
        "2026-11-21T00:00:00Z",
        "--json"
      )
      expect(Exit.isSuccess(exit), failure).toBe(true)
      const report = JSON.parse(stdout)
      expect(report.from).toBe("2026-11-15T00:00:00.000Z")
      expect(report.to).toBe("2026-11-21T00:00:00.000Z")
      // Without the acme request of 2026-11-10: 2180 against 14500.
      expect(report.byTenant).toEqual([
        {
          tenant: "acme",
          requests: 2,
          routedMicroUsd: 2180,
          baselineMicroUsd: 14500,
          savedMicroUsd: 12320,
          savedPercent: (100 * 12320) / 14500
        },
        {
          tenant: "globex",
          requests: 3,
          routedMicroUsd: 2063,
          baselineMicroUsd: 3575,
          savedMicroUsd: 1512,
          savedPercent: (100 * 1512) / 3575
        }
      ])
      expect(report.byTier.map((l: { tier: string; requests: number }) => [l.tier, l.requests])).toEqual([
        ["simple", 3],
        ["moderate", 1],
        ["complex", 1]
      ])
      expect(report.total).toMatchObject({ requests: 5, routedMicroUsd: 4243, baselineMicroUsd: 18075 })

      const before = yield* savings("--to", "2026-11-15")
      expect(squeeze(before.stdout)).toContain("acme 1 $0.000100 $0.002500 $0.002400 96.0%")
      const none = yield* savings("--from", "2027-01-01")
      expect(none.stdout).toBe(
        "Savings from routing, 2027-01-01T00:00:00.000Z to now: no routed request completed."
      )
      for (const text of ["last tuesday", "1"]) {
        const bad = yield* savings("--from", text)
        expect(Exit.isFailure(bad.exit)).toBe(true)
        expect(bad.stderr).toContain(`--from takes an ISO 8601 date or time, got '${text}'.`)
      }
    })
  )

  it.effect("--database-url reads that database instead of the default one", () =>
    Effect.gen(function* () {
      const sql = yield* SqlClient.SqlClient
      const [row] = yield* sql<{ name: string }>`SELECT current_database() AS name`
      const url = new URL(
        yield* Config.string("TEST_DATABASE_URL").pipe(
          Config.withDefault("postgres://postgres@127.0.0.1:5432/postgres")
        )
      )
      url.pathname = `/${row!.name}`
      const elsewhere = Layer.effectContext(Effect.dieMessage("the default database must not be used"))
      const { exit, stdout, failure } = yield* runWith(elsewhere, [
        "report",
        "savings",
        "--config",
        configPath,
        "--database-url",
        url.toString()
      ])
      expect(Exit.isSuccess(exit), failure).toBe(true)
      expect(squeeze(stdout)).toContain("acme 3 $0.002280 $0.017000 $0.014720 86.6%")
    })
  )
})
