// Browser end-to-end test: a person approves an agent's transaction in the web page.
// Real server binary, real anvil, real headless Chromium (Debian's, driven by playwright-core).
//
// Run: node --test tests/e2e/   (scripts/test.sh does, after building the server)
// Env: COUNTERSIGN_BIN (default target/debug/countersign), CHROMIUM (default /usr/bin/chromium).
// Artifact: test-artifacts/approval-e2e.png

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { createHmac, randomBytes } from 'node:crypto';
import { mkdirSync, mkdtempSync, rmSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { chromium } from 'playwright-core';

const ROOT = new URL('../..', import.meta.url).pathname;
const SERVER_BIN = process.env.COUNTERSIGN_BIN || join(ROOT, 'target/debug/countersign');
const ANVIL_BIN = process.env.ANVIL_BIN || join(ROOT, 'node_modules/@foundry-rs/anvil-linux-amd64/bin/anvil');
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const PASSWORD = 'correct horse battery staple';

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function freePort() {
  return new Promise((resolve, reject) => {
    const srv = createServer();
    srv.on('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
  });
}

async function startAnvil() {
  const child = spawn(ANVIL_BIN, ['--port', '0'], { stdio: ['ignore', 'pipe', 'ignore'] });
  const lines = createInterface({ input: child.stdout });
  for await (const line of lines) {
    const m = line.match(/Listening on 127\.0\.0\.1:(\d+)/);
    if (m) {
      lines.on('line', () => {}); // keep draining
      return { child, url: `http://127.0.0.1:${m[1]}` };
    }
  }
  throw new Error('anvil did not start');
}

async function rpc(url, method, params) {
  const res = await fetch(url, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ jsonrpc: '2.0', id: 1, method, params }),
  });
  const body = await res.json();
  if (body.error) throw new Error(`${method}: ${JSON.stringify(body.error)}`);
  return body.result;
}

async function startServer(chainUrl) {
  const dir = mkdtempSync(join(tmpdir(), 'countersign-e2e-'));
  const port = await freePort();
  const child = spawn(SERVER_BIN, ['serve'], {
    cwd: dir,
    stdio: ['ignore', 'ignore', 'inherit'],
    env: {
      PATH: process.env.PATH,
      DATABASE_URL: `sqlite://${dir}/e2e.db`,
      WEB3_PROVIDER_URI: chainUrl,
      JWT_SECRET_KEY: randomBytes(48).toString('base64'),
      COUNTERSIGN_MASTER_KEY: randomBytes(32).toString('base64'),
      COUNTERSIGN_ADDR: `127.0.0.1:${port}`,
      COUNTERSIGN_POLL_INTERVAL_MS: '100',
      RUST_LOG: 'warn',
    },
  });
  const base = `http://127.0.0.1:${port}`;
  for (let i = 0; i < 100; i++) {
    try {
      if ((await fetch(`${base}/healthz`)).ok) return { child, base, dir };
    } catch { /* not up yet */ }
    await sleep(100);
  }
  throw new Error('server did not become healthy');
}

// RFC 6238 TOTP (SHA-1, 6 digits, 30 s), and a per-user "fresh code" that never reuses a step.
function base32Decode(s) {
  const alphabet = 'ABCDEFGHIJKLMNOPQRSTUVWXYZ234567';
  let bits = 0, value = 0;
  const out = [];
  for (const c of s.replace(/=+$/, '')) {
    value = (value << 5) | alphabet.indexOf(c);
    bits += 5;
    if (bits >= 8) {
      out.push((value >>> (bits - 8)) & 0xff);
      bits -= 8;
    }
  }
  return Buffer.from(out);
}

function totpAt(secret, step) {
  const counter = Buffer.alloc(8);
  counter.writeBigUInt64BE(BigInt(step));
  const h = createHmac('sha1', base32Decode(secret)).update(counter).digest();
  const o = h[h.length - 1] & 15;
  return String((h.readUInt32BE(o) & 0x7fffffff) % 1_000_000).padStart(6, '0');
}

// `spent` is shared between the secrets of one user: the server accepts each time step once
// per user, whichever secret produced the code.
function codeSource(secret, spent = { last: 0 }) {
  return async () => {
    for (;;) {
      const now = Math.floor(Date.now() / 1000);
      const step = Math.floor(now / 30);
      const earliest = now % 30 < 25 ? step - 1 : step;
      const next = Math.max(spent.last + 1, earliest);
      if (next <= step + 1) {
        spent.last = next;
        return totpAt(secret, next);
      }
      await sleep(500);
    }
  };
}

