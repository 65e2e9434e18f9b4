/**
 * LoRA on a loaded UNet or CLIP text encoder, in kohya sd-scripts' `networks.lora` format (the
 * format of nearly every SD v1.5 LoRA file): keys `lora_unet_<module path>` / `lora_te_<module path>`
 * with `.lora_down.weight`, `.lora_up.weight` and `.alpha`. The adapters live on the model's layers
 * (native/lora.h); each model keeps its own, and LoRA calls queue behind running jobs of that model.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { invalidParameterError, SingleInsertError } from './errors';
import { Model } from './models';
import { native, NativeModelHandle, NativeTensor, Tensor, withCallerStack } from './native';

export type LoraPrefix = 'lora_unet' | 'lora_te';

export interface ApplyLoraOptions {
  /** strength: the update is `scale * (alpha / rank) * up @ down`. Default 1. */
  scale?: number;
  /** refuse keys that target nothing in the model (default true); false skips and reports them */
  strict?: boolean;
  /** key prefix to use; default lora_unet for a unet, lora_te for a clip_text model */
  prefix?: LoraPrefix;
  /** names this LoRA among several on one model (default "default") */
  name?: string;
}

/** What one model took from a LoRA. */
export interface LoraReport {
  name: string;
  prefix: LoraPrefix;
  /** adapters attached */
  modules: number;
  /** keys used (down, up and alpha) */
  tensors: number;
  /** keys in the file */
  fileTensors: number;
  /** keys for the other SD v1.x model (lora_te_* when applying to the UNet) */
  otherTensors: number;
  /** adapters without an alpha key (alpha = rank) */
  missingAlpha: number;
  /** keys that target nothing in this model (only when strict is false) */
  unknownKeys: string[];
}

/** What several models together took from one LoRA. */
export interface LoraApplyResult {
  name: string;
  modules: number;
  tensors: number;
  fileTensors: number;
  /** keys no model here used and no model refused: the other model's keys when only one was given */
  unusedTensors: number;
  /** union of the models' unknown keys, sorted */
  unknownKeys: string[];
  models: LoraReport[];
}

export interface CreateLoraOptions {
  rank: number;
  /** default: rank (multiplier 1) */
  alpha?: number;
  name?: string;
  /** seeds the CPU generator, so the same seed gives the same adapters on every device */
  seed?: number;
  /** how `down` starts (`up` starts at zero): kohya's kaiming_uniform (default) or PEFT's gaussian */
  init?: 'kaiming_uniform' | 'gaussian';
  prefix?: LoraPrefix;
}

export interface SetLoraOptions {
  /** the LoRA to change; default: every LoRA on the model */
  name?: string;
  scale?: number;
  enabled?: boolean;
  /** fold the adapters into the weights for faster inference (true), or take them out again (false) */
  merged?: boolean;
}

interface LoraNativeHandle extends NativeModelHandle {
  applyLora(source: string | Record<string, Tensor>, options: { prefix?: string; scale: number; strict: boolean; name: string }): Promise<LoraReport>;
  createLora(options: CreateLoraOptions & { name: string }): Promise<{ name: string; prefix: LoraPrefix; modules: number; parameters: number }>;
  setLora(options: SetLoraOptions): Promise<number>;
  clearLora(name?: string): Promise<number>;
  collectLora(options: { prefix?: string; name: string }): Promise<Record<string, NativeTensor>>;
}

const PREFIXES: LoraPrefix[] = ['lora_unet', 'lora_te'];

function loraHandle(model: unknown, what: string): LoraNativeHandle {
  if (!(model instanceof Model)) throw invalidParameterError(what, 'a Model from loadComponent or loadPipeline', model);
  if (model.kind !== 'unet' && model.kind !== 'clip_text') {
    throw new SingleInsertError(`LoRA applies to unet and clip_text models, not to the ${model.kind} model from ${model.source}`);
  }
  return model.nativeHandle() as LoraNativeHandle;
}

function modelList(models: Model | Model[]): Model[] {
  const list = Array.isArray(models) ? models : [models];
  if (list.length === 0) throw invalidParameterError('models', 'a model or a non-empty array of models', models);
  return list;
}

