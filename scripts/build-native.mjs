// Builds build/Release/singleinsert_native.node with cmake-js against the libtorch that
// find-libtorch.mjs picks. Incremental: CMake/make rebuild only what changed.
import { spawnSync } from 'node:child_process';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { findLibtorch } from './find-libtorch.mjs';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');

export function buildNative({ debug = false } = {}) {
  const torch = findLibtorch();
  if (!torch.source) throw new Error(`Cannot build the addon: ${torch.detail}`);
  console.log(`[singleinsert-native] building the addon against ${torch.detail}`);
  const cmakeJs = path.join(root, 'node_modules', 'cmake-js', 'bin', 'cmake-js');
  const args = [cmakeJs, 'build', '-d', root, '-O', path.join(root, 'build'), '--parallel', String(Math.max(1, os.availableParallelism?.() ?? os.cpus().length)),
    `--CDSI_TORCH_SOURCE=${torch.source}`, '-l', 'warn'];
  if (torch.prefix) args.push(`--CDCMAKE_PREFIX_PATH=${torch.prefix}`);
  // SINGLEINSERT_CUDA_EXTRAS=0: a CUDA libtorch without the device-name / allocator-statistics code
  // (native/device_info.cc), should the CUDA headers not compile; everything else still runs on CUDA
  // SINGLEINSERT_CXX_STANDARD=20: force the C++ standard (CMakeLists.txt picks 17 or 20 by libtorch version)
  if (process.env.SINGLEINSERT_CXX_STANDARD) args.push(`--CDSI_CXX_STANDARD=${process.env.SINGLEINSERT_CXX_STANDARD}`);
  if (process.env.SINGLEINSERT_CUDA_EXTRAS !== undefined) args.push(`--CDSI_CUDA_EXTRAS=${process.env.SINGLEINSERT_CUDA_EXTRAS === '0' ? 'OFF' : 'ON'}`);
  if (debug) args.push('--debug');
  const r = spawnSync(process.execPath, args, { cwd: root, stdio: 'inherit' });
  if (r.status !== 0) throw new Error(`cmake-js build failed with exit code ${r.status}`);
}

if (import.meta.url === `file://${process.argv[1]}`) {
  try {
    buildNative({ debug: process.argv.includes('--debug') });
  } catch (e) {
    console.error(`[singleinsert-native] ${e.message}`);
    process.exitCode = 1;
  }
}
