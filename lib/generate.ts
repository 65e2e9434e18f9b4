/**
 * Text to image with a loaded pipeline: diffusers 0.25.1 `StableDiffusionPipeline.__call__` with
 * classifier-free guidance. The prompts are tokenized and encoded here; the sampling loop and the
 * VAE decode run in one native job (native/generate.cc) that reports progress per UNet call and
 * can be cancelled with an AbortSignal.
 *
 * Every option is validated before any native work, with the wording of lib/errors.ts.
 *
 * Concepts, embeddings and LoRAs: `concepts` (loaded SingleInsert concepts), `embeddings`
 * (textual-inversion vectors) and `loras` (kohya files) apply to one call. Each placeholder's
 * occurrences in the prompt AND the negative prompt are tokenised as N positions (N vectors) whose
 * token embeddings the text encoder replaces (`replace_index` / `replace_values`, native/clip.cc).
 * The LoRAs (each concept's and each foreign one, each with its own adapter name and scale, so their
 * updates add up) are attached for the call and removed afterwards, holding the pipeline's lock
 * (lib/concepts.ts): concurrent calls never see each other's adapters, and the same seed gives the
 * same image whatever the order of the concepts and LoRAs.
 *
 * Seeds: the initial latents are `torch.randn([B,4,H/8,W/8], generator=torch.Generator().manual_seed(seed))`
 * (a float32 draw on a CPU generator, moved to the device), so a seed gives the same image as
 * diffusers with a CPU generator, and the same image on CPU and CUDA up to kernel differences.
 */
import { randomInt } from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { AdapterPlan, checkPlaceholder, Concept, isConcept, planAdapters, withAdapters } from './concepts';
import { pickleRefusal } from './embeddings';
import { AbortError, describeValue, invalidParameterError, SingleInsertError } from './errors';
import type { Model, Pipeline } from './models';
import { native, NativeModelHandle, NativeTensor, Tensor, withCallerStack } from './native';
import { encodePng } from './png';
import { resolveSchedulerConfig, SchedulerName, schedulerName } from './schedulers';
import { CLIP_MAX_LENGTH } from './tokenizer';

/** diffusers' defaults for StableDiffusionPipeline.__call__ (and PNDM, the scheduler SD v1.5 ships). */
export const DEFAULT_STEPS = 50;
export const DEFAULT_GUIDANCE = 7.5;
export const DEFAULT_SCHEDULER: SchedulerName = 'pndm';
/** A1111 and most UIs use 32-bit seeds; any non-negative safe integer is accepted. */
const RANDOM_SEED_LIMIT = 2 ** 32;

export interface GenerateOptions {
  /** one prompt, or one per image group */
  prompt: string | string[];
  /** default "": one string for every prompt, or one per prompt */
  negativePrompt?: string | string[];
  /** denoising steps (PNDM calls the UNet once more); default 50 */
  steps?: number;
  /** classifier-free guidance scale; at 1 or below the negative prompt is not used (diffusers); default 7.5 */
  guidance?: number;
  /** ddim | pndm | euler | dpmpp-2m (alias dpmsolver_multistep); default pndm */
  scheduler?: string;
  /** default: random, reported back in the result */
  seed?: number;
  /** multiples of 8; default: the UNet's sample_size * 8 (512 for SD v1.5), like diffusers */
  width?: number;
  height?: number;
  /** images per prompt; default 1 */
  numImages?: number;
  /** DDIM's eta (0 = deterministic DDIM); default 0 */
  eta?: number;
  /** initial latents [B, 4, H/8, W/8] (B = prompts x numImages) instead of a seeded draw */
  latents?: Tensor;
  /** also return every intermediate tensor (for parity tests and debugging) */
  returnIntermediates?: boolean;
  /**
   * Record where one prompt token attends: `tokenIndex` is its position in the 77 prompt ids (BOS is
   * 0), one number for every prompt or one per prompt. The result then has `attentionMaps`
   * [B, H/8, W/8]: that token's cross-attention probabilities, averaged over heads, upsampled to the
   * latent size and summed over every cross-attention layer and UNet call (the positive half of the
   * CFG batch). Recording does not change the images. lib/eval uses it for foreground masks.
   */
  recordAttention?: { tokenIndex: number | number[] };
  /** SingleInsert concepts (Pipeline.loadConcept): their embeddings replace their placeholders, their LoRAs apply */
  concepts?: ConceptUse[];
  /** textual-inversion vectors (lib/embeddings.ts loadEmbedding) for a placeholder each */
  embeddings?: EmbeddingUse[];
  /** kohya LoRA files to apply for this call */
  loras?: LoraFileUse[];
}

