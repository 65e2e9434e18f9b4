/**
 * `eval --concept`: generates the evaluation grid (prompt templates × seeds) with a trained concept
 * and records, for every image, the class word's cross-attention map (the default foreground mask).
 *
 * A concept folder is what `train` writes (lib/train.ts): `concept.json` with `placeholder`,
 * `classWord`, `files.embedding` (a textual-inversion embedding, key `emb_params` [1, hidden]),
 * `files.lora` (kohya LoRA for the UNet and text encoder, or null) and `inputs.image` /
 * `inputs.mask` (the source image and mask).
 *
 * The placeholder's embedding enters through `ConceptPipeline` below: its tokenizer gives the
 * placeholder the id of `*</w>` and its text encoding replaces the token embedding at those
 * positions (what textual inversion does). This stands in until lib/generate.ts takes concepts
 * itself; the generation path (schedulers, CFG, seeds, PNG text) is generate()'s own.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { SingleInsertError } from '../errors';
import { DEFAULT_GUIDANCE, DEFAULT_SCHEDULER, DEFAULT_STEPS, generate, toPng } from '../generate';
import { applyLora } from '../lora';
import { loadPipeline, LoadOptions, Pipeline } from '../models';
import { NativeTensor, Tensor } from '../native';
import { writeFileAtomic } from '../png';
import { fill } from '../prompts';
import { readSafetensors } from '../safetensors';
import { CallOptions, CallResult, ClipTokenizer } from '../tokenizer';
import type { EvalImageSpec } from './eval';
import type { EditPreset } from '../presets';

export interface Concept {
  dir: string;
  placeholder: string;
  classWord: string;
  embedding: Float32Array;
  lora: string | null;
  image: string | null;
  mask: string | null;
}

/** Reads a concept folder (concept.json + embedding; see the header). */
export async function readConcept(dir: string): Promise<Concept> {
  const file = path.join(dir, 'concept.json');
  let json: any;
  try {
    json = JSON.parse(fs.readFileSync(file, 'utf8'));
  } catch (e) {
    throw new SingleInsertError(`Cannot read the concept ${file}: ${(e as NodeJS.ErrnoException).code === 'ENOENT' ? 'file not found (is this a concept folder written by train?)' : (e as Error).message}`);
  }
  if (typeof json.placeholder !== 'string' || !json.placeholder || typeof json.classWord !== 'string' || !json.classWord) {
    throw new SingleInsertError(`${file}: expected "placeholder" and "classWord" strings`);
  }
  const rel = (f: unknown) => (typeof f === 'string' && f ? path.resolve(dir, f) : null);
  const embFile = rel(json.files?.embedding) ?? path.join(dir, 'embedding.safetensors');
  const { tensors } = await readSafetensors(embFile);
  const key = json.embedding?.key ?? 'emb_params';
  const t = tensors[key] ?? (Object.keys(tensors).length === 1 ? Object.values(tensors)[0] : undefined);
  if (!t || t.dtype !== 'F32' || !(t.shape.length === 1 || (t.shape.length === 2 && t.shape[0] === 1))) {
    throw new SingleInsertError(`${embFile}: expected one float32 embedding "${key}" of shape [1, hidden]`);
  }
  return {
    dir,
    placeholder: json.placeholder,
    classWord: json.classWord,
    embedding: Float32Array.from(t.data as Float32Array),
    lora: rel(json.files?.lora),
    image: rel(json.inputs?.image),
    mask: rel(json.inputs?.mask),
  };
}

/** A pipeline whose prompts take the concept: the placeholder becomes one token with the learned embedding. */
export class ConceptPipeline extends Pipeline {
  constructor(
    base: Pipeline,
    readonly concept: Concept,
  ) {
    const tokenizer: ClipTokenizer = Object.create(base.tokenizer);
    // the placeholder is split out before BPE and takes the id of `*</w>`
    tokenizer.call = (text: string, options: CallOptions = {}): CallResult => {
      const e = base.tokenizer.encodePrompt(text, { placeholders: [concept.placeholder], maxLength: options.maxLength });
      return e.truncated ? { inputIds: e.ids, attentionMask: e.attentionMask, truncated: true, truncatedText: e.truncatedText } : { inputIds: e.ids, attentionMask: e.attentionMask, truncated: false };
    };
    super(base.modelPath, base.description, base.unet, base.vae, base.textEncoder, tokenizer, base.schedulerConfig);
  }

