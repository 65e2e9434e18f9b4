// Loading models from disk: strict key checking, diffusers folders (plain, sharded, legacy VAE
// names, bf16 files), the local Hugging Face cache, and original single-file checkpoints.
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { readConfig, resolveConfig } from '../lib/config';
import { singleFileWeightMap } from '../lib/keymap';
import { describeModel, loadComponent, loadPipeline, Pipeline } from '../lib/models';
import { resolveHubId, resolveModelPath } from '../lib/model-files';
import { NativeTensor, packageRoot } from '../lib/native';
import { readSafetensors, writeSafetensors } from '../lib/safetensors';
import { expectClose, loadCase } from './helpers/cases';
import { fixture } from './helpers/fixtures';

const TINY = fixture('tiny-sd');
const SINGLE = fixture('tiny-sd-single-file', 'tiny-sd.safetensors');
const SINGLE_OPTIONS = {
  originalConfig: fixture('tiny-sd-single-file', 'tiny-sd.yaml'),
  textEncoderConfig: fixture('tiny-sd', 'text_encoder', 'config.json'),
};

let tmp: string;
beforeAll(() => {
  tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'si-loading-'));
});
afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }));

/** A copy of a component folder whose weights pass through `edit`. */
async function editedComponent(component: string, edit: (t: Record<string, NativeTensor>) => Record<string, NativeTensor>, config?: (c: any) => any): Promise<string> {
  const src = path.join(TINY, component);
  const dir = fs.mkdtempSync(path.join(tmp, `${component}-`));
  const cfg = JSON.parse(fs.readFileSync(path.join(src, 'config.json'), 'utf8'));
  fs.writeFileSync(path.join(dir, 'config.json'), JSON.stringify(config ? config(cfg) : cfg));
  const file = fs.readdirSync(src).find((f) => f.endsWith('.safetensors'))!;
  const { tensors } = await readSafetensors(path.join(src, file));
  await writeSafetensors(path.join(dir, file), edit(tensors));
  return dir;
}

function maxAbsDiff(a: NativeTensor, b: NativeTensor): number {
  expect(a.shape).toEqual(b.shape);
  let m = 0;
  for (let i = 0; i < a.data.length; i++) m = Math.max(m, Math.abs(Number(a.data[i]) - Number(b.data[i])));
  return m;
}

describe('strict loading', () => {
  test('one error lists the missing, the unexpected and the mis-shaped keys', async () => {
    const dir = await editedComponent('unet', (t) => {
      const out = { ...t };
      delete out['conv_in.bias'];
      out['not_a_weight.weight'] = { dtype: 'F32', shape: [2], data: new Float32Array(2) };
      out['conv_out.bias'] = { dtype: 'F32', shape: [5], data: new Float32Array(5) };
      return out;
    });
    const err = await loadComponent('unet', dir).then(() => null, (e: Error) => e);
    expect(err).not.toBeNull();
    expect(err!.message).toContain('the weights do not match the model built from its config');
    expect(err!.message).toMatch(/1 missing keys:\n\s+conv_in\.bias/);
    expect(err!.message).toMatch(/1 unexpected keys:\n\s+not_a_weight\.weight/);
    expect(err!.message).toMatch(/1 keys with the wrong shape:\n\s+conv_out\.bias: expected \[4\] but the file has \[5\]/);
    expect(err!.message).toContain(path.join(dir, 'diffusion_pytorch_model.safetensors'));
  });

  test('a config value that is not supported names the file, the key and the value', async () => {
    const dir = await editedComponent('unet', (t) => t, (c) => ({ ...c, act_fn: 'gelu' }));
    await expect(loadComponent('unet', dir)).rejects.toThrow(`${path.join(dir, 'config.json')}: config key "act_fn" is "gelu", expected "silu" (this value is not supported)`);
    const dir2 = await editedComponent('vae', (t) => t, (c) => ({ ...c, down_block_types: ['DownEncoderBlock2D', 'CrossAttnDownBlock2D', 'DownEncoderBlock2D', 'DownEncoderBlock2D'] }));
    await expect(loadComponent('vae', dir2)).rejects.toThrow(/config key "down_block_types" is \[.*"CrossAttnDownBlock2D".*\], expected a list of "DownEncoderBlock2D"/);
  });

  test('position_ids buffers of older transformers files are ignored', async () => {
    const dir = await editedComponent('text_encoder', (t) => ({
      ...t,
      'text_model.embeddings.position_ids': { dtype: 'I64', shape: [1, 77], data: BigInt64Array.from({ length: 77 }, (_, i) => BigInt(i)) },
    }));
    const m = await loadComponent('clip_text', dir);
    expect(m.loadedTensors).toBe(36);
    m.dispose();
  });
});

