#!/usr/bin/env node
'use strict';
// Thin launcher: the CLI lives in dist/lib/cli (compiled from lib/cli).
const path = require('node:path');
const fs = require('node:fs');
const entry = path.join(__dirname, '..', 'dist', 'lib', 'cli', 'index.js');
if (!fs.existsSync(entry)) {
  console.error(`singleinsert-native is not built (missing ${entry}). Run \`npm run build\` in ${path.join(__dirname, '..')}.`);
  process.exitCode = 1;
} else {
  require(entry).main(process.argv.slice(2));
}
