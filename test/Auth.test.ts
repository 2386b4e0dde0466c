/**
 * API keys on a real gateway: two replicas sharing one database, in front of a real simulator
 * (through a recording proxy, to see what the backend receives). Who may call `/v1/*` and
 * `/admin/*`, in the OpenAI error shape an SDK expects; a key restricted to some models; a revoke
 * on one replica taking effect on the other within a second; and no secret ever written to a
 * log, the database or the spool, or sent to a backend — only its hash is kept.
 */
import { createHash } from "node:crypto"
import * as Fs from "node:fs/promises"
import * as Path from "node:path"
import { SqlClient } from "@effect/sql"
import { PgClient } from "@effect/sql-pg"
import { expect, layer } from "@effect/vitest"
import { Context, Effect, Layer, Redacted } from "effect"
import OpenAI from "openai"
import * as Admin from "./support/Admin.js"
import { expectOpenAiError, messages, postChat } from "./support/Http.js"
import * as Processes from "./support/Processes.js"
import * as RecordingProxy from "./support/RecordingProxy.js"

class Stack extends Context.Tag("test/Auth/Stack")<
  Stack,
  {
    readonly sim: Processes.Sim
    readonly proxy: RecordingProxy.RecordingProxy
    /** Two replicas on one database: keys are created and revoked on `a`. */
    readonly a: Processes.Gateway
    readonly b: Processes.Gateway
    readonly spoolDirs: ReadonlyArray<string>
    readonly adminKey: string
    /** The replicas' shared database. */
    readonly sql: SqlClient.SqlClient
  }
>() {
  static readonly layer = Layer.scoped(
    Stack,
    Effect.gen(function* () {
      const simPort = yield* Processes.freePort
      const proxy = yield* RecordingProxy.make(`http://127.0.0.1:${simPort}`)
      const adminKey = Admin.newAdminKey()
      const config = {
        server: { host: "127.0.0.1" },
        models: [
          { name: "small", backends: [{ id: "small-1", url: proxy.url }] },
          { name: "large", backends: [{ id: "large-1", url: proxy.url }] }
        ]
      }
      const [sim, databaseUrl, spoolA, spoolB] = yield* Effect.all(
        [
          Processes.startSim({
            port: simPort,
            model: "small",
            ttftMs: 2,
            itlMs: 1,
            outputTokens: 4,
            seed: 1
          }),
          Processes.freshDatabase,
          Processes.tempDir,
          Processes.tempDir
        ],
        { concurrency: "unbounded" }
      )
      const env = Admin.authEnv(adminKey)
      // One after the other: the first creates the schema.
      const a = yield* Processes.startGatewayOn(config, { databaseUrl, spoolDir: spoolA, env })
      const b = yield* Processes.startGatewayOn(config, { databaseUrl, spoolDir: spoolB, env })
      const database = yield* Layer.build(
        PgClient.layer({ url: Redacted.make(databaseUrl), maxConnections: 2 })
      ).pipe(Effect.orDie)
      return {
        sim,
        proxy,
        a,
        b,
        spoolDirs: [spoolA, spoolB],
        adminKey,
        sql: Context.get(database, SqlClient.SqlClient)
      }
    })
  )
}

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/** Every secret the admin API handed out in this file, for the final search. */
const secrets: Array<string> = []

const secretPattern = /^gw-[0-9A-Za-z]{43}$/

/** Creates a key through replica `a` and remembers its secret. */
const newKey = (input: Parameters<typeof Admin.createKey>[2]) =>
  Effect.gen(function* () {
    const { a, adminKey } = yield* Stack
    const key = yield* Admin.createKey(a.url, adminKey, input)
    secrets.push(key.key)
    expect(key.key).toMatch(secretPattern)
    expect(key.prefix).toBe(key.key.slice(0, 7))
    return key
  })

/** Every wrong secret sent in this file: they must not be logged either. */
const wrongSecrets: Array<string> = []

/** A well-formed secret nobody was given. */
const unknownSecret = () => {
  const alphabet = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
  const secret = `gw-${Array.from({ length: 43 }, () => alphabet[Math.floor(Math.random() * 62)]).join("")}`
  wrongSecrets.push(secret)
  return secret
}

