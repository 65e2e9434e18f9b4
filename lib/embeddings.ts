/**
 * Textual-inversion embeddings from other tools, and our own `embedding.safetensors`: a file holds
 * N vectors of the text encoder's hidden size, and a placeholder in a prompt then takes N
 * consecutive token positions whose token embeddings are replaced by those vectors
 * (lib/generate.ts; the tokenizer's `placeholderLengths`).
 *
 * Formats read (safetensors only; pickles are refused, they can run code):
 * - AUTOMATIC1111 / our own: `emb_params` [N, hidden] (or [hidden]). Our concept folders write
 *   `emb_params` [1, hidden].
 * - AUTOMATIC1111 `.pt` layout flattened into safetensors: one `string_to_param.<token>` tensor
 *   (other `string_to_token.*`, `name`, `step` ... entries are ignored), as A1111's
 *   `create_embedding_from_data` reads `data['string_to_param']`.
 * - diffusers `learned_embeds.safetensors` (`TextualInversionLoaderMixin`): exactly one key, which is
 *   the token itself, e.g. `{ "<cat-toy>": [hidden] }` (or [N, hidden]).
 * F16 / BF16 / F64 tensors are converted to float32.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { invalidParameterError, SingleInsertError } from './errors';
import { NativeTensor, Tensor } from './native';
import { readSafetensors } from './safetensors';
import { CONCEPT_FORMAT } from './concepts';

export type EmbeddingFormat = 'a1111' | 'a1111-string-to-param' | 'diffusers';

/** The SD v1.x text encoder's token embeddings are this wide (CLIP ViT-L/14); the tiny test model uses 32. */
export const SD15_TEXT_HIDDEN_SIZE = 768;

export interface LoadedEmbedding {
  /** the file it came from */
  file: string;
  format: EmbeddingFormat;
  /** the tensor's key in the file */
  key: string;
  /** [N, hidden] float32 */
  vectors: Tensor & { dtype: 'F32'; data: Float32Array };
  /** N */
  numVectors: number;
  hiddenSize: number;
  /**
   * The placeholder this file suggests: the token of a diffusers file, the sibling concept.json's
   * placeholder for a concept folder's embedding, else the file name without extension (A1111's
   * convention: the trigger word is the file name). Undefined when that name holds whitespace.
   */
  suggestedPlaceholder?: string;
  metadata: Record<string, string>;
}

export interface LoadEmbeddingOptions {
  /** refuse vectors of another width, naming the file, the expected and the actual size */
  hiddenSize?: number;
}

/** Extensions of PyTorch pickles, which are never unpickled here. */
const PICKLE_EXTENSIONS = /\.(pt|pth|bin|ckpt)$/i;

export function pickleRefusal(file: string, what: string): SingleInsertError {
  return new SingleInsertError(`${file} is a PyTorch pickle; convert to safetensors first (${what} are only read from .safetensors files, because unpickling can run code)`);
}

/** IEEE half bits -> number. */
function halfToFloat(h: number): number {
  const sign = h & 0x8000 ? -1 : 1;
  const exp = (h >> 10) & 0x1f;
  const frac = h & 0x3ff;
  if (exp === 0) return sign * frac * 2 ** -24;
  if (exp === 31) return frac ? NaN : sign * Infinity;
  return sign * (1 + frac / 1024) * 2 ** (exp - 15);
}

/** Any floating tensor from readSafetensors as float32 (F16/BF16 arrive as Uint16Array bit patterns). */
export function toFloat32(t: NativeTensor, where: string): Float32Array {
  switch (t.dtype) {
    case 'F32':
      return t.data as Float32Array;
    case 'F64':
      return Float32Array.from(t.data as Float64Array);
    case 'F16':
      return Float32Array.from(t.data as Uint16Array, halfToFloat);
    case 'BF16': {
      const bits = new Uint32Array((t.data as Uint16Array).length);
      (t.data as Uint16Array).forEach((b, i) => (bits[i] = b << 16));
      return new Float32Array(bits.buffer);
    }
    default:
      throw new SingleInsertError(`${where}: expected a floating-point tensor but found ${t.dtype}`);
  }
}

/** [hidden] or [N, hidden] -> { N, hidden }, or an error naming file, key and shape. */
export function vectorShape(shape: number[], file: string, key: string): { n: number; hidden: number } {
  if (shape.length === 1 && shape[0] > 0) return { n: 1, hidden: shape[0] };
  if (shape.length === 2 && shape[0] > 0 && shape[1] > 0) return { n: shape[0], hidden: shape[1] };
  throw new SingleInsertError(`${file}: expected the embedding ${key} to be [hidden] or [N, hidden] but its shape is [${shape.join(', ')}]`);
}

export function checkHiddenSize(actual: number, expected: number | undefined, file: string, key: string): void {
  if (expected !== undefined && actual !== expected) {
    const hint = actual === SD15_TEXT_HIDDEN_SIZE || expected === SD15_TEXT_HIDDEN_SIZE ? '' : ' (SD v1.x text encoders are 768 wide; SD 2.x uses 1024, SDXL 768 + 1280)';
    throw new SingleInsertError(
      `${file}: the embedding ${key} has hidden size ${actual} but the text encoder expects ${expected}; it was made for another model${hint}`,
    );
  }
}

