/**
 * The limiter store in Redis, shared by every replica: `reserve`, `settle` and `cancel` are each one
 * atomic Lua script on Redis's own clock (`TIME`), so limits stay exact across replicas.
 *
 * Key layout (`<prefix>` defaults to `gw:rl:`; `<key>` is the check's key, wrapped in a hash tag
 * unless it has one, as the rate limiter's `{k:<id>}:rpm` does for its subject):
 * - `<prefix>{<key>}:requests`, `<prefix>{<key>}:tokens` — token bucket, a hash `l` (level, may be
 *   fractional or negative) and `t` (ms of the last update); expires once it would be full again.
 * - `<prefix>{<key>}:concurrency` — sorted set of lease ids scored by their expiry time.
 * - `<prefix>{<key>}:budget:<period>` — spend counter of the UTC period (`2026-11`, `2026-11-21`),
 *   kept 40 days after the period ends.
 * - `<prefix>{<tag>}:lease:<lease id>` — one admitted reservation's undo record, `a` then per check
 *   its kind, cost and budget period (`-` for others), e.g. `a r 1 - c 0 - b 400 2026-11`; or the
 *   tombstone `x` a cancel leaves, which makes a reserve of that lease arriving later refuse.
 *   `<tag>` is the hash tag of the request's first check; it lives `leaseTtlMs`, `settle` deletes it.
 *
 * The hash tag keeps all of one subject's buckets in one Cluster slot, but a request checks its key
 * and its tenant in one script, which Redis Cluster only allows within one slot: single-node Redis
 * (or a primary with replicas) is the supported deployment for now.
 */
import { Clock, Duration, Effect, Layer, type Scope } from "effect"
import { Redis, type RedisOptions } from "ioredis"
import {
  type Check,
  type CheckState,
  type Decision,
  LimiterStore,
  LimiterStoreUnavailable,
  type ReserveRequest,
  type SettleRequest
} from "./LimiterStore.js"

export interface Options {
  /** The connection; the caller owns it (see `connect`). */
  readonly redis: Redis
  readonly keyPrefix?: string
  /**
   * `redis` (the default) reads the time with `TIME` inside the scripts; `effect` passes Effect's
   * `Clock` instead, so tests can drive the Redis store with `TestClock`.
   */
  readonly clock?: "redis" | "effect"
  /** Bound on one decision, after which it fails with `LimiterStoreUnavailable`. */
  readonly timeoutMs?: number
}

/** Lua helpers shared by the scripts. */
const prelude = `
local EPS = 1e-9
local DAY = 86400000
local function clock(arg)
  if arg ~= '' then return tonumber(arg) end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function ceil_ms(x)
  local c = math.ceil(x - EPS)
  if c < 0 then return 0 end
  return c
end
local function whole(x)
  local w = math.floor(x + EPS)
  if w < 0 then return 0 end
  return w
end
local function num(x) return string.format('%.17g', x) end
local function full_in(level, cap, window)
  if level >= cap - EPS then return 0 end
  return ceil_ms((cap - level) * window / cap)
end
local function rate_level(key, cap, window, now)
  local s = redis.call('HMGET', key, 'l', 't')
  if not s[1] then return cap end
  local elapsed = now - tonumber(s[2])
  if elapsed < 0 then elapsed = 0 end
  local level = tonumber(s[1]) + elapsed * cap / window
  if level > cap then return cap end
  return level
end
local function rate_store(key, level, cap, window, now)
  local ms = full_in(level, cap, window)
  if ms <= 0 then
    redis.call('DEL', key)
  else
    redis.call('HSET', key, 'l', num(level), 't', num(now))
    redis.call('PEXPIRE', key, ms)
  end
end
local function days_from_civil(y, m, d)
  if m <= 2 then y = y - 1 end
  local era = math.floor(y / 400)
  local yoe = y - era * 400
  local mp = m + 9
  if m > 2 then mp = m - 3 end
  local doy = math.floor((153 * mp + 2) / 5) + d - 1
  local doe = yoe * 365 + math.floor(yoe / 4) - math.floor(yoe / 100) + doy
  return era * 146097 + doe - 719468
end
local function period_of(now, period)
  local days = math.floor(now / DAY)
  local z = days + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524) - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local d = doy - math.floor((153 * mp + 2) / 5) + 1
  local m = mp + 3
  if mp >= 10 then m = mp - 9 end
  local y = yoe + era * 400
  if m <= 2 then y = y + 1 end
  if period == 'day' then
    return string.format('%04d-%02d-%02d', y, m, d), (days + 1) * DAY
  end
  if m == 12 then
    return string.format('%04d-%02d', y, m), days_from_civil(y + 1, 1, 1) * DAY
  end
  return string.format('%04d-%02d', y, m), days_from_civil(y, m + 1, 1) * DAY
end
`

