/**
 * `dlq list|show|retry|discard` as an operator runs them: the real CLI process against a real
 * gateway (`store_payloads: full`, keys on) in front of a simulator that fails every attempt and
 * then heals. The letters are listed with their reason (table and `--json`), shown with their
 * lifecycle; a retry while the backend still fails is dead-lettered again (exit 1), a discard
 * records its reason, `--all` needs `--yes`, and once healed `retry --all --yes` completes the
 * rest; a second retry is refused with the gateway's message.
 */
import { execFile } from "node:child_process"
import { fileURLToPath } from "node:url"
import { expect, layer } from "@effect/vitest"
import { Context, Effect, Layer } from "effect"
import * as Admin from "../../../test/support/Admin.js"
import { messages, postChat } from "../../../test/support/Http.js"
import * as Processes from "../../../test/support/Processes.js"
import * as Programs from "../../../test/support/Programs.js"

const root = fileURLToPath(new URL("../../../", import.meta.url))
const adminKey = Admin.newAdminKey()
const model = "small"

class Stack extends Context.Tag("test/cli/Dlq/Stack")<
  Stack,
  { readonly sim: Processes.Sim; readonly gateway: Processes.Gateway }
>() {
  static readonly layer = Layer.scoped(
    Stack,
    Effect.gen(function* () {
      const simPort = yield* Processes.freePort
      const [sim, gateway] = yield* Effect.all(
        [
          Processes.startSim({ port: simPort, model, ttftMs: 1, itlMs: 1, outputTokens: 5, seed: 1 }),
          Processes.startGateway(
            {
              server: { host: "127.0.0.1" },
              pool: {
                retry: { max_attempts: 2, base_delay_ms: 5, max_delay_ms: 10 },
                circuit_breaker: { consecutive_failures: 1_000_000, minimum_requests: 1_000_000 },
                health: { active: false, eject_after_failures: 0 }
              },
              events: { store_payloads: "full" },
              models: [{ name: model, backends: [{ id: "small-1", url: `http://127.0.0.1:${simPort}` }] }]
            },
            Admin.authEnv(adminKey)
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

/** Runs the CLI as the operator of the test's gateway; the admin key is nowhere in its output. */
const operator = (...args: ReadonlyArray<string>) =>
  Effect.flatMap(Stack, ({ gateway }) =>
    Effect.async<Run>((resume) => {
      const inherited = Object.fromEntries(
        Object.entries(process.env).filter(
          ([key]) => key !== "NODE_OPTIONS" && key !== "ADMIN_KEY" && key !== "GATEWAY_URL"
        )
      )
      execFile(
        process.execPath,
        Programs.nodeArgs("services/cli/src/main.ts", args),
        { cwd: root, timeout: 60_000, env: { ...inherited, GATEWAY_URL: gateway.url, ADMIN_KEY: adminKey } },
        (error, stdout, stderr) =>
          resume(Effect.succeed({ code: error === null ? 0 : Number(error.code ?? -1), stdout, stderr }))
      )
    })
  ).pipe(
    Effect.tap((run) => {
      expect(run.stdout + run.stderr).not.toContain(adminKey)
    })
  )

const succeeded = (run: Run): string => {
  expect({ code: run.code, stderr: run.stderr }, run.stdout).toEqual({ code: 0, stderr: "" })
  return run.stdout
}

/** A chat request with `key`; its gateway request id. */
const ask = (key: string) =>
  Effect.flatMap(Stack, ({ gateway }) =>
    Effect.flatMap(postChat(gateway.url, { model, messages }, { headers: Admin.bearer(key) }), (res) =>
      Effect.map(
        Effect.promise(() => res.text()),
        () => ({ id: res.headers.get("x-gateway-request-id")!, status: res.status })
      )
    )
  )

/** The tenant's letters, once `check` holds of their ids (the projection follows the log). */
const lettersOf = (tenant: string, check: (ids: ReadonlyArray<string>) => boolean) =>
  Effect.flatMap(Stack, ({ gateway }) =>
    Processes.eventually(
      `tenant ${tenant}'s dead letters`,
      Effect.map(
        Admin.adminCall(gateway.url, adminKey, "GET", `/admin/dead-letters?tenant=${tenant}`),
        (list: { data: ReadonlyArray<{ id: string }> }) => {
          const ids = list.data.map((l) => l.id)
          return check(ids) ? ids : undefined
        }
      ),
      "10 seconds"
    )
  )

layer(Stack.layer, { excludeTestServices: true, timeout: "120 seconds" })("CLI dlq", (it) => {
  it.effect(
    "list, show, retry (failing, then healed, --all --yes), discard; exit codes and messages",
    () =>
      Effect.gen(function* () {
        const { sim, gateway } = yield* Stack
        const tenant = `dlq-${crypto.randomUUID().slice(0, 8)}`
        const key = yield* Admin.createKey(gateway.url, adminKey, { tenant, name: "app" })

        yield* Effect.scoped(
          Effect.gen(function* () {
            yield* sim.withConfig({ errorRate: 1, errorStatus: 503 })
            const sent = yield* Effect.all([ask(key.key), ask(key.key), ask(key.key)])
            expect(sent.map((s) => s.status)).toEqual([503, 503, 503])
            const [r1, r2, r3] = sent.map((s) => s.id)
            yield* lettersOf(tenant, (ids) => ids.length === 3)

            // list (table and --json) and show, while the backend still fails.
            const [table, asJson, shown] = yield* Effect.all(
              [
                operator("dlq", "list", "--tenant", tenant),
                operator("dlq", "list", "--tenant", tenant, "--json"),
                operator("dlq", "show", r1!)
              ],
              { concurrency: "unbounded" }
            )
            const lines = succeeded(table).trimEnd().split("\n")
            expect(lines[0]).toMatch(
              /^request\s+tenant\s+model\s+status\s+reason\s+attempts\s+dead at\s+retries\s+last retry\s+retryable$/
            )
            expect(lines).toHaveLength(4)
            for (const id of [r1, r2, r3]) {
              expect(lines.find((line) => line.startsWith(`${id} `))).toMatch(
                new RegExp(`^${id}\\s+${tenant}\\s+small\\s+503\\s+Http\\s+2\\s+\\S+Z\\s+0\\s+-\\s+yes$`)
              )
            }
            const page = JSON.parse(succeeded(asJson))
            expect(page.next_cursor).toBeNull()
            expect(page.data).toHaveLength(3)
            expect(page.data.find((l: { id: string }) => l.id === r1)).toMatchObject({
              object: "dead_letter",
              tenant,
              key_id: key.id,
              model,
              status: 503,
              reason: "Http",
              attempts: 2,
              retries: 0,
              retryable: true
            })
            const detail = succeeded(shown)
            expect(detail).toMatch(new RegExp(`^request\\s+${r1}$`, "m"))
            expect(detail).toMatch(/^reason\s+Http$/m)
            expect(detail).toMatch(/^retryable\s+yes$/m)
            expect(detail).toMatch(/^lifecycle \(8 events\)$/m)
            expect(detail).toMatch(/^ {2}v1 {2}\S+Z\s+\+0ms\s+RequestReceived\s+model=small\b/m)
            expect(detail).toMatch(/^ {2}v8 {2}\S+Z\s+\+\d+ms\s+RequestFailed\s+status=503\b/m)

            // A retry while it still fails: dead-lettered again, exit 1; a discard with its reason;
            // --all without --yes refused, nothing run.
            const [again, discarded, unconfirmed, mixed] = yield* Effect.all(
              [
                operator("dlq", "retry", r1!),
                operator("dlq", "discard", r3!, "--reason", "duplicate order"),
                operator("dlq", "retry", "--all", "--tenant", tenant),
                operator("dlq", "retry", r2!, "--all")
              ],
              { concurrency: "unbounded" }
            )
            expect(again.code).toBe(1)
            expect(again.stderr).toBe("")
            expect(again.stdout.trim()).toMatch(
              new RegExp(`^${r1}\\s+dead_lettered_again\\s+retry 1, status 503: \\S`)
            )
            expect(succeeded(discarded).trim()).toBe(
              `Discarded ${r3} (tenant ${tenant}, model small, Http after 2 attempts): duplicate order`
            )
            expect(unconfirmed).toMatchObject({ code: 1, stdout: "" })
            expect(unconfirmed.stderr).toMatch(/^error: --all runs every matching letter again .* add --yes/)
            expect(mixed).toMatchObject({ code: 1, stdout: "" })
            expect(mixed.stderr).toMatch(/^error: give one request id, or --all with filters/)
            return { r1: r1!, r2: r2!, r3: r3! }
          })
        ).pipe(
          // Healed: every letter of the tenant left (r1 after its failed retry, r2) completes.
          Effect.flatMap(({ r1, r2, r3 }) =>
            Effect.gen(function* () {
              yield* lettersOf(tenant, (ids) => ids.length === 2 && !ids.includes(r3))
              const all = yield* operator("dlq", "retry", "--all", "--yes", "--tenant", tenant)
              const out = succeeded(all).trimEnd().split("\n")
              expect(out.find((line) => line.startsWith(`${r1} `))).toMatch(
                /\scompleted\s+retry 2, status 200$/
              )
              expect(out.find((line) => line.startsWith(`${r2} `))).toMatch(
                /\scompleted\s+retry 1, status 200$/
              )
              expect(out.at(-1)).toBe("2 of 2 completed.")

              const [twice, gone, discardedShown] = yield* Effect.all(
                [
                  operator("dlq", "retry", r1, "--json"),
                  operator("dlq", "show", r2),
                  operator("dlq", "show", r3)
                ],
                { concurrency: "unbounded" }
              )
              for (const [run, id] of [
                [twice, r1],
                [gone, r2],
                [discardedShown, r3]
              ] as const) {
                expect(run).toEqual({
                  code: 1,
                  stdout: "",
                  stderr: `error: No dead-lettered request with id '${id}'.\n`
                })
              }
              yield* lettersOf(tenant, (ids) => ids.length === 0)
            })
          )
        )
      }),
    { timeout: 120_000 }
  )
})
