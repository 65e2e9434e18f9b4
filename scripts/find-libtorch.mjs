// Where libtorch comes from, in this order: LIBTORCH (a libtorch folder or a CMake prefix),
// Python torch's CMake prefix (how GPU machines have CUDA libtorch 2.x), the system (Debian's
// libtorch-dev 1.13). Used by the build and by the bootstrap; prints nothing by itself.
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';

const SYSTEM_CONFIG_DIRS = ['/usr/lib/x86_64-linux-gnu/cmake/Torch', '/usr/lib/aarch64-linux-gnu/cmake/Torch', '/usr/lib/cmake/Torch', '/usr/local/lib/cmake/Torch'];

function hasTorchConfig(prefix) {
  return ['share/cmake/Torch/TorchConfig.cmake', 'lib/cmake/Torch/TorchConfig.cmake', 'TorchConfig.cmake', 'Torch/TorchConfig.cmake']
    .some((p) => fs.existsSync(path.join(prefix, p)));
}

/** @returns {{ source: 'LIBTORCH'|'python'|'system', prefix: string|null, detail: string } | { source: null, detail: string }} */
export function findLibtorch(env = process.env) {
  if (env.LIBTORCH) {
    const prefix = path.resolve(env.LIBTORCH);
    if (!hasTorchConfig(prefix)) {
      return { source: null, detail: `LIBTORCH=${env.LIBTORCH} has no TorchConfig.cmake (looked in share/cmake/Torch, lib/cmake/Torch and the folder itself)` };
    }
    return { source: 'LIBTORCH', prefix, detail: `LIBTORCH=${prefix}` };
  }
  if (env.SINGLEINSERT_NO_PYTHON_TORCH !== '1') {
    try {
      const out = execFileSync('python3', ['-c', 'import torch;print(torch.utils.cmake_prefix_path)'], {
        encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'], timeout: 60000,
      }).trim();
      if (out && hasTorchConfig(path.join(out, 'Torch')) || hasTorchConfig(out)) {
        return { source: 'python', prefix: out, detail: `Python torch (${out})` };
      }
    } catch {
      // no python3 or no torch module: fall through to the system
    }
  }
  const dir = SYSTEM_CONFIG_DIRS.find((d) => fs.existsSync(path.join(d, 'TorchConfig.cmake')));
  if (dir) return { source: 'system', prefix: null, detail: `system libtorch (${dir})` };
  return { source: null, detail: 'no libtorch found: set LIBTORCH, install Python torch, or install Debian libtorch-dev' };
}

if (import.meta.url === `file://${process.argv[1]}`) {
  process.stdout.write(JSON.stringify(findLibtorch(), null, 2) + '\n');
}
