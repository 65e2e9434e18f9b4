/**
 * Image inputs: decoding (sharp), the CLIP and ViT/DINO image processors of transformers 4.33, and
 * the training inputs of SingleInsert (image, mask, latent mask, image-encoder pixels).
 *
 * Resizing is a port of Pillow 9.4's `ImagingResample` (src/libImaging/Resample.c), the code that
 * transformers' `resize` runs through `PIL.Image.resize`: separable two-pass convolution with the
 * filter widened by the scale factor when downscaling (antialiasing), coefficients normalised and
 * rounded to 22-bit fixed point, and every pass rounded and clipped to uint8. It reproduces the
 * golden `clip_image_processor_*`, `clip_model` and `dino_vit` stages bit for bit (max difference
 * 0, including the 224 upscale). sharp's own resize does not: its `cubic` kernel is off by up to 6
 * levels when downscaling (1,322 of 4,320 values differ on 80x56 -> 45x32) and by up to 130 when
 * upscaling (64x30 -> 68x32; libvips samples upscales on other pixel positions), and `mitchell` /
 * `lanczos3` are off by up to 21. sharp is used only to decode files.
 */
import * as fs from 'node:fs';
import sharp from 'sharp';
import { invalidParameterError, SingleInsertError } from './errors';

// ---------------------------------------------------------------------------------------------
// Types and constants

/** Interleaved 8-bit pixels, row-major (HWC), 1 to 4 channels (gray, gray+alpha, RGB, RGBA). */
export interface RawImage {
  data: Uint8Array | Uint8ClampedArray;
  width: number;
  height: number;
  channels: number;
}

/** A file path, an encoded file in memory (JPEG, PNG, WebP, ... anything sharp reads), or raw pixels. */
export type ImageInput = string | Buffer | RawImage;

/** A float32 tensor with its shape (row-major), ready for `Model.run`. */
export interface ImageTensor {
  data: Float32Array;
  shape: number[];
}

/** Pillow's filters. transformers' `resample` integers are Pillow's codes: see PIL_RESAMPLE. */
export type Resample = 'nearest' | 'lanczos' | 'bilinear' | 'bicubic' | 'box' | 'hamming';
/** PIL.Image.Resampling: NEAREST 0, LANCZOS 1, BILINEAR 2, BICUBIC 3, BOX 4, HAMMING 5. */
export const PIL_RESAMPLE: readonly Resample[] = ['nearest', 'lanczos', 'bilinear', 'bicubic', 'box', 'hamming'];

/** transformers' OPENAI_CLIP_MEAN / OPENAI_CLIP_STD (image_utils.py). */
export const OPENAI_CLIP_MEAN: [number, number, number] = [0.48145466, 0.4578275, 0.40821073];
export const OPENAI_CLIP_STD: [number, number, number] = [0.26862954, 0.26130258, 0.27577711];
/** transformers' IMAGENET_STANDARD_MEAN / _STD, the ViTImageProcessor defaults (and DINO's HF config). */
export const IMAGENET_STANDARD_MEAN: [number, number, number] = [0.5, 0.5, 0.5];
export const IMAGENET_STANDARD_STD: [number, number, number] = [0.5, 0.5, 0.5];

/**
 * A resolved image-processor config (the transformers 4.33 steps, in order: convert to RGB, resize,
 * centre crop, rescale, normalise, HWC -> CHW). `null` switches a step off.
 */
export interface ImageProcessorConfig {
  /** `shortestEdge`: keep the aspect ratio, the shorter side becomes this; `height`/`width`: exactly this size. */
  size: { shortestEdge: number } | { height: number; width: number } | null;
  crop: { height: number; width: number } | null;
  resample: Resample;
  /** transformers multiplies uint8 by this (1/255) */
  rescaleFactor: number | null;
  mean: [number, number, number] | null;
  std: [number, number, number] | null;
}

/** CLIPImageProcessor settings for a given size (shortest edge = crop = size), bicubic, CLIP mean/std. */
export function clipProcessorConfig(size = 224): ImageProcessorConfig {
  return {
    size: { shortestEdge: size },
    crop: { height: size, width: size },
    resample: 'bicubic',
    rescaleFactor: 1 / 255,
    mean: [...OPENAI_CLIP_MEAN],
    std: [...OPENAI_CLIP_STD],
  };
}

/** openai/clip-vit-base-patch32's preprocessor_config.json (the SingleInsert image encoder, CLIP-I/CLIP-T scores). */
export const CLIP_VIT_B32_PREPROCESS: Readonly<ImageProcessorConfig> = clipProcessorConfig(224);

/** facebook/dino-vits16's preprocessor_config.json: a 224x224 BILINEAR resize (no aspect, no crop), mean/std 0.5. */
export const DINO_VITS16_PREPROCESS: Readonly<ImageProcessorConfig> = {
  size: { height: 224, width: 224 },
  crop: null,
  resample: 'bilinear',
  rescaleFactor: 1 / 255,
  mean: [...IMAGENET_STANDARD_MEAN],
  std: [...IMAGENET_STANDARD_STD],
};

// ---------------------------------------------------------------------------------------------
// Decoding

/** The message of a thrown value (an Error from another realm, e.g. under jest, fails instanceof). */
function messageOf(e: unknown): string {
  return typeof e === 'object' && e !== null && typeof (e as Error).message === 'string' ? (e as Error).message : String(e);
}

function isRawImage(x: unknown): x is RawImage {
  return typeof x === 'object' && x !== null && !Buffer.isBuffer(x) && 'data' in x && 'width' in x;
}

function describeInput(input: ImageInput, what: string): string {
  if (typeof input === 'string') return input;
  return Buffer.isBuffer(input) ? `(${what} buffer)` : `(raw ${what})`;
}

