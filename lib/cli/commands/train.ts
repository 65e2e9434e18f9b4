/**
 * `singleinsert-native train --image face.png --mask face_mask.png --class face`: learn a concept from
 * one image (SingleInsert stage I, then stage II) and write it to --out. Shows a two-stage progress
 * line with the losses; --json prints one JSON object per line instead (every progress event, then a
 * summary). Ctrl-C stops after the current step; with --checkpoint-every, `--resume <out>` continues.
 */
import * as path from 'node:path';
import type { ArgumentsCamelCase, Argv } from 'yargs';
import { invalidParameterError } from '../../errors';
import { STAGE1_DEFAULTS, STAGE2_DEFAULTS, StageOptions, train, TrainOptions, TrainProgress, TrainResult } from '../../train';

export const command = 'train';
export const desc = 'Learn a concept from one image and its mask (SingleInsert: image encoder, then LoRA)';

/** The model used when --model is not given: SD v1.5 from the local Hugging Face cache. */
export const DEFAULT_MODEL = 'runwayml/stable-diffusion-v1-5';

export interface TrainCommandOptions {
  image?: string;
  mask?: string;
  class?: string;
  model?: string;
  device?: string;
  dtype?: string;
  channelsLast?: boolean;
  gradCheckpointing?: boolean;
  out?: string;
  resolution?: number;
  stage?: string | number;
  stage1Steps?: number;
  stage1Batch?: number;
  stage1Lr?: number;
  stage2Steps?: number;
  stage2Batch?: number;
  stage2Lr?: number;
  microBatch?: number;
  gamma?: number;
  eta?: number;
  rank?: number;
  seed?: number;
  checkpointEvery?: number;
  resume?: string;
  imageEncoder?: string;
  softMask?: boolean;
  fgNorm?: string;
  json?: boolean;
}

export function builder(y: Argv): Argv<TrainCommandOptions> {
  return y
    .option('image', { type: 'string', describe: 'the concept image (required unless --resume)' })
    .option('mask', { type: 'string', describe: "mask image, white = the concept (default: the image's alpha channel)" })
    .option('class', { type: 'string', describe: 'class word of the concept, e.g. face, dog, "teddy bear" (required unless --resume)' })
    .option('model', { type: 'string', describe: `SD v1.5 model: diffusers folder, hub id in the local cache, or .safetensors file [default: ${DEFAULT_MODEL}]` })
    .option('device', { type: 'string', describe: 'cpu, cuda or cuda:N [default: cpu]' })
    .option('dtype', { type: 'string', choices: ['fp32', 'bf16', 'fp16'], describe: 'dtype of the frozen SD models (fp16 needs CUDA; the trained parts stay fp32) [default: fp32]' })
    .option('channels-last', { type: 'boolean', describe: "the UNet in channels-last memory order (faster on CUDA with bf16/fp16)" })
    .option('grad-checkpointing', { type: 'boolean', describe: "recompute the UNet's blocks in backward: less memory, ~1 more UNet forward per step, same results" })
    .option('out', { type: 'string', describe: 'output folder [default: ./concept, or the --resume folder]' })
    .option('resolution', { type: 'number', describe: 'training resolution, a multiple of 64 [default: 512]' })
    .option('stage', { type: 'string', choices: ['1', '2', 'both'], describe: 'which stages to run [default: both]' })
    .option('stage1-steps', { type: 'number', describe: `stage I steps [default: ${STAGE1_DEFAULTS.steps}]` })
    .option('stage1-batch', { type: 'number', describe: `stage I batch [default: ${STAGE1_DEFAULTS.batch}]` })
    .option('stage1-lr', { type: 'number', describe: `stage I learning rate [default: ${STAGE1_DEFAULTS.lr}]` })
    .option('stage2-steps', { type: 'number', describe: `stage II steps [default: ${STAGE2_DEFAULTS.steps}]` })
    .option('stage2-batch', { type: 'number', describe: `stage II batch [default: ${STAGE2_DEFAULTS.batch}]` })
    .option('stage2-lr', { type: 'number', describe: `stage II learning rate [default: ${STAGE2_DEFAULTS.lr}]` })
    .option('micro-batch', { type: 'number', describe: 'elements per forward/backward pass, to fit a smaller GPU [default: the batch]' })
    .option('gamma', { type: 'number', describe: 'weight of the background loss [default: 1]' })
    .option('eta', { type: 'number', describe: 'weight of the stage II semantic loss [default: 1]' })
    .option('rank', { type: 'number', describe: 'LoRA rank [default: 4]' })
    .option('seed', { type: 'number', describe: 'random seed [default: random, recorded in concept.json]' })
    .option('checkpoint-every', { type: 'number', describe: 'write <out>/checkpoint/ every N steps, for --resume' })
    .option('resume', { type: 'string', describe: 'continue the stopped run in this folder (its checkpoint/)' })
    .option('image-encoder', { type: 'string', describe: 'pretrained CLIPVisionModelWithProjection folder [default: random ViT-B/32]' })
    .option('soft-mask', { type: 'boolean', describe: "keep the mask's gray levels instead of 0/1" })
    .option('fg-norm', { type: 'string', choices: ['mean', 'mask'], describe: 'foreground loss: mean over the image, or over the mask area [default: mean]' })
    .option('json', { type: 'boolean', default: false, describe: 'print one JSON object per line (progress events, then a summary)' }) as Argv<TrainCommandOptions>;
}