describe('diffusers folder variants', () => {
  let golden: Awaited<ReturnType<typeof loadCase>>;
  beforeAll(async () => {
    golden = await loadCase('vae');
  });

  test('legacy VAE attention names (query/key/value/proj_attn) load to the same model', async () => {
    const rename: Record<string, string> = { 'to_q.': 'query.', 'to_k.': 'key.', 'to_v.': 'value.', 'to_out.0.': 'proj_attn.' };
    const dir = await editedComponent('vae', (t) => {
      const out: Record<string, NativeTensor> = {};
      for (const [k, v] of Object.entries(t)) {
        let nk = k;
        for (const [from, to] of Object.entries(rename)) if (k.includes('attentions.0.' + from)) nk = k.replace('attentions.0.' + from, 'attentions.0.' + to);
        out[nk] = v;
      }
      expect(Object.keys(out).filter((k) => k.includes('proj_attn')).length).toBe(4);
      return out;
    });
    const vae = await loadComponent('vae', dir);
    const out = await vae.run('encode', { sample: golden.tensors['input.image'] });
    expectClose('legacy-named vae latent_mean', out.latent_mean, golden.tensors['output.latent_mean'], 1e-4, 1e-4);
    vae.dispose();
  });

  test('a sharded checkpoint (index.json + two files) loads like the single file', async () => {
    const src = path.join(TINY, 'unet');
    const dir = fs.mkdtempSync(path.join(tmp, 'sharded-'));
    fs.copyFileSync(path.join(src, 'config.json'), path.join(dir, 'config.json'));
    const { tensors } = await readSafetensors(path.join(src, 'diffusion_pytorch_model.safetensors'));
    const keys = Object.keys(tensors).sort();
    const half = Math.floor(keys.length / 2);
    const shards = [keys.slice(0, half), keys.slice(half)];
    const weightMap: Record<string, string> = {};
    for (let i = 0; i < 2; i++) {
      const name = `diffusion_pytorch_model-0000${i + 1}-of-00002.safetensors`;
      await writeSafetensors(path.join(dir, name), Object.fromEntries(shards[i].map((k) => [k, tensors[k]])));
      for (const k of shards[i]) weightMap[k] = name;
    }
    fs.writeFileSync(path.join(dir, 'diffusion_pytorch_model.safetensors.index.json'), JSON.stringify({ metadata: {}, weight_map: weightMap }));
    const unet = await loadComponent('unet', dir);
    const reference = await loadComponent('unet', src);
    const [a, b] = await Promise.all([unet.stateDict(), reference.stateDict()]);
    for (const k of Object.keys(b)) expect(maxAbsDiff(a[k], b[k])).toBe(0);
    unet.dispose();
    reference.dispose();
  });

  test('bf16 weights are converted to the requested fp32 on load', async () => {
    const dir = await editedComponent('text_encoder', (t) => {
      const out: Record<string, NativeTensor> = {};
      for (const [k, v] of Object.entries(t)) {
        const f = v.data as Float32Array;
        const bits = new Uint32Array(f.buffer, f.byteOffset, f.length);
        const bf = new Uint16Array(f.length);
        for (let i = 0; i < f.length; i++) bf[i] = bits[i] >>> 16; // truncation: exactly representable back in fp32
        out[k] = { dtype: 'BF16', shape: v.shape, data: bf };
      }
      return out;
    });
    const m = await loadComponent('clip_text', dir, { dtype: 'fp32' });
    const sd = await m.stateDict();
    const w = sd['text_model.final_layer_norm.weight'];
    expect(w.dtype).toBe('F32');
    const ref = (await readSafetensors(path.join(TINY, 'text_encoder', 'model.safetensors'))).tensors['text_model.final_layer_norm.weight'];
    const refF = ref.data as Float32Array;
    const refBits = new Uint32Array(refF.buffer, refF.byteOffset, refF.length);
    for (let i = 0; i < refF.length; i++) {
      const truncated = new Float32Array(new Uint32Array([refBits[i] & 0xffff0000]).buffer)[0];
      expect((w.data as Float32Array)[i]).toBe(truncated);
    }
    m.dispose();
  });
});

