/**
 * The Docker Compose stack (`docker-compose.yml` and what it mounts from `infra/`) hangs together,
 * checked without a Docker engine: what one service names, another provides (hosts, ports, mounted
 * files, data source uids, the collector's receivers and exporters), in both stacks an operator
 * starts — `docker compose up` (profile `sim`, from `.env`) and `--env-file infra/compose/gpu.env`
 * (profile `gpu`). Every metric the Grafana dashboards query is one that a real gateway, started
 * with the compose gateway config, serves on `/metrics` (or, for `vllm:*`, one the model servers
 * serve, as the simulator does).
 */
import * as Path from "node:path"
import { fileURLToPath } from "node:url"
import { FileSystem } from "@effect/platform"
import { NodeContext } from "@effect/platform-node"
import { describe, expect, it, layer } from "@effect/vitest"
import { ConfigLoader } from "@gateway/core"
import { Context, Effect, Either, Layer } from "effect"
import { SimConfig } from "../services/backend-sim/src/index.js"
import * as Admin from "./support/Admin.js"
import * as Processes from "./support/Processes.js"
import * as PromQL from "./support/PromQL.js"

const root = fileURLToPath(new URL("../", import.meta.url))
const composeFile = "docker-compose.yml"
const dockerfile = "infra/docker/Dockerfile"

/** The two stacks: the env file Compose reads, and the backends it must run. */
const stackFiles = {
  default: { envFile: ".env", backends: ["sim-small", "sim-large"] },
  gpu: { envFile: "infra/compose/gpu.env", backends: ["vllm-small", "vllm-large"] }
} as const
type StackName = keyof typeof stackFiles

/** Always on, whatever the profile. */
const coreServices = ["gateway", "postgres", "redis", "prometheus", "grafana", "otel-collector", "jaeger"]

// ---------------------------------------------------------------------------------------------
// Reading files
// ---------------------------------------------------------------------------------------------

const readText = (path: string) =>
  Effect.flatMap(FileSystem.FileSystem, (fs) => fs.readFileString(Path.join(root, path)))

const exists = (path: string) => Effect.flatMap(FileSystem.FileSystem, (fs) => fs.exists(path))

const isDirectory = (path: string) =>
  Effect.flatMap(FileSystem.FileSystem, (fs) =>
    fs.stat(path).pipe(
      Effect.map((info) => info.type === "Directory"),
      Effect.orElseSucceed(() => false)
    )
  )

/** A YAML file of the repository, parsed by the same parser the gateway's config loader uses. */
const readYaml = (path: string) =>
  Effect.flatMap(readText(path), (text) => ConfigLoader.parse(path, text)).pipe(Effect.map(resolveMerges))

/** YAML merge keys (`<<: *anchor`) applied, as Compose applies them. */
const resolveMerges = (value: any): any => {
  if (Array.isArray(value)) return value.map(resolveMerges)
  if (typeof value !== "object" || value === null) return value
  const { "<<": merged, ...own } = value
  const bases = merged === undefined ? [] : Array.isArray(merged) ? merged : [merged]
  const result: Record<string, unknown> = {}
  for (const base of bases) Object.assign(result, resolveMerges(base))
  for (const [key, v] of Object.entries(own)) result[key] = resolveMerges(v)
  return result
}

