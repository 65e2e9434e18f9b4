/**
 * `eval --concept`: generates the evaluation grid (prompt templates × seeds) with a trained concept
 * and records, for every image, the class word's cross-attention map (the default foreground mask).
 *
 * The concept is loaded by lib/concepts.ts (Pipeline.loadConcept) and enters each generation
 * through generate()'s `concepts` option, exactly as `generate --concept` uses it: its embedding
 * replaces the placeholder, its LoRA is attached for the call. The source image and mask the
 * concept was trained on are read from concept.json's `inputs`.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { Concept } from '../concepts';
import { SingleInsertError } from '../errors';
import { DEFAULT_GUIDANCE, DEFAULT_SCHEDULER, DEFAULT_STEPS, generate, toPng } from '../generate';
import { loadPipeline, LoadOptions } from '../models';
import { writeFileAtomic } from '../png';
import { fill } from '../prompts';
import { ClipTokenizer } from '../tokenizer';
import type { EvalImageSpec } from './eval';
import type { EditPreset } from '../presets';

/** The source image and mask a concept was trained on (concept.json `inputs`), resolved against its folder. */
export function conceptSources(concept: Concept): { image: string | null; mask: string | null } {
  const inputs = (concept.manifest.inputs ?? {}) as { image?: unknown; mask?: unknown };
  const rel = (f: unknown) => (typeof f === 'string' && f ? path.resolve(concept.dir, f) : null);
  return { image: rel(inputs.image), mask: rel(inputs.mask) };
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
  /** the concept folder (what train writes) */
  concept: string;
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
  /** default: the concept's class word */
  classWord?: string;
  /** default: the concept's placeholder */
  placeholder?: string;
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
    const concept = await base.loadConcept(o.concept, { placeholder: o.placeholder });
    notes.push(...concept.warnings);
    if (concept.lora) notes.push(`LoRA ${concept.lora.file}: ${concept.lora.modules} modules`);
    const classWord = o.classWord ?? concept.classWord;
    if (!classWord) throw new SingleInsertError(`${path.join(o.concept, 'concept.json')} records no class word: pass --class`);
    await fs.promises.mkdir(o.out, { recursive: true });
    const images: EvalImageSpec[] = [];
    const total = o.edits.length * o.seeds.length;
    for (const [e, edit] of o.edits.entries()) {
      const prompt = fill(edit.template, { class: classWord, placeholder: concept.placeholder });
      const tokenIndex = classTokenIndex(base.tokenizer, prompt, classWord, concept.placeholder);
      for (const seed of o.seeds) {
        const done = images.length;
        const result = await generate(
          base,
          { prompt, concepts: [{ concept }], seed, steps: o.steps ?? DEFAULT_STEPS, guidance: o.guidance ?? DEFAULT_GUIDANCE, scheduler: o.scheduler ?? DEFAULT_SCHEDULER, width: o.width, height: o.height, recordAttention: { tokenIndex } },
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
          edit: { targets: edit.targets, without: edit.without.map((w) => fill(w, { class: classWord, placeholder: concept.placeholder })) },
        });
      }
    }
    return { images, notes };
  } finally {
    base.dispose();
  }
}
