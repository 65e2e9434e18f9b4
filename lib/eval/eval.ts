/**
 * Scoring a set of generated images against the concept's source image (./metrics.ts defines the
 * metrics) and writing the report folder:
 *
 *   <out>/metrics.json   every number, per image and per prompt, with the definitions and what was skipped
 *   <out>/metrics.csv    the same as rows: summary, prompts, images
 *   <out>/report.html    summary table, per-prompt table, image grid (self-contained, images linked relatively)
 *   <out>/images/        copies of the scored images and the masks used (so the folder can be zipped)
 *
 * Works on images from any method: each image needs its prompt, optionally a mask (from a mask
 * file, or the generating pipeline's cross-attention map), optionally its ESR targets. A metric
 * whose model is not given is skipped, and only that metric; the report says so.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { SingleInsertError } from '../errors';
import { decodeImage, resizeImage } from '../image';
import type { LoadOptions } from '../models';
import { encodePng, writeFileAtomic } from '../png';
import {
  attentionMask,
  binaryMask,
  composite,
  cosine,
  DEFINITIONS,
  diversity,
  editSucceeded,
  editSuccessRate,
  Mask,
  mean,
  METRIC_MODEL,
  MetricName,
  METRICS,
  pairs,
  RgbImage,
  scoringPrompt,
  TargetScore,
} from './metrics';
import { renderCsv, renderHtml } from './report';
import { ClipScorer, DinoScorer, LpipsScorer } from './scorers';

export const EVAL_FORMAT = 'singleinsert-native.eval';
export const EVAL_VERSION = 1;

/** One image to score. */
export interface EvalImageSpec {
  /** the image file (any format sharp reads) */
  file: string;
  /** the prompt it was generated from (may contain the placeholder) */
  prompt: string;
  /** DIV group: images of the same prompt with different seeds (default: the prompt) */
  group?: string;
  seed?: number | null;
  /** its foreground mask: a file (white = concept) ... */
  maskFile?: string;
  /** ... or the class word's cross-attention map [height, width] (lib/generate recordAttention) */
  attention?: { data: Float32Array; height: number; width: number };
  /** ESR targets and, per target, the prompt without it (texts as generated: the placeholder is replaced for scoring) */
  edit?: { targets: string[]; without: string[] };
}

export interface EvalSpec {
  mode: 'concept' | 'images';
  /** the concept's source image and its mask (white = concept) */
  source: string;
  sourceMask: string;
  images: EvalImageSpec[];
  /** the class word and placeholder: CLIP-T and ESR texts replace "<placeholder> <class>" by "<class>" */
  classWord: string;
  placeholder: string;
  /** lines for the report (e.g. how the images were generated) */
  notes?: string[];
}

/** Model folders (or hub ids in the local cache); null/undefined skips the metrics that need it. */
export interface EvalModels {
  clip?: string | null;
  dino?: string | null;
  lpips?: string | null;
}

export interface EvalProgress {
  stage: 'loading' | 'clip' | 'dino' | 'lpips' | 'report';
  step: number;
  steps: number;
}

export interface EvalRunOptions extends LoadOptions {
  /** the report folder (created; existing metrics/report files are replaced) */
  out: string;
  onProgress?: (e: EvalProgress) => void;
}

export interface ImageResult {
  index: number;
  file: string;
  /** path of the copy inside the report folder, relative to it */
  reportImage: string;
  reportMask: string | null;
  prompt: string;
  scoringPrompt: string;
  group: string;
  seed: number | null;
  mask: 'file' | 'attention' | 'none';
  scores: Partial<Record<'CLIP-I-f' | 'CLIP-I-b' | 'DINO-f' | 'DINO-b' | 'CLIP-T', number>>;
  esr: { success: boolean; targets: TargetScore[] } | null;
}

export interface PromptResult {
  prompt: string;
  scoringPrompt: string;
  group: string;
  images: number;
  metrics: Record<MetricName, number | null>;
}

export interface EvalResult {
  format: string;
  version: number;
  createdAt: string;
  mode: 'concept' | 'images';
  classWord: string;
  placeholder: string;
  source: { image: string; mask: string; reportImage: string; reportMask: string | null };
  models: { clip: string | null; dino: string | null; lpips: string | null };
  summary: Record<MetricName, number | null>;
  counts: { images: number; prompts: number; editedImages: number; imagesWithMasks: number };
  skipped: Array<{ metrics: MetricName[]; reason: string }>;
  notes: string[];
  prompts: PromptResult[];
  images: ImageResult[];
  definitions: Record<MetricName, string>;
  files: { json: string; csv: string; html: string };
}