export interface ConceptUse {
  concept: Concept;
  /** default: the concept's placeholder */
  placeholder?: string;
  /** strength of the concept's LoRA (if it has one); default 1 */
  loraScale?: number;
}

export interface EmbeddingUse {
  /** [N, hidden] (or [hidden]) float32: the placeholder takes N consecutive token positions */
  vectors: Tensor;
  placeholder: string;
}

export interface LoraFileUse {
  /** a kohya .safetensors file (lora_unet_* / lora_te_* keys) */
  file: string;
  /** default 1 */
  scale?: number;
  /** refuse keys that target nothing in the models (default true) */
  strict?: boolean;
}

export interface GenerateProgress {
  /** UNet calls done */
  step: number;
  /** UNet calls in total (steps, or steps + 1 for PNDM) */
  steps: number;
  elapsedSec: number;
  itPerSec: number;
  etaSec: number;
}

export interface GenerateRunOptions {
  /** aborting rejects the promise with an AbortError before the next UNet call */
  signal?: AbortSignal;
  /** after every UNet call, always before the promise settles; a throw here cancels the run and rejects with it */
  onProgress?: (e: GenerateProgress) => void;
}

export interface GeneratedImage {
  width: number;
  height: number;
  /** HWC uint8, `(x * 255).round()` as diffusers' numpy_to_pil */
  rgb: Uint8Array;
  /** HWC float32 in [0, 1], diffusers' output_type="np" */
  float: Float32Array;
  prompt: string;
  negativePrompt: string;
  /** position in the batch */
  index: number;
  /** A1111-style generation parameters for this image */
  parameters: string;
}

export interface GenerateResult {
  images: GeneratedImage[];
  seed: number;
  /** the first image's parameters (all images share them unless several prompts were given) */
  parameters: string;
  /** final latents [B, 4, H/8, W/8] */
  latents: NativeTensor;
  /** e.g. prompts truncated to CLIP's 77 tokens, a prompt without any active placeholder, a concept's base-model mismatch */
  warnings: string[];
  /** with recordAttention: [B, H/8, W/8] float32 (see GenerateOptions.recordAttention) */
  attentionMaps?: NativeTensor;
  /**
   * with returnIntermediates: prompt_ids, negative_prompt_ids (when guided), prompt_embeds,
   * negative_prompt_embeds (when guided), timesteps, initial_latents, unet_inputs, unet_outputs,
   * noise_pred_guided, latents_after_step, decoded_raw; with placeholders also the text encoder's
   * inputs: text_input_ids [R, 77] (rows: negatives then prompts when guided), replace_index [P, 2]
   * (row, position) and replace_values [P, hidden]
   */
  intermediates?: Record<string, NativeTensor>;
}

/** A1111's names for our samplers (PNDM without PRK steps is what it calls PLMS). */
const SAMPLER_LABELS: Record<SchedulerName, string> = { ddim: 'DDIM', pndm: 'PLMS', euler: 'Euler', 'dpmpp-2m': 'DPM++ 2M' };

interface Validated {
  prompts: string[];
  negatives: string[];
  steps: number;
  guidance: number;
  scheduler: SchedulerName;
  schedulerConfig: string;
  seed: number;
  width: number;
  height: number;
  numImages: number;
  eta: number;
  latents?: Tensor;
  returnIntermediates: boolean;
  /** one prompt position per image */
  attentionTokenIndex?: number[];
  /** placeholder -> its vectors; empty without concepts/embeddings */
  inversions: Map<string, Inversion>;
  adapters: AdapterPlan[];
  /** warnings the loaded concepts carry (base-model mismatch) */
  conceptWarnings: string[];
  signal?: AbortSignal;
  onProgress?: (e: GenerateProgress) => void;
}

const isPositiveInt = (v: unknown): v is number => typeof v === 'number' && Number.isInteger(v) && v >= 1;
const isF32 = (d: unknown) => Object.prototype.toString.call(d) === '[object Float32Array]';

interface Inversion {
  /** [n, hidden] row-major */
  vectors: Float32Array;
  n: number;
  /** `concept "*" (<dir>)` or `embeddings[1] ("<x>")`, for messages */
  source: string;
}

function listOption<T>(value: unknown, name: string): T[] {
  if (value === undefined) return [];
  if (!Array.isArray(value)) throw invalidParameterError(name, 'an array', value);
  return value as T[];
}

