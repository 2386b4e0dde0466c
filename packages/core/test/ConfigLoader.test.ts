import { mkdtempSync, writeFileSync } from "node:fs"
import { tmpdir } from "node:os"
import { join } from "node:path"
import { NodeContext } from "@effect/platform-node"
import { describe, expect, it } from "@effect/vitest"
import { ConfigLoader } from "@gateway/core"
import { Effect, Either } from "effect"

const dir = mkdtempSync(join(tmpdir(), "gateway-config-"))
const file = (name: string, text: string) => {
  const path = join(dir, name)
  writeFileSync(path, text)
  return path
}

const load = (path: string) => ConfigLoader.load(path).pipe(Effect.either, Effect.provide(NodeContext.layer))

const detailOf = (result: Either.Either<unknown, ConfigLoader.ConfigError>) => {
  if (Either.isRight(result)) throw new Error("expected the config to be rejected")
  return result.left.message
}

const valid = {
  models: [
    { name: "small", backends: [{ id: "s1", url: "http://127.0.0.1:8101" }] },
    {
      name: "large",
      upstream_model: "meta-llama/Llama-3.1-70B-Instruct",
      backends: [
        { id: "l1", url: "http://10.0.0.1:8000/v1", api_key_env: "LARGE_KEY" },
        { id: "l2", url: "https://llm.internal", weight: 2 }
      ],
      timeouts: { first_byte_ms: 1000 }
    }
  ]
}

describe("ConfigLoader", () => {
  it.effect("loads JSON, applies defaults and maps snake_case keys", () =>
    Effect.gen(function* () {
      const config = Either.getOrThrow(yield* load(file("ok.json", JSON.stringify(valid))))
      expect(config.server.port).toBe(8080)
      expect(config.server.maxBodyBytes).toBe(4 * 1024 * 1024)
      expect(config.models[1]!.upstreamModel).toBe("meta-llama/Llama-3.1-70B-Instruct")
      expect(config.models[1]!.backends[0]!.apiKeyEnv).toBe("LARGE_KEY")
      expect(config.models[1]!.backends[1]!.weight).toBe(2)
      expect(config.models[0]!.backends[0]!.weight).toBe(1)
    })
  )

  it.effect("merges a model's timeouts over the global ones", () =>
    Effect.gen(function* () {
      const config = Either.getOrThrow(yield* load(file("timeouts.json", JSON.stringify(valid))))
      const large = config.timeoutsFor(config.models[1]!)
      expect(large.firstByteMs).toBe(1000)
      expect(large.totalMs).toBe(config.timeouts.totalMs)
      expect(config.timeoutsFor(config.models[0]!)).toBe(config.timeouts)
    })
  )

  it.effect("loads YAML by extension", () =>
    Effect.gen(function* () {
      const yaml = `
server:
  port: 9000
  max_body_bytes: 1024
models:
  - name: small
    backends:
      - id: s1
        url: http://127.0.0.1:8101
`
      const config = Either.getOrThrow(yield* load(file("ok.yaml", yaml)))
      expect(config.server.port).toBe(9000)
      expect(config.server.maxBodyBytes).toBe(1024)
    })
  )

  it.effect("names the bad field", () =>
    Effect.gen(function* () {
      const badUrl = structuredClone(valid)
      badUrl.models[0]!.backends[0]!.url = "localhost:8101"
      expect(detailOf(yield* load(file("bad-url.json", JSON.stringify(badUrl))))).toMatch(
        /models\.0\.backends\.0\.url: .*http/
      )

      const badPort = { ...valid, server: { port: "eighty" } }
      expect(detailOf(yield* load(file("bad-port.json", JSON.stringify(badPort))))).toContain("server.port")

      const badTimeout = { ...valid, timeouts: { total_ms: -1 } }
      expect(detailOf(yield* load(file("bad-timeout.json", JSON.stringify(badTimeout))))).toContain(
        "timeouts.total_ms"
      )

      const missing = { models: [{ name: "x" }] }
      expect(detailOf(yield* load(file("missing.json", JSON.stringify(missing))))).toMatch(
        /models\.0\.backends: is missing/
      )
    })
  )

  it.effect("rejects misspelt keys instead of ignoring them", () =>
    Effect.gen(function* () {
      const typo = { ...valid, server: { max_body_byte: 10 } }
      expect(detailOf(yield* load(file("typo.json", JSON.stringify(typo))))).toContain("max_body_byte")
    })
  )

  it.effect("rejects duplicate model names and backend ids, naming the duplicate", () =>
    Effect.gen(function* () {
      const dupModel = {
        models: [valid.models[0], { ...valid.models[0], backends: [{ id: "s9", url: "http://h" }] }]
      }
      expect(detailOf(yield* load(file("dup-model.json", JSON.stringify(dupModel))))).toMatch(
        /models\.1\.name: duplicate model name 'small'/
      )
      const dupBackend = {
        models: [valid.models[0], { name: "other", backends: [{ id: "s1", url: "http://h" }] }]
      }
      expect(detailOf(yield* load(file("dup-backend.json", JSON.stringify(dupBackend))))).toMatch(
        /models\.1\.backends\.0\.id: duplicate backend id 's1'/
      )
    })
  )

  it.effect("reports unreadable and unparsable files with their path", () =>
    Effect.gen(function* () {
      expect(detailOf(yield* load(join(dir, "nope.json")))).toContain("cannot read file")
      const broken = file("broken.json", "{ models: ")
      expect(detailOf(yield* load(broken))).toContain(broken)
      expect(detailOf(yield* load(file("empty.json", "{}")))).toMatch(/models: is missing/)
    })
  )
})