function checkName(name: unknown, where = 'name'): string {
  if (typeof name !== 'string' || name.length === 0) throw invalidParameterError(where, 'a non-empty string', name);
  return name;
}

function checkPrefix(prefix: unknown): LoraPrefix | undefined {
  if (prefix !== undefined && !PREFIXES.includes(prefix as LoraPrefix)) throw invalidParameterError('prefix', 'one of lora_unet, lora_te', prefix);
  return prefix as LoraPrefix | undefined;
}

function checkScale(scale: unknown): number {
  if (typeof scale !== 'number' || !Number.isFinite(scale)) throw invalidParameterError('scale', 'a finite number', scale);
  return scale;
}

function checkOptions<T extends object>(options: T | undefined): T {
  if (options === undefined) return {} as T;
  if (options === null || typeof options !== 'object') throw invalidParameterError('options', 'an object', options);
  return options;
}

/**
 * Attaches a kohya LoRA (a .safetensors path, or its tensors) to one model or several (e.g.
 * `[pipeline.unet, pipeline.textEncoder]`). A file or key that does not fit is refused with the
 * key names and shapes, and leaves every model unchanged.
 */
export async function applyLora(models: Model | Model[], source: string | Record<string, Tensor>, options: ApplyLoraOptions = {}): Promise<LoraApplyResult> {
  const list = modelList(models);
  const handles = list.map((m, i) => loraHandle(m, Array.isArray(models) ? `models[${i}]` : 'model'));
  const opts = checkOptions(options);
  if (typeof source === 'string') {
    if (source.length === 0) throw invalidParameterError('source', 'a .safetensors path or an object of tensors', source);
    if (!fs.existsSync(source)) throw new SingleInsertError(`Cannot read the LoRA ${source}: file not found`);
  } else if (source === null || typeof source !== 'object' || Array.isArray(source)) {
    throw invalidParameterError('source', 'a .safetensors path or an object of tensors', source);
  }
  const scale = checkScale(opts.scale ?? 1);
  const strict = opts.strict ?? true;
  if (typeof strict !== 'boolean') throw invalidParameterError('strict', 'a boolean', strict);
  const prefix = checkPrefix(opts.prefix);
  if (prefix && list.length > 1) throw invalidParameterError('prefix', 'no prefix when applying to several models (each takes its own)', prefix);
  const name = checkName(opts.name ?? 'default');

  const stack = new Error();
  const reports: LoraReport[] = [];
  try {
    for (const handle of handles) reports.push(await withCallerStack(handle.applyLora(source, { prefix, scale, strict, name }), stack));
  } catch (e) {
    // all or nothing: take the LoRA off the models that already took it
    await Promise.all(handles.slice(0, reports.length).map((h) => h.clearLora(name)));
    throw e;
  }
  const unknown = [...new Set(reports.flatMap((r) => r.unknownKeys))].sort();
  const used = reports.reduce((n, r) => n + r.tensors, 0);
  return {
    name,
    modules: reports.reduce((n, r) => n + r.modules, 0),
    tensors: used,
    fileTensors: reports[0].fileTensors,
    unusedTensors: reports[0].fileTensors - used - unknown.length,
    unknownKeys: unknown,
    models: reports,
  };
}

/**
 * Attaches a new trainable LoRA: `down` random, `up` zero, so the model's output is unchanged until
 * it is trained. Returns how many adapters and parameters it made.
 */
export async function createLora(model: Model, options: CreateLoraOptions): Promise<{ name: string; prefix: LoraPrefix; modules: number; parameters: number }> {
  const handle = loraHandle(model, 'model');
  const opts = checkOptions(options);
  if (!Number.isInteger(opts.rank) || opts.rank < 1) throw invalidParameterError('rank', 'a positive integer', opts.rank);
  const alpha = opts.alpha ?? opts.rank;
  if (typeof alpha !== 'number' || !Number.isFinite(alpha) || alpha <= 0) throw invalidParameterError('alpha', 'a positive number', alpha);
  if (opts.seed !== undefined && (!Number.isSafeInteger(opts.seed) || opts.seed < 0)) throw invalidParameterError('seed', 'a non-negative integer', opts.seed);
  if (opts.init !== undefined && opts.init !== 'kaiming_uniform' && opts.init !== 'gaussian') {
    throw invalidParameterError('init', 'one of kaiming_uniform, gaussian', opts.init);
  }
  const args = { ...opts, alpha, prefix: checkPrefix(opts.prefix), name: checkName(opts.name ?? 'default') };
  const stack = new Error();
  return withCallerStack(handle.createLora(args), stack);
}