function checkImageInput(input: unknown, name: string): ImageInput {
  if (typeof input === 'string') {
    if (input.length === 0) throw invalidParameterError(name, 'a file path, a Buffer or a raw image { data, width, height, channels }', input);
    return input;
  }
  if (Buffer.isBuffer(input)) return input;
  if (isRawImage(input)) {
    const { data, width, height, channels } = input;
    if (!(data instanceof Uint8Array || data instanceof Uint8ClampedArray)) throw invalidParameterError(`${name}.data`, 'a Uint8Array', data);
    if (!Number.isInteger(width) || width <= 0) throw invalidParameterError(`${name}.width`, 'a positive integer', width);
    if (!Number.isInteger(height) || height <= 0) throw invalidParameterError(`${name}.height`, 'a positive integer', height);
    if (!Number.isInteger(channels) || channels < 1 || channels > 4) throw invalidParameterError(`${name}.channels`, 'an integer between 1 and 4', channels);
    if (data.length !== width * height * channels) {
      throw new SingleInsertError(`Expected ${width * height * channels} bytes for ${name}.data (${width}x${height}x${channels}) but received ${data.length}`);
    }
    return input;
  }
  throw invalidParameterError(name, 'a file path, a Buffer or a raw image { data, width, height, channels }', input);
}

/** An image decoded to 8-bit RGB, with its alpha channel kept apart (null when it has none). */
export interface DecodedImage {
  rgb: RawImage;
  alpha: Uint8Array | null;
  /** the file path, or "(image buffer)" / "(raw image)", for messages */
  name: string;
}

/**
 * Decodes to 8-bit sRGB: EXIF orientation applied (unlike PIL.Image.open; the goldens carry no
 * EXIF), grayscale replicated to RGB, 16-bit reduced to 8-bit, CMYK and embedded ICC profiles
 * converted to sRGB by libvips. The alpha channel is returned separately; the RGB under it is kept
 * as stored (like PIL's `convert("RGB")`, which drops alpha without compositing).
 */
export async function decodeImage(input: ImageInput, what = 'image'): Promise<DecodedImage> {
  checkImageInput(input, what);
  const name = describeInput(input, what);
  let raw: RawImage;
  if (isRawImage(input)) {
    raw = input;
  } else {
    if (typeof input === 'string' && !fs.existsSync(input)) throw new SingleInsertError(`Cannot read the ${what} ${name}: the file does not exist`);
    try {
      const { data, info } = await sharp(input).rotate().toColourspace('srgb').raw().toBuffer({ resolveWithObject: true });
      raw = { data: new Uint8Array(data.buffer, data.byteOffset, data.length), width: info.width, height: info.height, channels: info.channels };
    } catch (e) {
      throw new SingleInsertError(`Cannot read the ${what} ${name}: ${messageOf(e)}`, { cause: e });
    }
  }
  const { width, height, channels: c } = raw;
  const n = width * height;
  const rgb = new Uint8Array(n * 3);
  const hasAlpha = c === 2 || c === 4;
  const alpha = hasAlpha ? new Uint8Array(n) : null;
  const colour = c >= 3;
  for (let i = 0; i < n; i++) {
    const s = i * c;
    rgb[3 * i] = raw.data[s];
    rgb[3 * i + 1] = raw.data[colour ? s + 1 : s];
    rgb[3 * i + 2] = raw.data[colour ? s + 2 : s];
    if (alpha) alpha[i] = raw.data[s + c - 1];
  }
  return { rgb: { data: rgb, width, height, channels: 3 }, alpha, name };
}

// ---------------------------------------------------------------------------------------------
// Resizing: Pillow 9.4 src/libImaging/Resample.c

/** `PRECISION_BITS` in Resample.c: 32 - 8 bits of pixel - 2 bits of headroom for negative lobes. */
const PRECISION_BITS = 32 - 8 - 2;

interface Filter {
  fn: (x: number) => number;
  support: number;
}

const sinc = (x: number): number => (x === 0 ? 1 : Math.sin(x * Math.PI) / (x * Math.PI));
const FILTERS: Record<Exclude<Resample, 'nearest'>, Filter> = {
  box: { fn: (x) => (x > -0.5 && x <= 0.5 ? 1 : 0), support: 0.5 },
  bilinear: { fn: (x) => (Math.abs(x) < 1 ? 1 - Math.abs(x) : 0), support: 1 },
  hamming: {
    fn: (x) => {
      x = Math.abs(x);
      if (x === 0) return 1;
      if (x >= 1) return 0;
      x *= Math.PI;
      return (Math.sin(x) / x) * (0.54 + 0.46 * Math.cos(x));
    },
    support: 1,
  },
  // Keys' cubic convolution with a = -0.5 (Catmull-Rom), as bicubic_filter in Resample.c
  bicubic: {
    fn: (x) => {
      const a = -0.5;
      x = Math.abs(x);
      if (x < 1) return ((a + 2) * x - (a + 3)) * x * x + 1;
      if (x < 2) return (((x - 5) * x + 8) * x - 4) * a;
      return 0;
    },
    support: 2,
  },
  lanczos: { fn: (x) => (x >= -3 && x < 3 ? sinc(x) * sinc(x / 3) : 0), support: 3 },
};

/** precompute_coeffs + normalize_coeffs_8bpc: per output pixel, its first source pixel, tap count and fixed-point weights. */
function precomputeCoeffs(inSize: number, outSize: number, filter: Filter): { bounds: Int32Array; kk: Int32Array; ksize: number } {
  const scale = inSize / outSize;
  const filterscale = scale < 1 ? 1 : scale;
  const support = filter.support * filterscale;
  const ksize = Math.ceil(support) * 2 + 1;
  const bounds = new Int32Array(outSize * 2);
  const kk = new Int32Array(outSize * ksize);
  const k = new Float64Array(ksize);
  const ss = 1 / filterscale;
  for (let xx = 0; xx < outSize; xx++) {
    const center = (xx + 0.5) * scale;
    // (int) casts in C truncate toward zero
    let xmin = Math.trunc(center - support + 0.5);
    if (xmin < 0) xmin = 0;
    let xmax = Math.trunc(center + support + 0.5);
    if (xmax > inSize) xmax = inSize;
    xmax -= xmin;
    let ww = 0;
    for (let x = 0; x < xmax; x++) {
      const w = filter.fn((x + xmin - center + 0.5) * ss);
      k[x] = w;
      ww += w;
    }
    for (let x = 0; x < xmax; x++) {
      const w = (ww !== 0 ? k[x] / ww : k[x]) * (1 << PRECISION_BITS);
      kk[xx * ksize + x] = w < 0 ? Math.trunc(-0.5 + w) : Math.trunc(0.5 + w);
    }
    bounds[2 * xx] = xmin;
    bounds[2 * xx + 1] = xmax;
  }
  return { bounds, kk, ksize };
}

