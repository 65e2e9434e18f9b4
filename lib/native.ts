import * as fs from 'node:fs';
import * as path from 'node:path';
import { types } from 'node:util';
import { SingleInsertError } from './errors';

/** A tensor as it crosses the native boundary. F16/BF16 travel as Uint16Array bit patterns. */
export type DType = 'F64' | 'F32' | 'F16' | 'BF16' | 'I64' | 'I32' | 'I16' | 'I8' | 'U8' | 'BOOL';
export type TypedArray = Float32Array | Float64Array | BigInt64Array | Int32Array | Int16Array | Int8Array | Uint8Array | Uint16Array;
export interface Tensor {
  dtype?: DType;
  shape: number[];
  data: TypedArray;
}
export interface NativeTensor extends Tensor {
  dtype: DType;
}

/** A CUDA device as buildInfo() describes it. */
export interface CudaDeviceInfo {
  index: number;
  name: string;
  /** "9.0" for an H100 */
  computeCapability: string;
  totalMemoryBytes: number;
  multiProcessors: number;
}

export interface BuildInfo {
  torchVersion: string;
  torchSource: 'LIBTORCH' | 'python' | 'system';
  cudaAvailable: boolean;
  cudaDeviceCount: number;
  /** built against a CUDA libtorch with the CUDA extras (device properties, allocator statistics) */
  cudaExtras: boolean;
  /** every visible CUDA device (empty without CUDA or without the extras) */
  cudaDevices: CudaDeviceInfo[];
  buildType: string;
  threads: number;
  interopThreads: number;
  parallelInfo: string;
  napiVersion: number;
}

export interface NativeModelHandle {
  readonly kind: string;
  readonly loadedTensors: number;
  run(method: string, inputs: Record<string, Tensor>): Promise<Record<string, NativeTensor>>;
  /** every parameter, copied, in its own dtype */
  stateDict(): Promise<Record<string, NativeTensor>>;
  dispose(): void;
}

/**
 * Memory of a device (native/device_info.h): the CUDA caching allocator's numbers for a CUDA device
 * (null on the CPU or without the CUDA extras), and the process's peak resident set size.
 */
export interface MemoryStats {
  /** peak bytes in tensors since the last resetPeakMemory (or since the trainer's init) */
  peakAllocatedBytes: number | null;
  allocatedBytes: number | null;
  reservedBytes: number | null;
  /** getrusage's ru_maxrss: the whole process, never reset */
  peakRssBytes: number | null;
}

/** native/generate.cc: options of one generation job (lib/generate.ts validates them first). */
export interface NativeGenerateOptions {
  /** [B, 77, C] text encoder output for the prompts */
  promptEmbeds: Tensor;
  /** [B, 77, C] for the negative prompts; required when guidance > 1 (classifier-free guidance) */
  negativeEmbeds?: Tensor;
  guidance: number;
  steps: number;
  scheduler: string;
  /** JSON text of the config resolved for `scheduler` (lib/schedulers.ts resolveSchedulerConfig) */
  schedulerConfig: string;
  eta?: number;
  height: number;
  width: number;
  /** initial latents [B, 4, H/8, W/8]; otherwise drawn from `seed` */
  latents?: Tensor;
  seed?: number;
  returnIntermediates?: boolean;
  /** record the cross-attention map of one prompt position per image (int64 [B]) into `attention_maps` */
  recordAttention?: { tokenIndex: Tensor };
  /** decode with float32 VAE weights whatever the VAE's dtype (A1111's --no-half-vae); default false */
  vaeFloat32?: boolean;
}
export interface NativeGenerateResult {
  /** [B, H, W, 3] float32 in [0, 1] */
  images: NativeTensor;
  /** final latents [B, 4, H/8, W/8] float32 */
  latents: NativeTensor;
  /** e.g. an fp16 VAE decode that overflowed and was redone in fp32 */
  warnings: string[];
  /** with returnIntermediates: timesteps, initial_latents, unet_inputs, unet_outputs, noise_pred_guided, latents_after_step, decoded_raw */
  intermediates?: Record<string, NativeTensor>;
  /** with recordAttention: [B, H/8, W/8] float32, the token's cross-attention summed over layers and steps */
  attention_maps?: NativeTensor;
}
/** A running generation: `cancel()` makes `promise` reject (error.cancelled === true) before the next UNet call. */
export interface NativeGenerateJob {
  promise: Promise<NativeGenerateResult>;
  cancel(): void;
}

