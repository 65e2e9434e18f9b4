/**
 * A pipeline with RANDOM weights drawn natively (native/random_init.h) from a folder of configs, for
 * benchmarks and smoke tests at full SD v1.5 size without downloading anything:
 * `loadRandomPipeline(path.join(packageRoot, 'assets', 'sd15'), { device: 'cuda', dtype: 'bf16' })`
 * builds the 1.07 B-parameter UNet, VAE and text encoder in well under a second on a GPU. Its pictures
 * are noise; its speed and memory are those of the real model.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { ModelKind, readConfig } from './config';
import { invalidParameterError, SingleInsertError } from './errors';
import { LoadOptions, Model, Pipeline, SchedulerConfig, validateLoadOptions } from './models';
import { native, packageRoot, withCallerStack } from './native';
import { bundledTokenizerDir, ClipTokenizer } from './tokenizer';

/** Configs of SD v1.5 (runwayml/stable-diffusion-v1-5) and of the embedded tiny model, bundled with the package. */
export const SD15_CONFIGS = path.join(packageRoot, 'assets', 'sd15');
export const TINY_CONFIGS = path.join(packageRoot, 'assets', 'tiny-sd');

export interface RandomLoadOptions extends LoadOptions {
  /** default 0; each model draws from its own stream (seed + 0, 1, 2 for UNet, VAE, text encoder) */
  seed?: number;
}

/** One model of `kind` with random weights, from a config file. */
export async function loadRandomModel(kind: ModelKind, configFile: string, options: RandomLoadOptions = {}): Promise<Model> {
  const opts = validateLoadOptions(options);
  const seed = options.seed ?? 0;
  if (!Number.isSafeInteger(seed) || seed < 0) throw invalidParameterError('seed', 'a non-negative integer', seed);
  const config = readConfig(kind, configFile);
  const stack = new Error();
  const handle = await withCallerStack(
    native().loadModel(kind, JSON.stringify(config), { files: [], random: seed }, { ...opts, channelsLast: opts.channelsLast && kind === 'unet' }),
    stack,
  );
  return new Model(kind, config, `${configFile} (random weights, seed ${seed})`, handle, options.dtype ?? 'fp32', opts.device);
}

/**
 * UNet, VAE and text encoder with random weights from `<dir>/{unet,vae,text_encoder}/config.json`,
 * the scheduler config from `<dir>/scheduler/scheduler_config.json` and the bundled CLIP tokenizer.
 */
export async function loadRandomPipeline(dir: string, options: RandomLoadOptions = {}): Promise<Pipeline> {
  const seed = options.seed ?? 0;
  const file = (...parts: string[]) => {
    const f = path.join(dir, ...parts);
    if (!fs.existsSync(f)) throw new SingleInsertError(`Expected ${f} for a random pipeline from ${dir}`);
    return f;
  };
  const scheduler = JSON.parse(fs.readFileSync(file('scheduler', 'scheduler_config.json'), 'utf8')) as SchedulerConfig;
  const models: Model[] = [];
  try {
    models.push(await loadRandomModel('unet', file('unet', 'config.json'), { ...options, seed }));
    models.push(await loadRandomModel('vae', file('vae', 'config.json'), { ...options, seed: seed + 1 }));
    models.push(await loadRandomModel('clip_text', file('text_encoder', 'config.json'), { ...options, seed: seed + 2 }));
  } catch (e) {
    models.forEach((m) => m.dispose());
    throw e;
  }
  return new Pipeline(dir, `${dir} with random weights`, models[0], models[1], models[2], ClipTokenizer.fromDir(bundledTokenizerDir()), scheduler);
}