/** clip8: the sum carries 2^(PRECISION_BITS-1) for rounding; an arithmetic shift floors, then clamp. */
function clip8(ss: number): number {
  const v = ss >> PRECISION_BITS;
  return v < 0 ? 0 : v > 255 ? 255 : v;
}

function resampleHorizontal(src: RawImage, outWidth: number, filter: Filter): RawImage {
  const { width, height, channels: c } = src;
  const { bounds, kk, ksize } = precomputeCoeffs(width, outWidth, filter);
  const out = new Uint8Array(outWidth * height * c);
  const half = 1 << (PRECISION_BITS - 1);
  const data = src.data;
  for (let y = 0; y < height; y++) {
    const row = y * width * c;
    for (let xx = 0; xx < outWidth; xx++) {
      const xmin = bounds[2 * xx], xmax = bounds[2 * xx + 1], k0 = xx * ksize;
      const o = (y * outWidth + xx) * c;
      if (c === 3) {
        // the common case, unrolled over channels (one pass over the taps)
        let s0 = half, s1 = half, s2 = half;
        for (let x = 0, p = row + xmin * 3; x < xmax; x++, p += 3) {
          const k = kk[k0 + x];
          s0 += data[p] * k;
          s1 += data[p + 1] * k;
          s2 += data[p + 2] * k;
        }
        out[o] = clip8(s0);
        out[o + 1] = clip8(s1);
        out[o + 2] = clip8(s2);
        continue;
      }
      for (let ch = 0; ch < c; ch++) {
        let ss = half;
        for (let x = 0; x < xmax; x++) ss += data[row + (x + xmin) * c + ch] * kk[k0 + x];
        out[o + ch] = clip8(ss);
      }
    }
  }
  return { data: out, width: outWidth, height, channels: c };
}

function resampleVertical(src: RawImage, outHeight: number, filter: Filter): RawImage {
  const { width, height, channels: c } = src;
  const { bounds, kk, ksize } = precomputeCoeffs(height, outHeight, filter);
  const out = new Uint8Array(width * outHeight * c);
  const half = 1 << (PRECISION_BITS - 1);
  const stride = width * c;
  const data = src.data;
  const acc = new Float64Array(stride);
  for (let yy = 0; yy < outHeight; yy++) {
    const ymin = bounds[2 * yy], ymax = bounds[2 * yy + 1], k0 = yy * ksize;
    // row by row over the taps (sequential memory); the int32 sums are exact in a double
    acc.fill(half);
    for (let y = 0; y < ymax; y++) {
      const k = kk[k0 + y], r = (y + ymin) * stride;
      for (let i = 0; i < stride; i++) acc[i] += data[r + i] * k;
    }
    for (let i = 0; i < stride; i++) out[yy * stride + i] = clip8(acc[i]);
  }
  return { data: out, width, height: outHeight, channels: c };
}

/**
 * Pillow's NEAREST resize (ImagingScaleAffine): source pixel floor((i + 0.5) * in/out), the pixel
 * centres, with the position accumulated in a double as Pillow does. (PyTorch's `nearest` is
 * different: see nearestTorch.)
 */
function resizeNearestPil(src: RawImage, outWidth: number, outHeight: number): RawImage {
  const { width, height, channels: c } = src;
  const a0 = width / outWidth, a4 = height / outHeight;
  const xin = new Int32Array(outWidth);
  let xo = a0 * 0.5;
  for (let x = 0; x < outWidth; x++, xo += a0) xin[x] = Math.min(Math.trunc(xo), width - 1);
  const out = new Uint8Array(outWidth * outHeight * c);
  let yo = a4 * 0.5;
  for (let y = 0; y < outHeight; y++, yo += a4) {
    const yi = Math.min(Math.trunc(yo), height - 1);
    for (let x = 0; x < outWidth; x++) {
      for (let ch = 0; ch < c; ch++) out[(y * outWidth + x) * c + ch] = src.data[(yi * width + xin[x]) * c + ch];
    }
  }
  return { data: out, width: outWidth, height: outHeight, channels: c };
}

/**
 * `PIL.Image.resize((width, height), resample)` on an 8-bit image, bit-exact with Pillow 9.4 (for
 * 1 or 3 channels; Pillow premultiplies RGBA/LA by alpha first, which this does not). Same size
 * returns a copy, as Pillow does. The horizontal pass runs first, then the vertical one.
 */
export function resizeImage(image: RawImage, width: number, height: number, resample: Resample = 'bicubic'): RawImage {
  if (!Number.isInteger(width) || width <= 0) throw invalidParameterError('width', 'a positive integer', width);
  if (!Number.isInteger(height) || height <= 0) throw invalidParameterError('height', 'a positive integer', height);
  if (!PIL_RESAMPLE.includes(resample)) throw invalidParameterError('resample', `one of ${PIL_RESAMPLE.join(', ')}`, resample);
  if (width === image.width && height === image.height) return { ...image, data: new Uint8Array(image.data) };
  if (resample === 'nearest') return resizeNearestPil(image, width, height);
  const filter = FILTERS[resample];
  let out = image;
  if (width !== image.width) out = resampleHorizontal(out, width, filter);
  if (height !== image.height) out = resampleVertical(out, height, filter);
  return out;
}

/**
 * PyTorch `F.interpolate(mode="nearest")` on one channel of float values: source index
 * min(floor(i * scale), in - 1) with scale = in/out in float32 (nearest_idx in
 * aten/src/ATen/native/UpSample.h). This takes pixels 0, 8, 16, ... for a factor 8, not the centres.
 */
export function nearestTorch(src: Float32Array, inHeight: number, inWidth: number, outHeight: number, outWidth: number): Float32Array {
  const idx = (i: number, inSize: number, outSize: number): number => {
    if (inSize === outSize) return i;
    if (outSize === 2 * inSize) return i >> 1;
    const scale = Math.fround(inSize / outSize);
    return Math.min(Math.floor(Math.fround(i * scale)), inSize - 1);
  };
  const out = new Float32Array(outHeight * outWidth);
  for (let y = 0; y < outHeight; y++) {
    const sy = idx(y, inHeight, outHeight);
    for (let x = 0; x < outWidth; x++) out[y * outWidth + x] = src[sy * inWidth + idx(x, inWidth, outWidth)];
  }
  return out;
}

