/**
 * SingleInsert training (Wu et al., 2023): learn a concept from ONE image, its foreground mask and a
 * class word. The placeholder `*`'s embedding is predicted by an image encoder (CLIP ViT-B/32 + a
 * linear head) trained in stage I with SD frozen; stage II adds a rank-4 LoRA on the UNet and the text
 * encoder. The math lives in native/train.h; this file validates, loads inputs, runs the step loop
 * (progress, cancellation, checkpoints, resume) and writes the concept folder:
 *
 *   <out>/concept.json            format version 1: placeholder, class word, hyper-parameters, base model, losses, timings
 *   <out>/embedding.safetensors   `emb_params` [1, hidden]: a textual-inversion embedding (A1111, ComfyUI, diffusers)
 *   <out>/lora.safetensors        kohya LoRA for the UNet and the text encoder (after stage II)
 *   <out>/encoder.safetensors     the trained image encoder (vision_model.*, visual_projection.weight, head.*)
 *   <out>/checkpoint/             with checkpointEvery: everything needed to resume bit-exactly
 *
 * Precision (`dtype`, native/train.h): the frozen UNet, VAE and text encoder run in fp32, bf16 or
 * fp16 (fp16 on CUDA only); the image encoder, the LoRA adapters, the AdamW state, the losses and every
 * file written stay fp32. fp16 scales the loss dynamically (2^16 to start, halved and the step skipped
 * on inf/NaN gradients, doubled after 2000 good steps, as torch.cuda.amp.GradScaler); bf16 needs no
 * scaling. `gradCheckpointing` recomputes the UNet's blocks in backward (less memory, same results).
 */
import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { Config, readConfig, resolveConfig } from './config';
import { AbortError, describeValue, invalidParameterError, SingleInsertError } from './errors';
import { clipProcessorConfig, ImageProcessorConfig, loadTrainingInputs, readPreprocessorConfig, RESOLUTION_MULTIPLE } from './image';
import { version } from './info';
import { componentWeightFiles, resolveModelPath } from './model-files';
import { DTypeOption, loadPipeline, Model, Pipeline } from './models';
import { MemoryStats, native, NativeModelHandle, NativeTensor, NativeTrainer, NativeTrainerState, Tensor, TrainerPrecision, TrainLosses, withCallerStack } from './native';
import { CLASS_TEMPLATE, DEFAULT_PLACEHOLDER, fill, TRAIN_TEMPLATE } from './prompts';
import { readSafetensorsHeader } from './safetensors';
import { resolveSchedulerConfig } from './schedulers';
import { CONCEPT_FORMAT, CONCEPT_VERSION, modelIdentity } from './concepts';

export type { MemoryStats, TrainerPrecision, TrainLosses } from './native';

// ---------------------------------------------------------------- defaults (the paper's recipe)

/** Stage I: SD frozen, the image encoder learns the embedding. */
export const STAGE1_DEFAULTS = Object.freeze({ steps: 50, batch: 16, lr: 1e-4 });
/** Stage II: LoRA on UNet + text encoder, trained with the encoder. */
export const STAGE2_DEFAULTS = Object.freeze({ steps: 100, batch: 4, lr: 5e-5 });
/** LoRA rank; alpha = rank, so the update is up·down unscaled (diffusers' LoRA training scripts). */
export const DEFAULT_RANK = 4;
export const DEFAULT_RESOLUTION = 512;
/** AdamW and clipping as the native trainer runs them (constant learning rate). */
export const OPTIMIZER = Object.freeze({ name: 'AdamW', betas: [0.9, 0.999], eps: 1e-8, weightDecay: 1e-2, gradClipNorm: 1.0, lrSchedule: 'constant' });

/** The vision tower of openai/clip-vit-base-patch32 (transformers CLIPVisionConfig), the default encoder shape. */
export const CLIP_VIT_B32_VISION_CONFIG: Config = Object.freeze({
  hidden_size: 768,
  intermediate_size: 3072,
  projection_dim: 512,
  num_hidden_layers: 12,
  num_attention_heads: 12,
  num_channels: 3,
  image_size: 224,
  patch_size: 32,
  hidden_act: 'quick_gelu',
  layer_norm_eps: 1e-5,
});

const MAX_CLASS_WORDS = 4;
// SD v1.5 was trained at 512; beyond 2048 the UNet's activations outgrow any single GPU
const MAX_RESOLUTION = 2048;

// ---------------------------------------------------------------- types

/**
 * Training inputs already loaded (what lib/image.ts `loadTrainingInputs` returns; only the tensors
 * below are used).
 */
export interface TrainingInputs {
  /** [1, 3, R, R] in [-1, 1] */
  image: Tensor;
  /** [1, 1, R/8, R/8], nearest-resized (or soft) */
  maskLatent: Tensor;
  /** [1, 3, S, S], CLIP-normalised for the image encoder */
  encoderPixels: Tensor;
  warnings?: string[];
}

export interface StageOptions {
  steps?: number;
  batch?: number;
  lr?: number;
}

