/**
 * SingleInsert training on the tiny model (fixtures tiny-sd, face64.png + face64_mask.png at 64 px):
 * both stages end to end, the files they write, a loss that goes down, bit-exact resume after an
 * abort, the exported LoRA in a fresh pipeline, option errors, and the `train` command.
 */
import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { buildCli } from '../lib/cli';
import { formatProgress, runTrain, TrainProgressReporter } from '../lib/cli/commands/train';
import { Config } from '../lib/config';
import { AbortError } from '../lib/errors';
import { loadTrainingInputs } from '../lib/image';
import { buildInfo } from '../lib/info';
import { applyLora, collectLora } from '../lib/lora';
import { loadPipeline, Pipeline } from '../lib/models';
import { NativeTensor, Tensor } from '../lib/native';
import { readSafetensors } from '../lib/safetensors';
import { ConceptJson, Trainer, train, TrainingInputs, TrainOptions, TrainProgress } from '../lib/train';
import { fixture } from './helpers/fixtures';

const IMAGE = fixture('cases', 'images', 'face64.png');
const MASK = fixture('cases', 'images', 'face64_mask.png');
const TINY_SD = fixture('tiny-sd');
const TINY_ENCODER = fixture('tiny-sd', 'image_encoder');
const HIDDEN = 32; // tiny-sd text encoder hidden size = the embedding width
const LORA_MODULES = 144; // 132 UNet + 12 text encoder layers (fixtures README, lora/)
// whole batch vs micro-batches: the same sums grouped differently (float32 rounding, seen up to 7e-6)
const MICRO_RTOL = 1e-4;

/** Deterministic N(0, 1) samples (mulberry32 + Box-Muller), for fixed evaluation batches. */
function gaussian(n: number, seed: number): Float32Array {
  let s = seed >>> 0;
  const uniform = () => {
    s = (s + 0x6d2b79f5) >>> 0;
    let t = s;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return (((t ^ (t >>> 14)) >>> 0) + 0.5) / 4294967296;
  };
  return Float32Array.from({ length: n }, () => Math.sqrt(-2 * Math.log(uniform())) * Math.cos(2 * Math.PI * uniform()));
}

function bytes(t: Tensor): Buffer {
  return Buffer.from(t.data.buffer, t.data.byteOffset, t.data.byteLength);
}

/** Every tensor of the concept's three files (the LoRA only when present). */
async function conceptTensors(dir: string): Promise<Record<string, NativeTensor>> {
  const out: Record<string, NativeTensor> = {};
  for (const file of ['embedding.safetensors', 'lora.safetensors', 'encoder.safetensors']) {
    const p = path.join(dir, file);
    if (!fs.existsSync(p)) continue;
    for (const [k, t] of Object.entries((await readSafetensors(p)).tensors)) out[`${file}:${k}`] = t;
  }
  return out;
}

function expectIdentical(a: Record<string, NativeTensor>, b: Record<string, NativeTensor>): void {
  expect(Object.keys(a).sort()).toEqual(Object.keys(b).sort());
  const differing = Object.keys(a).filter((k) => a[k].dtype !== b[k].dtype || JSON.stringify(a[k].shape) !== JSON.stringify(b[k].shape) || !bytes(a[k]).equals(bytes(b[k])));
  expect(differing).toEqual([]);
}

