/**
 * Using trained SingleInsert concepts: loading a concept folder, checking it against the loaded
 * model, and putting LoRA adapters on a pipeline for the duration of one call.
 *
 * A concept is a folder written by training (lib/train.ts):
 *   concept.json           { format: 'singleinsert-native.concept', version: 1, placeholder, classWord, prompt,
 *                            files: { embedding, lora (null for stage-I-only concepts), encoder },
 *                            embedding: { key, shape }, lora: { format: 'kohya', rank, alpha, modules } | null,
 *                            baseModel: { path, unetWeights, unetHeaderSha256 }, ... }
 *   embedding.safetensors  emb_params F32 [1, hidden]: the learned placeholder embedding
 *   lora.safetensors       kohya networks.lora keys (lora_unet_*, lora_te_*), when stage II ran
 *   encoder.safetensors    the image encoder's adapter (training only; not read here)
 *
 * Adapters and concurrency. LoRA adapters live on the pipeline's shared UNet and text encoder
 * (lib/lora.ts), so a call that attaches some must not overlap any other call on that pipeline,
 * or that call would sample with adapters it did not ask for. Every generation therefore holds the
 * pipeline's lock (withPipelineLock): calls without adapters hold it SHARED and still overlap each
 * other as before (text encoding / VAE decode of one beside the UNet loop of another); a call with
 * adapters holds it EXCLUSIVE from attaching its adapters until they are removed again. Waiters are
 * served first come, first served, so a stream of plain calls cannot starve a LoRA call. Other code
 * that attaches adapters to a pipeline's models while generations may run (training) should hold
 * the lock exclusively too.
 */
import { createHash } from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { checkHiddenSize, pickleRefusal, toFloat32, vectorShape } from './embeddings';
import { AbortError, describeValue, invalidParameterError, SingleInsertError } from './errors';
import { applyLora, clearLora } from './lora';
import { componentWeightFiles } from './model-files';
import type { Pipeline } from './models';
import type { Tensor } from './native';
import { DEFAULT_PLACEHOLDER } from './prompts';
import { readSafetensors, readSafetensorsHeader } from './safetensors';

export const CONCEPT_FORMAT = 'singleinsert-native.concept';
/** The concept.json version this library reads and writes. */
export const CONCEPT_VERSION = 1;
export const CONCEPT_MANIFEST = 'concept.json';
const DEFAULT_FILES = { embedding: 'embedding.safetensors', lora: 'lora.safetensors' } as const;

/** What a model's identity is recorded as (concept.json `baseModel`). */
export interface ModelIdentity {
  /** the model path the pipeline was loaded from */
  path: string;
  /** the UNet weights file(s) the hash covers, in hash order */
  unetWeights: string[];
  /** sha256 (hex) of the UNet weights' safetensors headers: see modelIdentity */
  unetHeaderSha256: string;
}

/** concept.json as training writes it; everything but format and version is read defensively. */
export interface ConceptManifest {
  format: typeof CONCEPT_FORMAT;
  version: number;
  placeholder?: string;
  classWord?: string;
  prompt?: string;
  files?: { embedding?: string; lora?: string | null; encoder?: string | null };
  embedding?: { key?: string; shape?: number[] };
  lora?: { format?: string; rank?: number; alpha?: number; modules?: unknown } | null;
  baseModel?: Partial<ModelIdentity>;
  [key: string]: unknown;
}

/** A loaded concept: its learned embedding in memory, its LoRA checked and left on disk. */
export interface Concept {
  readonly kind: 'singleinsert-concept';
  dir: string;
  manifest: ConceptManifest;
  /** the placeholder prompts use for it: the override given to loadConcept, else concept.json's, else "*" */
  placeholder: string;
  /** the class word ("face"); from concept.json, else the words after the placeholder in its prompt */
  classWord?: string;
  /** the training prompt, e.g. "* face" */
  prompt?: string;
  embedding: { file: string; key: string; vectors: Tensor & { dtype: 'F32'; data: Float32Array } };
  /** the embedding's width (the text encoder's hidden size it was trained for) */
  hiddenSize: number;
  /** vectors in the embedding (1 for SingleInsert) */
  numVectors: number;
  /** null for stage-I-only concepts */
  lora: { file: string; modules: number; tensors: number } | null;
  /** the recorded base model, when concept.json has one */
  baseModel?: Partial<ModelIdentity>;
  /** e.g. a base-model mismatch found by Pipeline.loadConcept */
  warnings: string[];
}

