/**
 * `convert`: PyTorch checkpoints (`.pth`, `.pt`, `.bin`, `.ckpt`; zip or legacy format) to one
 * `.safetensors` file, without Python and without executing the pickle (./pickle.ts refuses
 * everything but tensors and plain containers). Several inputs can be merged into one output, e.g.
 * torchvision's AlexNet (`features.*`) and lpips' `alex.pth` (`lin*.model.1.weight`) for the LPIPS
 * metric, or a transformers `pytorch_model.bin` on its own.
 *
 * Keys are the state dict's, nested dicts flattened with dots (a Lightning `.ckpt` gives
 * `state_dict.model.diffusion_model...`); `prefix` keeps only the keys under it and strips it.
 * Tensors keep their dtype and are written contiguous and little-endian (strided views are gathered,
 * shared storages are copied per tensor). The output is written through a temporary file and renamed
 * into place: a refused or failed conversion leaves no output behind.
 */
import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { SingleInsertError } from '../errors';
import { readSafetensors } from '../safetensors';
import { TensorRef, UnpicklingRefused } from './pickle';
import { openTorchCheckpoint, TorchCheckpoint } from './torch-zip';

export { UnpicklingRefused } from './pickle';

export interface ConvertOptions {
  /** keep only keys starting with this and strip it (e.g. "state_dict." or "module.") */
  prefix?: string;
  /** written to the safetensors header's __metadata__ (besides format: "pt") */
  metadata?: Record<string, string>;
}

export interface ConvertInputReport {
  file: string;
  format: 'zip' | 'legacy' | 'safetensors';
  tensors: number;
  /** keys dropped by `prefix` */
  dropped: number;
  /** non-tensor entries that were left out, e.g. "global_step (int)" */
  skipped: string[];
}

export interface ConvertReport {
  out: string;
  tensors: number;
  bytes: number;
  dtypes: Record<string, number>;
  inputs: ConvertInputReport[];
}

type DType = TensorRef['dtype'];
const ITEM_SIZE: Record<DType, number> = { F64: 8, F32: 4, F16: 2, BF16: 2, I64: 8, I32: 4, I16: 2, I8: 1, U8: 1, BOOL: 1 };

interface Planned {
  key: string;
  dtype: DType;
  shape: number[];
  bytes: number;
  read: () => Uint8Array;
}

interface Source {
  report: ConvertInputReport;
  entries: Planned[];
  close: () => void;
}

function keepKey(key: string, prefix: string | undefined): string | null {
  if (!prefix) return key;
  return key.startsWith(prefix) && key.length > prefix.length ? key.slice(prefix.length) : null;
}

async function openSource(file: string, prefix: string | undefined): Promise<Source> {
  if (/\.safetensors$/i.test(file)) {
    const { tensors } = await readSafetensors(file);
    const entries: Planned[] = [];
    let dropped = 0;
    for (const [name, t] of Object.entries(tensors)) {
      const key = keepKey(name, prefix);
      if (key === null) {
        dropped++;
        continue;
      }
      const bytes = new Uint8Array(t.data.buffer, t.data.byteOffset, t.data.byteLength);
      entries.push({ key, dtype: t.dtype as DType, shape: t.shape, bytes: bytes.length, read: () => bytes });
    }
    return { report: { file, format: 'safetensors', tensors: entries.length, dropped, skipped: [] }, entries, close: () => undefined };
  }
  const ckpt: TorchCheckpoint = openTorchCheckpoint(file);
  const entries: Planned[] = [];
  let dropped = 0;
  for (const [name, t] of ckpt.tensors) {
    const key = keepKey(name, prefix);
    if (key === null) {
      dropped++;
      continue;
    }
    const numel = t.shape.reduce((a, b) => a * b, 1);
    entries.push({ key, dtype: t.dtype, shape: t.shape, bytes: numel * ITEM_SIZE[t.dtype], read: () => ckpt.read(t) });
  }
  return { report: { file, format: ckpt.format, tensors: entries.length, dropped, skipped: ckpt.skipped }, entries, close: () => ckpt.close() };
}