/** Copies the rectangle [left, left+width) x [top, top+height), which must lie inside the image. */
export function cropImage(image: RawImage, left: number, top: number, width: number, height: number): RawImage {
  if (left < 0 || top < 0 || left + width > image.width || top + height > image.height) {
    throw new SingleInsertError(`Expected a crop inside the ${image.width}x${image.height} image but received ${width}x${height} at (${left}, ${top})`);
  }
  const c = image.channels;
  const out = new Uint8Array(width * height * c);
  for (let y = 0; y < height; y++) {
    const s = ((top + y) * image.width + left) * c;
    out.set(image.data.subarray(s, s + width * c), y * width * c);
  }
  return { data: out, width, height, channels: c };
}

/**
 * transformers 4.33 `image_transforms.center_crop`: top = (H - h) // 2, left = (W - w) // 2 (floor).
 * When the image is smaller than the crop it is padded with zeros (black) around it. transformers
 * then returns one row/column short when the size difference is odd (its two floors add up to -1);
 * this returns the full crop size with the image at the same offset. CLIP configs never get there
 * (shortest edge = crop size).
 */
export function centerCrop(image: RawImage, height: number, width: number): RawImage {
  const { width: W, height: H, channels: c } = image;
  if (W >= width && H >= height) return cropImage(image, Math.floor((W - width) / 2), Math.floor((H - height) / 2), width, height);
  const offY = H >= height ? Math.floor((H - height) / 2) : -Math.floor((height - H) / 2);
  const offX = W >= width ? Math.floor((W - width) / 2) : -Math.floor((width - W) / 2);
  const out = new Uint8Array(width * height * c);
  for (let y = 0; y < height; y++) {
    const sy = y + offY;
    if (sy < 0 || sy >= H) continue;
    for (let x = 0; x < width; x++) {
      const sx = x + offX;
      if (sx < 0 || sx >= W) continue;
      for (let ch = 0; ch < c; ch++) out[(y * width + x) * c + ch] = image.data[(sy * W + sx) * c + ch];
    }
  }
  return { data: out, width, height, channels: c };
}

// ---------------------------------------------------------------------------------------------
// Image processors (transformers 4.33 CLIPImageProcessor / ViTImageProcessor)

/**
 * transformers' get_resize_output_image_size(default_to_square=False): the shorter side becomes
 * `size`, the longer one int(size * long / short) (truncated, so 80x56 at 32 gives 45x32).
 */
export function shortestEdgeSize(width: number, height: number, size: number): { width: number; height: number } {
  const short = Math.min(width, height), long = Math.max(width, height);
  const newLong = Math.trunc((size * long) / short);
  return width <= height ? { width: size, height: newLong } : { width: newLong, height: size };
}

function checkProcessorConfig(config: ImageProcessorConfig, name = 'config'): void {
  if (config === null || typeof config !== 'object') throw invalidParameterError(name, 'an image processor config object', config);
  const posInt = (v: unknown, n: string) => {
    if (!Number.isInteger(v) || (v as number) <= 0) throw invalidParameterError(`${name}.${n}`, 'a positive integer', v);
  };
  if (config.size !== null) {
    if (typeof config.size !== 'object') throw invalidParameterError(`${name}.size`, '{ shortestEdge } or { height, width } or null', config.size);
    if ('shortestEdge' in config.size) posInt(config.size.shortestEdge, 'size.shortestEdge');
    else {
      posInt((config.size as any).height, 'size.height');
      posInt((config.size as any).width, 'size.width');
    }
  }
  if (config.crop !== null) {
    if (typeof config.crop !== 'object') throw invalidParameterError(`${name}.crop`, '{ height, width } or null', config.crop);
    posInt(config.crop.height, 'crop.height');
    posInt(config.crop.width, 'crop.width');
  }
  if (!PIL_RESAMPLE.includes(config.resample)) throw invalidParameterError(`${name}.resample`, `one of ${PIL_RESAMPLE.join(', ')}`, config.resample);
  if (config.rescaleFactor !== null && !(typeof config.rescaleFactor === 'number' && Number.isFinite(config.rescaleFactor))) {
    throw invalidParameterError(`${name}.rescaleFactor`, 'a finite number or null', config.rescaleFactor);
  }
  for (const key of ['mean', 'std'] as const) {
    const v = config[key];
    if (v !== null && !(Array.isArray(v) && v.length === 3 && v.every((x) => typeof x === 'number' && Number.isFinite(x)))) {
      throw invalidParameterError(`${name}.${key}`, 'an array of 3 numbers or null', v);
    }
  }
  if ((config.mean === null) !== (config.std === null)) throw invalidParameterError(`${name}.std`, 'null exactly when mean is null', config.std);
  if (config.std && config.std.some((s) => s === 0)) throw invalidParameterError(`${name}.std`, 'non-zero values', config.std);
}

/** The uint8 stages of one image and its pixel values, [3, H, W]. */
export interface PreprocessStages {
  resized: RawImage;
  cropped: RawImage;
  pixelValues: ImageTensor;
}

/**
 * Runs a processor on an RGB image, keeping the uint8 stages. The float steps follow numpy's
 * dtypes in transformers 4.33: rescale is `uint8 * float64` cast to float32, normalise is
 * `(x - mean) / std` in float32; Math.fround after each step gives the same bits.
 */
