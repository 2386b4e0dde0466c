/**
 * The workspace's programs as the end-to-end tests start them. Once per test run (vitest's
 * `globalSetup`) each is bundled with esbuild — as the Dockerfile ships them — and the tests run
 * `node <bundle>`: the CLI's `--help` took 1.3–1.8 s that way against 8.6–9.6 s through
 * `node --import tsx` (which loads hundreds of modules through its loader) on this 2-core machine
 * under load, and starting programs dominated the suite's time. Without that setup (no
 * `GATEWAY_TEST_BUNDLE`) they run the sources through tsx.
 */
import * as Fs from "node:fs/promises"
import * as Path from "node:path"
import { fileURLToPath } from "node:url"

/** The repository root. */
export const root = fileURLToPath(new URL("../../", import.meta.url))

/** Set by the global setup to the bundles' file name once they are built. */
const bundlesVariable = "GATEWAY_TEST_BUNDLE"

/** The programs the tests run, by their entry points (relative to the root). */
export const entries = [
  "services/gateway/src/main.ts",
  "services/backend-sim/src/main.ts",
  "services/cli/src/main.ts"
] as const

/**
 * Where an entry's bundle goes: `dist/` beside the program's `src/`, one level below the package
 * like the source, so paths the programs take from `import.meta.url` (the gateway's embedded
 * config) resolve the same.
 */
const bundleOf = (entry: string, file: string) =>
  Path.join(root, Path.dirname(Path.dirname(entry)), "dist", file)

/** `node`'s arguments to run `entry` (relative to the root) with `args`. */
export const nodeArgs = (entry: string, args: ReadonlyArray<string> = []): Array<string> => {
  const bundle = process.env[bundlesVariable]
  return bundle !== undefined && (entries as ReadonlyArray<string>).includes(entry)
    ? [bundleOf(entry, bundle), ...args]
    : ["--import", "tsx", entry, ...args]
}

/**
 * PGlite loads its WebAssembly from beside its own module, so it stays outside the bundles; they
 * import it by its resolved path (a bundle in `services/cli/dist` cannot find it by name).
 */
const pglite = async (): Promise<Record<string, string>> => {
  const out: Record<string, string> = {}
  for (const name of ["@electric-sql/pglite", "@electric-sql/pglite-socket"]) {
    const dir = await Fs.realpath(Path.join(root, "packages/event-store/node_modules", name))
    const pkg = JSON.parse(await Fs.readFile(Path.join(dir, "package.json"), "utf8")) as {
      readonly exports?: { readonly "."?: { readonly import?: { readonly default?: string } } }
    }
    const main = pkg.exports?.["."]?.import?.default
    if (main === undefined) throw new Error(`cannot find the ES module of ${name}`)
    out[name] = Path.join(dir, main)
  }
  return out
}

/**
 * Builds every program's bundle (`dist/test-main-<pid>.mjs`: a file of this run's own, so two runs
 * in one checkout cannot start each other's half-written bundle) and tells the test workers to use
 * them; returns what removes them.
 */
export const buildBundles = async (): Promise<() => Promise<void>> => {
  const { build } = await import("esbuild")
  const external = await pglite()
  const file = `test-main-${process.pid}.mjs`
  await Promise.all(
    entries.map((entry) =>
      build({
        entryPoints: [Path.join(root, entry)],
        outfile: bundleOf(entry, file),
        bundle: true,
        platform: "node",
        format: "esm",
        target: "node20",
        legalComments: "none",
        logLevel: "warning",
        plugins: [
          {
            name: "pglite-by-path",
            setup: (b) =>
              b.onResolve({ filter: /^@electric-sql\/pglite(-socket)?$/ }, (args) => ({
                path: external[args.path]!,
                external: true
              }))
          }
        ],
        // Bundled CommonJS dependencies still call `require` for Node built-ins.
        banner: {
          js: "import { createRequire as __createRequire } from 'node:module'; const require = __createRequire(import.meta.url);"
        }
      })
    )
  )
  process.env[bundlesVariable] = file
  return async () => {
    await Promise.all(entries.map((entry) => Fs.rm(bundleOf(entry, file), { force: true })))
  }
}
