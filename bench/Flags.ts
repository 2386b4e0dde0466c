import { type ParseArgsConfig, parseArgs } from "node:util"

type OptionsConfig = NonNullable<ParseArgsConfig["options"]>

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

/**
 * The flags of a bench script from `process.argv` (a leading `--` from `pnpm bench:x -- --flag`
 * dropped): `--help` prints the usage and exits 0, a bad flag prints it and exits 2. `fail` does
 * the same for a value the script itself refuses. `argv` is what was given, for the report.
 */
export const parse = <const O extends OptionsConfig>(script: string, usage: string, options: O) => {
  const args = process.argv.slice(2).filter((a, i) => !(i === 0 && a === "--"))
  const fail = (message: string): never => {
    process.stderr.write(`${script}: ${message}\n\n${usage}\n`)
    return process.exit(2)
  }
  let flags: ReturnType<typeof parseArgs<{ args: Array<string>; options: O }>>["values"]
  try {
    flags = parseArgs({ args, options }).values
  } catch (error) {
    return fail(error instanceof Error ? error.message : String(error))
  }
  if ((flags as { help?: unknown }).help === true) {
    process.stdout.write(`${usage}\n`)
    process.exit(0)
  }
  return { flags, fail, argv: args, ...parsers(script, usage) }
}
