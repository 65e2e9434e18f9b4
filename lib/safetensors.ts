import * as fs from 'node:fs';
import * as path from 'node:path';
import { invalidParameterError, SingleInsertError } from './errors';
import { DType, native, NativeTensor, Tensor, TypedArray, withCallerStack } from './native';

export interface SafetensorsContents {
  metadata: Record<string, string>;
  tensors: Record<string, NativeTensor>;
}

export interface SafetensorsHeaderEntry {
  dtype: DType;
  shape: number[];
  byteLength: number;
}
export interface SafetensorsHeader {
  metadata: Record<string, string>;
  tensors: Record<string, SafetensorsHeaderEntry>;
}

const DTYPES: Record<DType, { bytes: number; arrays: string[] }> = {
  F64: { bytes: 8, arrays: ['Float64Array'] },
  F32: { bytes: 4, arrays: ['Float32Array'] },
  F16: { bytes: 2, arrays: ['Uint16Array'] },
  BF16: { bytes: 2, arrays: ['Uint16Array'] },
  I64: { bytes: 8, arrays: ['BigInt64Array'] },
  I32: { bytes: 4, arrays: ['Int32Array'] },
  I16: { bytes: 2, arrays: ['Int16Array'] },
  I8: { bytes: 1, arrays: ['Int8Array'] },
  U8: { bytes: 1, arrays: ['Uint8Array'] },
  BOOL: { bytes: 1, arrays: ['Uint8Array'] },
};

function checkPath(p: unknown, name: string): string {
  if (typeof p !== 'string' || p.length === 0) throw invalidParameterError(name, 'a non-empty file path string', p);
  return p;
}

/**
 * Reads every tensor of a .safetensors file (F16/BF16 as Uint16Array bit patterns, I64 as BigInt64Array).
 * Async like writeSafetensors: a bad argument rejects the promise instead of throwing synchronously.
 */
export async function readSafetensors(file: string): Promise<SafetensorsContents> {
  checkPath(file, 'path');
  const stack = new Error();
  return withCallerStack(native().readSafetensors(file), stack) as Promise<SafetensorsContents>;
}

/** Reads only the header: names, dtypes, shapes, byte lengths and metadata. */
export async function readSafetensorsHeader(file: string): Promise<SafetensorsHeader> {
  checkPath(file, 'path');
  const stack = new Error();
  return withCallerStack(native().readSafetensors(file, true), stack) as Promise<SafetensorsHeader>;
}

function defaultDtype(data: TypedArray): DType | undefined {
  const name = data.constructor.name;
  return (Object.keys(DTYPES) as DType[]).find((d) => DTYPES[d].arrays[0] === name && d !== 'BF16' && d !== 'BOOL');
}

/**
 * Writes tensors (sorted by name, header padded to 8 bytes) to a temp file, then renames it into
 * place, so a reader never sees half a file.
 */
export async function writeSafetensors(file: string, tensors: Record<string, Tensor>, metadata: Record<string, string> = {}): Promise<void> {
  checkPath(file, 'path');
  if (tensors === null || typeof tensors !== 'object') throw invalidParameterError('tensors', 'an object of { dtype?, shape, data }', tensors);
  for (const [name, t] of Object.entries(tensors)) {
    const where = `tensors[${JSON.stringify(name)}]`;
    if (t === null || typeof t !== 'object') throw invalidParameterError(where, 'an object { dtype?, shape, data }', t);
    if (!ArrayBuffer.isView(t.data) || t.data instanceof DataView) throw invalidParameterError(`${where}.data`, 'a typed array', t.data);
    const dtype = t.dtype ?? defaultDtype(t.data);
    if (!dtype || !(dtype in DTYPES)) throw invalidParameterError(`${where}.dtype`, `one of ${Object.keys(DTYPES).join(', ')}`, t.dtype);
    if (!DTYPES[dtype].arrays.includes(t.data.constructor.name)) {
      throw invalidParameterError(`${where}.data`, `a ${DTYPES[dtype].arrays[0]} for dtype ${dtype}`, t.data);
    }
    if (!Array.isArray(t.shape) || !t.shape.every((d) => Number.isInteger(d) && d >= 0)) {
      throw invalidParameterError(`${where}.shape`, 'an array of non-negative integers', t.shape);
    }
    const numel = t.shape.reduce((a, b) => a * b, 1);
    if (numel !== t.data.length) {
      throw new SingleInsertError(`Expected ${numel} elements for ${where}.data (shape [${t.shape}]) but received ${t.data.length}`);
    }
  }
  if (metadata === null || typeof metadata !== 'object') throw invalidParameterError('metadata', 'an object of strings', metadata);
  for (const [k, v] of Object.entries(metadata)) {
    if (typeof v !== 'string') throw invalidParameterError(`metadata[${JSON.stringify(k)}]`, 'a string', v);
  }
  const dir = path.dirname(path.resolve(file));
  if (!fs.existsSync(dir)) throw new SingleInsertError(`Cannot write ${file}: the folder ${dir} does not exist`);
  // Own keys only, on null-prototype objects: the addon enumerates like for...in, and a name such as
  // "__proto__" must stay an ordinary key (on a plain object it would replace the prototype).
  const withDtypes: Record<string, Tensor> = Object.create(null);
  for (const [name, t] of Object.entries(tensors)) withDtypes[name] = { ...t, dtype: t.dtype ?? defaultDtype(t.data) };
  const ownMetadata: Record<string, string> = Object.assign(Object.create(null), metadata);
  const stack = new Error();
  await withCallerStack(native().writeSafetensors(file, withDtypes, ownMetadata), stack);
}

/** Total element count of a shape. */
export function numel(shape: number[]): number {
  return shape.reduce((a, b) => a * b, 1);
}