export interface TrainOptions {
  /** a loaded pipeline (kept loaded), or a model folder / hub id / single file (loaded and disposed) */
  model: Pipeline | string;
  /** with `model` as a path: where to load it, "cpu" (default), "cuda" or "cuda:N" */
  device?: string;
  /**
   * with `model` as a path: the frozen models' dtype, fp32 (default), bf16 or fp16 (CUDA only). What
   * is trained (image encoder, LoRA) and everything written stays fp32. A loaded Pipeline keeps its own.
   */
  dtype?: DTypeOption;
  /** with `model` as a path: the UNet in channels-last memory order (faster convs on CUDA with bf16/fp16); default false */
  channelsLast?: boolean;
  /** recompute the UNet's blocks in backward instead of keeping their activations: less memory, about one more UNet forward per step, the same results; default false */
  gradCheckpointing?: boolean;
  /** image file, or inputs already loaded with loadTrainingInputs */
  image: string | TrainingInputs;
  /** mask file (white = subject); with `image` as a file only */
  mask?: string;
  /** the class of the subject: "face", "dog", "teddy bear" */
  classWord: string;
  /** the placeholder string of the learned token, default "*" */
  placeholder?: string;
  /** output folder (created) */
  out: string;
  resolution?: number;
  stage?: 1 | 2 | 'both';
  stage1?: StageOptions;
  stage2?: StageOptions;
  /** elements per forward/backward pass (gradient accumulation within a step); default: the batch */
  microBatch?: number;
  gamma?: number;
  eta?: number;
  rank?: number;
  seed?: number;
  /** write <out>/checkpoint/ every N steps of a stage (and at the end of stage I) */
  checkpointEvery?: number;
  /** a previous run's out folder (or its checkpoint/ folder) to continue */
  resume?: string;
  /** a pretrained CLIPVisionModelWithProjection or CLIPModel folder (config.json + model.safetensors), or { config, weights? }; default: random ViT-B/32 */
  imageEncoder?: string | { config: Config; weights?: string };
  softMask?: boolean;
  fgNorm?: 'mean' | 'mask';
}

export interface TrainProgress {
  stage: 1 | 2;
  /** completed steps of this stage */
  step: number;
  steps: number;
  losses: TrainLosses;
  lr: number;
  gradNorm: number;
  itPerSec: number;
  /** estimate for the remaining steps of every stage, at this stage's rate */
  etaSec: number;
  /** fp16 models: the loss scale of this step (null without loss scaling) */
  lossScale: number | null;
  /** fp16 models: this step's gradients held inf/NaN, so its update was skipped (the loss scale halves) */
  skipped: boolean;
  /** CUDA: peak bytes in tensors since the trainer started (the caching allocator's count); null on the CPU */
  peakMemoryBytes: number | null;
  /** the process's peak resident set size so far (getrusage), bytes */
  peakRssBytes: number | null;
}

export interface TrainCallbacks {
  signal?: AbortSignal;
  onProgress?: (progress: TrainProgress) => void;
}

export interface ResolvedTrainOptions {
  modelPath: string | null;
  device: string;
  /** null with a loaded Pipeline (its own dtypes are in concept.json's precision) */
  dtype: DTypeOption | null;
  channelsLast: boolean;
  gradCheckpointing: boolean;
  image: string | null;
  mask: string | null;
  classWord: string;
  placeholder: string;
  out: string;
  resolution: number;
  stage: 1 | 2 | 'both';
  stage1: Required<StageOptions>;
  stage2: Required<StageOptions>;
  microBatch: number | null;
  gamma: number;
  eta: number;
  rank: number;
  seed: number;
  checkpointEvery: number | null;
  resume: string | null;
  imageEncoder: { source: string; config: Config; weights: string | null; processor: ImageProcessorConfig | null };
  softMask: boolean;
  fgNorm: 'mean' | 'mask';
}

export interface ConceptFiles {
  concept: string;
  embedding: string;
  lora: string | null;
  encoder: string;
}

export interface TrainResult {
  out: string;
  files: ConceptFiles;
  concept: ConceptJson;
}

export interface ConceptJson {
  format: string;
  version: number;
  placeholder: string;
  classWord: string;
  prompt: string;
  files: { embedding: string; lora: string | null; encoder: string };
  embedding: { key: 'emb_params'; shape: number[] };
  lora: { format: 'kohya'; rank: number; alpha: number; modules: number } | null;
  hyperparameters: Record<string, unknown>;
  baseModel: { path: string; unetWeights: string[]; unetHeaderSha256: string };
  imageEncoder: { source: string; config: Config };
  inputs: { image: string | null; mask: string | null; sha256: string; warnings: string[] };
  library: { name: string; version: string; torch: string };
  /** the frozen models' dtypes; what was trained is always fp32. lossScaling: fp16's final scale and the steps it skipped in this run */
  precision: { unet: string; vae: string; textEncoder: string; trainable: 'fp32'; lossScaling: { finalScale: number | null; skippedSteps: number } | null };
  /** peak memory of this run: CUDA caching allocator (null on the CPU) and the process's peak RSS */
  memory: { peakMemoryBytes: number | null; peakRssBytes: number | null };
  finalLosses: { stage1: TrainLosses | null; stage2: TrainLosses | null };
  timings: { totalSec: number; stage1Sec: number; stage2Sec: number; stage1SecPerStep: number | null; stage2SecPerStep: number | null; resumed: boolean };
  createdAt: string;
}

// ---------------------------------------------------------------- validation

const isObject = (v: unknown): v is Record<string, unknown> => v !== null && typeof v === 'object' && !Array.isArray(v);

function intAtLeast(name: string, value: unknown, min: number): number {
  if (typeof value !== 'number' || !Number.isSafeInteger(value) || value < min) throw invalidParameterError(name, `an integer >= ${min}`, value);
  return value;
}

function positiveFinite(name: string, value: unknown): number {
  if (typeof value !== 'number' || !Number.isFinite(value) || value <= 0) throw invalidParameterError(name, 'a finite number > 0', value);
  return value;
}

