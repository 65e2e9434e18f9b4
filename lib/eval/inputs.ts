/**
 * Inputs of `eval --images`: which image was made from which prompt, and where its mask is.
 *
 * ## The prompts file (`--prompts`)
 * Image paths are relative to the `--images` folder. Three forms:
 *
 * 1. Text, one image per line: `<file><TAB><prompt>` (or `<file> | <prompt>`). Blank lines and
 *    lines starting with `#` are ignored.
 *        000.png	a * face wearing sunglasses
 *        001.png | a * face wearing sunglasses
 * 2. JSON object of file -> prompt: `{ "000.png": "a * face wearing sunglasses", ... }`.
 * 3. JSON with details, as a list or under "images" (with optional "class" and "placeholder"):
 *        { "class": "face", "placeholder": "*",
 *          "images": [{ "file": "000.png", "prompt": "a * face wearing sunglasses", "seed": 0,
 *                       "mask": "masks/000.png", "targets": ["sunglasses"], "without": ["a * face"] }] }
 *    Only file and prompt are required. `group` (default: the prompt) groups images for DIV.
 *
 * Images with the same prompt form one DIV group. ESR targets come from "targets"/"without", or,
 * when the prompt is one of assets/presets.json's edits (filled with the class word and
 * placeholder, or with the class word alone), from the preset.
 *
 * ## Masks (`--masks <dir>`)
 * For image `x.png`, the first of `<dir>/x.png`, `<dir>/x_mask.png`, `<dir>/x-mask.png`,
 * `<dir>/x.mask.png` (also .jpg/.jpeg/.webp) is its mask (white = the concept).
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { SingleInsertError } from '../errors';
import type { EvalImageSpec } from './eval';
import { matchEdit, Presets } from '../presets';

export interface PromptEntry {
  file: string;
  prompt: string;
  seed?: number | null;
  group?: string;
  mask?: string;
  targets?: string[];
  without?: string[];
}

export interface PromptsFile {
  entries: PromptEntry[];
  classWord?: string;
  placeholder?: string;
}

const IMAGE_EXT = /\.(png|jpe?g|webp|tiff?|gif|avif)$/i;

function entryFrom(v: any, where: string): PromptEntry {
  if (!v || typeof v !== 'object' || typeof v.file !== 'string' || !v.file || typeof v.prompt !== 'string') {
    throw new SingleInsertError(`${where}: expected { "file": string, "prompt": string, ... }`);
  }
  const e: PromptEntry = { file: v.file, prompt: v.prompt };
  if (v.seed !== undefined && v.seed !== null) {
    if (!Number.isSafeInteger(v.seed)) throw new SingleInsertError(`${where}: "seed" must be an integer`);
    e.seed = v.seed;
  }
  if (v.group !== undefined) e.group = String(v.group);
  if (v.mask !== undefined) e.mask = String(v.mask);
  if (v.targets !== undefined || v.without !== undefined) {
    const t = v.targets, w = typeof v.without === 'string' ? [v.without] : v.without;
    if (!Array.isArray(t) || !Array.isArray(w) || t.length === 0 || t.length !== w.length || ![...t, ...w].every((s) => typeof s === 'string')) {
      throw new SingleInsertError(`${where}: "targets" and "without" must be string lists of the same length (one prompt without each target)`);
    }
    e.targets = t;
    e.without = w;
  }
  return e;
}

/** Reads a prompts file (see the header for the formats). */
export function readPromptsFile(file: string): PromptsFile {
  let text: string;
  try {
    text = fs.readFileSync(file, 'utf8');
  } catch (e) {
    throw new SingleInsertError(`Cannot read the prompts file ${file}: ${(e as NodeJS.ErrnoException).code === 'ENOENT' ? 'file not found' : (e as Error).message}`);
  }
  const trimmed = text.trim();
  if (trimmed.startsWith('{') || trimmed.startsWith('[')) {
    let json: any;
    try {
      json = JSON.parse(trimmed);
    } catch (e) {
      throw new SingleInsertError(`${file}: invalid JSON (${(e as Error).message})`);
    }
    if (Array.isArray(json)) return { entries: json.map((v, i) => entryFrom(v, `${file} [${i}]`)) };
    if (Array.isArray(json.images)) {
      const r: PromptsFile = { entries: json.images.map((v: unknown, i: number) => entryFrom(v, `${file} images[${i}]`)) };
      if (typeof json.class === 'string') r.classWord = json.class;
      if (typeof json.placeholder === 'string') r.placeholder = json.placeholder;
      return r;
    }
    const entries = Object.entries(json).map(([f, p]) => {
      if (typeof p !== 'string') throw new SingleInsertError(`${file}: the value of ${JSON.stringify(f)} must be its prompt (a string)`);
      return { file: f, prompt: p };
    });
    return { entries };
  }
  const entries: PromptEntry[] = [];
  text.split(/\r?\n/).forEach((line, n) => {
    if (!line.trim() || line.trimStart().startsWith('#')) return;
    let cut = line.indexOf('\t');
    let sep = 1;
    if (cut < 0) {
      cut = line.indexOf(' | ');
      sep = 3;
    }
    if (cut < 0) throw new SingleInsertError(`${file} line ${n + 1}: expected "<file><TAB><prompt>" or "<file> | <prompt>"`);
    entries.push({ file: line.slice(0, cut).trim(), prompt: line.slice(cut + sep).trim() });
  });
  if (!entries.length) throw new SingleInsertError(`${file} lists no images`);
  return { entries };
}

