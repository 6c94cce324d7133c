'use strict';
// A minimal HTTP service (node:http and pg) that authenticates every request
// with apikeys.verify() and answers each refusal with its HTTP status and the
// rate-limit headers of verify's result.  test.js drives it over loopback.
//
//   GET    /orders     scope orders:read
//   POST   /reports    scope reports:write, costs 10 credits
//   DELETE /keys/<id>  scope keys:write: revokes one of the caller's owner's
//                      keys, recording X-Actor (or the calling key) as the actor
//
// Run it by hand: PGHOST=... PGDATABASE=... PGUSER=<a role granted apikeys_app>
// node service.js  (listens on 127.0.0.1, port $PORT or 8080).
//
// The lines between BEGIN README and END README are the README's example
// (section "Rate-limit headers"); test.js checks that README.md holds them
// byte for byte.

const http = require('node:http');
const { Pool } = require('pg');

// BEGIN README: Rate-limit headers
// The status for each refusal of apikeys.verify(); every other code
// (API_KEY_INVALID, API_KEY_REVOKED, API_KEY_EXPIRED, API_KEY_DISABLED) is 401.
const DENY = { INSUFFICIENT_SCOPE: 403, IP_NOT_ALLOWED: 403, USAGE_EXCEEDED: 402,
               RATE_LIMITED: 429 };

// retry_after: seconds until ratelimit_reset, by the clock of the server that set it.
const VERIFY = `
  SELECT v.*,
         greatest(0, ceil(extract(epoch FROM v.ratelimit_reset - clock_timestamp())))::integer
           AS retry_after
    FROM apikeys.verify($1, $2::text[], $3::inet, $4) v`;

function sendJson(res, status, body) {
  res.statusCode = status;
  res.setHeader('Content-Type', 'application/json');
  res.end(JSON.stringify(body));
}

// Verifies the request's bearer token.  Returns verify()'s row when the request
// may go on; otherwise answers it (401, 402, 403 or 429) and returns null.
// pool: a pg Pool of a role granted apikeys_app.  cost: credits the call spends.
async function apiKey(pool, req, res, scopes = [], cost = 1) {
  const bearer = /^Bearer +(\S+)$/i.exec(req.headers.authorization || '');
  // The peer's address; behind a proxy, take it from the proxy's header instead.
  const ip = (req.socket.remoteAddress || '').replace(/^::ffff:/, '') || null;
  const { rows: [v] } = await pool.query(VERIFY, [bearer ? bearer[1] : '', scopes, ip, cost]);
  if (v.credits_remaining !== null)          // bigint: pg returns it as a string
    res.setHeader('X-Credits-Remaining', v.credits_remaining);
  if (v.ratelimit_limit !== null) {
    res.setHeader('X-RateLimit-Limit', String(v.ratelimit_limit));
    res.setHeader('X-RateLimit-Remaining', String(v.ratelimit_remaining));
    res.setHeader('X-RateLimit-Reset',                                   // epoch seconds
                  String(Math.ceil(v.ratelimit_reset.getTime() / 1000)));
  }
  if (v.valid) return v;
  const status = DENY[v.code] || 401;
  if (status === 401) res.setHeader('WWW-Authenticate', 'Bearer');
  if (v.code === 'RATE_LIMITED') res.setHeader('Retry-After', String(v.retry_after));
  sendJson(res, status, { error: v.code });
  return null;
}
// In a request handler:
//   const key = await apiKey(pool, req, res, ['reports:write'], 10);   // costs 10 credits
//   if (!key) return;                                                  // refused, and answered
//   ... key.owner, key.key_id, key.scopes, key.metadata ...
// END README: Rate-limit headers

const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;

// Runs fn(client) in a transaction that records `actor` as apikeys.actor.
// set_config(..., true) lasts until the transaction ends, so the pooled
// connection goes back clean, and the actor travels as a bind parameter:
// `SET LOCAL apikeys.actor = $1` is a syntax error (SET takes no parameters),
// and pasting the value into the SQL text would let a caller inject SQL.
async function withActor(pool, actor, fn) {
  const client = await pool.connect();
  try {
    await client.query('BEGIN');
    await client.query("SELECT set_config('apikeys.actor', $1, true)", [actor]);
    const result = await fn(client);
    await client.query('COMMIT');
    client.release();
    return result;
  } catch (err) {
    // A client that cannot even roll back is dropped from the pool.
    await client.query('ROLLBACK').then(() => client.release(), (e) => client.release(e));
    throw err;
  }
}

async function route(pool, req, res) {
  const path = new URL(req.url, 'http://localhost').pathname;
  let m;
  if (req.method === 'GET' && path === '/orders') {
    const key = await apiKey(pool, req, res, ['orders:read']);
    if (!key) return;
    sendJson(res, 200, { owner: key.owner, key_id: key.key_id, orders: [] });
  } else if (req.method === 'POST' && path === '/reports') {
    const key = await apiKey(pool, req, res, ['reports:write'], 10);
    if (!key) return;
    sendJson(res, 200, { owner: key.owner, key_id: key.key_id, report: 'queued' });
  } else if (req.method === 'DELETE' && (m = /^\/keys\/([^/]+)$/.exec(path))) {
    const key = await apiKey(pool, req, res, ['keys:write']);
    if (!key) return;
    if (!UUID.test(m[1])) return sendJson(res, 404, { error: 'KEY_NOT_FOUND' });
    // Who acts: the end user the client names (a label, as apikeys.actor is;
    // a real service would name the user its own login established), else the key.
    const actor = req.headers['x-actor'] || `apikey:${key.key_id}`;
    try {
      const revokedAt = await withActor(pool, actor, async (c) =>
        (await c.query('SELECT apikeys.revoke($1, $2, $3) AS at',
                       [m[1], key.owner, 'revoked through the API'])).rows[0].at);
      sendJson(res, 200, { key_id: m[1], revoked_at: revokedAt });
    } catch (err) {
      if (err.code !== 'P0002') throw err;         // another owner's key, or none
      sendJson(res, 404, { error: 'KEY_NOT_FOUND' });
    }
  } else {
    sendJson(res, 404, { error: 'NOT_FOUND' });
  }
}

// A pool of at most 10 connections.  An idle connection that breaks (server
// restart, pg_terminate_backend) is dropped by the pool and reported here:
// without an 'error' listener it would end the process.
function createPool(config = {}, log = console.error) {
  const pool = new Pool({ max: 10, application_name: 'apikeys-node-example', ...config });
  pool.on('error', (err) => log(`idle database connection lost: ${err.message}`));
  return pool;
}

// The HTTP server.  When the database cannot answer, the request gets 503:
// no request is let through unverified.  handle: the routes (the benchmark's
// hand-written variant passes its own).
function createService(pool, log = console.error, handle = route) {
  return http.createServer((req, res) => {
    handle(pool, req, res).catch((err) => {
      log(`${req.method} ${req.url}: ${err.message}`);
      if (res.headersSent) return res.destroy();
      for (const name of res.getHeaderNames()) res.removeHeader(name);
      sendJson(res, 503, { error: 'SERVICE_UNAVAILABLE' });
    });
  });
}

module.exports = { DENY, apiKey, createPool, createService, sendJson, withActor };

if (require.main === module) {
  const pool = createPool();
  const server = createService(pool);
  server.listen(Number(process.env.PORT || 8080), '127.0.0.1', () =>
    console.log(`listening on http://127.0.0.1:${server.address().port}`));
  process.once('SIGTERM', () => server.close(() => pool.end()));
}
