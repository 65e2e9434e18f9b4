/**
 * `singleinsert-native generate --model <dir|hub id|file.safetensors> --prompt "..."`: text to image.
 * Writes `<out>/<seed>-<index>.png` (never overwriting: `-1`, `-2`, ... are added) with the A1111
 * `parameters` text chunk, prints the written paths (or a JSON report with --json), shows a
 * progress bar on a terminal and plain lines otherwise (on stderr). Ctrl-C stops the run before
 * the next UNet call (exit code 130, set by lib/cli/index.ts); a second Ctrl-C quits at once.
 *
 * Concepts and other add-ons (all repeatable):
 *   --concept <dir> | --concept <placeholder>=<dir>   a SingleInsert concept folder (renaming its placeholder)
 *   --lora-scale <s>                                  the LoRA strength of each --concept, in order (default 1)
 *   --lora <file.safetensors>[:<scale>]               a kohya LoRA (default scale 1)
 *   --embedding <file.safetensors>[:<placeholder>]    a textual-inversion embedding (default placeholder:
 *                                                     its token, or the file name)
 *   --preset edits|views                              the preset prompts (assets/presets.json) for the first
 *                                                     concept, or for the subject given with --prompt; writes
 *                                                     <preset>-<row>-<name>-<seed>-<i>.png per image and sheet.png
 * Every preset row uses the same seed, so rows differ only by their prompt.
 */
import { randomInt } from 'node:crypto';
import * as fs from 'node:fs';
import type { ArgumentsCamelCase, Argv } from 'yargs';
import { contactSheet } from '../../contact-sheet';
import { loadEmbedding } from '../../embeddings';
import { invalidParameterError, SingleInsertError } from '../../errors';
import { ConceptUse, DEFAULT_GUIDANCE, DEFAULT_SCHEDULER, DEFAULT_STEPS, EmbeddingUse, GeneratedImage, LoraFileUse, modelLabel, toPng } from '../../generate';
import { DTypeOption, loadPipeline } from '../../models';
import { writeNewFile } from '../../png';
import { expandPreset, PRESET_NAMES, PresetName } from '../../presets';
import { ProgressReporter } from '../../progress';
import { SCHEDULER_ALIASES, SCHEDULER_NAMES } from '../../schedulers';

export const command = 'generate';
export const desc = 'Generate images from a text prompt';

export interface GenerateCommandOptions {
  model: string;
  /** the prompt; with preset, the subject that replaces "{placeholder} {class}" in every preset prompt */
  prompt?: string;
  negativePrompt?: string;
  steps?: number;
  guidance?: number;
  scheduler?: string;
  seed?: number;
  /** images */
  n?: number;
  width?: number;
  height?: number;
  eta?: number;
  /** output folder, created if needed; default "." */
  out?: string;
  device?: string;
  dtype?: DTypeOption;
  /** concept folders, "<dir>" or "<placeholder>=<dir>" */
  concept?: string[];
  /** LoRA strength per concept, in --concept order (default 1) */
  loraScale?: number[];
  /** kohya LoRA files, "<file>" or "<file>:<scale>" */
  lora?: string[];
  /** embeddings, "<file>" or "<file>:<placeholder>" */
  embedding?: string[];
  preset?: PresetName;
  /** write sheet.png (default: with preset) */
  sheet?: boolean;
  /** the UNet in channels-last memory order (faster on CUDA with bf16/fp16) */
  channelsLast?: boolean;
}

/** Contact sheet tiles are at least this wide, so the prompt under a row of tiny (64 px) images stays readable. */
const SHEET_MIN_TILE = 256;
const sheetTileWidth = (imageWidth: number) => Math.max(imageWidth, SHEET_MIN_TILE);

export interface GenerateIo {
  signal?: AbortSignal;
  /** where progress and warnings go; default process.stderr */
  stderr?: NodeJS.WritableStream & { isTTY?: boolean };
  /** show progress (default true) */
  progress?: boolean;
}

export interface GenerateReport {
  model: string;
  files: string[];
  seed: number;
  parameters: string;
  images: Array<{ file: string; index: number; width: number; height: number; prompt: string; negativePrompt: string; parameters: string; row?: number; name?: string }>;
  /** the contact sheet, when one was written */
  sheet?: string;
  concepts: Array<{ dir: string; placeholder: string; classWord?: string; lora: string | null; loraScale: number }>;
  warnings: string[];
  elapsedSec: number;
}

