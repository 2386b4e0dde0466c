/**
 * The limiter store in process memory: the embedded default, and each replica's own guard while
 * Redis is away. Decisions are synchronous (one Map lookup per check) on Effect's `Clock`, so
 * `TestClock` drives refills, lease expiry and budget periods.
 */
import { Clock, Effect, Layer } from "effect"
import {
  type BudgetCheck,
  type Check,
  type CheckState,
  type Decision,
  LimiterStore,
  type ReserveRequest,
  type SettleRequest
} from "./LimiterStore.js"

/** Slack for float comparisons, so a refill of exactly the missing time admits. */
const EPS = 1e-9
/** How often (in clock time) idle state is swept: full buckets, expired leases, past periods. */
const SWEEP_EVERY_MS = 60_000
const DAY_MS = 86_400_000

interface RateEntry {
  readonly kind: "rate"
  level: number
  at: number
  expiresAt: number
}

interface SlotsEntry {
  readonly kind: "concurrency"
  /** Lease id → expiry time. */
  readonly leases: Map<string, number>
  expiresAt: number
}

interface SpendEntry {
  readonly kind: "budget"
  spent: number
  expiresAt: number
}

type Entry = RateEntry | SlotsEntry | SpendEntry

/** Whole units left, rounded down, never below 0. */
const remainingOf = (x: number): number => Math.max(0, Math.floor(x + EPS))

/** Milliseconds as a whole number rounded up (never below 0). */
const ceilMs = (x: number): number => Math.max(0, Math.ceil(x - EPS))

/** Time until a bucket at `level` is full again. */
const fullInMs = (level: number, capacity: number, windowMs: number): number =>
  level >= capacity - EPS ? 0 : ceilMs(((capacity - level) * windowMs) / capacity)

const pad = (n: number, width: number) => String(n).padStart(width, "0")

/**
 * The UTC period `now` falls in (`2026-11` or `2026-11-21`) and when the next one starts; the Redis
 * store computes the same in Lua.
 */
export const periodOf = (
  now: number,
  period: BudgetCheck["period"]
): { readonly suffix: string; readonly endsAt: number } => {
  const date = new Date(now)
  const y = date.getUTCFullYear()
  const m = date.getUTCMonth()
  if (period === "day") {
    return {
      suffix: `${pad(y, 4)}-${pad(m + 1, 2)}-${pad(date.getUTCDate(), 2)}`,
      endsAt: (Math.floor(now / DAY_MS) + 1) * DAY_MS
    }
  }
  return { suffix: `${pad(y, 4)}-${pad(m + 1, 2)}`, endsAt: Date.UTC(y, m + 1, 1) }
}

/** The state's name in the store: a rate bucket per limit, one slot set, one counter per period. */
const idOf = (check: Check, suffix: string): string =>
  check.kind === "rate"
    ? `rate:${check.limit}:${check.key}`
    : check.kind === "concurrency"
      ? `concurrency:${check.key}`
      : `budget:${check.key}:${suffix}`

/** A check evaluated against the current state, before anything is taken. */
interface View {
  readonly ok: boolean
  /** The state as it is: a refused request takes nothing. */
  readonly state: CheckState
  /** The state once this request is admitted. */
  readonly admittedState: CheckState
  readonly retryAfterMs: number
  readonly key: string
  readonly apply: () => void
}

/** An admitted reservation not settled yet: what `cancel` needs to give it back. */
interface Held {
  readonly keys: ReadonlyArray<string>
  readonly expiresAt: number
}