/** The mask of an image in a mask folder (see the header), or null. */
export function findMask(masksDir: string, imageFile: string): string | null {
  const stem = path.basename(imageFile).replace(/\.[^.]*$/, '');
  for (const suffix of ['', '_mask', '-mask', '.mask']) {
    for (const ext of ['.png', '.jpg', '.jpeg', '.webp']) {
      const f = path.join(masksDir, stem + suffix + ext);
      if (fs.existsSync(f)) return f;
    }
  }
  return null;
}

/**
 * The image specs of `eval --images`: entries resolved against the images folder, masks found,
 * ESR targets attached. `notes` collects what the report should mention.
 */
export function imagesFromPromptsFile(
  imagesDir: string,
  prompts: PromptsFile,
  options: { masksDir?: string; presets: Presets; classWord: string; placeholder: string },
  notes: string[],
): EvalImageSpec[] {
  if (!fs.existsSync(imagesDir) || !fs.statSync(imagesDir).isDirectory()) throw new SingleInsertError(`The images folder ${imagesDir} does not exist`);
  const specs: EvalImageSpec[] = [];
  const listed = new Set<string>();
  let masks = 0;
  for (const e of prompts.entries) {
    const file = path.resolve(imagesDir, e.file);
    if (!fs.existsSync(file)) throw new SingleInsertError(`The prompts file lists ${e.file}, but ${file} does not exist`);
    listed.add(file);
    const spec: EvalImageSpec = { file, prompt: e.prompt, group: e.group ?? e.prompt, seed: e.seed ?? null };
    const mask = e.mask ? path.resolve(imagesDir, e.mask) : options.masksDir ? findMask(options.masksDir, file) : null;
    if (mask) {
      if (!fs.existsSync(mask)) throw new SingleInsertError(`The mask ${mask} of ${e.file} does not exist`);
      spec.maskFile = mask;
      masks++;
    }
    if (e.targets && e.without) spec.edit = { targets: e.targets, without: e.without };
    else {
      const preset = matchEdit(e.prompt, options.presets, options.classWord, options.placeholder);
      if (preset) spec.edit = { targets: preset.targets, without: preset.without.map((w) => w.replace(/\{placeholder\}/g, options.placeholder).replace(/\{class\}/g, options.classWord)) };
    }
    specs.push(spec);
  }
  if (options.masksDir && masks < specs.length) notes.push(`${specs.length - masks} image(s) have no mask in ${options.masksDir}`);
  const unlisted = fs.readdirSync(imagesDir).filter((f) => IMAGE_EXT.test(f) && !listed.has(path.resolve(imagesDir, f)));
  if (unlisted.length) notes.push(`${unlisted.length} image(s) in ${imagesDir} are not in the prompts file and were not scored (${unlisted.slice(0, 3).join(', ')}${unlisted.length > 3 ? ', ...' : ''})`);
  return specs;
}