export function preprocessStages(rgb: RawImage, config: ImageProcessorConfig): PreprocessStages {
  checkProcessorConfig(config);
  if (rgb.channels !== 3) throw invalidParameterError('image.channels', '3 (RGB; decode with decodeImage)', rgb.channels);
  // 1. resize
  let resized = rgb;
  if (config.size) {
    const target = 'shortestEdge' in config.size ? shortestEdgeSize(rgb.width, rgb.height, config.size.shortestEdge) : config.size;
    resized = resizeImage(rgb, target.width, target.height, config.resample);
  }
  // 2. centre crop
  const cropped = config.crop ? centerCrop(resized, config.crop.height, config.crop.width) : resized;
  // 3. rescale, normalise, HWC -> CHW
  const { width: W, height: H } = cropped;
  const plane = W * H;
  const data = new Float32Array(3 * plane);
  const fr = Math.fround;
  for (let ch = 0; ch < 3; ch++) {
    const m = config.mean ? fr(config.mean[ch]) : 0;
    const s = config.std ? fr(config.std[ch]) : 1;
    for (let i = 0; i < plane; i++) {
      let v = cropped.data[i * 3 + ch];
      if (config.rescaleFactor !== null) v = fr(v * config.rescaleFactor);
      if (config.mean) v = fr(fr(v - m) / s);
      data[ch * plane + i] = v;
    }
  }
  return { resized, cropped, pixelValues: { data, shape: [3, H, W] } };
}

/** One image through a processor config: pixel values [3, H, W]. */
export async function preprocessImage(input: ImageInput, config: ImageProcessorConfig): Promise<ImageTensor> {
  checkProcessorConfig(config);
  const { rgb } = await decodeImage(input);
  return preprocessStages(rgb, config).pixelValues;
}

/**
 * CLIPImageProcessor (transformers 4.33): RGB, shortest edge -> `size` (bicubic), centre crop,
 * x/255, (x - mean)/std. Default: openai/clip-vit-base-patch32's settings. Returns [3, H, W].
 */
export function clipPreprocess(input: ImageInput, config: ImageProcessorConfig = CLIP_VIT_B32_PREPROCESS): Promise<ImageTensor> {
  return preprocessImage(input, config);
}

/**
 * ViTImageProcessor (transformers 4.33): a square BILINEAR resize, x/255, (x - 0.5)/0.5. Default:
 * facebook/dino-vits16's settings. A config with crop settings (see readPreprocessorConfig) also
 * gets the shortest-edge resize + centre crop. Returns [3, H, W].
 */
export function vitPreprocess(input: ImageInput, config: ImageProcessorConfig = DINO_VITS16_PREPROCESS): Promise<ImageTensor> {
  return preprocessImage(input, config);
}

/** Several images through one processor, stacked to [N, 3, H, W]. They must come out the same size. */
export async function preprocessBatch(inputs: ImageInput[], config: ImageProcessorConfig): Promise<ImageTensor> {
  if (!Array.isArray(inputs) || inputs.length === 0) throw invalidParameterError('inputs', 'a non-empty array of images', inputs);
  checkProcessorConfig(config);
  const items = await Promise.all(inputs.map((x) => preprocessImage(x, config)));
  const shape = items[0].shape;
  const size = items[0].data.length;
  const data = new Float32Array(items.length * size);
  items.forEach((t, i) => {
    if (t.shape.join() !== shape.join()) {
      throw new SingleInsertError(
        `Expected every image to preprocess to [${shape}] but image ${i} (${describeInput(inputs[i], 'image')}) gave [${t.shape}]; use a config with a centre crop or a square resize`,
      );
    }
    data.set(t.data, i * size);
  });
  return { data, shape: [items.length, ...shape] };
}

/** Which transformers processor a preprocessor_config.json describes. */
export type ImageProcessorKind = 'clip' | 'vit';

function processorKindOf(raw: Record<string, unknown>): ImageProcessorKind | null {
  const type = String(raw.image_processor_type ?? raw.feature_extractor_type ?? '');
  if (/^CLIP/.test(type)) return 'clip';
  if (/^(ViT|Dino|DINO)/.test(type)) return 'vit';
  return null;
}

/**
 * Resolves a preprocessor_config.json object the way transformers 4.33 reads it:
 * - CLIPImageProcessor: an integer `size` is the shortest edge (get_size_dict(default_to_square=False)),
 *   an integer `crop_size` a square; defaults 224 / 224, BICUBIC, CLIP mean/std, do_center_crop true.
 * - ViTImageProcessor: an integer `size` is a square (default_to_square=True); defaults 224x224,
 *   BILINEAR, mean/std 0.5, no crop. transformers' ViTImageProcessor ignores crop keys; here a
 *   config with `do_center_crop: true` and a `crop_size` (an evaluation-style "resize 256, centre
 *   crop 224" config) does get the crop, and then an integer `size` is the shortest edge, like
 *   torchvision's Resize(256). Without those keys it is exactly ViTImageProcessor.
 * `size` may also be a dict ({shortest_edge} or {height, width}) or [height, width].
 * `kind` is taken from image_processor_type / feature_extractor_type when not given.
 */
