/**
 * The admin commands (`keys`, `tenants`, `usage`, `status`) as an operator runs them, through the
 * gateway's RPC API: the real CLI process
 * against a real gateway (keys on, an admin key of its own, two routing policies) in front of the
 * simulator. A key created by the CLI works at once, its new limit is enforced at once, its
 * revocation refuses it, and its requests show in `usage`; keys and tenants are bound to a
 * routing policy, rebound and unbound, and an unknown policy is refused; a wrong, missing or
 * unreachable gateway is said plainly.
 */
import { execFile } from "node:child_process"
import { fileURLToPath } from "node:url"
import { expect, layer } from "@effect/vitest"
import { Context, Effect, Layer, Redacted } from "effect"
import { messages, postChat } from "../../../test/support/Http.js"
import * as Processes from "../../../test/support/Processes.js"
import * as Programs from "../../../test/support/Programs.js"
import * as AdminOptions from "../src/AdminOptions.js"
import type * as AdminViews from "../src/AdminViews.js"
import * as Gateway from "../src/Gateway.js"
import * as UsageCommand from "../src/UsageCommand.js"

const root = fileURLToPath(new URL("../../../", import.meta.url))
const adminKey = `gw-admin-cli-test-${crypto.randomUUID().replaceAll("-", "")}`

class Stack extends Context.Tag("test/cli/Admin/Stack")<
  Stack,
  { readonly sim: Processes.Sim; readonly gateway: Processes.Gateway }
>() {
  static readonly layer = Layer.scoped(
    Stack,
    Effect.gen(function* () {
      const simPort = yield* Processes.freePort
      const [sim, gateway] = yield* Effect.all(
        [
          Processes.startSim({
            port: simPort,
            model: "small",
            ttftMs: 1,
            itlMs: 1,
            outputTokens: 5,
            seed: 1
          }),
          Processes.startGateway(
            {
              server: { host: "127.0.0.1" },
              models: [
                {
                  name: "small",
                  pricing: { input_per_million_usd: 0.15, output_per_million_usd: 0.6 },
                  backends: [{ id: "small-1", url: `http://127.0.0.1:${simPort}` }]
                }
              ],
              routing: {
                policies: [
                  { name: "auto", tiers: { simple: "small", moderate: "small", complex: "small" } },
                  { name: "auto-cheap", tiers: { simple: "small", moderate: "small", complex: "small" } }
                ]
              }
            },
            { GATEWAY_AUTH: "on", ADMIN_KEY: adminKey }
          )
        ],
        { concurrency: "unbounded" }
      )
      return { sim, gateway }
    })
  )
}

interface Run {
  readonly code: number
  readonly stdout: string
  readonly stderr: string
}

/**
 * Runs `pnpm cli <args>` (as node, from the repository root) with `GATEWAY_URL` and `ADMIN_KEY`
 * as given, nothing of this process's own; checks that the admin key is nowhere in its output.
 */
const cli = (
  args: ReadonlyArray<string>,
  env: { readonly GATEWAY_URL?: string; readonly ADMIN_KEY?: string }
) =>
  Effect.async<Run>((resume) => {
    const inherited = Object.fromEntries(
      Object.entries(process.env).filter(
        ([key]) => key !== "NODE_OPTIONS" && key !== "ADMIN_KEY" && key !== "GATEWAY_URL"
      )
    )
    execFile(
      process.execPath,
      Programs.nodeArgs("services/cli/src/main.ts", args),
      { cwd: root, timeout: 30_000, env: { ...inherited, ...env } },
      (error, stdout, stderr) =>
        resume(Effect.succeed({ code: error === null ? 0 : Number(error.code ?? -1), stdout, stderr }))
    )
  }).pipe(
    Effect.tap((run) => {
      expect(run.stdout + run.stderr).not.toContain(adminKey)
    })
  )

/** The CLI as the operator of the test's gateway: its URL and admin key from the environment. */
const operator = (...args: ReadonlyArray<string>) =>
  Effect.flatMap(Stack, ({ gateway }) => cli(args, { GATEWAY_URL: gateway.url, ADMIN_KEY: adminKey }))

