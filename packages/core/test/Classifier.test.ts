import { describe, expect, it } from "@effect/vitest"
import * as Classifier from "@gateway/core/Classifier"
import { OpenAi, Routing } from "@gateway/domain"
import { Schema } from "effect"

const decodeRequest = Schema.decodeUnknownSync(OpenAi.ChatCompletionRequest)
const decodeClassifier = Schema.decodeUnknownSync(Routing.ClassifierConfig)

/** A request with `messages` (the wire shape), validated as the gateway validates it. */
const request = (messages: ReadonlyArray<unknown>, rest: Record<string, unknown> = {}) =>
  decodeRequest({ model: "auto", messages, ...rest })

const user = (content: unknown) => ({ role: "user", content })
const assistant = (content: unknown) => ({ role: "assistant", content })
const system = (content: unknown) => ({ role: "system", content })
const text = (t: string) => ({ type: "text", text: t })
const image = { type: "image_url", image_url: { url: "data:image/png;base64,aGVsbG8gd29ybGQ=" } }

/** The config a gateway gets with no `classifier` section. */
const defaults = decodeClassifier({})

const featuresOf = (content: unknown, rest: Record<string, unknown> = {}) =>
  Classifier.features(request([user(content)], rest), defaults.scales)

const snake = (key: string) => key.replace(/[A-Z]/g, (c) => `_${c.toLowerCase()}`)
const featureNames = Object.keys(Routing.defaultWeights) as ReadonlyArray<keyof Routing.Features>

/** A classifier config in the file's shape where only `feature` weighs. */
const only = (feature: keyof Routing.Features, rest: Record<string, unknown> = {}) =>
  decodeClassifier({
    weights: Object.fromEntries(featureNames.map((name) => [snake(name), name === feature ? 1 : 0])),
    ...rest
  })

/** Every feature at zero. */
const zero: Routing.Features = {
  lastTurnTokens: 0,
  contextTokens: 0,
  turns: 0,
  systemTokens: 0,
  code: 0,
  math: 0,
  reasoning: 0,
  questions: 0,
  constraints: 0,
  outputTokens: 0,
  tools: 0,
  jsonSchema: false
}

const tool = (name: string) => ({
  type: "function",
  function: { name, parameters: { type: "object", properties: {} } }
})

/** Plain prose without a single cue word, question mark, digit or code-looking line. */
const prose = (chars: number) => {
  const sentence = "The quick brown fox jumps over the lazy dog near the old river bank. "
  return sentence.repeat(Math.ceil(chars / sentence.length)).slice(0, chars)
}

describe("Classifier.features: sizes", () => {
  it("counts the last user turn apart from the whole context, at 4 characters a token (rounded up)", () => {
    const f = Classifier.features(
      request([
        system("s".repeat(400)),
        user("u".repeat(40)),
        assistant("a".repeat(80)),
        user("x".repeat(13)),
        assistant(null)
      ]),
      defaults.scales
    )
    expect(f.lastTurnTokens).toBe(4)
    expect(f.contextTokens).toBe(Math.ceil((400 + 40 + 80 + 13) / 4))
    expect(f.systemTokens).toBe(100)
  })

  it("counts user and assistant messages as turns; system, developer and tool messages are not turns", () => {
    const f = Classifier.features(
      request([
        system("be brief"),
        { role: "developer", content: "d".repeat(40) },
        user("what is the weather"),
        {
          role: "assistant",
          content: null,
          tool_calls: [{ id: "c1", type: "function", function: { name: "weather", arguments: "{}" } }]
        },
        { role: "tool", tool_call_id: "c1", content: "t".repeat(20) },
        assistant("sunny"),
        user("thanks")
      ]),
      defaults.scales
    )
    expect(f.turns).toBe(4)
    // System and developer messages are both instructions.
    expect(f.systemTokens).toBe(Math.ceil(("be brief".length + 40) / 4))
    // The tool result is context.
    expect(f.contextTokens).toBe(Math.ceil((8 + 40 + 19 + 20 + 5 + 6) / 4))
    expect(f.lastTurnTokens).toBe(Math.ceil("thanks".length / 4))
  })

  it("counts the text features in the last user turn only, even when other messages follow it", () => {
    const earlier = "Explain why, step by step? ```\nconst x = 1;\n``` and 2 + 2 = 4. You must do it."
    const f = Classifier.features(
      request([system(earlier), user(earlier), assistant(earlier), user("thanks"), assistant(earlier)]),
      defaults.scales
    )
    expect({ ...f, lastTurnTokens: 0, contextTokens: 0, systemTokens: 0, turns: 0 }).toEqual(zero)
    expect(f.turns).toBe(4)

    const last = Classifier.features(request([user("thanks"), user(earlier)]), defaults.scales)
    expect(last.code).toBeGreaterThan(0)
    expect(last.math).toBeGreaterThan(0)
    expect(last.reasoning).toBeGreaterThan(0)
    expect(last.questions).toBe(1)
    expect(last.constraints).toBeGreaterThan(0)
  })

  it("has no last turn when no user message is there", () => {
    const f = Classifier.features(request([system("Explain why?"), assistant("ok")]), defaults.scales)
    expect(f.lastTurnTokens).toBe(0)
    expect(f.turns).toBe(1)
    expect(f.reasoning).toBe(0)
    expect(f.questions).toBe(0)
  })
})

