import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { Writable } from 'node:stream';
import { AbortError } from '../lib/errors';
import { formatParameters, generate, GenerateOptions, GenerateProgress, GenerateResult, modelLabel, toPng } from '../lib/generate';
import { loadPipeline, Pipeline } from '../lib/models';
import { native, Tensor } from '../lib/native';
import { readPngText } from '../lib/png';
import { resolveSchedulerConfig } from '../lib/schedulers';
import { ProgressReporter } from '../lib/progress';
import { runGenerate } from '../lib/cli/commands/generate';
import { expectClose, GoldenCase, loadCase } from './helpers/cases';
import { fixture } from './helpers/fixtures';

// Pipeline goldens: the README suggests atol 5e-4 for UNet/VAE intermediates and the pipeline
// (the reference's own fp32-vs-fp64 error is 4.5e-5 on latents up to 19).
const PIPELINE_ATOL = 5e-4;
const PIPELINE_RTOL = 0;
// Text encoder outputs are single-model outputs (README: atol = rtol = 1e-4).
const EMBED_TOL = 1e-4;

let pipeline: Pipeline;

beforeAll(async () => {
  pipeline = await loadPipeline(fixture('tiny-sd'));
});

afterAll(() => pipeline?.dispose());

const tensorOf = (data: Float32Array, shape: number[]): Tensor => ({ dtype: 'F32', shape, data });
const numbers = (t: Tensor): number[] => Array.from(t.data as ArrayLike<number | bigint>, (v) => Number(v));
// a small, fast call on the tiny model (64x64, 8x8 latents)
const small = (extra: Partial<GenerateOptions> = {}): GenerateOptions => ({ prompt: 'a photo of * face', steps: 3, width: 64, height: 64, scheduler: 'ddim', ...extra });

describe.each([
  ['pipeline_ddim4', 'ddim', 4],
  ['pipeline_pndm4', 'pndm', 5],
])('%s (diffusers 0.25.1 StableDiffusionPipeline, given latents)', (caseName, scheduler, calls) => {
  let golden: GoldenCase;
  let result: GenerateResult;

  beforeAll(async () => {
    golden = await loadCase(caseName);
    const args = golden.json.call.args;
    result = await generate(pipeline, {
      prompt: args.prompt,
      negativePrompt: args.negative_prompt,
      steps: args.num_inference_steps,
      guidance: args.guidance_scale,
      scheduler,
      width: args.width,
      height: args.height,
      eta: args.eta,
      latents: golden.tensors['input.latents'],
      returnIntermediates: true,
    });
  });

  test('output image within 5e-4', () => {
    const img = result.images[0];
    expect(result.images).toHaveLength(1);
    expectClose(`${caseName} image`, tensorOf(img.float, [1, img.height, img.width, 3]), golden.tensors['output.image'], PIPELINE_ATOL, PIPELINE_RTOL);
    // the uint8 copy is numpy_to_pil's (x*255).round() of the float image
    for (let i = 0; i < img.rgb.length; i += 97) expect(Math.abs(img.rgb[i] - img.float[i] * 255)).toBeLessThanOrEqual(0.5 + 1e-4);
  });

  test('prompt ids and embeddings', () => {
    const inter = result.intermediates!;
    expect(numbers(inter.prompt_ids)).toEqual(numbers(golden.tensors['intermediate.prompt_ids']));
    expect(numbers(inter.negative_prompt_ids)).toEqual(numbers(golden.tensors['intermediate.negative_prompt_ids']));
    expectClose(`${caseName} prompt_embeds`, inter.prompt_embeds, golden.tensors['intermediate.prompt_embeds'], EMBED_TOL, EMBED_TOL);
    expectClose(`${caseName} negative_prompt_embeds`, inter.negative_prompt_embeds, golden.tensors['intermediate.negative_prompt_embeds'], EMBED_TOL, EMBED_TOL);
  });

  test(`timesteps and per-step intermediates (${calls} UNet calls)`, () => {
    const inter = result.intermediates!;
    expect(numbers(inter.timesteps)).toEqual(numbers(golden.tensors['intermediate.timesteps']));
    expect(inter.unet_inputs.shape[0]).toBe(calls);
    for (const name of ['unet_inputs', 'unet_outputs', 'noise_pred_guided', 'latents_after_step', 'decoded_raw']) {
      expectClose(`${caseName} ${name}`, inter[name], golden.tensors[`intermediate.${name}`], PIPELINE_ATOL, PIPELINE_RTOL);
    }
    // the final latents are the last step's
    const last = golden.tensors['intermediate.latents_after_step'];
    const n = result.latents.data.length;
    expectClose(`${caseName} final latents`, result.latents, tensorOf((last.data as Float32Array).slice(last.data.length - n), result.latents.shape), PIPELINE_ATOL, PIPELINE_RTOL);
  });
});

