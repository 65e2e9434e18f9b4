/**
 * Reduced precision on the CPU (bf16; fp16 needs CUDA): generation with bf16 models against fp32,
 * the float32 VAE decode and its exact weight round trip, the clear fp16-on-CPU error, and a short
 * two-stage bf16 training run whose trained parts and files stay fp32.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { buildCli } from '../lib/cli';
import { runGenerate } from '../lib/cli/commands/generate';
import { trainOptionsFromCli } from '../lib/cli/commands/train';
import { generate, GenerateResult } from '../lib/generate';
import { loadComponent, loadPipeline, Model, Pipeline } from '../lib/models';
import { native, NativeModelHandle, NativeTensor, Tensor } from '../lib/native';
import { readSafetensors, writeSafetensors } from '../lib/safetensors';
import { resolveSchedulerConfig } from '../lib/schedulers';
import { train, TrainOptions } from '../lib/train';
import { diff, expectClose } from './helpers/cases';
import { fixture } from './helpers/fixtures';

const TINY_SD = fixture('tiny-sd');
const IMAGE = fixture('cases', 'images', 'face64.png');
const MASK = fixture('cases', 'images', 'face64_mask.png');
// bf16 keeps 8 bits of mantissa (relative rounding 2^-9 per op) in the UNet, VAE and text encoder;
// latents and scheduler stay float32. Measured on the tiny model against fp32 (4 DDIM steps, 64x64,
// seeds 7-9): guidance 1: image max abs 1.8-2.0e-2, mean abs 2.5-2.8e-3 (pixels in [0, 1]); final
// latents max abs 0.10-0.15 (values up to 15). Guidance 7.5 multiplies the difference of two bf16 UNet
// outputs by 7.5: image max 0.08-0.10, mean 1.0-1.2e-2; latents max 0.65-1.26 (values up to 20).
// Bounds, about 2x the worst seen:
const BF16 = {
  1: { imageMax: 5e-2, imageMean: 6e-3, latentMax: 0.3 },
  7.5: { imageMax: 0.2, imageMean: 2.5e-2, latentMax: 2.5 },
} as const;
// the same float32 decode through two routes (a float32 VAE with bf16-rounded weights, and the bf16
// VAE cast to float32 for the call): the same arithmetic; only latents / scaling_factor is rounded
// differently (JS double division vs ATen float), one ulp of the input
const SAME_MATH_ATOL = 1e-5;

const f32 = (t: NativeTensor, shape = t.shape): Tensor => ({ dtype: 'F32', shape, data: t.data });
const finite = (data: ArrayLike<number>) => Array.from(data).every(Number.isFinite);
const handle = (m: Model) => (m as unknown as { handle: NativeModelHandle }).handle;
const bytes = (t: Tensor) => Buffer.from(t.data.buffer, t.data.byteOffset, t.data.byteLength);
const meanAbs = (a: Float32Array, b: Float32Array) => a.reduce((sum, v, i) => sum + Math.abs(v - b[i]), 0) / a.length;

describe('bf16 inference on the CPU', () => {
  let fp32: Pipeline;
  let bf16: Pipeline;
  beforeAll(async () => {
    fp32 = await loadPipeline(TINY_SD);
    bf16 = await loadPipeline(TINY_SD, { dtype: 'bf16' });
  });
  afterAll(() => {
    fp32?.dispose();
    bf16?.dispose();
  });

  test('the models hold bf16 weights (stateDict) and say so', async () => {
    expect([bf16.unet.dtype, bf16.vae.dtype, bf16.textEncoder.dtype]).toEqual(['bf16', 'bf16', 'bf16']);
    const sd = await bf16.unet.stateDict();
    const dtypes = new Set(Object.values(sd).map((t) => t.dtype));
    expect([...dtypes]).toEqual(['BF16']);
  });

  test.each([1, 7.5] as const)('generation at guidance %s is finite and close to fp32 (same seed, 4 DDIM steps)', async (guidance) => {
    const options = { prompt: 'a photo of an astronaut riding a horse', steps: 4, width: 64, height: 64, scheduler: 'ddim', seed: 7, guidance };
    const a: GenerateResult = await generate(fp32, options);
    const b: GenerateResult = await generate(bf16, options);
    expect(finite(b.images[0].float)).toBe(true);
    expect(finite(b.latents.data as Float32Array)).toBe(true);
    expect(b.latents.dtype).toBe('F32'); // latents leave the loop in float32
    expect(b.warnings).toEqual([]);
    const img = (r: GenerateResult) => f32({ dtype: 'F32', shape: [64, 64, 3], data: r.images[0].float });
    const bound = BF16[guidance];
    const d = expectClose(`bf16 vs fp32 image (guidance ${guidance})`, img(b), img(a), bound.imageMax, 0);
    const mean = meanAbs(b.images[0].float, a.images[0].float);
    // eslint-disable-next-line no-console
    console.log(`bf16 vs fp32 image (guidance ${guidance}): mean abs ${mean.toExponential(2)} (bound ${bound.imageMean})`);
    expect(mean).toBeLessThanOrEqual(bound.imageMean);
    expectClose(`bf16 vs fp32 final latents (guidance ${guidance})`, b.latents, a.latents, bound.latentMax, 0);
    // it is bf16 for real: not bit-identical to fp32
    expect(d.maxAbs).toBeGreaterThan(0);
  });

  test('vaeFloat32 decodes in float32 and leaves the bf16 weights exactly as they were', async () => {
    const before = await bf16.vae.stateDict();
    const sched = JSON.stringify(resolveSchedulerConfig(bf16.schedulerConfig, 'tiny-sd', 'ddim'));
    const embeds = await bf16.encodePrompts(['a red cube']);
    const run = (vaeFloat32: boolean) =>
      native().generate(handle(bf16.unet), handle(bf16.vae), {
        promptEmbeds: embeds, guidance: 1, steps: 2, scheduler: 'ddim', schedulerConfig: sched, height: 64, width: 64, seed: 3,
        returnIntermediates: true, vaeFloat32,
      }).promise;
    const plain = await run(false);
    const upcast = await run(true);
    expect(upcast.warnings).toEqual([]); // asked for: no warning
    // the same latents (the UNet is untouched), a different decode
    expect(bytes(upcast.latents).equals(bytes(plain.latents))).toBe(true);
    expect(bytes(upcast.intermediates!.decoded_raw).equals(bytes(plain.intermediates!.decoded_raw))).toBe(false);

    // the reference: a float32 VAE loaded from the bf16-rounded weights decodes the same latents
    const after = await bf16.vae.stateDict();
    for (const k of Object.keys(before)) expect([k, after[k].dtype, bytes(after[k]).equals(bytes(before[k]))]).toEqual([k, 'BF16', true]);
    const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'si-precision-'));
    try {
      fs.mkdirSync(path.join(tmp, 'vae'));
      fs.copyFileSync(path.join(TINY_SD, 'vae', 'config.json'), path.join(tmp, 'vae', 'config.json'));
      await writeSafetensors(path.join(tmp, 'vae', 'diffusion_pytorch_model.safetensors'), before);
      const vae32 = await loadComponent('vae', path.join(tmp, 'vae'));
      try {
        const scale = bf16.scalingFactor;
        const latent = Float32Array.from(upcast.latents.data as Float32Array, (v) => Math.fround(v / scale));
        const ref = await vae32.run('decode', { latent: { dtype: 'F32', shape: upcast.latents.shape, data: latent } });
        const d = diff(upcast.intermediates!.decoded_raw, ref.sample, SAME_MATH_ATOL, 0);
        // eslint-disable-next-line no-console
        console.log(`vaeFloat32 decode vs fp32 VAE with the bf16 weights: max abs ${d.maxAbs.toExponential(2)}`);
        expect(d.worstExcess).toBeLessThanOrEqual(0);
      } finally {
        vae32.dispose();
      }
    } finally {
      fs.rmSync(tmp, { recursive: true, force: true });
    }
  });
});

describe('fp16 on the CPU', () => {
  test('running an fp16 model rejects with "fp16 needs CUDA; use bf16 on CPU" and the kernel that is missing', async () => {
    const p = await loadPipeline(TINY_SD, { dtype: 'fp16' });
    try {
      await expect(p.encodePrompts(['a photo'])).rejects.toThrow(/^clip_text\.forward: fp16 needs CUDA; use bf16 on CPU \(libtorch's CPU kernels: .*Half/);
      // generation fails the same way, and the pipeline stays usable for the next call's error
      const fp32 = await loadPipeline(TINY_SD);
      try {
        const sched = JSON.stringify(resolveSchedulerConfig(p.schedulerConfig, 'tiny-sd', 'ddim'));
        const embeds = await fp32.encodePrompts(['a photo']);
        const job = native().generate(handle(p.unet), handle(p.vae), { promptEmbeds: embeds, guidance: 1, steps: 1, scheduler: 'ddim', schedulerConfig: sched, height: 64, width: 64, seed: 0 });
        await expect(job.promise).rejects.toThrow(/^generate\(ddim, 1 steps\): fp16 needs CUDA; use bf16 on CPU/);
      } finally {
        fp32.dispose();
      }
    } finally {
      p.dispose();
    }
  });

  test('training refuses fp16 on the CPU before loading anything, and so does the native trainer', async () => {
    const base = { model: TINY_SD, image: IMAGE, mask: MASK, classWord: 'face', out: path.join(os.tmpdir(), 'si-never-written'), resolution: 64 };
    await expect(train({ ...base, dtype: 'fp16' })).rejects.toThrow('Expected fp32 or bf16 on the CPU (fp16 needs CUDA; use bf16 on CPU) for dtype but received "fp16"');
    const p = await loadPipeline(TINY_SD, { dtype: 'fp16' });
    try {
      await expect(train({ ...base, model: p })).rejects.toThrow(/fp16 needs CUDA; use bf16 on CPU \(the unet model is fp16 on the CPU/);
    } finally {
      p.dispose();
    }
  });
});

describe('bf16 training on the CPU (tiny-sd, 64 px)', () => {
  let tmp: string;
  beforeAll(() => {
    tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'si-bf16-train-'));
  });
  afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }));

  const encoderConfig = () => JSON.parse(fs.readFileSync(fixture('tiny-sd', 'image_encoder', 'config.json'), 'utf8'));
  const options = (out: string, extra: Partial<TrainOptions> = {}): TrainOptions => ({
    model: TINY_SD,
    image: IMAGE,
    mask: MASK,
    classWord: 'face',
    out,
    resolution: 64,
    stage1: { steps: 2, batch: 2, lr: 1e-3 },
    stage2: { steps: 2, batch: 2, lr: 1e-3 },
    seed: 5,
    imageEncoder: { config: encoderConfig() },
    ...extra,
  });

  test('a two-stage bf16 run finishes with finite losses; the trained parts and every file are fp32', async () => {
    const events: Array<{ stage: number; total: number; lossScale: number | null; skipped: boolean }> = [];
    const bf = await train(options(path.join(tmp, 'bf16'), { dtype: 'bf16' }), { onProgress: (p) => events.push({ stage: p.stage, total: p.losses.total, lossScale: p.lossScale, skipped: p.skipped }) });
    expect(events).toHaveLength(4);
    for (const e of events) {
      expect(Number.isFinite(e.total)).toBe(true);
      expect([e.lossScale, e.skipped]).toEqual([null, false]); // bf16: no loss scaling
    }
    expect(bf.concept.precision).toEqual({ unet: 'bf16', vae: 'bf16', textEncoder: 'bf16', trainable: 'fp32', lossScaling: null });
    expect(bf.concept.hyperparameters).toMatchObject({ dtype: 'bf16', gradCheckpointing: false });
    expect(bf.concept.memory.peakMemoryBytes).toBeNull(); // no CUDA allocator on the CPU
    expect(bf.concept.memory.peakRssBytes).toBeGreaterThan(0);
    for (const file of [bf.files.embedding, bf.files.lora!, bf.files.encoder]) {
      const { tensors } = await readSafetensors(file);
      const dtypes = new Set(Object.values(tensors).map((t) => t.dtype));
      expect([path.basename(file), [...dtypes]]).toEqual([path.basename(file), ['F32']]);
    }

    // the same recipe in fp32: losses of the same size (bf16 rounds the frozen models, not the recipe)
    const fp = await train(options(path.join(tmp, 'fp32')));
    const l32 = fp.concept.finalLosses, l16 = bf.concept.finalLosses;
    const rel = (a: number, b: number) => Math.abs(a - b) / Math.abs(b);
    // eslint-disable-next-line no-console
    console.log(`final total loss fp32 vs bf16: stage I ${l32.stage1!.total} vs ${l16.stage1!.total} (rel ${rel(l16.stage1!.total, l32.stage1!.total).toExponential(2)}), stage II ${l32.stage2!.total} vs ${l16.stage2!.total} (rel ${rel(l16.stage2!.total, l32.stage2!.total).toExponential(2)})`);
    expect(rel(l16.stage1!.total, l32.stage1!.total)).toBeLessThan(0.1);
    expect(rel(l16.stage2!.total, l32.stage2!.total)).toBeLessThan(0.1);
  });

  test('a bf16 pipeline passed in keeps its dtype; a dtype option with it is refused', async () => {
    const p = await loadPipeline(TINY_SD, { dtype: 'bf16' });
    try {
      await expect(train(options(path.join(tmp, 'refused'), { model: p, dtype: 'fp32' }))).rejects.toThrow('Expected no dtype with a loaded Pipeline (it keeps the dtype it was loaded with) for dtype but received "fp32"');
      const r = await train(options(path.join(tmp, 'loaded'), { model: p, stage: 1, stage1: { steps: 1, batch: 1 } }));
      expect(r.concept.precision.unet).toBe('bf16');
      expect(r.concept.hyperparameters.dtype).toBe('bf16');
    } finally {
      p.dispose();
    }
  });
});

describe('the CLI options', () => {
  test('train --dtype, --grad-checkpointing and --channels-last reach train()', async () => {
    expect(trainOptionsFromCli({ image: IMAGE, class: 'face', dtype: 'bf16', gradCheckpointing: true, channelsLast: true })).toMatchObject({ dtype: 'bf16', gradCheckpointing: true, channelsLast: true });
    const out = path.join(os.tmpdir(), 'si-cli-never-written');
    await expect(buildCli(['train', '--image', IMAGE, '--mask', MASK, '--class', 'face', '--model', TINY_SD, '--out', out, '--dtype', 'fp16']).parseAsync()).rejects.toThrow(
      'Expected fp32 or bf16 on the CPU (fp16 needs CUDA; use bf16 on CPU) for dtype but received "fp16"',
    );
    // (yargs refuses an unknown choice synchronously, while parsing)
    await expect((async () => buildCli(['train', '--image', IMAGE, '--class', 'face', '--model', TINY_SD, '--out', out, '--dtype', 'fp8']).parseAsync())()).rejects.toThrow(
      /Argument: dtype, Given: "fp8", Choices: "fp32", "bf16", "fp16"/,
    );
  });

  test('generate --dtype bf16 --channels-last writes an image', async () => {
    const out = fs.mkdtempSync(path.join(os.tmpdir(), 'si-cli-gen-'));
    try {
      const r = await runGenerate({ model: TINY_SD, prompt: 'a red cube', steps: 2, width: 64, height: 64, scheduler: 'ddim', seed: 1, out, dtype: 'bf16', channelsLast: true }, { progress: false });
      expect(r.files).toHaveLength(1);
      expect(fs.existsSync(r.files[0])).toBe(true);
    } finally {
      fs.rmSync(out, { recursive: true, force: true });
    }
  });
});
