/**
 * Prompt presets for trying a concept: `edits` (ten editing prompts, each with the words an
 * editing-success check looks for) and `views` (eight novel-view prompts). They live in
 * assets/presets.json, which the evaluation code reads too, so generation and evaluation share one
 * list. Every template holds the concept as `{placeholder} {class}` ("a {placeholder} {class}
 * wearing sunglasses" -> "a * face wearing sunglasses").
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { describeValue, invalidParameterError, SingleInsertError } from './errors';
import { packageRoot } from './native';
import { fill } from './prompts';

export const PRESET_NAMES = ['edits', 'views'] as const;
export type PresetName = (typeof PRESET_NAMES)[number];

export interface EditPreset {
  template: string;
  /** what an editing-success check looks for (one or two phrases) */
  targets: string[];
  /**
   * per target, the same prompt without it, written by hand so that no string surgery decides
   * what "the same prompt without the target" means (ESR: CLIP must prefer `template` to each)
   */
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

/** One expanded prompt of a preset. */
export interface PresetPrompt {
  preset: PresetName;
  /** position in the preset */
  index: number;
  /** a file-name-safe label: the view's name, or the edit's first target ("red-hat") */
  name: string;
  template: string;
  prompt: string;
  /** edits only */
  targets?: string[];
}

/** The concept in every template. */
export const SUBJECT = '{placeholder} {class}';

export const PRESETS_FILE = path.join(packageRoot, 'assets', 'presets.json');

const isRecord = (v: unknown): v is Record<string, unknown> => typeof v === 'object' && v !== null && !Array.isArray(v);

function checkTemplate(t: unknown, where: string, file: string): string {
  if (typeof t !== 'string' || t.split(SUBJECT).length !== 2) {
    throw new SingleInsertError(`${file}: expected ${where}${where.includes('without') ? '' : '.template'} to be a string holding "${SUBJECT}" once but found ${describeValue(t)}`);
  }
  try {
    fill(t, { placeholder: '*', class: 'x' }); // refuses any other {key}
  } catch (e) {
    throw new SingleInsertError(`${file}: ${where}.template: ${(e as Error).message}`);
  }
  return t;
}

/** A label usable in file names: lower case, [a-z0-9-]. */
export function slug(text: string): string {
  return text.toLowerCase().replace(/[^a-z0-9]+/g, '-').replace(/^-+|-+$/g, '') || 'prompt';
}

/** Parses and checks a presets file (assets/presets.json by default). */
export function readPresets(file: string = PRESETS_FILE): Presets {
  let json: unknown;
  try {
    json = JSON.parse(fs.readFileSync(file, 'utf8'));
  } catch (e) {
    throw new SingleInsertError(`Cannot read the presets ${file}: ${(e as NodeJS.ErrnoException).code === 'ENOENT' ? 'file not found' : (e as Error).message}`);
  }
  if (!isRecord(json) || !Array.isArray(json.edits) || !Array.isArray(json.views)) throw new SingleInsertError(`${file}: expected an object with "edits" and "views" arrays`);
  const edits = json.edits.map((e: unknown, i: number): EditPreset => {
    const where = `edits[${i}]`;
    if (!isRecord(e)) throw new SingleInsertError(`${file}: expected ${where} to be an object { template, targets }`);
    const targets = e.targets;
    if (!Array.isArray(targets) || targets.length < 1 || targets.length > 2 || !targets.every((t) => typeof t === 'string' && t.trim())) {
      throw new SingleInsertError(`${file}: expected ${where}.targets to be one or two non-empty strings but found ${describeValue(targets)}`);
    }
    const template = checkTemplate(e.template, where, file);
    const without = e.without;
    if (!Array.isArray(without) || without.length !== targets.length) {
      throw new SingleInsertError(`${file}: expected ${where}.without to hold one template per target (${targets.length}) but found ${describeValue(without)}`);
    }
    without.forEach((w, j) => checkTemplate(w, `${where}.without[${j}]`, file));
    return { template, targets: targets as string[], without: without as string[] };
  });
  const names = new Set<string>();
  const views = json.views.map((v: unknown, i: number): ViewPreset => {
    const where = `views[${i}]`;
    if (!isRecord(v) || typeof v.name !== 'string' || !/^[a-z0-9-]+$/.test(v.name)) throw new SingleInsertError(`${file}: expected ${where}.name to be a lower-case name ([a-z0-9-])`);
    if (names.has(v.name)) throw new SingleInsertError(`${file}: view name ${JSON.stringify(v.name)} appears twice`);
    names.add(v.name);
    return { name: v.name, template: checkTemplate(v.template, where, file) };
  });
  return { edits, views };
}

let cached: Presets | undefined;
function defaultPresets(): Presets {
  return (cached ??= readPresets());
}

/**
 * The prompts of a preset for one concept (`{ placeholder, class }`), or with `{ subject }` in
 * place of "{placeholder} {class}" (e.g. "* face and a me dog" to put several concepts in every prompt).
 */
export function expandPreset(name: PresetName, concept: { placeholder: string; class: string } | { subject: string }, presets: Presets = defaultPresets()): PresetPrompt[] {
  if (!PRESET_NAMES.includes(name)) throw invalidParameterError('preset', `one of ${PRESET_NAMES.join(', ')}`, name);
  if (!isRecord(concept)) throw invalidParameterError('concept', 'an object { placeholder, class } or { subject }', concept);
  const render = (template: string): string => {
    if ('subject' in concept) {
      if (typeof concept.subject !== 'string' || !concept.subject.trim()) throw invalidParameterError('subject', 'a non-empty string', concept.subject);
      const [before, after] = template.split(SUBJECT);
      return before + concept.subject.trim() + after;
    }
    return fill(template, { placeholder: concept.placeholder, class: concept.class });
  };
  if (name === 'edits') {
    const seen = new Map<string, number>();
    return presets.edits.map((e, index) => {
      let label = slug(e.targets[0]);
      const n = seen.get(label) ?? 0;
      seen.set(label, n + 1);
      if (n > 0) label = `${label}-${n + 1}`;
      return { preset: name, index, name: label, template: e.template, prompt: render(e.template), targets: [...e.targets] };
    });
  }
  return presets.views.map((v, index) => ({ preset: name, index, name: v.name, template: v.template, prompt: render(v.template) }));
}

const normalise = (s: string) => s.replace(/\s+/g, ' ').trim().toLowerCase();

/**
 * The edit preset a prompt was made from (filled with this class word and placeholder, or with the
 * class word alone), or null. The evaluation uses it to find ESR targets for images scored with --images.
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