describe('seeds', () => {
  test('the generator convention: at::randn on a CPU generator equals torch.randn with manual_seed', () => {
    // torch.manual_seed(0); torch.randn(3) -> [1.5409961, -0.2934289, -2.1787894] (fewer than 16 values: the scalar path)
    const a = native().seededRandn([3], 0);
    [1.5409961, -0.2934289, -2.1787894].forEach((v, i) => expect((a.data as Float32Array)[i]).toBeCloseTo(v, 6));
    // torch.manual_seed(0); torch.randn(4, 4)[0] -> [-1.1258, -1.1524, -0.2506, -0.4339] (16 or more: the vectorised path)
    const b = native().seededRandn([4, 4], 0);
    [-1.1258, -1.1524, -0.2506, -0.4339].forEach((v, i) => expect((b.data as Float32Array)[i]).toBeCloseTo(v, 4));
  });

  test('seeded initial latents are that draw (times init_noise_sigma)', async () => {
    const noise = native().seededRandn([2, 4, 8, 8], 0);
    const r = await generate(pipeline, small({ seed: 0, steps: 1, numImages: 2, returnIntermediates: true }));
    expect(Array.from(r.intermediates!.initial_latents.data as Float32Array)).toEqual(Array.from(noise.data as Float32Array));
    // Euler scales by init_noise_sigma = max sigma (14.6146 for SD v1.5's schedule; 2 steps: t = 999, 0)
    const e = await generate(pipeline, small({ seed: 0, steps: 2, numImages: 2, scheduler: 'euler', returnIntermediates: true }));
    const scaled = e.intermediates!.initial_latents.data as Float32Array;
    const ratio = scaled[0] / (noise.data as Float32Array)[0];
    expect(ratio).toBeCloseTo(14.6146, 3);
  });

  test('same seed, identical PNG bytes; another seed, another image', async () => {
    const a = await generate(pipeline, small({ seed: 42 }));
    const b = await generate(pipeline, small({ seed: 42 }));
    const c = await generate(pipeline, small({ seed: 43 }));
    expect(a.seed).toBe(42);
    const [pa, pb, pc] = await Promise.all([a, b, c].map((r) => toPng(r.images[0], r.parameters)));
    expect(pa.equals(pb)).toBe(true);
    expect(Buffer.from(a.images[0].rgb).equals(Buffer.from(c.images[0].rgb))).toBe(false);
    expect(pa.equals(pc)).toBe(false);
  });

  test('a random seed is reported and reproduces the images (Pipeline.generate delegates)', async () => {
    const a = await pipeline.generate(small({ steps: 2 }));
    expect(Number.isSafeInteger(a.seed) && a.seed >= 0).toBe(true);
    const b = await generate(pipeline, small({ steps: 2, seed: a.seed }));
    expect(Buffer.from(b.images[0].rgb).equals(Buffer.from(a.images[0].rgb))).toBe(true);
  });

  test('numImages and several prompts: batch order and per-image parameters', async () => {
    const r = await generate(pipeline, small({ prompt: ['a cat', 'a dog'], negativePrompt: ['blurry', ''], numImages: 2, seed: 5, steps: 2 }));
    expect(r.images.map((i) => [i.prompt, i.negativePrompt, i.index])).toEqual([
      ['a cat', 'blurry', 0],
      ['a cat', 'blurry', 1],
      ['a dog', '', 2],
      ['a dog', '', 3],
    ]);
    expect(r.latents.shape).toEqual([4, 4, 8, 8]);
    expect(r.images[2].parameters).toBe('a dog\nSteps: 2, Sampler: DDIM, CFG scale: 7.5, Seed: 5, Size: 64x64, Model: tiny-sd');
    expect(r.images[0].parameters.split('\n')[1]).toBe('Negative prompt: blurry');
  });

  test('guidance <= 1 runs without classifier-free guidance (one UNet batch)', async () => {
    const r = await generate(pipeline, small({ guidance: 1, seed: 3, steps: 2, returnIntermediates: true }));
    expect(r.intermediates!.unet_inputs.shape).toEqual([2, 1, 4, 8, 8]);
    expect(r.intermediates!.negative_prompt_embeds).toBeUndefined();
  });

  test('DDIM eta > 0 draws from the seed too (reproducible, and different from eta 0)', async () => {
    const a = await generate(pipeline, small({ seed: 9, eta: 1 }));
    const b = await generate(pipeline, small({ seed: 9, eta: 1 }));
    const c = await generate(pipeline, small({ seed: 9, eta: 0 }));
    expect(Buffer.from(a.images[0].rgb).equals(Buffer.from(b.images[0].rgb))).toBe(true);
    expect(Buffer.from(a.images[0].rgb).equals(Buffer.from(c.images[0].rgb))).toBe(false);
    expect(a.parameters).toMatch(/, Eta: 1$/);
  });

  test('every scheduler runs', async () => {
    for (const scheduler of ['ddim', 'pndm', 'euler', 'dpmpp-2m', 'dpmsolver_multistep']) {
      const r = await generate(pipeline, small({ scheduler, seed: 1, steps: 2 }));
      expect(r.images[0].float.every((x) => x >= 0 && x <= 1)).toBe(true);
    }
  });
});