/** The library options a command line stands for (only what was given: the rest takes train()'s defaults). */
export function trainOptionsFromCli(opts: TrainCommandOptions): TrainOptions {
  const stage = (n: 1 | 2): StageOptions | undefined => {
    const s: StageOptions = {};
    const steps = n === 1 ? opts.stage1Steps : opts.stage2Steps;
    const batch = n === 1 ? opts.stage1Batch : opts.stage2Batch;
    const lr = n === 1 ? opts.stage1Lr : opts.stage2Lr;
    if (steps !== undefined) s.steps = steps;
    if (batch !== undefined) s.batch = batch;
    if (lr !== undefined) s.lr = lr;
    return Object.keys(s).length ? s : undefined;
  };
  let stageValue: 1 | 2 | 'both' | undefined;
  if (opts.stage !== undefined) {
    const v = String(opts.stage);
    if (v !== '1' && v !== '2' && v !== 'both') throw invalidParameterError('--stage', '1, 2 or both', opts.stage);
    stageValue = v === 'both' ? 'both' : (Number(v) as 1 | 2);
  }
  const out: Record<string, unknown> = {
    model: opts.model ?? (opts.resume ? undefined : DEFAULT_MODEL),
    device: opts.device,
    dtype: opts.dtype,
    channelsLast: opts.channelsLast,
    gradCheckpointing: opts.gradCheckpointing,
    image: opts.image,
    mask: opts.mask,
    classWord: opts.class,
    out: opts.out ?? (opts.resume ? undefined : path.resolve('concept')),
    resolution: opts.resolution,
    stage: stageValue,
    stage1: stage(1),
    stage2: stage(2),
    microBatch: opts.microBatch,
    gamma: opts.gamma,
    eta: opts.eta,
    rank: opts.rank,
    seed: opts.seed,
    checkpointEvery: opts.checkpointEvery,
    resume: opts.resume,
    imageEncoder: opts.imageEncoder,
    softMask: opts.softMask,
    fgNorm: opts.fgNorm,
  };
  for (const k of Object.keys(out)) if (out[k] === undefined) delete out[k];
  return out as unknown as TrainOptions;
}

// ---------------------------------------------------------------- progress display

const fmt = (v: number) => (Math.abs(v) >= 1e-3 || v === 0 ? v.toFixed(4) : v.toExponential(2));

function duration(sec: number): string {
  if (!Number.isFinite(sec)) return '?';
  const s = Math.round(sec);
  return s >= 3600 ? `${Math.floor(s / 3600)}h${String(Math.floor((s % 3600) / 60)).padStart(2, '0')}m` : s >= 60 ? `${Math.floor(s / 60)}m${String(s % 60).padStart(2, '0')}s` : `${s}s`;
}

/**
 * One progress line: "stage I  [#####-----]  25/50  fg 0.1234  bg 0.0012  sm 0  total 0.1246  3.1 it/s  eta 40s",
 * plus "  mem 12.5 GiB" on CUDA (the allocator's peak) and "  scale 65536" with fp16's loss scaling
 * (" (step skipped)" when the step's gradients overflowed).
 */
