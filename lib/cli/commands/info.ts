/** `singleinsert-native info`: package, libtorch and device details (also `--version --verbose`). */
import type { Argv } from 'yargs';
import { buildInfo, version } from '../../info';

export const command = 'info';
export const desc = 'Show the package version, the libtorch it was built against and the devices it sees';

export function builder(y: Argv) {
  return y.option('json', { type: 'boolean', default: false, describe: 'print JSON' });
}

export async function runInfo(opts: { json?: boolean; verbose?: boolean }): Promise<void> {
  if (!opts.json && !opts.verbose) {
    process.stdout.write(`${version()}\n`);
    return;
  }
  const b = buildInfo();
  if (opts.json) {
    process.stdout.write(JSON.stringify({ version: version(), ...b }, null, 2) + '\n');
    return;
  }
  process.stdout.write(
    [
      `singleinsert-native ${version()}`,
      `libtorch ${b.torchVersion} (${b.torchSource}), ${b.buildType} build, N-API ${b.napiVersion}`,
      `CUDA: ${b.cudaAvailable ? `${b.cudaDeviceCount} device(s)` : 'not available'}`,
      ...b.cudaDevices.map((d) => `  cuda:${d.index} ${d.name}, compute capability ${d.computeCapability}, ${(d.totalMemoryBytes / 2 ** 30).toFixed(1)} GiB`),
      `threads: ${b.threads} intra-op, ${b.interopThreads} inter-op`,
    ].join('\n') + '\n',
  );
}

export async function handler(argv: { json?: boolean; verbose?: boolean }): Promise<void> {
  await runInfo({ json: argv.json, verbose: true });
}