/** `KEY=VALUE` lines of an env file (comments and blank lines skipped, quotes removed). */
const parseEnvFile = (text: string): Record<string, string> =>
  Object.fromEntries(
    text
      .split("\n")
      .map((line) => line.trim())
      .filter((line) => line !== "" && !line.startsWith("#"))
      .map((line) => {
        const at = line.indexOf("=")
        expect(at, `env file line '${line}' is KEY=VALUE`).toBeGreaterThan(0)
        return [
          line.slice(0, at).trim(),
          line
            .slice(at + 1)
            .trim()
            .replace(/^(['"])(.*)\1$/, "$2")
        ]
      })
  )

/**
 * Compose's variable interpolation over every string of `doc`: `$$`, `$VAR`, `${VAR}`,
 * `${VAR:-default}`, `${VAR-default}`, `${VAR:?message}`, `${VAR:+alt}`. A variable that is unset
 * and has no default is recorded in `unset` (Compose would substitute an empty string).
 */
const interpolate = (doc: any, env: Record<string, string>, unset: Set<string>): any => {
  if (Array.isArray(doc)) return doc.map((v) => interpolate(v, env, unset))
  if (typeof doc === "object" && doc !== null) {
    return Object.fromEntries(Object.entries(doc).map(([k, v]) => [k, interpolate(v, env, unset)]))
  }
  if (typeof doc !== "string") return doc
  return doc.replace(
    /\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)/g,
    (whole, braced?: string, op?: string, arg?: string, bare?: string) => {
      if (whole === "$$") return "$"
      const name = (braced ?? bare)!
      const value = env[name]
      const empty = value === undefined || (op?.startsWith(":") === true && value === "")
      switch (op?.replace(":", "")) {
        case "-":
          return empty ? (arg ?? "") : value!
        case "+":
          return empty ? "" : (arg ?? "")
        case "?":
          if (empty) unset.add(name)
          return value ?? ""
        default:
          if (value === undefined) unset.add(name)
          return value ?? ""
      }
    }
  )
}

// ---------------------------------------------------------------------------------------------
// The compose model
// ---------------------------------------------------------------------------------------------

interface Mount {
  readonly type: "bind" | "volume"
  readonly source: string
  readonly target: string
  readonly readOnly: boolean
}

interface Published {
  readonly hostIp: string | undefined
  readonly published: number | undefined
  readonly target: number
}

interface Service {
  readonly name: string
  readonly spec: any
  readonly profiles: ReadonlyArray<string>
  readonly environment: Readonly<Record<string, string | undefined>>
  readonly mounts: ReadonlyArray<Mount>
  readonly ports: ReadonlyArray<Published>
  /** The ports its processes listen on: `expose` and the container side of `ports`. */
  readonly listens: ReadonlySet<number>
  readonly command: ReadonlyArray<string>
}

const environmentOf = (spec: any): Record<string, string | undefined> => {
  const env = spec.environment ?? {}
  if (!Array.isArray(env)) {
    return Object.fromEntries(Object.entries(env).map(([k, v]) => [k, v === null ? undefined : String(v)]))
  }
  return Object.fromEntries(
    env.map((entry: string) => {
      const at = entry.indexOf("=")
      return at === -1 ? [entry, undefined] : [entry.slice(0, at), entry.slice(at + 1)]
    })
  )
}

const mountsOf = (spec: any): Array<Mount> =>
  (spec.volumes ?? []).map((v: any): Mount => {
    if (typeof v !== "string") {
      return { type: v.type, source: v.source, target: v.target, readOnly: v.read_only === true }
    }
    const [source, target, mode] = v.split(":")
    return {
      type: /^[./~]/.test(source!) ? "bind" : "volume",
      source: source!,
      target: target!,
      readOnly: (mode ?? "").split(",").includes("ro")
    }
  })

const portsOf = (spec: any): Array<Published> =>
  (spec.ports ?? []).map((p: any): Published => {
    if (typeof p !== "string" && typeof p !== "number") {
      return {
        hostIp: p.host_ip,
        published: p.published === undefined ? undefined : Number(p.published),
        target: Number(p.target)
      }
    }
    const parts = String(p)
      .replace(/\/(tcp|udp)$/, "")
      .split(":")
    const target = Number(parts.at(-1))
    if (parts.length === 1) return { hostIp: undefined, published: undefined, target }
    if (parts.length === 2) return { hostIp: undefined, published: Number(parts[0]), target }
    return { hostIp: parts[0], published: Number(parts[1]), target }
  })

const serviceOf = (name: string, spec: any): Service => {
  const ports = portsOf(spec)
  const command = spec.command ?? []
  return {
    name,
    spec,
    profiles: spec.profiles ?? [],
    environment: environmentOf(spec),
    mounts: mountsOf(spec),
    ports,
    listens: new Set([...(spec.expose ?? []).map((p: unknown) => Number(p)), ...ports.map((p) => p.target)]),
    command: Array.isArray(command) ? command.map(String) : String(command).split(/\s+/)
  }
}

/** The value of `--flag value` or `--flag=value` in `args`. */
const flag = (args: ReadonlyArray<string>, name: string): string | undefined => {
  for (const [i, arg] of args.entries()) {
    if (arg === name) return args[i + 1]
    if (arg.startsWith(`${name}=`)) return arg.slice(name.length + 1)
  }
  return undefined
}

/** Where `containerPath` of `service` comes from in the repository (a bind mount), if anywhere. */
const hostPath = (service: Service, containerPath: string): string | undefined => {
  const mount = service.mounts
    .filter((m) => containerPath === m.target || containerPath.startsWith(`${m.target}/`))
    .sort((a, b) => b.target.length - a.target.length)[0]
  if (mount === undefined || mount.type !== "bind") return undefined
  return Path.join(root, mount.source, Path.posix.relative(mount.target, containerPath))
}

/** Milliseconds of a Compose duration (`30s`, `1m30s`, `500ms`). */
const composeDurationMs = (text: string): number => {
  const units: Record<string, number> = { us: 0.001, ms: 1, s: 1000, m: 60_000, h: 3_600_000 }
  const parts = [...String(text).matchAll(/(\d+(?:\.\d+)?)(us|ms|s|m|h)/g)]
  expect(parts.map((p) => p[0]).join(""), `'${text}' is a Compose duration`).toBe(String(text))
  return parts.reduce((sum, p) => sum + Number(p[1]) * units[p[2]!]!, 0)
}

/** `host:port` of a URL or an address. */
const hostPort = (address: string): { readonly host: string; readonly port: number } => {
  const url = new URL(address.includes("://") ? address : `tcp://${address}`)
  const port = url.port !== "" ? Number(url.port) : url.protocol === "https:" ? 443 : 80
  return { host: url.hostname, port }
}

/** The compose file with one env file's variables, and the services its profiles run. */
const stack = (name: StackName) =>
  Effect.gen(function* () {
    const { envFile } = stackFiles[name]
    const env = parseEnvFile(yield* readText(envFile))
    const unset = new Set<string>()
    const compose = interpolate(yield* readYaml(composeFile), env, unset)
    const profiles = (env.COMPOSE_PROFILES ?? "")
      .split(",")
      .map((p) => p.trim())
      .filter((p) => p !== "")
    const all = new Map<string, Service>(
      Object.entries(compose.services ?? {}).map(([n, spec]) => [n, serviceOf(n, spec)])
    )
    const running = new Map(
      [...all].filter(([, s]) => s.profiles.length === 0 || s.profiles.some((p) => profiles.includes(p)))
    )
    const service = (n: string) => {
      const found = all.get(n)
      expect(found, `service '${n}' in ${composeFile}`).toBeDefined()
      return found!
    }
    return { name, envFile, env, unset, compose, profiles, all, running, service }
  })

type Stack = Effect.Effect.Success<ReturnType<typeof stack>>

const bothStacks = Effect.all([stack("default"), stack("gpu")])

/** The gateway config a stack's gateway runs with, decoded by the gateway's own loader. */
const gatewayConfigOf = (s: Stack) =>
  Effect.gen(function* () {
    const gateway = s.service("gateway")
    const path = gateway.environment.GATEWAY_CONFIG
    expect(path, "GATEWAY_CONFIG is set").toBeDefined()
    const local = hostPath(gateway, path!)
    expect(local, `GATEWAY_CONFIG '${path}' is bind-mounted from the repository`).toBeDefined()
    expect(yield* exists(local!), `${Path.relative(root, local!)} exists (${s.name} stack)`).toBe(true)
    const config = yield* ConfigLoader.load(local!)
    const env = (name: string) => gateway.environment[name]
    return {
      path: local!,
      config,
      /** What the gateway listens on: PORT, HOST and METRICS_PORT over the file's `server`. */
      port: Number(env("PORT") ?? config.server.port),
      host: env("HOST") ?? config.server.host,
      metricsPort: env("METRICS_PORT") === undefined ? config.server.metricsPort : Number(env("METRICS_PORT"))
    }
  })

/** A service's config file, named by a command-line flag and bind-mounted from the repository. */
const mountedConfig = (service: Service, flagName: string) =>
  Effect.gen(function* () {
    const path = flag(service.command, flagName)
    expect(path, `${service.name} is started with ${flagName}`).toBeDefined()
    const local = hostPath(service, path!)
    expect(local, `${service.name}: ${path} is bind-mounted from the repository`).toBeDefined()
    return { path: Path.relative(root, local!), doc: yield* readYaml(Path.relative(root, local!)) }
  })

// ---------------------------------------------------------------------------------------------
// The Dockerfile
// ---------------------------------------------------------------------------------------------

interface Stage {
  readonly from: string
  readonly name: string | undefined
  readonly instructions: ReadonlyArray<{ readonly op: string; readonly args: string }>
}

/** The stages of a Dockerfile: each `FROM` and the instructions under it (continuations joined). */
const stagesOf = (text: string): Array<Stage> => {
  const lines = text
    .replace(/\\\n/g, " ")
    .split("\n")
    .map((l) => l.trim())
    .filter((l) => l !== "" && !l.startsWith("#"))
  const stages: Array<{ from: string; name: string | undefined; instructions: Array<any> }> = []
  for (const line of lines) {
    const [op, ...rest] = line.split(/\s+/)
    const args = rest.join(" ")
    if (op!.toUpperCase() === "FROM") {
      const match = /^(?:--\S+\s+)*(\S+)(?:\s+AS\s+(\S+))?$/i.exec(args)
      stages.push({ from: match![1]!, name: match![2], instructions: [] })
    } else stages.at(-1)?.instructions.push({ op: op!.toUpperCase(), args })
  }
  return stages
}

/** The arguments of a stage's last instruction `op` (the one that counts for WORKDIR, USER, CMD). */
const lastArgs = (stage: Stage, op: string): string | undefined =>
  stage.instructions.filter((i) => i.op === op).at(-1)?.args

/** `name:tag` with a tag that is a version, not `latest` (nor missing). */
const pinned = (image: string) => {
  const tag = /:([^/:@]+)$/.exec(image)?.[1]
  return tag !== undefined && tag !== "latest" && /\d/.test(tag)
}

/** A `.dockerignore` pattern as a regular expression over context paths (and what is under them). */
const ignorePattern = (pattern: string) => {
  const body = pattern
    .replace(/^\//, "")
    .split(/(\*\*\/|\*\*|\*|\?)/)
    .map((part) =>
      part === "**/"
        ? "(?:.*/)?"
        : part === "**"
          ? ".*"
          : part === "*"
            ? "[^/]*"
            : part === "?"
              ? "[^/]"
              : part.replace(/[.+^${}()|[\]\\]/g, "\\$&")
    )
    .join("")
  return new RegExp(`^${body}(?:/.*)?$`)
}

// ---------------------------------------------------------------------------------------------
// Grafana
// ---------------------------------------------------------------------------------------------

interface Datasource {
  readonly uid: string
  readonly type: string
  readonly url: string
  readonly isDefault?: boolean
  readonly jsonData?: Record<string, unknown>
}

/** What Grafana provisions: the data sources, the dashboard providers' directories, the dashboards. */
const grafana = Effect.gen(function* () {
  const s = yield* stack("default")
  const service = s.service("grafana")
  const provisioningPath = service.environment.GF_PATHS_PROVISIONING ?? "/etc/grafana/provisioning"
  const provisioning = hostPath(service, provisioningPath)
  expect(provisioning, `Grafana's ${provisioningPath} is bind-mounted from the repository`).toBeDefined()
  const fs = yield* FileSystem.FileSystem
  const yamlFiles = (dir: string) =>
    Effect.gen(function* () {
      const full = Path.join(provisioning!, dir)
      if (!(yield* isDirectory(full))) return []
      const names = (yield* fs.readDirectory(full)).filter((f) => /\.ya?ml$/.test(f)).sort()
      return yield* Effect.forEach(names, (f) => readYaml(Path.relative(root, Path.join(full, f))))
    })
  const datasources: Array<Datasource> = (yield* yamlFiles("datasources")).flatMap(
    (doc: any) => doc.datasources ?? []
  )
  const providers: Array<any> = (yield* yamlFiles("dashboards")).flatMap((doc: any) => doc.providers ?? [])
  const dashboards: Array<{ readonly file: string; readonly json: any }> = []
  for (const provider of providers) {
    const local = hostPath(service, provider.options?.path ?? "")
    expect(local, `dashboard provider '${provider.name}': ${provider.options?.path} is mounted`).toBeDefined()
    expect(yield* isDirectory(local!), `${provider.options.path} is a directory`).toBe(true)
    const files = (yield* fs.readDirectory(local!)).filter((f) => f.endsWith(".json")).sort()
    for (const file of files) {
      const text = yield* fs.readFileString(Path.join(local!, file))
      dashboards.push({ file: Path.relative(root, Path.join(local!, file)), json: JSON.parse(text) })
    }
  }
  return { stack: s, service, provisioning: provisioning!, datasources, providers, dashboards }
})

/** Every panel of a dashboard, rows' nested panels included. */
const panelsOf = (dashboard: any): Array<any> =>
  (dashboard.panels ?? []).flatMap((p: any) => [p, ...panelsOf(p)])

/** Every `datasource` reference anywhere in a dashboard (panels, targets, variables, annotations). */
const datasourceRefs = (value: any): Array<any> => {
  if (Array.isArray(value)) return value.flatMap(datasourceRefs)
  if (typeof value !== "object" || value === null) return []
  return Object.entries(value).flatMap(([key, v]) => (key === "datasource" ? [v] : datasourceRefs(v)))
}

interface Query {
  readonly where: string
  readonly expr: string
  readonly template: boolean
}

/** Every PromQL expression of the dashboards: panel targets and template variable queries. */
const promQueries = (g: Effect.Effect.Success<typeof grafana>): Array<Query> => {
  // A panel or query without a data source uses the default one.
  const typeOf = (ref: any) =>
    (ref === undefined || ref === null
      ? g.datasources.find((d) => d.isDefault === true)
      : g.datasources.find((d) => d.uid === (ref?.uid ?? ref))
    )?.type
  const queries: Array<Query> = []
  for (const { file, json } of g.dashboards) {
    for (const panel of panelsOf(json)) {
      for (const target of panel.targets ?? []) {
        if (typeOf(target.datasource ?? panel.datasource) !== "prometheus") continue
        queries.push({
          where: `${file}: '${panel.title}' ${target.refId}`,
          expr: target.expr,
          template: false
        })
      }
    }
    for (const variable of json.templating?.list ?? []) {
      if (variable.type !== "query" || typeOf(variable.datasource) !== "prometheus") continue
      const query = typeof variable.query === "string" ? variable.query : variable.query?.query
      queries.push({ where: `${file}: variable $${variable.name}`, expr: query, template: true })
    }
  }
  return queries
}

// ---------------------------------------------------------------------------------------------
// What a real gateway exports
// ---------------------------------------------------------------------------------------------

/** `# TYPE <name> <type>` lines of a text exposition. */
const metricTypes = (text: string): Map<string, string> =>
  new Map([...text.matchAll(/^# TYPE (\S+) (\S+)$/gm)].map((m) => [m[1]!, m[2]!]))

/** The series names a family of this type is queried by. */
const seriesOf = (name: string, type: string): Array<string> =>
  type === "histogram"
    ? [`${name}_bucket`, `${name}_sum`, `${name}_count`]
    : type === "summary"
      ? [name, `${name}_sum`, `${name}_count`]
      : [name]

interface Exporter {
  /** Series name → the type of its family (`histogram` for `_bucket`, `_sum`, `_count`). */
  readonly series: ReadonlyMap<string, string>
  /** The `_bucket` series of its histograms. */
  readonly buckets: ReadonlySet<string>
}

const exporterOf = (text: string): Exporter => {
  const series = new Map<string, string>()
  const buckets = new Set<string>()
  for (const [name, type] of metricTypes(text)) {
    for (const s of seriesOf(name, type)) series.set(s, type)
    if (type === "histogram") buckets.add(`${name}_bucket`)
  }
  return { series, buckets }
}

class Exported extends Context.Tag("test/Compose/Exported")<
  Exported,
  {
    /** A gateway started with the compose gateway config (backends on loopback). */
    readonly gateway: Exporter
    /** The simulated model server, whose `vllm:*` metrics mimic vLLM's. */
    readonly backend: Exporter
    /** The answer of `GET /metrics` on the config's `server.metrics_port`, without a key. */
    readonly metricsPort: { readonly status: number; readonly body: string }
  }
>() {
  static readonly layer = Layer.scoped(
    Exported,
    Effect.gen(function* () {
      const s = yield* stack("default")
      const { path } = yield* gatewayConfigOf(s)
      const raw: any = yield* readYaml(Path.relative(root, path))
      const sim = yield* Processes.startSim({ model: "small", ttftMs: 2, itlMs: 1, outputTokens: 4, seed: 1 })
      const metricsPort = yield* Processes.freePort
      const adminKey = Admin.newAdminKey()
      // The compose config as it is, but on loopback: free ports, the backends at the simulator.
      const config = {
        ...raw,
        server: { ...raw.server, host: "127.0.0.1", metrics_port: metricsPort },
        models: raw.models.map((m: any) => ({
          ...m,
          backends: m.backends.map((b: any) => ({ ...b, url: sim.url }))
        }))
      }
      const gateway = yield* Processes.startGateway(config, Admin.authEnv(adminKey))
      const get = (url: string, headers: Record<string, string> = {}) =>
        Effect.promise(() =>
          fetch(url, { headers, signal: AbortSignal.timeout(5000) }).then(
            async (res) => ({ status: res.status, body: await res.text() }),
            (error: Error) => ({ status: 0, body: String(error.cause ?? error) })
          )
        )
      const scraped = yield* get(`${gateway.url}/metrics`, Admin.bearer(adminKey))
      expect(scraped.status, scraped.body).toBe(200)
      const backend = yield* get(`${sim.url}/metrics`)
      expect(backend.status, backend.body).toBe(200)
      return {
        gateway: exporterOf(scraped.body),
        backend: exporterOf(backend.body),
        metricsPort: yield* get(`http://127.0.0.1:${metricsPort}/metrics`)
      }
    })
  )
}

/** The exporter a dashboard's metric must come from: the model servers for `vllm:*`, else the gateway. */
const exporterFor = (e: Context.Tag.Service<Exported>, metric: string) =>
  metric.startsWith("vllm:") ? e.backend : e.gateway

/** Metric names `queries` read that their exporter does not serve, each with where it is used. */
const unexported = (e: Context.Tag.Service<Exported>, queries: ReadonlyArray<Query>) =>
  queries.flatMap((q) => {
    const reads = q.template ? PromQL.templateReads(q.expr) : PromQL.reads(q.expr)
    return reads.metrics.filter((m) => !exporterFor(e, m).series.has(m)).map((m) => `${m} (${q.where})`)
  })

/** The port and model name a backend service is started with: the simulator's flags or vLLM's. */
const servedModel = (service: Service): { readonly port: number; readonly model: string } => {
  if (service.spec.build !== undefined) {
    const parsed = SimConfig.fromArgs(service.command.slice(2))
    if (Either.isLeft(parsed))
      throw new Error(`${service.name}: the simulator refuses its flags: ${parsed.left}`)
    expect(parsed.right.host, `${service.name} listens beyond its container`).toBe("0.0.0.0")
    return { port: parsed.right.port, model: parsed.right.model }
  }
  const served = flag(service.command, "--served-model-name") ?? flag(service.command, "--model")
  expect(served, `${service.name} is started with --model`).toBeDefined()
  return { port: Number(flag(service.command, "--port") ?? 8000), model: served! }
}

// ---------------------------------------------------------------------------------------------

layer(NodeContext.layer)("Compose stack (docker-compose.yml, infra/)", (it) => {
  it.effect("docker compose up runs the simulators; the gpu env file runs the two vLLM servers instead", () =>
    Effect.gen(function* () {
      for (const s of yield* bothStacks) {
        const expected = [...coreServices, ...stackFiles[s.name].backends].sort()
        expect([...s.running.keys()].sort(), `services of the ${s.name} stack (${s.envFile})`).toEqual(
          expected
        )
        expect([...s.unset], `variables ${composeFile} needs that ${s.envFile} leaves unset`).toEqual([])
      }
      const gpu = yield* stack("gpu")
      for (const name of stackFiles.gpu.backends) {
        expect(gpu.service(name).profiles, `${name} runs only with the gpu profile`).toEqual(["gpu"])
        const devices = gpu.service(name).spec.deploy?.resources?.reservations?.devices ?? []
        expect(
          devices.some((d: any) => d.driver === "nvidia" && (d.capabilities ?? []).includes("gpu")),
          `${name} reserves an NVIDIA GPU`
        ).toBe(true)
      }
    })
  )

  it.effect("every image is pinned; the app services are built from the Dockerfile, run by `node`", () =>
    Effect.gen(function* () {
      const s = yield* stack("default")
      for (const service of s.all.values()) {
        const image: string | undefined = service.spec.image
        expect(image, `${service.name} names its image`).toBeDefined()
        if (service.spec.build !== undefined) {
          expect(service.spec.build.dockerfile, `${service.name} is built from ${dockerfile}`).toBe(
            dockerfile
          )
          expect(service.spec.build.context ?? ".").toBe(".")
        } else expect(pinned(image!), `${service.name}: image '${image}' has a version tag`).toBe(true)
      }
      const stages = stagesOf(yield* readText(dockerfile))
      const final = stages.at(-1)!
      // What the final stage's COPYs write, each destination resolved against the WORKDIR before it.
      const copied: Array<string> = []
      let workdir = "/"
      for (const i of final.instructions) {
        if (i.op === "WORKDIR") workdir = Path.posix.resolve(workdir, i.args)
        if (i.op === "COPY") copied.push(Path.posix.resolve(workdir, i.args.split(/\s+/).at(-1)!))
      }
      // Every program a service (or the image itself) runs with node is a file the final stage copies.
      const cmd = JSON.parse(lastArgs(final, "CMD") ?? "[]") as Array<string>
      const programs = [
        cmd,
        ...[...s.all.values()].filter((x) => x.spec.build !== undefined).map((x) => x.command)
      ].filter((c) => c[0] === "node" && c.length > 1)
      expect(programs.length).toBeGreaterThan(0)
      for (const [, script] of programs) {
        const path = Path.posix.resolve(workdir, script!)
        expect(copied, `${path} is copied into the final stage`).toContain(path)
      }
    })
  )

  it.effect(
    "the Dockerfile is multi-stage, its final stage small and non-root, its sources in the context",
    () =>
      Effect.gen(function* () {
        const stages = stagesOf(yield* readText(dockerfile))
        expect(stages.length, "a build stage and a runtime stage").toBeGreaterThanOrEqual(2)
        for (const stage of stages) expect(pinned(stage.from), `FROM ${stage.from} is pinned`).toBe(true)
        const final = stages.at(-1)!
        const user = lastArgs(final, "USER")
        expect(user, "the final stage sets USER").toBeDefined()
        expect(["root", "0", "0:0", "root:root"], "the final stage's USER is not root").not.toContain(user)
        const runs = final.instructions.filter((i) => i.op === "RUN").map((i) => i.args)
        for (const run of runs) {
          expect(run, "the final stage installs nothing").not.toMatch(
            /\b(pnpm|npm|yarn)\b.*\binstall\b|apt-get/
          )
        }
        const fromBuild = final.instructions.filter((i) => i.op === "COPY" && /--from=/.test(i.args))
        expect(fromBuild.length, "the final stage copies its files from the build stage").toBeGreaterThan(0)
        const plain = final.instructions.filter((i) => i.op === "COPY" && !/--from=/.test(i.args))
        expect(
          plain.map((i) => i.args),
          "the final stage takes nothing from the context"
        ).toEqual([])
        // Whatever the build stage copies from the context is not excluded by .dockerignore.
        const ignored = (yield* readText(".dockerignore"))
          .split("\n")
          .map((l) => l.trim())
          .filter((l) => l !== "" && !l.startsWith("#") && !l.startsWith("!"))
          .map(ignorePattern)
        const sources = stages
          .flatMap((st) => st.instructions)
          .filter((i) => i.op === "COPY" && !/--from=/.test(i.args))
          .flatMap((i) =>
            i.args
              .split(/\s+/)
              .filter((a) => !a.startsWith("--"))
              .slice(0, -1)
          )
        expect(sources.length).toBeGreaterThan(0)
        for (const source of sources) {
          expect(
            ignored.filter((p) => p.test(source.replace(/\/$/, ""))),
            `${source} is in the context`
          ).toEqual([])
          expect(yield* exists(Path.join(root, source)), `${source} exists`).toBe(true)
        }
        for (const path of ["node_modules", "packages/core/node_modules", ".git", ".env"]) {
          expect(
            ignored.some((p) => p.test(path)),
            `.dockerignore keeps ${path} out of the context`
          ).toBe(true)
        }
      })
  )

  it.effect("the gateway on :8080 for all; Grafana, Prometheus and Jaeger on loopback only", () =>
    Effect.gen(function* () {
      const s = yield* stack("default")
      const published = (name: string, port: number) => {
        const found = s.service(name).ports.find((p) => p.published === port)
        expect(found, `${name} publishes port ${port}`).toBeDefined()
        expect(s.service(name).listens.has(found!.target)).toBe(true)
        return found!
      }
      expect(published("gateway", 8080).target).toBe(8080)
      expect(published("gateway", 8080).hostIp ?? "0.0.0.0").toBe("0.0.0.0")
      // The unauthenticated UIs (and the gateway's keyless metrics port) are not for the network.
      for (const [name, port] of [
        ["grafana", 3000],
        ["prometheus", 9090],
        ["jaeger", 16686]
      ] as const) {
        expect(published(name, port).target, `${name}'s own port`).toBe(port)
        expect(published(name, port).hostIp, `${name} is published on 127.0.0.1 only`).toBe("127.0.0.1")
      }
      for (const st of yield* bothStacks) {
        const { port, host, metricsPort } = yield* gatewayConfigOf(st)
        const gateway = st.service("gateway")
        expect(port, "the gateway listens on the published container port").toBe(8080)
        expect(["0.0.0.0", "::"], "the gateway listens beyond its container").toContain(host)
        expect(metricsPort, `server.metrics_port in the ${st.name} stack`).toBeDefined()
        expect(gateway.listens.has(metricsPort!), "the metrics port is exposed").toBe(true)
        expect(
          gateway.ports.filter((p) => p.target === metricsPort),
          "the keyless metrics port is not published on the host"
        ).toEqual([])
      }
    })
  )

  it.effect("every bind mount is in the repository; named volumes are declared and used", () =>
    Effect.gen(function* () {
      const s = yield* stack("default")
      const declared = Object.keys(s.compose.volumes ?? {}).sort()
      const used = new Set<string>()
      for (const service of s.all.values()) {
        for (const mount of service.mounts) {
          if (mount.type === "volume") {
            used.add(mount.source)
            expect(declared, `${service.name}: volume '${mount.source}' is declared`).toContain(mount.source)
          } else {
            expect(
              yield* exists(Path.join(root, mount.source)),
              `${service.name}: ${mount.source} exists`
            ).toBe(true)
            // Configuration is mounted read-only; only volumes hold state.
            expect(mount.readOnly, `${service.name}: ${mount.source} is mounted read-only`).toBe(true)
          }
        }
      }
      expect([...used].sort(), "every declared volume is used").toEqual(declared)
    })
  )

  it.effect(
    "each stack's gateway config decodes; its backends are running services that serve its models",
    () =>
      Effect.gen(function* () {
        for (const s of yield* bothStacks) {
          const { config } = yield* gatewayConfigOf(s)
          const backendHosts = new Set<string>()
          for (const model of config.models) {
            for (const backend of model.backends) {
              const { host, port } = hostPort(backend.url)
              backendHosts.add(host)
              const service = s.running.get(host)
              expect(service, `${backend.id}: '${host}' is a service of the ${s.name} stack`).toBeDefined()
              expect(service!.listens.has(port), `${backend.id}: ${host} listens on ${port}`).toBe(true)
              const served = servedModel(service!)
              expect(served.port, `${host} is started on the port it exposes`).toBe(port)
              expect(served.model, `${host} serves the name the gateway sends for '${model.name}'`).toBe(
                model.upstreamModel ?? model.name
              )
            }
          }
          expect([...backendHosts].sort(), `the ${s.name} stack's backends are all in use`).toEqual(
            [...stackFiles[s.name].backends].sort()
          )
          // The gateway's whole shutdown: answers in flight get shutdown_grace_ms, those cut then
          // drain_after_disconnect_ms (+1 s), closing the layers (the event flush) up to 15 s; it
          // exits by then on its own. Compose's SIGKILL must come later.
          const stopGrace = composeDurationMs(s.service("gateway").spec.stop_grace_period ?? "10s")
          const shutdown = config.server.shutdownGraceMs + config.metering.drainAfterDisconnectMs + 16_000
          expect(
            stopGrace,
            `stop_grace_period outlasts the gateway's shutdown (${shutdown} ms)`
          ).toBeGreaterThan(shutdown)
        }
      })
  )

  it.effect("depends_on names services of the same stacks; a healthy condition has a healthcheck", () =>
    Effect.gen(function* () {
      for (const s of yield* bothStacks) {
        for (const service of s.running.values()) {
          const deps = service.spec.depends_on ?? []
          const entries: Array<[string, any]> = Array.isArray(deps)
            ? deps.map((d: string) => [d, {}])
            : Object.entries(deps)
          for (const [dep, condition] of entries) {
            expect(s.running.has(dep), `${service.name} depends on '${dep}', running in ${s.name}`).toBe(true)
            if (condition?.condition === "service_healthy") {
              expect(s.service(dep).spec.healthcheck, `${dep} has a healthcheck`).toBeDefined()
            }
          }
        }
      }
    })
  )

  it.effect(
    "Prometheus scrapes the gateway's metrics port and every backend, on services and ports that exist",
    () =>
      Effect.gen(function* () {
        const s = yield* stack("default")
        const { path, doc } = yield* mountedConfig(s.service("prometheus"), "--config.file")
        const jobs: Array<any> = doc.scrape_configs ?? []
        const targetsOf = (job: any) => [
          ...(job.static_configs ?? []).flatMap((c: any) => (c.targets ?? []).map(hostPort)),
          ...(job.dns_sd_configs ?? []).flatMap((c: any) => {
            expect(c.type ?? "SRV", `${path}: job ${job.job_name} resolves A records`).toBe("A")
            return (c.names ?? []).map((host: string) => ({ host, port: Number(c.port) }))
          })
        ]
        const all = jobs.flatMap((job) => targetsOf(job).map((t) => ({ ...t, job: job.job_name })))
        expect(all.length).toBeGreaterThan(0)
        for (const { host, port, job } of all) {
          const service = s.all.get(host)
          expect(service, `${path}: job ${job} scrapes '${host}', a compose service`).toBeDefined()
          expect(service!.listens.has(port), `${path}: ${host} listens on ${port}`).toBe(true)
        }
        for (const job of jobs) {
          expect(job.metrics_path ?? "/metrics", `${job.job_name}'s metrics path`).toBe("/metrics")
          expect(job.scheme ?? "http").toBe("http")
        }
        for (const st of yield* bothStacks) {
          const { config, metricsPort } = yield* gatewayConfigOf(st)
          const scraped = (host: string, port: number) => all.some((t) => t.host === host && t.port === port)
          expect(
            scraped("gateway", metricsPort!),
            `${st.name} stack: gateway:${metricsPort} is scraped`
          ).toBe(true)
          for (const model of config.models) {
            for (const backend of model.backends) {
              const { host, port } = hostPort(backend.url)
              expect(scraped(host, port), `${st.name} stack: backend ${host}:${port} is scraped`).toBe(true)
            }
          }
        }
      })
  )

  it.effect(
    "the gateway sends traces to the collector's OTLP/HTTP receiver; the collector sends them to Jaeger",
    () =>
      Effect.gen(function* () {
        const s = yield* stack("default")
        const gateway = s.service("gateway")
        expect(gateway.environment.OTEL_SERVICE_NAME, "the service name traces carry").toBeTruthy()
        const endpoint = gateway.environment.OTEL_EXPORTER_OTLP_ENDPOINT
        expect(endpoint, "OTEL_EXPORTER_OTLP_ENDPOINT is set").toBeDefined()
        const target = hostPort(endpoint!)
        expect(endpoint!.startsWith("http://"), "OTLP over plain HTTP inside the compose network").toBe(true)
        const collector = s.service(target.host)
        expect(collector.listens.has(target.port), `${target.host} exposes ${target.port}`).toBe(true)
        const { path, doc } = yield* mountedConfig(collector, "--config")
        const receivers = doc.receivers ?? {}
        const exporters = doc.exporters ?? {}
        const http = hostPort(receivers.otlp?.protocols?.http?.endpoint ?? "localhost:4318")
        expect(http.port, `${path}: the OTLP/HTTP receiver is on the gateway's port`).toBe(target.port)
        for (const [protocol, config] of Object.entries<any>(receivers.otlp?.protocols ?? {})) {
          // The collector's default, localhost, is unreachable from the gateway's container.
          expect(
            hostPort(config?.endpoint ?? "localhost:0").host,
            `${path}: ${protocol} receiver binds`
          ).toBe("0.0.0.0")
          expect(collector.listens.has(hostPort(config.endpoint).port), `${protocol} port is exposed`).toBe(
            true
          )
        }
        const traces = doc.service?.pipelines?.traces
        expect(traces, `${path}: a traces pipeline`).toBeDefined()
        expect(traces.receivers).toContain("otlp")
        expect(traces.processors, `${path}: spans are batched`).toContain("batch")
        for (const [kind, ids] of [
          ["receivers", traces.receivers],
          ["processors", traces.processors ?? []],
          ["exporters", traces.exporters]
        ] as const) {
          for (const id of ids)
            expect(Object.keys(doc[kind] ?? {}), `${path}: ${kind} '${id}' is defined`).toContain(id)
        }
        const jaeger = s.service("jaeger")
        expect(jaeger.environment.COLLECTOR_OTLP_ENABLED, "Jaeger accepts OTLP").toBe("true")
        const toJaeger = (traces.exporters as Array<string>).filter(
          (id) => hostPort(exporters[id]?.endpoint ?? "none:0").host === "jaeger"
        )
        expect(toJaeger, `${path}: the traces pipeline exports to jaeger`).toHaveLength(1)
        const exporter = exporters[toJaeger[0]!]
        const { port } = hostPort(exporter.endpoint)
        const kind = toJaeger[0]!.split("/")[0]
        // OTLP/gRPC on 4317, OTLP/HTTP on 4318: Jaeger's own ports for each.
        expect(port, `${toJaeger[0]} uses Jaeger's port for its protocol`).toBe(
          kind === "otlphttp" ? 4318 : 4317
        )
        expect(jaeger.listens.has(port), `jaeger exposes ${port}`).toBe(true)
      })
  )

  it.effect(
    "Grafana provisions the Prometheus and Jaeger data sources and the mounted dashboards directory",
    () =>
      Effect.gen(function* () {
        const g = yield* grafana
        expect(g.datasources.map((d) => d.type).sort()).toEqual(["jaeger", "prometheus"])
        expect(new Set(g.datasources.map((d) => d.uid)).size, "data source uids are unique").toBe(
          g.datasources.length
        )
        for (const d of g.datasources) {
          const { host, port } = hostPort(d.url)
          expect(g.stack.all.get(host)?.listens.has(port), `data source ${d.uid}: ${host}:${port}`).toBe(true)
        }
        expect(
          g.stack.service(hostPort(g.datasources.find((d) => d.type === "prometheus")!.url).host).name
        ).toBe("prometheus")
        const { doc } = yield* mountedConfig(g.stack.service("prometheus"), "--config.file")
        const prometheus = g.datasources.find((d) => d.type === "prometheus")!
        expect(prometheus.jsonData?.timeInterval, "the data source knows Prometheus's scrape interval").toBe(
          doc.global?.scrape_interval
        )
        expect(g.providers.length).toBeGreaterThan(0)
        expect(g.dashboards.length, "dashboards in the provider's directory").toBeGreaterThan(0)
        const home = g.service.environment.GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH
        if (home !== undefined) {
          const local = hostPath(g.service, home)
          expect(local && (yield* exists(local)), `the home dashboard ${home} is mounted`).toBe(true)
        }
      })
  )

  it.effect("every dashboard has a unique uid and names only provisioned data sources", () =>
    Effect.gen(function* () {
      const g = yield* grafana
      const uids = g.datasources.map((d) => d.uid)
      const seen = new Set<string>()
      for (const { file, json } of g.dashboards) {
        expect(typeof json.uid, `${file}: uid`).toBe("string")
        expect(seen.has(json.uid), `${file}: uid '${json.uid}' is unique`).toBe(false)
        seen.add(json.uid)
        expect(json.title, `${file}: title`).toBeTruthy()
        const panels = panelsOf(json)
        expect(panels.length, `${file} has panels`).toBeGreaterThan(0)
        const ids = panels.map((p) => p.id)
        expect(new Set(ids).size, `${file}: panel ids are unique`).toBe(ids.length)
        for (const p of panels) {
          expect(
            p.gridPos.x + p.gridPos.w,
            `${file}: '${p.title}' fits the 24-column grid`
          ).toBeLessThanOrEqual(24)
        }
        for (const ref of datasourceRefs(json)) {
          const uid = typeof ref === "string" ? ref : ref?.uid
          if (uid === "-- Grafana --") continue
          expect(uids, `${file}: data source '${uid}' is provisioned`).toContain(uid)
        }
        for (const variable of json.templating?.list ?? []) {
          const used = JSON.stringify(json.panels).includes(`$${variable.name}`)
          expect(used, `${file}: variable $${variable.name} is used by some panel`).toBe(true)
        }
      }
    })
  )

  it.effect(
    "the Jaeger panels and links search the service the gateway's traces carry, on the published port",
    () =>
      Effect.gen(function* () {
        const g = yield* grafana
        const service = g.stack.service("gateway").environment.OTEL_SERVICE_NAME
        const jaegerUids = g.datasources.filter((d) => d.type === "jaeger").map((d) => d.uid)
        const searches = g.dashboards.flatMap(({ json }) =>
          panelsOf(json).flatMap((p) =>
            (p.targets ?? []).filter((t: any) => jaegerUids.includes((t.datasource ?? p.datasource)?.uid))
          )
        )
        expect(searches.length, "some panel shows traces").toBeGreaterThan(0)
        for (const t of searches) expect(t.service, "the Jaeger search's service").toBe(service)
        // Links open in the operator's browser: a port the host publishes, and the gateway's service.
        const jaegerUi = g.stack.service("jaeger").ports.find((p) => p.target === 16686)?.published
        for (const { file, json } of g.dashboards) {
          const links = (json.links ?? []).filter((l: any) => l.type === "link")
          expect(links.length, `${file} links to Jaeger`).toBeGreaterThan(0)
          for (const link of links) {
            const url = new URL(link.url)
            expect(Number(url.port), `${file}: '${link.title}' uses Jaeger's published port`).toBe(jaegerUi)
            expect(url.searchParams.get("service"), `${file}: '${link.title}' searches the gateway`).toBe(
              service
            )
          }
        }
      })
  )
})

describe("PromQL.reads", () => {
  it("names an expression's metrics, not its functions, labels, groupings or Grafana variables", () => {
    expect(
      PromQL.reads(
        // biome-ignore lint/suspicious/noTemplateCurlyInString: a Grafana variable, not a template
        'sum by (model, le) (rate(gateway_x_bucket{model=~"$model",tenant=~"${tenant}"}[$__rate_interval])) / on (instance) group_left sum(up) offset 5m > 1e3'
      )
    ).toEqual({ metrics: ["gateway_x_bucket", "up"], unknownFunctions: [], uncheckable: [] })
    expect(
      PromQL.reads('{__name__="gateway_y", job="gateway"} or vllm:num_requests_waiting').metrics
    ).toEqual(["vllm:num_requests_waiting", "gateway_y"])
    expect(PromQL.reads('{__name__=~"gateway_.*"}').uncheckable).toHaveLength(1)
    expect(PromQL.reads("sum(rat(gateway_z[5m]))").unknownFunctions).toEqual(["rat"])
    expect(PromQL.templateReads('label_values(gateway_a{model=~"$model"}, backend)').metrics).toEqual([
      "gateway_a"
    ])
    expect(PromQL.templateReads("label_values(tenant)").metrics).toEqual([])
    expect(PromQL.callArguments("histogram_quantile(0.9, sum by (le) (rate(b_bucket[1m])))", "rate")).toEqual(
      ["b_bucket[1m]"]
    )
  })
})

layer(Layer.provideMerge(Exported.layer, NodeContext.layer), { excludeTestServices: true, timeout: 90_000 })(
  "Compose dashboards against a real gateway's /metrics",
  (it) => {
    it.effect(
      "every metric a dashboard queries is one the gateway (or, for vllm:*, a model server) exports",
      () =>
        Effect.gen(function* () {
          const e = yield* Exported
          const queries = promQueries(yield* grafana)
          expect(queries.length).toBeGreaterThan(20)
          for (const q of queries) {
            const reads = q.template ? PromQL.templateReads(q.expr) : PromQL.reads(q.expr)
            expect(reads.unknownFunctions, `${q.where}: functions of ${q.expr}`).toEqual([])
            expect(reads.uncheckable, `${q.where}: names that cannot be checked`).toEqual([])
            expect(reads.metrics.length, `${q.where} reads a metric: ${q.expr}`).toBeGreaterThan(0)
          }
          expect(unexported(e, queries), "metrics the dashboards query that nothing exports").toEqual([])
          // The check itself: a misspelt name is caught.
          expect(
            unexported(e, [{ where: "probe", expr: "sum(rate(gateway_request_total[5m]))", template: false }])
          ).toEqual(["gateway_request_total (probe)"])
        })
    )

    it.effect(
      "rate and increase take counters or histogram series; histogram_quantile takes buckets by le",
      () =>
        Effect.gen(function* () {
          const e = yield* Exported
          for (const q of promQueries(yield* grafana)) {
            for (const fn of ["rate", "irate", "increase"]) {
              for (const arg of PromQL.callArguments(q.expr, fn)) {
                for (const m of PromQL.reads(arg).metrics) {
                  const type = exporterFor(e, m).series.get(m)
                  expect(
                    ["counter", "histogram", "summary"],
                    `${q.where}: ${fn}(${m}) of a ${type}`
                  ).toContain(type)
                }
              }
            }
            for (const arg of PromQL.callArguments(q.expr, "histogram_quantile")) {
              for (const m of PromQL.reads(arg).metrics) {
                expect(exporterFor(e, m).buckets.has(m), `${q.where}: histogram_quantile over ${m}`).toBe(
                  true
                )
              }
              if (PromQL.aggregates(arg)) {
                const groups = PromQL.groupings(arg)
                expect(
                  groups.some((g) => g.clause === "by" && g.labels.includes("le")),
                  `${q.where}: histogram_quantile keeps le`
                ).toBe(true)
                for (const g of groups) {
                  if (g.clause === "by") expect(g.labels, `${q.where}: by (...) keeps le`).toContain("le")
                  else expect(g.labels, `${q.where}: without (...) keeps le`).not.toContain("le")
                }
              }
            }
          }
        })
    )

    it.effect("the compose gateway serves /metrics on server.metrics_port, without a key", () =>
      Effect.gen(function* () {
        const { metricsPort } = yield* Exported
        expect(metricsPort.status, metricsPort.body).toBe(200)
        expect(metricsPort.body).toContain("# TYPE gateway_requests_total counter")
      })
    )
  }
)