describe('Hugging Face cache (local only)', () => {
  function fakeCache(withRef: boolean): string {
    const cache = fs.mkdtempSync(path.join(tmp, 'hub-'));
    const snap = path.join(cache, 'models--someone--tiny-sd', 'snapshots', 'abc123');
    fs.mkdirSync(snap, { recursive: true });
    for (const entry of fs.readdirSync(TINY)) fs.symlinkSync(path.join(TINY, entry), path.join(snap, entry));
    if (withRef) {
      fs.mkdirSync(path.join(cache, 'models--someone--tiny-sd', 'refs'));
      fs.writeFileSync(path.join(cache, 'models--someone--tiny-sd', 'refs', 'main'), 'abc123');
    }
    return cache;
  }

  test('a hub id resolves to its snapshot through refs/main and loads', async () => {
    const cache = fakeCache(true);
    const env = { HF_HUB_CACHE: cache };
    expect(resolveHubId('someone/tiny-sd', env)).toBe(path.join(cache, 'models--someone--tiny-sd', 'snapshots', 'abc123'));
    const saved = process.env.HF_HUB_CACHE;
    process.env.HF_HUB_CACHE = cache;
    try {
      const p = await loadPipeline('someone/tiny-sd');
      expect(p.description).toContain('from the Hugging Face cache');
      p.dispose();
    } finally {
      if (saved === undefined) delete process.env.HF_HUB_CACHE;
      else process.env.HF_HUB_CACHE = saved;
    }
  });

  test('HF_HOME is used when HF_HUB_CACHE is unset; a single snapshot without refs is taken', () => {
    const cache = fakeCache(false);
    const home = path.dirname(cache);
    fs.renameSync(cache, path.join(home, 'hub'));
    const env = { HF_HOME: home };
    expect(resolveModelPath('someone/tiny-sd', env).path).toBe(path.join(home, 'hub', 'models--someone--tiny-sd', 'snapshots', 'abc123'));
  });

  test('a hub id that is not cached says where it looked, and nothing is downloaded', () => {
    const env = { HF_HUB_CACHE: path.join(tmp, 'empty-cache') };
    expect(() => resolveModelPath('runwayml/stable-diffusion-v1-5', env)).toThrow(
      `Model "runwayml/stable-diffusion-v1-5" is neither a local path nor in the Hugging Face cache: looked for ${path.join(tmp, 'empty-cache', 'models--runwayml--stable-diffusion-v1-5', 'refs', 'main')}`,
    );
  });

  test('paths that are not models are refused clearly', () => {
    expect(() => resolveModelPath(fixture('cases'))).toThrow('is a folder without model_index.json');
    expect(() => resolveModelPath(path.join(tmp, 'nope.ckpt'))).toThrow('does not exist');
    const pickle = path.join(tmp, 'model.ckpt');
    fs.writeFileSync(pickle, 'x');
    expect(() => resolveModelPath(pickle)).toThrow('is a PyTorch pickle checkpoint; only .safetensors files are loaded');
  });
});

