import { describe, expect, it } from "@effect/vitest"
import { Ids } from "@gateway/domain"

describe("requestIdFrom", () => {
  it("keeps a well-formed client request id", () => {
    expect(Ids.requestIdFrom("req_123:abc-DEF.4")).toBe("req_123:abc-DEF.4")
  })

  it("replaces a missing, oversized or unsafe one with a fresh UUID", () => {
    const uuid = /^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/
    expect(Ids.requestIdFrom(undefined)).toMatch(uuid)
    expect(Ids.requestIdFrom("x".repeat(129))).toMatch(uuid)
    expect(Ids.requestIdFrom("evil\nheader")).toMatch(uuid)
    expect(Ids.requestIdFrom("")).toMatch(uuid)
    expect(Ids.requestIdFrom(undefined)).not.toBe(Ids.requestIdFrom(undefined))
  })
})