function nonNegativeFinite(name: string, value: unknown): number {
  if (typeof value !== 'number' || !Number.isFinite(value) || value < 0) throw invalidParameterError(name, 'a finite number >= 0', value);
  return value;
}

function stageOptions(name: string, value: unknown, fallback: Required<StageOptions>): Required<StageOptions> {
  if (value === undefined) return { ...fallback };
  if (!isObject(value)) throw invalidParameterError(name, 'an object { steps?, batch?, lr? }', value);
  return {
    steps: value.steps === undefined ? fallback.steps : intAtLeast(`${name}.steps`, value.steps, 0),
    batch: value.batch === undefined ? fallback.batch : intAtLeast(`${name}.batch`, value.batch, 1),
    lr: value.lr === undefined ? fallback.lr : positiveFinite(`${name}.lr`, value.lr),
  };
}

function checkClassWord(value: unknown): string {
  const expected = `a non-empty word or short phrase (at most ${MAX_CLASS_WORDS} words of letters, digits, "-" or "'")`;
  if (typeof value !== 'string') throw invalidParameterError('classWord', expected, value);
  const word = value.trim().replace(/\s+/g, ' ');
  if (word.length === 0 || word.split(' ').length > MAX_CLASS_WORDS || !/^[\p{L}\p{N}][\p{L}\p{N}'-]*( [\p{L}\p{N}][\p{L}\p{N}'-]*)*$/u.test(word)) {
    throw invalidParameterError('classWord', expected, value);
  }
  return word;
}

function checkFile(name: string, value: unknown, what: string): string {
  if (typeof value !== 'string' || value.length === 0) throw invalidParameterError(name, what, value);
  if (!fs.existsSync(value) || !fs.statSync(value).isFile()) throw invalidParameterError(name, `${what} (no such file)`, value);
  return path.resolve(value);
}

function checkEncoder(value: unknown): ResolvedTrainOptions['imageEncoder'] {
  if (value === undefined) {
    const config = resolveConfig('clip_vision', { ...CLIP_VIT_B32_VISION_CONFIG }, 'the default image encoder config');
    return { source: 'random (CLIP ViT-B/32 shape)', config, weights: null, processor: null };
  }
  if (typeof value === 'string') {
    if (!fs.existsSync(value) || !fs.statSync(value).isDirectory()) {
      throw invalidParameterError('imageEncoder', 'a CLIPVisionModelWithProjection folder (config.json + model.safetensors)', value);
    }
    const dir = path.resolve(value);
    // a CLIPVisionModelWithProjection folder, or a whole CLIPModel (openai/clip-vit-base-patch32): its
    // vision_config and projection_dim describe the tower, and the loader skips the text tower
    const file = path.join(dir, 'config.json');
    const raw = readConfigJson(file);
    const config = isObject(raw.vision_config)
      ? resolveConfig('clip_vision', { ...raw.vision_config, projection_dim: raw.projection_dim ?? 512 }, file)
      : readConfig('clip_vision', file);
    const { files } = componentWeightFiles(dir);
    if (files.length !== 1) throw new SingleInsertError(`${dir}: the image encoder must be one safetensors file, found ${files.length} shards`);
    // its preprocessor_config.json, when there is one, decides the encoder's input (else CLIP's at image_size)
    const pre = path.join(dir, 'preprocessor_config.json');
    const processor = fs.existsSync(pre) ? readPreprocessorConfig(pre, 'clip') : null;
    return { source: dir, config, weights: files[0], processor };
  }
  if (isObject(value) && isObject(value.config)) {
    const weights = value.weights === undefined ? null : checkFile('imageEncoder.weights', value.weights, 'a .safetensors file');
    return { source: weights ?? 'random', config: resolveConfig('clip_vision', value.config as Config, 'imageEncoder.config'), weights, processor: null };
  }
  throw invalidParameterError('imageEncoder', 'a CLIPVisionModelWithProjection folder or { config, weights? }', value);
}

function readConfigJson(file: string): Record<string, unknown> {
  try {
    const raw = JSON.parse(fs.readFileSync(file, 'utf8'));
    if (isObject(raw)) return raw;
  } catch (e) {
    const reason = (e as NodeJS.ErrnoException).code === 'ENOENT' ? 'file not found' : (e as Error).message;
    throw new SingleInsertError(`Cannot read the image encoder config ${file}: ${reason}`);
  }
  throw new SingleInsertError(`${file}: expected a JSON object`);
}

/** Where a resume folder keeps its checkpoint: <dir>/checkpoint/ or <dir> itself. */
export function checkpointDir(dir: string): string | null {
  for (const d of [path.join(dir, 'checkpoint'), dir]) if (fs.existsSync(path.join(d, 'trainer.json'))) return path.resolve(d);
  return null;
}

interface CheckpointMeta {
  options: ResolvedTrainOptions;
  inputsSha256: string;
  timings: { stage1Sec: number; stage2Sec: number };
  finalLosses: { stage1: TrainLosses | null; stage2: TrainLosses | null };
}

function readCheckpointMeta(dir: string): CheckpointMeta {
  const file = path.join(dir, 'meta.json');
  try {
    return JSON.parse(fs.readFileSync(file, 'utf8')) as CheckpointMeta;
  } catch (e) {
    throw new SingleInsertError(`Cannot read the checkpoint ${file}: ${(e as Error).message}`);
  }
}

// Options that decide the result: on resume an explicit value must equal the checkpoint's.
const RESUME_FIXED = ['classWord', 'placeholder', 'resolution', 'stage', 'gamma', 'eta', 'rank', 'seed', 'softMask', 'fgNorm'] as const;

