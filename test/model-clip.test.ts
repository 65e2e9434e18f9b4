// Parity of the CLIP ports (native/clip.cc) with transformers 4.33 goldens, and the full-size
// key/shape manifests built on the meta device.
import * as fs from 'node:fs';
import { resolveConfig } from '../lib/config';
import { native, NativeModelHandle, NativeTensor, Tensor } from '../lib/native';
import { expectClose, loadCase } from './helpers/cases';
import { fixture } from './helpers/fixtures';

// Single-model outputs (fixtures README, "Suggested tolerances").
const ATOL = 1e-4;
const RTOL = 1e-4;
// CLIPModel logits are 25.12 x cosine, so the cosine tolerance scaled by exp(logit_scale).
const LOGIT_ATOL = 1e-4 * 25;

// Configs are resolved the way the library does it (lib/config.ts fills transformers 4.33 defaults).
const resolveClipText = (cfg: any): any => resolveConfig('clip_text', cfg, 'clip_text config');
const resolveClipVision = (cfg: any): any => resolveConfig('clip_vision', cfg, 'clip_vision config');
const resolveClip = (cfg: any): any => resolveConfig('clip', cfg, 'clip config');

const readJson = (...parts: string[]) => JSON.parse(fs.readFileSync(fixture(...parts), 'utf8'));

async function load(kind: string, config: any, weights: string): Promise<NativeModelHandle> {
  return native().loadModel(kind, JSON.stringify(config), { files: [weights] }, { device: 'cpu', dtype: 'F32' });
}

/** describeModel must give exactly the manifest's key -> shape set and parameter count. */
function expectManifest(kind: string, config: any, manifestFile: string): void {
  const manifest = readJson('manifests', manifestFile);
  const described = native().describeModel(kind, JSON.stringify(config));
  const shapes: Record<string, number[]> = {};
  let params = 0;
  for (const [key, shape] of described) {
    shapes[key] = shape;
    params += shape.reduce((a, b) => a * b, 1);
  }
  expect(described.length).toBe(manifest.num_state_dict_entries);
  expect(shapes).toEqual(manifest.shapes);
  expect(params).toBe(manifest.num_parameters);
  // eslint-disable-next-line no-console
  console.log(`${manifestFile}: ${described.length} keys, ${params} parameters`);
}

function i64(data: number[], shape: number[]): Tensor {
  return { dtype: 'I64', shape, data: BigInt64Array.from(data.map(BigInt)) };
}

// ---------------------------------------------------------------- CLIPTextModel