const toRgb = (raw: { data: Uint8Array | Uint8ClampedArray; width: number; height: number }): RgbImage => ({
  data: raw.data instanceof Uint8Array ? raw.data : new Uint8Array(raw.data),
  width: raw.width,
  height: raw.height,
});

async function readRgb(file: string, what: string): Promise<RgbImage> {
  return toRgb((await decodeImage(file, what)).rgb);
}

/** A mask file at the image's size: grey (first channel) > 127, resized nearest when its size differs. */
async function readMask(file: string, width: number, height: number, what: string, notes: string[]): Promise<Mask> {
  const decoded = await decodeImage(file, what);
  let rgb = decoded.rgb;
  if (rgb.width !== width || rgb.height !== height) {
    notes.push(`${what} ${file} is ${rgb.width}x${rgb.height}; resized (nearest) to the image's ${width}x${height}`);
    rgb = resizeImage(rgb, width, height, 'nearest');
  }
  const gray = new Uint8Array(width * height);
  for (let i = 0; i < gray.length; i++) gray[i] = rgb.data[3 * i];
  return binaryMask(gray, width, height);
}

function maskPng(mask: Mask): Promise<Buffer> {
  const rgb = new Uint8Array(mask.data.length * 3);
  for (let i = 0; i < mask.data.length; i++) rgb[3 * i] = rgb[3 * i + 1] = rgb[3 * i + 2] = mask.data[i] ? 255 : 0;
  return encodePng({ width: mask.width, height: mask.height, rgb });
}

const emptyMetrics = (): Record<MetricName, number | null> => Object.fromEntries(METRICS.map((m) => [m, null])) as Record<MetricName, number | null>;

function checkSpec(spec: EvalSpec): void {
  if (!spec || typeof spec !== 'object') throw new SingleInsertError('Expected an evaluation spec object');
  if (!Array.isArray(spec.images) || spec.images.length === 0) throw new SingleInsertError('Expected at least one image to evaluate');
  for (const [i, im] of spec.images.entries()) {
    if (!im || typeof im.file !== 'string' || typeof im.prompt !== 'string') throw new SingleInsertError(`Expected { file, prompt } for images[${i}]`);
    if (!fs.existsSync(im.file)) throw new SingleInsertError(`Cannot read the image ${im.file}: the file does not exist`);
    if (im.edit && (!Array.isArray(im.edit.targets) || !Array.isArray(im.edit.without) || im.edit.targets.length !== im.edit.without.length || im.edit.targets.length === 0)) {
      throw new SingleInsertError(`images[${i}] (${im.file}): edit needs as many "without" prompts as targets`);
    }
  }
  for (const [k, f] of [['source image', spec.source], ['source mask', spec.sourceMask]] as const) {
    if (typeof f !== 'string' || !fs.existsSync(f)) throw new SingleInsertError(`Cannot read the ${k} ${String(f)}: the file does not exist`);
  }
}

