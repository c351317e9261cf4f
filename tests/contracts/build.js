#!/usr/bin/env node
// Compiles the test contracts with solcjs (the exact version pinned in
// package.json) and writes <Name>.json = { abi, bytecode, methodIdentifiers }
// next to this script. Output is deterministic: sources are keyed by bare file
// name, so the embedded metadata hash doesn't depend on the checkout path.
//
// Usage: npm run build:contracts   (or: node tests/contracts/build.js)
'use strict';

const fs = require('node:fs');
const path = require('node:path');
const solc = require('solc');

const DIR = __dirname;
const CONTRACTS = ['TestToken', 'Target'];

const input = {
  language: 'Solidity',
  sources: Object.fromEntries(
    CONTRACTS.map((name) => [
      `${name}.sol`,
      { content: fs.readFileSync(path.join(DIR, `${name}.sol`), 'utf8') },
    ]),
  ),
  settings: {
    optimizer: { enabled: true, runs: 200 },
    // paris: no PUSH0 etc., so the bytecode runs on any post-merge hardfork
    // (anvil's default included).
    evmVersion: 'paris',
    outputSelection: {
      '*': { '*': ['abi', 'evm.bytecode.object', 'evm.methodIdentifiers'] },
    },
  },
};

const output = JSON.parse(solc.compile(JSON.stringify(input)));

let failed = false;
for (const e of output.errors || []) {
  const msg = e.formattedMessage || e.message;
  if (e.severity === 'error') {
    failed = true;
    console.error(msg);
  } else {
    console.warn(msg);
  }
}
if (failed) {
  console.error('solc compilation failed');
  process.exit(1);
}

console.log(`solc ${solc.version()}`);
for (const name of CONTRACTS) {
  const c = output.contracts[`${name}.sol`][name];
  const artifact = {
    abi: c.abi,
    bytecode: `0x${c.evm.bytecode.object}`,
    methodIdentifiers: c.evm.methodIdentifiers,
  };
  const out = path.join(DIR, `${name}.json`);
  fs.writeFileSync(out, `${JSON.stringify(artifact, null, 2)}\n`);
  console.log(`wrote ${path.relative(process.cwd(), out)} (${(c.evm.bytecode.object.length / 2)} bytes creation code)`);
}