const call = (
  url: string,
  init: { readonly method?: string; readonly headers?: Record<string, string>; readonly body?: unknown } = {}
) =>
  Effect.promise(() =>
    fetch(url, {
      method: init.method ?? "GET",
      headers: {
        ...(init.body === undefined ? {} : { "content-type": "application/json" }),
        ...init.headers
      },
      ...(init.body === undefined ? {} : { body: JSON.stringify(init.body) })
    })
  )

const jsonOf = (res: Response) => Effect.promise(() => res.json() as Promise<any>)

/** Asserts a 200 chat completion answer and returns its body. */
const expectAnswer = (res: Response) =>
  Effect.gen(function* () {
    const text = yield* Effect.promise(() => res.text())
    expect({ status: res.status, text }).toMatchObject({ status: 200 })
    const body = JSON.parse(text)
    expect(body.object).toBe("chat.completion")
    return body
  })

const modelIds = (res: Response) =>
  Effect.map(jsonOf(res), (body) => {
    expect(body.object).toBe("list")
    return (body.data as Array<{ id: string }>).map((m) => m.id).sort()
  })

/** The API routes (and their aliases without `/v1`) an unauthenticated caller may try. */
const apiRoutes = [
  { name: "POST /v1/chat/completions", method: "POST", path: "/v1/chat/completions" },
  { name: "POST /chat/completions", method: "POST", path: "/chat/completions" },
  { name: "GET /v1/models", method: "GET", path: "/v1/models" },
  { name: "GET /models", method: "GET", path: "/models" },
  { name: "GET /v1/models/small", method: "GET", path: "/v1/models/small" },
  { name: "GET /v1/no-such-thing", method: "GET", path: "/v1/no-such-thing" },
  { name: "POST /v1/embeddings", method: "POST", path: "/v1/embeddings" }
] as const

/** Credentials that must not get in, as the headers that carry them. */
const badCredentials: ReadonlyArray<{
  readonly name: string
  readonly headers: () => Record<string, string>
}> = [
  { name: "no key", headers: () => ({}) },
  { name: "Bearer with nothing after it", headers: () => ({ authorization: "Bearer " }) },
  { name: "Basic scheme", headers: () => ({ authorization: `Basic ${btoa("user:password")}` }) },
  { name: "a key without a scheme", headers: () => ({ authorization: unknownSecret() }) },
  { name: "an unknown key", headers: () => Admin.bearer(unknownSecret()) },
  { name: "an unknown key in api-key", headers: () => ({ "api-key": unknownSecret() }) },
  { name: "a truncated key", headers: () => Admin.bearer(unknownSecret().slice(0, 20)) }
]

// ---------------------------------------------------------------------------------------------
// The tests
// ---------------------------------------------------------------------------------------------

