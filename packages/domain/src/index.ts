export * as Errors from "./Errors.js"
export * as GatewayConfig from "./GatewayConfig.js"
export * as Ids from "./Ids.js"
export * as OpenAi from "./OpenAi.js"
