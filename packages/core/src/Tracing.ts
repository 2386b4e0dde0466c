/**
 * Tracing switch. Without an exporter the gateway turns spans off entirely: Effect's own spans,
 * and the platform's per-request server span, which otherwise parses the URL and copies the
 * headers of every request even when nothing records it.
 */
import { HttpMiddleware } from "@effect/platform"
import { Layer } from "effect"

export const layerDisabled: Layer.Layer<never> = Layer.mergeAll(
  Layer.setTracerEnabled(false),
  Layer.locallyScoped(HttpMiddleware.currentTracerDisabledWhen, () => true)
)
