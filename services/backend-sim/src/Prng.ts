/**
 * A small seeded pseudo-random generator (mulberry32): fast, 32 bits of state, and the same sequence
 * for the same seed on every platform, which makes the simulator's content and faults reproducible.
 */

/** A generator of floats in [0, 1). */
export interface Prng {
  readonly next: () => number
  /** A 32-bit unsigned integer, e.g. to seed a child generator. */
  readonly nextUint32: () => number
}

/** A generator seeded with `seed` (any integer; only its low 32 bits matter). */
export const make = (seed: number): Prng => {
  let state = seed >>> 0
  const nextUint32 = (): number => {
    state = (state + 0x6d2b79f5) >>> 0
    let t = state
    t = Math.imul(t ^ (t >>> 15), t | 1)
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61)
    return (t ^ (t >>> 14)) >>> 0
  }
  return { nextUint32, next: () => nextUint32() / 4294967296 }
}

/** A generator seeded from `Math.random`, for runs that need no reproducibility. */
export const makeUnseeded = (): Prng => make(Math.floor(Math.random() * 4294967296))