/** concepts, embeddings and loras: placeholders (distinct, the text encoder's width) and the LoRAs to attach. */
function validateConcepts(pipeline: Pipeline, options: GenerateOptions): Pick<Validated, 'inversions' | 'adapters' | 'conceptWarnings'> {
  const hidden = pipeline.textEncoder.config.hidden_size as number;
  const inversions = new Map<string, Inversion>();
  const uses: Array<{ file: string; scale: number; strict?: boolean; source: string }> = [];
  const conceptWarnings: string[] = [];
  const add = (placeholder: string, inv: Inversion) => {
    const other = inversions.get(placeholder);
    if (other) {
      throw new SingleInsertError(
        `Placeholder ${JSON.stringify(placeholder)} is used by both ${other.source} and ${inv.source}; ` +
          'give one of them another placeholder (the concept option placeholder, or --concept name=<dir>)',
      );
    }
    inversions.set(placeholder, inv);
  };
  const checkWidth = (width: number, source: string) => {
    if (width !== hidden) {
      throw new SingleInsertError(`${source}: the embedding has hidden size ${width} but the text encoder of ${pipeline.modelPath} has hidden size ${hidden}; it was made for another model`);
    }
  };

  listOption<ConceptUse>(options.concepts, 'concepts').forEach((use, i) => {
    const where = `concepts[${i}]`;
    if (use === null || typeof use !== 'object' || !isConcept(use.concept)) throw invalidParameterError(`${where}.concept`, 'a concept from loadConcept / Pipeline.loadConcept', use?.concept ?? use);
    const { concept } = use;
    const placeholder = use.placeholder === undefined ? concept.placeholder : checkPlaceholder(use.placeholder, `${where}.placeholder`);
    const scale = use.loraScale ?? 1;
    if (typeof scale !== 'number' || !Number.isFinite(scale)) throw invalidParameterError(`${where}.loraScale`, 'a finite number', scale);
    const source = `concept ${JSON.stringify(placeholder)} (${concept.dir})`;
    const [n, width] = concept.embedding.vectors.shape;
    checkWidth(width, source);
    add(placeholder, { vectors: concept.embedding.vectors.data, n, source });
    if (concept.lora) uses.push({ file: concept.lora.file, scale, source });
    conceptWarnings.push(...concept.warnings);
  });

  listOption<EmbeddingUse>(options.embeddings, 'embeddings').forEach((use, i) => {
    const where = `embeddings[${i}]`;
    if (use === null || typeof use !== 'object') throw invalidParameterError(where, 'an object { vectors, placeholder }', use);
    const placeholder = checkPlaceholder(use.placeholder, `${where}.placeholder`);
    const v = use.vectors;
    const ok = v !== null && typeof v === 'object' && isF32(v.data) && Array.isArray(v.shape) && (v.shape.length === 1 || v.shape.length === 2) &&
      v.shape.every((d) => Number.isInteger(d) && d > 0) && v.data.length === v.shape.reduce((a, b) => a * b, 1);
    if (!ok) throw invalidParameterError(`${where}.vectors`, `a float32 tensor [N, ${hidden}]`, v);
    const [n, width] = v.shape.length === 1 ? [1, v.shape[0]] : v.shape;
    const source = `${where} (${JSON.stringify(placeholder)})`;
    checkWidth(width, source);
    add(placeholder, { vectors: v.data as Float32Array, n, source });
  });

  listOption<LoraFileUse>(options.loras, 'loras').forEach((use, i) => {
    const where = `loras[${i}]`;
    if (use === null || typeof use !== 'object') throw invalidParameterError(where, 'an object { file, scale }', use);
    if (typeof use.file !== 'string' || use.file.length === 0) throw invalidParameterError(`${where}.file`, 'a .safetensors path', use.file);
    if (/\.(pt|pth|bin|ckpt)$/i.test(use.file)) throw pickleRefusal(use.file, 'LoRAs');
    if (!fs.existsSync(use.file)) throw new SingleInsertError(`Cannot read the LoRA ${use.file}: file not found`);
    const scale = use.scale ?? 1;
    if (typeof scale !== 'number' || !Number.isFinite(scale)) throw invalidParameterError(`${where}.scale`, 'a finite number', scale);
    if (use.strict !== undefined && typeof use.strict !== 'boolean') throw invalidParameterError(`${where}.strict`, 'a boolean', use.strict);
    uses.push({ file: use.file, scale, strict: use.strict, source: `${where} (${use.file})` });
  });

  return { inversions, adapters: planAdapters(uses), conceptWarnings };
}

