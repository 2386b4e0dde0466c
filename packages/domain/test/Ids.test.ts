import { describe, expect, it } from "@effect/vitest"
import { Ids } from "@gateway/domain"
import { Schema } from "effect"

describe("request ids", () => {
  it("keeps a well-formed client request id", () => {
    expect(Ids.clientRequestId("req_123:abc-DEF.4")).toBe("req_123:abc-DEF.4")
  })

  it("drops a missing, oversized or unsafe client request id", () => {
    expect(Ids.clientRequestId(undefined)).toBeUndefined()
    expect(Ids.clientRequestId("x".repeat(129))).toBeUndefined()
    expect(Ids.clientRequestId("evil\nheader")).toBeUndefined()
    expect(Ids.clientRequestId("")).toBeUndefined()
  })

  it("makes a fresh UUID for every request", () => {
    const uuid = /^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/
    expect(Ids.newRequestId()).toMatch(uuid)
    expect(Ids.newRequestId()).not.toBe(Ids.newRequestId())
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