/** Asserts a successful run and returns its stdout. */
const succeeded = (run: Run): string => {
  expect({ code: run.code, stderr: run.stderr }, run.stdout).toEqual({ code: 0, stderr: "" })
  return run.stdout
}

const chat = (secret: string) =>
  Effect.flatMap(Stack, ({ gateway }) =>
    postChat(
      gateway.url,
      { model: "small", messages, max_tokens: 5 },
      { headers: { authorization: `Bearer ${secret}` } }
    ).pipe(
      Effect.tap((res) => Effect.promise(() => res.arrayBuffer())),
      Effect.map((res) => res.status)
    )
  )

layer(Stack.layer, { excludeTestServices: true })("CLI admin commands", (it) => {
  it.effect(
    "a key's life: create (secret once), use, list, limit, revoke; its requests in usage",
    () =>
      Effect.gen(function* () {
        const tenant = `cli-${crypto.randomUUID().slice(0, 8)}`
        const args = `keys create --tenant ${tenant} --name ci --models small --meta team=search`
        const created = succeeded(yield* operator(...args.split(" ")))
        const secret = /^\s+(gw-[0-9A-Za-z]{43})$/m.exec(created)?.[1]
        expect(secret, created).toBeDefined()
        expect(created).toMatch(/will not be shown again/)
        expect(created.split(secret!).length, "the secret is printed once").toBe(2)
        const id = /^id\s+(key_\S+)$/m.exec(created)?.[1]
        expect(id, created).toBeDefined()
        expect(created).toMatch(new RegExp(`^tenant\\s+${tenant}$`, "m"))
        expect(created).toMatch(/^models\s+small$/m)
        expect(created).toMatch(/^metadata\s+team=search$/m)

        expect(yield* chat(secret!)).toBe(200)

        const [listed, limited] = yield* Effect.all(
          [operator("keys", "list", "--tenant", tenant), operator("keys", "limits", id!, "--rpm", "1")],
          { concurrency: "unbounded" }
        )
        const table = succeeded(listed).trimEnd().split("\n")
        expect(table[0]).toMatch(
          /^id\s+tenant\s+name\s+prefix\s+models\s+policy\s+rpm\s+tpm\s+concurrency\s+budget\s+created\s+revoked$/
        )
        expect(table).toHaveLength(2)
        expect(table[1]).toMatch(
          new RegExp(`^${id}\\s+${tenant}\\s+ci\\s+${secret!.slice(0, 7)}…\\s+small\\s+-\\s`)
        )
        expect(table[1]).not.toContain(secret)
        expect(succeeded(limited)).toMatch(/^limits\s+rpm 1, tpm -, concurrency -, budget -$/m)
        expect(succeeded(limited)).toMatch(/^policy\s+-$/m)

        // One request a minute: of two quick ones, the second is refused.
        const first = yield* chat(secret!)
        const second = yield* chat(secret!)
        expect([first, second]).toEqual([200, 429])

        // Revoked, the key is refused; meanwhile its two completed requests reach the usage
        // projection, which follows the log a few milliseconds behind.
        const [revoked, usage] = yield* Effect.all(
          [
            operator("keys", "revoke", id!, "--reason", "rotated"),
            Processes.eventually(
              "usage shows the key's two completed requests",
              Effect.map(operator("usage", "--json", "--key", id!, "--by", "key,model"), (run) => {
                const report = JSON.parse(succeeded(run))
                return report.total.requests >= 2 ? report : undefined
              }),
              "20 seconds"
            )
          ],
          { concurrency: "unbounded" }
        )
        expect(succeeded(revoked)).toMatch(/^revoked\s+\S+Z \(rotated\)$/m)
        expect(yield* chat(secret!)).toBe(401)

        expect(usage.group_by).toEqual(["key", "model"])
        expect(usage.data).toHaveLength(1)
        expect(usage.data[0]).toMatchObject({ key: id, model: "small", requests: 2 })
        expect(usage.data[0].prompt_tokens).toBeGreaterThan(0)
        expect(usage.data[0].completion_tokens).toBeGreaterThan(0)
        expect(usage.data[0].total_tokens).toBe(usage.data[0].prompt_tokens + usage.data[0].completion_tokens)
        expect(usage.data[0].cost_usd).toBeGreaterThan(0)
        expect(usage.total.requests).toBe(2)

        // The same report as a table (rendered here: one more process would add seconds).
        const rows = UsageCommand.render(usage)
        expect(rows[0]).toMatch(/^Usage from \S+Z to \S+Z$/)
        expect(rows[2]).toMatch(
          /^key\s+model\s+requests\s+prompt_tokens\s+completion_tokens\s+total_tokens\s+cost_usd$/
        )
        const cost = usage.data[0].cost_usd.toFixed(6).replace(".", "\\.")
        expect(rows[3]).toMatch(new RegExp(`^${id}\\s+small\\s+2\\s+\\d+\\s+\\d+\\s+\\d+\\s+${cost}$`))
        expect(rows[4]).toMatch(new RegExp(`^total\\s+2\\s+\\d+\\s+\\d+\\s+\\d+\\s+${cost}$`))
      }),
    { timeout: 60_000, concurrent: true }
  )

  it.effect(
    "routing policies: a tenant and a key bound, shown, rebound, unbound; an unknown one refused",
    () =>
      Effect.gen(function* () {
        const tenant = `pol-${crypto.randomUUID().slice(0, 8)}`
        const other = `pol-${crypto.randomUUID().slice(0, 8)}`
        const json = (run: Run) => JSON.parse(succeeded(run))
        /** The `tenants list` row of `id`, its cells split on the table's padding. */
        const tenantRow = (table: string, id: string) =>
          table
            .split("\n")
            .find((line) => line.startsWith(`${id} `))
            ?.split(/\s{2,}/)

        // A tenant bound at creation; a key of it bound to another policy at creation.
        const tenantCreated = succeeded(yield* operator("tenants", "create", tenant, "--policy", "auto"))
        expect(tenantCreated).toMatch(new RegExp(`^id\\s+${tenant}$`, "m"))
        expect(tenantCreated).toMatch(/^policy\s+auto$/m)
        const created = succeeded(
          yield* operator("keys", "create", "--tenant", tenant, "--name", "bound", "--policy", "auto-cheap")
        )
        expect(created).toMatch(/^policy\s+auto-cheap$/m)
        const id = /^id\s+(key_\S+)$/m.exec(created)?.[1]
        expect(id, created).toBeDefined()

        // Seen by show, list, tenants list and tenants list --json.
        const [shown, keyList, tenants, tenantsJson] = yield* Effect.all(
          [
            operator("keys", "show", id!),
            operator("keys", "list", "--tenant", tenant),
            operator("tenants", "list"),
            operator("tenants", "list", "--json")
          ],
          { concurrency: "unbounded" }
        )
        expect(succeeded(shown)).toMatch(/^policy\s+auto-cheap$/m)
        const keyTable = succeeded(keyList).trimEnd().split("\n")
        expect(keyTable[0]).toMatch(/^id\s+tenant\s+name\s+prefix\s+models\s+policy\s+rpm\s/)
        expect(keyTable[1]).toMatch(
          new RegExp(`^${id}\\s+${tenant}\\s+bound\\s+\\S+…\\s+all\\s+auto-cheap\\s`)
        )
        const tenantTable = succeeded(tenants)
        expect(tenantTable.split("\n")[0]).toMatch(
          /^id\s+name\s+policy\s+rpm\s+tpm\s+concurrency\s+budget\s+created$/
        )
        expect(tenantRow(tenantTable, tenant)?.slice(0, 7)).toEqual([
          tenant,
          tenant,
          "auto",
          "-",
          "-",
          "-",
          "-"
        ])
        expect(json(tenantsJson).data.find((t: { readonly id: string }) => t.id === tenant)).toMatchObject({
          id: tenant,
          policy: "auto"
        })

        // Rebound alone (a policy-only change), then unbound together with a limit; the tenant
        // likewise. Limits and models not given stay as they are.
        const [keyRebound, tenantRebound] = yield* Effect.all(
          [
            operator("keys", "limits", id!, "--policy", "auto", "--json"),
            operator("tenants", "limits", tenant, "--policy", "auto-cheap", "--json")
          ],
          { concurrency: "unbounded" }
        )
        expect(json(keyRebound)).toMatchObject({
          id,
          policy: "auto",
          models: null,
          limits: { requests_per_minute: null }
        })
        expect(json(tenantRebound)).toMatchObject({ id: tenant, policy: "auto-cheap" })
        const [keyUnbound, tenantUnbound] = yield* Effect.all(
          [
            operator("keys", "limits", id!, "--policy", "none", "--rpm", "7"),
            operator("tenants", "limits", tenant, "--policy", "none")
          ],
          { concurrency: "unbounded" }
        )
        const unboundText = succeeded(keyUnbound)
        expect(unboundText).toMatch(/^policy\s+-$/m)
        expect(unboundText).toMatch(/^limits\s+rpm 7, tpm -, concurrency -, budget -$/m)
        expect(succeeded(tenantUnbound)).toMatch(/^policy\s+-$/m)

        // An unknown policy: the gateway's message, exit 1, nothing created or changed. Meanwhile
        // the unbinding is seen by show --json and list, a limit-only change keeps the tenant
        // unbound, and a change of nothing is a usage error that names --policy.
        const refusal = "error: There is no routing policy 'nope' (configured: auto, auto-cheap)."
        const [afterKey, afterTenants, rpmOnly, nothing, ...refused] = yield* Effect.all(
          [
            operator("keys", "show", id!, "--json"),
            operator("tenants", "list"),
            operator("tenants", "limits", tenant, "--rpm", "50", "--json"),
            operator("tenants", "limits", tenant),
            operator("keys", "create", "--tenant", tenant, "--name", "nope", "--policy", "nope"),
            operator("keys", "limits", id!, "--policy", "nope"),
            operator("tenants", "create", other, "--policy", "nope")
          ],
          { concurrency: "unbounded" }
        )
        expect(json(afterKey)).toMatchObject({ policy: null, limits: { requests_per_minute: 7 } })
        expect(tenantRow(succeeded(afterTenants), tenant)?.slice(0, 3)).toEqual([tenant, tenant, "-"])
        expect(json(rpmOnly)).toMatchObject({ policy: null, limits: { requests_per_minute: 50 } })
        expect(nothing.code).not.toBe(0)
        expect(nothing.stdout + nothing.stderr).toContain("--policy")
        expect(refused).toHaveLength(3)
        for (const run of refused) {
          expect({ code: run.code, stdout: run.stdout, stderr: run.stderr.trim() }).toEqual({
            code: 1,
            stdout: "",
            stderr: refusal
          })
        }
        const [finalKeys, finalTenants] = yield* Effect.all(
          [operator("keys", "list", "--tenant", tenant, "--json"), operator("tenants", "list", "--json")],
          { concurrency: "unbounded" }
        )
        expect(
          json(finalKeys).data.map((k: { readonly name: string; readonly policy: string | null }) => [
            k.name,
            k.policy
          ])
        ).toEqual([["bound", null]])
        const finalTenant = json(finalTenants).data.filter(
          (t: { readonly id: string }) => t.id === tenant || t.id === other
        )
        expect(finalTenant).toHaveLength(1)
        expect(finalTenant[0]).toMatchObject({ id: tenant, policy: null })
      }),
    // Not beside the key's life: sixteen CLI processes would slow it towards its own timeout.
    { timeout: 120_000 }
  )

  it.effect(
    "status: the gateway's projections (position, lag, leader, last error) and its backends' health",
    () =>
      Effect.gen(function* () {
        const [table, asJson] = yield* Effect.all([operator("status"), operator("status", "--json")], {
          concurrency: "unbounded"
        })
        const lines = succeeded(table).trimEnd().split("\n")
        expect(lines[0]).toMatch(/^PROJECTION\s+POSITION\s+APPLIED\s+LAG\s+LEADER\s+LAST ERROR$/)
        for (const name of ["dead_letters", "request_log", "usage_hourly"]) {
          expect(lines.find((line) => line.startsWith(`${name} `))).toMatch(
            new RegExp(`^${name}\\s+\\d+\\s+\\d+\\s+(\\d+|\\?)\\s+this replica\\s+-$`)
          )
        }
        expect(lines.at(-1)).toBe(
          "backends: 1 replica, 1 healthy, 0 ejected, 0 with the circuit open (details: backends)"
        )
        const status = JSON.parse(succeeded(asJson))
        expect(status.object).toBe("status")
        expect(status.projections.map((p: { name: string }) => p.name).sort()).toEqual([
          "dead_letters",
          "request_log",
          "usage_hourly"
        ])
        expect(status.projections[0]).toMatchObject({ leader: true, last_error: null })
        expect(status.backends).toEqual({ total: 1, healthy: 1, ejected: 0, circuit_open: 0 })
      }),
    { timeout: 60_000, concurrent: true }
  )

  it("a key and a tenant bound to no policy: shown as '-'", () => {
    const limits = {
      requests_per_minute: null,
      tokens_per_minute: null,
      concurrent_requests: null,
      budget_usd: null,
      budget_period: null
    }
    const created_at = "2026-11-21T00:00:00.000Z"
    const key: AdminViews.ApiKey = {
      id: "key_1",
      object: "api_key",
      tenant: "t",
      name: "n",
      prefix: "gw-abcd",
      models: null,
      limits,
      scopes: [],
      policy: null,
      created_at,
      revoked_at: null,
      revoked_reason: null
    }
    const tenant: AdminViews.Tenant = {
      id: "t",
      object: "tenant",
      name: "t",
      limits,
      policy: null,
      created_at
    }
    expect(AdminOptions.keyFields(key)).toContain("policy    -")
    expect(AdminOptions.tenantFields(tenant)).toContain("policy    -")
  })

  it.effect(
    "a wrong or missing admin key, or no gateway at the URL: a clear error, non-zero exit",
    () =>
      Effect.gen(function* () {
        const { gateway } = yield* Stack
        const unused = yield* Processes.freePort
        const [wrong, missing] = yield* Effect.all(
          [
            cli(["keys", "list"], { GATEWAY_URL: gateway.url, ADMIN_KEY: "gw-not-the-admin-key" }),
            cli(["usage"], { GATEWAY_URL: gateway.url })
          ],
          { concurrency: "unbounded" }
        )
        expect(wrong.code).not.toBe(0)
        expect(wrong.stdout).toBe("")
        expect(wrong.stderr.trim()).toBe(
          "error: Incorrect API key provided. You can find your API keys with your gateway's administrator."
        )
        expect(missing.code).not.toBe(0)
        expect(missing.stderr.trim()).toBe(
          "error: no admin key: set ADMIN_KEY or pass --admin-key (the gateway's ADMIN_KEY)."
        )
        // Nothing listening, or something that is not the gateway's RPC API (the simulator): the
        // client's error names the URL (in this process: fewer CLI processes, and the CLI prints
        // any error's message the same way).
        const { sim } = yield* Stack
        const callAt = (url: string) =>
          Gateway.call((client) => client.Keys.list({})).pipe(
            Effect.provide(Gateway.layer({ url, adminKey: Redacted.make(adminKey) })),
            Effect.flip
          )
        const [unreachable, notTheApi] = yield* Effect.all([
          callAt(`http://127.0.0.1:${unused}/`),
          callAt(sim.url)
        ])
        expect(unreachable).toMatchObject({
          _tag: "GatewayError",
          reason: "Unreachable",
          message: `cannot reach the gateway at http://127.0.0.1:${unused}: connection refused (is the gateway running there? set --url or GATEWAY_URL)`
        })
        expect(notTheApi).toMatchObject({ _tag: "GatewayError", reason: "Unreachable" })
        expect(notTheApi.message).toMatch(
          new RegExp(
            `^the gateway at ${sim.url} answered HTTP 404 at /rpc \\(is it a gateway with the internal RPC API\\?\\)$`
          )
        )
      }),
    { timeout: 60_000, concurrent: true }
  )
})