/**
 * Checks every option and fills the defaults (on resume: the checkpoint's values). Throws
 * "Expected <what> for <name> but received <value>" before anything is loaded or written.
 */
export function validateTrainOptions(options: TrainOptions): ResolvedTrainOptions {
  if (!isObject(options)) throw invalidParameterError('options', 'an object', options);
  const o = options as unknown as Record<string, unknown>;

  // 1. resume first: its stored options are the defaults of everything not given
  let stored: ResolvedTrainOptions | null = null;
  let resume: string | null = null;
  if (o.resume !== undefined) {
    if (typeof o.resume !== 'string' || o.resume.length === 0) throw invalidParameterError('resume', 'a folder with a checkpoint', o.resume);
    resume = checkpointDir(o.resume);
    if (!resume) throw invalidParameterError('resume', 'a folder with a checkpoint (checkpoint/trainer.json)', o.resume);
    stored = readCheckpointMeta(resume).options;
  }
  const pick = <K extends keyof ResolvedTrainOptions>(key: K, fallback: ResolvedTrainOptions[K]) => (o[key] !== undefined ? o[key] : stored ? stored[key] : fallback);

  // 2. the model
  let modelPath: string | null = null;
  const model = o.model !== undefined ? o.model : stored?.modelPath ?? undefined;
  if (model instanceof Pipeline) modelPath = null;
  else if (typeof model === 'string' && model.length > 0) modelPath = resolveModelPath(model).path;
  else throw invalidParameterError('model', 'a Pipeline or a model folder, hub id or .safetensors file', model);
  const device = o.device ?? 'cpu';
  if (typeof device !== 'string' || !/^(cpu|cuda(:\d+)?)$/.test(device)) throw invalidParameterError('device', '"cpu", "cuda" or "cuda:N"', device);
  if (o.device !== undefined && model instanceof Pipeline) throw invalidParameterError('device', 'no device with a loaded Pipeline (it stays where it was loaded)', o.device);
  let dtype: DTypeOption | null = null;
  if (model instanceof Pipeline) {
    if (o.dtype !== undefined) throw invalidParameterError('dtype', 'no dtype with a loaded Pipeline (it keeps the dtype it was loaded with)', o.dtype);
  } else {
    const d = o.dtype !== undefined ? o.dtype : stored?.dtype ?? 'fp32';
    if (d !== 'fp32' && d !== 'bf16' && d !== 'fp16') throw invalidParameterError('dtype', 'one of fp32, bf16, fp16', d);
    if (d === 'fp16' && device === 'cpu') throw invalidParameterError('dtype', 'fp32 or bf16 on the CPU (fp16 needs CUDA; use bf16 on CPU)', d);
    dtype = d;
  }
  const channelsLast = o.channelsLast ?? false;
  if (typeof channelsLast !== 'boolean') throw invalidParameterError('channelsLast', 'a boolean', channelsLast);
  if (o.channelsLast !== undefined && model instanceof Pipeline) throw invalidParameterError('channelsLast', 'no channelsLast with a loaded Pipeline (load it with channelsLast)', o.channelsLast);
  const gradCheckpointing = o.gradCheckpointing ?? false;
  if (typeof gradCheckpointing !== 'boolean') throw invalidParameterError('gradCheckpointing', 'a boolean', gradCheckpointing);

  // 3. inputs
  let image: string | null = null;
  let mask: string | null = null;
  const img = o.image !== undefined ? o.image : stored?.image ?? undefined;
  if (typeof img === 'string') {
    image = checkFile('image', img, 'an image file');
    const m = o.mask !== undefined ? o.mask : o.image === undefined ? stored?.mask ?? undefined : undefined;
    if (m !== undefined && m !== null) mask = checkFile('mask', m, 'a mask image file');
  } else if (isObject(img)) {
    for (const key of ['image', 'maskLatent', 'encoderPixels']) {
      const t = img[key] as Tensor | undefined;
      if (!isObject(t) || !Array.isArray(t.shape) || !ArrayBuffer.isView(t.data)) throw invalidParameterError(`image.${key}`, 'a tensor { data, shape }', t);
    }
    if (o.mask !== undefined) throw invalidParameterError('mask', 'no mask file when image holds loaded inputs (they include the mask)', o.mask);
  } else {
    throw invalidParameterError('image', 'an image file or loaded training inputs', img);
  }

  // 4. the concept and the recipe
  const classWord = checkClassWord(pick('classWord', undefined as unknown as string));
  const placeholder = pick('placeholder', DEFAULT_PLACEHOLDER);
  if (typeof placeholder !== 'string' || placeholder.length === 0 || /\s/.test(placeholder)) throw invalidParameterError('placeholder', 'a non-empty string without spaces', placeholder);
  const resolution = pick('resolution', DEFAULT_RESOLUTION);
  if (typeof resolution !== 'number' || !Number.isSafeInteger(resolution) || resolution <= 0 || resolution > MAX_RESOLUTION || resolution % RESOLUTION_MULTIPLE !== 0) {
    throw invalidParameterError('resolution', `a multiple of ${RESOLUTION_MULTIPLE} between ${RESOLUTION_MULTIPLE} and ${MAX_RESOLUTION}`, resolution);
  }
  const stage = pick('stage', 'both');
  if (stage !== 1 && stage !== 2 && stage !== 'both') throw invalidParameterError('stage', '1, 2 or "both"', stage);
  const stage1 = stageOptions('stage1', o.stage1, stored?.stage1 ?? { ...STAGE1_DEFAULTS });
  const stage2 = stageOptions('stage2', o.stage2, stored?.stage2 ?? { ...STAGE2_DEFAULTS });
  const microBatch = o.microBatch === undefined ? null : intAtLeast('microBatch', o.microBatch, 1);
  const gamma = nonNegativeFinite('gamma', pick('gamma', 1));
  const eta = nonNegativeFinite('eta', pick('eta', 1));
  const rank = intAtLeast('rank', pick('rank', DEFAULT_RANK), 1);
  const seed = intAtLeast('seed', pick('seed', crypto.randomInt(0, 2 ** 31)), 0);
  const checkpointEvery = o.checkpointEvery === undefined ? null : intAtLeast('checkpointEvery', o.checkpointEvery, 1);
  const softMask = pick('softMask', false);
  if (typeof softMask !== 'boolean') throw invalidParameterError('softMask', 'a boolean', softMask);
  const fgNorm = pick('fgNorm', 'mean');
  if (fgNorm !== 'mean' && fgNorm !== 'mask') throw invalidParameterError('fgNorm', '"mean" or "mask"', fgNorm);
  const imageEncoder = o.imageEncoder === undefined && stored ? stored.imageEncoder : checkEncoder(o.imageEncoder);

  // 5. the output folder (default on resume: the run being resumed)
  let outValue = o.out;
  if (outValue === undefined && resume) outValue = path.basename(resume) === 'checkpoint' ? path.dirname(resume) : resume;
  if (typeof outValue !== 'string' || outValue.length === 0) throw invalidParameterError('out', 'an output folder path', outValue);

  const resolved: ResolvedTrainOptions = {
    modelPath,
    device,
    dtype,
    channelsLast,
    gradCheckpointing,
    image,
    mask,
    classWord,
    placeholder,
    out: path.resolve(outValue),
    resolution,
    stage,
    stage1,
    stage2,
    microBatch,
    gamma,
    eta,
    rank,
    seed,
    checkpointEvery,
    resume,
    imageEncoder,
    softMask,
    fgNorm,
  };
  // 6. on resume, what decides the result must not change
  if (stored) {
    const differ = (key: string, a: unknown, b: unknown) => {
      if (JSON.stringify(a) !== JSON.stringify(b)) {
        throw new SingleInsertError(`Expected ${JSON.stringify(b)} (the checkpoint's value) for ${key} but received ${JSON.stringify(a)}: a resumed run keeps the options that decide its result (${resume})`);
      }
    };
    for (const key of RESUME_FIXED) differ(key, resolved[key], stored[key]);
    differ('stage1.batch', stage1.batch, stored.stage1.batch);
    differ('stage1.lr', stage1.lr, stored.stage1.lr);
    differ('stage2.batch', stage2.batch, stored.stage2.batch);
    differ('stage2.lr', stage2.lr, stored.stage2.lr);
    differ('imageEncoder', imageEncoder.source, stored.imageEncoder.source);
  }
  return resolved;
}