export const make: Effect.Effect<LimiterStore["Type"]> = Effect.sync(() => {
  const entries = new Map<string, Entry>()
  /** Lease id → its admission, until settled, cancelled or its lease expires. */
  const held = new Map<string, Held>()
  /** Lease id → until when a reserve of it refuses (it was cancelled before it arrived). */
  const cancelled = new Map<string, number>()
  let lastSweep = Number.NEGATIVE_INFINITY

  const pruneLeases = (entry: SlotsEntry, now: number) => {
    let latest = 0
    for (const [lease, expiresAt] of entry.leases) {
      if (expiresAt <= now) entry.leases.delete(lease)
      else if (expiresAt > latest) latest = expiresAt
    }
    entry.expiresAt = latest
  }

  const sweep = (now: number) => {
    if (now >= lastSweep && now - lastSweep < SWEEP_EVERY_MS) return
    lastSweep = now
    for (const [id, entry] of entries) {
      if (entry.kind === "concurrency") pruneLeases(entry, now)
      if (entry.expiresAt <= now) entries.delete(id)
    }
    for (const [lease, h] of held) if (h.expiresAt <= now) held.delete(lease)
    for (const [lease, until] of cancelled) if (until <= now) cancelled.delete(lease)
  }

  /** The bucket's level now: refilled since its last update, never above capacity; absent is full. */
  const levelOf = (id: string, capacity: number, windowMs: number, now: number): number => {
    const entry = entries.get(id)
    if (entry?.kind !== "rate") return capacity
    const refilled = entry.level + (Math.max(0, now - entry.at) * capacity) / windowMs
    return Math.min(capacity, refilled)
  }

  const storeLevel = (id: string, level: number, capacity: number, windowMs: number, now: number) => {
    const fullIn = fullInMs(level, capacity, windowMs)
    if (fullIn === 0) entries.delete(id)
    else entries.set(id, { kind: "rate", level, at: now, expiresAt: now + fullIn })
  }

  /** The live slots of a concurrency check (expired leases dropped), if any are held. */
  const slotsOf = (id: string, now: number): SlotsEntry | undefined => {
    const entry = entries.get(id)
    if (entry?.kind !== "concurrency") return undefined
    pruneLeases(entry, now)
    return entry
  }

  const view = (check: Check, request: ReserveRequest, now: number): View => {
    switch (check.kind) {
      case "rate": {
        const { capacity, windowMs, cost } = check
        const id = idOf(check, "")
        const level = levelOf(id, capacity, windowMs, now)
        if (cost <= capacity && level + EPS >= cost) {
          const after = level - cost
          return {
            ok: true,
            state: { remaining: remainingOf(level), resetMs: fullInMs(level, capacity, windowMs) },
            admittedState: { remaining: remainingOf(after), resetMs: fullInMs(after, capacity, windowMs) },
            retryAfterMs: 0,
            key: check.key,
            apply: () => storeLevel(id, after, capacity, windowMs, now)
          }
        }
        const resetMs = fullInMs(level, capacity, windowMs)
        const state = { remaining: remainingOf(level), resetMs }
        return {
          ok: false,
          state,
          admittedState: state,
          // A cost above capacity never fits: the caller is told to wait for a full bucket.
          retryAfterMs:
            cost > capacity ? resetMs : Math.max(1, ceilMs(((cost - level) * windowMs) / capacity)),
          key: check.key,
          apply: () => {}
        }
      }
      case "concurrency": {
        const id = idOf(check, "")
        const slots = slotsOf(id, now)
        const held = slots?.leases.size ?? 0
        const mine = slots?.leases.has(request.leaseId) ?? false
        if (mine || held < check.capacity) {
          const expiresAt = now + request.leaseTtlMs
          return {
            ok: true,
            state: { remaining: Math.max(0, check.capacity - held), resetMs: 0 },
            admittedState: { remaining: Math.max(0, check.capacity - (mine ? held : held + 1)), resetMs: 0 },
            retryAfterMs: 0,
            key: check.key,
            apply: () => {
              const target: SlotsEntry = slots ?? {
                kind: "concurrency",
                leases: new Map<string, number>(),
                expiresAt: 0
              }
              target.leases.set(request.leaseId, expiresAt)
              target.expiresAt = Math.max(target.expiresAt, expiresAt)
              entries.set(id, target)
            }
          }
        }
        let earliest = now + request.leaseTtlMs
        for (const expiresAt of slots?.leases.values() ?? []) earliest = Math.min(earliest, expiresAt)
        const state = { remaining: Math.max(0, check.capacity - held), resetMs: 0 }
        return {
          ok: false,
          state,
          admittedState: state,
          // Certain only when no slot is settled before: the earliest lease expiry.
          retryAfterMs: Math.max(1, earliest - now),
          key: check.key,
          apply: () => {}
        }
      }
      case "budget": {
        const { suffix, endsAt } = periodOf(now, check.period)
        const id = idOf(check, suffix)
        const entry = entries.get(id)
        const spent = entry?.kind === "budget" ? entry.spent : 0
        const resetMs = endsAt - now
        const ok = spent + check.cost <= check.capacity
        return {
          ok,
          state: { remaining: remainingOf(check.capacity - spent), resetMs },
          admittedState: { remaining: remainingOf(check.capacity - spent - check.cost), resetMs },
          retryAfterMs: resetMs,
          key: `${check.key}:${suffix}`,
          apply: () => entries.set(id, { kind: "budget", spent: spent + check.cost, expiresAt: endsAt })
        }
      }
    }
  }

  const decide = (request: ReserveRequest, now: number): Decision => {
    sweep(now)
    if ((cancelled.get(request.leaseId) ?? 0) > now) {
      const states = request.checks.map(() => ({ remaining: 0, resetMs: 0 }))
      return { admitted: false, failed: 0, retryAfterMs: 0, states, cancelled: true }
    }
    const views = request.checks.map((check) => view(check, request, now))
    const failed = views.findIndex((v) => !v.ok)
    if (failed >= 0) {
      const states = views.map((v) => v.state)
      return { admitted: false, failed, retryAfterMs: views[failed]!.retryAfterMs, states }
    }
    for (const v of views) v.apply()
    const keys = views.map((v) => v.key)
    held.set(request.leaseId, { keys, expiresAt: now + request.leaseTtlMs })
    return { admitted: true, states: views.map((v) => v.admittedState), keys }
  }

  const settleOne = (request: SettleRequest, index: number, now: number) => {
    const check = request.checks[index]!
    const used = request.actual[index] ?? (check.kind === "concurrency" ? 0 : check.cost)
    switch (check.kind) {
      case "rate": {
        const diff = used - check.cost
        if (diff === 0 || !Number.isFinite(diff)) return
        const id = idOf(check, "")
        const level = levelOf(id, check.capacity, check.windowMs, now)
        storeLevel(id, Math.min(check.capacity, level - diff), check.capacity, check.windowMs, now)
        return
      }
      case "concurrency": {
        const id = idOf(check, "")
        const entry = entries.get(id)
        if (entry?.kind !== "concurrency") return
        entry.leases.delete(request.leaseId)
        if (entry.leases.size === 0) entries.delete(id)
        return
      }
      case "budget": {
        const diff = used - check.cost
        if (diff === 0 || !Number.isFinite(diff)) return
        const { suffix, endsAt } = periodOf(now, check.period)
        const key = request.keys[index] ?? `${check.key}:${suffix}`
        // A period that has ended is never checked again: its counter need not be kept.
        if (key !== `${check.key}:${suffix}`) return
        const id = idOf(check, suffix)
        const entry = entries.get(id)
        if (entry?.kind === "budget") entry.spent += diff
        else entries.set(id, { kind: "budget", spent: diff, expiresAt: endsAt })
        return
      }
    }
  }

  /** Applied once per admission still held; a second settle of the lease finds nothing. */
  const settle = (request: SettleRequest, now: number) => {
    if (!held.delete(request.leaseId)) return
    for (let i = 0; i < request.checks.length; i++) settleOne(request, i, now)
  }

  /** A reserve here never outlives its caller: give back a known admission as if nothing was used. */
  const cancel = (request: ReserveRequest, now: number) => {
    if ((cancelled.get(request.leaseId) ?? 0) > now) return
    const admission = held.get(request.leaseId)
    if (admission !== undefined && admission.expiresAt > now) {
      const actual = request.checks.map(() => 0)
      settle({ leaseId: request.leaseId, checks: request.checks, keys: admission.keys, actual }, now)
    }
    held.delete(request.leaseId)
    cancelled.set(request.leaseId, now + request.leaseTtlMs)
  }

  return LimiterStore.of({
    kind: "memory",
    reserve: (request) => Effect.map(Clock.currentTimeMillis, (now) => decide(request, now)),
    settle: (request) => Effect.map(Clock.currentTimeMillis, (now) => settle(request, now)),
    settleAll: (requests) =>
      Effect.map(Clock.currentTimeMillis, (now) => {
        for (const request of requests) settle(request, now)
      }),
    cancel: (request) => Effect.map(Clock.currentTimeMillis, (now) => cancel(request, now))
  })
})

export const layer: Layer.Layer<LimiterStore> = Layer.effect(LimiterStore, make)
