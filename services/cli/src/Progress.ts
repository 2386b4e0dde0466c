/**
 * Where a long command reports how far it got: on a terminal, one line on stderr rewritten in
 * place; otherwise (a pipe, a log file, a test) a line every few seconds. Progress never goes to
 * stdout, which carries the command's result.
 */
import { Clock, Console, Context, Effect, Layer, Ref } from "effect"

export class Progress extends Context.Tag("@gateway/cli/Progress")<
  Progress,
  {
    /** The latest state; shown now or dropped, depending on how recently the last one was. */
    readonly update: (line: string) => Effect.Effect<void>
    /** A final or notable line, always shown. */
    readonly log: (line: string) => Effect.Effect<void>
  }
>() {}

/** Shows at most one update per `interval` milliseconds. */
const throttled = (interval: number, show: (line: string) => Effect.Effect<void>) =>
  Effect.map(
    Ref.make(Number.NEGATIVE_INFINITY),
    (last) => (line: string) =>
      Effect.flatMap(Clock.currentTimeMillis, (now) =>
        Effect.flatMap(
          Ref.modify(last, (at) => (now - at >= interval ? [true, now] : [false, at])),
          (due) => (due ? show(line) : Effect.void)
        )
      )
  )

/** One line rewritten in place on `stream` (a TTY), at most ten times a second. */
export const layerTty = (stream: NodeJS.WriteStream) =>
  Layer.effect(
    Progress,
    Effect.map(
      throttled(100, (line) => Effect.sync(() => stream.write(`\r\x1b[2K${line}`))),
      (update) =>
        Progress.of({ update, log: (line) => Effect.sync(() => stream.write(`\r\x1b[2K${line}\n`)) })
    )
  )

/** Plain lines through `Console.error`, an update at most every `intervalMillis`. */
export const layerLines = (intervalMillis = 2000) =>
  Layer.effect(
    Progress,
    Effect.map(
      throttled(intervalMillis, (line) => Console.error(line)),
      (update) => Progress.of({ update, log: (line) => Console.error(line) })
    )
  )