/** Creates `dir` (and parents) and proves it writable with a probe file. */
function prepareOut(dir: string): void {
  try {
    fs.mkdirSync(dir, { recursive: true });
    const probe = path.join(dir, `.write-test-${process.pid}-${Date.now()}`);
    fs.writeFileSync(probe, '');
    fs.rmSync(probe);
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code ?? 'error';
    throw new SingleInsertError(`Expected a writable folder for out but received ${describeValue(dir)} (${code})`);
  }
}

// ---------------------------------------------------------------- the trainer

function modelHandle(model: Model): NativeModelHandle {
  return model.nativeHandle();
}

function idsTensor(ids: number[]): Tensor {
  return { data: BigInt64Array.from(ids.map((i) => BigInt(i))), shape: [1, ids.length] };
}

function sha256Tensors(tensors: Tensor[]): string {
  const h = crypto.createHash('sha256');
  for (const t of tensors) {
    h.update(JSON.stringify(t.shape));
    h.update(Buffer.from(t.data.buffer, t.data.byteOffset, t.data.byteLength));
  }
  return h.digest('hex');
}

export interface TrainerSetup {
  inputs: TrainingInputs;
  classWord: string;
  placeholder?: string;
  imageEncoder?: ResolvedTrainOptions['imageEncoder'];
  gamma?: number;
  eta?: number;
  fgNorm?: 'mean' | 'mask';
  seed: number;
  gradCheckpointing?: boolean;
}

/** One step's result (see TrainProgress for the fields beyond losses and gradNorm). */
export interface StepResult {
  losses: TrainLosses;
  gradNorm: number;
  skipped: boolean;
  lossScale: number | null;
  memory: MemoryStats;
  /** with returnGradients: every trainable parameter's gradient (unscaled, before clipping), for parity tests */
  gradients?: Record<string, NativeTensor>;
}

/**
 * The native trainer on a loaded pipeline, one awaited call per step. `train()` drives it; use it
 * directly for custom loops or evaluation. Call dispose() to take its LoRA off the pipeline.
 */
export class Trainer {
  private constructor(
    private handle: NativeTrainer | null,
    readonly hidden: number,
    readonly latentShape: number[],
    readonly encoderParameters: number,
    public state: NativeTrainerState,
    /** the models' dtypes and whether the loss is scaled (fp16) */
    readonly precision: TrainerPrecision,
  ) {}