export function resolvePreprocessorConfig(raw: Record<string, unknown>, kind?: ImageProcessorKind, source = 'preprocessor config'): ImageProcessorConfig {
  if (raw === null || typeof raw !== 'object' || Array.isArray(raw)) throw invalidParameterError(source, 'a JSON object', raw);
  const k = kind ?? processorKindOf(raw);
  if (k !== 'clip' && k !== 'vit') {
    throw new SingleInsertError(
      `Cannot tell which image processor ${source} is for: image_processor_type / feature_extractor_type is ${JSON.stringify(raw.image_processor_type ?? raw.feature_extractor_type ?? null)}; pass kind 'clip' or 'vit'`,
    );
  }
  const flag = (key: string, dflt: boolean): boolean => {
    const v = raw[key];
    if (v === undefined || v === null) return dflt;
    if (typeof v !== 'boolean') throw invalidParameterError(`${source}: ${key}`, 'a boolean', v);
    return v;
  };
  const posInt = (v: unknown, key: string): number => {
    if (!Number.isInteger(v) || (v as number) <= 0) throw invalidParameterError(`${source}: ${key}`, 'a positive integer', v);
    return v as number;
  };
  const sizeDict = (v: unknown, key: string, defaultToSquare: boolean): ImageProcessorConfig['size'] => {
    if (typeof v === 'number') return defaultToSquare ? { height: posInt(v, key), width: v } : { shortestEdge: posInt(v, key) };
    if (Array.isArray(v) && v.length === 2) return { height: posInt(v[0], `${key}[0]`), width: posInt(v[1], `${key}[1]`) };
    if (v && typeof v === 'object') {
      const d = v as Record<string, unknown>;
      if ('height' in d || 'width' in d) return { height: posInt(d.height, `${key}.height`), width: posInt(d.width, `${key}.width`) };
      if ('shortest_edge' in d && d.longest_edge === undefined) return { shortestEdge: posInt(d.shortest_edge, `${key}.shortest_edge`) };
    }
    throw invalidParameterError(`${source}: ${key}`, 'an integer, [height, width], {"shortest_edge"} or {"height", "width"}', v);
  };
  const triple = (key: string, dflt: [number, number, number]): [number, number, number] => {
    const v = raw[key];
    if (v === undefined || v === null) return [...dflt];
    if (typeof v === 'number') return [v, v, v];
    if (Array.isArray(v) && v.length === 3 && v.every((x) => typeof x === 'number')) return v as [number, number, number];
    throw invalidParameterError(`${source}: ${key}`, 'a number or an array of 3 numbers', v);
  };

  const crops = k === 'clip' ? flag('do_center_crop', true) : flag('do_center_crop', false) && raw.crop_size !== undefined && raw.crop_size !== null;
  const crop = crops ? sizeDict(raw.crop_size ?? 224, 'crop_size', true) : null;
  if (crop && 'shortestEdge' in crop) throw invalidParameterError(`${source}: crop_size`, 'an integer or {"height", "width"}', raw.crop_size);
  const size = flag('do_resize', true) ? sizeDict(raw.size ?? 224, 'size', k === 'vit' && !crops) : null;

  let resample: Resample = k === 'clip' ? 'bicubic' : 'bilinear';
  if (raw.resample !== undefined && raw.resample !== null) {
    const r = raw.resample;
    if (typeof r === 'number' && Number.isInteger(r) && r >= 0 && r < PIL_RESAMPLE.length) resample = PIL_RESAMPLE[r];
    else if (typeof r === 'string' && PIL_RESAMPLE.includes(r.toLowerCase() as Resample)) resample = r.toLowerCase() as Resample;
    else throw invalidParameterError(`${source}: resample`, 'a PIL resampling code 0-5', r);
  }
  let rescaleFactor: number | null = null;
  if (flag('do_rescale', true)) {
    const f = raw.rescale_factor ?? 1 / 255;
    if (typeof f !== 'number' || !Number.isFinite(f)) throw invalidParameterError(`${source}: rescale_factor`, 'a number', f);
    rescaleFactor = f;
  }
  const normalise = flag('do_normalize', true);
  const config: ImageProcessorConfig = {
    size,
    crop: crop as ImageProcessorConfig['crop'],
    resample,
    rescaleFactor,
    mean: normalise ? triple('image_mean', k === 'clip' ? OPENAI_CLIP_MEAN : IMAGENET_STANDARD_MEAN) : null,
    std: normalise ? triple('image_std', k === 'clip' ? OPENAI_CLIP_STD : IMAGENET_STANDARD_STD) : null,
  };
  checkProcessorConfig(config, source);
  return config;
}

/** Reads and resolves a preprocessor_config.json (see resolvePreprocessorConfig). */
export function readPreprocessorConfig(file: string, kind?: ImageProcessorKind): ImageProcessorConfig {
  if (typeof file !== 'string' || file.length === 0) throw invalidParameterError('file', 'a file path', file);
  if (!fs.existsSync(file)) throw new SingleInsertError(`Cannot read the preprocessor config ${file}: the file does not exist`);
  let raw: unknown;
  try {
    raw = JSON.parse(fs.readFileSync(file, 'utf8'));
  } catch (e) {
    throw new SingleInsertError(`Cannot read the preprocessor config ${file}: ${messageOf(e)}`, { cause: e });
  }
  return resolvePreprocessorConfig(raw as Record<string, unknown>, kind, file);
}

// ---------------------------------------------------------------------------------------------
// SingleInsert training inputs

/** A mask pixel is foreground when its value is above this (the golden rule: mask_png > 127). */
export const MASK_THRESHOLD = 127;
/** Smallest image side accepted: below 64 px there is less than one 8x8 latent cell per 8 px of content. */
export const MIN_IMAGE_SIDE = 64;
/** Stable Diffusion's VAE divides by 8 and the UNet by 8 more: resolutions are multiples of 64. */
export const RESOLUTION_MULTIPLE = 64;
/** Margin added on each side of the mask's bounding box, as a fraction of its longer side. */
export const CROP_MARGIN = 0.1;
/** The crop square is never smaller than this (a 20 px mask upscaled to 512 is mostly blur). */
export const MIN_CROP_SIDE = 64;
/** A mask covering at least this fraction leaves (almost) no background for L_bg: warn. */
export const FULL_MASK_WARNING = 0.99;
/** A crop enlarged more than this to reach the resolution is mostly interpolation: warn. */
export const UPSCALE_WARNING = 4;

export interface BoundingBox {
  /** inclusive left/top, exclusive right/bottom, in pixels */
  left: number;
  top: number;
  right: number;
  bottom: number;
}

export interface SquareCrop {
  left: number;
  top: number;
  size: number;
}

/**
 * The crop policy, in one place. Given the mask's bounding box in a width x height image:
 * 1. side = ceil(longer bbox side x (1 + 2 x CROP_MARGIN)): the bbox's longer side plus 10% of it
 *    on each side; at least MIN_CROP_SIDE (64 px) so a tiny mask is not blown up from a few pixels.
 * 2. side = min(side, width, height): the square always lies inside the image (no padding). When
 *    the image is too small for the square, this is the largest square the image holds.
 * 3. The square is centred on the bbox centre (left = floor((bbox.left + bbox.right - side) / 2)),
 *    then shifted, not shrunk, to lie inside the image, so it keeps as much of the bbox as it can.
 *    If the bbox is longer than the image's shorter side, the bbox cannot fit: the square is the
 *    image's full height (or width) centred on the bbox and `bboxFits` is false.
 */
