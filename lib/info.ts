import * as fs from 'node:fs';
import * as path from 'node:path';
import { invalidParameterError } from './errors';
import { BuildInfo, MemoryStats, native, packageRoot } from './native';

/** The package version from package.json. */
export function version(): string {
  return JSON.parse(fs.readFileSync(path.join(packageRoot, 'package.json'), 'utf8')).version;
}

/** libtorch version and origin, CUDA availability, build type and thread counts of the loaded addon. */
export function buildInfo(): BuildInfo {
  return native().buildInfo();
}

function checkDevice(device: unknown): string {
  if (typeof device !== 'string' || !/^(cpu|cuda(:\d+)?)$/.test(device)) throw invalidParameterError('device', '"cpu", "cuda" or "cuda:N"', device);
  return device;
}

/**
 * Memory of a device: the CUDA caching allocator's peak / current / reserved bytes (null on the CPU
 * or in a build without the CUDA extras) and the process's peak resident set size.
 */
export function memoryStats(device = 'cpu'): MemoryStats {
  return native().memoryStats(checkDevice(device));
}

/** Starts a new CUDA peak for memoryStats (no-op on the CPU). */
export function resetPeakMemory(device = 'cpu'): void {
  native().resetPeakMemory(checkDevice(device));
}