describe('original single-file checkpoints', () => {
  let folder: Pipeline;
  let single: Pipeline;
  beforeAll(async () => {
    folder = await loadPipeline(TINY);
    single = await loadPipeline(SINGLE, SINGLE_OPTIONS);
  });
  afterAll(() => {
    folder?.dispose();
    single?.dispose();
  });

  test('the tiny checkpoint loads to weights bit-identical to the diffusers folder', async () => {
    expect(single.unet.config).toEqual(folder.unet.config);
    expect(single.vae.config).toEqual(folder.vae.config);
    for (const part of ['unet', 'vae', 'textEncoder'] as const) {
      const [a, b] = await Promise.all([single[part].stateDict(), folder[part].stateDict()]);
      expect(Object.keys(a).sort()).toEqual(Object.keys(b).sort());
      let worst = 0;
      for (const k of Object.keys(b)) worst = Math.max(worst, maxAbsDiff(a[k], b[k]));
      console.log(`single-file ${part}: ${Object.keys(a).length} tensors, max abs diff ${worst}`);
      expect(worst).toBe(0);
    }
  });

  test('the unet golden case passes from the single file', async () => {
    const golden = await loadCase('unet');
    const out = await single.unet.run('forward', {
      sample: golden.tensors['input.latents'],
      timestep: golden.tensors['input.timesteps'],
      encoder_hidden_states: golden.tensors['input.encoder_hidden_states'],
    });
    expectClose('single-file unet output.sample', out.sample, golden.tensors['output.sample'], 1e-4, 1e-4);
  });

  test('the full-size key map covers exactly the SD v1.5 single-file manifest', () => {
    const manifest = JSON.parse(fs.readFileSync(fixture('manifests', 'sd15_single_file_keys.json'), 'utf8'));
    const fileKeys = Object.keys(manifest.shapes);
    expect(fileKeys.length).toBe(1130);
    const sd15 = path.join(packageRoot, 'assets', 'sd15');
    const parts = [
      ['unet', 'unet', readConfig('unet', path.join(sd15, 'unet', 'config.json')), 'unet/'],
      ['vae', 'vae', readConfig('vae', path.join(sd15, 'vae', 'config.json')), 'vae/'],
      ['clip_text', 'text_encoder', readConfig('clip_text', path.join(sd15, 'text_encoder', 'config.json')), 'text_encoder/'],
    ] as const;
    const claimed = new Set<string>();
    let reshaped = 0;
    for (const [kind, component, cfg, prefix] of parts) {
      const modelKeys = describeModel(kind, cfg).map(([k]) => k);
      const map = singleFileWeightMap(component, modelKeys, fileKeys, cfg);
      // every model key is found, and no file key is left over (leftovers map to themselves)
      expect(map.length).toBe(modelKeys.length);
      const modelSet = new Set(modelKeys);
      for (const [target, , source, reshape] of map) {
        expect(modelSet.has(target)).toBe(true);
        // the manifest records each original key's diffusers name
        expect(manifest.diffusers_key[source]).toBe(prefix + target);
        claimed.add(source);
        if (reshape && manifest.shapes[source].length === 4) reshaped++;
      }
    }
    expect(claimed.size).toBe(1130);
    expect(reshaped).toBe(8);
  });

  test('an SD checkpoint with foreign keys is refused with their names', async () => {
    const { tensors } = await readSafetensors(SINGLE);
    const file = path.join(tmp, 'foreign.safetensors');
    await writeSafetensors(file, { ...tensors, 'some_other_model.layer.weight': { dtype: 'F32', shape: [1], data: new Float32Array(1) } });
    await expect(loadPipeline(file, SINGLE_OPTIONS)).rejects.toThrow('1 keys belong to no Stable Diffusion component (first: some_other_model.layer.weight)');
  });

  test('resolveConfig refuses a list of heads of the wrong length', () => {
    expect(() => resolveConfig('unet', { attention_head_dim: [8, 8], block_out_channels: [32, 64, 64], down_block_types: ['DownBlock2D', 'DownBlock2D', 'DownBlock2D'], up_block_types: ['UpBlock2D', 'UpBlock2D', 'UpBlock2D'] }, 'x.json')).toThrow(
      'x.json: config key "attention_head_dim" has 2 entries but there are 3 blocks',
    );
  });
});