function validate(pipeline: Pipeline, options: GenerateOptions, run: GenerateRunOptions): Validated {
  if (options === null || typeof options !== 'object') throw invalidParameterError('options', 'an object', options);
  if (run === null || typeof run !== 'object') throw invalidParameterError('run options', 'an object', run);

  const { prompt } = options;
  const prompts = Array.isArray(prompt) ? prompt : [prompt];
  if (prompts.length === 0 || !prompts.every((p) => typeof p === 'string')) throw invalidParameterError('prompt', 'a string or a non-empty array of strings', prompt);

  const negative = options.negativePrompt ?? '';
  let negatives: string[];
  if (typeof negative === 'string') negatives = prompts.map(() => negative);
  else if (Array.isArray(negative) && negative.length === prompts.length && negative.every((p) => typeof p === 'string')) negatives = negative;
  else throw invalidParameterError('negativePrompt', `a string or an array of ${prompts.length} string(s), one per prompt`, negative);

  const scheduler = schedulerName(options.scheduler ?? DEFAULT_SCHEDULER);
  let resolved;
  try {
    resolved = resolveSchedulerConfig(pipeline.schedulerConfig, `${pipeline.modelPath} scheduler config`, scheduler);
  } catch (e) {
    throw new SingleInsertError((e as Error).message);
  }

  const steps = options.steps ?? DEFAULT_STEPS;
  if (!isPositiveInt(steps) || steps > resolved.num_train_timesteps) {
    throw invalidParameterError('steps', `an integer between 1 and ${resolved.num_train_timesteps}`, steps);
  }
  const guidance = options.guidance ?? DEFAULT_GUIDANCE;
  if (typeof guidance !== 'number' || !Number.isFinite(guidance) || guidance < 0) throw invalidParameterError('guidance', 'a finite number >= 0', guidance);
  const eta = options.eta ?? 0;
  if (typeof eta !== 'number' || !Number.isFinite(eta) || eta < 0) throw invalidParameterError('eta', 'a finite number >= 0', eta);
  if (eta !== 0 && scheduler !== 'ddim') throw invalidParameterError('eta', `0 with the ${scheduler} scheduler (eta is a DDIM option)`, eta);

  // diffusers: height = height or unet.config.sample_size * vae_scale_factor
  const factor = 2 ** ((pipeline.vae.config.block_out_channels as number[]).length - 1);
  const defaultSize = (pipeline.unet.config.sample_size as number) * factor;
  const width = options.width ?? defaultSize;
  const height = options.height ?? defaultSize;
  if (!isPositiveInt(width) || width % factor !== 0) throw invalidParameterError('width', `a positive multiple of ${factor}`, width);
  if (!isPositiveInt(height) || height % factor !== 0) throw invalidParameterError('height', `a positive multiple of ${factor}`, height);

  const numImages = options.numImages ?? 1;
  if (!isPositiveInt(numImages)) throw invalidParameterError('numImages', 'a positive integer', numImages);

  let seed = options.seed;
  if (seed === undefined) seed = randomInt(0, RANDOM_SEED_LIMIT);
  else if (typeof seed !== 'number' || !Number.isSafeInteger(seed) || seed < 0) throw invalidParameterError('seed', `an integer between 0 and ${Number.MAX_SAFE_INTEGER}`, seed);

  const latents = options.latents;
  if (latents !== undefined) {
    const shape = [prompts.length * numImages, pipeline.unet.config.in_channels as number, height / factor, width / factor];
    // isF32 checks the tag, not instanceof: arrays made by the addon or another realm (jest's vm) are Float32Arrays too
    const ok =
      latents !== null && typeof latents === 'object' && isF32(latents.data) && Array.isArray(latents.shape) && latents.shape.length === 4 &&
      latents.shape.every((d, i) => d === shape[i]) && latents.data.length === shape.reduce((a, b) => a * b, 1) &&
      (latents.dtype === undefined || latents.dtype === 'F32');
    if (!ok) {
      const got = latents !== null && typeof latents === 'object' && Array.isArray(latents.shape) ? `a ${isF32(latents.data) ? 'float32' : 'non-float32'} tensor of shape [${latents.shape.join(', ')}]` : describeValue(latents);
      throw new SingleInsertError(`Expected a float32 tensor of shape [${shape.join(', ')}] for latents but received ${got}`);
    }
  }
  const returnIntermediates = options.returnIntermediates ?? false;
  if (typeof returnIntermediates !== 'boolean') throw invalidParameterError('returnIntermediates', 'a boolean', returnIntermediates);

  let attentionTokenIndex: number[] | undefined;
  if (options.recordAttention !== undefined) {
    const r = options.recordAttention;
    const t = r !== null && typeof r === 'object' ? r.tokenIndex : undefined;
    const perPrompt = typeof t === 'number' ? prompts.map(() => t) : t;
    const okIndex = (i: unknown) => Number.isInteger(i) && (i as number) >= 0 && (i as number) < CLIP_MAX_LENGTH;
    if (!Array.isArray(perPrompt) || perPrompt.length !== prompts.length || !perPrompt.every(okIndex)) {
      throw invalidParameterError('recordAttention.tokenIndex', `an integer between 0 and ${CLIP_MAX_LENGTH - 1}, or an array of ${prompts.length} of them (one per prompt)`, t);
    }
    attentionTokenIndex = perPrompt.flatMap((i) => Array(numImages).fill(i) as number[]);
  }

  const { signal, onProgress } = run;
  const isSignal = (x: unknown) => x instanceof AbortSignal || Object.prototype.toString.call(x) === '[object AbortSignal]';
  if (signal !== undefined && !isSignal(signal)) throw invalidParameterError('signal', 'an AbortSignal', signal);
  if (onProgress !== undefined && typeof onProgress !== 'function') throw invalidParameterError('onProgress', 'a function', onProgress);

  const concepts = validateConcepts(pipeline, options);

  return {
    prompts, negatives, steps, guidance, scheduler, schedulerConfig: JSON.stringify(resolved), seed, width, height, numImages, eta,
    latents, returnIntermediates, attentionTokenIndex, ...concepts, signal, onProgress,
  };
}