describe("Classifier.features: text", () => {
  it("counts code fences (a pair is one block; an unclosed fence counts)", () => {
    expect(featuresOf("Here it is:\n```\nhello there\n```").code).toBe(1)
    expect(featuresOf("```\nhello\n```\nand\n```\nworld\n```").code).toBe(2)
    expect(featuresOf("```\nhello").code).toBe(1)
    expect(featuresOf("no fences here, just words").code).toBe(0)
  })

  it("counts lines that look like code", () => {
    for (const line of [
      "import os",
      "from collections import deque",
      "return x",
      "const a = 1",
      "let b = 2",
      "#include <stdio.h>",
      "SELECT * FROM users",
      "x = 1;",
      "if (a) {",
      "xs.map(x => x)",
      "print(x):"
    ]) {
      expect([line, featuresOf(line).code]).toEqual([line, 1])
    }
    expect(featuresOf("import os\nreturn x\nlet b = 2").code).toBe(3)
    // Keywords are code only at the start of a line, and SQL only in capitals.
    expect(featuresOf("Please return the book and select a new one; it is late").code).toBe(0)
  })

  it("counts math: LaTeX, operators between numbers, math symbols", () => {
    expect(featuresOf("Solve $x^2 = 4$ for x").math).toBe(1)
    expect(featuresOf("what is \\frac{a}{b}").math).toBe(1)
    expect(featuresOf("\\sqrt{2} \\le 2").math).toBe(2)
    expect(featuresOf("\\int_0^1 f \\cdot g").math).toBe(2)
    expect(featuresOf("3 + 4").math).toBe(1)
    expect(featuresOf("3+4").math).toBe(1)
    expect(featuresOf("12 * (3").math).toBe(1)
    expect(featuresOf("6/2 and 7^2 and 5 = 5 and 4 < 9").math).toBe(4)
    expect(featuresOf("∑ ≤ √").math).toBe(3)
    // Numbers without an operator between them, and operators between words, are not math.
    expect(featuresOf("I have 2 cats and 3 dogs; a - b is a dash").math).toBe(0)
    expect(featuresOf("\\left( \\infty").math).toBe(0)
  })

  it("counts reasoning cues, whole words in any case", () => {
    expect(featuresOf("Explain why, step by step, then compare.").reasoning).toBe(4)
    expect(featuresOf("EXPLAIN").reasoning).toBe(1)
    expect(featuresOf("Design the architecture and analyse the trade-offs").reasoning).toBe(4)
    expect(featuresOf("pros and cons, in depth, think through, step-by-step").reasoning).toBe(4)
    // Not a whole word.
    expect(featuresOf("he explained the whys of redesigning").reasoning).toBe(0)
  })

  it("counts question marks", () => {
    expect(featuresOf("What? Where? When?").questions).toBe(3)
    expect(featuresOf("Tell me.").questions).toBe(0)
  })

  it("counts constraints: words, and numbered or bulleted list items", () => {
    expect(featuresOf("You must use at least two sources, without quotes.").constraints).toBe(3)
    expect(featuresOf("should only do exactly no more than").constraints).toBe(4)
    expect(featuresOf("don't avoid required ensure make sure do not at most").constraints).toBe(7)
    expect(featuresOf("1. one\n2) two\n- three\n* four\n• five").constraints).toBe(5)
    expect(featuresOf("Steps:\n  - indented item").constraints).toBe(1)
    // A negative number and a decimal at the start of a line are not list items.
    expect(featuresOf("-5 degrees\n1.5 apples").constraints).toBe(0)
  })
})

