/**
 * Loading models into the native addon and calling them: one typed wrapper per loaded model,
 * and `loadPipeline`, which loads a whole SD v1.5 model (diffusers folder, hub id in the local
 * cache, or one original-layout checkpoint file).
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import * as yaml from 'js-yaml';
import { Concept, loadConceptForPipeline, LoadConceptOptions } from './concepts';
import { Config, ModelKind, readConfig, resolveConfig } from './config';
import { invalidParameterError, SingleInsertError } from './errors';
import { generate, GenerateOptions, GenerateResult, GenerateRunOptions } from './generate';
import { configsFromOriginalYaml, folderWeightMap, singleFileWeightMap, unknownSingleFileKeys, WeightMap } from './keymap';
import { componentWeightFiles, resolveModelPath } from './model-files';
import { native, NativeModelHandle, NativeTensor, packageRoot, Tensor, withCallerStack } from './native';
import { readSafetensorsHeader } from './safetensors';
import { bundledTokenizerDir, ClipTokenizer } from './tokenizer';

export type DTypeOption = 'fp32' | 'fp16' | 'bf16';
export interface LoadOptions {
  /** "cpu" (default), "cuda" or "cuda:N" */
  device?: string;
  /**
   * weights' dtype; files are converted on load. Default fp32. Latents, schedulers and losses stay
   * fp32 whatever this is. fp16 needs CUDA (libtorch's CPU kernels lack it); use bf16 on the CPU.
   */
  dtype?: DTypeOption;
  /** the UNet's conv weights and inputs in channels-last memory order: faster cuDNN kernels on CUDA with bf16/fp16. Default false. */
  channelsLast?: boolean;
}

const NATIVE_DTYPE: Record<DTypeOption, 'F32' | 'F16' | 'BF16'> = { fp32: 'F32', fp16: 'F16', bf16: 'BF16' };

export function validateLoadOptions(options: LoadOptions = {}): { device: string; dtype: 'F32' | 'F16' | 'BF16'; channelsLast: boolean } {
  if (options === null || typeof options !== 'object') throw invalidParameterError('options', 'an object', options);
  const device = options.device ?? 'cpu';
  if (typeof device !== 'string' || !/^(cpu|cuda(:\d+)?)$/.test(device)) throw invalidParameterError('device', '"cpu", "cuda" or "cuda:N"', device);
  const dtype = options.dtype ?? 'fp32';
  if (!(dtype in NATIVE_DTYPE)) throw invalidParameterError('dtype', 'one of fp32, fp16, bf16', dtype);
  const channelsLast = options.channelsLast ?? false;
  if (typeof channelsLast !== 'boolean') throw invalidParameterError('channelsLast', 'a boolean', channelsLast);
  if (device.startsWith('cuda') && !native().buildInfo().cudaAvailable) {
    throw new SingleInsertError(`Expected a CUDA device for device "${device}" but this build of the addon sees none (libtorch ${native().buildInfo().torchVersion} from ${native().buildInfo().torchSource})`);
  }
  return { device, dtype: NATIVE_DTYPE[dtype], channelsLast };
}

/** A model living in the addon. Calls are queued natively, so concurrent calls are safe. */
export class Model {
  constructor(
    readonly kind: ModelKind,
    readonly config: Config,
    readonly source: string,
    private handle: NativeModelHandle | null,
    /** the dtype its weights were loaded in */
    readonly dtype: DTypeOption = 'fp32',
    /** where it lives: "cpu", "cuda" or "cuda:N" */
    readonly device: string = 'cpu',
  ) {}

  get loadedTensors(): number {
    return this.handle?.loadedTensors ?? 0;
  }

  run(method: string, inputs: Record<string, Tensor>): Promise<Record<string, NativeTensor>> {
    if (!this.handle) return Promise.reject(new SingleInsertError(`The ${this.kind} model from ${this.source} was disposed`));
    const stack = new Error();
    return withCallerStack(this.handle.run(method, inputs), stack);
  }

  /** @internal The addon's handle, for native jobs that take several models (generation, training). */
  nativeHandle(): NativeModelHandle {
    if (!this.handle) throw new SingleInsertError(`The ${this.kind} model from ${this.source} was disposed`);
    return this.handle;
  }

  /** Every parameter under its state-dict key (a copy, in the model's dtype). */
  stateDict(): Promise<Record<string, NativeTensor>> {
    if (!this.handle) return Promise.reject(new SingleInsertError(`The ${this.kind} model from ${this.source} was disposed`));
    const stack = new Error();
    return withCallerStack(this.handle.stateDict(), stack);
  }

