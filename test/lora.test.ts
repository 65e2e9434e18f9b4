import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { applyLora, clearLora, collectLora, createLora, saveLora, setLora } from '../lib/lora';
import { loadComponent, Model } from '../lib/models';
import { NativeTensor, Tensor } from '../lib/native';
import { readSafetensors } from '../lib/safetensors';
import { expectClose, GoldenCase, loadCase } from './helpers/cases';
import { fixture } from './helpers/fixtures';

// The golden outputs are diffusers' float32 LoRA path; its own error against a float64 merged-weight
// reference is 2.7e-6, so 1e-4 (the single-model tolerance) leaves room for another summation order.
const OUTPUT_TOL = 1e-4;
// Merged weights vs the separate low-rank branch: the same math in another order, values O(1).
const MERGE_TOL = 1e-5;

const LORA_FILE = fixture('lora', 'lora.safetensors');
const loraKeys = JSON.parse(fs.readFileSync(fixture('lora', 'lora_keys.json'), 'utf8'));

function keyShapes(prefix?: string): Record<string, number[]> {
  const out: Record<string, number[]> = {};
  for (const [k, v] of Object.entries<{ shape: number[] }>(loraKeys.keys)) if (!prefix || k.startsWith(prefix)) out[k] = v.shape;
  return out;
}

function same(a: Tensor, b: Tensor): boolean {
  return a.data.length === b.data.length && a.data.every((v, i) => Object.is(v, b.data[i]));
}