describe('validation (before any native work)', () => {
  const cases: Array<[string, Partial<GenerateOptions> | Record<string, unknown>, string]> = [
    ['width not a multiple of 8', { width: 100 }, 'Expected a positive multiple of 8 for width but received 100'],
    ['height 0', { height: 0 }, 'Expected a positive multiple of 8 for height but received 0'],
    ['steps 0', { steps: 0 }, 'Expected an integer between 1 and 1000 for steps but received 0'],
    ['steps 2.5', { steps: 2.5 }, 'Expected an integer between 1 and 1000 for steps but received 2.5'],
    ['guidance -1', { guidance: -1 }, 'Expected a finite number >= 0 for guidance but received -1'],
    ['guidance NaN', { guidance: NaN }, 'Expected a finite number >= 0 for guidance but received NaN'],
    ['unknown scheduler', { scheduler: 'lms' }, 'Expected one of ddim, pndm, euler, dpmpp-2m for scheduler but received "lms"'],
    ['prompt not a string', { prompt: 42 }, 'Expected a string or a non-empty array of strings for prompt but received 42'],
    ['empty prompt array', { prompt: [] }, 'Expected a string or a non-empty array of strings for prompt but received array of length 0'],
    ['negative prompt count', { prompt: ['a', 'b'], negativePrompt: ['x'] }, 'Expected a string or an array of 2 string(s), one per prompt for negativePrompt but received array of length 1'],
    ['negative seed', { seed: -1 }, 'Expected an integer between 0 and 9007199254740991 for seed but received -1'],
    ['numImages 0', { numImages: 0 }, 'Expected a positive integer for numImages but received 0'],
    ['eta < 0', { eta: -0.5 }, 'Expected a finite number >= 0 for eta but received -0.5'],
    ['eta with pndm', { eta: 0.5, scheduler: 'pndm' }, 'Expected 0 with the pndm scheduler (eta is a DDIM option) for eta but received 0.5'],
    ['latents shape', { latents: { data: new Float32Array(16), shape: [1, 4, 2, 2] } }, 'Expected a float32 tensor of shape [1, 4, 8, 8] for latents but received a float32 tensor of shape [1, 4, 2, 2]'],
  ];
  test.each(cases)('%s', async (_label, extra, message) => {
    const encode = jest.spyOn(pipeline, 'encodeIds');
    const nativeGenerate = jest.spyOn(native(), 'generate');
    try {
      await expect(generate(pipeline, small(extra as Partial<GenerateOptions>))).rejects.toThrow(message);
      await expect(generate(pipeline, small(extra as Partial<GenerateOptions>))).rejects.toMatchObject({ name: 'SingleInsertError', message });
      expect(encode).not.toHaveBeenCalled();
      expect(nativeGenerate).not.toHaveBeenCalled();
    } finally {
      encode.mockRestore();
      nativeGenerate.mockRestore();
    }
  });

  test('signal and onProgress types', async () => {
    await expect(generate(pipeline, small(), { signal: {} as AbortSignal })).rejects.toThrow('Expected an AbortSignal for signal but received Object');
    await expect(generate(pipeline, small(), { onProgress: 1 as unknown as () => void })).rejects.toThrow('Expected a function for onProgress but received 1');
  });
});