  dispose(): void {
    this.handle?.dispose();
    this.handle = null;
  }
}

async function loadNative(kind: ModelKind, config: Config, files: string[], map: WeightMap, source: string, options: LoadOptions): Promise<Model> {
  const opts = validateLoadOptions(options);
  const stack = new Error();
  // channels-last is a UNet switch (its convs dominate); the other models load as they are
  const handle = await withCallerStack(native().loadModel(kind, JSON.stringify(config), { files, map }, { ...opts, channelsLast: opts.channelsLast && kind === 'unet' }), stack);
  return new Model(kind, config, source, handle, options.dtype ?? 'fp32', opts.device);
}

/** Loads one component folder (config.json + safetensors weights, sharded or not). */
export async function loadComponent(kind: ModelKind, dir: string, options: LoadOptions = {}): Promise<Model> {
  const config = readConfig(kind, path.join(dir, 'config.json'));
  const { files } = componentWeightFiles(dir);
  const headers = await Promise.all(files.map((f) => readSafetensorsHeader(f)));
  const map = folderWeightMap(kind, headers.map((h) => Object.keys(h.tensors)));
  return loadNative(kind, config, files, map, dir, options);
}

/** Model keys and shapes for a config, built natively on the meta device (no memory). */
export function describeModel(kind: ModelKind, config: Config): Array<[string, number[]]> {
  return native().describeModel(kind, JSON.stringify(config));
}

export interface PipelineLoadOptions extends LoadOptions {
  /** single-file checkpoints: the original yaml config (default: SD v1.5's v1-inference.yaml values) */
  originalConfig?: string;
  /** single-file checkpoints: the text encoder's config.json (default: SD v1.5's CLIP ViT-L/14 text config) */
  textEncoderConfig?: string;
}

export interface SchedulerConfig {
  _class_name?: string;
  [key: string]: unknown;
}

/** The SD v1.5 models a generation or training run needs, loaded once and shared. */
export class Pipeline {
  constructor(
    readonly modelPath: string,
    readonly description: string,
    readonly unet: Model,
    readonly vae: Model,
    readonly textEncoder: Model,
    readonly tokenizer: ClipTokenizer,
    readonly schedulerConfig: SchedulerConfig,
  ) {}

  get scalingFactor(): number {
    return this.vae.config.scaling_factor as number;
  }

  /**
   * Text encoder output (`last_hidden_state` after the final layer norm, what SD conditions on)
   * for prompts or token ids [B,77]; `replace` puts vectors in place of the token embeddings at
   * (batch, position) pairs — how a learned placeholder embedding enters.
   */
  async encodeIds(inputIds: Tensor, replace?: { index: Tensor; values: Tensor }): Promise<NativeTensor> {
    const inputs: Record<string, Tensor> = { input_ids: inputIds };
    if (replace) {
      inputs.replace_index = replace.index;
      inputs.replace_values = replace.values;
    }
    const out = await this.textEncoder.run('forward', inputs);
    return out.last_hidden_state;
  }

  async encodePrompts(prompts: string[]): Promise<NativeTensor> {
    const ids = new BigInt64Array(prompts.length * 77);
    prompts.forEach((p, b) => {
      const { inputIds } = this.tokenizer.call(p);
      inputIds.forEach((id, i) => (ids[b * 77 + i] = BigInt(id)));
    });
    return this.encodeIds({ data: ids, shape: [prompts.length, 77] });
  }

  /**
   * Loads a SingleInsert concept folder for this pipeline (lib/concepts.ts): refuses an embedding of
   * another width than the text encoder's, and adds a warning to `concept.warnings` when the concept
   * was trained on another base model. `placeholder` renames its placeholder.
   */
  loadConcept(dir: string, options?: Omit<LoadConceptOptions, 'hiddenSize'>): Promise<Concept> {
    return loadConceptForPipeline(this, dir, options);
  }

  /** Text to image; see lib/generate.ts. */
  generate(options: GenerateOptions, run?: GenerateRunOptions): Promise<GenerateResult> {
    return generate(this, options, run);
  }

  dispose(): void {
    this.unet.dispose();
    this.vae.dispose();
    this.textEncoder.dispose();
  }
}

function readJson(file: string): any {
  try {
    return JSON.parse(fs.readFileSync(file, 'utf8'));
  } catch (e) {
    throw new SingleInsertError(`Cannot read ${file}: ${(e as NodeJS.ErrnoException).code === 'ENOENT' ? 'file not found' : (e as Error).message}`);
  }
}

