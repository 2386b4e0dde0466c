/**
 * Once per test run, before any test file: the programs' bundles (see Programs.ts), removed after
 * the run. (In watch mode they are built once: a rerun after an edit of a program's source would
 * run the old bundle, so restart the watcher.)
 */
import { buildBundles } from "./Programs.js"

let remove: (() => Promise<void>) | undefined

export const setup = async (): Promise<void> => {
  remove = await buildBundles()
}

export const teardown = async (): Promise<void> => {
  await remove?.()
}