/** The safetensors header: __metadata__ first, then the tensors in sorted order, padded with spaces to 8 bytes. */
function safetensorsHeader(entries: Planned[], metadata: Record<string, string>): Buffer {
  const header: Record<string, unknown> = { __metadata__: metadata };
  let offset = 0;
  for (const e of entries) {
    header[e.key] = { dtype: e.dtype, shape: e.shape, data_offsets: [offset, offset + e.bytes] };
    offset += e.bytes;
  }
  let json = Buffer.from(JSON.stringify(header), 'utf8');
  const padded = Math.ceil(json.length / 8) * 8;
  if (padded !== json.length) json = Buffer.concat([json, Buffer.alloc(padded - json.length, 0x20)]);
  const length = Buffer.alloc(8);
  length.writeBigUInt64LE(BigInt(json.length));
  return Buffer.concat([length, json]);
}

/**
 * Converts `inputs` (merged, in order) into one safetensors file `out`. Throws a SingleInsertError
 * naming the file and the reason for anything refused (disallowed globals, malformed or truncated
 * files, duplicate keys); `out` is then not created.
 */
export async function convertCheckpoints(inputs: string[], out: string, options: ConvertOptions = {}): Promise<ConvertReport> {
  if (!Array.isArray(inputs) || inputs.length === 0 || !inputs.every((f) => typeof f === 'string' && f.length > 0)) {
    throw new SingleInsertError('Expected at least one input checkpoint for convert');
  }
  if (typeof out !== 'string' || !out) throw new SingleInsertError('Expected an output .safetensors path for convert');
  const dir = path.dirname(path.resolve(out));
  if (!fs.existsSync(dir)) throw new SingleInsertError(`Cannot write ${out}: the folder ${dir} does not exist`);

  // 1. read every pickle first: refusals happen here, before anything is written
  const sources: Source[] = [];
  try {
    for (const file of inputs) {
      try {
        sources.push(await openSource(file, options.prefix));
      } catch (e) {
        if (e instanceof UnpicklingRefused) throw new SingleInsertError(e.message, { cause: e });
        throw e;
      }
    }
    // 2. one key set
    const owner = new Map<string, string>();
    const entries: Planned[] = [];
    for (const s of sources) {
      for (const e of s.entries) {
        const first = owner.get(e.key);
        if (first !== undefined) throw new SingleInsertError(`Key ${e.key} is in both ${first} and ${s.report.file}; merged inputs must not overlap`);
        owner.set(e.key, s.report.file);
        entries.push(e);
      }
    }
    if (entries.length === 0) {
      throw new SingleInsertError(`No tensors to write${options.prefix ? ` under the prefix ${JSON.stringify(options.prefix)}` : ''} in ${inputs.join(', ')}`);
    }
    entries.sort((a, b) => (a.key < b.key ? -1 : a.key > b.key ? 1 : 0));

    // 3. stream the tensors into a temporary file, then rename it into place
    const metadata = { format: 'pt', ...(options.metadata ?? {}) };
    const tmp = path.join(dir, `.${path.basename(out)}.${process.pid}.${crypto.randomBytes(4).toString('hex')}.tmp`);
    const fd = fs.openSync(tmp, 'wx');
    let total = 0;
    try {
      const header = safetensorsHeader(entries, metadata);
      fs.writeSync(fd, header);
      for (const e of entries) {
        let bytes: Uint8Array;
        try {
          bytes = e.read();
        } catch (err) {
          if (err instanceof UnpicklingRefused) throw new SingleInsertError(`${err.message} (tensor ${e.key})`, { cause: err });
          throw err;
        }
        if (bytes.length !== e.bytes) throw new SingleInsertError(`Tensor ${e.key} has ${bytes.length} bytes, expected ${e.bytes}`);
        let done = 0;
        while (done < bytes.length) done += fs.writeSync(fd, bytes, done, Math.min(bytes.length - done, 2 ** 30));
        total += bytes.length;
      }
      fs.closeSync(fd);
      fs.renameSync(tmp, out);
    } catch (e) {
      try {
        fs.closeSync(fd);
      } catch {
        // already closed
      }
      fs.rmSync(tmp, { force: true });
      throw e;
    }
    const dtypes: Record<string, number> = {};
    for (const e of entries) dtypes[e.dtype] = (dtypes[e.dtype] ?? 0) + 1;
    return { out, tensors: entries.length, bytes: total, dtypes, inputs: sources.map((s) => s.report) };
  } finally {
    for (const s of sources) s.close();
  }
}
