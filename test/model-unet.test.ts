import * as fs from 'node:fs';
import { readConfig } from '../lib/config';
import { native, NativeModelHandle, NativeTensor, Tensor } from '../lib/native';
import { expectClose, loadCase, GoldenCase } from './helpers/cases';
import { fixture } from './helpers/fixtures';

// The golden output was made in float32 by diffusers on CPU; its own float32-vs-float64 error is
// 2.1e-6, so 1e-4 leaves room for a different summation order without hiding a wrong formula.
const OUTPUT_TOL = 1e-4;
// Intermediates reach magnitudes of ~15 (up_blocks.1), where float32 reordering moves ~2e-5.
const INTERMEDIATE_TOL = 5e-4;
// Same weights and inputs through another code path (1x1 conv vs Linear, int vs float timestep):
// only the summation order differs.
const SAME_MATH_TOL = 1e-5;

const HOOKS = [
  'time_proj', 'time_embedding', 'conv_in',
  'down_blocks.0', 'down_blocks.1', 'down_blocks.2',
  'mid_block',
  'up_blocks.0', 'up_blocks.1', 'up_blocks.2',
  'conv_norm_out', 'conv_act',
];

// resolved the way the library does it (lib/config.ts fills the diffusers defaults)
const tinyConfig = JSON.stringify(readConfig('unet', fixture('tiny-sd', 'unet', 'config.json')));
const tinyWeights = fixture('tiny-sd', 'unet', 'diffusion_pytorch_model.safetensors');

function numel(shape: number[]): number {
  return shape.reduce((a, b) => a * b, 1);
}

function f32(shape: number[], fill: (i: number) => number): Tensor {
  const data = new Float32Array(numel(shape));
  for (let i = 0; i < data.length; i++) data[i] = fill(i);
  return { dtype: 'F32', shape, data };
}

describe('unet (UNet2DConditionModel, diffusers 0.25.1)', () => {
  let golden: GoldenCase;
  let unet: NativeModelHandle;
  let inputs: Record<string, NativeTensor>;

  beforeAll(async () => {
    golden = await loadCase('unet');
    unet = await native().loadModel('unet', tinyConfig, { files: [tinyWeights] });
    inputs = {
      sample: golden.tensors['input.latents'],
      timestep: golden.tensors['input.timesteps'],
      encoder_hidden_states: golden.tensors['input.encoder_hidden_states'],
    };
  });
  afterAll(() => unet?.dispose());

  test('loads every tensor of the tiny checkpoint', () => {
    const tiny = JSON.parse(fs.readFileSync(fixture('manifests', 'tiny_models.json'), 'utf8')).models.unet;
    expect(unet.loadedTensors).toBe(tiny.num_tensors);
  });

  test('forward matches the golden noise prediction', async () => {
    const out = await unet.run('forward', inputs);
    expect(Object.keys(out)).toEqual(['sample']);
    expectClose('unet output.sample', out.sample, golden.tensors['output.sample'], OUTPUT_TOL, OUTPUT_TOL);
  });

  test('forward_debug matches every golden intermediate', async () => {
    const out = await unet.run('forward_debug', inputs);
    expect(Object.keys(out).sort()).toEqual(['sample', ...HOOKS].sort());
    expectClose('unet output.sample (debug)', out.sample, golden.tensors['output.sample'], OUTPUT_TOL, OUTPUT_TOL);
    for (const name of HOOKS) {
      expectClose(`unet intermediate.${name}`, out[name], golden.tensors[`intermediate.${name}`], INTERMEDIATE_TOL, INTERMEDIATE_TOL);
    }
  });

  test('timestep as float32, and as a scalar broadcast over the batch', async () => {
    const reference = (await unet.run('forward', inputs)).sample;
    const t = Array.from(inputs.timestep.data as BigInt64Array, Number);
    const asFloat = await unet.run('forward', { ...inputs, timestep: f32([2], (i) => t[i]) });
    expectClose('unet timestep F32 vs I64', asFloat.sample, reference, SAME_MATH_TOL, SAME_MATH_TOL);

    // a 0-dim timestep equals the same value repeated per sample
    const scalar = await unet.run('forward', { ...inputs, timestep: { dtype: 'I64', shape: [], data: new BigInt64Array([BigInt(t[0])]) } });
    const repeated = await unet.run('forward', { ...inputs, timestep: { dtype: 'I64', shape: [2], data: new BigInt64Array([BigInt(t[0]), BigInt(t[0])]) } });
    expectClose('unet timestep [] vs [B]', scalar.sample, repeated.sample, 0, 0);
  });

  test('a latent that is not a multiple of 8 keeps its spatial size', async () => {
    // 9x7 downsamples to 5x4, 3x2, 2x1; each upsampler resizes to its skip's size (diffusers' forward_upsample_size)
    const out = await unet.run('forward', {
      sample: f32([1, 4, 9, 7], (i) => Math.sin(i * 0.37)),
      timestep: { dtype: 'I64', shape: [1], data: new BigInt64Array([500n]) },
      encoder_hidden_states: f32([1, 77, 32], (i) => Math.cos(i * 0.11)),
    });
    expect(out.sample.shape).toEqual([1, 4, 9, 7]);
    expect(Array.from(out.sample.data as Float32Array).every(Number.isFinite)).toBe(true);
  });

  test('refuses inputs that do not fit, naming the shapes', async () => {
    await expect(unet.run('forward', { ...inputs, timestep: { dtype: 'I64', shape: [3], data: new BigInt64Array([1n, 2n, 3n]) } }))
      .rejects.toThrow('unet: timestep must be [] or [2], got [3]');
    await expect(unet.run('forward', { ...inputs, sample: f32([2, 3, 8, 8], () => 0) }))
      .rejects.toThrow('unet: sample must be [B, 4, h, w], got [2, 3, 8, 8]');
    await expect(unet.run('forward', { ...inputs, encoder_hidden_states: f32([2, 77, 16], () => 0) }))
      .rejects.toThrow('unet: encoder_hidden_states has 16 features but cross_attention_dim of block 0 is 32');
    await expect(unet.run('encode', inputs)).rejects.toThrow('unet has no method "encode" (expected forward or forward_debug)');
  });
});