describe('clip_text (CLIPTextModel)', () => {
  const config = resolveClipText(readJson('tiny-sd', 'text_encoder', 'config.json'));
  let model: NativeModelHandle;
  beforeAll(async () => {
    model = await load('clip_text', config, fixture('tiny-sd', 'text_encoder', 'model.safetensors'));
  });
  afterAll(() => model?.dispose());

  test('golden text_encoder: last_hidden_state, pooler_output, hidden_states', async () => {
    const c = await loadCase('text_encoder');
    const out = await model.run('forward', { input_ids: c.tensors['input.input_ids'] });
    expectClose('text_encoder last_hidden_state', out.last_hidden_state, c.tensors['output.last_hidden_state'], ATOL, RTOL);
    expectClose('text_encoder pooler_output', out.pooler_output, c.tensors['output.pooler_output'], ATOL, RTOL);
    for (let i = 0; i <= 2; i++) {
      expectClose(`text_encoder hidden_states.${i}`, out[`hidden_states.${i}`], c.tensors[`intermediate.hidden_states.${i}`], ATOL, RTOL);
    }
    expect(out['hidden_states.3']).toBeUndefined();
  });

  test('golden text_encoder_replace_star: the token embedding at every * (id 265) replaced by v', async () => {
    const c = await loadCase('text_encoder_replace_star');
    const ids = c.tensors['input.input_ids'];
    const v = c.tensors['input.v'] as NativeTensor;
    const [B, L] = ids.shape;
    const index: number[] = [];
    for (let b = 0; b < B; b++) for (let p = 0; p < L; p++) if (Number((ids.data as BigInt64Array)[b * L + p]) === c.json.call.star_token_id) index.push(b, p);
    const P = index.length / 2;
    expect(P).toBe(2); // one * in each of the first two prompts, none in the third
    const values = new Float32Array(P * v.shape[0]);
    for (let i = 0; i < P; i++) values.set(v.data as Float32Array, i * v.shape[0]);
    const out = await model.run('forward', {
      input_ids: ids,
      replace_index: i64(index, [P, 2]),
      replace_values: { dtype: 'F32', shape: [P, v.shape[0]], data: values },
    });
    expectClose('replace_star last_hidden_state', out.last_hidden_state, c.tensors['output.last_hidden_state'], ATOL, RTOL);
    // The third prompt has no *: its output must equal the plain model's, bit for bit.
    const plain = await model.run('forward', { input_ids: ids });
    const row = B - 1, n = L * 32;
    const slice = (t: Tensor) => ({ shape: [L, 32], data: (t.data as Float32Array).slice(row * n, (row + 1) * n) });
    expectClose('replace_star prompt 3 (no *) = plain model', slice(out.last_hidden_state), slice(plain.last_hidden_state), 0, 0);

    // A single [C] vector is broadcast to every replaced position.
    const broadcast = await model.run('forward', { input_ids: ids, replace_index: i64(index, [P, 2]), replace_values: v });
    expectClose('replace_star with replace_values [C]', broadcast.last_hidden_state, c.tensors['output.last_hidden_state'], ATOL, RTOL);
  });

  test('replacement inputs are checked', async () => {
    const c = await loadCase('text_encoder_replace_star');
    const ids = c.tensors['input.input_ids'];
    await expect(model.run('forward', { input_ids: ids, replace_index: i64([0, 4], [1, 2]) })).rejects.toThrow(
      'inputs replace_index and replace_values must be given together',
    );
    await expect(
      model.run('forward', { input_ids: ids, replace_index: i64([0, 77], [1, 2]), replace_values: c.tensors['input.v'] }),
    ).rejects.toThrow('replace_index holds (batch, position) outside [0, 3) x [0, 77)');
    await expect(
      model.run('forward', { input_ids: ids, replace_index: i64([0, 4], [1, 2]), replace_values: { dtype: 'F32', shape: [2, 32], data: new Float32Array(64) } }),
    ).rejects.toThrow('replace_values must be [1, 32] or [32], got [2, 32]');
  });

  test('manifest sd15_text_encoder.json (196 keys, 123,060,480 parameters)', () => {
    expectManifest('clip_text', resolveClipText(readJson('manifests', 'sd15_text_encoder.json').config), 'sd15_text_encoder.json');
  });

  test('unsupported hidden_act is refused', () => {
    expect(() => native().describeModel('clip_text', JSON.stringify({ ...config, hidden_act: 'relu' }))).toThrow(
      'config key "hidden_act" is "relu", expected "quick_gelu" or "gelu"',
    );
  });
});

// ---------------------------------------------------------------- CLIPVisionModelWithProjection

describe('clip_vision (CLIPVisionModelWithProjection)', () => {
  const config = resolveClipVision(readJson('tiny-sd', 'image_encoder', 'config.json'));
  let model: NativeModelHandle;
  beforeAll(async () => {
    model = await load('clip_vision', config, fixture('tiny-sd', 'image_encoder', 'model.safetensors'));
  });
  afterAll(() => model?.dispose());

  test('golden image_encoder: image_embeds, last_hidden_state, pooler_output, hidden_states', async () => {
    const c = await loadCase('image_encoder');
    const out = await model.run('forward', { pixel_values: c.tensors['input.pixel_values'] });
    expectClose('image_encoder image_embeds', out.image_embeds, c.tensors['output.image_embeds'], ATOL, RTOL);
    expectClose('image_encoder last_hidden_state', out.last_hidden_state, c.tensors['output.last_hidden_state'], ATOL, RTOL);
    expectClose('image_encoder pooler_output', out.pooler_output, c.tensors['intermediate.pooler_output'], ATOL, RTOL);
    for (let i = 0; i <= 2; i++) {
      expectClose(`image_encoder hidden_states.${i}`, out[`hidden_states.${i}`], c.tensors[`intermediate.hidden_states.${i}`], ATOL, RTOL);
    }
  });

  test('an input of another size is refused, naming both sizes', async () => {
    const x = { dtype: 'F32' as const, shape: [1, 3, 48, 48], data: new Float32Array(3 * 48 * 48) };
    await expect(model.run('forward', { pixel_values: x })).rejects.toThrow("input image size 48x48 does not match the model's image_size 32x32");
  });

  test('manifest clip_vit_b32_vision_with_projection.json (200 keys, 87,849,216 parameters)', () => {
    expectManifest(
      'clip_vision',
      resolveClipVision(readJson('manifests', 'clip_vit_b32_vision_with_projection.json').config),
      'clip_vit_b32_vision_with_projection.json',
    );
  });
});