export function builder(y: Argv): Argv<Partial<GenerateCommandOptions> & { json?: boolean }> {
  return y
    .option('model', { type: 'string', demandOption: true, describe: 'diffusers folder, Hugging Face hub id (in the local cache) or single-file .safetensors checkpoint' })
    .option('prompt', { type: 'string', describe: 'the prompt (with --preset: the subject put in every preset prompt, e.g. "* face and me dog")' })
    .option('concept', { type: 'string', array: true, requiresArg: true, describe: 'SingleInsert concept folder, or <placeholder>=<folder> to rename its placeholder (repeatable)' })
    .option('lora-scale', { type: 'number', array: true, requiresArg: true, describe: 'LoRA strength of each --concept, in order (default 1)' })
    .option('lora', { type: 'string', array: true, requiresArg: true, describe: 'kohya LoRA .safetensors, optionally :<scale> (repeatable)' })
    .option('embedding', { type: 'string', array: true, requiresArg: true, describe: 'textual-inversion .safetensors, optionally :<placeholder> (repeatable)' })
    .option('preset', { type: 'string', choices: [...PRESET_NAMES], describe: 'generate the preset prompts for the first concept (edits or novel views) and a contact sheet' })
    .option('sheet', { type: 'boolean', describe: 'also write a contact sheet sheet.png (default: with --preset)' })
    .option('negative-prompt', { type: 'string', default: '', describe: 'what to steer away from (used when --guidance > 1)' })
    .option('steps', { type: 'number', default: DEFAULT_STEPS, describe: 'denoising steps' })
    .option('guidance', { type: 'number', default: DEFAULT_GUIDANCE, describe: 'classifier-free guidance scale' })
    .option('scheduler', { type: 'string', default: DEFAULT_SCHEDULER, choices: [...SCHEDULER_NAMES, ...Object.keys(SCHEDULER_ALIASES)], describe: 'sampler' })
    .option('seed', { type: 'number', describe: 'random seed (default: random, printed)' })
    .option('n', { type: 'number', default: 1, describe: 'number of images' })
    .option('width', { type: 'number', describe: 'image width, a multiple of 8 (default: the model\'s, 512 for SD v1.5)' })
    .option('height', { type: 'number', describe: 'image height, a multiple of 8 (default: the model\'s, 512 for SD v1.5)' })
    .option('eta', { type: 'number', default: 0, describe: 'DDIM eta (0 = deterministic)' })
    .option('out', { type: 'string', default: '.', describe: 'output folder (created if needed)' })
    .option('json', { type: 'boolean', default: false, describe: 'print a JSON report instead of the file paths' })
    .option('device', { type: 'string', default: 'cpu', describe: '"cpu", "cuda" or "cuda:N"' })
    .option('dtype', { type: 'string', default: 'fp32', choices: ['fp32', 'fp16', 'bf16'], describe: 'weights dtype (fp16 needs CUDA; latents and scheduler stay fp32)' })
    .option('channels-last', { type: 'boolean', default: false, describe: 'the UNet in channels-last memory order (faster on CUDA with bf16/fp16)' }) as Argv<
    Partial<GenerateCommandOptions> & { json?: boolean }
  >;
}

/** "<placeholder>=<dir>" or "<dir>" (a path that exists is always a folder, even with "=" in it). */
export function parseConceptArg(arg: string): { dir: string; placeholder?: string } {
  if (typeof arg !== 'string' || !arg) throw invalidParameterError('--concept', 'a concept folder or <placeholder>=<folder>', arg);
  const m = /^([^=\s/\\]+)=(.+)$/.exec(arg);
  if (m && !fs.existsSync(arg)) return { placeholder: m[1], dir: m[2] };
  return { dir: arg };
}

/** "<file>:<scale>" or "<file>". */
export function parseLoraArg(arg: string): { file: string; scale: number } {
  if (typeof arg !== 'string' || !arg) throw invalidParameterError('--lora', 'a LoRA file, optionally :<scale>', arg);
  const m = /^(.+):([-+]?(?:\d+\.?\d*|\.\d+)(?:e[-+]?\d+)?)$/i.exec(arg);
  if (m && !fs.existsSync(arg)) return { file: m[1], scale: Number(m[2]) };
  return { file: arg, scale: 1 };
}

