/**
 * The prompt presets of assets/presets.json: the ten editing prompts the evaluation generates and
 * scores (ESR targets with their explicit "without" templates) and the view prompts.
 *
 *   { "edits": [{ "template": "a {placeholder} {class} wearing sunglasses",
 *                 "targets": ["sunglasses"], "without": ["a {placeholder} {class}"] }, ...],
 *     "views": [{ "name": "front", "template": "a front view of a {placeholder} {class}" }, ...] }
 *
 * `without[i]` is the template with `targets[i]` taken out, written by hand so that no string
 * surgery decides what "the same prompt without the target" means.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { SingleInsertError } from '../errors';
import { packageRoot } from '../native';
import { fill } from '../prompts';

export interface EditPreset {
  template: string;
  targets: string[];
  without: string[];
}

export interface ViewPreset {
  name: string;
  template: string;
}

export interface Presets {
  edits: EditPreset[];
  views: ViewPreset[];
}

export const PRESETS_FILE = path.join(packageRoot, 'assets', 'presets.json');

const isString = (v: unknown): v is string => typeof v === 'string' && v.trim().length > 0;

/** Reads and checks a presets file (default: the package's assets/presets.json). */
export function readPresets(file = PRESETS_FILE): Presets {
  let raw: any;
  try {
    raw = JSON.parse(fs.readFileSync(file, 'utf8'));
  } catch (e) {
    throw new SingleInsertError(`Cannot read the prompt presets ${file}: ${(e as NodeJS.ErrnoException).code === 'ENOENT' ? 'file not found' : (e as Error).message}`);
  }
  const fail = (msg: string): never => {
    throw new SingleInsertError(`${file}: ${msg}`);
  };
  if (!raw || typeof raw !== 'object' || !Array.isArray(raw.edits)) fail('expected { "edits": [...], "views": [...] }');
  const edits: EditPreset[] = raw.edits.map((e: any, i: number) => {
    if (!e || !isString(e.template) || !Array.isArray(e.targets) || !e.targets.length || !e.targets.every(isString)) {
      fail(`edits[${i}] needs a "template" and a non-empty "targets" list of strings`);
    }
    const without = typeof e.without === 'string' ? [e.without] : e.without;
    if (!Array.isArray(without) || without.length !== e.targets.length || !without.every(isString)) {
      fail(`edits[${i}] needs a "without" list with one template per target (${e.targets.length})`);
    }
    // the templates must fill: unknown {keys} are errors in fill()
    for (const t of [e.template, ...without]) fill(t, { class: 'x', placeholder: '*' });
    return { template: e.template, targets: [...e.targets], without: [...without] };
  });
  const views: ViewPreset[] = (Array.isArray(raw.views) ? raw.views : []).map((v: any, i: number) => {
    if (!v || !isString(v.name) || !isString(v.template)) fail(`views[${i}] needs a "name" and a "template"`);
    return { name: v.name, template: v.template };
  });
  return { edits, views };
}

const normalise = (s: string) => s.replace(/\s+/g, ' ').trim().toLowerCase();

/**
 * The edit preset a prompt was made from (filled with this class word and placeholder, or with the
 * class word alone), or null. Used to find ESR targets for images scored with --images.
 */
export function matchEdit(prompt: string, presets: Presets, classWord: string, placeholder: string): EditPreset | null {
  if (!classWord) return null;
  const p = normalise(prompt);
  for (const e of presets.edits) {
    const withPlaceholder = normalise(fill(e.template, { class: classWord, placeholder }));
    const classOnly = normalise(e.template.replace(/\{placeholder\}\s*/g, '').replace(/\{class\}/g, classWord));
    if (p === withPlaceholder || p === classOnly) return e;
  }
  return null;
}