/**
 * KEYS: one per check (a budget's without its period), then the lease marker. ARGV: now ('' = TIME),
 * lease id, lease TTL, check count, then per check kind (r/c/b), capacity, window ms or period, cost.
 * Returns admitted (1/0), failed index (-1; -1 with admitted 0: cancelled), retry-after ms, then per
 * check remaining, reset ms and the budget period ('' for others).
 */
const reserveLua = `${prelude}
local now = clock(ARGV[1])
local lease = ARGV[2]
local ttl = tonumber(ARGV[3])
local n = tonumber(ARGV[4])
local marker = KEYS[n + 1]
if redis.call('GET', marker) == 'x' then
  -- Cancelled before it arrived: its caller is gone, take nothing.
  local out = { 0, -1, 0 }
  for i = 1, n do
    out[#out + 1] = 0
    out[#out + 1] = 0
    out[#out + 1] = ''
  end
  return out
end
local views = {}
local failed = -1
local retry = 0
for i = 1, n do
  local b = 4 + (i - 1) * 4
  local kind, cap, arg, cost = ARGV[b + 1], tonumber(ARGV[b + 2]), ARGV[b + 3], tonumber(ARGV[b + 4])
  local key = KEYS[i]
  -- remaining/reset: the state as it is; a_remaining/a_reset: once this request is admitted.
  local v = { kind = kind, key = key, suffix = '', reset = 0, a_reset = 0, cost = cost }
  if kind == 'r' then
    local window = tonumber(arg)
    local level = rate_level(key, cap, window, now)
    v.cap, v.window, v.level = cap, window, level - cost
    v.remaining, v.reset = whole(level), full_in(level, cap, window)
    v.a_remaining, v.a_reset = whole(v.level), full_in(v.level, cap, window)
    v.ok = cost <= cap and level + EPS >= cost
    if cost > cap then
      v.retry = v.reset
    else
      v.retry = math.max(1, ceil_ms((cost - level) * window / cap))
    end
  elseif kind == 'c' then
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
    local held = redis.call('ZCARD', key)
    local mine = redis.call('ZSCORE', key, lease)
    v.ok = mine or held < cap
    v.remaining = math.max(0, cap - held)
    if mine then v.a_remaining = v.remaining else v.a_remaining = math.max(0, cap - held - 1) end
    local first = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
    local earliest = now + ttl
    if first[2] then earliest = tonumber(first[2]) end
    v.retry = math.max(1, earliest - now)
  else
    local suffix, ends = period_of(now, arg)
    v.suffix, v.key, v.ends = suffix, key .. ':' .. suffix, ends
    local spent = tonumber(redis.call('GET', v.key) or '0')
    v.ok = spent + cost <= cap
    v.remaining, v.a_remaining = whole(cap - spent), whole(cap - spent - cost)
    v.reset, v.a_reset, v.retry = ends - now, ends - now, ends - now
  end
  if not v.ok and failed < 0 then
    failed, retry = i - 1, v.retry
  end
  views[i] = v
end
if failed < 0 then
  local undo = { 'a' }
  for i = 1, n do
    local v = views[i]
    if v.kind == 'r' then
      rate_store(v.key, v.level, v.cap, v.window, now)
      undo[#undo + 1] = 'r ' .. num(v.cost) .. ' -'
    elseif v.kind == 'c' then
      redis.call('ZADD', v.key, now + ttl, lease)
      if redis.call('PTTL', v.key) < ttl then redis.call('PEXPIRE', v.key, ttl) end
      undo[#undo + 1] = 'c 0 -'
    else
      redis.call('INCRBYFLOAT', v.key, num(v.cost))
      redis.call('PEXPIRE', v.key, v.ends - now + 40 * DAY)
      undo[#undo + 1] = 'b ' .. num(v.cost) .. ' ' .. v.suffix
    end
  end
  redis.call('SET', marker, table.concat(undo, ' '), 'PX', math.max(1, math.ceil(ttl)))
end
local out = { failed < 0 and 1 or 0, failed, retry }
for i = 1, n do
  local v = views[i]
  if failed < 0 then
    out[#out + 1] = v.a_remaining
    out[#out + 1] = v.a_reset
  else
    out[#out + 1] = v.remaining
    out[#out + 1] = v.reset
  end
  out[#out + 1] = v.suffix
end
return out
`