/** "<file>:<placeholder>" or "<file>". */
export function parseEmbeddingArg(arg: string): { file: string; placeholder?: string } {
  if (typeof arg !== 'string' || !arg) throw invalidParameterError('--embedding', 'an embedding file, optionally :<placeholder>', arg);
  const i = arg.lastIndexOf(':');
  const after = arg.slice(i + 1);
  // "C:\x.safetensors" and paths that exist are files; the suffix must look like a placeholder
  if (i > 0 && !fs.existsSync(arg) && after && !/[\s/\\]/.test(after) && !/\.safetensors$/i.test(after)) return { file: arg.slice(0, i), placeholder: after };
  return { file: arg };
}

interface Row {
  prompt: string;
  /** file-name label for preset rows */
  name?: string;
}

/** The command's work without printing results (progress and warnings go to io.stderr); for in-process tests. */
export async function runGenerate(opts: GenerateCommandOptions, io: GenerateIo = {}): Promise<GenerateReport> {
  if (typeof opts.model !== 'string' || !opts.model) throw invalidParameterError('model', 'a model folder, hub id or .safetensors file', opts.model);
  const out = opts.out ?? '.';
  if (typeof out !== 'string' || !out) throw invalidParameterError('out', 'a folder path', out);
  const preset = opts.preset;
  if (preset !== undefined && !PRESET_NAMES.includes(preset)) throw invalidParameterError('preset', `one of ${PRESET_NAMES.join(', ')}`, preset);
  if (preset === undefined && (typeof opts.prompt !== 'string')) throw invalidParameterError('prompt', 'a prompt (or --preset edits|views)', opts.prompt);
  if (opts.prompt !== undefined && typeof opts.prompt !== 'string') throw invalidParameterError('prompt', 'a string', opts.prompt);
  const conceptArgs = (opts.concept ?? []).map(parseConceptArg);
  const loraArgs = (opts.lora ?? []).map(parseLoraArg);
  const embeddingArgs = (opts.embedding ?? []).map(parseEmbeddingArg);
  const scales = opts.loraScale ?? [];
  if (scales.length > conceptArgs.length) {
    throw new SingleInsertError(`Expected at most ${conceptArgs.length} --lora-scale value(s), one per --concept in order, but received ${scales.length}`);
  }
  scales.forEach((s, i) => {
    if (typeof s !== 'number' || !Number.isFinite(s)) throw invalidParameterError(`--lora-scale #${i + 1}`, 'a finite number', s);
  });
  const stderr = io.stderr ?? process.stderr;
  const started = Date.now();

  const pipeline = await loadPipeline(opts.model, { device: opts.device, dtype: opts.dtype, channelsLast: opts.channelsLast });
  let reporter: ProgressReporter | null = null;
  try {
    // concepts, embeddings, LoRAs
    const concepts: ConceptUse[] = [];
    for (const [i, c] of conceptArgs.entries()) {
      concepts.push({ concept: await pipeline.loadConcept(c.dir, { placeholder: c.placeholder }), loraScale: scales[i] ?? 1 });
    }
    const hiddenSize = pipeline.textEncoder.config.hidden_size as number;
    const embeddings: EmbeddingUse[] = [];
    for (const e of embeddingArgs) {
      const loaded = await loadEmbedding(e.file, { hiddenSize });
      const placeholder = e.placeholder ?? loaded.suggestedPlaceholder;
      if (!placeholder) throw new SingleInsertError(`${e.file}: no placeholder given and the file name is not one; use --embedding ${e.file}:<placeholder>`);
      embeddings.push({ vectors: loaded.vectors, placeholder });
    }
    const loras: LoraFileUse[] = loraArgs.map((l) => ({ file: l.file, scale: l.scale }));

    // the prompts: one, or a preset's for the first concept (or for the --prompt subject)
    let rows: Row[];
    if (preset) {
      let subject: Parameters<typeof expandPreset>[1];
      if (opts.prompt !== undefined && opts.prompt.trim()) subject = { subject: opts.prompt };
      else if (concepts.length > 0) {
        const { concept } = concepts[0];
        if (!concept.classWord) throw new SingleInsertError(`The concept ${concept.dir} records no class word; give the subject with --prompt (e.g. --prompt "${concept.placeholder} face")`);
        subject = { placeholder: concept.placeholder, class: concept.classWord };
      } else {
        throw new SingleInsertError(`--preset ${preset} needs a --concept (for its placeholder and class word) or a --prompt with the subject`);
      }
      rows = expandPreset(preset, subject).map((p) => ({ prompt: p.prompt, name: `${preset}-${String(p.index).padStart(2, '0')}-${p.name}` }));
    } else {
      rows = [{ prompt: opts.prompt as string }];
    }
    // every row with the same seed, so preset rows differ only by their prompt
    const seed = opts.seed ?? (rows.length > 1 ? randomInt(0, 2 ** 32) : undefined);

    const images: GenerateReport['images'] = [];
    const warnings: string[] = [];
    const sheetRows: Array<{ label: string; images: GeneratedImage[] }> = [];
    let first: { seed: number; parameters: string } | undefined;
    for (const [r, row] of rows.entries()) {
      const label = rows.length > 1 ? `sampling ${r + 1}/${rows.length}` : 'sampling';
      const rep = io.progress === false ? null : new ProgressReporter({ label, stream: stderr });
      reporter = rep;
      const result = await pipeline.generate(
        {
          prompt: row.prompt,
          negativePrompt: opts.negativePrompt,
          steps: opts.steps,
          guidance: opts.guidance,
          scheduler: opts.scheduler,
          seed,
          numImages: opts.n,
          width: opts.width,
          height: opts.height,
          eta: opts.eta,
          concepts,
          embeddings,
          loras,
        },
        { signal: io.signal, onProgress: rep ? (e) => rep.update(e) : undefined },
      );
      rep?.stop();
      for (const w of result.warnings) {
        if (warnings.includes(w)) continue;
        warnings.push(w);
        stderr.write(`warning: ${w}\n`);
      }
      first ??= { seed: result.seed, parameters: result.parameters };
      for (const image of result.images) {
        const png = await toPng(image, image.parameters);
        const base = row.name ? `${row.name}-${result.seed}-${image.index}` : `${result.seed}-${image.index}`;
        const file = await writeNewFile(out, base, '.png', png);
        images.push({
          file, index: image.index, width: image.width, height: image.height, prompt: image.prompt, negativePrompt: image.negativePrompt, parameters: image.parameters,
          ...(rows.length > 1 ? { row: r, name: row.name } : {}),
        });
      }
      sheetRows.push({ label: row.prompt, images: result.images });
    }

    let sheet: string | undefined;
    if (opts.sheet ?? preset !== undefined) {
      const { png } = await contactSheet(sheetRows, { tileWidth: sheetTileWidth(sheetRows[0].images[0].width) });
      sheet = await writeNewFile(out, 'sheet', '.png', png);
    }
    return {
      model: modelLabel(pipeline.modelPath),
      files: images.map((i) => i.file),
      seed: first!.seed,
      parameters: first!.parameters,
      images,
      ...(sheet ? { sheet } : {}),
      concepts: concepts.map((c) => ({
        dir: c.concept.dir, placeholder: c.concept.placeholder, classWord: c.concept.classWord, lora: c.concept.lora?.file ?? null, loraScale: c.loraScale ?? 1,
      })),
      warnings,
      elapsedSec: (Date.now() - started) / 1000,
    };
  } finally {
    reporter?.stop();
    pipeline.dispose();
  }
}