  static async create(pipeline: Pipeline, setup: TrainerSetup): Promise<Trainer> {
    const placeholder = setup.placeholder ?? DEFAULT_PLACEHOLDER;
    const prompt = fill(TRAIN_TEMPLATE, { class: setup.classWord, placeholder });
    const star = pipeline.tokenizer.encodePrompt(prompt, { placeholders: [placeholder] });
    const positions = star.placeholderPositions[placeholder];
    if (!positions || positions.length === 0) throw new SingleInsertError(`The training prompt ${JSON.stringify(prompt)} has no placeholder ${JSON.stringify(placeholder)}`);
    const cls = pipeline.tokenizer.call(fill(CLASS_TEMPLATE, { class: setup.classWord }));
    const encoder = setup.imageEncoder ?? checkEncoder(undefined);
    const hidden = pipeline.textEncoder.config.hidden_size as number;
    const stack = new Error();
    const nativeTrainer = new (native().Trainer)({
      unet: modelHandle(pipeline.unet),
      vae: modelHandle(pipeline.vae),
      textEncoder: modelHandle(pipeline.textEncoder),
      encoderConfig: JSON.stringify({ ...encoder.config, head_out: hidden }),
      ...(encoder.weights ? { encoderWeights: encoder.weights } : {}),
      scheduleConfig: JSON.stringify(resolveSchedulerConfig(pipeline.schedulerConfig as Config, `${pipeline.modelPath} scheduler config`, 'ddpm')),
      image: setup.inputs.image,
      maskLatent: setup.inputs.maskLatent,
      encoderPixels: setup.inputs.encoderPixels,
      idsStar: idsTensor(star.ids),
      idsClass: idsTensor(cls.inputIds),
      placeholderPositions: positions,
      gamma: setup.gamma ?? 1,
      eta: setup.eta ?? 1,
      fgNorm: setup.fgNorm ?? 'mean',
      seed: setup.seed,
      gradCheckpointing: setup.gradCheckpointing ?? false,
    });
    try {
      const info = await withCallerStack(nativeTrainer.init(), stack);
      return new Trainer(nativeTrainer, info.hidden, info.latentShape, info.encoderParameters, info.state, info.precision);
    } catch (e) {
      await nativeTrainer.dispose();
      throw e;
    }
  }

  /** A trainer continuing from a checkpoint folder (saveCheckpoint), with the setup of the run that wrote it. */
  static async resumeFrom(pipeline: Pipeline, setup: TrainerSetup, dir: string): Promise<Trainer> {
    const trainer = await Trainer.create(pipeline, setup);
    try {
      await trainer.loadCheckpoint(dir);
    } catch (e) {
      await trainer.dispose();
      throw e;
    }
    return trainer;
  }

  private live(): NativeTrainer {
    if (!this.handle) throw new SingleInsertError('This trainer was disposed');
    return this.handle;
  }

  /** One step; t and noise come from (seed, stage, step) unless a fixed batch is given. */
  async step(options: { stage: 1 | 2; batch: number; microBatch?: number; lr: number; step: number; timesteps?: Tensor; noise?: Tensor; returnGradients?: boolean }): Promise<StepResult> {
    const stack = new Error();
    const r = await withCallerStack(this.live().step(options), stack);
    this.state = r.state;
    return { losses: r.losses, gradNorm: r.gradNorm, skipped: r.skipped, lossScale: r.lossScale, memory: r.memory, ...(r.gradients ? { gradients: r.gradients } : {}) };
  }

  async startStage2(options: { rank: number; alpha?: number }): Promise<{ modules: number; parameters: number }> {
    const stack = new Error();
    const r = await withCallerStack(this.live().startStage2(options), stack);
    this.state = r.state;
    return { modules: r.modules, parameters: r.parameters };
  }

  /** Losses of the current stage on a fixed batch: timesteps int64 [B], noise [B, 4, h, w]. */
  evaluate(options: { timesteps: Tensor; noise: Tensor; microBatch?: number }): Promise<TrainLosses> {
    return withCallerStack(this.live().evaluate(options), new Error());
  }

  embedding(): Promise<NativeTensor> {
    return withCallerStack(this.live().embedding(), new Error());
  }

  saveCheckpoint(dir: string, meta: object): Promise<void> {
    return withCallerStack(this.live().saveCheckpoint(dir, JSON.stringify(meta)), new Error());
  }

  async loadCheckpoint(dir: string): Promise<{ state: NativeTrainerState; meta: unknown }> {
    const r = await withCallerStack(this.live().loadCheckpoint(dir), new Error());
    this.state = r.state;
    return { state: r.state, meta: JSON.parse(r.meta) };
  }

  exportConcept(dir: string, metadata: Record<string, string>): Promise<string[]> {
    return withCallerStack(this.live().exportConcept(dir, metadata), new Error());
  }

  /** Takes the LoRA off the shared models; returns the adapters removed. */
  async dispose(): Promise<number> {
    const n = this.handle;
    this.handle = null;
    return n ? n.dispose() : 0;
  }
}

// ---------------------------------------------------------------- inputs

async function loadInputs(o: ResolvedTrainOptions, image: string | TrainingInputs): Promise<TrainingInputs> {
  const encoderSize = o.imageEncoder.config.image_size as number;
  let inputs: TrainingInputs;
  if (typeof image !== 'string') {
    inputs = image;
  } else {
    const encoderConfig = o.imageEncoder.processor ?? clipProcessorConfig(encoderSize);
    inputs = await loadTrainingInputs({ image, mask: o.mask ?? undefined, resolution: o.resolution, softMask: o.softMask, encoderConfig });
  }
  const R = o.resolution;
  const expect = (name: string, t: Tensor, shape: number[]) => {
    if (JSON.stringify(t.shape) !== JSON.stringify(shape)) throw invalidParameterError(`image.${name}`, `a tensor of shape [${shape.join(', ')}]`, `shape [${t.shape.join(', ')}]`);
  };
  expect('image', inputs.image, [1, 3, R, R]);
  expect('maskLatent', inputs.maskLatent, [1, 1, R / 8, R / 8]);
  expect('encoderPixels', inputs.encoderPixels, [1, 3, encoderSize, encoderSize]);
  return inputs;
}

