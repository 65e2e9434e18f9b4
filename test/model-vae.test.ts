import * as fs from 'node:fs';
import { resolveConfig } from '../lib/config';
import { native, NativeModelHandle, Tensor } from '../lib/native';
import { expectClose, loadCase, GoldenCase } from './helpers/cases';
import { fixture } from './helpers/fixtures';

// Tolerances from the fixtures README: single-model outputs atol = rtol = 1e-4; UNet/VAE
// intermediates (and the decoded image, which runs the whole decoder) 5e-4.
const OUTPUT_TOL = 1e-4;
const INTERMEDIATE_TOL = 5e-4;

/** Resolves a config the way the library does (lib/config.ts fills the diffusers defaults). */
function resolveVaeConfig(config: Record<string, unknown>): Record<string, unknown> {
  return resolveConfig('vae', config, 'vae config');
}

function readJson(file: string): any {
  return JSON.parse(fs.readFileSync(file, 'utf8'));
}

const tinyConfig = resolveVaeConfig(readJson(fixture('tiny-sd', 'vae', 'config.json')));

async function loadTinyVae(): Promise<NativeModelHandle> {
  return native().loadModel('vae', JSON.stringify(tinyConfig), { files: [fixture('tiny-sd', 'vae', 'diffusion_pytorch_model.safetensors')] }, { device: 'cpu', dtype: 'F32' });
}

/** describeModel's [key, shape] list as a map, checking that no key appears twice. */
function describeVae(config: Record<string, unknown>): Map<string, number[]> {
  const entries = native().describeModel('vae', JSON.stringify(config));
  const map = new Map(entries);
  expect(map.size).toBe(entries.length);
  return map;
}

function expectManifest(actual: Map<string, number[]>, shapes: Record<string, number[]>, numParameters: number, numKeys: number) {
  const expectedKeys = Object.keys(shapes).sort();
  const actualKeys = [...actual.keys()].sort();
  // name the differing keys, if any, before comparing shapes
  expect(actualKeys.filter((k) => !(k in shapes))).toEqual([]);
  expect(expectedKeys.filter((k) => !actual.has(k))).toEqual([]);
  for (const k of expectedKeys) expect([k, actual.get(k)]).toEqual([k, shapes[k]]);
  const total = [...actual.values()].reduce((sum, shape) => sum + shape.reduce((a, b) => a * b, 1), 0);
  expect(actual.size).toBe(numKeys);
  expect(total).toBe(numParameters);
}