const SD15_ASSETS = path.join(packageRoot, 'assets', 'sd15');

async function loadSingleFile(file: string, description: string, options: PipelineLoadOptions): Promise<Pipeline> {
  let unetCfg: Config, vaeCfg: Config, scheduler: Config;
  if (options.originalConfig) {
    let parsed: unknown;
    try {
      parsed = yaml.load(fs.readFileSync(options.originalConfig, 'utf8'));
    } catch (e) {
      throw new SingleInsertError(`Cannot read the original config ${options.originalConfig}: ${(e as Error).message}`);
    }
    try {
      ({ unet: unetCfg, vae: vaeCfg, scheduler } = configsFromOriginalYaml(parsed, options.originalConfig));
    } catch (e) {
      throw new SingleInsertError((e as Error).message);
    }
    unetCfg = resolveConfig('unet', unetCfg, options.originalConfig);
    vaeCfg = resolveConfig('vae', vaeCfg, options.originalConfig);
  } else {
    unetCfg = readConfig('unet', path.join(SD15_ASSETS, 'unet', 'config.json'));
    vaeCfg = readConfig('vae', path.join(SD15_ASSETS, 'vae', 'config.json'));
    scheduler = readJson(path.join(SD15_ASSETS, 'scheduler', 'scheduler_config.json'));
  }
  const textCfg = readConfig('clip_text', options.textEncoderConfig ?? path.join(SD15_ASSETS, 'text_encoder', 'config.json'));
  const header = await readSafetensorsHeader(file);
  const keys = Object.keys(header.tensors);
  const unknown = unknownSingleFileKeys(keys);
  if (unknown.length) {
    throw new SingleInsertError(`${file}: ${unknown.length} keys belong to no Stable Diffusion component (first: ${unknown.slice(0, 5).join(', ')}); is this an SD v1.x checkpoint?`);
  }
  const parts = [
    ['unet', 'unet', unetCfg],
    ['vae', 'vae', vaeCfg],
    ['clip_text', 'text_encoder', textCfg],
  ] as const;
  const models: Model[] = [];
  try {
    for (const [kind, component, cfg] of parts) {
      const map = singleFileWeightMap(component, describeModel(kind, cfg).map(([k]) => k), keys, cfg);
      models.push(await loadNative(kind, cfg, [file], map, `${file} (${component})`, options));
    }
  } catch (e) {
    models.forEach((m) => m.dispose());
    throw e;
  }
  return new Pipeline(file, description, models[0], models[1], models[2], ClipTokenizer.fromDir(bundledTokenizerDir()), scheduler as SchedulerConfig);
}

/** Loads UNet, VAE, text encoder, tokenizer and scheduler config of an SD v1.x model. */
export async function loadPipeline(modelPath: string, options: PipelineLoadOptions = {}): Promise<Pipeline> {
  validateLoadOptions(options);
  const resolved = resolveModelPath(modelPath);
  if (resolved.type === 'single-file') return loadSingleFile(resolved.path, resolved.description, options);
  const root = resolved.path;
  const index = readJson(path.join(root, 'model_index.json'));
  for (const [component, cls] of [['unet', 'UNet2DConditionModel'], ['vae', 'AutoencoderKL'], ['text_encoder', 'CLIPTextModel'], ['tokenizer', 'CLIPTokenizer']]) {
    const entry = index[component];
    if (!Array.isArray(entry) || entry[1] !== cls) {
      throw new SingleInsertError(`${path.join(root, 'model_index.json')}: expected "${component}": [..., "${cls}"] but found ${JSON.stringify(entry)} (only Stable Diffusion v1.x pipelines are supported)`);
    }
  }
  const unet = await loadComponent('unet', path.join(root, 'unet'), options);
  let vae: Model | undefined;
  let text: Model | undefined;
  try {
    vae = await loadComponent('vae', path.join(root, 'vae'), options);
    text = await loadComponent('clip_text', path.join(root, 'text_encoder'), options);
    const tokenizer = ClipTokenizer.fromDir(path.join(root, 'tokenizer'));
    const scheduler = readJson(path.join(root, 'scheduler', 'scheduler_config.json'));
    return new Pipeline(root, resolved.description, unet, vae, text, tokenizer, scheduler);
  } catch (e) {
    unet.dispose();
    vae?.dispose();
    text?.dispose();
    throw e;
  }
}