/** The last path part that names the model: "tiny-sd", "org/name" for a hub cache snapshot, or the checkpoint's file name. */
export function modelLabel(modelPath: string): string {
  const hub = /models--([^/\\]+)[/\\]snapshots[/\\]/.exec(modelPath);
  if (hub) return hub[1].replace('--', '/');
  return path.basename(modelPath).replace(/\.safetensors$/i, '');
}

/**
 * The A1111 `parameters` text: the prompt, "Negative prompt: ..." (when not empty), then
 * "Steps: 25, Sampler: DDIM, CFG scale: 7.5, Seed: 42, Size: 512x512, Model: tiny-sd".
 */
export function formatParameters(p: {
  prompt: string;
  negativePrompt?: string;
  steps: number;
  scheduler: SchedulerName;
  guidance: number;
  seed: number;
  width: number;
  height: number;
  model: string;
  eta?: number;
}): string {
  const settings = [
    `Steps: ${p.steps}`,
    `Sampler: ${SAMPLER_LABELS[p.scheduler]}`,
    `CFG scale: ${p.guidance}`,
    `Seed: ${p.seed}`,
    `Size: ${p.width}x${p.height}`,
    `Model: ${p.model}`,
  ];
  if (p.eta) settings.push(`Eta: ${p.eta}`);
  return [p.prompt, ...(p.negativePrompt ? [`Negative prompt: ${p.negativePrompt}`] : []), settings.join(', ')].join('\n');
}

/** numpy's round (half to even) of the float32 product x * 255, as diffusers' numpy_to_pil computes it. */
function toUint8(x: number): number {
  const v = Math.fround(x * 255);
  let r = Math.round(v);
  if (r - v === 0.5 && r % 2 !== 0) r -= 1; // Math.round rounds .5 up; numpy rounds to even
  return Math.min(255, Math.max(0, r));
}

/** One replaced token position: text-encoder batch row, position, and the vector that goes there. */
interface Replacement {
  row: number;
  position: number;
  vector: Float32Array;
}

/**
 * Placeholders are split out of the raw text wherever they occur, as transformers does with added
 * tokens, so a word-like placeholder ("me") is also replaced inside a longer word ("home"). Warn
 * about each such occurrence rather than guess what was meant.
 */
