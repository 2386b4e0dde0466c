/** The one error of the simulated backend's control API: bad options or a port it cannot listen on. */
import * as Schema from "effect/Schema"

export class BackendSimError extends Schema.TaggedError<BackendSimError>(
  "@gateway/backend-sim/BackendSimError"
)("BackendSimError", {
  reason: Schema.Literal("InvalidOptions", "Listen"),
  detail: Schema.String
}) {
  override get message(): string {
    return this.reason === "Listen"
      ? `backend-sim cannot listen: ${this.detail}`
      : `invalid backend-sim options: ${this.detail}`
  }
}
