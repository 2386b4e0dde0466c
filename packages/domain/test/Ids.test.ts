import { describe, expect, it } from "@effect/vitest"
import { Ids } from "@gateway/domain"
import { Schema } from "effect"

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

describe("TenantId and KeyId", () => {
  it("accept simple ids and refuse empty or unsafe ones", () => {
    for (const schema of [Ids.TenantId, Ids.KeyId]) {
      const is = Schema.is(schema)
      expect(is("acme_1.prod-eu")).toBe(true)
      expect(is("")).toBe(false)
      expect(is("a b")).toBe(false)
      expect(is("x".repeat(65))).toBe(false)
    }
  })
})