// ---------------------------------------------------------------- the training loop

function abortError(stage: number, step: number, checkpoint: { stage: number; step: number } | null, out: string): AbortError {
  const where = checkpoint ? `the checkpoint of stage ${checkpoint.stage} step ${checkpoint.step} is in ${path.join(out, 'checkpoint')}; continue with resume: ${JSON.stringify(out)}` : 'no checkpoint was written (set checkpointEvery to make runs resumable)';
  return new AbortError(`Training was aborted after stage ${stage} step ${step}; ${where}`);
}

function writeJsonAtomic(file: string, value: unknown): void {
  const tmp = `${file}.tmp-${process.pid}-${Date.now()}`;
  fs.writeFileSync(tmp, JSON.stringify(value, null, 2) + '\n');
  fs.renameSync(tmp, file);
}

/**
 * Trains a SingleInsert concept and writes it to `out`. Progress events come after every step; the
 * AbortSignal is checked between steps (the run stops within one step, rejects with AbortError, and
 * the last checkpoint stays usable for `resume`).
 */
export async function train(options: TrainOptions, callbacks: TrainCallbacks = {}): Promise<TrainResult> {
  const o = validateTrainOptions(options);
  const { signal, onProgress } = callbacks ?? {};
  if (signal !== undefined && !(signal instanceof AbortSignal)) throw invalidParameterError('signal', 'an AbortSignal', signal);
  if (onProgress !== undefined && typeof onProgress !== 'function') throw invalidParameterError('onProgress', 'a function', onProgress);
  if (signal?.aborted) throw new AbortError('Training was aborted before it started');
  prepareOut(o.out);

  const imageArg = options.image !== undefined ? options.image : (o.image as string);
  const started = performance.now();
  const pipeline = options.model instanceof Pipeline ? options.model : await loadPipeline(o.modelPath as string, { device: o.device, dtype: o.dtype ?? 'fp32', channelsLast: o.channelsLast });
  const ownsPipeline = !(options.model instanceof Pipeline);
  let trainer: Trainer | null = null;
  try {
    // 1. inputs and the trainer
    const inputs = await loadInputs(o, imageArg);
    const inputsSha256 = sha256Tensors([inputs.image, inputs.maskLatent, inputs.encoderPixels]);
    trainer = await Trainer.create(pipeline, {
      inputs,
      classWord: o.classWord,
      placeholder: o.placeholder,
      imageEncoder: o.imageEncoder,
      gamma: o.gamma,
      eta: o.eta,
      fgNorm: o.fgNorm,
      seed: o.seed,
      gradCheckpointing: o.gradCheckpointing,
    });

    // 2. resume: the checkpoint's weights, optimizer state and counters
    const timings = { stage1Sec: 0, stage2Sec: 0 };
    const finalLosses: CheckpointMeta['finalLosses'] = { stage1: null, stage2: null };
    let lastCheckpoint: { stage: number; step: number } | null = null;
    const memory: ConceptJson['memory'] = { peakMemoryBytes: null, peakRssBytes: null };
    const scaling = { finalScale: null as number | null, skippedSteps: 0 };
    if (o.resume) {
      const meta = readCheckpointMeta(o.resume);
      if (meta.inputsSha256 !== inputsSha256) throw new SingleInsertError(`The image or mask differs from the one the checkpoint in ${o.resume} was trained on`);
      await trainer.loadCheckpoint(o.resume);
      Object.assign(timings, meta.timings);
      Object.assign(finalLosses, meta.finalLosses);
      const s = trainer.state;
      lastCheckpoint = { stage: s.stage, step: s.stepsDone[s.stage - 1] };
    }

    const stages: Array<1 | 2> = o.stage === 'both' ? [1, 2] : [o.stage];
    const stepsOf = (s: 1 | 2) => (s === 1 ? o.stage1 : o.stage2).steps;
    const checkpoint = async (stage: 1 | 2, step: number) => {
      const meta: CheckpointMeta = { options: { ...o, resume: null }, inputsSha256, timings, finalLosses };
      await trainer!.saveCheckpoint(path.join(o.out, 'checkpoint'), meta);
      lastCheckpoint = { stage, step };
    };

    // 3. the stages, step by step
    for (const stage of stages) {
      if (stage === 1 && trainer.state.stage === 2) continue; // resumed inside stage II
      const { steps, batch, lr } = stage === 1 ? o.stage1 : o.stage2;
      if (stage === 2 && !trainer.state.lora) await trainer.startStage2({ rank: o.rank, alpha: o.rank });
      const first = trainer.state.stepsDone[stage - 1];
      const stageStart = performance.now();
      const before = stage === 1 ? timings.stage1Sec : timings.stage2Sec;
      for (let step = first; step < steps; step++) {
        if (signal?.aborted) throw abortError(stage, step, lastCheckpoint, o.out);
        const r = await trainer.step({ stage, batch, lr, step, ...(o.microBatch ? { microBatch: o.microBatch } : {}) });
        const elapsed = (performance.now() - stageStart) / 1000;
        if (stage === 1) timings.stage1Sec = before + elapsed;
        else timings.stage2Sec = before + elapsed;
        if (stage === 1) finalLosses.stage1 = r.losses;
        else finalLosses.stage2 = r.losses;
        const done = step + 1;
        if (o.checkpointEvery && (done % o.checkpointEvery === 0 || (done === steps && stage === 1 && stages.includes(2)))) await checkpoint(stage, done);
        const itPerSec = (done - first) / Math.max(elapsed, 1e-9);
        const remaining = steps - done + stages.filter((s) => s > stage).reduce((n, s) => n + stepsOf(s), 0);
        const max = (a: number | null, b: number | null) => (a === null ? b : b === null ? a : Math.max(a, b));
        memory.peakMemoryBytes = max(memory.peakMemoryBytes, r.memory.peakAllocatedBytes);
        memory.peakRssBytes = max(memory.peakRssBytes, r.memory.peakRssBytes);
        if (r.lossScale !== null) scaling.finalScale = r.lossScale;
        if (r.skipped) scaling.skippedSteps++;
        onProgress?.({
          stage, step: done, steps, losses: r.losses, lr, gradNorm: r.gradNorm, itPerSec, etaSec: remaining / itPerSec,
          lossScale: r.lossScale, skipped: r.skipped, peakMemoryBytes: r.memory.peakAllocatedBytes, peakRssBytes: r.memory.peakRssBytes,
        });
      }
    }
    if (signal?.aborted) {
      const s = trainer.state;
      throw abortError(s.stage, s.stepsDone[s.stage - 1], lastCheckpoint, o.out);
    }

    // 4. the concept: three safetensors files, then concept.json
    const prompt = fill(TRAIN_TEMPLATE, { class: o.classWord, placeholder: o.placeholder });
    const metadata = {
      format: CONCEPT_FORMAT,
      'singleinsert.placeholder': o.placeholder,
      'singleinsert.class_word': o.classWord,
      'singleinsert.prompt': prompt,
    };
    const written = await trainer.exportConcept(o.out, metadata);
    const has = (name: string) => written.some((f) => path.basename(f) === name);
    const lora = trainer.state.lora;
    const baseModel = await modelIdentity(pipeline);
    const build = native().buildInfo();
    const s1 = trainer.state.stepsDone[0];
    const s2 = trainer.state.stepsDone[1];
    const concept: ConceptJson = {
      format: CONCEPT_FORMAT,
      version: CONCEPT_VERSION,
      placeholder: o.placeholder,
      classWord: o.classWord,
      prompt,
      files: { embedding: 'embedding.safetensors', lora: has('lora.safetensors') ? 'lora.safetensors' : null, encoder: 'encoder.safetensors' },
      embedding: { key: 'emb_params', shape: [1, trainer.hidden] },
      lora: lora && has('lora.safetensors') ? { format: 'kohya', rank: lora.rank, alpha: lora.alpha, modules: await countLoraModules(path.join(o.out, 'lora.safetensors')) } : null,
      hyperparameters: {
        stage: o.stage,
        stage1: o.stage1,
        stage2: o.stage2,
        microBatch: o.microBatch,
        gamma: o.gamma,
        eta: o.eta,
        rank: o.rank,
        alpha: o.rank,
        seed: o.seed,
        resolution: o.resolution,
        fgNorm: o.fgNorm,
        softMask: o.softMask,
        optimizer: OPTIMIZER,
        newOptimizerPerStage: true,
        dtype: o.dtype ?? trainer.precision.unet,
        gradCheckpointing: o.gradCheckpointing,
        channelsLast: o.channelsLast,
      },
      baseModel,
      imageEncoder: { source: o.imageEncoder.source, config: o.imageEncoder.config },
      inputs: { image: o.image, mask: o.mask, sha256: inputsSha256, warnings: inputs.warnings ?? [] },
      library: { name: 'singleinsert-native', version: version(), torch: build.torchVersion },
      precision: {
        unet: trainer.precision.unet,
        vae: trainer.precision.vae,
        textEncoder: trainer.precision.textEncoder,
        trainable: 'fp32',
        lossScaling: trainer.precision.lossScaling ? scaling : null,
      },
      memory: { ...memory, peakRssBytes: memory.peakRssBytes ?? native().memoryStats('cpu').peakRssBytes },
      finalLosses,
      timings: {
        totalSec: (performance.now() - started) / 1000,
        stage1Sec: timings.stage1Sec,
        stage2Sec: timings.stage2Sec,
        stage1SecPerStep: s1 ? timings.stage1Sec / s1 : null,
        stage2SecPerStep: s2 ? timings.stage2Sec / s2 : null,
        resumed: o.resume !== null,
      },
      createdAt: new Date().toISOString(),
    };
    const conceptFile = path.join(o.out, 'concept.json');
    writeJsonAtomic(conceptFile, concept);
    return {
      out: o.out,
      files: {
        concept: conceptFile,
        embedding: path.join(o.out, 'embedding.safetensors'),
        lora: concept.files.lora ? path.join(o.out, 'lora.safetensors') : null,
        encoder: path.join(o.out, 'encoder.safetensors'),
      },
      concept,
    };
  } finally {
    await trainer?.dispose();
    if (ownsPipeline) pipeline.dispose();
  }
}

/** The adapters in a kohya file: one `.lora_down.weight` per module. */
async function countLoraModules(file: string): Promise<number> {
  const header = await readSafetensorsHeader(file);
  return Object.keys(header.tensors).filter((k) => k.endsWith('.lora_down.weight')).length;
}

