/** Follows the event log as it is written, one line per event, until interrupted (Ctrl-C). */
import { EventStore } from "@gateway/event-store"
import { Console, Effect, Option, Stream } from "effect"
import * as EventFormat from "./EventFormat.js"
import * as LogCursor from "./LogCursor.js"

/** From `from`, or from now on. */
export const follow = Effect.fn("LogTail.follow")(function* (from: Option.Option<LogCursor.StartAt>) {
  const store = yield* EventStore.EventStore
  const cursor = Option.isSome(from) ? yield* LogCursor.resolve(from.value) : yield* LogCursor.end
  yield* Console.error(`following the event log after position ${cursor.position} (Ctrl-C to stop)`)
  return yield* store
    .subscribe(cursor, { pollInterval: "1 second" })
    .pipe(Stream.runForEach((event) => Console.log(EventFormat.line(event))))
})
