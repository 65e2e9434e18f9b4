/**
 * The embedded tiny model: an SD v1.5-shaped model with RANDOM weights (UNet 2.2 M, VAE 1.0 M,
 * text encoder 1.6 M parameters), built on first use from the configs in assets/tiny-sd and the
 * bundled CLIP tokenizer. It makes the whole workflow runnable on any machine in minutes; its
 * pictures are noise-like, and every command that uses it says so.
 *
 * Weights follow the fixtures' recipe (a seeded normal per tensor): Linear/Conv weights
 * N(0, 1/fan_in), biases N(0, 0.05²), norm weights 1 + N(0, 0.1²), norm biases N(0, 0.1²),
 * embeddings N(0, 0.3²), so activations stay O(1).
 */
import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { readConfig, ModelKind } from './config';
import { describeModel } from './models';
import { packageRoot } from './native';
import { writeSafetensors } from './safetensors';
import { bundledTokenizerDir } from './tokenizer';

export const TINY_MODEL_VERSION = 1;
const TINY_ASSETS = path.join(packageRoot, 'assets', 'tiny-sd');

/** Where the tiny model is built: $SINGLEINSERT_CACHE, else $XDG_CACHE_HOME or ~/.cache, /singleinsert-native. */
export function cacheDir(env: NodeJS.ProcessEnv = process.env): string {
  if (env.SINGLEINSERT_CACHE) return env.SINGLEINSERT_CACHE;
  return path.join(env.XDG_CACHE_HOME ?? path.join(os.homedir(), '.cache'), 'singleinsert-native');
}

/** A seeded normal generator (xorshift128+ and Box-Muller): the same bytes on every machine. */
function normalGenerator(seedText: string): () => number {
  const h = crypto.createHash('sha256').update(seedText).digest();
  let s0 = h.readBigUInt64LE(0) | 1n;
  let s1 = h.readBigUInt64LE(8) | 2n;
  const mask = (1n << 64n) - 1n;
  const next = () => {
    let x = s0;
    const y = s1;
    s0 = y;
    x ^= (x << 23n) & mask;
    s1 = x ^ y ^ (x >> 17n) ^ (y >> 26n);
    return Number(((s1 + y) & mask) >> 11n) / 2 ** 53;
  };
  let spare: number | null = null;
  return () => {
    if (spare !== null) {
      const v = spare;
      spare = null;
      return v;
    }
    const u = Math.max(next(), 1e-300);
    const v = next();
    const r = Math.sqrt(-2 * Math.log(u));
    spare = r * Math.sin(2 * Math.PI * v);
    return r * Math.cos(2 * Math.PI * v);
  };
}

function initTensor(key: string, shape: number[], rand: () => number): Float32Array {
  const n = shape.reduce((a, b) => a * b, 1);
  const out = new Float32Array(n);
  const leaf = key.split('.').slice(-2).join('.');
  const isNorm = /(norm|layer_norm|layernorm|pre_layrnorm|post_layernorm|final_layer_norm|group_norm)[^.]*\.(weight|bias)$/.test(key) || /norm\d?\.(weight|bias)$/.test(leaf);
  let mean = 0;
  let std: number;
  if (isNorm) {
    mean = key.endsWith('.weight') ? 1 : 0;
    std = 0.1;
  } else if (key.endsWith('.bias')) {
    std = 0.05;
  } else if (shape.length >= 2 && !/embedding|class_embedding|position/.test(key)) {
    const fanIn = shape.slice(1).reduce((a, b) => a * b, 1);
    std = Math.sqrt(1 / fanIn);
  } else {
    std = 0.3;
  }
  for (let i = 0; i < n; i++) out[i] = mean + std * rand();
  return out;
}

async function writeComponent(kind: ModelKind, component: string, dir: string, file: string): Promise<void> {
  const cfgFile = path.join(TINY_ASSETS, component, 'config.json');
  const config = readConfig(kind, cfgFile);
  fs.mkdirSync(path.join(dir, component), { recursive: true });
  fs.copyFileSync(cfgFile, path.join(dir, component, 'config.json'));
  const tensors: Record<string, { dtype: 'F32'; shape: number[]; data: Float32Array }> = {};
  for (const [key, shape] of describeModel(kind, config)) {
    tensors[key] = { dtype: 'F32', shape, data: initTensor(key, shape, normalGenerator(`singleinsert-tiny-v${TINY_MODEL_VERSION}/${component}/${key}`)) };
  }
  await writeSafetensors(path.join(dir, component, file), tensors, { note: 'singleinsert-native embedded tiny model: random weights' });
}

/**
 * Returns the tiny model's folder, building it (once, ~1 s) if needed. The folder is written next
 * to its final place and renamed, so a half-built model is never used.
 */
export async function ensureTinyModel(env: NodeJS.ProcessEnv = process.env): Promise<string> {
  const dir = path.join(cacheDir(env), `tiny-sd-random-v${TINY_MODEL_VERSION}`);
  if (fs.existsSync(path.join(dir, 'model_index.json'))) return dir;
  fs.mkdirSync(path.dirname(dir), { recursive: true });
  const tmp = fs.mkdtempSync(`${dir}.tmp-`);
  fs.chmodSync(tmp, 0o755);
  try {
    await writeComponent('unet', 'unet', tmp, 'diffusion_pytorch_model.safetensors');
    await writeComponent('vae', 'vae', tmp, 'diffusion_pytorch_model.safetensors');
    await writeComponent('clip_text', 'text_encoder', tmp, 'model.safetensors');
    await writeComponent('clip_vision', 'image_encoder', tmp, 'model.safetensors');
    fs.copyFileSync(path.join(TINY_ASSETS, 'image_encoder', 'preprocessor_config.json'), path.join(tmp, 'image_encoder', 'preprocessor_config.json'));
    fs.mkdirSync(path.join(tmp, 'scheduler'));
    fs.copyFileSync(path.join(TINY_ASSETS, 'scheduler', 'scheduler_config.json'), path.join(tmp, 'scheduler', 'scheduler_config.json'));
    fs.mkdirSync(path.join(tmp, 'tokenizer'));
    for (const f of fs.readdirSync(bundledTokenizerDir())) fs.copyFileSync(path.join(bundledTokenizerDir(), f), path.join(tmp, 'tokenizer', f));
    fs.copyFileSync(path.join(TINY_ASSETS, 'model_index.json'), path.join(tmp, 'model_index.json'));
    fs.writeFileSync(path.join(tmp, 'README.txt'), 'singleinsert-native embedded tiny model: SD v1.5 block layout, tiny sizes, RANDOM weights. For trying the workflow, not for pictures.\n');
    try {
      fs.renameSync(tmp, dir);
    } catch (e) {
      // another process finished first: keep theirs
      if (!fs.existsSync(path.join(dir, 'model_index.json'))) throw e;
      fs.rmSync(tmp, { recursive: true, force: true });
    }
  } catch (e) {
    fs.rmSync(tmp, { recursive: true, force: true });
    throw e;
  }
  return dir;
}

/** Candidate locations of real SD v1.5 weights, in the order they are tried. */
export const SD15_HUB_IDS = ['runwayml/stable-diffusion-v1-5', 'stable-diffusion-v1-5/stable-diffusion-v1-5', 'benjamin-paine/stable-diffusion-v1-5'];
