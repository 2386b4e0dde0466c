/** Once per test run, before any test file: the programs' bundles (see Programs.ts). */
import { buildBundles } from "./Programs.js"

export const setup = async (): Promise<void> => {
  await buildBundles()
}