export function squareCropAroundBox(bbox: BoundingBox, width: number, height: number): SquareCrop & { bboxFits: boolean } {
  const bw = bbox.right - bbox.left, bh = bbox.bottom - bbox.top;
  let side = Math.max(Math.ceil(Math.max(bw, bh) * (1 + 2 * CROP_MARGIN)), MIN_CROP_SIDE);
  side = Math.min(side, width, height);
  const place = (lo: number, hi: number, limit: number) => Math.min(Math.max(Math.floor((lo + hi - side) / 2), 0), limit - side);
  const left = place(bbox.left, bbox.right, width);
  const top = place(bbox.top, bbox.bottom, height);
  const bboxFits = left <= bbox.left && top <= bbox.top && left + side >= bbox.right && top + side >= bbox.bottom;
  return { left, top, size: side, bboxFits };
}

/** Bounding box of the pixels above MASK_THRESHOLD in a one-channel mask; null when there is none. */
export function maskBoundingBox(mask: Uint8Array, width: number, height: number): BoundingBox | null {
  let left = width, top = height, right = -1, bottom = -1;
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) {
      if (mask[y * width + x] > MASK_THRESHOLD) {
        if (x < left) left = x;
        if (x > right) right = x;
        if (y < top) top = y;
        bottom = y;
      }
    }
  }
  return right < 0 ? null : { left, top, right: right + 1, bottom: bottom + 1 };
}

export interface TrainingInputOptions {
  /** the concept image: a path, an encoded Buffer (JPEG, PNG, WebP, ...) or raw pixels */
  image: ImageInput;
  /** white (> 127) = the concept. Default: the image's alpha channel. */
  mask?: ImageInput;
  /** training resolution, a positive multiple of 64 (default 512) */
  resolution?: number;
  /** keep the mask's gray levels in [0, 1] instead of 0/1 (default false) */
  softMask?: boolean;
  /** 'mask-bbox' (default): the square crop of squareCropAroundBox; 'none': the whole (square) image */
  crop?: 'mask-bbox' | 'none';
  /** image-encoder input size when encoderConfig is not given (default 224) */
  encoderSize?: number;
  /** image-encoder processor config (e.g. readPreprocessorConfig(image_encoder/preprocessor_config.json)) */
  encoderConfig?: ImageProcessorConfig;
}

export interface TrainingInputs {
  /** [1, 3, R, R], x/255*2-1 in float32 (as `png/255*2-1` in the goldens) */
  image: ImageTensor;
  /** [1, 1, R, R]: 0/1, or [0, 1] with softMask */
  mask: ImageTensor;
  /** [1, 1, R/8, R/8]: `mask` through PyTorch's nearest (pixels 0, 8, 16, ...) */
  maskLatent: ImageTensor;
  /** [1, 3, S, S]: the cropped source image through the CLIP processor, for the image encoder */
  encoderPixels: ImageTensor;
  /** the square taken from the (EXIF-oriented) source image, in source pixels */
  crop: SquareCrop;
  /** the crop resized to R x R, 8-bit RGB (what `image` holds), for previews */
  preview: RawImage;
  warnings: string[];
}

/** A one-channel 0..255 mask: luminance (Pillow's convert("L") weights), times alpha when the mask file has one. */
function maskChannel(decoded: DecodedImage): Uint8Array {
  const { rgb, alpha } = decoded;
  const n = rgb.width * rgb.height;
  const out = new Uint8Array(n);
  for (let i = 0; i < n; i++) {
    // Convert.c L24: (R*19595 + G*38470 + B*7471 + 0x8000) >> 16; gray stays unchanged
    let v = (rgb.data[3 * i] * 19595 + rgb.data[3 * i + 1] * 38470 + rgb.data[3 * i + 2] * 7471 + 0x8000) >> 16;
    if (alpha) v = Math.floor((v * alpha[i] + 127) / 255);
    out[i] = v;
  }
  return out;
}

function checkTrainingOptions(options: TrainingInputOptions): Required<Omit<TrainingInputOptions, 'mask' | 'encoderConfig'>> & Pick<TrainingInputOptions, 'mask' | 'encoderConfig'> {
  if (options === null || typeof options !== 'object') throw invalidParameterError('options', 'an object { image, mask?, resolution?, ... }', options);
  const { image, mask, resolution = 512, softMask = false, crop = 'mask-bbox', encoderSize = 224, encoderConfig } = options;
  if (image === undefined || image === null) throw invalidParameterError('image', 'a file path, a Buffer or a raw image', image);
  checkImageInput(image, 'image');
  if (mask !== undefined && mask !== null) checkImageInput(mask, 'mask');
  if (!Number.isInteger(resolution) || resolution <= 0 || resolution % RESOLUTION_MULTIPLE !== 0) {
    throw invalidParameterError('resolution', `a positive multiple of ${RESOLUTION_MULTIPLE}`, resolution);
  }
  if (typeof softMask !== 'boolean') throw invalidParameterError('softMask', 'a boolean', softMask);
  if (crop !== 'mask-bbox' && crop !== 'none') throw invalidParameterError('crop', "'mask-bbox' or 'none'", crop);
  if (!Number.isInteger(encoderSize) || encoderSize <= 0) throw invalidParameterError('encoderSize', 'a positive integer', encoderSize);
  if (encoderConfig !== undefined) checkProcessorConfig(encoderConfig, 'encoderConfig');
  return { image, mask: mask ?? undefined, resolution, softMask, crop, encoderSize, encoderConfig };
}

/**
 * Loads the concept image and its mask for SingleInsert training.
 *
 * - The image is decoded to 8-bit RGB (EXIF orientation applied; grayscale, 16-bit, CMYK converted;
 *   alpha dropped after use). The mask is the `mask` file's luminance (times its alpha, if it has
 *   one), or else the image's alpha channel; a pixel > 127 is foreground.
 * - A mask of another size than the image is resized to it (bilinear) when the aspect ratios agree
 *   up to the rounding of a scaled copy (|mh x iw - mw x ih| <= (iw + ih) / 2).
 * - crop 'mask-bbox': the square of squareCropAroundBox; crop 'none': the whole image, which must
 *   be square (the golden singleinsert_losses case).
 * - The crop is resized to resolution x resolution with Pillow's BICUBIC (the same bit-exact port as
 *   the CLIP processor; antialiased when downscaling). The mask crop is resized with Pillow's
 *   BILINEAR (the same antialiased footprint, so its edge stays on the image's edge; nearest would
 *   drop or keep isolated pixels when downscaling) and then re-binarised at > 127, unless softMask.
 * - maskLatent is that mask at resolution/8 with PyTorch's nearest rule, as the golden.
 * - encoderPixels: the crop in source pixels through the CLIP processor (encoderConfig, or
 *   clipProcessorConfig(encoderSize)).
 *
 * Errors (SingleInsertError, all before any tensor work): a bad option; an unreadable or missing
 * image or mask (named); an image under 64 px on a side; a mask whose aspect ratio differs from the
 * image's (both sizes given); no mask and no transparency; an empty mask; crop 'none' on a
 * non-square image. Warnings (returned, not thrown): a mask covering >= 99% of the image; a bbox
 * that does not fit in the square crop; a crop upscaled more than 4x.
 */
