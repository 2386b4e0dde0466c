/**
 * What a PromQL expression (or a Grafana template query) reads, without a full parser: the metric
 * names it selects, the functions it calls, the metrics it takes `rate` of and the arguments of
 * its `histogram_quantile`s — enough to check dashboards against what an exporter serves.
 * Grafana's variables (`$model`, `${tenant}`, `[[x]]`, `$__rate_interval`) are understood.
 */

/** PromQL's functions (Prometheus 2.x and 3.x). */
const functions = new Set([
  "abs",
  "absent",
  "absent_over_time",
  "acos",
  "acosh",
  "asin",
  "asinh",
  "atan",
  "atanh",
  "avg_over_time",
  "ceil",
  "changes",
  "clamp",
  "clamp_max",
  "clamp_min",
  "cos",
  "cosh",
  "count_over_time",
  "day_of_month",
  "day_of_week",
  "day_of_year",
  "days_in_month",
  "deg",
  "delta",
  "deriv",
  "double_exponential_smoothing",
  "end",
  "exp",
  "floor",
  "histogram_avg",
  "histogram_count",
  "histogram_fraction",
  "histogram_quantile",
  "histogram_stddev",
  "histogram_stdvar",
  "histogram_sum",
  "holt_winters",
  "hour",
  "idelta",
  "increase",
  "info",
  "irate",
  "label_join",
  "label_replace",
  "last_over_time",
  "ln",
  "log10",
  "log2",
  "mad_over_time",
  "max_over_time",
  "min_over_time",
  "minute",
  "month",
  "pi",
  "predict_linear",
  "present_over_time",
  "quantile_over_time",
  "rad",
  "rate",
  "resets",
  "round",
  "scalar",
  "sgn",
  "sin",
  "sinh",
  "sort",
  "sort_by_label",
  "sort_by_label_desc",
  "sort_desc",
  "sqrt",
  "start",
  "stddev_over_time",
  "stdvar_over_time",
  "sum_over_time",
  "tan",
  "tanh",
  "time",
  "timestamp",
  "vector",
  "year"
])

const aggregations = new Set([
  "sum",
  "min",
  "max",
  "avg",
  "group",
  "stddev",
  "stdvar",
  "count",
  "count_values",
  "bottomk",
  "topk",
  "quantile",
  "limitk",
  "limit_ratio"
])

const keywords = new Set([
  "by",
  "without",
  "on",
  "ignoring",
  "group_left",
  "group_right",
  "offset",
  "bool",
  "and",
  "or",
  "unless",
  "atan2",
  "inf",
  "nan"
])

const grouping = /\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)/g
const identifier = /(?<![\w:.$])([a-zA-Z_:][a-zA-Z0-9_:]*)/g

/** Grafana's variables, replaced by something PromQL-shaped that names nothing. */
const withoutVariables = (text: string) => text.replace(/\[\[\w+(?::\w+)?\]\]|\$\{[^}]*\}|\$\w+/g, "0")

/** Comments and string literals removed (label values, regexes, `label_replace` arguments). */
const withoutStrings = (text: string) =>
  text.replace(/#[^\n]*/g, "").replace(/"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`/g, '""')

/** The metric names an equality matcher on `__name__` selects, e.g. `{__name__="up"}`. */
const nameMatchers = (text: string) =>
  [...text.matchAll(/__name__\s*=\s*"((?:[^"\\]|\\.)*)"/g)].map((m) => m[1]!)

export interface Reads {
  /** Metric names selected, each once, in order of appearance. */
  readonly metrics: ReadonlyArray<string>
  /** Called names that are neither PromQL functions nor aggregations (a typo, or not PromQL). */
  readonly unknownFunctions: ReadonlyArray<string>
  /** `__name__` matched by a regex or a negation: a name that cannot be checked. */
  readonly uncheckable: ReadonlyArray<string>
}

/** What `expr` reads. */
export const reads = (expr: string): Reads => {
  const text = withoutStrings(withoutVariables(expr))
  const named = nameMatchers(withoutVariables(expr))
  const uncheckable = [...withoutVariables(expr).matchAll(/__name__\s*(=~|!=|!~)\s*"[^"]*"/g)].map(
    (m) => m[0]
  )
  const bare = text
    .replace(/\{[^}]*\}/g, " ")
    .replace(/\[[^\]]*\]/g, " ")
    .replace(grouping, " $1 ")
  const metrics = new Set<string>()
  const unknownFunctions = new Set<string>()
  for (const match of bare.matchAll(identifier)) {
    const name = match[1]!
    const called = /^\s*\(/.test(bare.slice(match.index! + name.length))
    if (keywords.has(name) || aggregations.has(name) || functions.has(name)) continue
    if (called) unknownFunctions.add(name)
    else metrics.add(name)
  }
  for (const name of named) metrics.add(name)
  return { metrics: [...metrics], unknownFunctions: [...unknownFunctions], uncheckable }
}

/**
 * What a Grafana template query of a Prometheus data source reads: `label_values(expr, label)`,
 * `label_values(label)`, `query_result(expr)`, or `metrics(regex)` (uncheckable).
 */
export const templateReads = (query: string): Reads => {
  const q = query.trim()
  const labelValues = /^label_values\(\s*(.*?)\s*(?:,\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*)?\)$/s.exec(q)
  if (labelValues !== null) {
    // One argument is a label name (values over all metrics): it reads no metric.
    return labelValues[2] === undefined
      ? { metrics: [], unknownFunctions: [], uncheckable: [] }
      : reads(labelValues[1]!)
  }
  const queryResult = /^query_result\(\s*(.*)\s*\)$/s.exec(q)
  if (queryResult !== null) return reads(queryResult[1]!)
  if (/^(label_names|metrics)\(/.test(q)) return { metrics: [], unknownFunctions: [], uncheckable: [q] }
  return reads(q)
}

/** The argument text of every call of `fn` in `expr` (strings and variables neutralised). */
export const callArguments = (expr: string, fn: string): ReadonlyArray<string> => {
  const text = withoutStrings(withoutVariables(expr))
  const found: Array<string> = []
  const call = new RegExp(`(?<![\\w:])${fn}\\s*\\(`, "g")
  for (const match of text.matchAll(call)) {
    const start = match.index! + match[0].length
    let depth = 1
    let i = start
    while (i < text.length && depth > 0) {
      if (text[i] === "(") depth++
      else if (text[i] === ")") depth--
      i++
    }
    found.push(text.slice(start, i - 1))
  }
  return found
}

/** The label lists of the `by (...)` and `without (...)` clauses in `text`. */
export const groupings = (
  text: string
): ReadonlyArray<{ readonly clause: string; readonly labels: ReadonlyArray<string> }> =>
  [...text.matchAll(grouping)]
    .filter((m) => m[1] === "by" || m[1] === "without")
    .map((m) => ({
      clause: m[1]!,
      labels: m[2]!
        .split(",")
        .map((l) => l.trim())
        .filter((l) => l !== "")
    }))

/** Whether `text` aggregates (calls an aggregation operator) at all. */
export const aggregates = (text: string): boolean =>
  [...text.matchAll(identifier)].some((m) => aggregations.has(m[1]!))
