'use strict';
// Tests of service.js, over loopback HTTP, against a live server with the
// preload (test/clients/run.sh starts one): node --test test.js
//
// Environment: PGHOST, PGPORT; APIKEYS_CLIENTS_DB (the database);
// APIKEYS_CLIENTS_NODE_APP, a login role granted apikeys_app: the service's
// pool, and every key is created through it; APIKEYS_CLIENTS_NODE_ADMIN, a
// login role granted apikeys_admin: plans (set_plan) and the audit log.
//
// The expected statuses and headers are written out here, never taken from
// service.js, so a wrong mapping in the middleware fails these tests.

const { describe, it, before, after } = require('node:test');
const assert = require('node:assert/strict');
const crypto = require('node:crypto');
const fs = require('node:fs');
const http = require('node:http');
const net = require('node:net');
const path = require('node:path');
const { setTimeout: sleep } = require('node:timers/promises');
const { Client } = require('pg');
const { createPool, createService } = require('./service');

const DB = process.env.APIKEYS_CLIENTS_DB || 'apikeys_clients';
const APP = process.env.APIKEYS_CLIENTS_NODE_APP || 'node_app';
const ADMIN = process.env.APIKEYS_CLIENTS_NODE_ADMIN || 'node_admin';
const MARK = 'Rate-limit headers';

// -- helpers ---------------------------------------------------------------

// An HTTP request to a service on 127.0.0.1; `token` goes in "Authorization: Bearer".
function call(port, method, urlPath, { token, headers = {} } = {}) {
  const h = { ...headers };
  if (token !== undefined) h.authorization = `Bearer ${token}`;
  return new Promise((resolve, reject) => {
    const req = http.request({ host: '127.0.0.1', port, method, path: urlPath, headers: h,
                               agent: false }, (res) => {
      let text = '';
      res.setEncoding('utf8');
      res.on('data', (chunk) => { text += chunk; });
      res.on('end', () => {
        try {
          assert.equal(res.headers['content-type'], 'application/json', text);
          resolve({ status: res.statusCode, headers: res.headers, body: JSON.parse(text) });
        } catch (err) {
          reject(err);
        }
      });
    });
    req.on('error', reject);
    req.end();
  });
}

const RATE_HEADERS = ['x-ratelimit-limit', 'x-ratelimit-remaining', 'x-ratelimit-reset',
                      'retry-after'];

function assertNoHeaders(r, names, what) {
  for (const name of names) assert.equal(r.headers[name], undefined, `${what}: ${name}`);
}

// A refusal: the status, {"error": code}, WWW-Authenticate on 401 only.
function assertRefused(r, status, code, what = code) {
  assert.equal(r.status, status, `${what}: ${JSON.stringify(r.body)}`);
  assert.deepEqual(r.body, { error: code }, what);
  assert.equal(r.headers['www-authenticate'], status === 401 ? 'Bearer' : undefined,
               `${what}: WWW-Authenticate`);
}

// Flips the case of the first letter of a token's secret part (ak_live_...).
function flipCase(token) {
  const i = token.slice(8).search(/[A-Za-z]/) + 8;
  const c = token[i];
  const flipped = c === c.toLowerCase() ? c.toUpperCase() : c.toLowerCase();
  return token.slice(0, i) + flipped + token.slice(i + 1);
}

// Swaps the first two adjacent characters of the secret part that differ.
function swapAdjacent(token) {
  let i = 8;
  while (token[i] === token[i + 1]) i++;
  return token.slice(0, i) + token[i + 1] + token[i] + token.slice(i + 2);
}

// Checks out every connection of the pool (opening as many as it allows),
// then hands them back one at a time: while the others are held, the pool can
// give only the one handed back, so fn(i, pid) is served by connection i.
// Checks that it was, by the pool's 'acquire' events.
async function onEachConnection(pool, fn) {
  const held = [];
  while (held.length < pool.options.max) held.push(await pool.connect());
  const out = new Set();
  const acquired = [];
  const onAcquire = (c) => acquired.push(c);
  pool.on('acquire', onAcquire);
  try {
    for (let i = 0; i < held.length; i++) {
      const c = held[i];
      acquired.length = 0;
      out.add(c);
      c.release();
      await fn(i, c.processID);
      assert.ok(acquired.length > 0, `connection ${i} served nothing`);
      assert.ok(acquired.every((a) => a === c), `a request meant for connection ${i} went elsewhere`);
      held[i] = await pool.connect();
      assert.equal(held[i], c, 'the pool handed back another connection');
      out.delete(c);
    }
  } finally {
    pool.off('acquire', onAcquire);
    for (const c of held) if (!out.has(c)) c.release();
  }
  return held.map((c) => c.processID);
}

