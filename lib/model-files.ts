/**
 * Finding model files on disk: diffusers folders, Hugging Face hub ids resolved in the LOCAL
 * cache (never downloaded), and single original-layout checkpoint files.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { SingleInsertError } from './errors';

export type ResolvedModelPath =
  | { type: 'folder'; path: string; description: string }
  | { type: 'single-file'; path: string; description: string };

/** HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub (huggingface_hub's order). */
export function hubCacheDir(env: NodeJS.ProcessEnv = process.env): string {
  if (env.HF_HUB_CACHE) return env.HF_HUB_CACHE;
  if (env.HUGGINGFACE_HUB_CACHE) return env.HUGGINGFACE_HUB_CACHE;
  const home = env.HF_HOME ?? path.join(env.XDG_CACHE_HOME ?? path.join(os.homedir(), '.cache'), 'huggingface');
  return path.join(home, 'hub');
}

const HUB_ID = /^[A-Za-z0-9][\w.-]*\/[\w.-]+$/;

/** Resolves `org/name` to its snapshot folder in the local cache (refs/main), or explains where it looked. */
export function resolveHubId(id: string, env: NodeJS.ProcessEnv = process.env): string {
  const cache = hubCacheDir(env);
  const repo = path.join(cache, `models--${id.replace('/', '--')}`);
  const ref = path.join(repo, 'refs', 'main');
  const snapshots = path.join(repo, 'snapshots');
  if (fs.existsSync(ref)) {
    const rev = fs.readFileSync(ref, 'utf8').trim();
    const snap = path.join(snapshots, rev);
    if (fs.existsSync(snap)) return snap;
    throw new SingleInsertError(`Hugging Face cache entry for ${id} points at revision ${rev}, but ${snap} does not exist (incomplete download?)`);
  }
  if (fs.existsSync(snapshots)) {
    const revs = fs.readdirSync(snapshots);
    if (revs.length === 1) return path.join(snapshots, revs[0]);
    if (revs.length > 1) throw new SingleInsertError(`Hugging Face cache entry for ${id} has no refs/main and ${revs.length} snapshots in ${snapshots}; pass the snapshot folder you want as the model path`);
  }
  throw new SingleInsertError(
    `Model "${id}" is neither a local path nor in the Hugging Face cache: looked for ${ref} (cache ${cache}, from ${env.HF_HUB_CACHE ? 'HF_HUB_CACHE' : env.HF_HOME ? 'HF_HOME' : 'the default location'}). Nothing is downloaded: put the model there or pass its folder.`,
  );
}

export function resolveModelPath(modelPath: string, env: NodeJS.ProcessEnv = process.env): ResolvedModelPath {
  if (typeof modelPath !== 'string' || modelPath.length === 0) {
    throw new SingleInsertError(`Expected a model folder, a .safetensors checkpoint or a hub id for model but received ${JSON.stringify(modelPath)}`);
  }
  if (fs.existsSync(modelPath)) {
    const abs = path.resolve(modelPath);
    if (fs.statSync(abs).isDirectory()) {
      if (!fs.existsSync(path.join(abs, 'model_index.json'))) {
        throw new SingleInsertError(`${abs} is a folder without model_index.json: expected a diffusers model folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/)`);
      }
      return { type: 'folder', path: abs, description: `diffusers folder ${abs}` };
    }
    if (abs.endsWith('.safetensors')) return { type: 'single-file', path: abs, description: `single-file checkpoint ${abs}` };
    if (/\.(ckpt|pt|pth|bin)$/.test(abs)) {
      throw new SingleInsertError(`${abs} is a PyTorch pickle checkpoint; only .safetensors files are loaded (pickles can run code). Convert it first.`);
    }
    throw new SingleInsertError(`${abs} is not a model folder or a .safetensors checkpoint`);
  }
  if (HUB_ID.test(modelPath)) {
    const snap = resolveHubId(modelPath, env);
    return { type: 'folder', path: snap, description: `${modelPath} from the Hugging Face cache (${snap})` };
  }
  throw new SingleInsertError(`Model path ${modelPath} does not exist`);
}

export interface ComponentWeights {
  files: string[];
  /** for sharded checkpoints, the index's weight_map (key -> file) */
  shardMap?: Record<string, string>;
}

const WEIGHT_NAMES = ['diffusion_pytorch_model', 'model'];

/** The safetensors file(s) of a component folder: plain, sharded (`*.safetensors.index.json`) or fp16 variant. */
export function componentWeightFiles(dir: string): ComponentWeights {
  if (!fs.existsSync(dir)) throw new SingleInsertError(`Component folder ${dir} does not exist`);
  for (const base of WEIGHT_NAMES) {
    const single = path.join(dir, `${base}.safetensors`);
    if (fs.existsSync(single)) return { files: [single] };
    const index = path.join(dir, `${base}.safetensors.index.json`);
    if (fs.existsSync(index)) {
      let weightMap: Record<string, string>;
      try {
        weightMap = JSON.parse(fs.readFileSync(index, 'utf8')).weight_map;
      } catch (e) {
        throw new SingleInsertError(`${index}: invalid JSON (${(e as Error).message})`);
      }
      if (!weightMap || typeof weightMap !== 'object') throw new SingleInsertError(`${index}: expected a "weight_map" object`);
      const files = [...new Set(Object.values(weightMap))].sort().map((f) => path.join(dir, f));
      for (const f of files) if (!fs.existsSync(f)) throw new SingleInsertError(`${index} lists ${path.basename(f)}, which is missing`);
      return { files, shardMap: weightMap };
    }
  }
  for (const base of WEIGHT_NAMES) {
    for (const variant of ['fp16', 'bf16']) {
      const f = path.join(dir, `${base}.${variant}.safetensors`);
      if (fs.existsSync(f)) return { files: [f] };
    }
  }
  const pickles = fs.readdirSync(dir).filter((f) => /\.(bin|pt|pth|ckpt)$/.test(f));
  if (pickles.length) {
    throw new SingleInsertError(`${dir} has only PyTorch pickle weights (${pickles.join(', ')}); only .safetensors files are loaded. Convert them to safetensors first.`);
  }
  throw new SingleInsertError(`${dir} has no weights: expected ${WEIGHT_NAMES.map((b) => b + '.safetensors').join(' or ')}`);
}
