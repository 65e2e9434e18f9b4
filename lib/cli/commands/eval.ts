/**
 * `singleinsert-native eval`: SingleInsert's metrics (CLIP-I-f ↑, CLIP-I-b ↓, DINO-f ↑, DINO-b ↓,
 * CLIP-T ↑, DIV ↑, ESR ↑; lib/eval/metrics.ts) and a report folder (metrics.json, metrics.csv,
 * report.html with the images).
 *
 *   eval --concept <dir> --model <sd> [--seeds 4] [--steps 50] --clip <dir> --dino <dir> --lpips <dir>
 *       generates the presets' ten edit prompts × seeds with the concept, masks from cross-attention
 *   eval --images <dir> --prompts <file> --source <image> --source-mask <mask> [--masks <dir>] [--class face]
 *       scores images from any method (prompts file format: lib/eval/inputs.ts)
 *
 * A metric model that is not given is skipped (only its metrics), and the report says so. CLIP and
 * DINO default to openai/clip-vit-base-patch32 and facebook/dino-vits16 when those are in the local
 * Hugging Face cache.
 */
import * as path from 'node:path';
import type { ArgumentsCamelCase, Argv } from 'yargs';
import { SingleInsertError } from '../../errors';
import { evaluate, EvalImageSpec, EvalResult } from '../../eval/eval';
import { conceptSources, generateConceptGrid } from '../../eval/grid';
import { loadConcept } from '../../concepts';
import { findMask, imagesFromPromptsFile, readPromptsFile } from '../../eval/inputs';
import { formatScore } from '../../eval/report';
import { METRICS, HIGHER_IS_BETTER } from '../../eval/metrics';
import { readPresets } from '../../presets';
import { DEFAULT_GUIDANCE, DEFAULT_SCHEDULER, DEFAULT_STEPS } from '../../generate';
import type { DTypeOption } from '../../models';
import { hubCacheDir, resolveHubId } from '../../model-files';
import { ProgressReporter } from '../../progress';
import { DEFAULT_PLACEHOLDER } from '../../prompts';
import { SCHEDULER_ALIASES, SCHEDULER_NAMES } from '../../schedulers';

export const command = 'eval';
export const desc = 'Score generated images (CLIP-I-f/b, DINO-f/b, CLIP-T, DIV, ESR) and write an HTML report';

/** Hub ids tried when --clip / --dino are not given (only from the local cache; nothing is downloaded). */
export const DEFAULT_CLIP = 'openai/clip-vit-base-patch32';
export const DEFAULT_DINO = 'facebook/dino-vits16';

export interface EvalCommandOptions {
  concept?: string;
  images?: string;
  model?: string;
  seeds?: number;
  seed?: number;
  steps?: number;
  scheduler?: string;
  guidance?: number;
  width?: number;
  height?: number;
  source?: string;
  sourceMask?: string;
  prompts?: string;
  masks?: string;
  class?: string;
  placeholder?: string;
  clip?: string;
  dino?: string;
  lpips?: string;
  presets?: string;
  out?: string;
  device?: string;
  dtype?: DTypeOption;
}