export async function loadTrainingInputs(options: TrainingInputOptions): Promise<TrainingInputs> {
  const opts = checkTrainingOptions(options);
  const R = opts.resolution;
  const warnings: string[] = [];

  // 1. decode the image and check its size
  const decoded = await decodeImage(opts.image, 'image');
  const { rgb } = decoded;
  const W = rgb.width, H = rgb.height;
  if (W < MIN_IMAGE_SIDE || H < MIN_IMAGE_SIDE) {
    throw new SingleInsertError(`The image ${decoded.name} is ${W}x${H} pixels; it needs at least ${MIN_IMAGE_SIDE} pixels on each side`);
  }

  // 2. the mask: a file, else the image's alpha
  let mask: Uint8Array;
  let maskName: string;
  if (opts.mask !== undefined) {
    const m = await decodeImage(opts.mask, 'mask');
    maskName = m.name;
    const mw = m.rgb.width, mh = m.rgb.height;
    if (Math.abs(mh * W - mw * H) > (W + H) / 2) {
      throw new SingleInsertError(`The mask ${maskName} is ${mw}x${mh} but the image ${decoded.name} is ${W}x${H}: their aspect ratios differ`);
    }
    mask = maskChannel(m);
    if (mw !== W || mh !== H) mask = resizeImage({ data: mask, width: mw, height: mh, channels: 1 }, W, H, 'bilinear').data as Uint8Array;
  } else if (decoded.alpha && decoded.alpha.some((a) => a !== 255)) {
    mask = decoded.alpha;
    maskName = `(alpha channel of ${decoded.name})`;
  } else {
    const why = decoded.alpha ? 'its alpha channel is fully opaque' : 'it has no alpha channel';
    throw new SingleInsertError(`No mask was given and the image ${decoded.name} cannot serve as one (${why}): pass a mask (white = the concept) or an image with a transparent background`);
  }

  // 3. empty / full masks
  let fg = 0;
  for (let i = 0; i < mask.length; i++) if (mask[i] > MASK_THRESHOLD) fg++;
  if (fg === 0) throw new SingleInsertError(`the mask ${maskName} has no foreground pixel (> ${MASK_THRESHOLD})`);
  if (fg >= FULL_MASK_WARNING * mask.length) {
    warnings.push(
      `the mask ${maskName} covers ${((100 * fg) / mask.length).toFixed(1)}% of the image (>= ${FULL_MASK_WARNING * 100}%): there is almost no background for the background loss`,
    );
  }

  // 4. the square crop
  let crop: SquareCrop;
  if (opts.crop === 'none') {
    if (W !== H) throw new SingleInsertError(`crop 'none' needs a square image but the image ${decoded.name} is ${W}x${H}; use crop 'mask-bbox' (the default)`);
    crop = { left: 0, top: 0, size: W };
  } else {
    const bbox = maskBoundingBox(mask, W, H)!;
    const c = squareCropAroundBox(bbox, W, H);
    if (!c.bboxFits) {
      warnings.push(
        `the mask's bounding box (${bbox.right - bbox.left}x${bbox.bottom - bbox.top} at ${bbox.left},${bbox.top}) does not fit in a square crop of the ${W}x${H} image; its ends are cut off`,
      );
    }
    crop = { left: c.left, top: c.top, size: c.size };
  }
  if (crop.size * UPSCALE_WARNING < R) warnings.push(`the ${crop.size}x${crop.size} crop is upscaled more than ${UPSCALE_WARNING}x to ${R}x${R}`);

  // 5. crop and resize the image: [1, 3, R, R] in [-1, 1]
  const croppedRgb = cropImage(rgb, crop.left, crop.top, crop.size, crop.size);
  const preview = resizeImage(croppedRgb, R, R, 'bicubic');
  const plane = R * R;
  const fr = Math.fround;
  const image = new Float32Array(3 * plane);
  for (let ch = 0; ch < 3; ch++) {
    // torch float32: x / 255 * 2 - 1, one rounding per op (bit-exact with input.image of the golden)
    for (let i = 0; i < plane; i++) image[ch * plane + i] = fr(fr(fr(preview.data[3 * i + ch] / 255) * 2) - 1);
  }

  // 6. crop and resize the mask: [1, 1, R, R]
  const maskSource: RawImage = { data: opts.softMask ? mask : mask.map((v) => (v > MASK_THRESHOLD ? 255 : 0)), width: W, height: H, channels: 1 };
  const maskResized = resizeImage(cropImage(maskSource, crop.left, crop.top, crop.size, crop.size), R, R, 'bilinear').data;
  const maskData = new Float32Array(plane);
  for (let i = 0; i < plane; i++) maskData[i] = opts.softMask ? fr(maskResized[i] / 255) : maskResized[i] > MASK_THRESHOLD ? 1 : 0;

  // 7. the latent mask: PyTorch nearest to R/8
  const r = R / 8;
  const maskLatent = nearestTorch(maskData, R, R, r, r);

  // 8. the image-encoder input
  const encoderConfig = opts.encoderConfig ?? clipProcessorConfig(opts.encoderSize);
  const enc = preprocessStages(croppedRgb, encoderConfig).pixelValues;

  return {
    image: { data: image, shape: [1, 3, R, R] },
    mask: { data: maskData, shape: [1, 1, R, R] },
    maskLatent: { data: maskLatent, shape: [1, 1, r, r] },
    encoderPixels: { data: enc.data, shape: [1, ...enc.shape] },
    crop,
    preview,
    warnings,
  };
}
