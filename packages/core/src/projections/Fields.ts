/**
 * What projections read off stored events. Events were validated when they were written, so
 * projections read their JSON as stored — no decoding per event, which keeps replays fast.
 */
import type { EventStore } from "@gateway/event-store"

export interface Meta {
  readonly requestId: string
  readonly correlationId?: string
  readonly keyId?: string
  readonly tenantId?: string
  readonly occurredAt: string
}

export const meta = (event: EventStore.RecordedEvent): Meta => event.metadata as Meta

// biome-ignore lint/suspicious/noExplicitAny: stored JSON, read field by field
export const data = (event: EventStore.RecordedEvent): any => event.data

/** `2026-11-21T18:25:03.120Z` → `2026-11-21T18:00:00.000Z`. */
export const hourOf = (iso: string) => `${iso.slice(0, 13)}:00:00.000Z`