function siblingConceptPlaceholder(file: string): string | undefined {
  const manifest = path.join(path.dirname(file), 'concept.json');
  try {
    const json = JSON.parse(fs.readFileSync(manifest, 'utf8'));
    if (json?.format === CONCEPT_FORMAT && json.files?.embedding === path.basename(file) && typeof json.placeholder === 'string') return json.placeholder;
  } catch {
    // no concept folder (or an unreadable one): fall back to the file name
  }
  return undefined;
}

/** Picks the one tensor that holds the vectors, and says which format that is. */
function pickTensor(file: string, tensors: Record<string, NativeTensor>): { key: string; format: EmbeddingFormat; token?: string } {
  const keys = Object.keys(tensors);
  if (keys.includes('emb_params')) return { key: 'emb_params', format: 'a1111' };
  const stp = keys.filter((k) => k.startsWith('string_to_param.'));
  if (stp.length === 1) return { key: stp[0], format: 'a1111-string-to-param' };
  if (stp.length > 1) throw new SingleInsertError(`${file}: holds ${stp.length} embeddings (${stp.join(', ')}); expected one per file, as AUTOMATIC1111 does`);
  if (keys.includes('clip_l') || keys.includes('clip_g')) {
    throw new SingleInsertError(`${file}: is an SDXL embedding (keys ${keys.join(', ')}); this pipeline is Stable Diffusion v1.x`);
  }
  if (keys.length === 1) return { key: keys[0], format: 'diffusers', token: keys[0] };
  if (keys.length === 0) throw new SingleInsertError(`${file}: holds no tensors; expected an embedding (emb_params, string_to_param.*, or one token key)`);
  throw new SingleInsertError(
    `${file}: cannot tell which of its ${keys.length} tensors is the embedding (${keys.slice(0, 5).join(', ')}${keys.length > 5 ? ', ...' : ''}); ` +
      'expected emb_params (AUTOMATIC1111), one string_to_param.* key, or a single key naming the token (diffusers)',
  );
}

/**
 * Reads a textual-inversion embedding (A1111 or diffusers safetensors, or our own
 * `embedding.safetensors`). Refuses pickles, files without exactly one embedding, bad shapes and
 * (with `hiddenSize`) vectors of another width.
 */
export async function loadEmbedding(file: string, options: LoadEmbeddingOptions = {}): Promise<LoadedEmbedding> {
  if (typeof file !== 'string' || file.length === 0) throw invalidParameterError('embedding file', 'a .safetensors path', file);
  if (options === null || typeof options !== 'object') throw invalidParameterError('options', 'an object', options);
  const { hiddenSize } = options;
  if (hiddenSize !== undefined && (!Number.isInteger(hiddenSize) || hiddenSize < 1)) throw invalidParameterError('hiddenSize', 'a positive integer', hiddenSize);
  if (PICKLE_EXTENSIONS.test(file)) throw pickleRefusal(file, 'embeddings');
  if (!fs.existsSync(file)) throw new SingleInsertError(`Cannot read the embedding ${file}: file not found`);
  if (fs.statSync(file).isDirectory()) throw new SingleInsertError(`${file} is a folder; expected an embedding .safetensors file (for a concept folder use --concept)`);
  let contents;
  try {
    contents = await readSafetensors(file);
  } catch (e) {
    const head = Buffer.alloc(2);
    const fd = fs.openSync(file, 'r');
    try {
      fs.readSync(fd, head, 0, 2, 0);
    } finally {
      fs.closeSync(fd);
    }
    // torch.save writes a zip ("PK") or, in the legacy format, a pickle (protocol opcode 0x80)
    if ((head[0] === 0x50 && head[1] === 0x4b) || head[0] === 0x80) throw pickleRefusal(file, 'embeddings');
    throw new SingleInsertError(`Cannot read the embedding ${file}: ${(e as Error).message}`);
  }
  const { key, format, token } = pickTensor(file, contents.tensors);
  const t = contents.tensors[key];
  const { n, hidden } = vectorShape(t.shape, file, key);
  checkHiddenSize(hidden, hiddenSize, file, key);
  const data = toFloat32(t, `${file} ${key}`);
  if (!data.every(Number.isFinite)) throw new SingleInsertError(`${file}: the embedding ${key} holds NaN or infinite values`);

  let suggested: string | undefined = token ?? siblingConceptPlaceholder(file) ?? path.basename(file).replace(/\.safetensors$/i, '');
  if (/\s/u.test(suggested) || suggested.length === 0) suggested = undefined;
  return {
    file,
    format,
    key,
    vectors: { dtype: 'F32', shape: [n, hidden], data },
    numVectors: n,
    hiddenSize: hidden,
    suggestedPlaceholder: suggested,
    metadata: contents.metadata,
  };
}
