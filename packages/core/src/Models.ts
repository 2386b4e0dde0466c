/**
 * The configured models and their backend replicas as attempt targets (URL, upstream name,
 * timeouts, API key), with the `/v1/models` list. Which replica serves a request is the
 * BackendPool's choice.
 */
import { Errors, type GatewayConfig, type OpenAi } from "@gateway/domain"
import { Config, Effect, Option, type Redacted } from "effect"
import { Settings } from "./Settings.js"

/** Where one attempt goes: the replica, the name the backend knows the model by, its limits. */
export interface Target {
  readonly model: GatewayConfig.ModelConfig
  readonly backend: GatewayConfig.BackendConfig
  /** `model` as the backend expects it in the request body. */
  readonly upstreamModel: string
  /** The backend's `scheme://host:port`, and the path of its chat-completions endpoint. */
  readonly origin: string
  readonly chatPath: string
  readonly timeouts: GatewayConfig.Timeouts
  readonly apiKey: Option.Option<Redacted.Redacted>
}

/** One configured model: its replicas' targets and the pool settings that apply to it. */
export interface Entry {
  readonly config: GatewayConfig.ModelConfig
  readonly targets: ReadonlyArray<Target>
  readonly policy: GatewayConfig.ModelPolicy
  readonly timeouts: GatewayConfig.Timeouts
}

export class Models extends Effect.Service<Models>()("@gateway/core/Models", {
  effect: Effect.gen(function* () {
    const config = yield* Settings
    const entries = new Map<string, Entry>()
    for (const model of config.models) {
      const timeouts = config.timeoutsFor(model)
      const targets: Array<Target> = []
      for (const backend of model.backends) {
        const apiKey =
          backend.apiKeyEnv === undefined
            ? Option.none()
            : Option.some(yield* Config.redacted(backend.apiKeyEnv))
        // A base URL may or may not include the `/v1` prefix (OpenAI's does, vLLM's usually not).
        const base = new URL(backend.url)
        const prefix = base.pathname.replace(/\/+$/, "")
        const chatPath = `${prefix}${/\/v1$/.test(prefix) ? "" : "/v1"}/chat/completions`
        targets.push({
          model,
          backend,
          upstreamModel: model.upstreamModel ?? model.name,
          origin: base.origin,
          chatPath,
          timeouts,
          apiKey
        })
      }
      entries.set(model.name, { config: model, targets, policy: config.policyFor(model), timeouts })
    }

    const created = Math.floor(Date.now() / 1000)
    const list: OpenAi.ModelList = {
      object: "list",
      data: [
        ...config.models.map((m) => ({ id: m.name, object: "model" as const, created, owned_by: m.ownedBy })),
        // Routing policies are names clients can send as `model` too.
        ...config.routing.policies.map((p) => ({
          id: p.name,
          object: "model" as const,
          created,
          owned_by: "router"
        }))
      ]
    }

    /** The model called `name`, or `ModelNotFound`. */
    const lookup = (name: string): Effect.Effect<Entry, Errors.ModelNotFound> => {
      const entry = entries.get(name)
      return entry === undefined
        ? Effect.fail(new Errors.ModelNotFound({ model: name }))
        : Effect.succeed(entry)
    }

    return { lookup, entries: entries as ReadonlyMap<string, Entry>, list } as const
  })
}) {}
