export * as Embedded from "./Embedded.js"
export * as Gateway from "./Gateway.js"