describe("Classifier.features: request options", () => {
  it("takes the output tokens from max_completion_tokens, else max_tokens, else 0", () => {
    expect(featuresOf("hi", { max_completion_tokens: 700, max_tokens: 50 }).outputTokens).toBe(700)
    expect(featuresOf("hi", { max_tokens: 50 }).outputTokens).toBe(50)
    expect(featuresOf("hi", { max_tokens: null }).outputTokens).toBe(0)
    expect(featuresOf("hi").outputTokens).toBe(0)
  })

  it("counts the tools offered", () => {
    expect(featuresOf("hi", { tools: [tool("a"), tool("b"), tool("c")] }).tools).toBe(3)
    expect(featuresOf("hi", { tools: [] }).tools).toBe(0)
    expect(featuresOf("hi").tools).toBe(0)
  })

  it("notes a json_schema response format (json_object and text are not)", () => {
    const schema = { type: "json_schema", json_schema: { name: "answer", schema: { type: "object" } } }
    expect(featuresOf("hi", { response_format: schema }).jsonSchema).toBe(true)
    expect(featuresOf("hi", { response_format: { type: "json_object" } }).jsonSchema).toBe(false)
    expect(featuresOf("hi", { response_format: { type: "text" } }).jsonSchema).toBe(false)
    expect(featuresOf("hi").jsonSchema).toBe(false)
  })
})

describe("Classifier.features: content parts", () => {
  const cues = "Explain why? ```\nconst x = 1;\n``` 2 + 2 = 4, you must\n- do it"

  it("counts text parts like a string, and image parts not at all", () => {
    const asString = featuresOf(cues)
    const asParts = featuresOf([text(cues), image])
    const { lastTurnTokens: _a, ...textFeatures } = asString
    const { lastTurnTokens: _b, ...partFeatures } = asParts
    expect(partFeatures).toEqual(textFeatures)
    // An image only: no text, no size.
    const imageOnly = featuresOf([image])
    expect([imageOnly.lastTurnTokens, imageOnly.contextTokens]).toEqual([0, 0])
    expect({ ...imageOnly, turns: 0 }).toEqual(zero)
  })

  it("scans every text part of the last turn, each starting a line", () => {
    const f = featuresOf([text("Explain this"), image, text("import os"), text("why?")])
    expect(f.reasoning).toBe(2)
    expect(f.code).toBe(1)
    expect(f.questions).toBe(1)
  })

  // BUG (Classifier.ts `textOf`/`features`): `lastTurnTokens` is taken from `textOf`, which adds a
  // "\n" after every text part, while `contextTokens` uses `lengthOf` (the parts' characters), so a
  // turn given as parts counts one character per part more than the same text as a string, and
  // more than the whole context. Flip to `it` once fixed.
  it("sizes a turn given as text parts like the same text as a string", () => {
    const asString = featuresOf("x".repeat(400))
    const asParts = featuresOf([text("x".repeat(400)), image])
    expect(asParts.contextTokens).toBe(asString.contextTokens)
    expect(asParts.lastTurnTokens).toBe(asString.lastTurnTokens)
  })
})

