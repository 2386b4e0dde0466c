/**
 * The embedded default, as a newcomer runs it (`pnpm start`: no config, no database, no Redis):
 * the first start creates the tenant `dev` and its key and prints both keys; the key works at once,
 * limits hold in memory, usage is on the books in the embedded database; a restart on the same
 * data keeps the key (printed by its prefix only) and creates no other.
 */
import { expect, it } from "@effect/vitest"
import { Effect } from "effect"
import * as Admin from "./support/Admin.js"
import { postChat } from "./support/Http.js"
import * as Processes from "./support/Processes.js"

const messages = [{ role: "user", content: "Hello!" }]

/** Starts the embedded default on `dataDir`; resolves once it answers and has printed its banner. */
const startEmbedded = (dataDir: string) =>
  Effect.gen(function* () {
    const port = yield* Processes.freePort
    const child = yield* Processes.spawnNode("gateway (embedded)", "services/gateway/src/main.ts", [], {
      DATA_DIR: dataDir,
      PORT: String(port),
      HOST: "127.0.0.1",
      LOG_LEVEL: "info"
    })
    const url = `http://127.0.0.1:${port}`
    const banner = yield* Processes.eventually(
      "the embedded gateway prints its banner and answers /health",
      Effect.promise(async () => {
        if (child.exitCode() !== undefined) throw new Error(`exited:\n${child.output()}`)
        const printed = child.stdout.find((line) => line.includes("dev key"))
        if (printed === undefined) return undefined
        const health = await fetch(`${url}/health`).then(
          (res) => res.status,
          () => 0
        )
        return health === 200 ? child.stdout.join("\n") : undefined
      }),
      "30 seconds"
    )
    return { url, banner, child }
  })

const devKeyIn = (banner: string) => /dev key +(gw-[0-9A-Za-z]{43}) /.exec(banner)?.[1]
const adminKeyIn = (banner: string) => /admin key +(gw-[0-9A-Za-z]{43}) /.exec(banner)?.[1]

it.live(
  "the embedded default makes a dev key once, serves it with limits in memory, and keeps it across restarts",
  () =>
    Effect.gen(function* () {
      const dataDir = yield* Processes.tempDir

      const devKey = yield* Effect.scoped(
        Effect.gen(function* () {
          const { url, banner } = yield* startEmbedded(dataDir)
          const devKey = devKeyIn(banner)
          const adminKey = adminKeyIn(banner)
          expect(devKey, banner).toBeDefined()
          expect(adminKey, banner).toBeDefined()

          const ok = yield* postChat(url, { model: "small", messages }, { headers: Admin.bearer(devKey!) })
          expect(ok.status).toBe(200)
          const answer = (yield* Effect.promise(() => ok.json())) as { usage: { total_tokens: number } }
          expect(answer.usage.total_tokens).toBeGreaterThan(0)
          const anonymous = yield* postChat(url, { model: "small", messages })
          expect(anonymous.status).toBe(401)

          // Limits hold in the gateway's memory.
          const limited = yield* Admin.createKey(url, adminKey!, {
            tenant: "dev",
            name: "limited",
            limits: { requests_per_minute: 2 }
          })
          const statuses: Array<number> = []
          for (let i = 0; i < 3; i++) {
            const res = yield* postChat(
              url,
              { model: "small", messages },
              { headers: Admin.bearer(limited.key) }
            )
            yield* Effect.promise(() => res.arrayBuffer())
            statuses.push(res.status)
          }
          expect(statuses).toEqual([200, 200, 429])
          const status = yield* Admin.adminCall(url, adminKey!, "GET", "/admin/limiter")
          expect(status.store).toBe("memory")

          // Usage is on the books in the embedded database.
          const key = (yield* Admin.adminCall(url, adminKey!, "GET", "/admin/keys?tenant=dev")).data.find(
            (k: Admin.KeyView) => k.name === "dev"
          ) as Admin.KeyView
          yield* Processes.eventually(
            "the dev key's request in usage_hourly",
            Effect.map(Admin.usage(url, adminKey!, { key: key.id }), (u) =>
              u.total.requests === 1 ? true : undefined
            ),
            "10 seconds"
          )
          return devKey!
        })
      )

      // Restarted on the same data: the same key works; none is printed or made again.
      const { url, banner } = yield* startEmbedded(dataDir)
      expect(devKeyIn(banner)).toBeUndefined()
      expect(banner).toContain(`dev key      ${devKey.slice(0, 7)}…`)
      const again = yield* postChat(url, { model: "small", messages }, { headers: Admin.bearer(devKey) })
      expect(again.status).toBe(200)
      const adminKey = adminKeyIn(banner)!
      const devKeys = (yield* Admin.adminCall(url, adminKey, "GET", "/admin/keys?tenant=dev")).data.filter(
        (k: Admin.KeyView) => k.name === "dev"
      )
      expect(devKeys).toHaveLength(1)
    }).pipe(Effect.scoped),
  90_000
)
