import * as fs from 'node:fs';
import * as path from 'node:path';
import { BuildInfo, native, packageRoot } from './native';

/** The package version from package.json. */
export function version(): string {
  return JSON.parse(fs.readFileSync(path.join(packageRoot, 'package.json'), 'utf8')).version;
}

/** libtorch version and origin, CUDA availability, build type and thread counts of the loaded addon. */
export function buildInfo(): BuildInfo {
  return native().buildInfo();
}