describe('LoRA (kohya networks.lora) on the tiny UNet and text encoder', () => {
  let golden: GoldenCase;
  let unet: Model;
  let te: Model;
  let unetInputs: Record<string, Tensor>;
  let teInputs: Record<string, Tensor>;
  let baseUnet: NativeTensor;
  let baseText: NativeTensor;
  let tmp: string;

  const runUnet = async () => (await unet.run('forward', unetInputs)).sample;
  const runText = async () => (await te.run('forward', teInputs)).last_hidden_state;

  beforeAll(async () => {
    golden = await loadCase('lora_outputs');
    unet = await loadComponent('unet', fixture('tiny-sd', 'unet'));
    te = await loadComponent('clip_text', fixture('tiny-sd', 'text_encoder'));
    unetInputs = {
      sample: golden.tensors['input.latents'],
      timestep: golden.tensors['input.timesteps'],
      encoder_hidden_states: golden.tensors['input.encoder_hidden_states'],
    };
    teInputs = { input_ids: golden.tensors['input.input_ids'] };
    baseUnet = await runUnet();
    baseText = await runText();
    tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'si-lora-'));
  });
  afterEach(async () => {
    await clearLora([unet, te]);
  });
  afterAll(() => {
    unet?.dispose();
    te?.dispose();
    fs.rmSync(tmp, { recursive: true, force: true });
  });

  test('without LoRA the models give the golden no-LoRA outputs', () => {
    expectClose('unet no LoRA', baseUnet, golden.tensors['intermediate.unet_sample_no_lora'], OUTPUT_TOL, OUTPUT_TOL);
    expectClose('text no LoRA', baseText, golden.tensors['intermediate.text_last_hidden_state_no_lora'], OUTPUT_TOL, OUTPUT_TOL);
  });

  test('the fixture LoRA at scale 1.0 and 0.5 matches diffusers, and clearing restores the base exactly', async () => {
    const result = await applyLora([unet, te], LORA_FILE, { scale: 1 });
    expect(result).toMatchObject({ name: 'default', modules: 144, tensors: 432, fileTensors: 432, unusedTensors: 0, unknownKeys: [] });
    expect(result.models).toEqual([
      { name: 'default', prefix: 'lora_unet', modules: 132, tensors: 396, fileTensors: 432, otherTensors: 36, missingAlpha: 0, unknownKeys: [] },
      { name: 'default', prefix: 'lora_te', modules: 12, tensors: 36, fileTensors: 432, otherTensors: 396, missingAlpha: 0, unknownKeys: [] },
    ]);
    expectClose('unet LoRA scale 1.0', await runUnet(), golden.tensors['output.unet_sample_scale1.0'], OUTPUT_TOL, OUTPUT_TOL);
    expectClose('text LoRA scale 1.0', await runText(), golden.tensors['output.text_last_hidden_state_scale1.0'], OUTPUT_TOL, OUTPUT_TOL);

    expect(await setLora([unet, te], { scale: 0.5 })).toBe(144);
    expectClose('unet LoRA scale 0.5', await runUnet(), golden.tensors['output.unet_sample_scale0.5'], OUTPUT_TOL, OUTPUT_TOL);
    expectClose('text LoRA scale 0.5', await runText(), golden.tensors['output.text_last_hidden_state_scale0.5'], OUTPUT_TOL, OUTPUT_TOL);

    expect(await clearLora([unet, te])).toBe(144);
    expect(same(await runUnet(), baseUnet)).toBe(true);
    expect(same(await runText(), baseText)).toBe(true);
  });

  test('applying at scale 0.5 directly equals changing the scale afterwards', async () => {
    await applyLora([unet, te], LORA_FILE, { scale: 0.5 });
    expectClose('unet applied at 0.5', await runUnet(), golden.tensors['output.unet_sample_scale0.5'], OUTPUT_TOL, OUTPUT_TOL);
    expectClose('text applied at 0.5', await runText(), golden.tensors['output.text_last_hidden_state_scale0.5'], OUTPUT_TOL, OUTPUT_TOL);
  });

  test('scale 0 and a disabled LoRA give the base output exactly', async () => {
    await applyLora([unet, te], LORA_FILE, { scale: 0 });
    expect(same(await runUnet(), baseUnet)).toBe(true);
    expect(same(await runText(), baseText)).toBe(true);
    await setLora([unet, te], { scale: 1, enabled: false });
    expect(same(await runUnet(), baseUnet)).toBe(true);
    expect(same(await runText(), baseText)).toBe(true);
    await setLora([unet, te], { enabled: true });
    expectClose('unet re-enabled', await runUnet(), golden.tensors['output.unet_sample_scale1.0'], OUTPUT_TOL, OUTPUT_TOL);
  });

  test('merged weights give the unmerged output, and unmerging restores it', async () => {
    // merging changes the weights in place and unmerging subtracts the same product again, which
    // restores them only to float rounding (like diffusers' unfuse_lora): use separate models so the
    // other tests keep exact base weights
    const mUnet = await loadComponent('unet', fixture('tiny-sd', 'unet'));
    const mTe = await loadComponent('clip_text', fixture('tiny-sd', 'text_encoder'));
    const run = async () => [(await mUnet.run('forward', unetInputs)).sample, (await mTe.run('forward', teInputs)).last_hidden_state];
    try {
      await applyLora([mUnet, mTe], LORA_FILE);
      const [unmergedUnet, unmergedText] = await run();
      expect(await setLora([mUnet, mTe], { merged: true })).toBe(144);
      let [u, t] = await run();
      expectClose('unet merged vs unmerged', u, unmergedUnet, MERGE_TOL, MERGE_TOL);
      expectClose('text merged vs unmerged', t, unmergedText, MERGE_TOL, MERGE_TOL);
      // a scale change on merged adapters re-merges them
      await setLora([mUnet, mTe], { scale: 0.5 });
      [u, t] = await run();
      expectClose('unet merged at 0.5', u, golden.tensors['output.unet_sample_scale0.5'], OUTPUT_TOL, OUTPUT_TOL);
      expectClose('text merged at 0.5', t, golden.tensors['output.text_last_hidden_state_scale0.5'], OUTPUT_TOL, OUTPUT_TOL);
      await setLora([mUnet, mTe], { scale: 1, merged: false });
      [u, t] = await run();
      expectClose('unet unmerged again', u, unmergedUnet, MERGE_TOL, MERGE_TOL);
      expectClose('text unmerged again', t, unmergedText, MERGE_TOL, MERGE_TOL);
      // clearing merged adapters subtracts them from the weights again
      await setLora([mUnet, mTe], { merged: true });
      expect(await clearLora([mUnet, mTe])).toBe(144);
      [u, t] = await run();
      expectClose('unet cleared after merge', u, baseUnet, MERGE_TOL, MERGE_TOL);
      expectClose('text cleared after merge', t, baseText, MERGE_TOL, MERGE_TOL);
    } finally {
      mUnet.dispose();
      mTe.dispose();
    }
  });

  test('save -> apply round trip gives identical outputs, in the fixture\'s key scheme', async () => {
    await applyLora([unet, te], LORA_FILE);
    const withFixture = { unet: await runUnet(), text: await runText() };
    const saved = path.join(tmp, 'saved.safetensors');
    expect(await saveLora(saved, [unet, te])).toEqual({ tensors: 432 });

    const file = await readSafetensors(saved);
    const shapes = Object.fromEntries(Object.entries(file.tensors).map(([k, t]) => [k, t.shape]));
    expect(shapes).toEqual(keyShapes());
    for (const [k, v] of Object.entries<{ value?: number }>(loraKeys.keys)) {
      if (k.endsWith('.alpha')) expect([k, file.tensors[k].dtype, file.tensors[k].data[0]]).toEqual([k, 'F32', v.value]);
    }
    // alpha cycles 1, 2, 4, 8 in the fixture: kohya writes "Dynamic" for per-layer values
    expect(file.metadata).toEqual({ ss_network_module: 'networks.lora', ss_network_dim: '4', ss_network_alpha: 'Dynamic' });
    // the tensors are the fixture's, bit for bit
    const original = await readSafetensors(LORA_FILE);
    for (const k of Object.keys(original.tensors)) expect([k, same(file.tensors[k], original.tensors[k])]).toEqual([k, true]);
    // sorted keys in the header (write_safetensors)
    const headerLen = Number(fs.readFileSync(saved).readBigUInt64LE(0));
    const header = JSON.parse(fs.readFileSync(saved).subarray(8, 8 + headerLen).toString('utf8'));
    const order = Object.keys(header).filter((k) => k !== '__metadata__');
    expect(order).toEqual([...order].sort());

    await clearLora([unet, te]);
    await applyLora([unet, te], saved);
    expect(same(await runUnet(), withFixture.unet)).toBe(true);
    expect(same(await runText(), withFixture.text)).toBe(true);
  });

  test('a new trainable LoRA leaves the output unchanged and saves under the fixture\'s names', async () => {
    expect(await createLora(unet, { rank: 4, alpha: 1, seed: 7 })).toEqual({ name: 'default', prefix: 'lora_unet', modules: 132, parameters: expect.any(Number) });
    expect(await createLora(te, { rank: 4, alpha: 1, seed: 7 })).toMatchObject({ prefix: 'lora_te', modules: 12 });
    // up = 0: the model is unchanged until trained
    expect(same(await runUnet(), baseUnet)).toBe(true);
    expect(same(await runText(), baseText)).toBe(true);

    const saved = path.join(tmp, 'created.safetensors');
    await saveLora(saved, [unet, te]);
    const file = await readSafetensors(saved);
    expect(Object.fromEntries(Object.entries(file.tensors).map(([k, t]) => [k, t.shape]))).toEqual(keyShapes());
    expect(file.metadata).toEqual({ ss_network_module: 'networks.lora', ss_network_dim: '4', ss_network_alpha: '1.0' });

    // down ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (kohya's kaiming_uniform_(a=sqrt(5))); up = 0
    const down = file.tensors['lora_te_text_model_encoder_layers_0_mlp_fc2.lora_down.weight']; // [4, 37]
    const bound = 1 / Math.sqrt(37);
    expect(Array.from(down.data as Float32Array).every((v) => Math.abs(v) <= bound && v !== 0)).toBe(true);
    expect(Array.from(file.tensors['lora_te_text_model_encoder_layers_0_mlp_fc2.lora_up.weight'].data as Float32Array).every((v) => v === 0)).toBe(true);

    // the same seed gives the same adapters
    await clearLora(te);
    await createLora(te, { rank: 4, alpha: 1, seed: 7 });
    const again = await collectLora(te);
    expect(same(again['lora_te_text_model_encoder_layers_0_mlp_fc2.lora_down.weight'], down)).toBe(true);
  });

  test('several LoRAs stack by name and clear one at a time', async () => {
    await applyLora(unet, LORA_FILE, { scale: 0.5, name: 'a' });
    await applyLora(unet, LORA_FILE, { scale: 0.5, name: 'b' });
    // two halves of the same LoRA are the whole LoRA
    expectClose('unet 0.5 + 0.5', await runUnet(), golden.tensors['output.unet_sample_scale1.0'], OUTPUT_TOL, OUTPUT_TOL);
    await expect(applyLora(unet, LORA_FILE, { name: 'a' })).rejects.toThrow('a LoRA named "a" is already attached');
    expect(await clearLora(unet, 'b')).toBe(132);
    expectClose('unet after removing b', await runUnet(), golden.tensors['output.unet_sample_scale0.5'], OUTPUT_TOL, OUTPUT_TOL);
  });

  test('an unknown key is refused by name, or skipped and reported with strict: false', async () => {
    const { tensors } = await readSafetensors(LORA_FILE);
    const extra = 'lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight';
    const withExtra = { ...tensors, [extra]: tensors['lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight'], 'something_else.weight': tensors['lora_te_text_model_encoder_layers_0_mlp_fc1.alpha'] };
    await expect(applyLora(unet, withExtra)).rejects.toThrow(
      `unet.applyLora: the LoRA does not fit the UNet\n  2 unknown keys (no lora_unet_* target in this model; pass strict=false to skip them):\n    ${extra}\n    something_else.weight`,
    );
    // refused as a whole: nothing was attached
    expect(same(await runUnet(), baseUnet)).toBe(true);

    const result = await applyLora([unet, te], withExtra, { strict: false });
    expect(result).toMatchObject({ modules: 144, tensors: 432, fileTensors: 434, unusedTensors: 0, unknownKeys: [extra, 'something_else.weight'] });
    expect(result.models[0].unknownKeys).toEqual([extra, 'something_else.weight']);
    expect(result.models[1].unknownKeys).toEqual(['something_else.weight']);
    expectClose('unet non-strict', await runUnet(), golden.tensors['output.unet_sample_scale1.0'], OUTPUT_TOL, OUTPUT_TOL);
  });

  test('a wrong shape is refused, naming the key and both shapes', async () => {
    const { tensors } = await readSafetensors(LORA_FILE);
    const key = 'lora_te_text_model_encoder_layers_1_mlp_fc1.lora_up.weight'; // [37, 4]
    const bad = { ...tensors, [key]: { dtype: 'F32' as const, shape: [32, 4], data: new Float32Array(128) } };
    await expect(applyLora([unet, te], bad)).rejects.toThrow(
      `clip_text.applyLora: the LoRA does not fit the text encoder\n  1 keys with the wrong shape:\n    ${key}: expected [37, 4] but got [32, 4]`,
    );
    // all or nothing across models: the UNet, which took its part first, was cleared again
    expect(same(await runUnet(), baseUnet)).toBe(true);
    expect(same(await runText(), baseText)).toBe(true);

    // a 1x1 conv target given a Linear-shaped down
    const down = 'lora_unet_mid_block_attentions_0_proj_in.lora_down.weight';
    const flat = { ...tensors, [down]: { dtype: 'F32' as const, shape: [4, 64], data: new Float32Array(256) } };
    await expect(applyLora(unet, flat)).rejects.toThrow(`${down}: expected [4, 64, 1, 1] but got [4, 64]`);
  });

  test('an adapter without its up, or without alpha', async () => {
    const { tensors } = await readSafetensors(LORA_FILE);
    const base = 'lora_te_text_model_encoder_layers_0_self_attn_k_proj';
    const noUp = { ...tensors };
    delete noUp[`${base}.lora_up.weight`];
    await expect(applyLora(te, noUp)).rejects.toThrow(`1 incomplete adapters:\n    ${base}.lora_up.weight is missing (the file has ${base}.lora_down.weight)`);

    // alpha defaults to the rank: multiplier 1, as with an explicit alpha of 4
    const noAlpha = { ...tensors };
    delete noAlpha[`${base}.alpha`];
    const result = await applyLora(te, noAlpha);
    expect(result.models[0]).toMatchObject({ modules: 12, tensors: 35, missingAlpha: 1 });
    expect((await collectLora(te))[`${base}.alpha`].data[0]).toBe(4);
  });

  test('refuses models and options LoRA cannot take', async () => {
    await expect(applyLora(unet, LORA_FILE, { prefix: 'lora_te' })).rejects.toThrow('this model has no layer that LoRA prefix "lora_te" targets');
    await expect(applyLora(unet, LORA_FILE, { scale: NaN })).rejects.toThrow('Expected a finite number for scale but received NaN');
    await expect(applyLora(unet, path.join(tmp, 'missing.safetensors'))).rejects.toThrow('file not found');
    await expect(createLora(unet, { rank: 0 })).rejects.toThrow('Expected a positive integer for rank but received 0');
    const vae = await loadComponent('vae', fixture('tiny-sd', 'vae'));
    try {
      await expect(applyLora(vae, LORA_FILE)).rejects.toThrow('LoRA applies to unet and clip_text models, not to the vae model');
    } finally {
      vae.dispose();
    }
    await expect(saveLora(path.join(tmp, 'none.safetensors'), unet)).rejects.toThrow('No LoRA named "default" is attached to the unet model');
  });
});
