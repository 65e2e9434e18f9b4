/**
 * `singleinsert-native generate --model <dir|hub id|file.safetensors> --prompt "..."`: text to image.
 * Writes `<out>/<seed>-<index>.png` (never overwriting: `-1`, `-2`, ... are added) with the A1111
 * `parameters` text chunk, prints the written paths (or a JSON report with --json), shows a
 * progress bar on a terminal and plain lines otherwise (on stderr). Ctrl-C stops the run before
 * the next UNet call (exit code 130, set by lib/cli/index.ts); a second Ctrl-C quits at once.
 */
import type { ArgumentsCamelCase, Argv } from 'yargs';
import { invalidParameterError } from '../../errors';
import { DEFAULT_GUIDANCE, DEFAULT_SCHEDULER, DEFAULT_STEPS, modelLabel, toPng } from '../../generate';
import { DTypeOption, loadPipeline } from '../../models';
import { writeNewFile } from '../../png';
import { ProgressReporter } from '../../progress';
import { SCHEDULER_ALIASES, SCHEDULER_NAMES } from '../../schedulers';

export const command = 'generate';
export const desc = 'Generate images from a text prompt';

export interface GenerateCommandOptions {
  model: string;
  prompt: string;
  negativePrompt?: string;
  steps?: number;
  guidance?: number;
  scheduler?: string;
  seed?: number;
  /** images */
  n?: number;
  width?: number;
  height?: number;
  eta?: number;
  /** output folder, created if needed; default "." */
  out?: string;
  device?: string;
  dtype?: DTypeOption;
}

export interface GenerateIo {
  signal?: AbortSignal;
  /** where progress and warnings go; default process.stderr */
  stderr?: NodeJS.WritableStream & { isTTY?: boolean };
  /** show progress (default true) */
  progress?: boolean;
}

export interface GenerateReport {
  model: string;
  files: string[];
  seed: number;
  parameters: string;
  images: Array<{ file: string; index: number; width: number; height: number; prompt: string; negativePrompt: string; parameters: string }>;
  warnings: string[];
  elapsedSec: number;
}

export function builder(y: Argv): Argv<Partial<GenerateCommandOptions> & { json?: boolean }> {
  return y
    .option('model', { type: 'string', demandOption: true, describe: 'diffusers folder, Hugging Face hub id (in the local cache) or single-file .safetensors checkpoint' })
    .option('prompt', { type: 'string', demandOption: true, describe: 'the prompt' })
    .option('negative-prompt', { type: 'string', default: '', describe: 'what to steer away from (used when --guidance > 1)' })
    .option('steps', { type: 'number', default: DEFAULT_STEPS, describe: 'denoising steps' })
    .option('guidance', { type: 'number', default: DEFAULT_GUIDANCE, describe: 'classifier-free guidance scale' })
    .option('scheduler', { type: 'string', default: DEFAULT_SCHEDULER, choices: [...SCHEDULER_NAMES, ...Object.keys(SCHEDULER_ALIASES)], describe: 'sampler' })
    .option('seed', { type: 'number', describe: 'random seed (default: random, printed)' })
    .option('n', { type: 'number', default: 1, describe: 'number of images' })
    .option('width', { type: 'number', describe: 'image width, a multiple of 8 (default: the model\'s, 512 for SD v1.5)' })
    .option('height', { type: 'number', describe: 'image height, a multiple of 8 (default: the model\'s, 512 for SD v1.5)' })
    .option('eta', { type: 'number', default: 0, describe: 'DDIM eta (0 = deterministic)' })
    .option('out', { type: 'string', default: '.', describe: 'output folder (created if needed)' })
    .option('json', { type: 'boolean', default: false, describe: 'print a JSON report instead of the file paths' })
    .option('device', { type: 'string', default: 'cpu', describe: '"cpu", "cuda" or "cuda:N"' })
    .option('dtype', { type: 'string', default: 'fp32', choices: ['fp32', 'fp16', 'bf16'], describe: 'weights dtype' }) as Argv<
    Partial<GenerateCommandOptions> & { json?: boolean }
  >;
}

/** The command's work without printing results (progress and warnings go to io.stderr); for in-process tests. */
export async function runGenerate(opts: GenerateCommandOptions, io: GenerateIo = {}): Promise<GenerateReport> {
  if (typeof opts.model !== 'string' || !opts.model) throw invalidParameterError('model', 'a model folder, hub id or .safetensors file', opts.model);
  const out = opts.out ?? '.';
  if (typeof out !== 'string' || !out) throw invalidParameterError('out', 'a folder path', out);
  const stderr = io.stderr ?? process.stderr;
  const reporter = io.progress === false ? null : new ProgressReporter({ label: 'sampling', stream: stderr });
  const started = Date.now();

  const pipeline = await loadPipeline(opts.model, { device: opts.device, dtype: opts.dtype });
  try {
    const result = await pipeline.generate(
      {
        prompt: opts.prompt,
        negativePrompt: opts.negativePrompt,
        steps: opts.steps,
        guidance: opts.guidance,
        scheduler: opts.scheduler,
        seed: opts.seed,
        numImages: opts.n,
        width: opts.width,
        height: opts.height,
        eta: opts.eta,
      },
      { signal: io.signal, onProgress: reporter ? (e) => reporter.update(e) : undefined },
    );
    reporter?.stop();
    for (const w of result.warnings) stderr.write(`warning: ${w}\n`);
    const images: GenerateReport['images'] = [];
    for (const image of result.images) {
      const png = await toPng(image, image.parameters);
      const file = await writeNewFile(out, `${result.seed}-${image.index}`, '.png', png);
      images.push({ file, index: image.index, width: image.width, height: image.height, prompt: image.prompt, negativePrompt: image.negativePrompt, parameters: image.parameters });
    }
    return {
      model: modelLabel(pipeline.modelPath),
      files: images.map((i) => i.file),
      seed: result.seed,
      parameters: result.parameters,
      images,
      warnings: result.warnings,
      elapsedSec: (Date.now() - started) / 1000,
    };
  } finally {
    reporter?.stop();
    pipeline.dispose();
  }
}

export async function handler(argv: ArgumentsCamelCase<Partial<GenerateCommandOptions> & { json?: boolean }>): Promise<void> {
  const controller = new AbortController();
  let interrupted = false;
  const onSigint = () => {
    if (interrupted) {
      // second Ctrl-C: fall back to the default action (terminate now)
      process.removeListener('SIGINT', onSigint);
      process.kill(process.pid, 'SIGINT');
      return;
    }
    interrupted = true;
    process.stderr.write('\nInterrupted: stopping before the next step (Ctrl-C again to quit at once)\n');
    controller.abort();
  };
  process.on('SIGINT', onSigint);
  let report: GenerateReport;
  try {
    report = await runGenerate(
      {
        model: argv.model as string,
        prompt: argv.prompt as string,
        negativePrompt: argv.negativePrompt,
        steps: argv.steps,
        guidance: argv.guidance,
        scheduler: argv.scheduler,
        seed: argv.seed,
        n: argv.n,
        width: argv.width,
        height: argv.height,
        eta: argv.eta,
        out: argv.out,
        device: argv.device,
        dtype: argv.dtype,
      },
      { signal: controller.signal },
    );
  } finally {
    process.removeListener('SIGINT', onSigint);
  }
  process.stdout.write(argv.json ? JSON.stringify(report, null, 2) + '\n' : report.files.join('\n') + '\n');
}
