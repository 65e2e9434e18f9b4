import * as fs from 'node:fs';
import * as path from 'node:path';
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

export interface BuildInfo {
  torchVersion: string;
  torchSource: 'LIBTORCH' | 'python' | 'system';
  cudaAvailable: boolean;
  cudaDeviceCount: number;
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

/** The raw addon surface. Use the typed wrappers in lib/ rather than this directly. */
export interface NativeAddon {
  buildInfo(): BuildInfo;
  readSafetensors(path: string, headerOnly?: boolean): Promise<{ metadata: Record<string, string>; tensors: Record<string, any> }>;
  writeSafetensors(path: string, tensors: Record<string, Tensor>, metadata?: Record<string, string>): Promise<void>;
  loadModel(
    kind: string,
    configJson: string,
    weights: { files: string[]; map?: Array<[string, number, string, boolean?]> },
    options?: { device?: string; dtype?: 'F32' | 'F16' | 'BF16' },
  ): Promise<NativeModelHandle>;
  describeModel(kind: string, configJson: string): Array<[string, number[]]>;
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
    if (e instanceof Error && callerStack.stack) {
      e.stack = `${e.name}: ${e.message}\n${callerStack.stack.split('\n').slice(1).join('\n')}`;
    }
    throw e;
  }
}
