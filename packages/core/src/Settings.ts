/** The validated gateway config, provided once by the composition root. */
import type { FileSystem } from "@effect/platform"
import type { GatewayConfig } from "@gateway/domain"
import { Context, Layer } from "effect"
import * as ConfigLoader from "./ConfigLoader.js"

export class Settings extends Context.Tag("@gateway/core/Settings")<
  Settings,
  GatewayConfig.GatewayConfig
>() {}

export const layer = (config: GatewayConfig.GatewayConfig): Layer.Layer<Settings> =>
  Layer.succeed(Settings, config)

/** Loads the config file at `path`; start-up fails with a `ConfigError` naming the bad field. */
export const layerFile = (
  path: string
): Layer.Layer<Settings, ConfigLoader.ConfigError, FileSystem.FileSystem> =>
  Layer.effect(Settings, ConfigLoader.load(path))
