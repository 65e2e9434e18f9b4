/**
 * `singleinsert-native demo`: the README's first Quick start command. Trains a concept on the
 * bundled example (assets/example/face.png + face_mask.png, class "face") with the paper's
 * two-stage recipe, then generates the ten preset edits of it with a contact sheet.
 *
 * Model: --model, else $SINGLEINSERT_MODEL, else SD v1.5 from the local Hugging Face cache, else
 * the embedded tiny model (random weights, built on first use) — and the output says which.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import type { Argv } from 'yargs';
import { SingleInsertError } from '../../errors';
import { resolveHubId } from '../../model-files';
import { native, packageRoot } from '../../native';
import { ensureTinyModel, SD15_HUB_IDS } from '../../tiny-model';
import { runGenerate } from './generate';
import { runTrain, TrainCommandOptions } from './train';

export const command = 'demo';
export const desc = 'Train a concept on the bundled example image, then generate edits of it (the Quick start)';

export interface DemoOptions {
  model?: string;
  out?: string;
  device?: string;
  seed?: number;
  json?: boolean;
}

export function builder(y: Argv): Argv<DemoOptions> {
  return y
    .option('model', { type: 'string', describe: 'SD v1.5 model [default: $SINGLEINSERT_MODEL, SD v1.5 in the local Hugging Face cache, else the embedded tiny model]' })
    .option('out', { type: 'string', describe: 'output folder [default: ./singleinsert-demo]' })
    .option('device', { type: 'string', describe: 'cpu, cuda or cuda:N [default: cuda when available, else cpu]' })
    .option('seed', { type: 'number', default: 1, describe: 'random seed of training and generation' })
    .option('json', { type: 'boolean', default: false, describe: 'print JSON progress and a JSON summary' }) as Argv<DemoOptions>;
}

export const EXAMPLE_IMAGE = path.join(packageRoot, 'assets', 'example', 'face.png');
export const EXAMPLE_MASK = path.join(packageRoot, 'assets', 'example', 'face_mask.png');

export interface DemoModel {
  path: string;
  tiny: boolean;
  label: string;
}

/** The model the demo uses, in the documented order. */
export async function findDemoModel(model: string | undefined, env: NodeJS.ProcessEnv = process.env): Promise<DemoModel> {
  if (model) return { path: model, tiny: false, label: model };
  if (env.SINGLEINSERT_MODEL) return { path: env.SINGLEINSERT_MODEL, tiny: false, label: `${env.SINGLEINSERT_MODEL} (from SINGLEINSERT_MODEL)` };
  for (const id of SD15_HUB_IDS) {
    try {
      const dir = resolveHubId(id, env);
      return { path: dir, tiny: false, label: `${id} from the local Hugging Face cache` };
    } catch {
      // not cached: try the next one
    }
  }
  const dir = await ensureTinyModel(env);
  return { path: dir, tiny: true, label: `the embedded tiny model (SD v1.5 layout, tiny sizes, RANDOM weights: ${dir})` };
}

export async function runDemo(opts: DemoOptions, io: { signal?: AbortSignal; stdout?: NodeJS.WritableStream; stderr?: NodeJS.WritableStream } = {}) {
  const stdout = io.stdout ?? process.stdout;
  const say = (line: string) => {
    if (!opts.json) stdout.write(line + '\n');
  };
  const out = path.resolve(opts.out ?? 'singleinsert-demo');
  if (fs.existsSync(path.join(out, 'concept', 'concept.json'))) {
    throw new SingleInsertError(`${out} already holds a demo concept; pass another --out or remove it`);
  }
  const model = await findDemoModel(opts.model);
  const device = opts.device ?? (native().buildInfo().cudaAvailable ? 'cuda' : 'cpu');
  say(`Model: ${model.label}`);
  if (model.tiny) {
    say('No Stable Diffusion v1.5 weights were found (set SINGLEINSERT_MODEL or --model, or put runwayml/stable-diffusion-v1-5 in the Hugging Face cache).');
    say('The demo runs the whole workflow on the tiny model instead: it trains and generates for real, but with random weights the pictures are noise-like.');
  } else if (device === 'cpu') {
    say('Training full-size SD v1.5 on the CPU takes hours; use --device cuda on a GPU machine.');
  }
  say(`Training on ${path.relative(process.cwd(), EXAMPLE_IMAGE)} (mask ${path.basename(EXAMPLE_MASK)}, class "face"), paper recipe: stage I 50 x 16, stage II 100 x 4.`);

  const trainOpts: TrainCommandOptions = {
    image: EXAMPLE_IMAGE,
    mask: EXAMPLE_MASK,
    class: 'face',
    model: model.path,
    device,
    out: path.join(out, 'concept'),
    seed: opts.seed,
    json: opts.json,
  };
  if (model.tiny) {
    // the tiny UNet works at 64 px (8x8 latents); its random CLIP-layout image encoder is small too
    trainOpts.resolution = 64;
    trainOpts.imageEncoder = path.join(model.path, 'image_encoder');
  }
  const trained = await runTrain(trainOpts, { signal: io.signal, stdout, stderr: io.stderr });

  say('Generating the ten preset edits of the concept ("a * face wearing sunglasses", ...):');
  const generated = await runGenerate(
    {
      model: model.path,
      concept: [trained.out],
      preset: 'edits',
      seed: opts.seed,
      steps: model.tiny ? 25 : 30,
      scheduler: 'dpmpp-2m',
      out: path.join(out, 'samples'),
      device,
    },
    { signal: io.signal, stderr: io.stderr },
  );
  const summary = { model: model.label, tiny: model.tiny, concept: trained.out, samples: generated.files, sheet: generated.sheet ?? null };
  if (opts.json) stdout.write(JSON.stringify({ event: 'demo', ...summary }) + '\n');
  else {
    say(`Concept: ${trained.out}`);
    say(`Samples: ${path.join(out, 'samples')} (${generated.files.length} images${generated.sheet ? `, contact sheet ${generated.sheet}` : ''})`);
    if (model.tiny) say('These came from the tiny random-weight model: run the demo with real SD v1.5 weights for meaningful pictures.');
  }
  return summary;
}

export async function handler(argv: DemoOptions): Promise<void> {
  const ac = new AbortController();
  const stop = () => ac.abort();
  process.once('SIGINT', stop);
  try {
    await runDemo(argv, { signal: ac.signal });
  } finally {
    process.off('SIGINT', stop);
  }
}