/** The raw addon surface. Use the typed wrappers in lib/ rather than this directly. */
export interface NativeAddon {
  buildInfo(): BuildInfo;
  readSafetensors(path: string, headerOnly?: boolean): Promise<{ metadata: Record<string, string>; tensors: Record<string, any> }>;
  writeSafetensors(path: string, tensors: Record<string, Tensor>, metadata?: Record<string, string>): Promise<void>;
  /**
   * weights.random = seed: no files, every weight drawn natively (native/random_init.h), for
   * benchmarks at full size. options.channelsLast: the UNet in channels-last memory order (other kinds ignore it).
   */
  loadModel(
    kind: string,
    configJson: string,
    weights: { files: string[]; map?: Array<[string, number, string, boolean?]>; random?: number },
    options?: { device?: string; dtype?: 'F32' | 'F16' | 'BF16'; channelsLast?: boolean },
  ): Promise<NativeModelHandle>;
  /** see MemoryStats; device "cpu", "cuda" or "cuda:N" */
  memoryStats(device: string): MemoryStats;
  /** starts a new CUDA peak for memoryStats (no-op on the CPU) */
  resetPeakMemory(device: string): void;
  /**
   * libtorch's process-wide CUDA math switches; returns the values before the call. tf32 sets TF32
   * for cuDNN convs and cuBLAS matmuls together (defaults, as PyTorch: convs on, matmuls off).
   */
  mathOptions(options?: { tf32?: boolean; cudnnBenchmark?: boolean }): { tf32CuDNN: boolean; tf32CuBLAS: boolean; cudnnBenchmark: boolean };
  describeModel(kind: string, configJson: string): Array<[string, number[]]>;
  /** onProgress(step, total, elapsedSec) after each UNet call, always before the promise settles */
  generate(
    unet: NativeModelHandle,
    vae: NativeModelHandle,
    options: NativeGenerateOptions,
    onProgress?: (step: number, total: number, elapsedSec: number) => void,
  ): NativeGenerateJob;
  /** at::randn(shape) float32 on a CPU generator seeded with `seed` (= torch.Generator().manual_seed(seed)) */
  seededRandn(shape: number[], seed: number): NativeTensor;
  /** SingleInsert training (native/train_bindings.cc); use lib/train.ts rather than this directly. */
  Trainer: new (options: NativeTrainerOptions) => NativeTrainer;
  /** The computation of the singleinsert_losses golden case (native/train.h), for parity tests. */
  singleinsertLossCase(options: NativeLossCaseOptions): Promise<Record<string, NativeTensor>>;
}

export interface NativeTrainerOptions {
  unet: NativeModelHandle;
  vae: NativeModelHandle;
  textEncoder: NativeModelHandle;
  /** resolved clip_vision config plus `head_out` (the text encoder's hidden size), as JSON */
  encoderConfig: string;
  /** a CLIPVisionModelWithProjection (or SingleInsert encoder) safetensors file; absent = seeded random init */
  encoderWeights?: string;
  /** resolved "ddpm" scheduler config (lib/schedulers.ts), as JSON */
  scheduleConfig: string;
  /** [1, 3, R, R] in [-1, 1] */
  image: Tensor;
  /** [1, 1, R/8, R/8] in [0, 1] */
  maskLatent: Tensor;
  /** [1, 3, S, S], CLIP-normalised */
  encoderPixels: Tensor;
  /** int64 [1, 77]: "* class" and "class" */
  idsStar: Tensor;
  idsClass: Tensor;
  placeholderPositions: number[];
  gamma?: number;
  eta?: number;
  fgNorm?: 'mean' | 'mask';
  seed: number;
  /** recompute the UNet's blocks in backward (less memory, same results); default false */
  gradCheckpointing?: boolean;
}

/** The models' dtypes a trainer found, and whether it scales the loss (any fp16 model). */
export interface TrainerPrecision {
  unet: 'fp32' | 'bf16' | 'fp16';
  vae: 'fp32' | 'bf16' | 'fp16';
  textEncoder: 'fp32' | 'bf16' | 'fp16';
  lossScaling: boolean;
}

export interface TrainLosses {
  fg: number;
  bg: number;
  sm: number;
  total: number;
}

export interface NativeTrainerState {
  /** the optimizer's stage: 2 once startStage2 ran */
  stage: 1 | 2;
  /** completed steps of stage I and stage II */
  stepsDone: [number, number];
  lora: { rank: number; alpha: number } | null;
}

