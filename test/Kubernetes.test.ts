/**
 * The Kubernetes manifests in `infra/k8s` hang together: what one resource names, another
 * provides (labels and selectors, ports, probes, Secret keys, ConfigMaps, writable paths), and
 * the gateway config they mount is one the gateway's own loader accepts.
 */
import { join, posix } from "node:path"
import { fileURLToPath } from "node:url"
import { FileSystem } from "@effect/platform"
import { NodeContext } from "@effect/platform-node"
import { expect, layer } from "@effect/vitest"
import { ConfigLoader } from "@gateway/core"
import * as Gateway from "@gateway/gateway/Gateway"
import { Effect } from "effect"

const dir = fileURLToPath(new URL("../infra/k8s", import.meta.url))
const kustomizationFile = "kustomization.yaml"
/** Shows the Secret's shape; never applied, so the real Secret is not overwritten. */
const secretExampleFile = "secret.example.yaml"

type Labels = Record<string, string>

interface Resource {
  readonly file: string
  readonly apiVersion: string
  readonly kind: string
  readonly metadata: { readonly name: string; readonly labels?: Labels }
  readonly spec?: any
  readonly data?: Record<string, string>
  readonly stringData?: Record<string, string>
  readonly resources?: ReadonlyArray<string>
}

/** Every `.yaml` file of `infra/k8s`, parsed by the same YAML parser the gateway's config loader uses. */
const manifests = Effect.gen(function* () {
  const fs = yield* FileSystem.FileSystem
  const files = (yield* fs.readDirectory(dir)).filter((f) => /\.ya?ml$/.test(f)).sort()
  return yield* Effect.forEach(files, (file) =>
    Effect.gen(function* () {
      const text = yield* fs.readFileString(join(dir, file))
      const doc = (yield* ConfigLoader.parse(file, text)) as Omit<Resource, "file"> | null
      return { ...doc, file } as Resource
    })
  )
})

/** The resources `kubectl apply -k` creates, and the pieces of them the checks read. */
const cluster = Effect.gen(function* () {
  const all = yield* manifests
  const kustomization = all.find((m) => m.file === kustomizationFile)
  if (kustomization === undefined) throw new Error(`no ${kustomizationFile} in infra/k8s`)
  const applied = all.filter((m) => (kustomization.resources ?? []).includes(m.file))
  const one = (kind: string) => {
    const found = applied.filter((m) => m.kind === kind)
    expect(
      found.map((m) => m.file),
      `exactly one ${kind} is applied`
    ).toHaveLength(1)
    return found[0]!
  }
  const deployment = one("Deployment")
  const pod = deployment.spec.template.spec
  const containers: Array<any> = pod.containers
  expect(containers, "the gateway Deployment runs one container").toHaveLength(1)
  const container = containers[0]
  const configMap = (name: string) => {
    const found = applied.find((m) => m.kind === "ConfigMap" && m.metadata.name === name)
    expect(found, `ConfigMap '${name}' is one of the applied manifests`).toBeDefined()
    return found!
  }
  const secret = all.find((m) => m.file === secretExampleFile)
  if (secret === undefined) throw new Error(`no ${secretExampleFile} in infra/k8s`)
  return {
    all,
    kustomization,
    applied,
    deployment,
    pod,
    container,
    service: one("Service"),
    hpa: one("HorizontalPodAutoscaler"),
    pdb: one("PodDisruptionBudget"),
    secret,
    configMap,
    env: environment(container, configMap)
  }
})

/** Where an environment variable's value comes from. */
type EnvSource =
  | { readonly _tag: "Value"; readonly value: string }
  | { readonly _tag: "Secret"; readonly name: string; readonly key: string; readonly optional: boolean }
  | { readonly _tag: "Field"; readonly fieldPath: string }
  | { readonly _tag: "Other" }

