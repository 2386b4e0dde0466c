import { Agent, request } from "undici"

const url = process.argv[2]!
const n = Number(process.argv[3] ?? 10000)
const c = Number(process.argv[4] ?? 50)
const stream = process.argv[5] === "stream"
const agent = new Agent({ connections: c, keepAliveTimeout: 30000 })
const body = JSON.stringify({
  model: "sim",
  messages: [{ role: "user", content: "Hello there, how are you today?" }],
  stream
})
let sent = 0
const lat: number[] = []
const worker = async () => {
  while (sent < n) {
    sent++
    const t = performance.now()
    const r = await request(url, {
      method: "POST",
      body,
      headers: { "content-type": "application/json" },
      dispatcher: agent
    })
    await r.body.text()
    lat.push(performance.now() - t)
  }
}
const t0 = performance.now()
await Promise.all(Array.from({ length: c }, worker))
const el = (performance.now() - t0) / 1000
lat.sort((a, b) => a - b)
console.log(
  JSON.stringify({
    rps: Math.round(n / el),
    p50: lat[Math.floor(lat.length / 2)]!.toFixed(2),
    p99: lat[Math.floor(lat.length * 0.99)]!.toFixed(2)
  })
)
await agent.close()
