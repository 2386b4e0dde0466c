/**
 * One flat JSON object per log line on stdout (`{"time","level","msg",...fields}`, plus
 * `trace_id` and `span_id` inside a traced span), so log
 * shippers index fields without unwrapping. Fields come from log annotations and from plain
 * objects logged after the message (`Effect.logInfo("request", { status: 200 })`), the cheaper
 * form for the per-request line. Lines written in the same tick go out in one write.
 */
import {
  Cause,
  Context,
  Effect,
  FiberRef,
  FiberRefs,
  HashMap,
  Layer,
  Logger,
  type LogLevel,
  Tracer
} from "effect"

const isFields = (u: unknown): u is Record<string, unknown> =>
  typeof u === "object" && u !== null && !Array.isArray(u) && Object.getPrototypeOf(u) === Object.prototype

const noSpan = () => undefined

/** Renders one log call as a JSON line (with the newline). */
export const format = (options: Logger.Logger.Options<unknown>): string => {
  const { annotations, cause, context, date, logLevel, message } = options
  const entry: Record<string, unknown> = {
    time: date.toISOString(),
    level: logLevel.label.toLowerCase(),
    msg: ""
  }
  const parts = Array.isArray(message) ? message : [message]
  for (const part of parts) {
    if (isFields(part)) Object.assign(entry, part)
    else entry.msg = entry.msg === "" ? String(part) : `${entry.msg} ${String(part)}`
  }
  // Inside a sampled span, the line names it (tracing off: there are only no-op spans; a span not
  // sampled, such as an RPC call's under an unsampled request, is never exported: no ids of its).
  const span = Context.getOrElse(
    FiberRefs.getOrDefault(context, FiberRef.currentContext),
    Tracer.ParentSpan,
    noSpan
  )
  if (span !== undefined && span.sampled && span.traceId !== "noop") {
    entry.trace_id = span.traceId
    entry.span_id = span.spanId
  }
  if (HashMap.size(annotations) > 0)
    for (const [key, value] of HashMap.toEntries(annotations)) entry[key] = value
  if (!Cause.isEmpty(cause)) entry.error = Cause.pretty(cause, { renderErrorCause: true })
  return `${JSON.stringify(entry)}\n`
}

/**
 * Collects lines and writes them once per event-loop turn; `flush` writes what is pending.
 * A crash loses at most the lines of the turn it happens in.
 */
export const makeSink = (write: (chunk: string) => void) => {
  let pending = ""
  let scheduled = false
  const flush = () => {
    scheduled = false
    if (pending === "") return
    const chunk = pending
    pending = ""
    write(chunk)
  }
  const push = (line: string) => {
    pending += line
    if (!scheduled) {
      scheduled = true
      setImmediate(flush)
    }
  }
  return { push, flush }
}

/** Replaces the default logger with the JSON logger at `level`, writing to `write` (stdout). */
export const layer = (
  level: LogLevel.LogLevel,
  write: (chunk: string) => void = (chunk) => process.stdout.write(chunk)
): Layer.Layer<never> =>
  Layer.unwrapScoped(
    Effect.gen(function* () {
      const sink = makeSink(write)
      yield* Effect.addFinalizer(() => Effect.sync(sink.flush))
      process.once("exit", sink.flush)
      yield* Effect.addFinalizer(() => Effect.sync(() => process.off("exit", sink.flush)))
      const logger = Logger.make((options) => sink.push(format(options)))
      return Layer.merge(Logger.replace(Logger.defaultLogger, logger), Logger.minimumLogLevel(level))
    })
  )