export interface LoadConceptOptions {
  /** another placeholder for this concept (to use two concepts that both learned "*") */
  placeholder?: string;
  /** refuse an embedding of another width, naming both sizes */
  hiddenSize?: number;
}

const isRecord = (v: unknown): v is Record<string, unknown> => typeof v === 'object' && v !== null && !Array.isArray(v);

export function checkPlaceholder(p: unknown, where: string): string {
  if (typeof p !== 'string' || p.length === 0 || /\s/u.test(p)) throw invalidParameterError(where, 'a non-empty placeholder without whitespace', p);
  return p;
}

function readManifest(file: string): ConceptManifest {
  let text: string;
  try {
    text = fs.readFileSync(file, 'utf8');
  } catch (e) {
    const missing = (e as NodeJS.ErrnoException).code === 'ENOENT';
    throw new SingleInsertError(
      missing
        ? `${file} not found: a concept folder holds ${CONCEPT_MANIFEST}, ${DEFAULT_FILES.embedding} and (after stage II) ${DEFAULT_FILES.lora}`
        : `Cannot read ${file}: ${(e as Error).message}`,
    );
  }
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (e) {
    throw new SingleInsertError(`${file}: invalid JSON (${(e as Error).message})`);
  }
  if (!isRecord(json)) throw new SingleInsertError(`${file}: expected a JSON object but found ${describeValue(json)}`);
  if (json.format !== CONCEPT_FORMAT) throw new SingleInsertError(`${file}: expected "format": "${CONCEPT_FORMAT}" but found ${JSON.stringify(json.format)} (is this a SingleInsert concept folder?)`);
  if (json.version !== CONCEPT_VERSION) {
    const newer = typeof json.version === 'number' && json.version > CONCEPT_VERSION;
    throw new SingleInsertError(
      `${file}: concept format version ${JSON.stringify(json.version)} is not supported; this library reads version ${CONCEPT_VERSION}` +
        (newer ? ' (the concept was written by a newer version: upgrade singleinsert-native)' : ''),
    );
  }
  return json as ConceptManifest;
}

/** A file named in concept.json: a plain name inside the folder (never an absolute path or ../). */
function conceptFile(dir: string, manifestFile: string, key: string, name: unknown): string {
  if (typeof name !== 'string' || name.length === 0) throw new SingleInsertError(`${manifestFile}: expected a file name for ${key} but found ${describeValue(name)}`);
  if (path.isAbsolute(name) || name.split(/[/\\]/).includes('..')) {
    throw new SingleInsertError(`${manifestFile}: ${key} must name a file inside the concept folder, not ${JSON.stringify(name)}`);
  }
  const file = path.join(dir, name);
  if (/\.(pt|pth|bin|ckpt)$/i.test(name)) throw pickleRefusal(file, 'concept files');
  if (!fs.existsSync(file)) throw new SingleInsertError(`${file} not found (named by ${key} in ${manifestFile})`);
  return file;
}

const KOHYA_KEY = /^(lora_unet|lora_te)_\w+\.(lora_down\.weight|lora_up\.weight|alpha)$/;

async function checkLoraFile(file: string): Promise<{ modules: number; tensors: number }> {
  let header;
  try {
    header = await readSafetensorsHeader(file);
  } catch (e) {
    throw new SingleInsertError(`Cannot read the concept's LoRA ${file}: ${(e as Error).message}`);
  }
  const keys = Object.keys(header.tensors);
  const odd = keys.filter((k) => !KOHYA_KEY.test(k));
  if (keys.length === 0 || odd.length) {
    throw new SingleInsertError(
      `${file}: expected kohya LoRA keys (lora_unet_*/lora_te_* .lora_down.weight, .lora_up.weight, .alpha) but ` +
        (keys.length === 0 ? 'the file holds no tensors' : `found ${odd.length} other key(s), e.g. ${odd.slice(0, 3).join(', ')}`),
    );
  }
  return { modules: keys.filter((k) => k.endsWith('.lora_down.weight')).length, tensors: keys.length };
}

/**
 * Reads and checks a concept folder: concept.json (format and version), the embedding (key, shape,
 * width) and, when present, the LoRA's keys. Errors name the file, the key and the shapes.
 */
