// Query parameters through @clickhouse/client against hdrlog's SQL endpoint; prints one JSON line.
import { createClient } from '@clickhouse/client'

const [url, username, password] = process.argv.slice(2)
const client = createClient({ url, username, password, compression: { response: true } })
const rs = await client.query({
  query: 'SELECT {s:String} AS s, {a:Array(String)} AS a, {n:Nullable(String)} AS n',
  query_params: { s: "it's", a: ['x', 'y'], n: null },
  format: 'JSONEachRow',
})
const rows = await rs.json()
console.log(JSON.stringify({ rows, summary: rs.response_headers['x-clickhouse-summary'] ?? null }))
await client.close()
