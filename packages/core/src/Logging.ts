/**
 * One flat JSON object per log line on stdout (`{"time","level","msg",...annotations}`), so log
 * shippers index fields without unwrapping. The level comes from the composition root.
 */
import { Cause, HashMap, Layer, Logger, type LogLevel } from "effect"

const render = (message: unknown): string => {
  if (typeof message === "string") return message
  if (Array.isArray(message)) return message.map(render).join(" ")
  return String(message)
}

/** A logger writing flat JSON lines through `write` (stdout by default). */
export const makeJsonLogger = (write: (line: string) => void = (line) => process.stdout.write(line)) =>
  Logger.make(({ annotations, cause, date, logLevel, message }) => {
    const entry: Record<string, unknown> = {
      time: date.toISOString(),
      level: logLevel.label.toLowerCase(),
      msg: render(message)
    }
    for (const [key, value] of HashMap.toEntries(annotations)) entry[key] = value
    if (!Cause.isEmpty(cause)) entry.error = Cause.pretty(cause, { renderErrorCause: true })
    write(`${JSON.stringify(entry)}\n`)
  })

/** Replaces the default logger with the JSON logger at `level`. */
export const layer = (level: LogLevel.LogLevel, write?: (line: string) => void): Layer.Layer<never> =>
  Layer.merge(Logger.replace(Logger.defaultLogger, makeJsonLogger(write)), Logger.minimumLogLevel(level))
