#!/usr/bin/env node
// Makes a checkout ready to run: libtorch present (installs Debian's libtorch-dev with apt when
// none is found and we are root on Debian/Ubuntu; otherwise says exactly what to install), npm
// packages installed, TypeScript and the addon built when stale. Does nothing slow when all is
// in place. Used by `npm test` (pretest), `npm run build`, the README commands and CI.
//
//   node scripts/bootstrap.mjs                 everything above
//   node scripts/bootstrap.mjs --install-hook  npm's "install" step: build if libtorch is there,
//                                              never apt, never fail the npm install
import { spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { findLibtorch } from './find-libtorch.mjs';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const installHook = process.argv.includes('--install-hook');
const log = (msg) => console.log(`[singleinsert-native] ${msg}`);

function run(cmd, args, opts = {}) {
  log(`$ ${cmd} ${args.join(' ')}`);
  const r = spawnSync(cmd, args, { cwd: root, stdio: 'inherit', ...opts });
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(' ')} failed with exit code ${r.status ?? r.signal}`);
}

function newestMtime(dir, filter) {
  let newest = 0;
  if (!fs.existsSync(dir)) return 0;
  for (const entry of fs.readdirSync(dir, { withFileTypes: true })) {
    const p = path.join(dir, entry.name);
    if (entry.isDirectory()) newest = Math.max(newest, newestMtime(p, filter));
    else if (filter(entry.name)) newest = Math.max(newest, fs.statSync(p).mtimeMs);
  }
  return newest;
}
const mtime = (p) => (fs.existsSync(p) ? fs.statSync(p).mtimeMs : 0);

// 1. libtorch
function ensureLibtorch() {
  let torch = findLibtorch();
  if (torch.source) return torch;
  const isRoot = typeof process.getuid === 'function' && process.getuid() === 0;
  const isDebian = fs.existsSync('/etc/debian_version');
  const hasApt = spawnSync('sh', ['-c', 'command -v apt-get'], { stdio: 'ignore' }).status === 0;
  if (installHook) {
    log(`${torch.detail}. The addon is not built yet; run \`npm run build\` once libtorch is installed.`);
    return null;
  }
  if (!(isRoot && isDebian && hasApt)) {
    throw new Error(
      `${torch.detail}.\nInstall one of: Debian/Ubuntu \`sudo apt-get install -y libtorch-dev\`; ` +
        'or a libtorch from pytorch.org unpacked somewhere and `export LIBTORCH=/path/to/libtorch`; ' +
        'or Python torch (`pip install torch`), whose libtorch is used automatically. Then run this again.',
    );
  }
  log('no libtorch found: installing Debian libtorch-dev with apt (CPU, libtorch 1.13)');
  const env = { ...process.env, DEBIAN_FRONTEND: 'noninteractive' };
  run('apt-get', ['update', '-q'], { env });
  run('apt-get', ['install', '-y', '-q', 'libtorch-dev'], { env });
  torch = findLibtorch();
  if (!torch.source) throw new Error(`libtorch-dev was installed but still not found: ${torch.detail}`);
  return torch;
}

// 2. npm packages: `npm ci` when node_modules was not installed from this exact lockfile
// (a content hash, not mtimes: checkouts and worktrees reset mtimes)
function lockHash() {
  return createHash('sha256').update(fs.readFileSync(path.join(root, 'package-lock.json'))).digest('hex');
}
function ensureNodeModules() {
  const stamp = path.join(root, 'node_modules', '.singleinsert-lock-hash');
  const want = lockHash();
  if (fs.existsSync(stamp) && fs.readFileSync(stamp, 'utf8').trim() === want) return;
  run('npm', ['ci', '--no-audit', '--no-fund']);
  fs.writeFileSync(stamp, want + '\n');
}

// 3. TypeScript -> dist/
function ensureTypescript() {
  const stamp = path.join(root, 'dist', '.build-stamp');
  const newest = Math.max(newestMtime(path.join(root, 'lib'), (n) => n.endsWith('.ts')), mtime(path.join(root, 'tsconfig.json')));
  if (mtime(stamp) >= newest && newest > 0) return;
  const tsc = path.join(root, 'node_modules', 'typescript', 'bin', 'tsc');
  if (!fs.existsSync(tsc)) {
    if (installHook) return; // an installed package ships dist/
    throw new Error('TypeScript is not installed: run `npm ci` first');
  }
  log('compiling TypeScript');
  run(process.execPath, [tsc, '-p', 'tsconfig.json']);
  fs.writeFileSync(stamp, new Date().toISOString() + '\n');
}

// 4. the addon: rebuilt when a native source is newer than it or libtorch changed
async function ensureAddon(torch) {
  const addon = path.join(root, 'build', 'Release', 'singleinsert_native.node');
  const torchStamp = path.join(root, 'build', 'libtorch.txt');
  const want = `${torch.source} ${torch.prefix ?? ''}`.trim();
  const newest = Math.max(newestMtime(path.join(root, 'native'), () => true), mtime(path.join(root, 'CMakeLists.txt')));
  const stampOk = fs.existsSync(torchStamp) && fs.readFileSync(torchStamp, 'utf8').trim() === want;
  if (fs.existsSync(addon) && mtime(addon) >= newest && stampOk) return;
  if (!stampOk && fs.existsSync(path.join(root, 'build', 'CMakeCache.txt'))) {
    log('libtorch changed since the last build: configuring from scratch');
    fs.rmSync(path.join(root, 'build'), { recursive: true, force: true });
  }
  const { buildNative } = await import('./build-native.mjs');
  buildNative();
  fs.writeFileSync(torchStamp, want + '\n');
}

async function main() {
  const [major] = process.versions.node.split('.').map(Number);
  if (major < 20) throw new Error(`Node.js >= 20 is required, this is ${process.versions.node}`);
  const torch = ensureLibtorch();
  if (!installHook) ensureNodeModules();
  ensureTypescript();
  if (torch) await ensureAddon(torch);
}

main().catch((e) => {
  console.error(`[singleinsert-native] ${e.message}`);
  // npm's install step must not fail just because the addon could not be built yet
  process.exitCode = installHook ? 0 : 1;
});
