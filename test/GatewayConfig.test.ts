/**
 * A gateway started with a bad config file refuses to run: it exits non-zero and says which field
 * is wrong, instead of serving with a half-understood config.
 */
import { describe, expect, it } from "@effect/vitest"
import { Effect } from "effect"
import * as Processes from "./support/Processes.js"

const backend = { id: "small-1", url: "http://127.0.0.1:9" }
const model = { name: "small", backends: [backend] }

const cases = [
  {
    problem: "a backend URL that is not an http(s) URL",
    config: { models: [{ name: "small", backends: [{ id: "small-1", url: "not a url" }] }] },
    field: "models.0.backends.0.url"
  },
  {
    problem: "a timeout that is not a number",
    config: { timeouts: { first_byte_ms: "fast" }, models: [model] },
    field: "timeouts.first_byte_ms"
  },
  {
    problem: "a misspelt key",
    config: { server: { max_body_size: 1024 }, models: [model] },
    field: "server.max_body_size"
  }
]

describe.concurrent("an invalid config file", () => {
  it.scopedLive.each(cases)("$problem: the gateway exits non-zero naming '$field'", ({ config, field }) =>
    Effect.gen(function* () {
      const { code, output } = yield* Processes.runGatewayToExit(yield* Processes.writeConfig(config))
      expect(code).not.toBe(0)
      expect(code).not.toBeNull()
      expect(output).toContain(field)
    })
  )

  it.scopedLive("a config file that does not exist: the gateway exits non-zero naming the path", () =>
    Effect.gen(function* () {
      const { code, output } = yield* Processes.runGatewayToExit("/nonexistent/gateway.yaml")
      expect(code).not.toBe(0)
      expect(output).toContain("/nonexistent/gateway.yaml")
    })
  )
})