// -- the tests ---------------------------------------------------------------

describe('apikeys Node.js service (service.js)', () => {
  let app;          // APP: creates, revokes, rotates keys
  let admin;        // ADMIN: plans, audit log
  let pool;         // the service's pool (APP)
  let server;
  let port;
  const logged = [];

  before(async () => {
    app = new Client({ database: DB, user: APP });
    admin = new Client({ database: DB, user: ADMIN });
    await app.connect();
    await admin.connect();
    pool = createPool({ database: DB, user: APP }, (line) => logged.push(line));
    server = createService(pool, (line) => logged.push(line));
    await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
    port = server.address().port;
  });

  after(async () => {
    if (server) {
      server.closeAllConnections();
      await new Promise((resolve) => server.close(resolve));
    }
    if (pool) await pool.end();
    if (app) await app.end();
    if (admin) await admin.end();
  });

  const get = (token, headers) => call(port, 'GET', '/orders', { token, headers });

  // A new owner, on a plan without a key limit (set_plan is apikeys_admin's).
  async function newOwner(plan = 'enterprise') {
    const owner = `node-${crypto.randomUUID()}`;
    await admin.query('SELECT apikeys.set_plan($1, $2)', [owner, plan]);
    return owner;
  }

  // A key created by APP, as the application creates keys.
  async function createKey(owner, { scopes = ['orders:read'], rateLimit = null, rateBurst = null,
                                    credits = null, allowedIps = null, expiresIn = null } = {}) {
    const { rows: [k] } = await app.query(
      `SELECT key_id, token::text AS token
         FROM apikeys.create_key($1, 'node test', $2::text[], rate_limit => $3::integer,
                                 rate_burst => $4::integer, credits => $5::bigint,
                                 allowed_ips => $6::cidr[], expires_at => now() + $7::interval)`,
      [owner, scopes, rateLimit, rateBurst, credits, allowedIps, expiresIn]);
    return k;
  }

  it(`README.md's "${MARK}" example is service.js's excerpt, byte for byte`, () => {
    const source = fs.readFileSync(path.join(__dirname, 'service.js'), 'utf8').split('\n');
    const begin = source.indexOf(`// BEGIN README: ${MARK}`);
    const end = source.indexOf(`// END README: ${MARK}`);
    assert.ok(begin >= 0 && end > begin + 1, 'the markers in service.js');
    assert.equal(source.lastIndexOf(`// BEGIN README: ${MARK}`), begin);
    const excerpt = source.slice(begin + 1, end).join('\n') + '\n';

    const readme = fs.readFileSync(path.join(__dirname, '..', '..', '..', 'README.md'), 'utf8');
    const start = readme.indexOf(`\n### ${MARK}\n`);
    assert.ok(start >= 0, `README.md has a section "${MARK}"`);
    const rest = readme.slice(start + MARK.length + 6);
    const stop = rest.search(/^#{1,3} /m);
    const section = stop < 0 ? rest : rest.slice(0, stop);
    const blocks = [...section.matchAll(/^```js\n([\s\S]*?)^```$/gm)].map((m) => m[1]);
    assert.equal(blocks.length, 1, 'one js block in the section');
    assert.equal(Buffer.compare(Buffer.from(blocks[0]), Buffer.from(excerpt)), 0,
                 'README.md differs from service.js; copy the lines between the markers');
  });

  it('a valid key passes, with no rate-limit or credit headers when it has no limits', async () => {
    const owner = await newOwner();
    const k = await createKey(owner, { scopes: ['orders:*'] });
    for (const scheme of ['Bearer', 'bearer', 'BEARER']) {      // the scheme is case-insensitive
      const r = await get(undefined, { authorization: `${scheme} ${k.token}` });
      assert.equal(r.status, 200, scheme);
      assert.deepEqual(r.body, { owner, key_id: k.key_id, orders: [] });
      assertNoHeaders(r, [...RATE_HEADERS, 'x-credits-remaining', 'www-authenticate'], scheme);
    }
  });

  it('every verify code gets its status', async () => {
    const owner = await newOwner();
    const expiring = await createKey(owner, { expiresIn: '1 second' });
    const madeAt = Date.now();
    assert.equal((await get(expiring.token)).status, 200, 'valid until it expires');

    const valid = await createKey(owner);
    const revoked = await createKey(owner);
    await app.query('SELECT apikeys.revoke($1, $2)', [revoked.key_id, owner]);
    const disabled = await createKey(owner);
    await app.query('SELECT apikeys.disable_key($1, $2)', [disabled.key_id, owner]);
    const elsewhere = await createKey(owner, { allowedIps: ['192.0.2.0/24'] });
    const here = await createKey(owner, { allowedIps: ['127.0.0.1/32'] });
    const wrongScope = await createKey(owner, { scopes: ['orders:write', 'reports:write'] });
    const broke = await createKey(owner, { credits: 0 });
    const paced = await createKey(owner, { rateLimit: 1, rateBurst: 0 });
    assert.equal((await get(paced.token)).status, 200, 'the first request of the minute');
    await sleep(Math.max(0, madeAt + 1100 - Date.now()));

    const cases = [
      ['VALID', valid.token, 200],
      ['VALID', here.token, 200],                       // the client's address reaches verify
      ['API_KEY_INVALID', 'ak_live_not-a-token', 401],
      ['API_KEY_REVOKED', revoked.token, 401],
      ['API_KEY_EXPIRED', expiring.token, 401],
      ['API_KEY_DISABLED', disabled.token, 401],
      ['IP_NOT_ALLOWED', elsewhere.token, 403],
      ['INSUFFICIENT_SCOPE', wrongScope.token, 403],
      ['USAGE_EXCEEDED', broke.token, 402],
      ['RATE_LIMITED', paced.token, 429],
    ];
    const seen = new Set();
    for (const [code, token, status] of cases) {
      const r = await get(token);
      seen.add(code);
      if (code === 'VALID') {
        assert.equal(r.status, 200, JSON.stringify(r.body));
        assert.equal(r.body.owner, owner);
        continue;
      }
      assertRefused(r, status, code);
      assert.equal(r.headers['retry-after'] !== undefined, code === 'RATE_LIMITED',
                   `${code}: Retry-After only on 429`);
    }
    assert.equal(seen.size, 9, 'VALID and the eight refusals');
  });

  it('garbage, truncated and case-changed tokens are 401 API_KEY_INVALID', async () => {
    const owner = await newOwner();
    const k = await createKey(owner);
    const t = k.token;
    assert.match(t, /^ak_live_[0-9A-Za-z]{38}$/);
    const flipped = flipCase(t);
    assert.notEqual(flipped, t);
    const authorizations = [
      undefined,                              // no Authorization header
      '', 'Bearer', 'Bearer ', t,             // no scheme, no token
      `Basic ${Buffer.from(`${t}:`).toString('base64')}`,
      `Token ${t}`, `Bearer ${t} ${t}`, `Bearer ${t},`, `Bearer "${t}"`,
      'Bearer garbage', "Bearer ' OR 1=1; --", 'Bearer ak_live_', `Bearer ${'x'.repeat(8000)}`,
      `Bearer ${t.slice(0, -1)}`, `Bearer ${t.slice(0, 20)}`, `Bearer ${t.slice(1)}`,
      `Bearer ${t}A`, `Bearer ${t}${t}`,
      `Bearer ${flipped}`, `Bearer ${t.toUpperCase()}`, `Bearer ${t.toLowerCase()}`,
      `Bearer AK_LIVE_${t.slice(8)}`, `Bearer ak_test_${t.slice(8)}`,
      `Bearer ${swapAdjacent(t)}`,
    ];
    for (const authorization of authorizations) {
      const what = `Authorization: ${String(authorization).slice(0, 60)}`;
      const headers = authorization === undefined ? {} : { authorization };
      const r = await get(undefined, headers);
      assertRefused(r, 401, 'API_KEY_INVALID', what);
      assertNoHeaders(r, [...RATE_HEADERS, 'x-credits-remaining'], what);
    }
    const r = await get(t);
    assert.equal(r.status, 200, 'the real token still passes');
    assert.equal(r.body.key_id, k.key_id);
  });

  it('a wrong scope is 403 INSUFFICIENT_SCOPE', async () => {
    const owner = await newOwner();
    const k = await createKey(owner, { scopes: ['reports:write', 'orders:readx', 'orders'] });
    assertRefused(await get(k.token), 403, 'INSUFFICIENT_SCOPE');
    // the scope /reports needs is held: it passes there (no credits needed)
    const r = await call(port, 'POST', '/reports', { token: k.token });
    assert.equal(r.status, 200, JSON.stringify(r.body));
    // a wildcard grants orders:read
    const w = await createKey(owner, { scopes: ['orders:*'] });
    assert.equal((await get(w.token)).status, 200);
    assertRefused(await call(port, 'POST', '/reports', { token: w.token }), 403,
                  'INSUFFICIENT_SCOPE');
  });

  it('a revoke is seen by the very next request on every pooled connection', async () => {
    const owner = await newOwner();
    const k = await createKey(owner);
    // Each of the 10 connections verifies the key first (and so has the key's
    // owner and plan in its session cache)...
    const pids = await onEachConnection(pool, async (i) => {
      const r = await get(k.token);
      assert.equal(r.status, 200, `connection ${i} before the revoke`);
    });
    assert.equal(pids.length, 10, 'the pool holds 10 connections');
    assert.equal(new Set(pids).size, 10, 'ten distinct server processes');
    assert.equal(pool.totalCount, 10);
    // ... then another session revokes it, and each connection's next request is refused.
    await app.query('SELECT apikeys.revoke($1, $2)', [k.key_id, owner]);
    const pidsAfter = await onEachConnection(pool, async (i) => {
      assertRefused(await get(k.token), 401, 'API_KEY_REVOKED', `connection ${i} after the revoke`);
    });
    assert.deepEqual(pidsAfter.sort(), pids.sort(), 'the same 10 connections');
  });

  it('rotation with a grace: both tokens pass until the grace ends', async () => {
    const owner = await newOwner('pro');
    const a = await createKey(owner);
    const rotate = async (key, grace) => (await app.query(
      'SELECT key_id, token::text AS token FROM apikeys.rotate($1, $2, $3::interval)',
      [key.key_id, owner, grace])).rows[0];

    const b = await rotate(a, '1 hour');
    let r = await get(a.token);
    assert.equal(r.status, 200, 'the old token, in its grace');
    assert.equal(r.body.key_id, a.key_id);
    r = await get(b.token);
    assert.equal(r.status, 200, 'the new token');
    assert.equal(r.body.key_id, b.key_id);

    // Rotating again without a grace: the middle key is revoked at once, and
    // the oldest one's grace ends (at most two keys verify).
    const c = await rotate(b, '0');
    assertRefused(await get(a.token), 401, 'API_KEY_EXPIRED', 'the oldest token');
    assertRefused(await get(b.token), 401, 'API_KEY_REVOKED', 'the middle token');
    assert.equal((await get(c.token)).status, 200);

    // A short grace runs out by itself.
    const d = await rotate(c, '1 second');
    const rotatedAt = Date.now();
    assert.equal((await get(c.token)).status, 200, 'in its one-second grace');
    await sleep(Math.max(0, rotatedAt + 1100 - Date.now()));
    assertRefused(await get(c.token), 401, 'API_KEY_EXPIRED', 'after the grace');
    assert.equal((await get(d.token)).status, 200);
  });

  it("a key's rate limit: X-RateLimit-* on every answer, 429 with Retry-After", async () => {
    const owner = await newOwner();
    const k = await createKey(owner, { rateLimit: 1, rateBurst: 2 });   // 3 at once, then 1/min
    const expect = [[200, '2', 60], [200, '1', 120], [200, '0', 60], [429, '0', 60], [429, '0', 60]];
    for (const [i, [status, remaining, resetIn]] of expect.entries()) {
      const r = await get(k.token);
      const what = `request ${i + 1}`;
      assert.equal(r.status, status, `${what}: ${JSON.stringify(r.body)}`);
      assert.equal(r.headers['x-ratelimit-limit'], '1', what);
      assert.equal(r.headers['x-ratelimit-remaining'], remaining, what);
      const reset = Number(r.headers['x-ratelimit-reset']);
      assert.ok(Number.isInteger(reset), `${what}: X-RateLimit-Reset is epoch seconds`);
      const inSeconds = reset - Date.now() / 1000;
      assert.ok(inSeconds > resetIn - 5 && inSeconds <= resetIn + 1,
                `${what}: X-RateLimit-Reset ${inSeconds.toFixed(1)} s ahead, not ${resetIn}`);
      if (status === 429) {
        assertRefused(r, 429, 'RATE_LIMITED', what);
        const retry = Number(r.headers['retry-after']);
        assert.ok(Number.isInteger(retry) && retry >= 55 && retry <= 60,
                  `${what}: Retry-After ${r.headers['retry-after']}`);
      } else {
        assert.equal(r.headers['retry-after'], undefined, `${what}: no Retry-After`);
      }
    }
  });

  it("an owner's plan limit: the headers describe it, 429 with Retry-After", async () => {
    const plan = `node-rl-${crypto.randomUUID()}`;
    await admin.query('INSERT INTO apikeys.plans (name, rate_limit) VALUES ($1, 2)', [plan]);
    const owner = await newOwner(plan);
    const k1 = await createKey(owner);
    const k2 = await createKey(owner);
    let r = await get(k1.token);
    assert.equal(r.status, 200);
    assert.equal(r.headers['x-ratelimit-limit'], '2');
    assert.equal(r.headers['x-ratelimit-remaining'], '1');
    r = await get(k2.token);                     // the other key shares the owner's allowance
    assert.equal(r.status, 200);
    assert.equal(r.headers['x-ratelimit-remaining'], '0');
    r = await get(k1.token);
    assertRefused(r, 429, 'RATE_LIMITED');
    assert.equal(r.headers['x-ratelimit-limit'], '2');
    assert.equal(r.headers['x-ratelimit-remaining'], '0');
    const retry = Number(r.headers['retry-after']);          // one request every 30 s
    assert.ok(Number.isInteger(retry) && retry >= 25 && retry <= 30, `Retry-After ${retry}`);
  });

  it('credits: X-Credits-Remaining, and 402 USAGE_EXCEEDED when they run out', async () => {
    const owner = await newOwner();
    const k = await createKey(owner, { scopes: ['orders:read', 'reports:write'], credits: 25 });
    const report = () => call(port, 'POST', '/reports', { token: k.token });
    let r = await report();                                  // costs 10
    assert.equal(r.status, 200, JSON.stringify(r.body));
    assert.equal(r.headers['x-credits-remaining'], '15');
    r = await report();
    assert.equal(r.headers['x-credits-remaining'], '5');
    r = await report();
    assertRefused(r, 402, 'USAGE_EXCEEDED');
    assert.equal(r.headers['x-credits-remaining'], '5', 'a refusal spends nothing');
    assertNoHeaders(r, RATE_HEADERS, 'USAGE_EXCEEDED');
    r = await get(k.token);                                  // costs 1
    assert.equal(r.status, 200);
    assert.equal(r.headers['x-credits-remaining'], '4');
  });

  it('the actor is recorded with set_config, per transaction', async () => {
    const owner = await newOwner();
    const caller = await createKey(owner, { scopes: ['keys:write'] });
    const t1 = await createKey(owner);
    const t2 = await createKey(owner);
    const del = (id, token, headers) => call(port, 'DELETE', `/keys/${id}`, { token, headers });
    const revokedBy = async (id) => (await admin.query(
      `SELECT actor, db_user::text FROM apikeys.audit_log
        WHERE key_id = $1 AND event = 'key_revoked'`, [id])).rows;

    // Quotes, a semicolon and SQL in the actor are data, recorded as given.
    const actor = `o'hara"; SET LOCAL apikeys.actor = 'mallory'; -- \\ $1`;
    let r = await del(t1.key_id, caller.token, { 'x-actor': actor });
    assert.equal(r.status, 200, JSON.stringify(r.body));
    assert.equal(r.body.key_id, t1.key_id);
    assertRefused(await get(t1.token), 401, 'API_KEY_REVOKED', 'the next request');
    assert.deepEqual(await revokedBy(t1.key_id), [{ actor, db_user: APP }]);

    r = await del(t2.key_id, caller.token);                 // no X-Actor: the calling key
    assert.equal(r.status, 200);
    assert.deepEqual(await revokedBy(t2.key_id), [{ actor: `apikey:${caller.key_id}`, db_user: APP }]);

    // Another owner's key is not found, and stays valid; so is a malformed id.
    const other = await createKey(await newOwner());
    assert.deepEqual((await del(other.key_id, caller.token, { 'x-actor': actor })).body,
                     { error: 'KEY_NOT_FOUND' });
    assert.equal((await get(other.token)).status, 200);
    assert.equal((await del('not-a-uuid', caller.token)).status, 404);
    // A revoked key, and a key without keys:write, may not revoke.
    assertRefused(await del(other.key_id, t2.token), 401, 'API_KEY_REVOKED');
    const reader = await createKey(owner);
    const t3 = await createKey(owner);
    assertRefused(await del(t3.key_id, reader.token), 403, 'INSUFFICIENT_SCOPE');
    assert.equal((await get(t3.token)).status, 200);

    // No pooled connection keeps an actor after its transaction.
    await onEachConnection(pool, async (i) => {
      const { rows: [s] } = await pool.query("SELECT current_setting('apikeys.actor') AS actor");
      assert.equal(s.actor, '', `connection ${i}`);
    });
    // Why set_config: SET takes no bind parameters.
    await assert.rejects(app.query('SET LOCAL apikeys.actor = $1', [actor]), { code: '42601' });
  });

  it('idle connections the server ends are dropped, and the service goes on', async () => {
    const owner = await newOwner();
    const k = await createKey(owner);
    const pids = await onEachConnection(pool, () => pool.query('SELECT 1'));
    const loggedBefore = logged.length;
    const { rows: [t] } = await app.query(
      'SELECT bool_and(pg_terminate_backend(p)) AS ok FROM unnest($1::integer[]) p', [pids]);
    assert.equal(t.ok, true);
    for (let waited = 0; pool.totalCount > 0; waited += 20) {
      assert.ok(waited < 10000, `${pool.totalCount} dead connections still in the pool`);
      await sleep(20);
    }
    assert.equal(logged.slice(loggedBefore).filter((l) => /idle database connection lost/.test(l)).length,
                 10);
    const r = await get(k.token);
    assert.equal(r.status, 200, JSON.stringify(r.body));
  });

  it('no database: 503, and nothing passes', async () => {
    const closed = net.createServer();                       // a port nothing listens on
    await new Promise((resolve) => closed.listen(0, '127.0.0.1', resolve));
    const deadPort = closed.address().port;
    await new Promise((resolve) => closed.close(resolve));
    const lines = [];
    const deadPool = createPool({ host: '127.0.0.1', port: deadPort, database: DB, user: APP,
                                  connectionTimeoutMillis: 5000 }, (l) => lines.push(l));
    const dead = createService(deadPool, (l) => lines.push(l));
    await new Promise((resolve) => dead.listen(0, '127.0.0.1', resolve));
    try {
      const owner = await newOwner();
      const k = await createKey(owner);
      const r = await call(dead.address().port, 'GET', '/orders', { token: k.token });
      assert.equal(r.status, 503);
      assert.deepEqual(r.body, { error: 'SERVICE_UNAVAILABLE' });
      assertNoHeaders(r, [...RATE_HEADERS, 'www-authenticate'], '503');
      assert.ok(lines.some((l) => l.startsWith('GET /orders: ')), lines.join('\n'));
    } finally {
      dead.closeAllConnections();
      await new Promise((resolve) => dead.close(resolve));
      await deadPool.end();
    }
  });
});