// Six codes, each for a time step not used before: up to three 30 s steps of waiting alone.
test('a person approves an agent transaction live in the web page', { timeout: 240_000 }, async (t) => {
  const anvil = await startAnvil();
  const server = await startServer(anvil.url);
  const browser = await chromium.launch({
    executablePath: CHROMIUM,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking'],
  });
  t.after(async () => {
    await browser.close();
    server.child.kill();
    anvil.child.kill();
    rmSync(server.dir, { recursive: true, force: true });
  });

  const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
  const problems = [];
  page.on('pageerror', (e) => problems.push(`page error: ${e.message}`));
  page.on('console', (m) => {
    if (m.type() === 'error' && !/Failed to load resource/.test(m.text())) problems.push(`console: ${m.text()}`);
  });
  // The page's bearer token (it keeps it in memory only), to check the logout on the server.
  let lastAuth = null;
  page.on('request', (r) => { lastAuth = r.headers().authorization || lastAuth; });

  const response = await page.goto(server.base);
  const csp = response.headers()['content-security-policy'];
  assert.match(csp, /script-src 'self'/);
  assert.doesNotMatch(csp, /unsafe-inline/);

  // Register (which logs in).
  await page.getByTestId('register-username').fill('alice');
  await page.getByTestId('register-password').fill(PASSWORD);
  await page.getByTestId('register-submit').click();

  // Enrol MFA: the page shows the QR code and the secret.
  await page.getByTestId('mfa-password').fill(PASSWORD);
  await page.getByTestId('mfa-start').click();
  const secretBox = page.getByTestId('mfa-secret').filter({ hasText: /[A-Z2-7]{16}/ });
  await secretBox.waitFor();
  const secret = (await secretBox.textContent()).trim();
  assert.match(secret, /^[A-Z2-7]{16,}$/);
  assert.ok(await page.locator('#mfa-qr').isVisible(), 'QR code is shown');
  const spentSteps = { last: 0 };
  const freshCode = codeSource(secret, spentSteps);
  await page.getByTestId('mfa-confirm-code').fill(await freshCode());
  await page.getByTestId('mfa-confirm').click();
  await page.getByTestId('mfa-state').filter({ hasText: /on|enabled|active/i }).waitFor();

  // A wallet, funded on the dev chain.
  await page.getByTestId('wallet-password').fill(PASSWORD);
  await page.getByTestId('create-wallet').click();
  const walletItem = page.locator('li.wallet[data-wallet-address]').first();
  await walletItem.waitFor();
  const wallet = await walletItem.getAttribute('data-wallet-address');
  await rpc(anvil.url, 'anvil_setBalance', [wallet, '0x8AC7230489E80000']); // 10 ETH

  // An API key for the agent, shown once.
  await page.getByTestId('key-name').fill('trading-bot');
  await page.getByTestId('key-mfa-code').fill(await freshCode());
  await page.getByTestId('issue-key').click();
  const keyBox = page.getByTestId('new-api-key').filter({ hasText: /^csk_/ });
  await keyBox.waitFor();
  const apiKey = (await keyBox.textContent()).trim();
  assert.match(apiKey, /^csk_[0-9a-f]{64}$/);

  // The agent prepares over HTTP…
  const agent = (path, body) => fetch(`${server.base}${path}`, {
    method: 'POST',
    headers: { 'content-type': 'application/json', 'x-api-key': apiKey },
    body: JSON.stringify(body),
  }).then(async (r) => ({ status: r.status, body: await r.json() }));
  const recipient = '0x70997970C51812dc3A010C7d01b50e0d17dc79C8';
  const prepared = await agent('/api/prepare_transaction', {
    wallet_address: wallet, kind: 'native', to: recipient,
    value: '1500000000000000000', memo: 'pay invoice <b>42</b>',
  });
  assert.equal(prepared.status, 201, JSON.stringify(prepared.body));
  const id = prepared.body.transaction_id;

  // …and the prompt appears without a reload, with what the human needs to decide.
  const card = page.locator(`[data-testid="prompt"][data-transaction-id="${id}"]`);
  await card.waitFor({ timeout: 10_000 });
  await assert.doesNotReject(card.getByText('1.5 ETH').first().waitFor());
  assert.equal((await card.getByTestId('prompt-memo').textContent()).trim(), 'pay invoice <b>42</b>');
  assert.match(await card.getByTestId('prompt-agent').textContent(), /trading-bot/);
  assert.match(await card.getByTestId('countdown').textContent(), /^\d+:\d\d$/);

  // The human countersigns with a TOTP code.
  await card.getByTestId('mfa-code').fill(await freshCode());
  await card.getByTestId('authorize').click();
  const statusBadge = page.locator(`[data-testid="tx-status"][data-transaction-id="${id}"]`);
  await statusBadge.filter({ hasText: /authorized/i }).waitFor({ timeout: 10_000 });

  // The agent executes; the page follows it to the chain.
  const executed = await agent('/api/execute_transaction', { transaction_id: id });
  assert.equal(executed.status, 200, JSON.stringify(executed.body));
  await statusBadge.filter({ hasText: /confirmed/i }).waitFor({ timeout: 15_000 });
  const hash = page.locator(`[data-testid="tx-hash"][data-transaction-id="${id}"]`);
  assert.equal((await hash.textContent()).trim(), executed.body.tx_hash);
  const balance = BigInt(await rpc(anvil.url, 'eth_getBalance', [recipient, 'latest']));
  assert.ok(balance >= 1_500_000_000_000_000_000n);

  // A burst: two more requests, countersigned together with one code.
  const burst = [];
  for (const value of ['1000', '2000']) {
    const r = await agent('/api/prepare_transaction', { wallet_address: wallet, kind: 'native', to: recipient, value });
    assert.equal(r.status, 201, JSON.stringify(r.body));
    burst.push(r.body.transaction_id);
  }
  for (const bid of burst) await page.locator(`[data-testid="prompt"][data-transaction-id="${bid}"]`).waitFor();
  await page.getByTestId('bulk-mfa-code').fill(await freshCode());
  await page.getByTestId('authorize-all').click();
  for (const bid of burst) {
    await page.locator(`[data-testid="tx-status"][data-transaction-id="${bid}"]`)
      .filter({ hasText: /authorized/i }).waitFor({ timeout: 10_000 });
  }
  assert.equal(await page.locator('[data-testid="prompt"]').count(), 0);

  mkdirSync(join(ROOT, 'test-artifacts'), { recursive: true });
  await page.screenshot({ path: join(ROOT, 'test-artifacts/approval-e2e.png'), fullPage: true });

  // Replacing the authenticator ends every earlier token; the page goes on with the new token
  // the confirmation returned, and its live socket with it.
  const before = lastAuth;
  await page.getByTestId('mfa-replace').click();
  await page.getByTestId('mfa-current-code').fill(await freshCode());
  await page.getByTestId('mfa-password').fill(PASSWORD);
  await page.getByTestId('mfa-start').click();
  const replacementBox = page.getByTestId('mfa-secret').filter({ hasText: /[A-Z2-7]{16}/ });
  await replacementBox.waitFor();
  const replacement = (await replacementBox.textContent()).trim();
  assert.notEqual(replacement, secret);
  await page.getByTestId('mfa-confirm-code').fill(await codeSource(replacement, spentSteps)());
  // The server ends the old token, and closes the socket opened with it, as it answers. Hold
  // the answer back, as a slow network may: the page meets that ending before it has the new
  // token, and must wait for it rather than sign out.
  await page.route('**/api/confirm_mfa', async (route) => {
    const answer = await route.fetch();
    await sleep(1500);
    await route.fulfill({ response: answer });
  });
  // The state line reads "On" throughout a replacement, so wait for the confirmation itself.
  const [confirmed] = await Promise.all([
    page.waitForResponse((r) => r.url().endsWith('/api/confirm_mfa')),
    page.getByTestId('mfa-confirm').click(),
  ]);
  assert.equal(confirmed.status(), 200);
  const ended = await fetch(`${server.base}/api/me`, { headers: { authorization: before } });
  assert.equal(ended.status, 401);
  const later = await agent('/api/prepare_transaction', { wallet_address: wallet, kind: 'native', to: recipient, value: '3000' });
  assert.equal(later.status, 201, JSON.stringify(later.body));
  await page.locator(`[data-testid="prompt"][data-transaction-id="${later.body.transaction_id}"]`)
    .waitFor({ timeout: 10_000 });
  assert.ok(await page.getByTestId('logout').isVisible(), 'still signed in');
  assert.notEqual(lastAuth, before);

  // Logging out ends the token on the server too, not only in the page.
  assert.match(lastAuth, /^Bearer /);
  const [loggedOut] = await Promise.all([
    page.waitForResponse((r) => r.url().endsWith('/api/logout')),
    page.getByTestId('logout').click(),
  ]);
  assert.equal(loggedOut.status(), 204);
  await page.getByTestId('login-username').waitFor();
  const stale = await fetch(`${server.base}/api/me`, { headers: { authorization: lastAuth } });
  assert.equal(stale.status, 401);
  assert.equal((await stale.json()).error.code, 'token_revoked');
  assert.deepEqual(problems, []);
});