export async function handler(argv: ArgumentsCamelCase<Partial<GenerateCommandOptions> & { json?: boolean }>): Promise<void> {
  const controller = new AbortController();
  let interrupted = false;
  const onSigint = () => {
    if (interrupted) {
      // second Ctrl-C: fall back to the default action (terminate now)
      process.removeListener('SIGINT', onSigint);
      process.kill(process.pid, 'SIGINT');
      return;
    }
    interrupted = true;
    process.stderr.write('\nInterrupted: stopping before the next step (Ctrl-C again to quit at once)\n');
    controller.abort();
  };
  process.on('SIGINT', onSigint);
  let report: GenerateReport;
  try {
    report = await runGenerate(
      {
        model: argv.model as string,
        prompt: argv.prompt,
        negativePrompt: argv.negativePrompt,
        steps: argv.steps,
        guidance: argv.guidance,
        scheduler: argv.scheduler,
        seed: argv.seed,
        n: argv.n,
        width: argv.width,
        height: argv.height,
        eta: argv.eta,
        out: argv.out,
        device: argv.device,
        dtype: argv.dtype,
        concept: argv.concept,
        loraScale: argv.loraScale,
        lora: argv.lora,
        embedding: argv.embedding,
        preset: argv.preset,
        sheet: argv.sheet,
        channelsLast: argv.channelsLast,
      },
      { signal: controller.signal },
    );
  } finally {
    process.removeListener('SIGINT', onSigint);
  }
  const lines = report.sheet ? [...report.files, report.sheet] : report.files;
  process.stdout.write(argv.json ? JSON.stringify(report, null, 2) + '\n' : lines.join('\n') + '\n');
}