export function formatProgress(p: TrainProgress, width = 20): string {
  const filled = p.steps > 0 ? Math.round((width * p.step) / p.steps) : width;
  const bar = '#'.repeat(filled) + '-'.repeat(width - filled);
  const losses = `fg ${fmt(p.losses.fg)}  bg ${fmt(p.losses.bg)}${p.stage === 2 ? `  sm ${fmt(p.losses.sm)}` : ''}  total ${fmt(p.losses.total)}`;
  const memory = p.peakMemoryBytes !== null ? `  mem ${(p.peakMemoryBytes / 2 ** 30).toFixed(1)} GiB` : '';
  const scale = p.lossScale !== null ? `  scale ${p.lossScale}${p.skipped ? ' (step skipped)' : ''}` : '';
  return `stage ${p.stage === 1 ? 'I ' : 'II'} [${bar}] ${String(p.step).padStart(String(p.steps).length)}/${p.steps}  ${losses}  ${p.itPerSec.toFixed(2)} it/s  eta ${duration(p.etaSec)}${memory}${scale}`;
}

/**
 * Writes progress to a stream: on a terminal one line per stage, redrawn in place; otherwise a line
 * every tenth of a stage and at its end, so logs stay short.
 */
export class TrainProgressReporter {
  private stage = 0;
  constructor(private readonly stream: NodeJS.WritableStream & { isTTY?: boolean }) {}

  update(p: TrainProgress): void {
    const line = formatProgress(p);
    if (this.stream.isTTY) {
      if (this.stage !== 0 && this.stage !== p.stage) this.stream.write('\n');
      this.stream.write(`\r${line}\x1b[K`);
      if (p.step === p.steps) this.stream.write('\n');
    } else {
      const every = Math.max(1, Math.floor(p.steps / 10));
      if (p.step % every === 0 || p.step === p.steps) this.stream.write(line + '\n');
    }
    this.stage = p.step === p.steps ? 0 : p.stage;
  }

  /** Ends a half-drawn line (before an error message). */
  finish(): void {
    if (this.stream.isTTY && this.stage !== 0) this.stream.write('\n');
    this.stage = 0;
  }
}

// ---------------------------------------------------------------- the command

export interface TrainIo {
  stdout?: NodeJS.WritableStream & { isTTY?: boolean };
  stderr?: NodeJS.WritableStream & { isTTY?: boolean };
  signal?: AbortSignal;
}

/** The command's work without process-level concerns (exit codes, signals), for in-process tests. */
export async function runTrain(opts: TrainCommandOptions, io: TrainIo = {}): Promise<TrainResult> {
  const stdout = io.stdout ?? process.stdout;
  const stderr = io.stderr ?? process.stderr;
  const options = trainOptionsFromCli(opts);
  const reporter = new TrainProgressReporter(stderr);
  const onProgress = opts.json ? (p: TrainProgress) => stdout.write(JSON.stringify({ event: 'progress', ...p }) + '\n') : (p: TrainProgress) => reporter.update(p);
  let result: TrainResult;
  try {
    result = await train(options, { signal: io.signal, onProgress });
  } finally {
    reporter.finish();
  }
  const { concept, files } = result;
  if (opts.json) {
    stdout.write(JSON.stringify({ event: 'done', out: result.out, files, placeholder: concept.placeholder, classWord: concept.classWord, prompt: concept.prompt, finalLosses: concept.finalLosses, timings: concept.timings, precision: concept.precision, memory: concept.memory }) + '\n');
  } else {
    const written = [files.embedding, files.lora, files.encoder, files.concept].filter((f): f is string => f !== null).map((f) => path.basename(f));
    stdout.write(
      [
        `Wrote the concept to ${result.out}: ${written.join(', ')}`,
        `Trained in ${duration(concept.timings.totalSec)} (stage I ${duration(concept.timings.stage1Sec)}, stage II ${duration(concept.timings.stage2Sec)}).`,
        `Use the placeholder in prompts: "${concept.prompt} ..." (e.g. "a photo of ${concept.prompt} wearing sunglasses").`,
      ].join('\n') + '\n',
    );
  }
  return result;
}

export async function handler(argv: ArgumentsCamelCase<TrainCommandOptions>): Promise<void> {
  // Ctrl-C: stop after the current step (the promise rejects with AbortError, exit code 130). The
  // listener is a `once`: a second Ctrl-C meets Node's default handler and ends the process at once.
  const controller = new AbortController();
  const onSigint = () => {
    process.stderr.write('\nStopping after the current step (Ctrl-C again to quit at once)...\n');
    controller.abort();
  };
  process.once('SIGINT', onSigint);
  try {
    await runTrain(argv, { signal: controller.signal });
  } finally {
    process.off('SIGINT', onSigint);
  }
}