export interface NativeTrainer {
  init(): Promise<{ latentShape: number[]; hidden: number; encoderParameters: number; state: NativeTrainerState; precision: TrainerPrecision }>;
  /**
   * One AdamW step; `step` is the step's index in its stage and must equal stepsDone[stage-1]. t and
   * noise are drawn from (seed, stage, step), unless a fixed batch (timesteps int64 [B], noise
   * [B, 4, h, w]) is given.
   */
  step(options: { stage: 1 | 2; batch: number; microBatch?: number; lr: number; step: number; timesteps?: Tensor; noise?: Tensor; returnGradients?: boolean }): Promise<NativeStepResult>;
  startStage2(options: { rank: number; alpha?: number }): Promise<{ modules: number; parameters: number; state: NativeTrainerState }>;
  /** the current stage's losses on a fixed batch (timesteps int64 [B], noise [B, 4, h, w]), no update */
  evaluate(options: { timesteps: Tensor; noise: Tensor; microBatch?: number }): Promise<TrainLosses>;
  /** the placeholder embedding [1, hidden] */
  embedding(): Promise<NativeTensor>;
  saveCheckpoint(dir: string, metaJson: string): Promise<void>;
  loadCheckpoint(dir: string): Promise<{ state: NativeTrainerState; meta: string }>;
  /** writes embedding.safetensors, lora.safetensors (after stage II started) and encoder.safetensors; returns their paths */
  exportConcept(dir: string, metadata: Record<string, string>): Promise<string[]>;
  /** removes the trainer's LoRA from the shared models; returns the adapters removed */
  dispose(): Promise<number>;
}

/** One trainer step's result. */
export interface NativeStepResult {
  losses: TrainLosses;
  /** before clipping (unscaled) */
  gradNorm: number;
  /** fp16: the gradients held inf/NaN, so the update was skipped (and the loss scale halved) */
  skipped: boolean;
  /** fp16: the loss scale of this step; null without loss scaling */
  lossScale: number | null;
  /** the device's memory after the step (CUDA peak since the trainer's init) */
  memory: MemoryStats;
  state: NativeTrainerState;
  /** with returnGradients: every trainable parameter's gradient by checkpoint key (unscaled, before clipping) */
  gradients?: Record<string, NativeTensor>;
}

export interface NativeLossCaseOptions {
  unet: NativeModelHandle;
  vae: NativeModelHandle;
  textEncoder: NativeModelHandle;
  scheduleConfig: string;
  image: Tensor;
  /** [H, W] full-resolution 0/1 mask (resized nearest), or `mask` [1, 1, h, w] */
  mask_fullres?: Tensor;
  mask?: Tensor;
  timesteps: Tensor;
  noise: Tensor;
  input_ids_star: Tensor;
  input_ids_class: Tensor;
  v: Tensor;
  /** kohya LoRA file applied to the UNet for L_sm */
  lora: string;
  lora_target_keys: string[];
  star_token_id?: number;
  /** run the UNet's blocks through gradient checkpointing (the same results) */
  gradCheckpointing?: boolean;
}

export const packageRoot = path.resolve(__dirname, fs.existsSync(path.resolve(__dirname, '..', 'package.json')) ? '..' : '../..');
export const addonPath = path.join(packageRoot, 'build', 'Release', 'singleinsert_native.node');

let cached: NativeAddon | undefined;

/**
 * Loads the addon once. When it is missing or cannot load, the error says why and gives the one
 * command that fixes it.
 */
export function native(): NativeAddon {
  if (cached) return cached;
  if (!fs.existsSync(addonPath)) {
    throw new SingleInsertError(
      `The native addon is not built (expected ${addonPath}). Run \`npm run build\` in ${packageRoot}: it installs libtorch if needed and builds the addon.`,
    );
  }
  try {
    // eslint-disable-next-line @typescript-eslint/no-var-requires
    cached = require(addonPath) as NativeAddon;
  } catch (e) {
    const reason = e instanceof Error ? e.message : String(e);
    throw new SingleInsertError(
      `The native addon at ${addonPath} failed to load: ${reason}. Rebuild it against the installed libtorch with \`npm run build\` in ${packageRoot}.`,
      { cause: e },
    );
  }
  return cached;
}

/**
 * Awaits a native promise and, on failure, appends the caller's stack (captured before the
 * native call) so that errors point at user code rather than at an empty async frame.
 */
export async function withCallerStack<T>(promise: Promise<T>, callerStack: Error): Promise<T> {
  try {
    return await promise;
  } catch (e) {
    // (isNativeError, not instanceof: errors made by the addon can come from another realm, e.g. under jest)
    if ((e instanceof Error || types.isNativeError(e)) && callerStack.stack) {
      const err = e as Error;
      err.stack = `${err.name}: ${err.message}\n${callerStack.stack.split('\n').slice(1).join('\n')}`;
    }
    throw e;
  }
}