  /** Text encoding with the concept's vector in place of the token embedding at every placeholder id. */
  override async encodeIds(inputIds: Tensor, replace?: { index: Tensor; values: Tensor }): Promise<NativeTensor> {
    if (replace) return super.encodeIds(inputIds, replace);
    const id = BigInt(this.tokenizer.placeholderTokenId);
    const [B, L] = inputIds.shape;
    const index: bigint[] = [];
    for (let b = 0; b < B; b++) for (let p = 0; p < L; p++) if ((inputIds.data as BigInt64Array)[b * L + p] === id) index.push(BigInt(b), BigInt(p));
    if (!index.length) return super.encodeIds(inputIds);
    const n = index.length / 2;
    const C = this.concept.embedding.length;
    const values = new Float32Array(n * C);
    for (let i = 0; i < n; i++) values.set(this.concept.embedding, i * C);
    return super.encodeIds(inputIds, { index: { dtype: 'I64', shape: [n, 2], data: BigInt64Array.from(index) }, values: { dtype: 'F32', shape: [n, C], data: values } });
  }

  /** The models belong to the base pipeline. */
  override dispose(): void {}
}

/**
 * Position (in the 77 ids, BOS = 0) of the class word's last token in a prompt, where its
 * cross-attention is recorded; the placeholder's position when the class word is not in the prompt.
 */
export function classTokenIndex(tokenizer: ClipTokenizer, prompt: string, classWord: string, placeholder: string): number {
  const e = tokenizer.encodePrompt(prompt, { placeholders: [placeholder] });
  const word = tokenizer.tokenize(classWord);
  const tokens = e.tokens;
  const after = e.placeholderPositions[placeholder]?.[0] ?? 0; // index into ids; tokens are ids - 1
  let found = -1;
  for (let start = 0; start + word.length <= tokens.length; start++) {
    if (word.every((w, k) => tokens[start + k] === w)) {
      found = start;
      if (start + 1 >= after) break; // prefer the occurrence after the placeholder
    }
  }
  const index = found >= 0 ? found + word.length : after;
  if (index <= 0 || index >= 76) {
    throw new SingleInsertError(`Neither the class word ${JSON.stringify(classWord)} nor the placeholder ${JSON.stringify(placeholder)} is inside the 77-token window of ${JSON.stringify(prompt)}`);
  }
  return index;
}

export interface GridOptions extends LoadOptions {
  model: string;
  concept: Concept;
  /** prompt templates with {placeholder} and {class} (default: the presets' edits) */
  edits: EditPreset[];
  seeds: number[];
  steps?: number;
  scheduler?: string;
  guidance?: number;
  width?: number;
  height?: number;
  /** folder for the generated PNGs */
  out: string;
}

export interface GridProgress {
  image: number;
  images: number;
  step: number;
  steps: number;
}

/**
 * Generates every template × seed (one generate() call each, so image (prompt, seed) is what
 * `generate --prompt ... --seed s` gives with the concept) and returns the image specs for evaluate().
 */
export async function generateConceptGrid(o: GridOptions, run: { signal?: AbortSignal; onProgress?: (e: GridProgress) => void } = {}): Promise<{ images: EvalImageSpec[]; notes: string[] }> {
  if (!o.seeds.length) throw new SingleInsertError('Expected at least one seed for the evaluation grid');
  const base = await loadPipeline(o.model, { device: o.device, dtype: o.dtype });
  const notes: string[] = [];
  try {
    if (o.concept.lora) {
      const r = await applyLora([base.unet, base.textEncoder], o.concept.lora, { scale: 1 });
      notes.push(`LoRA ${o.concept.lora}: ${r.modules} modules`);
    }
    const pipeline = new ConceptPipeline(base, o.concept);
    await fs.promises.mkdir(o.out, { recursive: true });
    const images: EvalImageSpec[] = [];
    const total = o.edits.length * o.seeds.length;
    for (const [e, edit] of o.edits.entries()) {
      const prompt = fill(edit.template, { class: o.concept.classWord, placeholder: o.concept.placeholder });
      const tokenIndex = classTokenIndex(base.tokenizer, prompt, o.concept.classWord, o.concept.placeholder);
      for (const seed of o.seeds) {
        const done = images.length;
        const result = await generate(
          pipeline,
          { prompt, seed, steps: o.steps ?? DEFAULT_STEPS, guidance: o.guidance ?? DEFAULT_GUIDANCE, scheduler: o.scheduler ?? DEFAULT_SCHEDULER, width: o.width, height: o.height, recordAttention: { tokenIndex } },
          { signal: run.signal, onProgress: run.onProgress ? (p) => run.onProgress!({ image: done + 1, images: total, step: p.step, steps: p.steps }) : undefined },
        );
        const [image] = result.images;
        const file = path.join(o.out, `edit${String(e).padStart(2, '0')}-seed${seed}.png`);
        await writeFileAtomic(file, await toPng(image, image.parameters));
        const maps = result.attentionMaps!;
        images.push({
          file,
          prompt,
          group: prompt,
          seed,
          attention: { data: Float32Array.from(maps.data as Float32Array), height: maps.shape[1], width: maps.shape[2] },
          edit: { targets: edit.targets, without: edit.without.map((w) => fill(w, { class: o.concept.classWord, placeholder: o.concept.placeholder })) },
        });
      }
    }
    return { images, notes };
  } finally {
    base.dispose();
  }
}
