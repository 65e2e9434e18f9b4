/**
 * The models behind the evaluation metrics (./metrics.ts defines what is computed from them):
 * - CLIP (transformers `CLIPModel`, e.g. openai/clip-vit-base-patch32): L2-normalised image and text
 *   embeddings, images through the folder's preprocessor_config.json (CLIPImageProcessor).
 * - DINO (transformers `ViTModel`, e.g. facebook/dino-vits16): the CLS token of the layer-normed
 *   last hidden state, images through its preprocessor_config.json (ViTImageProcessor).
 * - LPIPS v0.1 with AlexNet (native/lpips.h): a folder (or file) with ONE .safetensors holding
 *   torchvision's `features.*` and lpips' `lin*.model.1.weight` (see `singleinsert-native convert`).
 *
 * Model locations are folders, or Hugging Face hub ids found in the LOCAL cache (nothing is downloaded).
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { Config, resolveConfig } from '../config';
import { SingleInsertError } from '../errors';
import { clipProcessorConfig, DINO_VITS16_PREPROCESS, ImageProcessorConfig, preprocessBatch, readPreprocessorConfig, resizeImage } from '../image';
import { loadComponent, LoadOptions, Model, validateLoadOptions } from '../models';
import { resolveHubId } from '../model-files';
import { native, NativeTensor, Tensor, withCallerStack } from '../native';
import { readSafetensorsHeader } from '../safetensors';
import { bundledTokenizerDir, ClipTokenizer } from '../tokenizer';
import type { RgbImage } from './metrics';

/** Images per model call: bounds memory for large evaluations. */
const BATCH = 16;

/** A folder as given, or a hub id resolved in the local Hugging Face cache. */
export function resolveModelDir(location: string, what: string): string {
  if (fs.existsSync(location)) return path.resolve(location);
  if (/^[A-Za-z0-9][\w.-]*\/[\w.-]+$/.test(location)) return resolveHubId(location);
  throw new SingleInsertError(`The ${what} model ${location} does not exist (expected a folder or a Hugging Face hub id in the local cache)`);
}

const raw = (im: RgbImage) => ({ data: im.data, width: im.width, height: im.height, channels: 3 });

function rows(t: NativeTensor): Float32Array[] {
  const n = t.shape[0];
  const d = t.data.length / n;
  const data = t.data as Float32Array;
  return Array.from({ length: n }, (_, i) => data.slice(i * d, (i + 1) * d));
}

async function batched<T>(items: T[], run: (chunk: T[]) => Promise<Float32Array[]>): Promise<Float32Array[]> {
  const out: Float32Array[] = [];
  for (let i = 0; i < items.length; i += BATCH) out.push(...(await run(items.slice(i, i + BATCH))));
  return out;
}

function processorConfig(dir: string, kind: 'clip' | 'vit', imageSize: number): { config: ImageProcessorConfig; note?: string } {
  const file = path.join(dir, 'preprocessor_config.json');
  if (fs.existsSync(file)) return { config: readPreprocessorConfig(file, kind) };
  const config =
    kind === 'clip'
      ? clipProcessorConfig(imageSize)
      : { ...DINO_VITS16_PREPROCESS, size: { height: imageSize, width: imageSize } };
  return { config, note: `${file} is missing: using the ${kind === 'clip' ? 'CLIPImageProcessor' : 'ViTImageProcessor'} defaults at ${imageSize} px` };
}

export class ClipScorer {
  private constructor(
    readonly dir: string,
    private readonly model: Model,
    private readonly processor: ImageProcessorConfig,
    private readonly tokenizer: ClipTokenizer,
    readonly notes: string[],
  ) {}