describe('vae (AutoencoderKL)', () => {
  let vae: NativeModelHandle;
  let golden: GoldenCase;

  beforeAll(async () => {
    vae = await loadTinyVae();
    golden = await loadCase('vae');
  });
  afterAll(() => vae?.dispose());

  test('loads every tensor of the tiny VAE', () => {
    expect(vae.loadedTensors).toBe(180);
  });

  test('golden case "vae": encode matches diffusers', async () => {
    const t = golden.tensors;
    const out = await vae.run('encode', { sample: t['input.image'] });
    expectClose('latent_mean', out.latent_mean, t['output.latent_mean'], OUTPUT_TOL, OUTPUT_TOL);
    expectClose('latent_std', out.latent_std, t['output.latent_std'], OUTPUT_TOL, OUTPUT_TOL);
    expectClose('latent_logvar', out.latent_logvar, t['output.latent_logvar'], OUTPUT_TOL, OUTPUT_TOL);
    expectClose('latent_mean_scaled', out.latent_mean_scaled, t['output.latent_mean_scaled'], OUTPUT_TOL, OUTPUT_TOL);
    expectClose('encoder_out', out.encoder_out, t['intermediate.encoder_out'], INTERMEDIATE_TOL, INTERMEDIATE_TOL);
    expectClose('moments', out.moments, t['intermediate.moments'], INTERMEDIATE_TOL, INTERMEDIATE_TOL);
  });

  test('golden case "vae": decode(mean) matches diffusers', async () => {
    const t = golden.tensors;
    // the golden decodes the UNSCALED mean
    const out = await vae.run('decode', { latent: t['output.latent_mean'] });
    expectClose('post_quant_conv_out', out.post_quant_conv_out, t['intermediate.post_quant_conv_out'], INTERMEDIATE_TOL, INTERMEDIATE_TOL);
    expectClose('decoded', out.sample, t['output.decoded'], INTERMEDIATE_TOL, INTERMEDIATE_TOL);
  });

  test('a non-square image encodes to [1,4,8,6] and decodes back to [1,3,64,48]', async () => {
    const shape = [1, 3, 64, 48];
    const data = new Float32Array(shape.reduce((a, b) => a * b, 1));
    for (let i = 0; i < data.length; i++) data[i] = Math.sin(i * 0.37) * 0.9;
    const enc = await vae.run('encode', { sample: { data, shape } });
    expect(enc.latent_mean.shape).toEqual([1, 4, 8, 6]);
    expect(enc.latent_std.shape).toEqual([1, 4, 8, 6]);
    expect(enc.moments.shape).toEqual([1, 8, 8, 6]);
    const dec = await vae.run('decode', { latent: enc.latent_mean });
    expect(dec.sample.shape).toEqual(shape);
    expect((dec.sample.data as Float32Array).every(Number.isFinite)).toBe(true);
  });

  test('a batch of two gives each image the result it gets alone', async () => {
    const image = golden.tensors['input.image'];
    const flipped = Float32Array.from(image.data as Float32Array).reverse();
    const batch: Tensor = { data: new Float32Array([...(image.data as Float32Array), ...flipped]), shape: [2, 3, 64, 64] };
    const out = await vae.run('encode', { sample: batch });
    const first: Tensor = { data: (out.latent_mean.data as Float32Array).slice(0, 256), shape: [1, 4, 8, 8] };
    expectClose('batch[0] latent_mean', first, golden.tensors['output.latent_mean'], OUTPUT_TOL, OUTPUT_TOL);
  });

  test('refuses wrong inputs and unknown methods with clear messages', async () => {
    await expect(vae.run('encode', { latent: golden.tensors['output.latent_mean'] })).rejects.toThrow('missing input "sample"');
    await expect(vae.run('decode', { latent: golden.tensors['input.image'] })).rejects.toThrow(
      'input "latent" must have shape [B, 4, H, W] but has [1, 3, 64, 64]',
    );
    await expect(vae.run('forward', {})).rejects.toThrow('vae has no method "forward" (expected encode or decode)');
  });

  test('refuses configs it does not implement', () => {
    expect(() => describeVae({ ...tinyConfig, act_fn: 'gelu' })).toThrow('config key "act_fn" is "gelu"; only "silu" is supported');
    expect(() => describeVae({ ...tinyConfig, up_block_types: ['UpDecoderBlock2D', 'UpDecoderBlock2D', 'UpDecoderBlock2D', 'AttnUpDecoderBlock2D'] })).toThrow(
      'config key "up_block_types": unsupported block type "AttnUpDecoderBlock2D" (only UpDecoderBlock2D)',
    );
    expect(() => describeVae({ ...tinyConfig, down_block_types: ['DownEncoderBlock2D'] })).toThrow(
      'config key "down_block_types" has 1 entries but block_out_channels has 4',
    );
    expect(() => describeVae({ ...tinyConfig, block_out_channels: [32, 32, 48, 64] })).toThrow(
      'every entry must be a positive multiple of norm_num_groups 32',
    );
    const { scaling_factor: _unused, ...withoutScaling } = tinyConfig;
    expect(() => describeVae(withoutScaling)).toThrow('config key "scaling_factor" is missing');
  });

  test('tiny manifest: describeModel gives the tiny VAE key and shape set', () => {
    const tiny = readJson(fixture('manifests', 'tiny_models.json')).models.vae;
    expectManifest(describeVae(tinyConfig), tiny.shapes, tiny.num_parameters, tiny.num_tensors);
  });

  test('full-size manifest sd15_vae: 248 keys, 83,653,863 parameters, exact shapes', () => {
    const manifest = readJson(fixture('manifests', 'sd15_vae.json'));
    expect(manifest.num_parameters).toBe(83653863);
    expectManifest(describeVae(resolveVaeConfig(manifest.config)), manifest.shapes, 83653863, 248);
  });
});