describe('abort, concurrency and progress', () => {
  test('abort after the first progress event rejects promptly with AbortError; the pipeline stays usable', async () => {
    const controller = new AbortController();
    const events: GenerateProgress[] = [];
    let abortedAt = 0;
    const started = Date.now();
    const run = generate(pipeline, small({ steps: 400, seed: 1 }), {
      signal: controller.signal,
      onProgress: (e) => {
        events.push(e);
        if (events.length === 1) {
          abortedAt = Date.now();
          controller.abort();
        }
      },
    });
    await expect(run).rejects.toBeInstanceOf(AbortError);
    const stoppedMs = Date.now() - abortedAt;
    // eslint-disable-next-line no-console
    console.log(`abort: ${events.length} progress event(s) of 400, rejected ${stoppedMs} ms after abort (${Date.now() - started} ms in all)`);
    expect(events.length).toBeLessThanOrEqual(3);
    // the job stops before its next UNet call: at most about one step after the abort
    const firstStepMs = abortedAt - started;
    expect(stoppedMs).toBeLessThan(Math.max(2000, 3 * firstStepMs));

    const after = await generate(pipeline, small({ seed: 42 }));
    const reference = await generate(pipeline, small({ seed: 42 }));
    expect(Buffer.from(after.images[0].rgb).equals(Buffer.from(reference.images[0].rgb))).toBe(true);
  });

  test('an already-aborted signal rejects without work', async () => {
    const controller = new AbortController();
    controller.abort();
    const encode = jest.spyOn(pipeline, 'encodeIds');
    const nativeGenerate = jest.spyOn(native(), 'generate');
    try {
      await expect(generate(pipeline, small(), { signal: controller.signal })).rejects.toBeInstanceOf(AbortError);
      expect(encode).not.toHaveBeenCalled();
      expect(nativeGenerate).not.toHaveBeenCalled();
    } finally {
      encode.mockRestore();
      nativeGenerate.mockRestore();
    }
  });

  test('an error thrown by onProgress cancels the run and rejects with that error', async () => {
    const boom = new Error('boom');
    let calls = 0;
    await expect(
      generate(pipeline, small({ steps: 50 }), {
        onProgress: () => {
          calls++;
          throw boom;
        },
      }),
    ).rejects.toBe(boom);
    expect(calls).toBe(1);
  });

  test('two concurrent calls on one pipeline both succeed and equal their sequential results', async () => {
    const a = small({ seed: 11, prompt: 'a red cube' });
    const b = small({ seed: 12, prompt: 'a blue sphere', scheduler: 'pndm' });
    const seqA = await generate(pipeline, a);
    const seqB = await generate(pipeline, b);
    const [parA, parB] = await Promise.all([generate(pipeline, a), generate(pipeline, b)]);
    expect(Array.from(parA.images[0].float)).toEqual(Array.from(seqA.images[0].float));
    expect(Array.from(parB.images[0].float)).toEqual(Array.from(seqB.images[0].float));
    expect(Array.from(parA.latents.data as Float32Array)).toEqual(Array.from(seqA.latents.data as Float32Array));
  });

  test('progress events arrive in order, the last has step == steps, all before the promise resolves', async () => {
    for (const [scheduler, steps, calls] of [['pndm', 4, 5], ['euler', 6, 6]] as const) {
      const events: GenerateProgress[] = [];
      let resolved = false;
      const p = generate(pipeline, small({ scheduler, steps, seed: 2 }), {
        onProgress: (e) => {
          expect(resolved).toBe(false);
          events.push(e);
        },
      }).then((r) => {
        resolved = true;
        return r;
      });
      await p;
      expect(events.map((e) => e.step)).toEqual(Array.from({ length: calls }, (_, i) => i + 1));
      expect(events.every((e) => e.steps === calls)).toBe(true);
      expect(events[events.length - 1].step).toBe(events[events.length - 1].steps);
      expect(events[events.length - 1].etaSec).toBe(0);
      for (let i = 1; i < events.length; i++) expect(events[i].elapsedSec).toBeGreaterThanOrEqual(events[i - 1].elapsedSec);
      expect(events.every((e) => e.itPerSec > 0)).toBe(true);
    }
  });

  test('a native error rejects with the job as context, and the pipeline stays usable', async () => {
    const handle = (m: unknown) => (m as { handle: Parameters<ReturnType<typeof native>['generate']>[0] }).handle;
    const config = JSON.stringify(resolveSchedulerConfig(pipeline.schedulerConfig, 'tiny-sd', 'ddim'));
    const job = native().generate(handle(pipeline.unet), handle(pipeline.vae), {
      // the tiny UNet's cross_attention_dim is 32, not 16
      promptEmbeds: { dtype: 'F32', shape: [1, 77, 16], data: new Float32Array(77 * 16) },
      guidance: 1, steps: 2, scheduler: 'ddim', schedulerConfig: config, height: 64, width: 64, seed: 0,
    });
    await expect(job.promise).rejects.toThrow(/^generate\(ddim, 2 steps\): .*\b32\b/);
    await expect(generate(pipeline, small({ steps: 1, seed: 0 }))).resolves.toBeDefined();
  });

  test('a disposed model is reported, not crashed on', async () => {
    const p = await loadPipeline(fixture('tiny-sd'));
    p.dispose();
    await expect(generate(p, small())).rejects.toThrow(/was disposed/);
  });
});