function warnInsideWords(text: string, what: string, placeholders: string[], warnings: string[]): void {
  const wordChar = /[\p{L}\p{N}_]/u;
  for (const p of placeholders) {
    const edges = [wordChar.test(p[0]), wordChar.test(p[p.length - 1])];
    if (!edges[0] && !edges[1]) continue;
    for (let i = text.indexOf(p); i >= 0; i = text.indexOf(p, i + p.length)) {
      const before = i > 0 && edges[0] && wordChar.test(text[i - 1]);
      const after = i + p.length < text.length && edges[1] && wordChar.test(text[i + p.length]);
      if (!before && !after) continue;
      const start = text.slice(0, i).search(/[\p{L}\p{N}_]*$/u);
      const end = i + p.length + (text.slice(i + p.length).match(/^[\p{L}\p{N}_]*/u)?.[0].length ?? 0);
      const message = `The placeholder ${JSON.stringify(p)} occurs inside the word ${JSON.stringify(text.slice(start, end))} of the ${what} ${describeValue(text)} and is replaced there too; a placeholder such as "<${p}>" avoids this`;
      if (!warnings.includes(message)) warnings.push(message);
    }
  }
}

/**
 * Token ids [texts, 77]; with placeholders active, each occurrence takes N positions (encodePrompt)
 * and `replacements` gets the vectors for them (rows numbered from `firstRow`). `used[i]` says
 * whether text i holds any placeholder; `usedPlaceholders` lists those some text holds.
 */
function ids(
  pipeline: Pipeline, texts: string[], what: string, warnings: string[],
  inversions: Map<string, Inversion>, replacements: Replacement[], firstRow: number,
): { ids: BigInt64Array; used: boolean[]; usedPlaceholders: Set<string> } {
  const out = new BigInt64Array(texts.length * CLIP_MAX_LENGTH);
  // sorted, so that the same set of placeholders splits a prompt the same way in any order
  const placeholders = [...inversions.keys()].sort();
  const placeholderLengths = Object.fromEntries([...inversions].map(([p, inv]) => [p, inv.n]));
  const used: boolean[] = [];
  const usedPlaceholders = new Set<string>();
  texts.forEach((text, b) => {
    let inputIds: number[], truncated: boolean, truncatedText: string | undefined;
    if (placeholders.length === 0) {
      ({ inputIds, truncated, truncatedText } = pipeline.tokenizer.call(text));
      used.push(false);
    } else {
      warnInsideWords(text, what, placeholders, warnings);
      const e = pipeline.tokenizer.encodePrompt(text, { placeholders, placeholderLengths });
      ({ ids: inputIds, truncated, truncatedText } = e);
      let any = false;
      for (const p of placeholders) {
        const inv = inversions.get(p)!;
        const hidden = inv.vectors.length / inv.n;
        // an N-vector placeholder lists N consecutive positions per occurrence: vector i % N goes to the i-th
        e.placeholderPositions[p].forEach((position, i) => {
          const k = i % inv.n;
          replacements.push({ row: firstRow + b, position, vector: inv.vectors.subarray(k * hidden, (k + 1) * hidden) });
          usedPlaceholders.add(p);
          any = true;
        });
      }
      used.push(any);
    }
    if (inputIds.length !== CLIP_MAX_LENGTH) throw new SingleInsertError(`The tokenizer gave ${inputIds.length} ids for the ${what}, expected ${CLIP_MAX_LENGTH}`);
    if (truncated) {
      // diffusers' wording (pipeline_stable_diffusion.py encode_prompt)
      warnings.push(`The following part of your ${what} was truncated because CLIP can only handle sequences up to ${CLIP_MAX_LENGTH} tokens: ${truncatedText}`);
    }
    inputIds.forEach((id, i) => (out[b * CLIP_MAX_LENGTH + i] = BigInt(id)));
  });
  return { ids: out, used, usedPlaceholders };
}

/** Rows [start, start+count) of a [N, ...] float32 tensor, each repeated `times` times (num_images_per_prompt). */
function rowsRepeated(t: NativeTensor, start: number, count: number, times: number): Tensor {
  const row = t.shape.slice(1).reduce((a, b) => a * b, 1);
  const src = t.data as Float32Array;
  const out = new Float32Array(count * times * row);
  for (let i = 0; i < count; i++) {
    for (let k = 0; k < times; k++) out.set(src.subarray((start + i) * row, (start + i + 1) * row), (i * times + k) * row);
  }
  return { dtype: 'F32', shape: [count * times, ...t.shape.slice(1)], data: out };
}

/**
 * Generates images. Rejects with a SingleInsertError for invalid options (before any native
 * work), with an AbortError when `run.signal` aborts, and with the native error otherwise. The
 * pipeline stays usable after any of these; concurrent calls are queued on the models' locks.
 */