  /** Loads a CLIPModel folder (config.json, model.safetensors, preprocessor_config.json; tokenizer files optional). */
  static async load(location: string, options: LoadOptions = {}): Promise<ClipScorer> {
    const dir = resolveModelDir(location, 'CLIP');
    const notes: string[] = [];
    const model = await loadComponent('clip', dir, options);
    try {
      const vision = model.config.vision_config as Config;
      const p = processorConfig(dir, 'clip', vision.image_size as number);
      if (p.note) notes.push(p.note);
      let tokenizer: ClipTokenizer;
      if (fs.existsSync(path.join(dir, 'vocab.json')) && fs.existsSync(path.join(dir, 'merges.txt'))) {
        tokenizer = ClipTokenizer.fromDir(dir);
      } else {
        // tiny-clip and some exports ship no vocab: CLIP's BPE is the same for every openai CLIP model
        tokenizer = ClipTokenizer.fromDir(bundledTokenizerDir());
        notes.push(`${dir} has no vocab.json/merges.txt: using the bundled CLIP tokenizer`);
      }
      return new ClipScorer(dir, model, p.config, tokenizer, notes);
    } catch (e) {
      model.dispose();
      throw e;
    }
  }

  /** L2-normalised image embeddings [P] per image. */
  imageEmbeddings(images: RgbImage[]): Promise<Float32Array[]> {
    return batched(images, async (chunk) => {
      const pixels = await preprocessBatch(chunk.map(raw), this.processor);
      return rows((await this.model.run('encode_image', { pixel_values: pixels })).image_embeds);
    });
  }

  /** L2-normalised text embeddings [P] per text (padded to 77 tokens, truncated like transformers). */
  textEmbeddings(texts: string[]): Promise<Float32Array[]> {
    return batched(texts, async (chunk) => {
      const ids = new BigInt64Array(chunk.length * 77);
      chunk.forEach((t, b) => this.tokenizer.call(t, { maxLength: 77 }).inputIds.forEach((id, i) => (ids[b * 77 + i] = BigInt(id))));
      return rows((await this.model.run('encode_text', { input_ids: { dtype: 'I64', shape: [chunk.length, 77], data: ids } })).text_embeds);
    });
  }

  dispose(): void {
    this.model.dispose();
  }
}

export class DinoScorer {
  private constructor(
    readonly dir: string,
    private readonly model: Model,
    private readonly processor: ImageProcessorConfig,
    readonly notes: string[],
  ) {}

  /** Loads a ViTModel folder (config.json, model.safetensors, preprocessor_config.json). */
  static async load(location: string, options: LoadOptions = {}): Promise<DinoScorer> {
    const dir = resolveModelDir(location, 'DINO');
    const model = await loadComponent('vit', dir, options);
    const p = processorConfig(dir, 'vit', model.config.image_size as number);
    return new DinoScorer(dir, model, p.config, p.note ? [p.note] : []);
  }

  /** The CLS token [C] per image (layer-normed last hidden state, position 0). */
  embeddings(images: RgbImage[]): Promise<Float32Array[]> {
    return batched(images, async (chunk) => {
      const pixels = await preprocessBatch(chunk.map(raw), this.processor);
      return rows((await this.model.run('forward', { pixel_values: pixels })).cls);
    });
  }

  dispose(): void {
    this.model.dispose();
  }
}

/** The LPIPS keys the native model needs (any other key in the file, e.g. AlexNet's classifier, is ignored). */
const LPIPS_CONVS = [0, 3, 6, 8, 10];
const lpipsKeys = (): string[] => [...LPIPS_CONVS.flatMap((i) => [`features.${i}.weight`, `features.${i}.bias`]), ...[0, 1, 2, 3, 4].map((k) => `lin${k}.model.1.weight`)];

/** The one .safetensors file of an LPIPS folder (or the file itself). */
export function lpipsWeightFile(location: string): string {
  const p = path.resolve(location);
  if (!fs.existsSync(p)) throw new SingleInsertError(`The LPIPS weights ${location} do not exist`);
  if (fs.statSync(p).isFile()) return p;
  const files = fs.readdirSync(p).filter((f) => f.endsWith('.safetensors')).sort();
  if (files.length === 1) return path.join(p, files[0]);
  const hint = 'convert torchvision\'s alexnet-owt-7be5be79.pth and lpips\' weights/v0.1/alex.pth into one file: `singleinsert-native convert alexnet-owt-7be5be79.pth <dir>/lpips_alex.safetensors --merge alex.pth`';
  if (files.length === 0) throw new SingleInsertError(`${p} holds no .safetensors file for LPIPS; ${hint}`);
  throw new SingleInsertError(`${p} holds ${files.length} .safetensors files (${files.join(', ')}); keep exactly one LPIPS weight file there`);
}

