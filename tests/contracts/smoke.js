#!/usr/bin/env node
// Smoke test for the compiled test contracts: starts anvil from node_modules,
// deploys TestToken and Target over plain JSON-RPC (Node built-ins only),
// exercises them, checks revert reasons, then stops anvil.
//
// Usage: node tests/contracts/smoke.js [port]   (default port 18545)
'use strict';

const { spawn } = require('node:child_process');
const path = require('node:path');
const assert = require('node:assert/strict');

const PORT = Number(process.argv[2] || process.env.ANVIL_PORT || 18545);
const URL_ = `http://127.0.0.1:${PORT}`;
const ANVIL = path.join(__dirname, '..', '..', 'node_modules', '@foundry-rs',
  `anvil-${process.platform}-${process.arch === 'x64' ? 'amd64' : process.arch}`, 'bin', 'anvil');
const TestToken = require('./TestToken.json');
const Target = require('./Target.json');

// ---- minimal ABI encoding (static types + string) ----
const word = (n) => BigInt(n).toString(16).padStart(64, '0');
const addr = (a) => a.toLowerCase().replace(/^0x/, '').padStart(64, '0');
function encodeArgs(args) { // args: [{t:'uint'|'address'|'bool'|'string', v}]
  const head = [];
  const tail = [];
  let offset = 32 * args.length;
  for (const { t, v } of args) {
    if (t === 'string') {
      const hex = Buffer.from(v, 'utf8').toString('hex');
      const padded = hex.padEnd(Math.ceil(hex.length / 64) * 64, '0');
      head.push(word(offset));
      tail.push(word(hex.length / 2) + padded);
      offset += 32 + padded.length / 2;
    } else if (t === 'address') head.push(addr(v));
    else if (t === 'bool') head.push(word(v ? 1 : 0));
    else head.push(word(v));
  }
  return head.join('') + tail.join('');
}
const call = (artifact, sig, args = []) =>
  `0x${artifact.methodIdentifiers[sig]}${encodeArgs(args)}`;
function decodeRevert(data) {
  // Error(string): 0x08c379a0 ++ offset ++ len ++ bytes
  if (!data || !data.startsWith('0x08c379a0')) return null;
  const body = data.slice(10);
  const len = Number(BigInt(`0x${body.slice(64, 128)}`));
  return Buffer.from(body.slice(128, 128 + len * 2), 'hex').toString('utf8');
}

// ---- JSON-RPC ----
let id = 0;
async function rpc(method, params = []) {
  const res = await fetch(URL_, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ jsonrpc: '2.0', id: ++id, method, params }),
  });
  const body = await res.json();
  if (body.error) {
    const err = new Error(`${method}: ${body.error.message}`);
    err.rpc = body.error;
    throw err;
  }
  return body.result;
}
async function send(tx) {
  const hash = await rpc('eth_sendTransaction', [tx]);
  for (let i = 0; i < 50; i++) {
    const r = await rpc('eth_getTransactionReceipt', [hash]);
    if (r) return r;
    await new Promise((s) => setTimeout(s, 100));
  }
  throw new Error(`no receipt for ${hash}`);
}
async function expectRevert(tx, reason) {
  try {
    await rpc('eth_call', [tx, 'latest']);
  } catch (e) {
    assert.ok(e.rpc, e);
    assert.equal(decodeRevert(e.rpc.data), reason, `revert data: ${JSON.stringify(e.rpc)}`);
    return;
  }
  assert.fail(`expected revert "${reason}"`);
}
const uint = (hex) => BigInt(hex);

let passed = 0;
let failed = 0;
async function check(name, fn) {
  try {
    await fn();
    passed++;
    console.log(`ok   ${name}`);
  } catch (e) {
    failed++;
    console.log(`FAIL ${name}\n     ${e.message}`);
  }
}