export async function generate(pipeline: Pipeline, options: GenerateOptions, run: GenerateRunOptions = {}): Promise<GenerateResult> {
  const stack = new Error();
  const v = validate(pipeline, options, run);
  const { signal } = v;
  if (signal?.aborted) throw new AbortError();
  // fail before any work when a model was disposed
  pipeline.unet.nativeHandle();
  pipeline.vae.nativeHandle();
  pipeline.textEncoder.nativeHandle();

  // 3. encode input prompt: one text-encoder batch [negatives; prompts] (only prompts without guidance).
  // Tokenising first: an unknown placeholder is refused before any adapter is attached.
  const warnings: string[] = [...v.conceptWarnings];
  const P = v.prompts.length;
  const guided = v.guidance > 1; // diffusers' do_classifier_free_guidance
  const replacements: Replacement[] = [];
  const negative = guided ? ids(pipeline, v.negatives, 'negative prompt', warnings, v.inversions, replacements, 0) : undefined;
  const prompt = ids(pipeline, v.prompts, 'prompt', warnings, v.inversions, replacements, guided ? P : 0);
  const promptIds = prompt.ids;
  const negativeIds = negative?.ids;
  if (v.inversions.size > 0) {
    const names = [...v.inversions.keys()].map((p) => JSON.stringify(p)).join(', ');
    const unused = [...new Set(v.prompts.filter((_, i) => !prompt.used[i]))];
    for (const text of unused) warnings.push(`The prompt ${describeValue(text)} uses none of the placeholders ${names}: no learned embedding enters it`);
    if (unused.length < v.prompts.length) {
      // some prompt uses a placeholder: name the placeholders no prompt (nor negative prompt) uses
      for (const [p, inv] of v.inversions) {
        if (!prompt.usedPlaceholders.has(p) && !negative?.usedPlaceholders.has(p)) warnings.push(`The placeholder ${JSON.stringify(p)} of ${inv.source} appears in no prompt: its embedding does not enter the image`);
      }
    }
  }
  return withAdapters(pipeline, v.adapters, () => sample(pipeline, v, stack, { promptIds, negativeIds, replacements, warnings }), signal);
}