/**
 * Loads LPIPS (AlexNet, v0.1). The conv widths are read off the file's `features.N.weight` shapes,
 * so the tiny fixture trunk and the real one load the same way.
 */
export async function loadLpips(location: string, options: LoadOptions = {}): Promise<Model> {
  const file = lpipsWeightFile(location);
  const header = await readSafetensorsHeader(file);
  const missing = lpipsKeys().filter((k) => !(k in header.tensors));
  if (missing.length) {
    throw new SingleInsertError(
      `${file} is not an LPIPS AlexNet weight file: missing ${missing.slice(0, 4).join(', ')}${missing.length > 4 ? ` and ${missing.length - 4} more` : ''} (it needs torchvision's features.{0,3,6,8,10} and lpips' lin0..lin4)`,
    );
  }
  const channels = LPIPS_CONVS.map((i) => header.tensors[`features.${i}.weight`].shape[0]);
  const config = resolveConfig('lpips', { channels }, file);
  const opts = validateLoadOptions(options);
  const map = lpipsKeys().map((k) => [k, 0, k, false] as [string, number, string, boolean]);
  const stack = new Error();
  const handle = await withCallerStack(native().loadModel('lpips', JSON.stringify(config), { files: [file], map }, opts), stack);
  return new Model('lpips', config, file, handle);
}

/** lpips.im2tensor: uint8 HWC -> [1, 3, H, W] float32 in [-1, 1] (x / 127.5 - 1). */
export function lpipsTensor(images: RgbImage[]): Tensor {
  const { width, height } = images[0];
  const plane = width * height;
  const data = new Float32Array(images.length * 3 * plane);
  images.forEach((im, n) => {
    for (let i = 0; i < plane; i++) for (let c = 0; c < 3; c++) data[n * 3 * plane + c * plane + i] = im.data[3 * i + c] / 127.5 - 1;
  });
  return { dtype: 'F32', shape: [images.length, 3, height, width], data };
}

export class LpipsScorer {
  private constructor(
    readonly file: string,
    private readonly model: Model,
  ) {}

  static async load(location: string, options: LoadOptions = {}): Promise<LpipsScorer> {
    const model = await loadLpips(location, options);
    return new LpipsScorer(model.source, model);
  }

  /** LPIPS distance per pair; the second image is resized (bicubic) to the first's size when they differ. */
  async distances(pairs: Array<[RgbImage, RgbImage]>): Promise<number[]> {
    const out: number[] = [];
    for (let i = 0; i < pairs.length; i += BATCH) {
      // one call per run of same-sized pairs
      const chunk = pairs.slice(i, i + BATCH);
      const bySize = new Map<string, number[]>();
      chunk.forEach(([a], k) => {
        const key = `${a.width}x${a.height}`;
        bySize.set(key, [...(bySize.get(key) ?? []), k]);
      });
      const result = new Array<number>(chunk.length);
      for (const idx of bySize.values()) {
        const a = idx.map((k) => chunk[k][0]);
        const b = idx.map((k) => {
          const [x, y] = chunk[k];
          if (y.width === x.width && y.height === x.height) return y;
          const r = resizeImage(raw(y), x.width, x.height, 'bicubic');
          return { data: r.data as Uint8Array, width: r.width, height: r.height };
        });
        const d = (await this.model.run('forward', { in0: lpipsTensor(a), in1: lpipsTensor(b) })).distance.data as Float32Array;
        idx.forEach((k, j) => (result[k] = d[j]));
      }
      out.push(...result);
    }
    return out;
  }

  dispose(): void {
    this.model.dispose();
  }
}