/**
 * KEYS: one per check (a budget's with its period), then the lease marker. ARGV: now ('' = TIME),
 * lease id, check count, then per check kind (r/c/b), capacity, window ms, actual - reserved.
 */
const settleLua = `${prelude}
local now = clock(ARGV[1])
local lease = ARGV[2]
local n = tonumber(ARGV[3])
-- Only an admission still on record is settled, once: a retried settle changes nothing.
local record = redis.call('GET', KEYS[n + 1])
if not record or record == 'x' then return 0 end
for i = 1, n do
  local b = 3 + (i - 1) * 4
  local kind, cap, window, diff = ARGV[b + 1], tonumber(ARGV[b + 2]), tonumber(ARGV[b + 3]), tonumber(ARGV[b + 4])
  local key = KEYS[i]
  if kind == 'r' then
    if diff ~= 0 then
      local level = rate_level(key, cap, window, now) - diff
      if level > cap then level = cap end
      rate_store(key, level, cap, window, now)
    end
  elseif kind == 'c' then
    redis.call('ZREM', key, lease)
  elseif diff ~= 0 then
    redis.call('INCRBYFLOAT', key, num(diff))
    if redis.call('PTTL', key) < 0 then redis.call('PEXPIRE', key, 40 * DAY) end
  end
end
redis.call('DEL', KEYS[n + 1])
return 1
`

/**
 * KEYS: one per check (a budget's without its period), then the lease marker. ARGV: now ('' = TIME),
 * lease id, lease TTL, check count, then per check kind (r/c/b), capacity, window ms.
 * An admitted lease gives back exactly what its marker records; either way the marker ends as a
 * tombstone, so a reserve of this lease still on its way refuses. Returns 1 if it undid an admission.
 */
const cancelLua = `${prelude}
local now = clock(ARGV[1])
local lease = ARGV[2]
local ttl = tonumber(ARGV[3])
local n = tonumber(ARGV[4])
local marker = KEYS[n + 1]
local record = redis.call('GET', marker)
if record == 'x' then return 0 end
local undone = 0
if record then
  local undo = {}
  for word in string.gmatch(record, '%S+') do undo[#undo + 1] = word end
  for i = 1, n do
    local b = 4 + (i - 1) * 3
    local kind, cap, window = ARGV[b + 1], tonumber(ARGV[b + 2]), tonumber(ARGV[b + 3])
    local u = 2 + (i - 1) * 3
    local cost, suffix = tonumber(undo[u + 1]), undo[u + 2]
    local key = KEYS[i]
    -- A record that does not match the request (never written so) is left alone.
    local matches = undo[u] == kind and cost ~= nil
    if matches and kind == 'r' and cost ~= 0 then
      local level = rate_level(key, cap, window, now) + cost
      if level > cap then level = cap end
      rate_store(key, level, cap, window, now)
    elseif matches and kind == 'c' then
      redis.call('ZREM', key, lease)
    elseif matches and kind == 'b' and cost ~= 0 then
      -- A counter gone meanwhile (expired, or reset by an operator) has nothing to give back.
      local spend = key .. ':' .. suffix
      if redis.call('EXISTS', spend) == 1 then redis.call('INCRBYFLOAT', spend, num(-cost)) end
    end
  end
  undone = 1
end
redis.call('SET', marker, 'x', 'PX', math.max(1, math.ceil(ttl)))
return undone
`

interface Scripts {
  readonly gatewayLimiterReserve: (...args: ReadonlyArray<string | number>) => Promise<unknown>
  readonly gatewayLimiterSettle: (...args: ReadonlyArray<string | number>) => Promise<unknown>
  readonly gatewayLimiterCancel: (...args: ReadonlyArray<string | number>) => Promise<unknown>
}

/** I/O timeouts run on the real clock, even where a `TestClock` drives the limits' time. */
const liveClock = Clock.make()

const unavailable = (cause: unknown) =>
  new LimiterStoreUnavailable({ detail: cause instanceof Error ? cause.message : String(cause) })

const kindCode = (check: Check) => (check.kind === "rate" ? "r" : check.kind === "concurrency" ? "c" : "b")

const hashTag = /\{[^}]+\}/

/** The store's key for a check; a budget's gets `:<period>` appended (in Lua at reserve). */
const redisKey = (prefix: string, check: Check): string => {
  const key = hashTag.test(check.key) ? check.key : `{${check.key}}`
  return `${prefix}${key}:${check.kind === "rate" ? check.limit : check.kind}`
}

