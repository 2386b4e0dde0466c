/**
 * The configured models and their backend replicas: resolves a request's `model` to one replica
 * (round-robin for now; the load-aware pool replaces this choice later) and lists the models.
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

interface Entry {
  readonly targets: ReadonlyArray<Target>
  next: number
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
      entries.set(model.name, { targets, next: 0 })
    }

    const created = Math.floor(Date.now() / 1000)
    const list: OpenAi.ModelList = {
      object: "list",
      data: config.models.map((m) => ({ id: m.name, object: "model", created, owned_by: m.ownedBy }))
    }

    /** Picks the next replica of `name`, or fails with `ModelNotFound`. */
    const resolve = (name: string): Effect.Effect<Target, Errors.ModelNotFound> => {
      const entry = entries.get(name)
      if (entry === undefined) return Effect.fail(new Errors.ModelNotFound({ model: name }))
      const target = entry.targets[entry.next % entry.targets.length]!
      entry.next = (entry.next + 1) % entry.targets.length
      return Effect.succeed(target)
    }

    return { resolve, list } as const
  })
}) {}