/** Steps 3 (text encoder) to 9 of a validated call, with its adapters (if any) attached. */
async function sample(
  pipeline: Pipeline, v: Validated, stack: Error,
  text: { promptIds: BigInt64Array; negativeIds?: BigInt64Array; replacements: Replacement[]; warnings: string[] },
): Promise<GenerateResult> {
  const { signal } = v;
  const { promptIds, negativeIds, replacements, warnings } = text;
  const unet = pipeline.unet.nativeHandle();
  const vae = pipeline.vae.nativeHandle();
  const P = v.prompts.length;
  const guided = negativeIds !== undefined;
  const allIds = negativeIds ? new BigInt64Array([...negativeIds, ...promptIds]) : promptIds;
  const textIds: Tensor = { dtype: 'I64', shape: [allIds.length / CLIP_MAX_LENGTH, CLIP_MAX_LENGTH], data: allIds };
  let replace: { index: Tensor; values: Tensor } | undefined;
  if (replacements.length > 0) {
    const hidden = replacements[0].vector.length;
    const index = new BigInt64Array(replacements.length * 2);
    const values = new Float32Array(replacements.length * hidden);
    replacements.forEach((r, i) => {
      index[2 * i] = BigInt(r.row);
      index[2 * i + 1] = BigInt(r.position);
      values.set(r.vector, i * hidden);
    });
    replace = { index: { dtype: 'I64', shape: [replacements.length, 2], data: index }, values: { dtype: 'F32', shape: [replacements.length, hidden], data: values } };
  }
  if (signal?.aborted) throw new AbortError();
  const embeds = await pipeline.encodeIds(textIds, replace);
  if (signal?.aborted) throw new AbortError();
  const promptEmbeds = rowsRepeated(embeds, guided ? P : 0, P, v.numImages);
  const negativeEmbeds = guided ? rowsRepeated(embeds, 0, P, v.numImages) : undefined;

  // 5.-8. latents, denoising loop and decode, natively
  let callbackError: { error: unknown } | undefined;
  const onNativeProgress = v.onProgress
    ? (step: number, total: number, elapsedSec: number) => {
        if (callbackError) return;
        const itPerSec = elapsedSec > 0 ? step / elapsedSec : 0;
        const etaSec = itPerSec > 0 ? (total - step) / itPerSec : 0;
        try {
          v.onProgress!({ step, steps: total, elapsedSec, itPerSec, etaSec });
        } catch (error) {
          callbackError = { error };
          job.cancel();
        }
      }
    : undefined;
  const job = native().generate(
    unet,
    vae,
    {
      promptEmbeds, negativeEmbeds, guidance: v.guidance, steps: v.steps, scheduler: v.scheduler, schedulerConfig: v.schedulerConfig,
      eta: v.eta, height: v.height, width: v.width, latents: v.latents, seed: v.seed, returnIntermediates: v.returnIntermediates,
      recordAttention: v.attentionTokenIndex
        ? { tokenIndex: { dtype: 'I64', shape: [v.attentionTokenIndex.length], data: BigInt64Array.from(v.attentionTokenIndex, (i) => BigInt(i)) } }
        : undefined,
    },
    onNativeProgress,
  );
  const onAbort = () => job.cancel();
  signal?.addEventListener('abort', onAbort, { once: true });
  let raw;
  try {
    raw = await withCallerStack(job.promise, stack);
  } catch (e) {
    if (callbackError) throw callbackError.error;
    if ((e as { cancelled?: boolean }).cancelled || signal?.aborted) throw new AbortError();
    throw e;
  } finally {
    signal?.removeEventListener('abort', onAbort);
  }
  if (callbackError) throw callbackError.error;
  if (signal?.aborted) throw new AbortError();
  warnings.push(...(raw.warnings ?? [])); // e.g. an fp16 VAE decode redone in fp32

  // 9. postprocess: float NHWC -> per-image float and uint8 copies
  const { width, height } = v;
  const pixels = width * height * 3;
  const all = raw.images.data as Float32Array;
  const model = modelLabel(pipeline.modelPath);
  const images: GeneratedImage[] = [];
  for (let b = 0; b < P * v.numImages; b++) {
    const float = all.slice(b * pixels, (b + 1) * pixels);
    const rgb = new Uint8Array(pixels);
    for (let i = 0; i < pixels; i++) rgb[i] = toUint8(float[i]);
    const p = Math.floor(b / v.numImages);
    const prompt = v.prompts[p];
    const negativePrompt = guided ? v.negatives[p] : '';
    const parameters = formatParameters({ prompt, negativePrompt, steps: v.steps, scheduler: v.scheduler, guidance: v.guidance, seed: v.seed, width, height, model, eta: v.eta });
    images.push({ width, height, rgb, float, prompt, negativePrompt, index: b, parameters });
  }
  const result: GenerateResult = { images, seed: v.seed, parameters: images[0].parameters, latents: raw.latents, warnings };
  if (raw.attention_maps) result.attentionMaps = raw.attention_maps;
  if (v.returnIntermediates) {
    const C = embeds.shape[2];
    const slice = (start: number): NativeTensor => ({ dtype: 'F32', shape: [P, CLIP_MAX_LENGTH, C], data: (embeds.data as Float32Array).slice(start * CLIP_MAX_LENGTH * C, (start + P) * CLIP_MAX_LENGTH * C) });
    const inter: Record<string, NativeTensor> = { prompt_ids: { dtype: 'I64', shape: [P, CLIP_MAX_LENGTH], data: promptIds } };
    if (negativeIds) inter.negative_prompt_ids = { dtype: 'I64', shape: [P, CLIP_MAX_LENGTH], data: negativeIds };
    inter.prompt_embeds = slice(guided ? P : 0);
    if (guided) inter.negative_prompt_embeds = slice(0);
    if (v.inversions.size > 0) {
      inter.text_input_ids = textIds as NativeTensor;
      const hidden = C;
      inter.replace_index = (replace?.index ?? { dtype: 'I64', shape: [0, 2], data: new BigInt64Array(0) }) as NativeTensor;
      inter.replace_values = (replace?.values ?? { dtype: 'F32', shape: [0, hidden], data: new Float32Array(0) }) as NativeTensor;
    }
    result.intermediates = { ...inter, ...raw.intermediates };
  }
  return result;
}

/** PNG bytes of a generated image with its A1111 `parameters` text chunk. */
export function toPng(image: Pick<GeneratedImage, 'width' | 'height' | 'rgb'>, parameters?: string): Promise<Buffer> {
  if (parameters !== undefined && typeof parameters !== 'string') return Promise.reject(invalidParameterError('parameters', 'a string', parameters));
  return encodePng(image, parameters === undefined ? {} : { parameters });
}