export function builder(y: Argv): Argv<EvalCommandOptions & { json?: boolean }> {
  return y
    .option('concept', { type: 'string', describe: 'concept folder (concept.json): generate the edit prompts × seeds and score them' })
    .option('images', { type: 'string', describe: 'folder of images from any method to score (with --prompts, --source, --source-mask)' })
    .option('model', { type: 'string', describe: 'Stable Diffusion model for --concept (folder, hub id or .safetensors)' })
    .option('seeds', { type: 'number', default: 4, describe: '--concept: images per prompt (seeds --seed, --seed+1, ...)' })
    .option('seed', { type: 'number', default: 0, describe: '--concept: the first seed' })
    .option('steps', { type: 'number', default: DEFAULT_STEPS, describe: '--concept: denoising steps' })
    .option('scheduler', { type: 'string', default: DEFAULT_SCHEDULER, choices: [...SCHEDULER_NAMES, ...Object.keys(SCHEDULER_ALIASES)], describe: '--concept: sampler' })
    .option('guidance', { type: 'number', default: DEFAULT_GUIDANCE, describe: '--concept: classifier-free guidance scale' })
    .option('width', { type: 'number', describe: '--concept: image width (default: the model\'s)' })
    .option('height', { type: 'number', describe: '--concept: image height (default: the model\'s)' })
    .option('source', { type: 'string', describe: 'the concept\'s source image (default with --concept: the one it was trained on)' })
    .option('source-mask', { type: 'string', describe: 'its foreground mask, white = concept (default with --concept: the training mask)' })
    .option('prompts', { type: 'string', describe: '--images: JSON or text lines mapping image files to prompts (see the docs)' })
    .option('masks', { type: 'string', describe: 'folder of masks for the scored images (default with --concept: cross-attention masks)' })
    .option('class', { type: 'string', describe: 'the class word (default with --concept: the concept\'s)' })
    .option('placeholder', { type: 'string', describe: `the placeholder in the prompts (default: the concept's, else "${DEFAULT_PLACEHOLDER}")` })
    .option('clip', { type: 'string', describe: `CLIPModel folder or cached hub id (default: ${DEFAULT_CLIP} if cached)` })
    .option('dino', { type: 'string', describe: `DINO ViTModel folder or cached hub id (default: ${DEFAULT_DINO} if cached)` })
    .option('lpips', { type: 'string', describe: 'LPIPS folder or .safetensors (AlexNet + lin layers; see `convert`)' })
    .option('presets', { type: 'string', describe: 'prompt presets JSON (default: the package\'s assets/presets.json)' })
    .option('out', { type: 'string', default: 'eval', describe: 'report folder' })
    .option('json', { type: 'boolean', default: false, describe: 'print metrics.json instead of the summary' })
    .option('device', { type: 'string', default: 'cpu', describe: '"cpu", "cuda" or "cuda:N"' })
    .option('dtype', { type: 'string', default: 'fp32', choices: ['fp32', 'fp16', 'bf16'], describe: 'weights dtype' }) as Argv<EvalCommandOptions & { json?: boolean }>;
}

export interface EvalIo {
  signal?: AbortSignal;
  stderr?: NodeJS.WritableStream & { isTTY?: boolean };
  progress?: boolean;
}

/** A given model, or the default hub id when it is cached, or null (the metric is then skipped). */
function metricModel(given: string | undefined, fallback: string | null): string | null {
  if (given) return given;
  if (!fallback) return null;
  try {
    return resolveHubId(fallback);
  } catch {
    return null;
  }
}