describe("Classifier.features: the scan cap", () => {
  const scanChars = 16_384

  it("classifies a 32k-token last turn, reading its cues from the first 16,384 characters only", () => {
    const cues = "Explain why? ```\nconst x = 1;\n``` 2 + 2 = 4, you must\n- do it\n"
    const chars = 32_768 * 4
    const late = request([user(prose(scanChars) + cues + prose(chars - scanChars - cues.length))])
    const classification = Classifier.classify(late, defaults)
    expect(classification.features.lastTurnTokens).toBe(32_768)
    expect(classification.features.contextTokens).toBe(32_768)
    // The cues sit past the cap: none is seen.
    expect(classification.features).toMatchObject({
      code: 0,
      math: 0,
      reasoning: 0,
      questions: 0,
      constraints: 0
    })
    expect(classification.score).toBeGreaterThan(0)

    const early = request([user(cues + prose(chars - cues.length))])
    const seen = Classifier.features(early, defaults.scales)
    expect(seen.lastTurnTokens).toBe(32_768)
    // One fenced block (1) and one line of code in it (1: counted once per line).
    expect(seen).toMatchObject({ code: 2, math: 1, reasoning: 2, questions: 1, constraints: 2 })
  })

  it("sees a cue that ends exactly at the cap, and not one character past it", () => {
    const before = Classifier.features(
      request([user(`${prose(scanChars - 5)} why? ${prose(1000)}`)]),
      defaults.scales
    )
    expect([before.reasoning, before.questions]).toEqual([1, 1])
    // "why" ends at the cap, its "?" is the first character past it.
    const past = Classifier.features(
      request([user(`${prose(scanChars - 4)} why? ${prose(1000)}`)]),
      defaults.scales
    )
    expect([past.reasoning, past.questions]).toEqual([1, 0])
  })

  it("applies the cap to a last turn given as text parts", () => {
    const f = featuresOf([text(prose(scanChars)), text("why?")])
    expect([f.reasoning, f.questions]).toEqual([0, 0])
  })
})

describe("Classifier.features: counts stop at twice the scale", () => {
  it("stops counting at 2 × scale (the score saturates at the scale anyway)", () => {
    const f = featuresOf(`${"why? ".repeat(50)}\n${"- item\n".repeat(50)}${"1+1 ".repeat(50)}`)
    expect(f.reasoning).toBe(2 * defaults.scales.reasoning)
    expect(f.questions).toBe(2 * defaults.scales.questions)
    expect(f.constraints).toBe(2 * defaults.scales.constraints)
    expect(f.math).toBe(2 * defaults.scales.math)
    // Whatever the cap, the score is the same as at the scale.
    expect(Classifier.score(f, only("questions"))).toBe(1)
  })
})