describe('SingleInsert training (tiny-sd, 64 px)', () => {
  let pipeline: Pipeline;
  let tmp: string;
  let encoderConfig: Config;
  let inputs: TrainingInputs;
  let run = 0;
  const outDir = (name: string) => path.join(tmp, `${name}-${run++}`);

  // Small and fast: 3 + 3 steps of batch 2 with the tiny image encoder's config, randomly initialised.
  const base = (out: string, extra: Partial<TrainOptions> = {}): TrainOptions => ({
    model: pipeline,
    image: IMAGE,
    mask: MASK,
    classWord: 'face',
    out,
    resolution: 64,
    stage1: { steps: 3, batch: 2, lr: 1e-3 },
    stage2: { steps: 3, batch: 2, lr: 1e-3 },
    seed: 11,
    imageEncoder: { config: encoderConfig },
    ...extra,
  });

  beforeAll(async () => {
    pipeline = await loadPipeline(TINY_SD);
    encoderConfig = JSON.parse(fs.readFileSync(path.join(TINY_ENCODER, 'config.json'), 'utf8'));
    inputs = await loadTrainingInputs({ image: IMAGE, mask: MASK, resolution: 64, encoderSize: 32 });
    tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'si-train-'));
  });
  afterAll(() => {
    pipeline?.dispose();
    if (tmp) fs.rmSync(tmp, { recursive: true, force: true });
  });

  test('both stages run and write the embedding, the kohya LoRA, the encoder and concept.json', async () => {
    const out = outDir('both');
    const events: TrainProgress[] = [];
    const t0 = performance.now();
    const result = await train(base(out), { onProgress: (p) => events.push(p) });
    // eslint-disable-next-line no-console
    console.log(`3 + 3 steps of batch 2: ${((performance.now() - t0) / 1000).toFixed(2)} s; stage I ${(result.concept.timings.stage1SecPerStep! * 1000).toFixed(0)} ms/step, stage II ${(result.concept.timings.stage2SecPerStep! * 1000).toFixed(0)} ms/step`);

    // progress: one event per step, in order, with the documented shape
    expect(events.map((e) => [e.stage, e.step, e.steps])).toEqual([[1, 1, 3], [1, 2, 3], [1, 3, 3], [2, 1, 3], [2, 2, 3], [2, 3, 3]]);
    for (const e of events) {
      expect(Object.keys(e).sort()).toEqual(['etaSec', 'gradNorm', 'itPerSec', 'lossScale', 'losses', 'lr', 'peakMemoryBytes', 'peakRssBytes', 'skipped', 'stage', 'step', 'steps']);
      // fp32 on the CPU: no loss scaling, no CUDA allocator; the process's peak RSS is known
      expect([e.lossScale, e.skipped, e.peakMemoryBytes]).toEqual([null, false, null]);
      expect(e.peakRssBytes).toBeGreaterThan(0);
      expect(Object.keys(e.losses).sort()).toEqual(['bg', 'fg', 'sm', 'total']);
      for (const v of [...Object.values(e.losses), e.gradNorm, e.itPerSec, e.etaSec]) expect(Number.isFinite(v)).toBe(true);
      expect(e.lr).toBe(1e-3);
      expect(e.losses.fg).toBeGreaterThan(0);
      expect(e.losses.total).toBeCloseTo(e.losses.fg + e.losses.bg + e.losses.sm, 5);
      if (e.stage === 1) expect(e.losses.sm).toBe(0);
      else expect(e.losses.sm).toBeGreaterThanOrEqual(0);
    }
    expect(events[events.length - 1].etaSec).toBe(0);

    // the files
    expect(result.files).toEqual({
      concept: path.join(out, 'concept.json'),
      embedding: path.join(out, 'embedding.safetensors'),
      lora: path.join(out, 'lora.safetensors'),
      encoder: path.join(out, 'encoder.safetensors'),
    });
    const embedding = await readSafetensors(result.files.embedding);
    expect(Object.keys(embedding.tensors)).toEqual(['emb_params']);
    expect(embedding.tensors.emb_params).toMatchObject({ dtype: 'F32', shape: [1, HIDDEN] });
    expect(embedding.metadata).toMatchObject({ 'singleinsert.placeholder': '*', 'singleinsert.class_word': 'face', 'singleinsert.prompt': '* face' });

    const lora = await readSafetensors(result.files.lora!);
    const fixtureKeys: Record<string, { shape: number[] }> = JSON.parse(fs.readFileSync(fixture('lora', 'lora_keys.json'), 'utf8')).keys;
    expect(Object.keys(lora.tensors).sort()).toEqual(Object.keys(fixtureKeys).sort()); // 144 modules x {down, up, alpha}, kohya names
    for (const [k, t] of Object.entries(lora.tensors)) expect([k, t.shape]).toEqual([k, fixtureKeys[k].shape]);
    expect(lora.metadata).toMatchObject({ ss_network_module: 'networks.lora', ss_network_dim: '4', ss_network_alpha: '4.0' });

    const encoder = await readSafetensors(result.files.encoder);
    const pretrained = await readSafetensors(path.join(TINY_ENCODER, 'model.safetensors'));
    const expected: Record<string, number[]> = { 'head.weight': [HIDDEN, 32], 'head.bias': [HIDDEN] };
    for (const [k, t] of Object.entries(pretrained.tensors)) expected[k] = t.shape;
    expect(Object.fromEntries(Object.entries(encoder.tensors).map(([k, t]) => [k, t.shape]))).toEqual(expected);

    const concept: ConceptJson = JSON.parse(fs.readFileSync(result.files.concept, 'utf8'));
    expect(concept).toMatchObject({
      format: 'singleinsert-native.concept',
      version: 1,
      placeholder: '*',
      classWord: 'face',
      prompt: '* face',
      files: { embedding: 'embedding.safetensors', lora: 'lora.safetensors', encoder: 'encoder.safetensors' },
      embedding: { key: 'emb_params', shape: [1, HIDDEN] },
      lora: { format: 'kohya', rank: 4, alpha: 4, modules: LORA_MODULES },
      hyperparameters: { stage: 'both', stage1: { steps: 3, batch: 2, lr: 1e-3 }, stage2: { steps: 3, batch: 2, lr: 1e-3 }, gamma: 1, eta: 1, rank: 4, seed: 11, resolution: 64, fgNorm: 'mean' },
      library: { name: 'singleinsert-native', torch: buildInfo().torchVersion },
      inputs: { image: IMAGE, mask: MASK },
    });
    // base-model identity: sha256 of the UNet file's 8-byte length + JSON header
    const unetFile = path.join(TINY_SD, 'unet', 'diffusion_pytorch_model.safetensors');
    const raw = fs.readFileSync(unetFile);
    const headerBytes = raw.subarray(0, 8 + Number(raw.readBigUInt64LE(0)));
    expect(concept.baseModel).toEqual({ path: TINY_SD, unetWeights: [unetFile], unetHeaderSha256: crypto.createHash('sha256').update(headerBytes).digest('hex') });
    expect(concept.finalLosses.stage1).toEqual(events[2].losses);
    expect(concept.finalLosses.stage2).toEqual(events[5].losses);
    expect(concept.timings.stage1Sec).toBeGreaterThan(0);
    expect(concept.timings.resumed).toBe(false);
    expect(fs.existsSync(path.join(out, 'checkpoint'))).toBe(false); // no checkpointEvery
    expect(fs.readdirSync(out).filter((f) => f.includes('.tmp'))).toEqual([]);

    // the shared pipeline is left without the trainer's LoRA
    expect(Object.keys(await collectLora(pipeline.unet, { name: 'singleinsert' }))).toHaveLength(0);
    expect(Object.keys(await collectLora(pipeline.textEncoder, { name: 'singleinsert' }))).toHaveLength(0);
  });

  test('the random encoder init is seeded; pretrained CLIPVisionModelWithProjection and CLIPModel folders load as they are', async () => {
    const untrained = (seed: number, extra: Partial<TrainOptions> = {}) => train(base(outDir('init'), { stage: 1, stage1: { steps: 0 }, seed, ...extra }));
    const a = await readSafetensors((await untrained(5)).files.embedding);
    const b = await readSafetensors((await untrained(5)).files.embedding);
    const c = await readSafetensors((await untrained(6)).files.embedding);
    expect(bytes(a.tensors.emb_params).equals(bytes(b.tensors.emb_params))).toBe(true);
    expect(bytes(a.tensors.emb_params).equals(bytes(c.tensors.emb_params))).toBe(false);

    const loaded = await untrained(5, { imageEncoder: TINY_ENCODER });
    expect(loaded.files.lora).toBeNull(); // stage I only: no LoRA
    expect(loaded.concept.lora).toBeNull();
    const encoder = await readSafetensors(loaded.files.encoder);
    const pretrained = await readSafetensors(path.join(TINY_ENCODER, 'model.safetensors'));
    for (const [k, t] of Object.entries(pretrained.tensors)) expect([k, bytes(encoder.tensors[k]).equals(bytes(t))]).toEqual([k, true]);
    expect(loaded.concept.imageEncoder.source).toBe(TINY_ENCODER);

    // a whole CLIPModel folder (as openai/clip-vit-base-patch32 ships): its vision tower and
    // projection (16 wide here), the head mapping 16 -> 32
    const clip = await untrained(5, { imageEncoder: fixture('tiny-clip') });
    const clipEncoder = await readSafetensors(clip.files.encoder);
    const clipWeights = await readSafetensors(fixture('tiny-clip', 'model.safetensors'));
    const vision = Object.keys(clipWeights.tensors).filter((k) => k.startsWith('vision_model.') || k === 'visual_projection.weight');
    expect(Object.keys(clipEncoder.tensors).sort()).toEqual([...vision, 'head.bias', 'head.weight'].sort());
    for (const k of vision) expect([k, bytes(clipEncoder.tensors[k]).equals(bytes(clipWeights.tensors[k]))]).toEqual([k, true]);
    expect(clipEncoder.tensors['head.weight'].shape).toEqual([HIDDEN, 16]);
  });

  test('training lowers the foreground loss on a fixed batch (stage I, then stage II)', async () => {
    // The tiny random UNet barely listens to its conditioning, so on random batches the loss is
    // dominated by the draw of t; on one fixed batch the objective is deterministic and every step
    // must go downhill if the gradients (encoder -> text encoder -> UNet -> losses) and AdamW are right.
    const trainer = await Trainer.create(pipeline, { inputs, classWord: 'face', seed: 4, imageEncoder: { source: 'random', config: encoderConfig, weights: null, processor: null } });
    try {
      const B = 4;
      const batch = { timesteps: { data: BigInt64Array.from([10n, 260n, 510n, 760n]), shape: [B] }, noise: { data: gaussian(B * 4 * 8 * 8, 99), shape: [B, 4, 8, 8] } };
      const before = await trainer.evaluate(batch);
      const seen: number[] = [];
      for (let step = 0; step < 5; step++) seen.push((await trainer.step({ stage: 1, batch: B, lr: 1e-3, step, ...batch })).losses.fg);
      const after = await trainer.evaluate(batch);
      // eslint-disable-next-line no-console
      console.log(`stage I fixed-batch fg: ${before.fg.toFixed(5)} -> ${after.fg.toFixed(5)} (per step ${seen.map((v) => v.toFixed(5)).join(', ')})`);
      expect(seen[0]).toBeCloseTo(before.fg, 5); // a step reports the losses before its update
      for (let i = 1; i < seen.length; i++) expect(seen[i]).toBeLessThan(seen[i - 1]);
      expect(after.fg).toBeLessThan(0.99 * before.fg);
      expect(after.sm).toBe(0);

      // stage II: the LoRA starts as a no-op (up = 0), so L_sm is exactly 0 and nothing else moves
      await trainer.startStage2({ rank: 4 });
      const start2 = await trainer.evaluate(batch);
      expect(start2.sm).toBe(0);
      expect(start2.fg).toBe(after.fg);
      for (let step = 0; step < 5; step++) await trainer.step({ stage: 2, batch: B, lr: 1e-3, step, ...batch });
      const end2 = await trainer.evaluate(batch);
      // eslint-disable-next-line no-console
      console.log(`stage II fixed-batch fg: ${start2.fg.toFixed(5)} -> ${end2.fg.toFixed(5)}, sm ${end2.sm.toExponential(2)}`);
      expect(end2.fg).toBeLessThan(0.99 * start2.fg);
      expect(end2.sm).toBeGreaterThan(0);
    } finally {
      await trainer.dispose();
    }
  });

  test('micro-batches give the same losses and updates; fgNorm "mask" divides by the mask area', async () => {
    const encoder = { source: 'random', config: encoderConfig, weights: null, processor: null };
    const B = 4;
    const batch = { timesteps: { data: BigInt64Array.from([900n, 400n, 90n, 5n]), shape: [B] }, noise: { data: gaussian(B * 4 * 8 * 8, 7), shape: [B, 4, 8, 8] } };
    const whole = await Trainer.create(pipeline, { inputs, classWord: 'face', seed: 9, imageEncoder: encoder });
    try {
      // the same sum in another grouping: float rounding only (batch-size-dependent kernels; L_bg is a
      // difference of two predictions, so its relative error is the largest)
      const full = await whole.evaluate(batch);
      const micro = await whole.evaluate({ ...batch, microBatch: 1 });
      for (const k of ['fg', 'bg', 'sm', 'total'] as const) expect(Math.abs(micro[k] - full[k])).toBeLessThanOrEqual(MICRO_RTOL * Math.abs(full[k]));

      // one stage-I and one stage-II step, whole vs micro-batches of 1 (gradient accumulation); the
      // second trainer needs its own models, since each attaches its LoRA to them in stage II
      const other = await loadPipeline(TINY_SD);
      const split = await Trainer.create(other, { inputs, classWord: 'face', seed: 9, imageEncoder: encoder });
      try {
        for (const stage of [1, 2] as const) {
          if (stage === 2) {
            await whole.startStage2({ rank: 4 });
            await split.startStage2({ rank: 4 });
          }
          const a = await whole.step({ stage, batch: B, lr: 1e-3, step: 0, ...batch });
          const b = await split.step({ stage, batch: B, lr: 1e-3, step: 0, microBatch: 1, ...batch });
          expect(Math.abs(a.gradNorm - b.gradNorm)).toBeLessThanOrEqual(MICRO_RTOL * a.gradNorm);
          const ea = (await whole.embedding()).data as Float32Array, eb = (await split.embedding()).data as Float32Array;
          const maxDiff = Math.max(...ea.map((v, i) => Math.abs(v - eb[i])));
          // eslint-disable-next-line no-console
          console.log(`stage ${stage}: whole vs micro-batch 1: grad norm ${a.gradNorm.toExponential(4)} vs ${b.gradNorm.toExponential(4)}, embedding max diff ${maxDiff.toExponential(2)}`);
          expect(maxDiff).toBeLessThan(1e-5);
        }
      } finally {
        await split.dispose();
        other.dispose();
      }
    } finally {
      await whole.dispose();
    }

    // L_fg with fgNorm "mask" = L_fg mean x (elements / mask area) = L_fg mean x (h·w / Σ m)
    const mean = await Trainer.create(pipeline, { inputs, classWord: 'face', seed: 9, imageEncoder: encoder });
    const masked = await Trainer.create(pipeline, { inputs, classWord: 'face', seed: 9, imageEncoder: encoder, fgNorm: 'mask' });
    try {
      const area = (inputs.maskLatent.data as Float32Array).reduce((a, v) => a + v, 0);
      const lm = await mean.evaluate(batch), lk = await masked.evaluate(batch);
      expect(lk.fg).toBeCloseTo((lm.fg * 64) / area, 5);
      expect(lk.bg).toBe(lm.bg);
    } finally {
      await mean.dispose();
      await masked.dispose();
    }
  });

  describe('resume', () => {
    // 4 + 4 steps with a checkpoint every 2 steps (and at the end of stage I)
    const options = (out: string) => base(out, { stage1: { steps: 4, batch: 2, lr: 1e-3 }, stage2: { steps: 4, batch: 2, lr: 1e-3 }, checkpointEvery: 2, seed: 21 });
    let reference: Record<string, NativeTensor>;

    beforeAll(async () => {
      const out = outDir('uninterrupted');
      await train(options(out));
      reference = await conceptTensors(out);
      expect(Object.keys(reference)).toHaveLength(1 + 3 * LORA_MODULES + Object.keys((await readSafetensors(path.join(out, 'encoder.safetensors'))).tensors).length);
    });

    for (const [stage, step] of [[1, 3], [2, 3]] as const) {
      test(`aborted after stage ${stage} step ${step}, then resumed: identical tensors to the uninterrupted run`, async () => {
        const out = outDir(`aborted${stage}`);
        const controller = new AbortController();
        const onProgress = (p: TrainProgress) => {
          if (p.stage === stage && p.step === step) controller.abort();
        };
        await expect(train(options(out), { signal: controller.signal, onProgress })).rejects.toThrow(
          new AbortError(`Training was aborted after stage ${stage} step ${step}; the checkpoint of stage ${stage} step ${step - 1} is in ${path.join(out, 'checkpoint')}; continue with resume: ${JSON.stringify(out)}`),
        );
        await expect(train(options(out), { signal: AbortSignal.abort() })).rejects.toBeInstanceOf(AbortError);
        expect(fs.existsSync(path.join(out, 'concept.json'))).toBe(false);
        const state = JSON.parse(fs.readFileSync(path.join(out, 'checkpoint', 'trainer.json'), 'utf8'));
        expect(state).toMatchObject({ stage, steps_done: stage === 1 ? [2, 0] : [4, 2], lora: stage === 1 ? null : { rank: 4, alpha: 4 } });

        // everything else (image, mask, class, seed, hyper-parameters, out) comes from the checkpoint
        const events: TrainProgress[] = [];
        const resumed = await train({ model: pipeline, resume: out } as TrainOptions, { onProgress: (p) => events.push(p) });
        expect(events[0]).toMatchObject({ stage, step: step }); // continues at the checkpoint (step - 1 done)
        expect(resumed.concept.timings.resumed).toBe(true);
        expectIdentical(await conceptTensors(out), reference);
      });
    }

    test('a resumed run refuses options that change the result', async () => {
      const out = outDir('refuse');
      const controller = new AbortController();
      await expect(train(options(out), { signal: controller.signal, onProgress: (p) => p.step === 2 && controller.abort() })).rejects.toBeInstanceOf(AbortError);
      await expect(train({ model: pipeline, resume: out, seed: 22 } as TrainOptions)).rejects.toThrow(
        `Expected 21 (the checkpoint's value) for seed but received 22: a resumed run keeps the options that decide its result (${path.join(out, 'checkpoint')})`,
      );
    });
  });

  test('the exported LoRA, applied to a fresh pipeline, gives bit-identical outputs', async () => {
    const unetInputs = {
      sample: { data: gaussian(4 * 8 * 8, 5), shape: [1, 4, 8, 8] },
      timestep: { data: BigInt64Array.from([500n]), shape: [1] },
      encoder_hidden_states: { data: gaussian(77 * HIDDEN, 6), shape: [1, 77, HIDDEN] },
    };
    const ids = pipeline.tokenizer.call('a photo of a face').inputIds;
    const textInputs = { input_ids: { data: BigInt64Array.from(ids.map(BigInt)), shape: [1, 77] } };
    const outputs = async (p: Pipeline) => [(await p.unet.run('forward', unetInputs)).sample, (await p.textEncoder.run('forward', textInputs)).last_hidden_state];
    const baseOutputs = await outputs(pipeline);

    const trainer = await Trainer.create(pipeline, { inputs, classWord: 'face', seed: 8, imageEncoder: { source: 'random', config: encoderConfig, weights: null, processor: null } });
    const dir = outDir('lora');
    let trained: NativeTensor[];
    try {
      await trainer.startStage2({ rank: 4 });
      for (let step = 0; step < 2; step++) await trainer.step({ stage: 2, batch: 2, lr: 1e-2, step });
      await trainer.exportConcept(dir, {});
      trained = await outputs(pipeline); // the trainer's adapters are on the shared models
    } finally {
      expect(await trainer.dispose()).toBe(LORA_MODULES);
    }
    expect(bytes(trained[0]).equals(bytes(baseOutputs[0]))).toBe(false); // the LoRA changed the models

    const fresh = await loadPipeline(TINY_SD);
    try {
      const applied = await applyLora([fresh.unet, fresh.textEncoder], path.join(dir, 'lora.safetensors'));
      expect(applied).toMatchObject({ modules: LORA_MODULES, unusedTensors: 0, unknownKeys: [] });
      const loaded = await outputs(fresh);
      expect(bytes(loaded[0]).equals(bytes(trained[0]))).toBe(true);
      expect(bytes(loaded[1]).equals(bytes(trained[1]))).toBe(true);
    } finally {
      fresh.dispose();
    }
    // and disposing the trainer restored the shared pipeline exactly
    const after = await outputs(pipeline);
    expect(bytes(after[0]).equals(bytes(baseOutputs[0]))).toBe(true);
    expect(bytes(after[1]).equals(bytes(baseOutputs[1]))).toBe(true);
  });

  describe('option errors (before anything is loaded or written)', () => {
    const cases: Array<[string, (out: string) => TrainOptions, string]> = [
      ['an unknown model path', (out) => base(out, { model: '/no/such/model' }), 'Model path /no/such/model does not exist'],
      ['batch 0', (out) => base(out, { stage1: { batch: 0 } }), 'Expected an integer >= 1 for stage1.batch but received 0'],
      ['a negative lr', (out) => base(out, { stage2: { lr: -1e-4 } }), 'Expected a finite number > 0 for stage2.lr but received -0.0001'],
      ['a NaN lr', (out) => base(out, { stage1: { lr: NaN } }), 'Expected a finite number > 0 for stage1.lr but received NaN'],
      ['fractional steps', (out) => base(out, { stage1: { steps: 1.5 } }), 'Expected an integer >= 0 for stage1.steps but received 1.5'],
      ['an empty class word', (out) => base(out, { classWord: ' ' }), `Expected a non-empty word or short phrase (at most 4 words of letters, digits, "-" or "'") for classWord but received " "`],
      ['a missing image', (out) => base(out, { image: '/no/such.png' }), 'Expected an image file (no such file) for image but received "/no/such.png"'],
      ['a bad stage', (out) => base(out, { stage: 3 as unknown as 1 }), 'Expected 1, 2 or "both" for stage but received 3'],
      ['a bad resolution', (out) => base(out, { resolution: 100 }), 'Expected a multiple of 64 between 64 and 2048 for resolution but received 100'],
      ['a resume folder without a checkpoint', (out) => base(out, { resume: os.tmpdir() }), `Expected a folder with a checkpoint (checkpoint/trainer.json) for resume but received ${JSON.stringify(os.tmpdir())}`],
    ];
    for (const [what, options, message] of cases) {
      test(what, async () => {
        const out = outDir('bad');
        await expect(train(options(out))).rejects.toThrow(message);
        expect(fs.existsSync(out)).toBe(false);
      });
    }

    test('an output folder that cannot be written', async () => {
      const file = path.join(tmp, 'a-file');
      fs.writeFileSync(file, '');
      const out = path.join(file, 'out');
      await expect(train(base(out))).rejects.toThrow(`Expected a writable folder for out but received ${JSON.stringify(out)} (ENOTDIR)`);
    });

    test('an already aborted signal', async () => {
      await expect(train(base(outDir('aborted')), { signal: AbortSignal.abort() })).rejects.toThrow(new AbortError('Training was aborted before it started'));
    });
  });

  describe('the train command', () => {
    const capture = () => {
      let text = '';
      return { stream: { write: (s: string) => ((text += s), true), isTTY: false } as unknown as NodeJS.WritableStream, text: () => text };
    };
    const argv = (out: string) => ({ image: IMAGE, mask: MASK, class: 'face', model: TINY_SD, out, resolution: 64, stage1Steps: 2, stage1Batch: 1, stage2Steps: 1, stage2Batch: 1, seed: 3, imageEncoder: TINY_ENCODER });

    test('--json prints one JSON line per step and a summary', async () => {
      const stdout = capture(), stderr = capture();
      const out = outDir('cli');
      await runTrain({ ...argv(out), json: true }, { stdout: stdout.stream, stderr: stderr.stream });
      const lines = stdout.text().trim().split('\n').map((l) => JSON.parse(l));
      expect(lines.map((l) => [l.event, l.stage, l.step])).toEqual([['progress', 1, 1], ['progress', 1, 2], ['progress', 2, 1], ['done', undefined, undefined]]);
      expect(Object.keys(lines[0]).sort()).toEqual(['etaSec', 'event', 'gradNorm', 'itPerSec', 'lossScale', 'losses', 'lr', 'peakMemoryBytes', 'peakRssBytes', 'skipped', 'stage', 'step', 'steps']);
      expect(lines[3]).toMatchObject({ out, prompt: '* face', files: { lora: path.join(out, 'lora.safetensors') } });
      expect(stderr.text()).toBe('');
      expect(fs.existsSync(path.join(out, 'concept.json'))).toBe(true);
    });

    test('without --json: progress lines on stderr, a summary on stdout', async () => {
      const stdout = capture(), stderr = capture();
      const out = outDir('cli-human');
      await runTrain({ ...argv(out), stage: '1', stage1Steps: 1 }, { stdout: stdout.stream, stderr: stderr.stream });
      expect(stderr.text()).toMatch(/^stage I {2}\[#{20}\] 1\/1 {2}fg \d\.\d{4} {2}bg \S+ {2}total \d\.\d{4} {2}\d+\.\d{2} it\/s {2}eta 0s\n$/);
      expect(stdout.text().split('\n')[0]).toBe(`Wrote the concept to ${out}: embedding.safetensors, encoder.safetensors, concept.json`);
      expect(stdout.text()).toContain('Use the placeholder in prompts: "* face ..."');
    });

    test('the human display: one line per tenth of a stage when not on a terminal', () => {
      const err = capture();
      const reporter = new TrainProgressReporter(err.stream);
      const losses = { fg: 0.5, bg: 0.0002, sm: 0, total: 0.5002 };
      const cpu = { lossScale: null, skipped: false, peakMemoryBytes: null, peakRssBytes: 1e9 };
      for (let step = 1; step <= 20; step++) reporter.update({ stage: 1, step, steps: 20, losses, lr: 1e-4, gradNorm: 1, itPerSec: 2, etaSec: (20 - step) / 2, ...cpu });
      expect(err.text().trim().split('\n')).toHaveLength(10);
      expect(formatProgress({ stage: 2, step: 25, steps: 100, losses: { fg: 0.1234, bg: 0.0012, sm: 0.00004, total: 0.1246 }, lr: 5e-5, gradNorm: 1, itPerSec: 3.14159, etaSec: 95, ...cpu })).toBe(
        'stage II [#####---------------]  25/100  fg 0.1234  bg 0.0012  sm 4.00e-5  total 0.1246  3.14 it/s  eta 1m35s',
      );
      // CUDA with fp16: the allocator's peak and the loss scale, and a skipped step is marked
      const gpu = { lossScale: 32768, skipped: true, peakMemoryBytes: 12.5 * 2 ** 30, peakRssBytes: 1e9 };
      expect(formatProgress({ stage: 1, step: 1, steps: 50, losses: { fg: 0.5, bg: 0.25, sm: 0, total: 0.75 }, lr: 1e-4, gradNorm: 1, itPerSec: 4, etaSec: 37, ...gpu })).toBe(
        'stage I  [--------------------]  1/50  fg 0.5000  bg 0.2500  total 0.7500  4.00 it/s  eta 37s  mem 12.5 GiB  scale 32768 (step skipped)',
      );
    });

    test('flags reach the option checks', async () => {
      const args = ['train', '--image', IMAGE, '--class', 'face', '--model', TINY_SD, '--out', outDir('cli-bad'), '--stage1-batch', '0'];
      await expect(buildCli(args).parseAsync()).rejects.toThrow('Expected an integer >= 1 for stage1.batch but received 0');
      await expect(buildCli([...args.slice(0, -2), '--stage2-lr', 'abc']).parseAsync()).rejects.toThrow('Expected a finite number > 0 for stage2.lr but received NaN');
    });
  });
});
