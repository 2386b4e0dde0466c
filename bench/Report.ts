/** Markdown formatting of the benchmark's results. */

/** A markdown table; `undefined` cells print as "n/a". */
export const table = (
  head: ReadonlyArray<string>,
  rows: ReadonlyArray<ReadonlyArray<string | undefined>>
): string => {
  const line = (cells: ReadonlyArray<string | undefined>) => `| ${cells.map((c) => c ?? "n/a").join(" | ")} |`
  return [line(head), line(head.map(() => "---")), ...rows.map(line)].join("\n")
}

/** `x` with `digits` decimals, or undefined. */
export const fixed = (x: number | undefined, digits: number): string | undefined =>
  x === undefined ? undefined : x.toFixed(digits)

/** A signed difference such as `+0.42`. */
export const signed = (x: number | undefined, digits: number): string | undefined =>
  x === undefined ? undefined : `${x >= 0 ? "+" : ""}${x.toFixed(digits)}`

/** Requests per second, rounded, with thousands separators. */
export const rps = (x: number | undefined): string | undefined =>
  x === undefined ? undefined : Math.round(x).toLocaleString("en-US")

/** ✓ or ✗, or n/a when the value is missing. */
export const check = (passed: boolean | undefined): string =>
  passed === undefined ? "n/a" : passed ? "✓" : "✗"