/** A lease's marker: in the hash tag of the request's first check, so it shares that check's slot. */
const markerKey = (prefix: string, leaseId: string, checks: ReadonlyArray<Check>): string => {
  const first = checks[0]
  const tag = first === undefined ? `{${leaseId}}` : (hashTag.exec(first.key)?.[0] ?? `{${first.key}}`)
  return `${prefix}${tag}:lease:${leaseId}`
}

export const make = (options: Options): Effect.Effect<LimiterStore["Type"]> =>
  Effect.sync(() => {
    const { redis } = options
    const prefix = options.keyPrefix ?? "gw:rl:"
    const timeout = Duration.millis(options.timeoutMs ?? 250)
    redis.defineCommand("gatewayLimiterReserve", { lua: reserveLua })
    redis.defineCommand("gatewayLimiterSettle", { lua: settleLua })
    redis.defineCommand("gatewayLimiterCancel", { lua: cancelLua })
    const scripts = redis as unknown as Scripts

    const now: Effect.Effect<string> =
      options.clock === "effect" ? Effect.map(Clock.currentTimeMillis, String) : Effect.succeed("")

    const timeoutMs = Duration.toMillis(timeout)
    const late = new LimiterStoreUnavailable({ detail: `no answer within ${Duration.format(timeout)}` })
    /**
     * One call, bounded by a plain timer rather than a fiber race: this is on every request's path.
     * (The command may still run once Redis answers: callers cancel what they gave up on.)
     */
    const run = (script: () => Promise<unknown>) =>
      Effect.async<unknown, LimiterStoreUnavailable>((resume) => {
        let over = false
        const timer = setTimeout(() => {
          over = true
          resume(Effect.fail(late))
        }, timeoutMs)
        script().then(
          (reply) => {
            if (over) return
            over = true
            clearTimeout(timer)
            resume(Effect.succeed(reply))
          },
          (cause) => {
            if (over) return
            over = true
            clearTimeout(timer)
            resume(Effect.fail(unavailable(cause)))
          }
        )
        return Effect.sync(() => {
          over = true
          clearTimeout(timer)
        })
      })

    const reserve = (request: ReserveRequest) =>
      Effect.flatMap(now, (time) => {
        const keys = request.checks.map((check) => redisKey(prefix, check))
        keys.push(markerKey(prefix, request.leaseId, request.checks))
        const args: Array<string | number> = [keys.length, ...keys, time, request.leaseId]
        args.push(request.leaseTtlMs, request.checks.length)
        for (const check of request.checks) {
          args.push(
            kindCode(check),
            check.capacity,
            check.kind === "rate" ? check.windowMs : check.kind === "budget" ? check.period : 0,
            check.kind === "concurrency" ? 0 : check.cost
          )
        }
        return run(() => scripts.gatewayLimiterReserve(...args))
      }).pipe(Effect.flatMap((reply) => decode(request, reply)))

    /** The settle script's arguments for one request. */
    const settleArgs = (request: SettleRequest, time: string) => {
      const keys = request.checks.map((check, i) => {
        const key = redisKey(prefix, check)
        const used = request.keys[i]
        return check.kind === "budget" && used !== undefined ? key + used.slice(check.key.length) : key
      })
      const n = keys.length
      keys.push(markerKey(prefix, request.leaseId, request.checks))
      const args: Array<string | number> = [keys.length, ...keys, time, request.leaseId, n]
      request.checks.forEach((check, i) => {
        // A budget without the key of its admission has no period to settle.
        const diff =
          check.kind === "concurrency" || (check.kind === "budget" && request.keys[i] === undefined)
            ? 0
            : (request.actual[i] ?? check.cost) - check.cost
        args.push(
          kindCode(check),
          check.capacity,
          check.kind === "rate" ? check.windowMs : 0,
          Number.isFinite(diff) ? diff : 0
        )
      })
      return args
    }

    const settle = (request: SettleRequest) =>
      Effect.flatMap(now, (time) =>
        run(() => scripts.gatewayLimiterSettle(...settleArgs(request, time)))
      ).pipe(Effect.asVoid)

    /** A batch in one pipeline: one write, one round trip. Any error fails the batch (retry is safe). */
    const settleAll = (requests: ReadonlyArray<SettleRequest>) =>
      requests.length === 1
        ? settle(requests[0]!)
        : Effect.flatMap(now, (time) =>
            run(async () => {
              const pipeline = redis.pipeline() as unknown as Scripts & { exec: () => Promise<unknown> }
              for (const request of requests) pipeline.gatewayLimiterSettle(...settleArgs(request, time))
              const results = (await pipeline.exec()) as ReadonlyArray<[Error | null, unknown]> | null
              const failed = results?.find(([error]) => error !== null)
              if (results === null || failed !== undefined) throw failed?.[0] ?? new Error("pipeline aborted")
            })
          ).pipe(Effect.asVoid)

    const cancel = (request: ReserveRequest) =>
      Effect.flatMap(now, (time) => {
        const keys = request.checks.map((check) => redisKey(prefix, check))
        keys.push(markerKey(prefix, request.leaseId, request.checks))
        const args: Array<string | number> = [keys.length, ...keys, time, request.leaseId]
        args.push(request.leaseTtlMs, request.checks.length)
        for (const check of request.checks) {
          args.push(kindCode(check), check.capacity, check.kind === "rate" ? check.windowMs : 0)
        }
        return run(() => scripts.gatewayLimiterCancel(...args))
      }).pipe(Effect.asVoid)

    return LimiterStore.of({ kind: "redis", reserve, settle, settleAll, cancel })
  })