export async function loadConcept(dir: string, options: LoadConceptOptions = {}): Promise<Concept> {
  if (typeof dir !== 'string' || dir.length === 0) throw invalidParameterError('concept folder', 'a folder path', dir);
  if (options === null || typeof options !== 'object') throw invalidParameterError('options', 'an object', options);
  const { hiddenSize } = options;
  if (hiddenSize !== undefined && (!Number.isInteger(hiddenSize) || hiddenSize < 1)) throw invalidParameterError('hiddenSize', 'a positive integer', hiddenSize);
  const override = options.placeholder === undefined ? undefined : checkPlaceholder(options.placeholder, 'placeholder');
  if (!fs.existsSync(dir)) throw new SingleInsertError(`Concept folder ${dir} does not exist`);
  if (!fs.statSync(dir).isDirectory()) throw new SingleInsertError(`${dir} is not a folder: a concept is a folder with ${CONCEPT_MANIFEST}, ${DEFAULT_FILES.embedding} and ${DEFAULT_FILES.lora}`);
  const abs = path.resolve(dir);
  const manifestFile = path.join(abs, CONCEPT_MANIFEST);
  const manifest = readManifest(manifestFile);

  // placeholder, class word, prompt
  let placeholder = DEFAULT_PLACEHOLDER;
  if (manifest.placeholder !== undefined) placeholder = checkPlaceholder(manifest.placeholder, `placeholder in ${manifestFile}`);
  const prompt = typeof manifest.prompt === 'string' ? manifest.prompt : undefined;
  let classWord = typeof manifest.classWord === 'string' && manifest.classWord.trim() ? manifest.classWord.trim() : undefined;
  if (!classWord && prompt?.startsWith(`${placeholder} `)) classWord = prompt.slice(placeholder.length + 1).trim() || undefined;

  // the embedding
  const files = isRecord(manifest.files) ? manifest.files : {};
  const embeddingFile = conceptFile(abs, manifestFile, 'files.embedding', files.embedding ?? DEFAULT_FILES.embedding);
  const key = isRecord(manifest.embedding) && typeof manifest.embedding.key === 'string' ? manifest.embedding.key : 'emb_params';
  let contents;
  try {
    contents = await readSafetensors(embeddingFile);
  } catch (e) {
    throw new SingleInsertError(`Cannot read the concept's embedding ${embeddingFile}: ${(e as Error).message}`);
  }
  const t = contents.tensors[key];
  if (!t) throw new SingleInsertError(`${embeddingFile}: no tensor "${key}" (named by ${manifestFile}); the file holds ${Object.keys(contents.tensors).map((k) => JSON.stringify(k)).join(', ') || 'no tensors'}`);
  const { n, hidden } = vectorShape(t.shape, embeddingFile, key);
  const recorded = isRecord(manifest.embedding) ? manifest.embedding.shape : undefined;
  if (Array.isArray(recorded) && (recorded.length !== t.shape.length || recorded.some((d, i) => d !== t.shape[i]))) {
    throw new SingleInsertError(`${embeddingFile}: ${key} has shape [${t.shape.join(', ')}] but ${manifestFile} records [${recorded.join(', ')}]`);
  }
  checkHiddenSize(hidden, hiddenSize, embeddingFile, key);
  const data = toFloat32(t, `${embeddingFile} ${key}`);
  if (!data.every(Number.isFinite)) throw new SingleInsertError(`${embeddingFile}: ${key} holds NaN or infinite values`);

  // the LoRA: null in concept.json = stage I only; no files.lora at all = use lora.safetensors if present
  let lora: Concept['lora'] = null;
  const loraName = files.lora === undefined ? (fs.existsSync(path.join(abs, DEFAULT_FILES.lora)) ? DEFAULT_FILES.lora : null) : files.lora;
  if (loraName !== null) {
    const loraFile = conceptFile(abs, manifestFile, 'files.lora', loraName);
    lora = { file: loraFile, ...(await checkLoraFile(loraFile)) };
  }

  const baseModel = isRecord(manifest.baseModel) ? (manifest.baseModel as Partial<ModelIdentity>) : undefined;
  return {
    kind: 'singleinsert-concept',
    dir: abs,
    manifest,
    placeholder: override ?? placeholder,
    classWord,
    prompt,
    embedding: { file: embeddingFile, key, vectors: { dtype: 'F32', shape: [n, hidden], data } },
    hiddenSize: hidden,
    numVectors: n,
    lora,
    baseModel,
    warnings: [],
  };
}

export function isConcept(value: unknown): value is Concept {
  return isRecord(value) && value.kind === 'singleinsert-concept' && isRecord(value.embedding);
}

