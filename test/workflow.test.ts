// The whole workflow on the tiny model, across modules: train two concepts separately, compose
// them in one prompt, then evaluate one of them. Each part has its own detailed tests; this one
// checks that what `train` writes is what `generate --concept` and `eval --concept` read.
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { Writable } from 'node:stream';
import { runEval } from '../lib/cli/commands/eval';
import { loadPipeline, Pipeline } from '../lib/models';
import { train, TrainOptions } from '../lib/train';
import { fixture } from './helpers/fixtures';

jest.setTimeout(300000);

const IMAGE = fixture('cases', 'images', 'face64.png');
const MASK = fixture('cases', 'images', 'face64_mask.png');

describe('train -> generate -> eval', () => {
  let tmp: string;
  let pipeline: Pipeline;
  let dirA: string, dirB: string;

  beforeAll(async () => {
    tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'si-workflow-'));
    pipeline = await loadPipeline(fixture('tiny-sd'));
    const base = (out: string, seed: number, classWord: string): TrainOptions => ({
      model: pipeline,
      image: IMAGE,
      mask: MASK,
      classWord,
      out,
      resolution: 64,
      stage1: { steps: 2, batch: 2, lr: 1e-3 },
      stage2: { steps: 2, batch: 2, lr: 1e-3 },
      seed,
      imageEncoder: fixture('tiny-sd', 'image_encoder'),
    });
    dirA = (await train(base(path.join(tmp, 'a'), 1, 'face'))).out;
    dirB = (await train(base(path.join(tmp, 'b'), 2, 'hair'))).out;
  });
  afterAll(() => {
    pipeline?.dispose();
    fs.rmSync(tmp, { recursive: true, force: true });
  });

  test('two separately trained concepts compose in one prompt, whatever their order', async () => {
    const a = await pipeline.loadConcept(dirA);
    const b = await pipeline.loadConcept(dirB, { placeholder: '<b>' });
    expect(a.warnings).toEqual([]); // trained on this very model
    expect(a.lora).not.toBeNull();
    const options = { prompt: 'a * face with <b> hair', seed: 3, steps: 3, scheduler: 'ddim', returnIntermediates: true };
    const both = await pipeline.generate({ ...options, concepts: [{ concept: a }, { concept: b }] });
    const reversed = await pipeline.generate({ ...options, concepts: [{ concept: b }, { concept: a }] });
    expect(Buffer.compare(Buffer.from(both.images[0].rgb), Buffer.from(reversed.images[0].rgb))).toBe(0);
    // both placeholders were replaced: one position each in the positive prompt
    const index = Array.from(both.intermediates!.replace_index.data as BigInt64Array, Number);
    expect(index.length / 2).toBeGreaterThanOrEqual(2);
    const onlyA = await pipeline.generate({ ...options, prompt: 'a * face with <b> hair', concepts: [{ concept: a }, { concept: b, loraScale: 0 }] });
    expect(Buffer.compare(Buffer.from(both.images[0].rgb), Buffer.from(onlyA.images[0].rgb))).not.toBe(0);
  });

  test('eval --concept scores a trained concept with all seven metrics', async () => {
    const quiet = new Writable({ write: (_c, _e, cb) => cb() });
    const r = await runEval(
      { concept: dirA, model: fixture('tiny-sd'), seeds: 1, steps: 2, scheduler: 'ddim', clip: fixture('tiny-clip'), dino: fixture('tiny-sd', 'dino'), lpips: fixture('lpips'), out: path.join(tmp, 'eval') },
      { stderr: quiet },
    );
    expect(r.mode).toBe('concept');
    expect(r.counts.images).toBe(10);
    for (const k of ['CLIP-I-f', 'CLIP-I-b', 'DINO-f', 'DINO-b', 'CLIP-T', 'ESR']) expect(Number.isFinite(r.summary[k as keyof typeof r.summary] as number)).toBe(true);
    for (const f of ['metrics.json', 'metrics.csv', 'report.html']) expect(fs.existsSync(path.join(tmp, 'eval', f))).toBe(true);
  });
});