/** The reserve script's reply as a `Decision`. */
const decode = (
  request: ReserveRequest,
  reply: unknown
): Effect.Effect<Decision, LimiterStoreUnavailable> => {
  const n = request.checks.length
  if (!Array.isArray(reply) || reply.length !== 3 + 3 * n) {
    return Effect.fail(new LimiterStoreUnavailable({ detail: "unexpected reply from the reserve script" }))
  }
  const states: Array<CheckState> = []
  const keys: Array<string> = []
  request.checks.forEach((check, i) => {
    states.push({ remaining: Number(reply[3 + 3 * i]), resetMs: Number(reply[4 + 3 * i]) })
    const suffix = String(reply[5 + 3 * i])
    keys.push(check.kind === "budget" ? `${check.key}:${suffix}` : check.key)
  })
  if (Number(reply[0]) === 1) return Effect.succeed({ admitted: true, states, keys })
  const failed = Number(reply[1])
  return Effect.succeed(
    failed < 0
      ? { admitted: false, failed: 0, retryAfterMs: 0, states, cancelled: true }
      : { admitted: false, failed, retryAfterMs: Number(reply[2]), states }
  )
}

export const layer = (options: Options): Layer.Layer<LimiterStore> =>
  Layer.effect(LimiterStore, make(options))

export interface ConnectOptions {
  /** ioredis' own bound on a command (the store's `timeoutMs` bounds each decision too). */
  readonly commandTimeoutMs?: number
  /** How long to wait for the first connection before handing the client over anyway. */
  readonly connectTimeoutMs?: number
  /** Cap of the reconnection backoff. */
  readonly maxReconnectDelayMs?: number
}

/**
 * An ioredis client for the hot path: commands fail at once while disconnected (no offline queue,
 * one retry), reconnects back off up to a cap, and the client quits (bounded) with the scope.
 * Redis being down at start is not an error: the client keeps reconnecting.
 */
export const connect = (
  url: string,
  options: ConnectOptions = {}
): Effect.Effect<Redis, never, Scope.Scope> => {
  const maxDelay = options.maxReconnectDelayMs ?? 2_000
  const connectTimeoutMs = options.connectTimeoutMs ?? 2_000
  const redisOptions: RedisOptions = {
    enableOfflineQueue: false,
    // A reserve sent before a disconnect must not run again after it (its caller has cancelled it).
    autoResendUnfulfilledCommands: false,
    // Commands issued in the same tick (reserves of concurrent requests) go out in one write.
    enableAutoPipelining: true,
    maxRetriesPerRequest: 1,
    connectTimeout: connectTimeoutMs,
    commandTimeout: options.commandTimeoutMs ?? 1_000,
    retryStrategy: (times) => Math.min(50 * 2 ** Math.min(times, 10), maxDelay)
  }
  const make = Effect.sync(() => {
    const client = new Redis(url, redisOptions)
    // Failures reach callers as \`LimiterStoreUnavailable\`; this only stops ioredis printing them.
    client.on("error", () => {})
    return client
  })
  const ready = (client: Redis) =>
    Effect.async<void>((resume) => {
      if (client.status === "ready") return resume(Effect.void)
      const onReady = () => resume(Effect.void)
      client.once("ready", onReady)
      return Effect.sync(() => client.off("ready", onReady))
    }).pipe(Effect.timeout(connectTimeoutMs), Effect.ignore, Effect.withClock(liveClock))
  const quit = (client: Redis) =>
    Effect.tryPromise(() => client.quit()).pipe(
      Effect.timeout(1_000),
      Effect.ignore,
      Effect.withClock(liveClock),
      Effect.ensuring(Effect.sync(() => client.disconnect()))
    )
  return Effect.acquireRelease(make, quit).pipe(Effect.tap(ready))
}