// ---------------------------------------------------------------- CLIPModel

describe('clip (CLIPModel)', () => {
  const config = resolveClip(readJson('tiny-clip', 'config.json'));
  let model: NativeModelHandle;
  beforeAll(async () => {
    model = await load('clip', config, fixture('tiny-clip', 'model.safetensors'));
  });
  afterAll(() => model?.dispose());

  test('golden clip_model: embeddings, logits, cosine and intermediates', async () => {
    const c = await loadCase('clip_model');
    const out = await model.run('forward', { input_ids: c.tensors['input.input_ids'], pixel_values: c.tensors['input.pixel_values'] });
    for (const name of ['image_embeds', 'text_embeds', 'cosine']) {
      expectClose(`clip_model ${name}`, out[name], c.tensors[`output.${name}`], ATOL, RTOL);
    }
    for (const name of ['logits_per_image', 'logits_per_text']) {
      expectClose(`clip_model ${name}`, out[name], c.tensors[`output.${name}`], LOGIT_ATOL, RTOL);
    }
    for (const name of [
      'image_embeds_unnormalized',
      'text_embeds_unnormalized',
      'text_pooler_output',
      'text_last_hidden_state',
      'vision_pooler_output',
      'vision_last_hidden_state',
      'logit_scale',
      'text_hidden_states.0',
      'text_hidden_states.1',
      'text_hidden_states.2',
      'vision_hidden_states.0',
      'vision_hidden_states.1',
      'vision_hidden_states.2',
    ]) {
      expectClose(`clip_model ${name}`, out[name], c.tensors[`intermediate.${name}`], ATOL, RTOL);
    }
    expectClose('clip_model logit_scale_exp', out.logit_scale_exp, c.tensors['intermediate.logit_scale_exp'], LOGIT_ATOL, RTOL);
    // the first 49407 (legacy argmax pooling): [6, 9, 1, 76]
    expect(Array.from(out.text_pooled_index.data as BigInt64Array, Number)).toEqual(c.json.call.text_pooled_index);
    expect(Array.from(c.tensors['intermediate.text_pooled_index'].data as BigInt64Array, Number)).toEqual([6, 9, 1, 76]);
  });

  test('encode_text / encode_image give the same embeddings as forward', async () => {
    const c = await loadCase('clip_model');
    const t = await model.run('encode_text', { input_ids: c.tensors['input.input_ids'] });
    const i = await model.run('encode_image', { pixel_values: c.tensors['input.pixel_values'] });
    expectClose('encode_text text_embeds', t.text_embeds, c.tensors['output.text_embeds'], ATOL, RTOL);
    expectClose('encode_text text_embeds_unnormalized', t.text_embeds_unnormalized, c.tensors['intermediate.text_embeds_unnormalized'], ATOL, RTOL);
    expectClose('encode_image image_embeds', i.image_embeds, c.tensors['output.image_embeds'], ATOL, RTOL);
    expectClose('encode_image image_embeds_unnormalized', i.image_embeds_unnormalized, c.tensors['intermediate.image_embeds_unnormalized'], ATOL, RTOL);
  });

  test('eos_token_id 49407 pools at the first EOS, the same positions here', async () => {
    const c = await loadCase('clip_model');
    const m = await load('clip', { ...config, text_config: { ...config.text_config, eos_token_id: 49407 } }, fixture('tiny-clip', 'model.safetensors'));
    try {
      const out = await m.run('forward', { input_ids: c.tensors['input.input_ids'], pixel_values: c.tensors['input.pixel_values'] });
      expect(Array.from(out.text_pooled_index.data as BigInt64Array, Number)).toEqual([6, 9, 1, 76]);
      expectClose('clip_model text_embeds (eos 49407)', out.text_embeds, c.tensors['output.text_embeds'], ATOL, RTOL);
    } finally {
      m.dispose();
    }
  });

  test('unknown method is refused', async () => {
    await expect(model.run('encode', {})).rejects.toThrow('clip: unknown method "encode" (expected forward, encode_text or encode_image)');
  });

  test('manifest clip_vit_b32.json (398 keys, 151,277,313 parameters)', () => {
    expectManifest('clip', resolveClip(readJson('manifests', 'clip_vit_b32.json').config), 'clip_vit_b32.json');
  });
});
