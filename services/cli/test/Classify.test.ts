/**
 * `classify explain|eval` as an operator runs them, through the CLI's own parser and handlers:
 * the printed metrics of the labelled fixture are checked against the classifier, the tokenizer
 * and the config's prices computed here independently; a config of our own, `--policy`, and the
 * errors for a malformed line, an unknown policy and a missing file are said plainly.
 */
import { mkdtempSync, readFileSync, writeFileSync } from "node:fs"
import { tmpdir } from "node:os"
import { join } from "node:path"
import { fileURLToPath } from "node:url"
import { NodeContext } from "@effect/platform-node"
import { describe, expect, it } from "@effect/vitest"
import { Classifier, ConfigLoader, Tokenizer } from "@gateway/core"
import { type OpenAi, Routing } from "@gateway/domain"
import { Effect, Exit, Layer, Option } from "effect"
import * as Cli from "../src/Cli.js"
import * as Progress from "../src/Progress.js"
import * as RoutingOptions from "../src/RoutingOptions.js"

const fixture = fileURLToPath(new URL("./fixtures/classify.jsonl", import.meta.url))

/** The CLI on `args` without a database (these commands need none), its output captured. */
const runCli = (...args: Array<string>) =>
  Effect.gen(function* () {
    const stdout: Array<string> = []
    const stderr: Array<string> = []
    const console = yield* Effect.console
    const capture =
      (into: Array<string>) =>
      (...parts: ReadonlyArray<unknown>) =>
        Effect.sync(() => {
          into.push(...parts.map(String).join(" ").split("\n"))
        })
    const noDatabase = Layer.effectContext(Effect.dieMessage("no database in this test"))
    const exit = yield* Cli.run({ store: noDatabase, following: noDatabase })([
      "node",
      "gateway",
      ...args
    ]).pipe(
      Effect.provide(Progress.layerLines(0)),
      Effect.provide(NodeContext.layer),
      Effect.withConsole({ ...console, log: capture(stdout), error: capture(stderr) }),
      Effect.exit
    )
    const failure = Exit.isFailure(exit) ? exit.cause.toString() : ""
    return { exit, stdout: stdout.join("\n"), stderr: stderr.join("\n"), failure }
  })

/** The output's lines, trimmed, with runs of spaces as one: what a reader sees, without the padding. */
const squeeze = (text: string) => text.split("\n").map((line) => line.trim().replace(/\s+/g, " "))

// ---------------------------------------------------------------------------------------------
// The fixture, evaluated here without the command's code
// ---------------------------------------------------------------------------------------------

interface Line {
  readonly line: number
  readonly request: OpenAi.ChatCompletionRequest
  readonly label: Routing.Tier | undefined
}

const fixtureLines = (): ReadonlyArray<Line> =>
  readFileSync(fixture, "utf8")
    .split("\n")
    .flatMap((text, i) => {
      if (text.trim() === "") return []
      const { label, prompt, messages } = JSON.parse(text)
      const request = {
        model: "auto",
        messages: messages ?? [{ role: "user", content: prompt }]
      } as OpenAi.ChatCompletionRequest
      return [{ line: i + 1, request, label }]
    })

const embedded = Effect.runSync(
  Effect.flatMap(
    ConfigLoader.parse(RoutingOptions.embeddedConfig, readFileSync(RoutingOptions.embeddedConfig, "utf8")),
    (document) => ConfigLoader.fromUnknown(RoutingOptions.embeddedConfig, document)
  )
)

/** What `eval` must print for the fixture under the embedded `auto` policy. */
const expectedFor = (outputTokens: number, classifier = embedded.routing.classifier) => {
  const policy = embedded.routing.policies.find((p) => p.name === "auto")!
  const price = (model: string) => embedded.models.find((m) => m.name === model)!.pricing!
  const lines = fixtureLines()
  const confusion = Object.fromEntries(
    Routing.tiers.map((label) => [label, Object.fromEntries(Routing.tiers.map((t) => [t, 0]))])
  ) as Record<Routing.Tier, Record<Routing.Tier, number>>
  const perModel: Record<string, number> = {}
  let labelled = 0
  let correct = 0
  let policyCost = 0
  let baseline = 0
  let promptTokens = 0
  const misroutes: Array<{ line: number; score: number; label: Routing.Tier; model: string }> = []
  for (const { line, request, label } of lines) {
    const { tier, score } = Classifier.classify(request, classifier)
    const model = policy.tiers[tier]
    perModel[model] = (perModel[model] ?? 0) + 1
    const tokens = Tokenizer.countPrompt(request)
    promptTokens += tokens
    const cost = (m: string) =>
      (tokens * price(m).inputPerMillionUsd + outputTokens * price(m).outputPerMillionUsd) / 1e6
    policyCost += cost(model)
    baseline += cost(policy.tiers.complex)
    if (label === undefined) continue
    labelled++
    confusion[label][tier]++
    if (label === tier) correct++
    if (model !== policy.tiers[label]) misroutes.push({ line, score, label, model })
  }
  return { lines, labelled, correct, confusion, perModel, policyCost, baseline, promptTokens, misroutes }
}

