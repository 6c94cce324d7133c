'use strict';
// The load generator of test/bench/http.sh, with no dependencies: a fixed
// number of keep-alive connections to 127.0.0.1, each with one request in
// flight (a closed loop), every request GET /orders with the bearer token of
// a key picked uniformly at random from the tokens file.  Raw sockets rather
// than node:http's client, so that the generator spends as little as it can
// of the CPU the service and PostgreSQL share with it.
//
//   node loadgen.js --port P --tokens FILE [--concurrency 20] [--warmup 5]
//                   [--duration 30] [--postmaster PID] [--service PID]
//
// After the unmeasured warm-up it measures for --duration seconds: the
// responses that arrive in that window, their latencies (from writing the
// request to the response's last byte), and the CPU used meanwhile by the
// cluster (proc.js clusterTicks of --postmaster), by the --service process
// and by this process.  Prints key=value lines; ticks are clock ticks.

const fs = require('node:fs');
const net = require('node:net');
const { clusterTicks, processTicks } = require('./proc');

// --name value pairs, with defaults.
function options(argv) {
  const o = { concurrency: 20, warmup: 5, duration: 30, postmaster: 0, service: 0 };
  for (let i = 0; i < argv.length; i += 2) {
    const name = argv[i].replace(/^--/, '');
    if (!(name in o) && name !== 'port' && name !== 'tokens') throw new Error(`unknown option ${argv[i]}`);
    o[name] = name === 'tokens' ? argv[i + 1] : Number(argv[i + 1]);
  }
  if (!o.port || !o.tokens) throw new Error('--port and --tokens are required');
  return o;
}

const o = options(process.argv.slice(2));
// Every request is built once, up front, so that a request costs one write.
const requests = fs.readFileSync(o.tokens, 'latin1').split('\n').filter(Boolean).map((t) =>
  Buffer.from(`GET /orders HTTP/1.1\r\nHost: 127.0.0.1:${o.port}\r\n` +
              `Authorization: Bearer ${t}\r\n\r\n`, 'latin1'));
if (requests.length === 0) throw new Error(`no tokens in ${o.tokens}`);

let phase = 'warmup';                 // then 'measure', then 'stop'
const latencies = [];                 // ms, of the responses in the window
const statuses = {};                  // status -> count, in the window
let warmupNon200 = 0;
let errors = 0;                       // connections lost or responses unreadable
let open = 0;
const sockets = new Set();
let finished = null;                  // resolves when every connection has closed

// One connection: sends a request, reads its response, sends the next.
function connect() {
  if (phase === 'stop') return;
  const sock = net.connect({ host: '127.0.0.1', port: o.port });
  sock.setNoDelay(true);
  sockets.add(sock);
  open++;
  let buf = null;
  let sentAt = 0n;
  const send = () => {
    sentAt = process.hrtime.bigint();
    sock.write(requests[Math.floor(Math.random() * requests.length)]);
  };
  sock.on('connect', send);
  sock.on('data', (chunk) => {
    buf = buf ? Buffer.concat([buf, chunk]) : chunk;
    const end = buf.indexOf('\r\n\r\n');
    if (end < 0) return;
    // service.js answers with res.end(body): a Content-Length, never chunked.
    const head = buf.toString('latin1', 0, end);
    const m = /\r\ncontent-length: *(\d+)/i.exec(head);
    if (!m) {
      errors++;
      sock.destroy();
      return;
    }
    if (buf.length < end + 4 + Number(m[1])) return;
    buf = null;
    const status = Number(head.slice(9, 12));
    if (phase === 'measure') {
      latencies.push(Number(process.hrtime.bigint() - sentAt) / 1e6);
      statuses[status] = (statuses[status] || 0) + 1;
    } else if (phase === 'warmup' && status !== 200) {
      warmupNon200++;
    }
    if (phase === 'stop') sock.end();
    else send();
  });
  sock.on('error', () => { if (phase !== 'stop') errors++; });
  sock.on('close', () => {
    sockets.delete(sock);
    open--;
    if (phase !== 'stop') setTimeout(connect, 100);   // a lost connection is replaced
    else if (open === 0 && finished) finished();
  });
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function main() {
  for (let i = 0; i < o.concurrency; i++) connect();
  await sleep(o.warmup * 1000);

  const pg0 = o.postmaster ? clusterTicks(o.postmaster) : 0;
  const svc0 = o.service ? processTicks(o.service) : 0;
  const cpu0 = process.cpuUsage();
  const t0 = process.hrtime.bigint();
  phase = 'measure';
  await sleep(o.duration * 1000);
  phase = 'stop';
  const t1 = process.hrtime.bigint();
  const cpu1 = process.cpuUsage(cpu0);
  const svc1 = o.service ? processTicks(o.service) : 0;
  const pg1 = o.postmaster ? clusterTicks(o.postmaster) : 0;

  // Let the requests in flight finish (they are not counted), at most 5 s.
  await Promise.race([new Promise((resolve) => { finished = resolve; if (open === 0) resolve(); }),
                      sleep(5000)]);
  for (const s of sockets) s.destroy();

  const n = latencies.length;
  const sorted = Float64Array.from(latencies).sort();
  const pct = (q) => (n ? sorted[Math.min(n - 1, Math.ceil(q * n) - 1)] : 0);
  const seconds = Number(t1 - t0) / 1e9;
  const non200 = n - (statuses[200] || 0) + warmupNon200;
  const out = {
    requests: n,
    seconds: seconds.toFixed(3),
    rps: (n / seconds).toFixed(1),
    p50_ms: pct(0.50).toFixed(3),
    p99_ms: pct(0.99).toFixed(3),
    non200,
    statuses: Object.entries(statuses).map(([s, c]) => `${s}:${c}`).join(',') || 'none',
    errors,
    pg_ticks: pg1 - pg0,
    pg_end_ticks: pg1,
    service_ticks: svc1 - svc0,
    loadgen_us: cpu1.user + cpu1.system,
  };
  for (const [k, v] of Object.entries(out)) console.log(`${k}=${v}`);
}

main().then(() => process.exit(0), (err) => {
  console.error(`loadgen.js: ${err.stack || err}`);
  process.exit(1);
});