layer(Stack.layer, { excludeTestServices: true })("API keys", (it) => {
  it.effect("no key, a malformed header or an unknown key is a 401 invalid_api_key on every API route", () =>
    Effect.gen(function* () {
      const { a, b, sql } = yield* Stack
      for (const gateway of [a, b]) {
        for (const route of apiRoutes) {
          for (const credential of badCredentials) {
            const res = yield* call(`${gateway.url}${route.path}`, {
              method: route.method,
              headers: credential.headers(),
              ...(route.method === "POST" ? { body: { model: "small", messages } } : {})
            })
            yield* expectOpenAiError(res, { status: 401, code: "invalid_api_key" }).pipe(
              Effect.catchAllDefect((defect) =>
                Effect.dieMessage(`${route.name} with ${credential.name}: ${(defect as Error).message}`)
              )
            )
          }
        }
      }
      // Turned away before anything is recorded.
      const received = yield* sql<{
        n: number
      }>`SELECT count(*)::int AS n FROM events WHERE type = 'RequestReceived'`
      expect(received[0]?.n).toBe(0)
    }).pipe(Effect.orDie)
  )

  it.effect("a key works as Bearer and as api-key, and the access log names it without its secret", () =>
    Effect.gen(function* () {
      const { a } = yield* Stack
      const key = yield* newKey({ tenant: "acme", name: "backend-service" })
      const asBearer = yield* postChat(
        a.url,
        { model: "small", messages },
        { headers: { ...Admin.bearer(key.key), "x-request-id": "auth-bearer" } }
      )
      expect((yield* expectAnswer(asBearer)).choices[0].message.content.length).toBeGreaterThan(0)
      const asApiKey = yield* postChat(
        a.url,
        { model: "small", messages },
        { headers: { "api-key": key.key, "x-request-id": "auth-api-key" } }
      )
      yield* expectAnswer(asApiKey)
      const models = yield* call(`${a.url}/v1/models`, { headers: { "api-key": key.key } })
      expect(models.status).toBe(200)
      expect(yield* modelIds(models)).toEqual(["large", "small"])
      // The scheme is case-insensitive, as in HTTP.
      const lower = yield* call(`${a.url}/v1/models`, { headers: { authorization: `bearer ${key.key}` } })
      expect(lower.status).toBe(200)
      yield* Effect.promise(() => lower.text())

      for (const requestId of ["auth-bearer", "auth-api-key"]) {
        const line = yield* a.accessLog(requestId)
        expect(line).toMatchObject({
          status: 200,
          key_id: key.id,
          key_name: "backend-service",
          tenant: "acme"
        })
        expect(JSON.stringify(line)).not.toContain(key.key)
      }
    })
  )

  it.effect("the openai SDK works with a key and raises AuthenticationError with a wrong one", () =>
    Effect.gen(function* () {
      const { a } = yield* Stack
      const key = yield* newKey({ tenant: "acme", name: "sdk" })
      const client = (apiKey: string) =>
        new OpenAI({ baseURL: `${a.url}/v1`, apiKey, maxRetries: 0, timeout: 10_000 })
      const completion = yield* Effect.promise(() =>
        client(key.key).chat.completions.create({
          model: "small",
          messages: [{ role: "user", content: "Hi" }]
        })
      )
      expect(completion.choices[0]?.message.content?.length).toBeGreaterThan(0)
      expect(completion.usage?.completion_tokens).toBe(4)

      const failure = yield* Effect.promise(() =>
        client(unknownSecret())
          .chat.completions.create({ model: "small", messages: [{ role: "user", content: "Hi" }] })
          .then(
            () => undefined,
            (error: unknown) => error
          )
      )
      expect(failure).toBeInstanceOf(OpenAI.AuthenticationError)
      const error = failure as InstanceType<typeof OpenAI.AuthenticationError>
      expect(error.status).toBe(401)
      expect(error.code).toBe("invalid_api_key")
      expect(error.type).toBe("invalid_request_error")
    })
  )

  it.effect("a key limited to some models gets 403 model_not_allowed for others and sees only its own", () =>
    Effect.gen(function* () {
      const { a, b, proxy } = yield* Stack
      const key = yield* newKey({ tenant: "acme", name: "small-only", models: ["small"] })
      const before = proxy.requests.length
      for (const stream of [false, true]) {
        const res = yield* postChat(
          a.url,
          { model: "large", messages, stream },
          { headers: Admin.bearer(key.key) }
        )
        const error = yield* expectOpenAiError(res, { status: 403, code: "model_not_allowed" })
        expect(error.type).toBe("permission_error")
        expect(error.message).toContain("large")
      }
      // Never sent to a backend.
      expect(proxy.requests.length).toBe(before)
      yield* expectAnswer(
        yield* postChat(a.url, { model: "small", messages }, { headers: Admin.bearer(key.key) })
      )

      // Both replicas list only its models (b learned the key from the log).
      for (const gateway of [a, b]) {
        const listed = yield* Processes.eventually(
          "the key's models on both replicas",
          Effect.gen(function* () {
            const res = yield* call(`${gateway.url}/v1/models`, { headers: Admin.bearer(key.key) })
            if (res.status !== 200) {
              yield* Effect.promise(() => res.text())
              return undefined
            }
            return yield* modelIds(res)
          }),
          "2 seconds"
        )
        expect(listed).toEqual(["small"])
      }
      const hidden = yield* call(`${a.url}/v1/models/large`, { headers: Admin.bearer(key.key) })
      expect(hidden.status).toBe(404)
      yield* Effect.promise(() => hidden.text())
      const shown = yield* call(`${a.url}/v1/models/small`, { headers: Admin.bearer(key.key) })
      expect(shown.status).toBe(200)
      expect((yield* jsonOf(shown)).id).toBe("small")

      // Widened through the admin API: it may call `large` at once.
      yield* Admin.changeKey(a.url, (yield* Stack).adminKey, key.id, { models: ["small", "large"] })
      yield* expectAnswer(
        yield* postChat(a.url, { model: "large", messages }, { headers: Admin.bearer(key.key) })
      )
    })
  )

  it.effect("a key revoked on one replica is refused by the other within a second", () =>
    Effect.gen(function* () {
      const { a, b, adminKey } = yield* Stack
      const key = yield* newKey({ tenant: "globex", name: "to-revoke" })
      // Created on a; b follows the log.
      const learnedIn = performance.now()
      yield* Processes.eventually(
        "the new key works on b",
        Effect.map(call(`${b.url}/v1/models`, { headers: Admin.bearer(key.key) }), (res) => {
          void res.arrayBuffer()
          return res.status === 200 ? true : undefined
        }),
        "1 second"
      )
      const learnedMs = performance.now() - learnedIn
      yield* expectAnswer(
        yield* postChat(b.url, { model: "small", messages }, { headers: Admin.bearer(key.key) })
      )

      const revoked = yield* Admin.revokeKey(a.url, adminKey, key.id)
      const revokedAt = performance.now()
      expect(revoked.revoked_at).not.toBeNull()
      // At once on the replica that revoked it.
      yield* expectOpenAiError(
        yield* postChat(a.url, { model: "small", messages }, { headers: Admin.bearer(key.key) }),
        {
          status: 401,
          code: "invalid_api_key"
        }
      )
      const refused = yield* Processes.eventually(
        "b refuses the revoked key",
        Effect.flatMap(
          postChat(b.url, { model: "small", messages }, { headers: Admin.bearer(key.key) }),
          (res) =>
            res.status === 401
              ? Effect.succeed(res)
              : Effect.promise(() => res.text()).pipe(Effect.as(undefined))
        ),
        "1 second"
      )
      const tookMs = performance.now() - revokedAt
      const error = yield* expectOpenAiError(refused, { status: 401, code: "invalid_api_key" })
      expect(error.message).toMatch(/revoked/i)
      expect(tookMs).toBeLessThan(1000)
      console.info(
        `key known to b ${learnedMs.toFixed(0)} ms after creation; refused ${tookMs.toFixed(0)} ms after revoke`
      )
      // And for good, on every route.
      for (const gateway of [a, b]) {
        const models = yield* call(`${gateway.url}/v1/models`, { headers: { "api-key": key.key } })
        yield* expectOpenAiError(models, { status: 401, code: "invalid_api_key" })
      }
    })
  )

  it.effect(
    "admin routes: no key 401, a normal key 403 admin_only, the admin key or an admin-scoped key 200",
    () =>
      Effect.gen(function* () {
        const { a, b, adminKey } = yield* Stack
        const normal = yield* newKey({ tenant: "acme", name: "not-admin" })
        const operator = yield* newKey({ tenant: "ops", name: "operator", scopes: ["admin"] })
        const routes = [
          { method: "GET", path: "/admin/keys" },
          { method: "GET", path: "/admin/tenants" },
          { method: "GET", path: "/admin/usage" },
          { method: "POST", path: "/admin/keys", body: { tenant: "acme", name: "should-not-exist" } }
        ] as const
        for (const gateway of [a, b]) {
          for (const route of routes) {
            const at = (headers: Record<string, string>) =>
              call(`${gateway.url}${route.path}`, {
                method: route.method,
                headers,
                ...("body" in route ? { body: route.body } : {})
              })
            yield* expectOpenAiError(yield* at({}), { status: 401, code: "invalid_api_key" })
            yield* expectOpenAiError(yield* at(Admin.bearer(unknownSecret())), {
              status: 401,
              code: "invalid_api_key"
            })
            const forbidden = yield* expectOpenAiError(yield* at(Admin.bearer(normal.key)), {
              status: 403,
              code: "admin_only"
            })
            expect(forbidden.type).toBe("permission_error")
            yield* expectOpenAiError(yield* at({ "api-key": normal.key }), {
              status: 403,
              code: "admin_only"
            })
          }
          const listed = yield* call(`${gateway.url}/admin/keys`, { headers: Admin.bearer(adminKey) })
          expect(listed.status).toBe(200)
          const keys = (yield* jsonOf(listed)).data as Array<Record<string, unknown>>
          expect(keys.map((k) => k.name)).not.toContain("should-not-exist")
          // A listing shows prefixes, never secrets or hashes.
          for (const k of keys) expect(Object.keys(k)).not.toContain("key")
          expect(JSON.stringify(keys)).not.toMatch(/[0-9a-f]{64}/)
        }

        // The admin-scoped key reaches the admin API (on either replica, once b knows it).
        yield* Processes.eventually(
          "the admin-scoped key on b",
          Effect.map(call(`${b.url}/admin/keys`, { headers: Admin.bearer(operator.key) }), (res) => {
            void res.arrayBuffer()
            return res.status === 200 ? true : undefined
          }),
          "1 second"
        )
        const created = yield* Admin.createKey(a.url, operator.key, {
          tenant: "ops",
          name: "made-by-operator"
        })
        secrets.push(created.key)
        const tenants = yield* Admin.adminCall(a.url, operator.key, "GET", "/admin/tenants")
        expect((tenants.data as Array<{ id: string }>).map((t) => t.id)).toEqual(
          expect.arrayContaining(["acme", "ops"])
        )
        // A revoked admin-scoped key is just an unknown caller.
        yield* Admin.revokeKey(a.url, adminKey, operator.id)
        yield* expectOpenAiError(
          yield* call(`${a.url}/admin/keys`, { headers: Admin.bearer(operator.key) }),
          {
            status: 401,
            code: "invalid_api_key"
          }
        )
      })
  )

  it.effect("no secret is in any log, table, spool file or backend request; their hashes are stored", () =>
    Effect.gen(function* () {
      const { a, b, sql, spoolDirs, proxy, sim, adminKey } = yield* Stack
      expect(secrets.length).toBeGreaterThanOrEqual(6)
      const hash = (secret: string) => createHash("sha256").update(secret).digest("hex")

      const logs = [a.child.output(), b.child.output(), sim.child.output()].join("\n")
      expect(logs.length).toBeGreaterThan(0)

      const tables = yield* sql<{ name: string }>`
        SELECT format('%I.%I', table_schema, table_name) AS name FROM information_schema.tables
        WHERE table_schema NOT IN ('pg_catalog', 'information_schema') ORDER BY 1`
      expect(tables.map((t) => t.name)).toEqual(expect.arrayContaining(["public.events"]))
      const dump: Array<string> = []
      for (const { name } of tables) {
        const rows = yield* sql.unsafe<{ row: string }>(`SELECT to_jsonb(t)::text AS row FROM ${name} t`)
        for (const row of rows) dump.push(row.row)
      }
      const database = dump.join("\n")
      expect(database).toContain("KeyCreated")

      const spool: Array<string> = []
      const walk = async (dir: string): Promise<void> => {
        for (const entry of await Fs.readdir(dir, { withFileTypes: true })) {
          const path = Path.join(dir, entry.name)
          if (entry.isDirectory()) await walk(path)
          else spool.push((await Fs.readFile(path)).toString("latin1"))
        }
      }
      for (const dir of spoolDirs) yield* Effect.promise(() => walk(dir))

      const backend = JSON.stringify(proxy.requests)
      expect(proxy.requests.length).toBeGreaterThan(0)

      const places = { logs, database, spool: spool.join("\n"), backend }
      expect(wrongSecrets.length).toBeGreaterThan(0)
      for (const secret of [...secrets, adminKey, ...wrongSecrets]) {
        for (const [place, text] of Object.entries(places)) {
          // The secret without its `gw-`, so that an encoding that kept the rest would show too.
          expect(text.includes(secret.slice(3)), `a secret (${secret.slice(0, 7)}…) in the ${place}`).toBe(
            false
          )
        }
      }
      for (const secret of secrets) {
        expect(database.includes(hash(secret)), `the hash of ${secret.slice(0, 7)}… in the database`).toBe(
          true
        )
      }
      // The admin key is configuration: not even its hash is recorded.
      expect(database.includes(hash(adminKey))).toBe(false)
    }).pipe(Effect.orDie)
  )
})
