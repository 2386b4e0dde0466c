/**
 * `backends` as an operator reads it: the table of a healthy, an ejected and an open-circuit
 * replica; then the real CLI process against a real gateway whose replicas are in those three
 * states (a simulator, a port nothing listens on, a simulator that fails every request), its
 * `--json` the admin API's answer as is, and a wrong or missing admin key said plainly.
 */
import { execFile } from "node:child_process"
import { fileURLToPath } from "node:url"
import { describe, expect, it, layer } from "@effect/vitest"
import { Context, Effect, Layer } from "effect"
import { messages, postChat } from "../../../test/support/Http.js"
import * as Processes from "../../../test/support/Processes.js"
import * as Programs from "../../../test/support/Programs.js"
import type { Backend } from "../src/AdminViews.js"
import * as BackendsCommand from "../src/BackendsCommand.js"

const replica = (overrides: Partial<Backend> & Pick<Backend, "id">): Backend => ({
  model: "small",
  url: "http://10.0.0.1:8000",
  weight: 1,
  health: "healthy",
  ejected_at: null,
  circuit: {
    state: "closed",
    since: "2026-11-21T18:00:00.000Z",
    consecutive_failures: 0,
    window_requests: 0,
    window_failures: 0,
    opens: 0,
    retry_after_ms: 0,
    probes_in_flight: 0
  },
  in_flight: 0,
  ttft_ewma_ms: 0,
  latency_ewma_ms: 0,
  balancer_latency_ms: 0,
  queue_waiting: null,
  queue_running: null,
  requests: 0,
  failures: 0,
  last_error: null,
  last_check_at: "2026-11-21T18:05:00.000Z",
  last_check_ok: true,
  ...overrides
})

describe("BackendsCommand.render", () => {
  it("a healthy, an ejected and an open-circuit replica: one row each, the trouble visible", () => {
    const connectError =
      "Unreachable: connect ECONNREFUSED 10.0.0.2:8000\n    at TCPConnectWrap.afterConnect [as oncomplete] (node:net:1611:16)"
    const lines = BackendsCommand.render({
      object: "list",
      data: [
        replica({
          id: "small-1",
          in_flight: 12,
          ttft_ewma_ms: 84.4,
          latency_ewma_ms: 1520.6,
          queue_waiting: 3,
          queue_running: 8,
          requests: 10432,
          failures: 2,
          last_error: "Timeout: no first token within 30000 ms"
        }),
        replica({
          id: "small-2",
          url: "http://10.0.0.2:8000",
          health: "ejected",
          ejected_at: "2026-11-21T18:04:10.000Z",
          ttft_ewma_ms: 200,
          latency_ewma_ms: 2000,
          requests: 5120,
          failures: 41,
          last_error: connectError,
          last_check_ok: false
        }),
        replica({
          id: "large-1",
          model: "large",
          circuit: {
            state: "open",
            since: "2026-11-21T18:04:50.000Z",
            consecutive_failures: 5,
            window_requests: 0,
            window_failures: 0,
            opens: 2,
            retry_after_ms: 27_400,
            probes_in_flight: 0
          },
          ttft_ewma_ms: 310.5,
          latency_ewma_ms: 4200,
          requests: 987,
          failures: 77,
          last_error: "Http: 503 Service Unavailable"
        })
      ]
    })
    expect(lines).toEqual([
      "id       model  health   circuit             in_flight  ttft ms  latency ms  queue  requests  failures  last error",
      "small-1  small  healthy  closed                     12       84        1521    3/8     10432         2  Timeout: no first token within 30000 ms",
      "small-2  small  ejected  closed                      0      200        2000      -      5120        41  Unreachable: connect ECONNREFUSED 10.0.0.2:8000 at TCPConne…",
      "large-1  large  healthy  open, retry in 28s          0      311        4200      -       987        77  Http: 503 Service Unavailable"
    ])
    // The error on one line, cut with an ellipsis at 60 characters.
    expect(lines[2]!.slice(lines[0]!.indexOf("last error"))).toHaveLength(60)
  })

  it("a half-open breaker, a queue half scraped, no error yet; no replicas at all", () => {
    const [, row] = BackendsCommand.render({
      object: "list",
      data: [
        replica({
          id: "small-1",
          circuit: { ...replica({ id: "x" }).circuit, state: "half_open", probes_in_flight: 1 },
          queue_waiting: 0,
          queue_running: null
        })
      ]
    })
    expect(row).toMatch(/^small-1\s+small\s+healthy\s+half_open\s+0\s+0\s+0\s+0\/-\s+0\s+0\s+-$/)
    expect(BackendsCommand.render({ object: "list", data: [] })).toEqual(["No backends configured."])
  })
})