describe("classify", () => {
  it("the fixture holds greetings, short questions and multi-part tasks, labelled and not", () => {
    const lines = fixtureLines()
    expect(lines.length).toBe(21)
    const count = (label: Routing.Tier | undefined) => lines.filter((l) => l.label === label).length
    expect([count("simple"), count("moderate"), count("complex"), count(undefined)]).toEqual([8, 6, 5, 2])
  })

  it.effect("eval prints the accuracy, the confusion matrix, the shares, the cost and the misroutes", () =>
    Effect.gen(function* () {
      const expected = expectedFor(256)
      const { exit, stdout, failure } = yield* runCli("classify", "eval", fixture)
      expect(Exit.isSuccess(exit), failure).toBe(true)
      const lines = stdout.split("\n")

      expect(lines[0]).toBe(
        `${fixture}: 21 requests, 19 labelled; policy auto (simple → small, moderate → small, complex → large)`
      )
      const accuracy = `${expected.correct}/${expected.labelled} = ${((100 * expected.correct) / expected.labelled).toFixed(1)}%`
      expect(stdout).toContain(`accuracy  ${accuracy}`)
      // The greetings and short factual questions are simple; nothing simple is called complex.
      expect(expected.confusion.simple).toEqual({ simple: 8, moderate: 0, complex: 0 })

      const row = (cells: ReadonlyArray<string | number>) => cells.join(" ").replace(/\s+/g, " ")
      const squeezed = squeeze(stdout)
      expect(squeezed).toContain(row(["label \\ predicted", "simple", "moderate", "complex", "total"]))
      for (const label of Routing.tiers) {
        const counts = Routing.tiers.map((t) => expected.confusion[label][t])
        expect(squeezed).toContain(row([label, ...counts, counts.reduce((a, b) => a + b, 0)]))
      }
      const share = (model: string) => `${((100 * (expected.perModel[model] ?? 0)) / 21).toFixed(1)}%`
      expect(squeezed).toContain(
        row(["small", "simple,", "moderate", expected.perModel.small ?? 0, share("small")])
      )
      expect(squeezed).toContain(row(["large", "complex", expected.perModel.large ?? 0, share("large")]))

      const usd = (amount: number) => `$${amount.toFixed(6)}`
      expect(stdout).toContain(
        `cost (${expected.promptTokens} prompt tokens counted with o200k_base, 256 completion tokens assumed per request)`
      )
      expect(squeezed).toContain(`under auto ${usd(expected.policyCost)}`)
      expect(squeezed).toContain(`all on large ${usd(expected.baseline)}`)
      const saved = expected.baseline - expected.policyCost
      expect(squeezed).toContain(`saved ${usd(saved)} (${((100 * saved) / expected.baseline).toFixed(1)}%)`)

      // The default thresholds send every labelled request of the fixture to its label's model.
      expect(expected.misroutes).toEqual([])
      expect(stdout).toContain("misroutes: none (every labelled request went to its label's model)")
    })
  )

  it.effect("eval lists the worst misroutes first: complex sent to small, the lowest score first", () =>
    Effect.gen(function* () {
      // The embedded config with stricter thresholds, under which complex requests are missed.
      const dir = mkdtempSync(join(tmpdir(), "classify-misroutes-"))
      const config = join(dir, "gateway.yaml")
      writeFileSync(
        config,
        readFileSync(RoutingOptions.embeddedConfig, "utf8").replace(
          /^routing:\n/m,
          "routing:\n  classifier:\n    thresholds: { moderate: 0.15, complex: 0.35 }\n"
        )
      )
      const strict = Routing.ClassifierConfig.make({ thresholds: { moderate: 0.15, complex: 0.35 } })
      const expected = expectedFor(256, strict)
      const { exit, stdout, failure } = yield* runCli("classify", "eval", fixture, "--config", config)
      expect(Exit.isSuccess(exit), failure).toBe(true)
      const lines = squeeze(stdout)
      expect(expected.misroutes.length).toBeGreaterThan(0)
      expect(stdout).toContain(
        `misroutes: ${expected.misroutes.length} of 19 labelled requests went to another model than their label's`
      )
      const worst = expected.misroutes
        .filter((m) => m.label === "complex" && m.model === "small")
        .sort((a, b) => a.score - b.score)
      const listed = lines
        .slice(lines.findIndex((l) => l.startsWith("misroutes:")) + 2)
        .map((l) => Number(l.trim().split(/\s+/)[0]))
      expect(listed.slice(0, worst.length)).toEqual(worst.map((m) => m.line))
      expect(listed.length).toBe(Math.min(10, expected.misroutes.length))
      expect(stdout).toMatch(/complex\s+moderate\s+small\s+0\.\d{4}\s+"Compare PostgreSQL and MongoDB/)
    })
  )

  it.effect("eval --json has the same numbers; --output-tokens changes the cost only", () =>
    Effect.gen(function* () {
      const expected = expectedFor(1000)
      const { exit, stdout, failure } = yield* runCli(
        "classify",
        "eval",
        fixture,
        "--output-tokens",
        "1000",
        "--json"
      )
      expect(Exit.isSuccess(exit), failure).toBe(true)
      const outcome = JSON.parse(stdout)
      expect(outcome).toMatchObject({
        policy: "auto",
        requests: 21,
        labelled: 19,
        correct: expected.correct,
        confusion: expected.confusion,
        outputTokens: 1000
      })
      expect(outcome.models).toEqual([
        { model: "small", tiers: ["simple", "moderate"], requests: expected.perModel.small ?? 0 },
        { model: "large", tiers: ["complex"], requests: expected.perModel.large ?? 0 }
      ])
      expect(outcome.cost.promptTokens).toBe(expected.promptTokens)
      expect(outcome.cost.completionTokens).toBe(21_000)
      expect(outcome.cost.policyMicroUsd / 1e6).toBeCloseTo(expected.policyCost, 9)
      expect(outcome.cost.baselineMicroUsd / 1e6).toBeCloseTo(expected.baseline, 9)
      expect(outcome.misroutes.map((m: { line: number }) => m.line).sort()).toEqual(
        expected.misroutes.map((m) => m.line).sort()
      )
    })
  )

  it.effect("explain: features, score, tier and the policy's model; --config and --policy", () =>
    Effect.gen(function* () {
      const simple = yield* runCli("classify", "explain", "What is the capital of France?")
      expect(Exit.isSuccess(simple.exit), simple.failure).toBe(true)
      const lines = squeeze(simple.stdout)
      expect(lines).toContain("policy auto (simple → small, moderate → small, complex → large)")
      expect(lines).toContain("tier simple")
      expect(lines).toContain("decision small")
      expect(lines.find((l) => l.startsWith("questions "))).toMatch(/^questions 1 4 1 0\.\d{4}$/)

      // A config of our own: three models, two policies, one of them in shadow mode.
      const dir = mkdtempSync(join(tmpdir(), "classify-test-"))
      const config = join(dir, "gateway.json")
      const model = (name: string) => ({ name, backends: [{ id: `${name}-1`, url: "http://127.0.0.1:9" }] })
      writeFileSync(
        config,
        JSON.stringify({
          models: [model("s"), model("m"), model("l")],
          routing: {
            classifier: {
              thresholds: { moderate: 0.05, complex: 0.2 },
              second_opinion: { model: "s", band: [0.01, 0.5] }
            },
            policies: [
              { name: "tiered", tiers: { simple: "s", moderate: "m", complex: "l" } },
              { name: "trial", tiers: { simple: "s", moderate: "s", complex: "l" }, shadow: true }
            ]
          }
        })
      )
      const prompt = "Explain why the sky is blue, step by step, and compare it with sunsets."
      const classification = Classifier.classify(
        { model: "tiered", messages: [{ role: "user", content: prompt }] },
        Routing.ClassifierConfig.make({
          thresholds: { moderate: 0.05, complex: 0.2 }
        })
      )
      const first = yield* runCli("classify", "explain", prompt, "--config", config)
      const explained = squeeze(first.stdout)
      expect(explained).toContain("policy tiered (simple → s, moderate → m, complex → l)")
      expect(explained).toContain(
        `score ${classification.score.toFixed(4)} (moderate from 0.05, complex from 0.2)`
      )
      expect(explained).toContain(`tier ${classification.tier}`)
      expect(explained).toContain(
        `decision ${{ simple: "s", moderate: "m", complex: "l" }[classification.tier]}`
      )
      expect(explained).toContain(
        "second opinion the score is in [0.01, 0.5]: the gateway asks s, whose tier, if it answers in time, replaces this one (not asked here)"
      )

      const shadow = yield* runCli(
        "classify",
        "explain",
        prompt,
        "--config",
        config,
        "--policy",
        "trial",
        "--json"
      )
      const json = JSON.parse(shadow.stdout)
      expect(json).toMatchObject({
        policy: "trial",
        shadow: true,
        tier: classification.tier,
        answeredBy: "l"
      })
      // Each feature's share adds up to the score.
      const sum = json.features.reduce((n: number, f: { contribution: number }) => n + f.contribution, 0)
      expect(sum).toBeCloseTo(classification.score, 3)

      // No pricing in this config: the cost is not made up.
      const unpriced = yield* runCli("classify", "eval", fixture, "--config", config)
      expect(Exit.isSuccess(unpriced.exit), unpriced.failure).toBe(true)
      expect(unpriced.stdout).toContain("policy tiered (simple → s, moderate → m, complex → l)")
      expect(unpriced.stdout).toContain("cost: not computed, no pricing in the config for s, m, l")
      const inBand = fixtureLines().filter(({ request }) => {
        const { score } = Classifier.classify(request, Routing.ClassifierConfig.make({}))
        return score >= 0.01 && score <= 0.5
      }).length
      expect(inBand).toBeGreaterThan(0)
      expect(unpriced.stdout).toContain(
        `${inBand} requests scored in the second opinion's band, where the gateway asks a model; this evaluates the heuristic alone.`
      )
    })
  )

  it.effect("errors: a malformed line, an unknown policy, a missing file", () =>
    Effect.gen(function* () {
      const dir = mkdtempSync(join(tmpdir(), "classify-test-"))
      const bad = join(dir, "bad.jsonl")
      writeFileSync(
        bad,
        [
          '{"prompt": "Hello", "label": "simple"}',
          "",
          '{"prompt": "Hi", "label": "trivial"}',
          '{"messages": [{"role": "robot", "content": "beep"}]}',
          "{not json",
          '{"label": "complex"}'
        ].join("\n")
      )
      const malformed = yield* runCli("classify", "eval", bad)
      expect(Exit.isFailure(malformed.exit)).toBe(true)
      const printed = printedError(malformed.exit).split("\n")
      // JSON.parse's own words differ between Node versions.
      expect(printed[3]).toMatch(/^ {2}line 5: not JSON \(.+\)$/)
      expect(printed.filter((_, i) => i !== 3)).toEqual([
        `error: ${bad}: 4 malformed lines`,
        `  line 3: "label" must be "simple", "moderate" or "complex", not "trivial"`,
        `  line 4: not a chat request: at messages.0.role: Expected "system" | "developer" | "user" | "assistant" | "tool" | "function", actual "robot"`,
        `  line 6: needs "messages" (a chat request's messages) or "prompt" (a string)`
      ])

      const policy = yield* runCli("classify", "eval", fixture, "--policy", "cheap")
      expect(printedError(policy.exit)).toBe(
        `error: ${RoutingOptions.embeddedConfig} has no routing policy 'cheap'; it has auto.`
      )
      const missing = yield* runCli("classify", "eval", join(dir, "absent.jsonl"))
      expect(printedError(missing.exit)).toBe(`error: ${join(dir, "absent.jsonl")}: no such file`)
      const noConfig = yield* runCli("classify", "explain", "hi", "--config", join(dir, "absent.yaml"))
      expect(printedError(noConfig.exit)).toContain(`Invalid gateway config ${join(dir, "absent.yaml")}`)
    })
  )
})

/** What the CLI prints on stderr for a failed run, as `main.ts` does. */
const printedError = (exit: Exit.Exit<unknown, unknown>) =>
  Exit.isFailure(exit) && exit.cause._tag === "Fail"
    ? Option.getOrElse(Cli.describeFailure(exit.cause.error), () => "")
    : `not a failure: ${exit}`
