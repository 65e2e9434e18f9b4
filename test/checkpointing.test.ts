/**
 * Gradient checkpointing of the UNet's blocks (native/checkpoint.h): the same losses and gradients
 * with and without it, for stage I (gradients w.r.t. the placeholder vector, through the text
 * encoder and the image encoder) and stage II (gradients w.r.t. LoRA adapters inside the recomputed
 * blocks, also when no block input requires grad), in fp32 and with bf16 models.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { loadTrainingInputs } from '../lib/image';
import { loadPipeline, Pipeline } from '../lib/models';
import { native, NativeModelHandle, NativeTensor } from '../lib/native';
import { resolveSchedulerConfig } from '../lib/schedulers';
import { StepResult, Trainer, TrainingInputs } from '../lib/train';
import { diff, expectClose, GoldenCase, loadCase } from './helpers/cases';
import { fixture } from './helpers/fixtures';

// The recompute runs the same kernels on the same inputs, so every forward value is bit-identical
// (measured: 0). Gradients are sums over the blocks' contributions, and checkpointing sums each
// block's part first (its own backward) and the blocks' parts after: the same terms, associated
// differently, so float32 rounding moves them by ~1e-8 (measured on the loss case: dL/dv 2e-8,
// dL_sm/dLoRA 1.5e-8 abs; trainer steps: 1.0e-7 stage I, 1.5e-8 stage II). The bound for gradients:
const SAME_TOL = 1e-6;
// With bf16 models the gradients inside the UNet are bf16 tensors, summed in bf16: the reassociation
// moves them by bf16 rounding (2^-9 relative per sum). Bound on ||g_checkpointed - g|| / ||g|| over all
// trainable parameters together (measured: 1.9e-2 stage I, 8.7e-3 stage II; fp32: 7e-7):
const BF16_GRAD_REL = 5e-2;
const LORA_LAYER = 'lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k';

const handle = (m: unknown) => (m as { handle: NativeModelHandle }).handle;

describe('the golden loss case with and without gradient checkpointing', () => {
  let golden: GoldenCase;
  let pipeline: Pipeline;
  beforeAll(async () => {
    golden = await loadCase('singleinsert_losses');
    pipeline = await loadPipeline(fixture('tiny-sd'));
  });
  afterAll(() => pipeline?.dispose());

  const run = (gradCheckpointing: boolean) => {
    const g = golden.tensors;
    return native().singleinsertLossCase({
      unet: handle(pipeline.unet), vae: handle(pipeline.vae), textEncoder: handle(pipeline.textEncoder),
      scheduleConfig: JSON.stringify(resolveSchedulerConfig(pipeline.schedulerConfig, 'tiny-sd scheduler', 'ddpm')),
      image: g['input.image'], mask_fullres: g['input.mask_fullres'], timesteps: g['input.timesteps'], noise: g['input.noise'],
      input_ids_star: g['input.input_ids_star'], input_ids_class: g['input.input_ids_class'], v: g['input.v'],
      lora: fixture('lora', 'lora.safetensors'), lora_target_keys: [`${LORA_LAYER}.lora_down.weight`, `${LORA_LAYER}.lora_up.weight`],
      gradCheckpointing,
    });
  };

  test('every loss, gradient (dL/dv; dL_sm/dLoRA with no block input requiring grad) and intermediate is the same', async () => {
    const plain = await run(false);
    const checkpointed = await run(true);
    expect(Object.keys(checkpointed).sort()).toEqual(Object.keys(plain).sort());
    for (const k of Object.keys(plain).sort()) expectClose(`checkpointed ${k}`, checkpointed[k], plain[k], SAME_TOL, 0);
    // and still the golden gradients (fixtures README: rtol 1e-3, atol 1e-6)
    for (const k of ['dL_dv', 'dL_sm_dlora_down', 'dL_sm_dlora_up']) expectClose(`checkpointed ${k} vs golden`, checkpointed[k], golden.tensors[`output.${k}`], 1e-6, 1e-3);
  });
});

describe('trainer steps with and without gradient checkpointing (tiny-sd, 64 px)', () => {
  let inputs: TrainingInputs;
  let encoderConfig: Record<string, unknown>;
  beforeAll(async () => {
    inputs = await loadTrainingInputs({ image: fixture('cases', 'images', 'face64.png'), mask: fixture('cases', 'images', 'face64_mask.png'), resolution: 64, encoderSize: 32 });
    encoderConfig = JSON.parse(fs.readFileSync(fixture('tiny-sd', 'image_encoder', 'config.json'), 'utf8'));
  });

  /**
   * The first step of `stage` (batch 2, seeded draws) from a fresh trainer: its losses and every
   * gradient (image encoder; in stage II also the LoRA of the UNet and the text encoder).
   */
  async function firstStep(pipeline: Pipeline, stage: 1 | 2, gradCheckpointing: boolean): Promise<StepResult> {
    const trainer = await Trainer.create(pipeline, {
      inputs, classWord: 'face', seed: 21, gradCheckpointing,
      imageEncoder: { source: 'tiny', config: encoderConfig, weights: path.join(fixture('tiny-sd', 'image_encoder'), 'model.safetensors'), processor: null },
    });
    try {
      if (stage === 2) await trainer.startStage2({ rank: 4 });
      return await trainer.step({ stage, batch: 2, lr: 1e-3, step: 0, returnGradients: true });
    } finally {
      await trainer.dispose();
    }
  }

  /** max |a - b| over every gradient, and ||a - b|| / ||a|| over all of them together. */
  function compare(label: string, a: StepResult, b: StepResult): { maxAbs: number; relNorm: number } {
    expect(Object.keys(b.gradients!).sort()).toEqual(Object.keys(a.gradients!).sort());
    let maxAbs = 0, d2 = 0, n2 = 0;
    for (const k of Object.keys(a.gradients!)) {
      const x = a.gradients![k].data as Float32Array, y = b.gradients![k].data as Float32Array;
      for (let i = 0; i < x.length; i++) {
        maxAbs = Math.max(maxAbs, Math.abs(x[i] - y[i]));
        d2 += (x[i] - y[i]) ** 2;
        n2 += x[i] ** 2;
      }
    }
    const relNorm = Math.sqrt(d2 / n2);
    const lossDiff = Math.max(...Object.keys(a.losses).map((k) => Math.abs(a.losses[k as keyof typeof a.losses] - b.losses[k as keyof typeof b.losses])));
    // eslint-disable-next-line no-console
    console.log(`${label}: ${Object.keys(a.gradients!).length} gradients, max abs diff ${maxAbs.toExponential(2)}, relative norm of the difference ${relNorm.toExponential(2)}; losses max abs diff ${lossDiff.toExponential(2)}; grad norm ${a.gradNorm} vs ${b.gradNorm}`);
    expect(lossDiff).toBe(0); // the forward is the same computation
    return { maxAbs, relNorm };
  }

  test('fp32: the same losses (exactly) and gradients (within 1e-6) in stage I and stage II', async () => {
    const pipeline = await loadPipeline(fixture('tiny-sd'));
    try {
      for (const stage of [1, 2] as const) {
        const r = compare(`fp32 stage ${stage}`, await firstStep(pipeline, stage, false), await firstStep(pipeline, stage, true));
        expect(r.maxAbs).toBeLessThanOrEqual(SAME_TOL);
      }
      const lora = await firstStep(pipeline, 2, true);
      // every LoRA adapter inside the checkpointed blocks got its gradients: 132 layers x (down, up)
      expect(Object.keys(lora.gradients!).filter((k) => k.startsWith('lora.lora_unet_')).length).toBe(264);
    } finally {
      pipeline.dispose();
    }
  });

  test('bf16 models (fp32 LoRA adapters on bf16 layers, recomputed): the same losses, gradients within bf16 rounding', async () => {
    const pipeline = await loadPipeline(fixture('tiny-sd'), { dtype: 'bf16' });
    try {
      for (const stage of [1, 2] as const) {
        const r = compare(`bf16 stage ${stage}`, await firstStep(pipeline, stage, false), await firstStep(pipeline, stage, true));
        expect(r.relNorm).toBeLessThanOrEqual(BF16_GRAD_REL);
      }
    } finally {
      pipeline.dispose();
    }
  });
});
