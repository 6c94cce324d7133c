'use strict';
// The baseline of test/bench/http.sh: test/clients/node/service.js's
// GET /orders (scope orders:read) with the same refusal statuses and the
// same 503 when the database cannot answer, but the key is checked by hand,
// as variant (b) of test/bench/run.sh does: SHA-256 of the token (pgcrypto)
// probed in the unique index of bench.plain_keys.  It counts no usage and
// applies no rate limit or credits: what apikeys adds is what the benchmark
// measures.
//
// Run it as service.js runs: PGHOST=... PGDATABASE=... PGUSER=<a role that
// may read bench.plain_keys> PORT=0 node handwritten.js

// service.js's status table, JSON answer, server and pool (max 10, an
// 'error' listener), reused so that both services differ only in how they
// check the key.
const { DENY, createPool, createService, sendJson } = require('../../clients/node/service');

// One probe of the digest's unique index.  The row is fetched whether or not
// the key is revoked or expired so that, like verify(), the refusal can be
// named; $1::text picks pgcrypto's digest(text, text).
const LOOKUP = `
  SELECT k.id AS key_id, k.owner, k.scopes,
         k.revoked_at IS NOT NULL AS revoked,
         k.expires_at IS NOT NULL AND k.expires_at <= now() AS expired
    FROM bench.plain_keys k
   WHERE k.digest = digest($1::text, 'sha256')`;

// A scope is granted by itself or by its family's wildcard ("orders:*").
function granted(scopes, needed) {
  return needed.every((s) => scopes.includes(s) ||
                             scopes.includes(`${s.slice(0, s.lastIndexOf(':') + 1)}*`));
}

// service.js's apiKey() with the hand-written lookup: returns the key's row,
// or answers the request (401 or 403, as DENY maps the code) and returns null.
async function apiKeyByHand(pool, req, res, scopes = []) {
  const bearer = /^Bearer +(\S+)$/i.exec(req.headers.authorization || '');
  const { rows: [k] } = await pool.query(LOOKUP, [bearer ? bearer[1] : '']);
  const code = !k ? 'API_KEY_INVALID'
    : k.revoked ? 'API_KEY_REVOKED'
    : k.expired ? 'API_KEY_EXPIRED'
    : !granted(k.scopes, scopes) ? 'INSUFFICIENT_SCOPE'
    : null;
  if (!code) return k;
  const status = DENY[code] || 401;
  if (status === 401) res.setHeader('WWW-Authenticate', 'Bearer');
  sendJson(res, status, { error: code });
  return null;
}

// The one route the benchmark calls, answered as service.js answers it.
async function route(pool, req, res) {
  const path = new URL(req.url, 'http://localhost').pathname;
  if (req.method === 'GET' && path === '/orders') {
    const key = await apiKeyByHand(pool, req, res, ['orders:read']);
    if (!key) return;
    sendJson(res, 200, { owner: key.owner, key_id: key.key_id, orders: [] });
  } else {
    sendJson(res, 404, { error: 'NOT_FOUND' });
  }
}

// The HTTP server: service.js's, with these routes (and its 503).
function createHandService(pool, log = console.error) {
  return createService(pool, log, route);
}

module.exports = { apiKeyByHand, createHandService };

if (require.main === module) {
  const pool = createPool({ application_name: 'apikeys-bench-handwritten' });
  const server = createHandService(pool);
  server.listen(Number(process.env.PORT || 8080), '127.0.0.1', () =>
    console.log(`listening on http://127.0.0.1:${server.address().port}`));
  process.once('SIGTERM', () => server.close(() => pool.end()));
}
