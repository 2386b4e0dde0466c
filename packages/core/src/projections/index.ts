/** The gateway's read models, kept from the event log by the projection runner. */
import * as DeadLetters from "./DeadLetters.js"
import * as RequestLog from "./RequestLog.js"
import * as UsageHourly from "./UsageHourly.js"

export { DeadLetters, RequestLog, UsageHourly }

export const all = [RequestLog.projection, UsageHourly.projection, DeadLetters.projection] as const
