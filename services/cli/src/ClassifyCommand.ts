/**
 * `classify explain|eval`: the complexity classifier and a routing policy of a gateway config,
 * offline — on one prompt, or on a labelled set of requests. Neither needs a gateway or a database.
 */
import { Args, Command, HelpDoc, Options, ValidationError } from "@effect/cli"
import { Effect } from "effect"
import { printJson, printLines } from "./AdminOptions.js"
import * as ClassifyEval from "./ClassifyEval.js"
import * as ClassifyExplain from "./ClassifyExplain.js"
import * as RoutingOptions from "./RoutingOptions.js"

const explain = Command.make(
  "explain",
  {
    prompt: Args.text({ name: "prompt" }).pipe(Args.withDescription("The prompt, as one user message.")),
    config: RoutingOptions.config,
    policy: RoutingOptions.policy,
    json: RoutingOptions.json
  },
  (options) =>
    Effect.gen(function* () {
      const loaded = yield* RoutingOptions.load(options.config)
      const policy = yield* RoutingOptions.choosePolicy(loaded, options.policy)
      const explanation = ClassifyExplain.explain(
        ClassifyExplain.requestOf(options.prompt, policy.name),
        loaded.config.routing.classifier,
        policy
      )
      yield* options.json ? printJson(explanation) : printLines(ClassifyExplain.render(explanation))
    })
).pipe(
  Command.withDescription(
    "The classifier on one prompt: its features and their share of the score, the score, the tier, " +
      "and the model the policy would send it to."
  )
)

const evaluate = Command.make(
  "eval",
  {
    file: Args.text({ name: "file.jsonl" }).pipe(
      Args.withDescription(
        'JSON lines: {"messages": [...], "label": "simple|moderate|complex"}, or {"prompt": "..."} ' +
          "(unlabelled: counted in the shares and the cost, not in the accuracy). Other chat request " +
          "fields (max_tokens, tools, response_format …) count as the gateway would count them."
      )
    ),
    config: RoutingOptions.config,
    policy: RoutingOptions.policy,
    outputTokens: Options.integer("output-tokens").pipe(
      Options.withDefault(256),
      Options.mapEffect((n) =>
        n >= 0
          ? Effect.succeed(n)
          : Effect.fail(ValidationError.invalidValue(HelpDoc.p("--output-tokens must be 0 or more")))
      ),
      Options.withDescription("Completion tokens assumed for every request, for the cost.")
    ),
    json: RoutingOptions.json
  },
  (options) =>
    Effect.gen(function* () {
      const loaded = yield* RoutingOptions.load(options.config)
      const policy = yield* RoutingOptions.choosePolicy(loaded, options.policy)
      const samples = yield* ClassifyEval.read(options.file, policy.name)
      // Loaded only here: the tokenizer's tables take a few hundred milliseconds.
      const { countPrompt } = yield* Effect.promise(() => import("@gateway/core/Tokenizer"))
      const outcome = ClassifyEval.evaluate(samples, {
        classifier: loaded.config.routing.classifier,
        policy,
        prices: RoutingOptions.prices(loaded.config),
        outputTokens: options.outputTokens,
        countPrompt: (request) => countPrompt(request)
      })
      yield* options.json
        ? printJson({
            file: options.file,
            config: loaded.path,
            outputTokens: options.outputTokens,
            ...outcome
          })
        : printLines(ClassifyEval.render(outcome, { path: options.file, outputTokens: options.outputTokens }))
    })
).pipe(
  Command.withDescription(
    "The classifier and a policy on a labelled set: accuracy, confusion matrix, each model's share, " +
      "the cost under the policy against everything on its complex model, and the worst misroutes."
  )
)

export const command = Command.make("classify").pipe(
  Command.withDescription("The complexity classifier and the routing policies of a gateway config, offline."),
  Command.withSubcommands([explain, evaluate])
)
