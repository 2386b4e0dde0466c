/** Small statistics helpers for the benchmark: percentiles of a sorted sample, medians of rounds. */

/** Nearest-rank percentile (`p` in 0..100) of an ascending sample; undefined when it is empty. */
export const percentile = (sorted: Float64Array, p: number): number | undefined => {
  if (sorted.length === 0) return undefined
  const rank = Math.ceil((p / 100) * sorted.length)
  return sorted[Math.min(sorted.length, Math.max(1, rank)) - 1]
}

/** Median of the defined values (mean of the middle two for an even count); undefined when none. */
export const median = (values: ReadonlyArray<number | undefined>): number | undefined => {
  const xs = values.filter((x): x is number => x !== undefined && Number.isFinite(x)).sort((a, b) => a - b)
  if (xs.length === 0) return undefined
  const mid = xs.length >> 1
  return xs.length % 2 === 1 ? xs[mid] : (xs[mid - 1]! + xs[mid]!) / 2
}

/** Largest of the defined values; undefined when none. */
export const max = (values: ReadonlyArray<number | undefined>): number | undefined => {
  const xs = values.filter((x): x is number => x !== undefined && Number.isFinite(x))
  return xs.length === 0 ? undefined : Math.max(...xs)
}

/** `a - b`, undefined when either is. */
export const diff = (a: number | undefined, b: number | undefined): number | undefined =>
  a === undefined || b === undefined ? undefined : a - b
