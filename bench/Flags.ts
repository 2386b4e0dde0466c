/** Number flags for the bench scripts: a bad value prints the usage and exits with status 2. */
export const parsers = (script: string, usage: string) => {
  const num = (name: string, raw: string, min: number): number => {
    const n = Number(raw)
    if (!Number.isFinite(n) || n < min) {
      process.stderr.write(`${script}: --${name} must be a number >= ${min}, got '${raw}'\n\n${usage}\n`)
      process.exit(2)
    }
    return n
  }
  const int = (name: string, raw: string, min: number): number => Math.floor(num(name, raw, min))
  const list = (name: string, raw: string): ReadonlyArray<number> =>
    raw.split(",").map((s) => int(name, s, 1))
  return { num, int, list }
}