// ---------------------------------------------------------------------------------------------
// Model identity

/** The first 8 + N bytes of a safetensors file: the u64 LE header length N and the JSON header. */
async function safetensorsHeaderBytes(file: string): Promise<Buffer> {
  const fh = await fs.promises.open(file, 'r');
  try {
    const len = Buffer.alloc(8);
    const { bytesRead } = await fh.read(len, 0, 8, 0);
    if (bytesRead !== 8) throw new SingleInsertError(`${file}: too short for a safetensors file`);
    const n = len.readBigUInt64LE(0);
    const size = (await fh.stat()).size;
    if (n > BigInt(size - 8)) throw new SingleInsertError(`${file}: safetensors header length ${n} exceeds the file size ${size}`);
    const header = Buffer.alloc(8 + Number(n));
    len.copy(header);
    await fh.read(header, 8, Number(n), 8);
    return header;
  } finally {
    await fh.close();
  }
}

/** sha256 (hex) of one safetensors file's header bytes (8 + N): it changes whenever any tensor's name, shape, dtype or offset does. */
export async function safetensorsHeaderSha256(file: string): Promise<string> {
  return createHash('sha256').update(await safetensorsHeaderBytes(file)).digest('hex');
}

const identities = new WeakMap<Pipeline, Promise<ModelIdentity>>();

/**
 * The identity of a loaded pipeline's base model, as concept.json records it (`baseModel`): the
 * UNet weights file(s) and the sha256 of their safetensors header bytes (the first 8 + N bytes; N
 * is the u64 LE header length). A diffusers folder's UNet files come from
 * componentWeightFiles(<root>/unet) (several for a sharded UNet: the hash then runs over each
 * file's header bytes in that order); a single-file checkpoint is its own UNet file. The header
 * lists every tensor's name, dtype, shape and byte range, so it is cheap to hash and changes with
 * any other model layout or precision; it does not see a fine-tune that only changed values.
 */
export function modelIdentity(pipeline: Pipeline): Promise<ModelIdentity> {
  let cached = identities.get(pipeline);
  if (!cached) {
    cached = (async () => {
      const root = pipeline.modelPath;
      const files = fs.statSync(root).isFile() ? [root] : componentWeightFiles(path.join(root, 'unet')).files;
      const hash = createHash('sha256');
      for (const f of files) hash.update(await safetensorsHeaderBytes(f));
      return { path: root, unetWeights: files, unetHeaderSha256: hash.digest('hex') };
    })();
    identities.set(pipeline, cached);
    cached.catch(() => identities.delete(pipeline));
  }
  return cached;
}

/**
 * loadConcept, checked against a loaded pipeline (what Pipeline.loadConcept does): the embedding
 * must match the text encoder's hidden size, and a base model other than the recorded one adds a
 * warning to `concept.warnings` (the concept may still work on a close fine-tune).
 */
export async function loadConceptForPipeline(pipeline: Pipeline, dir: string, options: Omit<LoadConceptOptions, 'hiddenSize'> = {}): Promise<Concept> {
  const hiddenSize = pipeline.textEncoder.config.hidden_size as number;
  const concept = await loadConcept(dir, { ...options, hiddenSize });
  const recorded = concept.baseModel?.unetHeaderSha256;
  if (typeof recorded === 'string' && recorded) {
    const own = await modelIdentity(pipeline);
    if (own.unetHeaderSha256 !== recorded) {
      concept.warnings.push(
        `The concept ${concept.dir} was trained on ${concept.baseModel?.path ?? 'another model'} (UNet header sha256 ${recorded.slice(0, 12)}…) ` +
          `but the loaded model ${own.path} has ${own.unetHeaderSha256.slice(0, 12)}…: its embedding and LoRA were learned for other weights and may not work here`,
      );
    }
  }
  return concept;
}

// ---------------------------------------------------------------------------------------------
// The pipeline lock

type LockMode = 'shared' | 'exclusive';
interface Waiter {
  mode: LockMode;
  grant: () => void;
}

/** A first-come-first-served shared/exclusive lock (see the file comment). */
class PipelineLock {
  private holders = 0;
  private exclusive = false;
  private readonly queue: Waiter[] = [];