/** Changes the scale, enabled state or merged state of one LoRA (by name) or of all. Returns the adapters touched. */
export async function setLora(models: Model | Model[], options: SetLoraOptions): Promise<number> {
  const handles = modelList(models).map((m) => loraHandle(m, 'model'));
  const opts = checkOptions(options);
  if (opts.name !== undefined) checkName(opts.name);
  if (opts.scale !== undefined) checkScale(opts.scale);
  if (opts.enabled !== undefined && typeof opts.enabled !== 'boolean') throw invalidParameterError('enabled', 'a boolean', opts.enabled);
  if (opts.merged !== undefined && typeof opts.merged !== 'boolean') throw invalidParameterError('merged', 'a boolean', opts.merged);
  const stack = new Error();
  let n = 0;
  for (const h of handles) n += await withCallerStack(h.setLora(opts), stack);
  return n;
}

/** Removes one LoRA (by name) or every LoRA, restoring the base model. Returns the adapters removed. */
export async function clearLora(models: Model | Model[], name?: string): Promise<number> {
  const handles = modelList(models).map((m) => loraHandle(m, 'model'));
  if (name !== undefined) checkName(name);
  const stack = new Error();
  let n = 0;
  for (const h of handles) n += await withCallerStack(h.clearLora(name), stack);
  return n;
}

/** The adapters of one LoRA as kohya tensors (down, up, 0-dim F32 alpha). */
export async function collectLora(model: Model, options: { name?: string; prefix?: LoraPrefix } = {}): Promise<Record<string, NativeTensor>> {
  const handle = loraHandle(model, 'model');
  const opts = checkOptions(options);
  const stack = new Error();
  return withCallerStack(handle.collectLora({ prefix: checkPrefix(opts.prefix), name: checkName(opts.name ?? 'default') }), stack);
}

/**
 * Saves one LoRA of these models (usually the UNet and the text encoder) as one kohya file: sorted
 * keys, `alpha` as 0-dim F32, metadata `ss_network_module` = networks.lora, `ss_network_dim`,
 * `ss_network_alpha` (plus `metadata`). The file appears atomically.
 */
export async function saveLora(file: string, models: Model | Model[], options: { name?: string; metadata?: Record<string, string> } = {}): Promise<{ tensors: number }> {
  if (typeof file !== 'string' || file.length === 0) throw invalidParameterError('path', 'a non-empty file path string', file);
  const list = modelList(models);
  list.forEach((m, i) => loraHandle(m, Array.isArray(models) ? `models[${i}]` : 'model'));
  const opts = checkOptions(options);
  const name = checkName(opts.name ?? 'default');
  const metadata = opts.metadata ?? {};
  for (const [k, v] of Object.entries(metadata)) if (typeof v !== 'string') throw invalidParameterError(`metadata[${JSON.stringify(k)}]`, 'a string', v);
  const dir = path.dirname(path.resolve(file));
  if (!fs.existsSync(dir)) throw new SingleInsertError(`Cannot write ${file}: the folder ${dir} does not exist`);

  const tensors: Record<string, NativeTensor> = {};
  for (const m of list) Object.assign(tensors, await collectLora(m, { name }));
  const count = Object.keys(tensors).length;
  if (count === 0) throw new SingleInsertError(`No LoRA named "${name}" is attached to ${list.map((m) => `the ${m.kind} model`).join(' or ')}`);
  const stack = new Error();
  const addon = native() as unknown as { saveLora(file: string, tensors: Record<string, Tensor>, metadata: Record<string, string>): Promise<void> };
  await withCallerStack(addon.saveLora(file, tensors, metadata), stack);
  return { tensors: count };
}