describe("Classifier.classify: determinism", () => {
  it("gives the same answer for the same request, whatever was classified before", () => {
    const messages = [system("You are terse."), user("Explain why 2 + 2 = 4, step by step?\n- be brief")]
    const first = Classifier.classify(request(messages), defaults)
    // A long scan stopped early by its cap leaves the global patterns mid-text.
    Classifier.classify(request([user(`${"why ".repeat(500)}${"```\n".repeat(100)}`)]), defaults)
    const again = Classifier.classify(request(messages), defaults)
    const copy = Classifier.classify(request(structuredClone(messages)), defaults)
    expect(again).toEqual(first)
    expect(copy).toEqual(first)
    for (let i = 0; i < 20; i++) expect(Classifier.classify(request(messages), defaults)).toEqual(first)
  })
})

describe("Classifier.score", () => {
  const saturated: Routing.Features = {
    lastTurnTokens: 400,
    contextTokens: 4000,
    turns: 12,
    systemTokens: 1000,
    code: 3,
    math: 4,
    reasoning: 3,
    questions: 4,
    constraints: 5,
    outputTokens: 2000,
    tools: 4,
    jsonSchema: true
  }

  it("is 0 with no features and 1 with every feature at its scale", () => {
    expect(Classifier.score(zero, defaults)).toBe(0)
    expect(Classifier.score(saturated, defaults)).toBe(1)
  })

  it("stays within [0, 1]", () => {
    // A fixed pseudo-random walk over feature values from 0 to 3 × scale.
    let seed = 42
    const next = () => {
      seed = (seed * 1_103_515_245 + 12_345) % 2_147_483_648
      return seed / 2_147_483_648
    }
    for (let i = 0; i < 500; i++) {
      const f = Object.fromEntries(
        featureNames.map((name) =>
          name === "jsonSchema"
            ? [name, next() < 0.5]
            : [name, Math.floor(next() * 3 * defaults.scales[name])]
        )
      ) as Routing.Features
      const s = Classifier.score(f, defaults)
      expect(s).toBeGreaterThanOrEqual(0)
      expect(s).toBeLessThanOrEqual(1)
    }
  })

  it("grows with each feature until its scale, then stays (saturation)", () => {
    for (const name of featureNames) {
      if (name === "jsonSchema") continue
      const scale = defaults.scales[name]
      const at = (value: number) => Classifier.score({ ...zero, [name]: value }, defaults)
      const steps = [...new Set([0, scale / 4, scale / 2, (3 * scale) / 4, scale].map(Math.ceil))]
      for (let i = 1; i < steps.length; i++) {
        expect([name, steps[i], at(steps[i]!) > at(steps[i - 1]!)]).toEqual([name, steps[i], true])
      }
      expect([name, at(2 * scale), at(100 * scale)]).toEqual([name, at(scale), at(scale)])
      // One feature at its scale weighs its share of the total weight.
      const total = Object.values(defaults.weights).reduce((a, b) => a + b, 0)
      expect(at(scale)).toBeCloseTo(defaults.weights[name] / total, 4)
    }
    expect(Classifier.score({ ...zero, jsonSchema: true }, defaults)).toBeGreaterThan(0)
  })

  it("never falls when a feature grows on top of others, and grows by a tenth of its scale", () => {
    const base: Routing.Features = { ...zero, lastTurnTokens: 120, turns: 3, code: 1, questions: 1 }
    const before = Classifier.score(base, defaults)
    for (const name of featureNames) {
      if (name === "jsonSchema") {
        expect(Classifier.score({ ...base, jsonSchema: true }, defaults)).toBeGreaterThan(before)
        continue
      }
      // The score is rounded to 4 decimals: one more context token (1/4000 of a weight) may not show.
      let previous = before
      for (
        let v = base[name];
        v <= base[name] + 2 * defaults.scales[name];
        v += Math.ceil(defaults.scales[name] / 50)
      ) {
        const s = Classifier.score({ ...base, [name]: v }, defaults)
        expect([name, v, s >= previous]).toEqual([name, v, true])
        previous = s
      }
      const step = Math.ceil(defaults.scales[name] / 10)
      const grown = Classifier.score({ ...base, [name]: base[name] + step }, defaults)
      expect([name, grown > before]).toEqual([name, true])
    }
  })

  it("counts a feature fully at the scale the config sets", () => {
    const config = only("code", { scales: { code: 10 } })
    expect(Classifier.score({ ...zero, code: 5 }, config)).toBe(0.5)
    expect(Classifier.score({ ...zero, code: 10 }, config)).toBe(1)
    expect(Classifier.score({ ...zero, code: 30 }, config)).toBe(1)
    // A scale of 0: any occurrence counts fully.
    const any = only("tools", { scales: { tools: 0 } })
    expect([
      Classifier.score({ ...zero, tools: 0 }, any),
      Classifier.score({ ...zero, tools: 1 }, any)
    ]).toEqual([0, 1])
  })

  it("ignores a feature whose weight is 0", () => {
    const noCode = decodeClassifier({ weights: { code: 0 } })
    expect(Classifier.score({ ...zero, code: 100, questions: 2 }, noCode)).toBe(
      Classifier.score({ ...zero, questions: 2 }, noCode)
    )
    // The other weights are normalised without it.
    expect(Classifier.score({ ...saturated, code: 0 }, noCode)).toBe(1)
    expect(Classifier.score(saturated, only("reasoning"))).toBe(1)
    expect(Classifier.score({ ...saturated, reasoning: 0 }, only("reasoning"))).toBe(0)
    // No weight at all: nothing is complex.
    const none = decodeClassifier({ weights: Object.fromEntries(featureNames.map((n) => [snake(n), 0])) })
    expect(Classifier.score(saturated, none)).toBe(0)
  })
})

describe("Classifier.tierOf", () => {
  const config = decodeClassifier({ thresholds: { moderate: 0.2, complex: 0.6 } })

  it("maps scores to tiers, a score exactly at a threshold belonging to the tier above", () => {
    const tiers = [0, 0.1999, 0.2, 0.5999, 0.6, 1].map((s) => Classifier.tierOf(s, config))
    expect(tiers).toEqual(["simple", "simple", "moderate", "moderate", "complex", "complex"])
  })

  it("has no moderate tier when both thresholds are equal", () => {
    const flat = decodeClassifier({ thresholds: { moderate: 0.5, complex: 0.5 } })
    expect([0.4999, 0.5].map((s) => Classifier.tierOf(s, flat))).toEqual(["simple", "complex"])
  })

  it("uses 0.05 and 0.23 by default", () => {
    expect([0.0499, 0.05, 0.2299, 0.23].map((s) => Classifier.tierOf(s, defaults))).toEqual([
      "simple",
      "moderate",
      "moderate",
      "complex"
    ])
  })

  it("classifies a request whose score lands exactly on a threshold into the tier above", () => {
    // Questions alone, 4 at the scale: 1 → 0.25, 2 → 0.5.
    const config = only("questions", { thresholds: { moderate: 0.25, complex: 0.5 } })
    const tierOf = (content: string) => Classifier.classify(request([user(content)]), config)
    expect(tierOf("hello")).toMatchObject({ tier: "simple", score: 0 })
    expect(tierOf("hello?")).toMatchObject({ tier: "moderate", score: 0.25 })
    expect(tierOf("hello? there?")).toMatchObject({ tier: "complex", score: 0.5 })
  })
})

describe("Classifier.classify under the default config", () => {
  it("finds a one-line greeting simple", () => {
    const c = Classifier.classify(request([user("Hi there! How are you today?")]), defaults)
    expect(c.tier).toBe("simple")
    expect(c.score).toBeLessThan(defaults.thresholds.moderate)
  })

  it("finds a multi-part design question with code complex", () => {
    const question = [
      "We are designing a rate limiter for a multi-tenant API gateway. Here is the current code:",
      "```ts",
      "export const admit = (key: string, cost: number) => {",
      "  const bucket = buckets.get(key) ?? fresh(key);",
      "  if (bucket.tokens < cost) return false;",
      "  bucket.tokens -= cost;",
      "  return true;",
      "}",
      "```",
      "1. Explain why this breaks when the gateway runs on several replicas.",
      "2. Compare a Redis token bucket with a sliding window log, and analyse the trade-offs.",
      "3. Design the data layout; it must survive a Redis failover and should not add more than 1 ms.",
      "What would you change first? How would you test it?"
    ].join("\n")
    const c = Classifier.classify(request([system("You are a senior engineer."), user(question)]), defaults)
    expect(c.tier).toBe("complex")
    expect(c.score).toBeGreaterThanOrEqual(defaults.thresholds.complex)
    expect(c.features.code).toBeGreaterThanOrEqual(defaults.scales.code)
    expect(c.features.reasoning).toBeGreaterThanOrEqual(defaults.scales.reasoning)
  })

  it("finds long plain prose, without a cue, no more than moderate", () => {
    const c = Classifier.classify(request([user(prose(30_000))]), defaults)
    expect(c.tier).not.toBe("complex")
  })
})
