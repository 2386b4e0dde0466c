/** The API's schemas and errors, to name their types without another import. */
export { DeadLetters, Errors, OpenAi, RpcApi, RpcSchemas } from "@gateway/domain"
export * as GatewayClient from "./GatewayClient.js"
export * as PromiseClient from "./PromiseClient.js"
export { createGatewayClient } from "./PromiseClient.js"