describe('parameters, truncation, PNG and CLI', () => {
  test('A1111 parameters text', () => {
    expect(
      formatParameters({ prompt: 'a photo of * face', negativePrompt: 'blurry', steps: 25, scheduler: 'ddim', guidance: 7.5, seed: 42, width: 512, height: 512, model: 'tiny-sd' }),
    ).toBe('a photo of * face\nNegative prompt: blurry\nSteps: 25, Sampler: DDIM, CFG scale: 7.5, Seed: 42, Size: 512x512, Model: tiny-sd');
    expect(modelLabel('/x/hub/models--runwayml--stable-diffusion-v1-5/snapshots/abc123')).toBe('runwayml/stable-diffusion-v1-5');
    expect(modelLabel('/ckpt/v1-5-pruned-emaonly.safetensors')).toBe('v1-5-pruned-emaonly');
  });

  test('a prompt longer than 77 tokens is truncated with a warning', async () => {
    const long = Array.from({ length: 90 }, (_, i) => `word${i}`).join(' ');
    const r = await generate(pipeline, small({ prompt: long, steps: 1, seed: 0 }));
    expect(r.warnings).toHaveLength(1);
    expect(r.warnings[0]).toMatch(/^The following part of your prompt was truncated because CLIP can only handle sequences up to 77 tokens: /);
  });

  test('toPng carries the parameters and decodes to the same pixels', async () => {
    const r = await generate(pipeline, small({ seed: 4, steps: 2 }));
    const png = await toPng(r.images[0], r.parameters);
    expect(readPngText(png)).toEqual({ parameters: r.parameters });
    const sharp = (await import('sharp')).default;
    const { data, info } = await sharp(png).raw().toBuffer({ resolveWithObject: true });
    expect([info.width, info.height, info.channels]).toEqual([64, 64, 3]);
    expect(Buffer.from(data).equals(Buffer.from(r.images[0].rgb))).toBe(true);
  });

  test('runGenerate writes <seed>-<index>.png files into the folder, never overwriting', async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'si-generate-'));
    try {
      const lines: string[] = [];
      const stderr = new Writable({ write: (c: Buffer, _e, cb) => (lines.push(String(c)), cb()) });
      const opts = { model: fixture('tiny-sd'), prompt: 'a photo of * face', negativePrompt: 'blurry', steps: 2, scheduler: 'ddim', width: 64, height: 64, seed: 7, n: 2, out: dir };
      const report = await runGenerate(opts, { stderr });
      expect(report.files).toEqual([path.join(dir, '7-0.png'), path.join(dir, '7-1.png')]);
      expect(report.parameters).toBe('a photo of * face\nNegative prompt: blurry\nSteps: 2, Sampler: DDIM, CFG scale: 7.5, Seed: 7, Size: 64x64, Model: tiny-sd');
      expect(readPngText(fs.readFileSync(report.files[1]))).toEqual({ parameters: report.parameters });
      // plain progress lines (not a TTY): the first and the last step at least
      expect(lines.join('')).toMatch(/^sampling 1\/2 .*\nsampling 2\/2 .*done in/m);
      const again = await runGenerate(opts, { progress: false });
      expect(again.files).toEqual([path.join(dir, '7-0-1.png'), path.join(dir, '7-1-1.png')]);
      expect(fs.readFileSync(again.files[0]).equals(fs.readFileSync(report.files[0]))).toBe(true);
      expect(fs.readdirSync(dir).sort()).toEqual(['7-0-1.png', '7-0.png', '7-1-1.png', '7-1.png']);
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });

  test('ProgressReporter plain lines are throttled but keep the first and last', () => {
    const out: string[] = [];
    const stream = { write: (s: string) => (out.push(s), true), isTTY: false } as unknown as NodeJS.WritableStream;
    const r = new ProgressReporter({ label: 'x', stream, minIntervalMs: 60_000 });
    for (let s = 1; s <= 10; s++) r.update({ step: s, steps: 10, elapsedSec: s * 0.5 });
    r.stop();
    expect(out).toEqual(['x 1/10  2.00 it/s  ETA 4.5s\n', 'x 10/10  2.00 it/s  done in 5.0s\n']);
  });
});
