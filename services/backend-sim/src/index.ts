/** A simulated vLLM-like OpenAI-compatible backend for tests, benchmarks and the demo. */
export * as BackendSim from "./BackendSim.js"
export * as BackendSimError from "./BackendSimError.js"
export * as Prng from "./Prng.js"
export * as SimConfig from "./SimConfig.js"
export * as SimServer from "./SimServer.js"
export * as SimText from "./SimText.js"