/** The container's environment: `envFrom` ConfigMaps and Secrets first, `env` over them. */
const environment = (container: any, configMap: (name: string) => Resource): Map<string, EnvSource> => {
  const env = new Map<string, EnvSource>()
  for (const from of container.envFrom ?? []) {
    if (from.configMapRef !== undefined) {
      const data = configMap(from.configMapRef.name).data ?? {}
      for (const [name, value] of Object.entries(data)) env.set(name, { _tag: "Value", value: String(value) })
    }
    expect(from.secretRef, "secrets come in one `secretKeyRef` at a time, so each key is checked").toBe(
      undefined
    )
  }
  for (const entry of container.env ?? []) {
    const from = entry.valueFrom
    if (from === undefined) env.set(entry.name, { _tag: "Value", value: String(entry.value) })
    else if (from.secretKeyRef !== undefined)
      env.set(entry.name, {
        _tag: "Secret",
        name: from.secretKeyRef.name,
        key: from.secretKeyRef.key,
        optional: from.secretKeyRef.optional === true
      })
    else if (from.configMapKeyRef !== undefined) {
      const value = configMap(from.configMapKeyRef.name).data?.[from.configMapKeyRef.key]
      expect(
        value,
        `ConfigMap '${from.configMapKeyRef.name}' has key '${from.configMapKeyRef.key}'`
      ).toBeDefined()
      env.set(entry.name, { _tag: "Value", value: String(value) })
    } else if (from.fieldRef !== undefined)
      env.set(entry.name, { _tag: "Field", fieldPath: from.fieldRef.fieldPath })
    else env.set(entry.name, { _tag: "Other" })
  }
  return env
}

const valueOf = (env: Map<string, EnvSource>, name: string): string | undefined => {
  const source = env.get(name)
  return source?._tag === "Value" ? source.value : undefined
}

/** `selector` picks `labels`: a non-empty selector whose every entry the labels carry. */
const selects = (selector: Labels | undefined, labels: Labels) =>
  selector !== undefined &&
  Object.keys(selector).length > 0 &&
  Object.entries(selector).every(([key, value]) => labels[key] === value)

/** The container port a probe or a Service's `targetPort` names (by name or by number). */
const containerPort = (container: any, port: string | number): number | undefined =>
  container.ports?.find((p: any) => p.name === port || p.containerPort === port)?.containerPort

/** The files a pod sees under each volume mount of a ConfigMap. */
const configFiles = (c: Effect.Effect.Success<typeof cluster>): Map<string, string> => {
  const files = new Map<string, string>()
  for (const mount of c.container.volumeMounts ?? []) {
    const volume = c.pod.volumes?.find((v: any) => v.name === mount.name)
    expect(volume, `volume '${mount.name}' of a volumeMount exists`).toBeDefined()
    if (volume.configMap === undefined) continue
    const data = c.configMap(volume.configMap.name).data ?? {}
    const items: Array<{ key: string; path: string }> =
      volume.configMap.items ?? Object.keys(data).map((key) => ({ key, path: key }))
    for (const { key, path } of items) {
      expect(data[key], `ConfigMap '${volume.configMap.name}' has the mounted key '${key}'`).toBeDefined()
      // With `subPath` the mount is that one file; without it, a directory of all of them.
      if (mount.subPath === undefined) files.set(posix.join(mount.mountPath, path), data[key]!)
      else if (mount.subPath === path) files.set(mount.mountPath, data[key]!)
    }
  }
  return files
}

/** The gateway config the pods run with, decoded by the gateway's own loader. */
const gatewayConfig = (c: Effect.Effect.Success<typeof cluster>) =>
  Effect.gen(function* () {
    const path = valueOf(c.env, "GATEWAY_CONFIG")
    expect(path, "GATEWAY_CONFIG is set to a literal path").toBeDefined()
    const files = configFiles(c)
    const text = files.get(path!)
    expect(
      text,
      `GATEWAY_CONFIG '${path}' is a file mounted from a ConfigMap (${[...files.keys()]})`
    ).toBeDefined()
    // The same file name, so the loader picks YAML or JSON by the extension as it will in the pod.
    const fs = yield* FileSystem.FileSystem
    const local = join(yield* fs.makeTempDirectoryScoped(), posix.basename(path!))
    yield* fs.writeFileString(local, text!)
    return yield* ConfigLoader.load(local)
  })

