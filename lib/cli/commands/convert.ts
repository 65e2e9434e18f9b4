/**
 * `singleinsert-native convert <in> <out.safetensors> [--merge other.pth ...] [--prefix p]`: PyTorch
 * checkpoints to safetensors, without Python and without running the pickle (lib/convert: only
 * tensors and plain containers are loaded; any other global is refused by name and nothing is written).
 *
 *   convert pytorch_model.bin model.safetensors
 *   convert alexnet-owt-7be5be79.pth lpips/lpips_alex.safetensors --merge alex.pth   (the LPIPS metric's weights)
 *   convert v1-5-pruned-emaonly.ckpt sd15.safetensors --prefix state_dict.
 */
import type { ArgumentsCamelCase, Argv } from 'yargs';
import { convertCheckpoints, ConvertReport } from '../../convert/convert';

export const command = 'convert <input> <output>';
export const desc = 'Convert PyTorch checkpoints (.pth/.pt/.bin/.ckpt) to .safetensors without running their pickle';

interface ConvertArgs {
  input: string;
  output: string;
  merge?: string[];
  prefix?: string;
  json?: boolean;
}

export function builder(y: Argv): Argv<ConvertArgs> {
  return y
    .positional('input', { type: 'string', demandOption: true, describe: 'PyTorch checkpoint (zip or legacy format) or .safetensors' })
    .positional('output', { type: 'string', demandOption: true, describe: 'the .safetensors file to write' })
    .option('merge', { type: 'string', array: true, describe: 'more checkpoints whose tensors go into the same output (keys must not overlap)' })
    .option('prefix', { type: 'string', describe: 'keep only keys starting with this and strip it (e.g. "state_dict.")' })
    .option('json', { type: 'boolean', default: false, describe: 'print a JSON report' }) as unknown as Argv<ConvertArgs>;
}

export function formatReport(r: ConvertReport): string {
  const lines = [`wrote ${r.out}: ${r.tensors} tensors, ${(r.bytes / 2 ** 20).toFixed(1)} MiB (${Object.entries(r.dtypes).map(([d, n]) => `${n} ${d}`).join(', ')})`];
  for (const i of r.inputs) {
    lines.push(`  ${i.file} (${i.format}): ${i.tensors} tensors${i.dropped ? `, ${i.dropped} outside the prefix` : ''}${i.skipped.length ? `, skipped ${i.skipped.length} non-tensor entries: ${i.skipped.slice(0, 5).join(', ')}${i.skipped.length > 5 ? ', ...' : ''}` : ''}`);
  }
  return lines.join('\n');
}

export async function handler(argv: ArgumentsCamelCase<ConvertArgs>): Promise<void> {
  const report = await convertCheckpoints([argv.input, ...(argv.merge ?? [])], argv.output, { prefix: argv.prefix });
  process.stdout.write(argv.json ? JSON.stringify(report, null, 2) + '\n' : formatReport(report) + '\n');
}
