/**
 * The embedded default (`pnpm start` with no `GATEWAY_CONFIG`): one simulated model server per
 * loopback backend of the bundled config, started in this process before the gateway, and a
 * banner saying what runs and how to call it.
 */
import { BackendSim } from "@gateway/backend-sim"
import type { GatewayConfig } from "@gateway/domain"
import { Console, Effect, Layer } from "effect"
import * as Gateway from "./Gateway.js"

/** Latency profiles that make the demo feel like a small and a large model. */
const profiles: Record<
  string,
  { readonly ttftMs: number; readonly itlMs: number; readonly outputTokens: number }
> = {
  small: { ttftMs: 25, itlMs: 8, outputTokens: 24 },
  large: { ttftMs: 120, itlMs: 20, outputTokens: 48 }
}

const isLoopback = (url: URL) =>
  url.hostname === "127.0.0.1" || url.hostname === "localhost" || url.hostname === "[::1]"

const banner = (
  port: number,
  host: string,
  models: ReadonlyArray<string>,
  sims: ReadonlyArray<string>,
  access: { readonly secret: string | undefined; readonly prefix: string | undefined },
  adminKey: string | undefined
) => {
  const base = `http://${host === "0.0.0.0" ? "127.0.0.1" : host}:${port}`
  const key = access.secret ?? "$GATEWAY_KEY"
  return [
    "",
    "  LLM gateway — embedded default",
    `  listening    ${base}`,
    `  models       ${models.join(", ")}`,
    ...sims.map((s) => `  simulated    ${s}`),
    access.secret !== undefined
      ? `  dev key      ${access.secret}   (tenant "dev"; shown this once — keep it)`
      : `  dev key      ${access.prefix ?? "none"}…   (shown on the first start; make another with the admin key below)`,
    ...(adminKey === undefined
      ? []
      : [`  admin key    ${adminKey}   (this run only; set ADMIN_KEY to choose it)`]),
    "",
    "  Try it:",
    `    curl ${base}/v1/chat/completions -H "Authorization: Bearer ${key}" -H 'content-type: application/json' \\`,
    `      -d '{"model":"${models[0]}","messages":[{"role":"user","content":"Hello!"}],"stream":true}'`,
    ...(access.secret === undefined && adminKey !== undefined
      ? [
          "",
          "  A new key:",
          `    curl ${base}/admin/keys -H "Authorization: Bearer ${adminKey}" -H 'content-type: application/json' \\`,
          `      -d '{"tenant":"dev","name":"laptop"}'`
        ]
      : []),
    "",
    `  OpenAI SDK: new OpenAI({ baseURL: "${base}/v1", apiKey: "${key}" })`,
    ""
  ].join("\n")
}

/**
 * Simulators for the config's loopback backends, then `gateway`, then the banner. The simulators
 * close after the gateway has: a shutdown drains the answers they are streaming first.
 */
export const layer = <E, R>(
  config: GatewayConfig.GatewayConfig,
  gateway: Layer.Layer<Gateway.DevAccess, E, R>,
  generatedAdminKey: string | undefined
) =>
  Layer.unwrapScoped(
    Effect.gen(function* () {
      const sims: Array<string> = []
      for (const model of config.models) {
        for (const backend of model.backends) {
          const url = new URL(backend.url)
          if (!isLoopback(url)) continue
          const sim = yield* BackendSim.make({
            port: Number(url.port),
            host: url.hostname === "localhost" ? "127.0.0.1" : url.hostname.replace(/^\[|\]$/g, ""),
            model: model.upstreamModel ?? model.name,
            ...profiles[model.name]
          })
          sims.push(`${backend.id} (${model.name}) at ${sim.url}`)
        }
      }
      const announce = Layer.effectDiscard(
        Effect.flatMap(Gateway.DevAccess, (access) =>
          Console.log(
            banner(
              config.server.port,
              config.server.host,
              config.models.map((m) => m.name),
              sims,
              access,
              generatedAdminKey
            )
          )
        )
      )
      return Layer.provideMerge(announce, gateway)
    })
  )