/** Seconds the preStop hook sleeps (`sleep` action, or an exec of `sleep N`). */
const preStopSleep = (container: any): number => {
  const preStop = container.lifecycle?.preStop
  expect(preStop, "a preStop hook holds the pod while its endpoint is removed").toBeDefined()
  if (preStop.sleep !== undefined) return Number(preStop.sleep.seconds)
  const match = /\bsleep\s+(\d+)/.exec((preStop.exec?.command ?? []).join(" "))
  expect(match, "the preStop hook sleeps").not.toBeNull()
  return Number(match![1])
}

/** The path is inside a writable mount of a volume that is not the image. */
const writableVolumeOf = (c: Effect.Effect.Success<typeof cluster>, path: string) => {
  const mount = (c.container.volumeMounts ?? []).find(
    (m: any) => path === m.mountPath || path.startsWith(`${m.mountPath}/`)
  )
  expect(mount, `'${path}' is on a volume mount`).toBeDefined()
  expect(mount.readOnly, `the mount holding '${path}' is writable`).not.toBe(true)
  return c.pod.volumes.find((v: any) => v.name === mount.name)
}

layer(NodeContext.layer)("Kubernetes manifests (infra/k8s)", (it) => {
  it.effect("every file is one resource with apiVersion, kind and metadata.name, none twice", () =>
    Effect.gen(function* () {
      const { all } = yield* cluster
      expect(all.length).toBeGreaterThan(1)
      const seen = new Set<string>()
      for (const m of all) {
        expect(typeof m.apiVersion === "string" && m.apiVersion !== "", `${m.file}: apiVersion`).toBe(true)
        expect(typeof m.kind === "string" && m.kind !== "", `${m.file}: kind`).toBe(true)
        if (m.file === kustomizationFile) continue
        expect(typeof m.metadata?.name, `${m.file}: metadata.name`).toBe("string")
        const id = `${m.kind}/${m.metadata.name}`
        expect(seen.has(id), `${m.file}: ${id} is defined once`).toBe(false)
        seen.add(id)
      }
    })
  )

  it.effect("the kustomization lists every manifest, no missing file, and never the example Secret", () =>
    Effect.gen(function* () {
      const { all, kustomization } = yield* cluster
      expect(kustomization.kind).toBe("Kustomization")
      const files = all.map((m) => m.file)
      const listed = [...(kustomization.resources ?? [])].sort()
      expect(listed).toEqual(files.filter((f) => f !== kustomizationFile && f !== secretExampleFile))
      expect(new Set(listed).size, "no manifest is listed twice").toBe(listed.length)
    })
  )

  it.effect("the Deployment, Service, PodDisruptionBudget and autoscaler all mean the same pods", () =>
    Effect.gen(function* () {
      const { deployment, service, pdb, hpa, pod } = yield* cluster
      const podLabels: Labels = deployment.spec.template.metadata.labels
      const selector: Labels = deployment.spec.selector.matchLabels
      expect(selects(selector, podLabels), "the Deployment's selector matches its pod template").toBe(true)
      expect(service.spec.selector, "the Service selects the Deployment's pods, and only them").toEqual(
        selector
      )
      expect(pdb.spec.selector.matchLabels, "the PDB guards the Deployment's pods, and only them").toEqual(
        selector
      )
      expect(hpa.spec.scaleTargetRef).toEqual({
        apiVersion: "apps/v1",
        kind: "Deployment",
        name: deployment.metadata.name
      })
      const spread = [
        ...(pod.topologySpreadConstraints ?? []).map((t: any) => t.labelSelector?.matchLabels),
        ...(pod.affinity?.podAntiAffinity?.preferredDuringSchedulingIgnoredDuringExecution ?? []).map(
          (t: any) => t.podAffinityTerm.labelSelector?.matchLabels
        ),
        ...(pod.affinity?.podAntiAffinity?.requiredDuringSchedulingIgnoredDuringExecution ?? []).map(
          (t: any) => t.labelSelector?.matchLabels
        )
      ]
      for (const s of spread)
        expect(selects(s, podLabels), "spreading counts the gateway's own pods").toBe(true)
    })
  )

  it.effect("the Service's targetPort is the container port the gateway listens on, on every interface", () =>
    Effect.gen(function* () {
      const c = yield* cluster
      expect(c.service.spec.type ?? "ClusterIP").toBe("ClusterIP")
      const ports: Array<any> = c.service.spec.ports
      expect(ports.map((p) => p.port)).toContain(80)
      const http = c.container.ports.find((p: any) => p.name === "http")
      expect(http, "the container port is named 'http'").toBeDefined()
      for (const p of ports) {
        expect(containerPort(c.container, p.targetPort), `Service port ${p.port} → '${p.targetPort}'`).toBe(
          http.containerPort
        )
      }
      const config = yield* gatewayConfig(c)
      const port = valueOf(c.env, "PORT")
      expect(port === undefined ? config.server.port : Number(port), "PORT (or server.port)").toBe(
        http.containerPort
      )
      const host = valueOf(c.env, "HOST") ?? config.server.host
      expect(["0.0.0.0", "::"], "HOST (or server.host) is reachable from outside the pod").toContain(host)
    }).pipe(Effect.scoped)
  )

  it.effect("readiness asks /ready, liveness and start-up ask /health, on the named port", () =>
    Effect.gen(function* () {
      const { container } = yield* cluster
      const probes = {
        readinessProbe: "/ready",
        livenessProbe: "/health",
        startupProbe: "/health"
      }
      for (const [probe, path] of Object.entries(probes)) {
        const get = container[probe]?.httpGet
        expect(get?.path, `${probe} path`).toBe(path)
        expect(get.port, `${probe} names the port`).toBe("http")
        expect(containerPort(container, get.port), `${probe} port exists`).toBeDefined()
      }
      // /ready gives each of its checks up to 2 s; a probe that gives up sooner fails a ready pod.
      expect(container.readinessProbe.timeoutSeconds).toBeGreaterThan(2)
    })
  )

  it.effect("every secretKeyRef names the Secret and one of its keys; the example holds placeholders", () =>
    Effect.gen(function* () {
      const { env, secret } = yield* cluster
      expect(secret.kind).toBe("Secret")
      const keys = { ...secret.data, ...secret.stringData }
      const refs = [...env.entries()].flatMap(([name, source]) =>
        source._tag === "Secret" ? [{ name, source }] : []
      )
      expect(refs.map((r) => r.name).sort()).toEqual([
        "ADMIN_KEY",
        "DATABASE_URL",
        "OPENAI_API_KEY",
        "REDIS_URL"
      ])
      for (const { name, source } of refs) {
        expect(source.name, `${name}: Secret name`).toBe(secret.metadata.name)
        expect(Object.keys(keys), `${name}: key '${source.key}' in ${secretExampleFile}`).toContain(
          source.key
        )
      }
      for (const [key, value] of Object.entries(keys)) {
        expect(value, `${secretExampleFile}: ${key} is a placeholder, not a real secret`).toContain(
          "REPLACE_ME"
        )
      }
      // Without these each pod keeps its own event log and its own rate limits.
      for (const name of ["DATABASE_URL", "REDIS_URL"]) {
        expect(env.get(name), `${name} is required`).toMatchObject({ _tag: "Secret", optional: false })
      }
      expect(env.get("GATEWAY_ID"), "GATEWAY_ID is the pod's name").toEqual({
        _tag: "Field",
        fieldPath: "metadata.name"
      })
    })
  )

  it.effect("the mounted gateway.yaml decodes with the gateway's config schema, its api_key_env set", () =>
    Effect.gen(function* () {
      const c = yield* cluster
      const config = yield* gatewayConfig(c)
      expect(config.models.map((m) => m.name)).toEqual(expect.arrayContaining(["small", "large"]))
      for (const name of ["small", "large"]) {
        const model = config.models.find((m) => m.name === name)!
        expect(model.backends.length, `${name} has two replicas`).toBe(2)
        expect(model.pricing, `${name} has a price`).toBeDefined()
      }
      expect(config.routing.policies.map((p) => p.name)).toContain("auto")
      // The gateway will not start without a backend's key variable: it must always be there.
      for (const model of config.models) {
        for (const backend of model.backends) {
          if (backend.apiKeyEnv === undefined) continue
          const source = c.env.get(backend.apiKeyEnv)
          expect(source, `${backend.apiKeyEnv} (api_key_env of ${backend.id}) is set`).toBeDefined()
          if (source?._tag === "Secret") {
            expect(source.optional, `${backend.apiKeyEnv} is not an optional secretKeyRef`).toBe(false)
          }
        }
      }
    }).pipe(Effect.scoped)
  )

  it.effect("the container runs as non-root on a read-only root, writing only to its own volumes", () =>
    Effect.gen(function* () {
      const c = yield* cluster
      const pod = c.pod.securityContext ?? {}
      const own = c.container.securityContext ?? {}
      expect(own.runAsNonRoot ?? pod.runAsNonRoot).toBe(true)
      const user = own.runAsUser ?? pod.runAsUser
      expect(Number.isInteger(user) && user > 0, "a numeric non-root runAsUser").toBe(true)
      expect(own.readOnlyRootFilesystem).toBe(true)
      expect(own.allowPrivilegeEscalation).toBe(false)
      expect(own.capabilities?.drop).toContain("ALL")
      expect(own.capabilities?.add ?? []).toEqual([])
      expect((own.seccompProfile ?? pod.seccompProfile)?.type).toBe("RuntimeDefault")
      for (const name of ["SPOOL_DIR", "DATA_DIR"]) {
        const path = valueOf(c.env, name)
        expect(path, `${name} is set (its default is under the read-only image)`).toBeDefined()
        const volume = writableVolumeOf(c, path!)
        expect(
          volume.emptyDir ?? volume.persistentVolumeClaim ?? volume.ephemeral,
          `${name}'s volume`
        ).toBeDefined()
      }
    })
  )

  it.effect("shutdown: the grace period outlasts the preStop sleep and the gateway's whole drain", () =>
    Effect.gen(function* () {
      const c = yield* cluster
      const grace: number = c.pod.terminationGracePeriodSeconds
      const sleep = preStopSleep(c.container)
      expect(sleep).toBeGreaterThan(0)
      expect(grace).toBeGreaterThan(sleep)
      const config = yield* gatewayConfig(c)
      const longest = Math.max(...config.models.map((m) => config.timeoutsFor(m).totalMs))
      expect(grace, `grace ≥ preStop ${sleep} s + longest total_ms ${longest} ms`).toBeGreaterThanOrEqual(
        sleep + Math.ceil(longest / 1000)
      )
      // The gateway lets the longest answer finish, and the kubelet waits for its whole shutdown
      // (grace, drain of cut answers, event flush) before SIGKILL.
      const { shutdownGraceMs } = config.server
      expect(shutdownGraceMs, "shutdown_grace_ms ≥ the longest total_ms").toBeGreaterThanOrEqual(longest)
      const budget = Gateway.shutdownBudgetMs(config)
      expect(budget).toBeGreaterThan(shutdownGraceMs)
      expect(
        grace,
        `grace > preStop ${sleep} s + the gateway's shutdown (shutdown_grace_ms ${shutdownGraceMs} ms, at most ${budget} ms in all)`
      ).toBeGreaterThan(sleep + Math.ceil(budget / 1000))
    }).pipe(Effect.scoped)
  )

  it.effect("metrics: Prometheus scrapes the pods on the gateway's metrics port, not on the API port", () =>
    Effect.gen(function* () {
      const c = yield* cluster
      const config = yield* gatewayConfig(c)
      const port = config.server.metricsPort
      expect(port, "server.metrics_port is set").toBeDefined()
      const metrics = c.container.ports.find((p: any) => p.name === "metrics")
      expect(metrics?.containerPort, "the container port named 'metrics' is server.metrics_port").toBe(port)
      expect(port, "the metrics port is not the API's").not.toBe(containerPort(c.container, "http"))
      const annotations: Record<string, string> = c.deployment.spec.template.metadata.annotations ?? {}
      expect(annotations["prometheus.io/scrape"]).toBe("true")
      expect(annotations["prometheus.io/port"], "the scrape annotation names the metrics port").toBe(
        String(port)
      )
      expect(annotations["prometheus.io/path"] ?? "/metrics").toBe("/metrics")
      expect(valueOf(c.env, "METRICS_PORT"), "no METRICS_PORT overriding the file").toBeUndefined()
      // The Service carries the API only: the metrics port needs no key, so it stays inside the pod network.
      for (const p of c.service.spec.ports) expect(containerPort(c.container, p.targetPort)).not.toBe(port)
    }).pipe(Effect.scoped)
  )

  it.effect("capacity: requests and limits, rolling update, autoscaler and disruption budget agree", () =>
    Effect.gen(function* () {
      const { deployment, container, hpa, pdb, pod } = yield* cluster
      for (const kind of ["requests", "limits"]) {
        expect(container.resources?.[kind]?.cpu, `${kind}.cpu`).toBeDefined()
        expect(container.resources?.[kind]?.memory, `${kind}.memory`).toBeDefined()
      }
      expect(deployment.spec.strategy).toMatchObject({
        type: "RollingUpdate",
        rollingUpdate: { maxUnavailable: 0, maxSurge: 1 }
      })
      const { minReplicas, maxReplicas } = hpa.spec
      expect(hpa.apiVersion).toBe("autoscaling/v2")
      expect(minReplicas).toBeGreaterThanOrEqual(3)
      expect(maxReplicas).toBeGreaterThan(minReplicas)
      // `replicas` may be left to the autoscaler; when set, it is a count the autoscaler keeps.
      const replicas: number | undefined = deployment.spec.replicas
      if (replicas !== undefined) {
        expect(replicas, "replicas ≥ minReplicas").toBeGreaterThanOrEqual(minReplicas)
        expect(replicas, "replicas ≤ maxReplicas").toBeLessThanOrEqual(maxReplicas)
      }
      const cpu = hpa.spec.metrics.find((m: any) => m.type === "Resource" && m.resource.name === "cpu")
      expect(cpu?.resource.target.type).toBe("Utilization")
      expect(hpa.spec.behavior?.scaleDown?.stabilizationWindowSeconds).toBeGreaterThan(0)
      // At the autoscaler's minimum a drain can still evict a pod, and leaves at least two serving.
      const { minAvailable, maxUnavailable } = pdb.spec
      const evictable = minAvailable !== undefined ? minReplicas - minAvailable : maxUnavailable
      expect(evictable, "the PDB lets a drain evict a pod at minReplicas").toBeGreaterThanOrEqual(1)
      expect(minReplicas - evictable).toBeGreaterThanOrEqual(2)
      const acrossNodes =
        (pod.topologySpreadConstraints ?? []).some(
          (t: any) => t.topologyKey === "kubernetes.io/hostname" && t.whenUnsatisfiable === "DoNotSchedule"
        ) || pod.affinity?.podAntiAffinity !== undefined
      expect(acrossNodes, "replicas are spread across nodes").toBe(true)
    })
  )
})