// ---------------------------------------------------------------------------------------------
// The CLI against a gateway
// ---------------------------------------------------------------------------------------------

const root = fileURLToPath(new URL("../../../", import.meta.url))
const adminKey = `gw-admin-backends-test-${crypto.randomUUID().replaceAll("-", "")}`

/** A gateway with a healthy replica, one nothing listens on, and one whose every answer is a 500. */
class Stack extends Context.Tag("test/cli/BackendsCommand/Stack")<
  Stack,
  { readonly gateway: Processes.Gateway }
>() {
  static readonly layer = Layer.scoped(
    Stack,
    Effect.gen(function* () {
      const [simPort, flakyPort, deadPort] = yield* Effect.all([
        Processes.freePort,
        Processes.freePort,
        Processes.freePort
      ])
      const sim = { model: "small", ttftMs: 1, itlMs: 1, outputTokens: 5, seed: 1 }
      const [, , gateway] = yield* Effect.all(
        [
          Processes.startSim({ ...sim, port: simPort }),
          Processes.startSim({ ...sim, port: flakyPort, errorRate: 1, errorStatus: 500 }),
          Processes.startGateway(
            {
              server: { host: "127.0.0.1" },
              models: [
                {
                  name: "small",
                  backends: [
                    { id: "small-1", url: `http://127.0.0.1:${simPort}` },
                    { id: "small-dead", url: `http://127.0.0.1:${deadPort}` }
                  ],
                  // One failed check ejects.
                  health: { interval_ms: 200, timeout_ms: 500, unhealthy_threshold: 1 }
                },
                {
                  name: "flaky",
                  backends: [{ id: "flaky-1", url: `http://127.0.0.1:${flakyPort}` }],
                  // One failed request opens the breaker, for ten minutes.
                  retry: { max_attempts: 1 },
                  circuit_breaker: { consecutive_failures: 1, cooldown_ms: 600_000 },
                  health: { active: false, eject_after_failures: 0 }
                }
              ]
            },
            { ADMIN_KEY: adminKey }
          )
        ],
        { concurrency: "unbounded" }
      )
      return { gateway }
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
  env: { readonly GATEWAY_URL: string; readonly ADMIN_KEY?: string }
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

const operator = (...args: ReadonlyArray<string>) =>
  Effect.flatMap(Stack, ({ gateway }) => cli(args, { GATEWAY_URL: gateway.url, ADMIN_KEY: adminKey }))

/** Asserts a successful run and returns its stdout. */
const succeeded = (run: Run): string => {
  expect({ code: run.code, stderr: run.stderr }, run.stdout).toEqual({ code: 0, stderr: "" })
  return run.stdout
}

/** `GET /admin/backends` straight from the gateway. */
const adminBackends = Effect.flatMap(Stack, ({ gateway }) =>
  Effect.promise(async () => {
    const res = await fetch(`${gateway.url}/admin/backends`, {
      headers: { authorization: `Bearer ${adminKey}` }
    })
    expect(res.status).toBe(200)
    return (await res.json()) as { object: "list"; data: Array<Record<string, any>> }
  })
)

/** The keys of a JSON value, nested ones as `a.b`: its shape without the values. */
const shape = (value: Record<string, unknown>, prefix = ""): Array<string> =>
  Object.entries(value).flatMap(([key, v]) =>
    typeof v === "object" && v !== null && !Array.isArray(v)
      ? shape(v as Record<string, unknown>, `${prefix}${key}.`)
      : [`${prefix}${key}`]
  )

/** What does not move between two reads a moment apart (no estimate, clock or check time). */
const settled = (b: Record<string, any>) => ({
  id: b.id,
  model: b.model,
  url: b.url,
  weight: b.weight,
  health: b.health,
  ejected_at: b.ejected_at,
  circuit: { state: b.circuit.state, since: b.circuit.since, opens: b.circuit.opens },
  requests: b.requests,
  failures: b.failures
})

layer(Stack.layer, { excludeTestServices: true })("CLI backends", (it) => {
  it.effect(
    "healthy, ejected and open-circuit replicas of a real gateway: the table, and --json as the API answers",
    () =>
      Effect.gen(function* () {
        const { gateway } = yield* Stack
        const failed = yield* postChat(gateway.url, { model: "flaky", messages, max_tokens: 5 }).pipe(
          Effect.tap((res) => Effect.promise(() => res.arrayBuffer())),
          Effect.map((res) => res.status)
        )
        expect(failed).toBe(500)
        yield* Processes.eventually(
          "small-dead is ejected and flaky-1's breaker open",
          Effect.map(adminBackends, ({ data }) => {
            const state = Object.fromEntries(data.map((b) => [b.id, `${b.health} ${b.circuit.state}`]))
            return state["small-dead"] === "ejected closed" && state["flaky-1"] === "healthy open"
              ? true
              : undefined
          }),
          "10 seconds"
        )

        const [table, asJson] = yield* Effect.all([operator("backends"), operator("backends", "--json")], {
          concurrency: "unbounded"
        })
        const direct = yield* adminBackends

        const lines = succeeded(table).trimEnd().split("\n")
        expect(lines[0]).toMatch(
          /^id\s+model\s+health\s+circuit\s+in_flight\s+ttft ms\s+latency ms\s+queue\s+requests\s+failures\s+last error$/
        )
        expect(lines).toHaveLength(4)
        const row = (id: string) => lines.find((line) => line.startsWith(`${id} `))
        expect(row("small-1")).toMatch(/^small-1\s+small\s+healthy\s+closed\s+0\s+\d+\s+\d+\s+-\s+0\s+0\s+-$/)
        // Why each one is in trouble: the failed health check, the backend's answer.
        expect(row("small-dead")).toMatch(
          /^small-dead\s+small\s+ejected\s+closed\s+0\s+\d+\s+\d+\s+-\s+0\s+0\s+Connect: ECONNREFUSED\b/
        )
        expect(row("flaky-1")).toMatch(
          /^flaky-1\s+flaky\s+healthy\s+open, retry in (600|5\d\d)s\s+0\s+\d+\s+\d+\s+-\s+1\s+1\s+Http: HTTP 500$/
        )

        // --json: the answer whole, every field of every replica, nothing renamed or dropped.
        const report = JSON.parse(succeeded(asJson))
        expect(report.object).toBe("list")
        expect(report.data.map((b: Record<string, unknown>) => shape(b))).toEqual(
          direct.data.map((b) => shape(b))
        )
        expect(report.data.map(settled)).toEqual(direct.data.map(settled))
        expect(report.data.map((b: Record<string, any>) => b.id)).toEqual([
          "small-1",
          "small-dead",
          "flaky-1"
        ])
      }),
    { timeout: 60_000, concurrent: true }
  )

  it.effect(
    "a wrong or missing admin key: the gateway's 401 or the missing key said plainly, non-zero exit",
    () =>
      Effect.gen(function* () {
        const { gateway } = yield* Stack
        const [wrong, missing] = yield* Effect.all(
          [
            cli(["backends"], { GATEWAY_URL: gateway.url, ADMIN_KEY: "gw-not-the-admin-key" }),
            cli(["backends", "--json"], { GATEWAY_URL: gateway.url })
          ],
          { concurrency: "unbounded" }
        )
        expect(wrong).toEqual({
          code: 1,
          stdout: "",
          stderr:
            "error: Incorrect API key provided. You can find your API keys with your gateway's administrator.\n"
        })
        expect(missing).toEqual({
          code: 1,
          stdout: "",
          stderr: "error: no admin key: set ADMIN_KEY or pass --admin-key (the gateway's ADMIN_KEY).\n"
        })
      }),
    { timeout: 60_000, concurrent: true }
  )
})