/** The command's work (progress on io.stderr); for in-process tests. */
export async function runEval(o: EvalCommandOptions, io: EvalIo = {}): Promise<EvalResult> {
  if (!!o.concept === !!o.images) throw new SingleInsertError('Give either --concept <dir> (generate and score) or --images <dir> (score existing images)');
  const stderr = io.stderr ?? process.stderr;
  const reporters = new Map<string, { reporter: ProgressReporter; started: number }>();
  const report = (label: string, step: number, steps: number, info?: string) => {
    if (io.progress === false) return;
    let r = reporters.get(label);
    if (!r) {
      for (const other of reporters.values()) other.reporter.stop();
      r = { reporter: new ProgressReporter({ label, stream: stderr }), started: Date.now() };
      reporters.set(label, r);
    }
    r.reporter.update({ step, steps, info, elapsedSec: (Date.now() - r.started) / 1000 });
  };
  const presets = readPresets(o.presets);
  const out = path.resolve(o.out ?? 'eval');
  const notes: string[] = [];
  let images: EvalImageSpec[];
  let classWord: string;
  let placeholder: string;
  let source = o.source;
  let sourceMask = o.sourceMask;

  try {
    if (o.concept) {
      if (!o.model) throw new SingleInsertError('--concept needs --model (the Stable Diffusion model to generate with)');
      const concept = await loadConcept(o.concept, { placeholder: o.placeholder });
      const cls = o.class ?? concept.classWord;
      if (!cls) throw new SingleInsertError(`${path.join(o.concept, 'concept.json')} records no class word: pass --class`);
      classWord = cls;
      placeholder = concept.placeholder;
      const sources = conceptSources(concept);
      source ??= sources.image ?? undefined;
      sourceMask ??= sources.mask ?? undefined;
      const n = o.seeds ?? 4;
      if (!Number.isInteger(n) || n < 1) throw new SingleInsertError(`Expected a positive integer for --seeds but received ${n}`);
      const first = o.seed ?? 0;
      const seeds = Array.from({ length: n }, (_, i) => first + i);
      const grid = await generateConceptGrid(
        { model: o.model, concept: o.concept, classWord, placeholder, edits: presets.edits, seeds, steps: o.steps, scheduler: o.scheduler, guidance: o.guidance, width: o.width, height: o.height, out: path.join(out, 'generated'), device: o.device, dtype: o.dtype },
        { signal: io.signal, onProgress: (e) => report('generating', (e.image - 1) * e.steps + e.step, e.images * e.steps, `image ${e.image}/${e.images}`) },
      );
      images = grid.images;
      notes.push(
        `generated with ${o.model}: ${presets.edits.length} edit prompts × seeds ${seeds[0]}..${seeds[seeds.length - 1]}, ${o.steps ?? DEFAULT_STEPS} steps, ${o.scheduler ?? DEFAULT_SCHEDULER}, guidance ${o.guidance ?? DEFAULT_GUIDANCE}`,
        ...grid.notes,
      );
      if (o.masks) {
        for (const im of images) {
          const m = findMask(o.masks, im.file);
          if (m) {
            im.maskFile = m;
            delete im.attention;
          }
        }
      }
    } else {
      if (!o.prompts) throw new SingleInsertError('--images needs --prompts (a file mapping image files to prompts)');
      const prompts = readPromptsFile(o.prompts);
      classWord = o.class ?? prompts.classWord ?? '';
      placeholder = o.placeholder ?? prompts.placeholder ?? DEFAULT_PLACEHOLDER;
      if (!classWord) notes.push('no class word (--class): the placeholder is removed from prompts for CLIP-T and presets cannot be matched for ESR');
      images = imagesFromPromptsFile(o.images!, prompts, { masksDir: o.masks, presets, classWord, placeholder }, notes);
    }
    if (!source || !sourceMask) throw new SingleInsertError('Give the concept\'s source image and its mask (--source, --source-mask)');

    const clip = metricModel(o.clip, DEFAULT_CLIP);
    const dino = metricModel(o.dino, DEFAULT_DINO);
    if (!clip) notes.push(`no --clip, and ${DEFAULT_CLIP} is not in the local Hugging Face cache (${hubCacheDir()})`);
    if (!dino) notes.push(`no --dino, and ${DEFAULT_DINO} is not in the local Hugging Face cache (${hubCacheDir()})`);
    const result = await evaluate(
      { mode: o.concept ? 'concept' : 'images', source, sourceMask, images, classWord, placeholder, notes },
      { clip, dino, lpips: metricModel(o.lpips, null) },
      { out, device: o.device, dtype: o.dtype, onProgress: (e) => e.stage !== 'loading' && report(`scoring ${e.stage}`, e.step, e.steps) },
    );
    return result;
  } finally {
    for (const r of reporters.values()) r.reporter.stop();
  }
}

/** The summary as a few lines: the table in the paper's order, skipped metrics, the files. */
export function formatSummary(r: EvalResult): string {
  const head = METRICS.map((m) => `${m} ${HIGHER_IS_BETTER[m] ? '↑' : '↓'}`);
  const values = METRICS.map((m, i) => formatScore(r.summary[m]).padStart(head[i].length));
  const lines = [head.join('  '), values.join('  ')];
  for (const s of r.skipped) lines.push(`skipped ${s.metrics.join(', ')}: ${s.reason}`);
  lines.push(`${r.counts.images} images, ${r.counts.prompts} prompts → ${r.files.html}`);
  return lines.join('\n');
}

export async function handler(argv: ArgumentsCamelCase<EvalCommandOptions & { json?: boolean }>): Promise<void> {
  const controller = new AbortController();
  const onSigint = () => controller.abort();
  process.once('SIGINT', onSigint);
  try {
    const keys: Array<keyof EvalCommandOptions> = [
      'concept', 'images', 'model', 'seeds', 'seed', 'steps', 'scheduler', 'guidance', 'width', 'height', 'source', 'sourceMask',
      'prompts', 'masks', 'class', 'placeholder', 'clip', 'dino', 'lpips', 'presets', 'out', 'device', 'dtype',
    ];
    const opts = Object.fromEntries(keys.filter((k) => argv[k] !== undefined).map((k) => [k, argv[k]])) as EvalCommandOptions;
    const result = await runEval(opts, { signal: controller.signal });
    process.stdout.write(argv.json ? JSON.stringify(result, null, 2) + '\n' : formatSummary(result) + '\n');
  } finally {
    process.removeListener('SIGINT', onSigint);
  }
}