/** Scores the images of `spec` with the given models and writes the report folder. */
export async function evaluate(spec: EvalSpec, models: EvalModels, run: EvalRunOptions): Promise<EvalResult> {
  checkSpec(spec);
  if (typeof run?.out !== 'string' || !run.out) throw new SingleInsertError('Expected an output folder for the evaluation report');
  const out = path.resolve(run.out);
  const progress = run.onProgress ?? (() => undefined);
  const notes = [...(spec.notes ?? [])];
  const skipped: EvalResult['skipped'] = [];
  const loadOptions: LoadOptions = { device: run.device, dtype: run.dtype };
  await fs.promises.mkdir(path.join(out, 'images'), { recursive: true });

  // 1. images and masks
  const source = await readRgb(spec.source, 'source image');
  const sourceMask = await readMask(spec.sourceMask, source.width, source.height, 'source mask', notes);
  const items: Array<{ index: number; spec: EvalImageSpec; rgb: RgbImage; mask: Mask | null; kind: ImageResult['mask']; scoring: string }> = [];
  let degenerate = 0;
  for (const [index, im] of spec.images.entries()) {
    const rgb = await readRgb(im.file, 'image');
    let mask: Mask | null = null;
    let kind: ImageResult['mask'] = 'none';
    if (im.maskFile) {
      mask = await readMask(im.maskFile, rgb.width, rgb.height, 'mask', notes);
      kind = 'file';
    } else if (im.attention) {
      const r = attentionMask(im.attention.data, im.attention.height, im.attention.width, rgb.width, rgb.height);
      mask = r.mask;
      kind = 'attention';
      if (r.degenerate) degenerate++;
    }
    items.push({ index, spec: im, rgb, mask, kind, scoring: scoringPrompt(im.prompt, spec.classWord, spec.placeholder) });
  }
  if (degenerate) notes.push(`${degenerate} attention map(s) were constant: their masks cover the whole image`);
  const withMasks = items.filter((x) => x.mask);
  if (withMasks.length < items.length) {
    notes.push(`${items.length - withMasks.length} of ${items.length} images have no mask: CLIP-I-f/b and DINO-f/b use only the ${withMasks.length} with one (give --masks)`);
  }

  const results: ImageResult[] = items.map((x) => ({
    index: x.index,
    file: x.spec.file,
    reportImage: '',
    reportMask: null,
    prompt: x.spec.prompt,
    scoringPrompt: x.scoring,
    group: x.spec.group ?? x.spec.prompt,
    seed: x.spec.seed ?? null,
    mask: x.kind,
    scores: {},
    esr: null,
  }));

  const need = (model: 'clip' | 'dino' | 'lpips') => METRICS.filter((m) => METRIC_MODEL[m] === model);
  const skip = (model: 'clip' | 'dino' | 'lpips', reason: string) => skipped.push({ metrics: need(model), reason });
  const flags = { clip: '--clip', dino: '--dino', lpips: '--lpips' } as const;
  const given = (model: 'clip' | 'dino' | 'lpips'): string | null => {
    const v = models[model];
    if (typeof v === 'string' && v) return v;
    skip(model, `no ${model.toUpperCase()} model was given (${flags[model]})`);
    return null;
  };

  // 2. CLIP: foreground/background views vs the source, whole image vs its prompt, ESR texts
  const clipDir = given('clip');
  if (clipDir) {
    progress({ stage: 'loading', step: 0, steps: 1 });
    const clip = await ClipScorer.load(clipDir, loadOptions);
    notes.push(...clip.notes);
    try {
      const steps = 4;
      progress({ stage: 'clip', step: 0, steps });
      const [srcF, srcB] = await clip.imageEmbeddings([composite(source, sourceMask, 'foreground'), composite(source, sourceMask, 'background')]);
      const fg = await clip.imageEmbeddings(withMasks.map((x) => composite(x.rgb, x.mask!, 'foreground')));
      const bg = await clip.imageEmbeddings(withMasks.map((x) => composite(x.rgb, x.mask!, 'background')));
      withMasks.forEach((x, k) => {
        results[x.index].scores['CLIP-I-f'] = cosine(srcF, fg[k]);
        results[x.index].scores['CLIP-I-b'] = cosine(srcB, bg[k]);
      });
      progress({ stage: 'clip', step: 2, steps });
      const whole = await clip.imageEmbeddings(items.map((x) => x.rgb));
      const texts = new Set<string>(items.map((x) => x.scoring));
      for (const x of items) for (const w of x.spec.edit?.without ?? []) texts.add(scoringPrompt(w, spec.classWord, spec.placeholder));
      const textList = [...texts];
      const textEmb = new Map(textList.map((t, i) => [t, i]));
      const embs = await clip.textEmbeddings(textList);
      progress({ stage: 'clip', step: 3, steps });
      items.forEach((x, k) => {
        const promptScore = cosine(whole[k], embs[textEmb.get(x.scoring)!]);
        results[x.index].scores['CLIP-T'] = promptScore;
        if (x.spec.edit) {
          const targets = x.spec.edit.targets.map((target, t) => ({
            target,
            with: promptScore,
            without: cosine(whole[k], embs[textEmb.get(scoringPrompt(x.spec.edit!.without[t], spec.classWord, spec.placeholder))!]),
          }));
          results[x.index].esr = { success: editSucceeded(targets), targets };
        }
      });
      progress({ stage: 'clip', step: steps, steps });
    } finally {
      clip.dispose();
    }
  }

  // 3. DINO: foreground/background views vs the source
  const dinoDir = given('dino');
  if (dinoDir) {
    progress({ stage: 'loading', step: 0, steps: 1 });
    const dino = await DinoScorer.load(dinoDir, loadOptions);
    notes.push(...dino.notes);
    try {
      progress({ stage: 'dino', step: 0, steps: 2 });
      const [srcF, srcB] = await dino.embeddings([composite(source, sourceMask, 'foreground'), composite(source, sourceMask, 'background')]);
      const fg = await dino.embeddings(withMasks.map((x) => composite(x.rgb, x.mask!, 'foreground')));
      progress({ stage: 'dino', step: 1, steps: 2 });
      const bg = await dino.embeddings(withMasks.map((x) => composite(x.rgb, x.mask!, 'background')));
      withMasks.forEach((x, k) => {
        results[x.index].scores['DINO-f'] = cosine(srcF, fg[k]);
        results[x.index].scores['DINO-b'] = cosine(srcB, bg[k]);
      });
      progress({ stage: 'dino', step: 2, steps: 2 });
    } finally {
      dino.dispose();
    }
  }

  // 4. groups; LPIPS diversity within each
  const groups = new Map<string, number[]>();
  results.forEach((r, i) => groups.set(r.group, [...(groups.get(r.group) ?? []), i]));
  const div = new Map<string, number | null>();
  const lpipsDir = given('lpips');
  if (lpipsDir) {
    progress({ stage: 'loading', step: 0, steps: 1 });
    const lpips = await LpipsScorer.load(lpipsDir, loadOptions);
    try {
      let done = 0;
      progress({ stage: 'lpips', step: 0, steps: groups.size });
      for (const [g, idx] of groups) {
        const ps = pairs(idx.length).map(([a, b]) => [items[idx[a]].rgb, items[idx[b]].rgb] as [RgbImage, RgbImage]);
        div.set(g, ps.length ? diversity(await lpips.distances(ps)) : null);
        progress({ stage: 'lpips', step: ++done, steps: groups.size });
      }
    } finally {
      lpips.dispose();
    }
    if ([...groups.values()].every((idx) => idx.length < 2)) notes.push('DIV needs at least two images of the same prompt (different seeds); every prompt has one');
  }
  if (!results.some((r) => r.esr) && clipDir) notes.push('ESR: no image has edit targets (prompts of assets/presets.json edits, or "targets" in the prompts file)');

  // 5. aggregate: per prompt, then overall
  const aggregate = (idx: number[], divValue: number | null): Record<MetricName, number | null> => {
    const m = emptyMetrics();
    for (const k of ['CLIP-I-f', 'CLIP-I-b', 'DINO-f', 'DINO-b', 'CLIP-T'] as const) m[k] = mean(idx.map((i) => results[i].scores[k]));
    m.DIV = divValue;
    const edited = idx.filter((i) => results[i].esr);
    m.ESR = editSuccessRate(edited.map((i) => results[i].esr!.success));
    return m;
  };
  const prompts: PromptResult[] = [...groups].map(([g, idx]) => ({
    prompt: results[idx[0]].prompt,
    scoringPrompt: results[idx[0]].scoringPrompt,
    group: g,
    images: idx.length,
    metrics: aggregate(idx, div.get(g) ?? null),
  }));
  const summary = aggregate(
    results.map((_, i) => i),
    mean([...div.values()]),
  );

  // 6. the report folder: image and mask copies, then the three files (each written atomically)
  progress({ stage: 'report', step: 0, steps: 1 });
  const digits = String(items.length).length;
  for (const x of items) {
    const r = results[x.index];
    const base = `${String(x.index).padStart(digits, '0')}-${path.basename(x.spec.file).replace(/[^\w.-]+/g, '_')}`;
    r.reportImage = `images/${base}`;
    await fs.promises.copyFile(x.spec.file, path.join(out, r.reportImage));
    if (x.mask) {
      r.reportMask = `images/${base.replace(/\.[^.]*$/, '')}.mask.png`;
      await writeFileAtomic(path.join(out, r.reportMask), await maskPng(x.mask));
    }
  }
  const sourceCopy = `images/source${path.extname(spec.source) || '.png'}`;
  await fs.promises.copyFile(spec.source, path.join(out, sourceCopy));
  const sourceMaskCopy = 'images/source.mask.png';
  await writeFileAtomic(path.join(out, sourceMaskCopy), await maskPng(sourceMask));

  const files = { json: path.join(out, 'metrics.json'), csv: path.join(out, 'metrics.csv'), html: path.join(out, 'report.html') };
  const result: EvalResult = {
    format: EVAL_FORMAT,
    version: EVAL_VERSION,
    createdAt: new Date().toISOString(),
    mode: spec.mode,
    classWord: spec.classWord,
    placeholder: spec.placeholder,
    source: { image: spec.source, mask: spec.sourceMask, reportImage: sourceCopy, reportMask: sourceMaskCopy },
    models: { clip: clipDir, dino: dinoDir, lpips: lpipsDir },
    summary,
    counts: { images: results.length, prompts: prompts.length, editedImages: results.filter((r) => r.esr).length, imagesWithMasks: withMasks.length },
    skipped,
    notes,
    prompts,
    images: results,
    definitions: DEFINITIONS,
    files,
  };
  await writeFileAtomic(files.json, Buffer.from(JSON.stringify(result, null, 2) + '\n'));
  await writeFileAtomic(files.csv, Buffer.from(renderCsv(result)));
  await writeFileAtomic(files.html, Buffer.from(renderHtml(result)));
  progress({ stage: 'report', step: 1, steps: 1 });
  return result;
}