describe('unet architecture (describeModel)', () => {
  const sd15 = JSON.parse(fs.readFileSync(fixture('manifests', 'sd15_unet.json'), 'utf8'));

  test('SD v1.5 config gives exactly the checkpoint keys and shapes, in state-dict order', () => {
    const described = native().describeModel('unet', JSON.stringify(sd15.config));
    expect(described.length).toBe(686);
    expect(described.reduce((n, [, shape]) => n + numel(shape), 0)).toBe(859_520_964);
    expect(described).toEqual(Object.entries(sd15.shapes));
  });

  test('the tiny model\'s fully resolved config (every diffusers key, nulls included) gives its manifest', () => {
    const tiny = JSON.parse(fs.readFileSync(fixture('manifests', 'tiny_models.json'), 'utf8')).models.unet;
    const described = native().describeModel('unet', JSON.stringify(tiny.effective_config));
    expect(described).toEqual(Object.entries(tiny.shapes));
    expect(described.reduce((n, [, shape]) => n + numel(shape), 0)).toBe(tiny.num_parameters);
  });

  test('use_linear_projection builds proj_in/proj_out as Linear layers', () => {
    const conv = native().describeModel('unet', JSON.stringify(sd15.config));
    const linear = native().describeModel('unet', JSON.stringify({ ...sd15.config, use_linear_projection: true }));
    expect(linear.map(([k]) => k)).toEqual(conv.map(([k]) => k));
    const shapes = Object.fromEntries(linear);
    expect(shapes['down_blocks.0.attentions.0.proj_in.weight']).toEqual([320, 320]);
    expect(shapes['down_blocks.0.attentions.0.proj_out.weight']).toEqual([320, 320]);
    expect(shapes['mid_block.attentions.0.proj_in.weight']).toEqual([1280, 1280]);
    expect(shapes['up_blocks.3.attentions.2.proj_out.weight']).toEqual([320, 320]);
    // every other tensor is unchanged; a 1x1 conv weight [out, in, 1, 1] became [out, in]
    for (const [key, shape] of conv) {
      const proj = /\.proj_(in|out)\.weight$/.test(key);
      expect([key, shapes[key]]).toEqual([key, proj ? shape.slice(0, 2) : shape]);
    }
  });

  test('use_linear_projection computes what the 1x1 conv computes', async () => {
    const golden = await loadCase('unet');
    const keys = native().describeModel('unet', tinyConfig).map(([k]) => k);
    // the tiny checkpoint's conv weights [C, C, 1, 1] go into the Linear layers [C, C]
    const map: Array<[string, number, string, boolean]> = keys.map((k) => [k, 0, k, /\.proj_(in|out)\.weight$/.test(k)]);
    const linear = await native().loadModel('unet', JSON.stringify({ ...JSON.parse(tinyConfig), use_linear_projection: true }), { files: [tinyWeights], map });
    try {
      const out = await linear.run('forward', {
        sample: golden.tensors['input.latents'],
        timestep: golden.tensors['input.timesteps'],
        encoder_hidden_states: golden.tensors['input.encoder_hidden_states'],
      });
      expectClose('unet linear projection vs golden', out.sample, golden.tensors['output.sample'], OUTPUT_TOL, OUTPUT_TOL);
    } finally {
      linear.dispose();
    }
  });

  test('refuses configs outside the SD v1.x block set, naming the key', () => {
    const cfg = JSON.parse(tinyConfig);
    expect(() => native().describeModel('unet', JSON.stringify({ ...cfg, upcast_attention: true })))
      .toThrow('describeModel: config key "upcast_attention" is true; this UNet port supports only false (SD v1.x)');
    expect(() => native().describeModel('unet', JSON.stringify({ ...cfg, class_embed_type: 'timestep' })))
      .toThrow('describeModel: config key "class_embed_type" is set; this UNet port supports only null (SD v1.x)');
    expect(() => native().describeModel('unet', JSON.stringify({ ...cfg, down_block_types: ['CrossAttnDownBlock2D', 'DownBlock2D'] })))
      .toThrow('describeModel: config keys "down_block_types" (2 entries) and "up_block_types" (3) must each have one entry per "block_out_channels" entry (3)');
    expect(() => native().describeModel('unet', JSON.stringify({ ...cfg, num_attention_heads: 8 })))
      .toThrow('describeModel: config key "num_attention_heads" is set; diffusers 0.25.1 refuses it too: give the number of heads as "attention_head_dim"');
    expect(() => native().describeModel('unet', JSON.stringify({ ...cfg, attention_head_dim: [8, 8] })))
      .toThrow('describeModel: config key "attention_head_dim" is [8, 8]: expected one entry per down block (3)');
  });
});