  acquire(mode: LockMode, signal?: AbortSignal): Promise<() => void> {
    if (signal?.aborted) return Promise.reject(new AbortError());
    return new Promise((resolve, reject) => {
      let released = false;
      const release = () => {
        if (released) return;
        released = true;
        this.holders--;
        if (this.holders === 0) this.exclusive = false;
        this.pump();
      };
      const onAbort = () => {
        const i = this.queue.indexOf(waiter);
        if (i < 0) return;
        this.queue.splice(i, 1);
        reject(new AbortError());
        this.pump(); // an exclusive waiter leaving the head may let shared ones through
      };
      const waiter: Waiter = {
        mode,
        grant: () => {
          signal?.removeEventListener('abort', onAbort);
          resolve(release);
        },
      };
      this.queue.push(waiter);
      signal?.addEventListener('abort', onAbort, { once: true });
      this.pump();
    });
  }

  private pump(): void {
    while (this.queue.length > 0) {
      const head = this.queue[0];
      if (head.mode === 'exclusive') {
        if (this.holders > 0) return;
        this.exclusive = true;
      } else if (this.exclusive) {
        return;
      }
      this.holders++;
      this.queue.shift();
      head.grant();
    }
  }
}

const locks = new WeakMap<Pipeline, PipelineLock>();

/**
 * Runs `fn` holding the pipeline's lock: 'exclusive' for work that attaches adapters to its models,
 * 'shared' for work that only needs none of another call's adapters on them. Rejects with an
 * AbortError when `signal` aborts while waiting.
 */
export async function withPipelineLock<T>(pipeline: Pipeline, mode: LockMode, fn: () => Promise<T>, signal?: AbortSignal): Promise<T> {
  let lock = locks.get(pipeline);
  if (!lock) locks.set(pipeline, (lock = new PipelineLock()));
  const release = await lock.acquire(mode, signal);
  try {
    return await fn();
  } finally {
    release();
  }
}

// ---------------------------------------------------------------------------------------------
// Adapters for one call

/** A LoRA file to attach for one call. */
export interface LoraUse {
  file: string;
  /** default 1 */
  scale?: number;
  /** refuse keys that target nothing in the models (default true) */
  strict?: boolean;
}

/** One adapter of a call, in application order. */
export interface AdapterPlan {
  /** adapter name on the models: generate-<i> in sorted order */
  name: string;
  file: string;
  scale: number;
  strict: boolean;
  /** "concept *" or "lora <file>" for messages */
  source: string;
}

/**
 * The adapters a call attaches, sorted by (absolute file, scale, source) so that the same set in
 * any order attaches in the same order: the layers add the branches in attachment order, so the
 * sum, and the image, is then bit-identical. Scale 0 attaches nothing (exactly the base model).
 */
export function planAdapters(uses: Array<{ file: string; scale: number; strict?: boolean; source: string }>): AdapterPlan[] {
  const active = uses
    .filter((u) => u.scale !== 0)
    .map((u) => ({ file: path.resolve(u.file), scale: u.scale, strict: u.strict ?? true, source: u.source }));
  const key = (u: (typeof active)[number]) => `${u.file}\0${u.scale}\0${u.source}`;
  active.sort((a, b) => (key(a) < key(b) ? -1 : key(a) > key(b) ? 1 : 0));
  return active.map((u, i) => ({ ...u, name: `generate-${i}` }));
}

/**
 * Runs `fn` with the planned adapters attached to the pipeline's UNet and text encoder (each under
 * its own name and scale, so their updates add up), holding the pipeline's lock (exclusive when
 * there are adapters, shared otherwise), and removes them afterwards, also when `fn` or an attach
 * fails or the call is aborted.
 */
export async function withAdapters<T>(pipeline: Pipeline, plan: AdapterPlan[], fn: () => Promise<T>, signal?: AbortSignal): Promise<T> {
  if (plan.length === 0) return withPipelineLock(pipeline, 'shared', fn, signal);
  const models = [pipeline.unet, pipeline.textEncoder];
  return withPipelineLock(
    pipeline,
    'exclusive',
    async () => {
      const attached: string[] = [];
      try {
        for (const a of plan) {
          if (signal?.aborted) throw new AbortError();
          try {
            await applyLora(models, a.file, { name: a.name, scale: a.scale, strict: a.strict });
          } catch (e) {
            throw new SingleInsertError(`Cannot apply the LoRA of ${a.source}: ${(e as Error).message}`, { cause: e });
          }
          attached.push(a.name);
        }
        return await fn();
      } finally {
        for (const name of attached.reverse()) await clearLora(models, name);
      }
    },
    signal,
  );
}