async function main() {
  const [a0, a1] = await rpc('eth_accounts');
  const supply = 10n ** 24n;
  let token;
  let target;

  await check('deploy TestToken', async () => {
    const data = TestToken.bytecode + encodeArgs([
      { t: 'string', v: 'Test Token' }, { t: 'string', v: 'TT' },
      { t: 'uint', v: 18 }, { t: 'uint', v: supply }]);
    const r = await send({ from: a0, data });
    assert.equal(r.status, '0x1');
    token = r.contractAddress;
    assert.equal(uint(await rpc('eth_call', [{ to: token, data: call(TestToken, 'decimals()') }, 'latest'])), 18n);
    assert.equal(uint(await rpc('eth_call', [{ to: token, data: call(TestToken, 'balanceOf(address)', [{ t: 'address', v: a0 }]) }, 'latest'])), supply);
  });
  await check('TestToken transfer + balanceOf + Transfer event', async () => {
    const r = await send({ from: a0, to: token, data: call(TestToken, 'transfer(address,uint256)', [{ t: 'address', v: a1 }, { t: 'uint', v: 1000 }]) });
    assert.equal(r.status, '0x1');
    assert.equal(r.logs.length, 1);
    assert.equal(r.logs[0].topics[0], '0xddf252ad1be2c89b69c2b068fc378daa952ba7f163c4a11628f55a4df523b3ef');
    const bal = await rpc('eth_call', [{ to: token, data: call(TestToken, 'balanceOf(address)', [{ t: 'address', v: a1 }]) }, 'latest']);
    assert.equal(uint(bal), 1000n);
  });
  await check('TestToken reverts: insufficient balance / zero address', async () => {
    await expectRevert({ from: a1, to: token, data: call(TestToken, 'transfer(address,uint256)', [{ t: 'address', v: a0 }, { t: 'uint', v: 1001 }]) }, 'ERC20: insufficient balance');
    await expectRevert({ from: a0, to: token, data: call(TestToken, 'transfer(address,uint256)', [{ t: 'address', v: '0x0' }, { t: 'uint', v: 1 }]) }, 'ERC20: transfer to the zero address');
    await expectRevert({ from: a1, to: token, data: call(TestToken, 'transferFrom(address,address,uint256)', [{ t: 'address', v: a0 }, { t: 'address', v: a1 }, { t: 'uint', v: 1 }]) }, 'ERC20: insufficient allowance');
  });
  await check('deploy Target + increment + deposit', async () => {
    const r = await send({ from: a0, data: Target.bytecode });
    assert.equal(r.status, '0x1');
    target = r.contractAddress;
    assert.equal((await send({ from: a0, to: target, data: call(Target, 'increment(uint256)', [{ t: 'uint', v: 5 }]) })).status, '0x1');
    assert.equal(uint(await rpc('eth_call', [{ to: target, data: call(Target, 'counter()') }, 'latest'])), 5n);
    assert.equal((await send({ from: a0, to: target, value: '0x2a', data: call(Target, 'deposit()') })).status, '0x1');
    assert.equal(uint(await rpc('eth_call', [{ to: target, data: call(Target, 'deposits(address)', [{ t: 'address', v: a0 }]) }, 'latest'])), 42n);
    assert.equal(uint(await rpc('eth_getBalance', [target, 'latest'])), 42n);
  });
  await check('Target reverts: not owner / paused', async () => {
    await expectRevert({ from: a1, to: target, data: call(Target, 'setPaused(bool)', [{ t: 'bool', v: true }]) }, 'Target: not owner');
    assert.equal((await send({ from: a0, to: target, data: call(Target, 'setPaused(bool)', [{ t: 'bool', v: true }]) })).status, '0x1');
    await expectRevert({ from: a0, to: target, data: call(Target, 'increment(uint256)', [{ t: 'uint', v: 1 }]) }, 'Target: paused');
    await expectRevert({ from: a0, to: target, value: '0x1', data: call(Target, 'deposit()') }, 'Target: paused');
  });
}

(async () => {
  const anvil = spawn(ANVIL, ['--port', String(PORT), '--silent'], { stdio: ['ignore', 'ignore', 'inherit'] });
  const exited = new Promise((resolve) => anvil.once('exit', resolve));
  let code = 1;
  try {
    for (let i = 0; ; i++) {
      try { await rpc('eth_chainId'); break; } catch (e) {
        if (i >= 100 || anvil.exitCode !== null) throw new Error(`anvil did not start on ${URL_}: ${e.message}`);
        await new Promise((s) => setTimeout(s, 100));
      }
    }
    await main();
    console.log(`${passed} passed, ${failed} failed`);
    code = failed === 0 ? 0 : 1;
  } catch (e) {
    console.error(e);
  } finally {
    anvil.kill('SIGTERM');
    await exited;
  }
  process.exit(code);
})();
