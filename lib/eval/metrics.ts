/**
 * The evaluation metrics of SingleInsert (Wu et al., 2023, section 4.1 "Evaluation metrics"): what
 * each number means, as plain functions on already-computed embeddings and distances. The models
 * that produce those (CLIP, DINO, LPIPS) are in ./scorers.ts; the run over a set of images is ./eval.ts.
 *
 * ## Definitions
 *
 * Every image is an 8-bit sRGB picture. The concept's **source** image comes with a foreground mask
 * (white = the concept; a pixel is foreground when its grey value is > 127). Each **generated**
 * image needs one too: a user-supplied mask, or by default the mask derived from the generating
 * pipeline's own cross-attention for the class word (see `attentionMask`).
 *
 * - **Foreground view**: the image with every background pixel replaced by mid-grey (128, 128, 128).
 * - **Background view**: the image with every foreground pixel replaced by mid-grey.
 * - **CLIP-I-f** ↑: cosine similarity between the CLIP image embeddings of the source's foreground
 *   view and a generated image's foreground view, averaged over the generated images. High means the
 *   concept is preserved.
 * - **CLIP-I-b** ↓: the same for the background views. Low means the background is NOT copied from
 *   the source (the paper's point: a method that overfits reproduces the source's background).
 * - **DINO-f** ↑ / **DINO-b** ↓: the same two with the DINO ViT-S/16 CLS token (the ViT's
 *   layer-normed `last_hidden_state[:, 0]`) instead of the CLIP embedding.
 * - **CLIP-T** ↑: cosine similarity between a generated image's CLIP image embedding (the whole
 *   image) and the CLIP text embedding of its prompt with the placeholder replaced by the class word
 *   ("a * face wearing sunglasses" → "a face wearing sunglasses"). Raw cosine: not ×100 (the
 *   "CLIPScore" scaling) and not ×2.5 with clipping.
 * - **DIV** ↑: diversity, the mean pairwise LPIPS distance (AlexNet, v0.1) between the images of the
 *   same prompt (different seeds), averaged over the prompts that have at least two images.
 * - **ESR** ↑: editing success rate. Each editing prompt names one or two targets ("sunglasses");
 *   an image succeeds when, for EVERY target, CLIP scores the image higher against the prompt with
 *   the target than against the same prompt without it (the `without` template stored next to it in
 *   assets/presets.json, e.g. "a face wearing sunglasses" vs "a face"). ESR = successes / edited images.
 *
 * All embeddings are compared with cosine similarity (CLIPModel's embeddings are already
 * L2-normalised; DINO's CLS is normalised here). The summary value of CLIP-I/DINO/CLIP-T is the
 * mean over all generated images; per-prompt rows average over that prompt's images.
 */

/** Grey value that replaces the masked-out half of an image (mid-grey, the usual "neutral" fill). */
export const GREY = 128;
/** A mask pixel is foreground when its 8-bit value is above this (lib/image.ts uses the same rule for training). */
export const MASK_THRESHOLD = 127;
/** Attention maps are min-max normalised to [0, 1]; foreground is >= this. Half-way: no tuning to any model. */
export const ATTENTION_THRESHOLD = 0.5;

/** The paper's column order, with the direction that is better. */
export const METRICS = ['CLIP-I-f', 'CLIP-I-b', 'DINO-f', 'DINO-b', 'CLIP-T', 'DIV', 'ESR'] as const;
export type MetricName = (typeof METRICS)[number];
export const HIGHER_IS_BETTER: Record<MetricName, boolean> = {
  'CLIP-I-f': true,
  'CLIP-I-b': false,
  'DINO-f': true,
  'DINO-b': false,
  'CLIP-T': true,
  DIV: true,
  ESR: true,
};
/** Which model each metric needs. */
export const METRIC_MODEL: Record<MetricName, 'clip' | 'dino' | 'lpips'> = {
  'CLIP-I-f': 'clip',
  'CLIP-I-b': 'clip',
  'DINO-f': 'dino',
  'DINO-b': 'dino',
  'CLIP-T': 'clip',
  DIV: 'lpips',
  ESR: 'clip',
};

/** 8-bit RGB pixels, row-major. */
export interface RgbImage {
  data: Uint8Array;
  width: number;
  height: number;
}

/** A binary mask: 1 = foreground, one byte per pixel. */
export interface Mask {
  data: Uint8Array;
  width: number;
  height: number;
}

/** Binarises an 8-bit grey mask: > MASK_THRESHOLD is foreground. */
export function binaryMask(gray: Uint8Array, width: number, height: number): Mask {
  const data = new Uint8Array(width * height);
  for (let i = 0; i < data.length; i++) data[i] = gray[i] > MASK_THRESHOLD ? 1 : 0;
  return { data, width, height };
}

/**
 * The foreground view (keep = "foreground": background -> grey) or background view (keep =
 * "background": foreground -> grey) of an image. Mask and image must have the same size.
 */
export function composite(image: RgbImage, mask: Mask, keep: 'foreground' | 'background'): RgbImage {
  if (mask.width !== image.width || mask.height !== image.height) {
    throw new Error(`mask is ${mask.width}x${mask.height} but the image is ${image.width}x${image.height}`);
  }
  const out = new Uint8Array(image.data.length);
  const keepValue = keep === 'foreground' ? 1 : 0;
  for (let i = 0; i < mask.data.length; i++) {
    const kept = (mask.data[i] ? 1 : 0) === keepValue;
    for (let c = 0; c < 3; c++) out[3 * i + c] = kept ? image.data[3 * i + c] : GREY;
  }
  return { data: out, width: image.width, height: image.height };
}

/** Cosine similarity of two vectors (0 when either is all zeros). */
export function cosine(a: ArrayLike<number>, b: ArrayLike<number>): number {
  if (a.length !== b.length) throw new Error(`cosine of vectors of length ${a.length} and ${b.length}`);
  let dot = 0, na = 0, nb = 0;
  for (let i = 0; i < a.length; i++) {
    dot += a[i] * b[i];
    na += a[i] * a[i];
    nb += b[i] * b[i];
  }
  return na > 0 && nb > 0 ? dot / Math.sqrt(na * nb) : 0;
}

/** Bilinear resize of a one-channel float map (align_corners = false, edge clamped: torch's interpolate). */
export function resizeBilinear(src: Float32Array, inH: number, inW: number, outH: number, outW: number): Float32Array {
  const out = new Float32Array(outH * outW);
  const sy = inH / outH, sx = inW / outW;
  for (let y = 0; y < outH; y++) {
    const fy = Math.max(0, (y + 0.5) * sy - 0.5);
    const y0 = Math.min(Math.floor(fy), inH - 1), y1 = Math.min(y0 + 1, inH - 1), wy = Math.min(fy - y0, 1);
    for (let x = 0; x < outW; x++) {
      const fx = Math.max(0, (x + 0.5) * sx - 0.5);
      const x0 = Math.min(Math.floor(fx), inW - 1), x1 = Math.min(x0 + 1, inW - 1), wx = Math.min(fx - x0, 1);
      const top = src[y0 * inW + x0] * (1 - wx) + src[y0 * inW + x1] * wx;
      const bottom = src[y1 * inW + x0] * (1 - wx) + src[y1 * inW + x1] * wx;
      out[y * outW + x] = top * (1 - wy) + bottom * wy;
    }
  }
  return out;
}

/**
 * The default mask of a generated image, from the class word's cross-attention map [h, w] (the
 * pipeline's recorder: summed over layers and steps, at the latent size): min-max normalised to
 * [0, 1], upsampled bilinearly to the image size, foreground where >= ATTENTION_THRESHOLD.
 * `degenerate` is true for a constant map, which carries no location: the mask is then all
 * foreground (the background metrics of that image then compare grey with grey and are not informative).
 */
export function attentionMask(map: Float32Array, h: number, w: number, width: number, height: number): { mask: Mask; degenerate: boolean } {
  let min = Infinity, max = -Infinity;
  for (const v of map) {
    if (v < min) min = v;
    if (v > max) max = v;
  }
  const data = new Uint8Array(width * height);
  if (!(max > min)) {
    data.fill(1);
    return { mask: { data, width, height }, degenerate: true };
  }
  const normalised = Float32Array.from(map, (v) => (v - min) / (max - min));
  const up = resizeBilinear(normalised, h, w, height, width);
  for (let i = 0; i < data.length; i++) data[i] = up[i] >= ATTENTION_THRESHOLD ? 1 : 0;
  return { mask: { data, width, height }, degenerate: false };
}

/** Mean of the finite values, or null when there are none. */
export function mean(values: Array<number | null | undefined>): number | null {
  const ok = values.filter((v): v is number => typeof v === 'number' && Number.isFinite(v));
  return ok.length ? ok.reduce((a, b) => a + b, 0) / ok.length : null;
}

/** Unordered pairs (i < j) of n items. */
export function pairs(n: number): Array<[number, number]> {
  const out: Array<[number, number]> = [];
  for (let i = 0; i < n; i++) for (let j = i + 1; j < n; j++) out.push([i, j]);
  return out;
}

/** DIV of one prompt: the mean of the pairwise LPIPS distances (null for fewer than two images). */
export function diversity(pairwiseDistances: number[]): number | null {
  return mean(pairwiseDistances);
}

/** One ESR target's comparison: CLIP cosine of the image with the prompt with / without the target. */
export interface TargetScore {
  target: string;
  with: number;
  without: number;
}

/** ESR rule for one image: every target's "with" score beats its "without" score (strictly). */
export function editSucceeded(scores: TargetScore[]): boolean {
  return scores.length > 0 && scores.every((s) => s.with > s.without);
}

/** ESR over images: successes / images (null without edited images). */
export function editSuccessRate(verdicts: boolean[]): number | null {
  return verdicts.length ? verdicts.filter(Boolean).length / verdicts.length : null;
}

function escapeRegExp(s: string): string {
  return s.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
}

/**
 * The text CLIP-T compares with: the prompt with the placeholder replaced by the class word. When
 * the placeholder stands before the class word ("a * face"), the pair becomes the class word alone
 * ("a face"), not "a face face". Spaces are collapsed.
 */
export function scoringPrompt(prompt: string, classWord: string, placeholder: string): string {
  if (!placeholder) return prompt.replace(/\s+/g, ' ').trim();
  let text = prompt.replace(new RegExp(`${escapeRegExp(placeholder)}\\s+${escapeRegExp(classWord)}`, 'g'), classWord);
  text = text.split(placeholder).join(classWord);
  return text.replace(/\s+/g, ' ').trim();
}

/** One-line definitions, written into metrics.json and the report (the long form is this file's header). */
export const DEFINITIONS: Record<MetricName, string> = {
  'CLIP-I-f': 'cosine similarity of CLIP image embeddings: source foreground vs generated foreground (background replaced by grey 128), mean over images',
  'CLIP-I-b': 'cosine similarity of CLIP image embeddings: source background vs generated background (foreground replaced by grey 128), mean over images; lower = the background is not copied',
  'DINO-f': 'cosine similarity of DINO CLS tokens: source foreground vs generated foreground (grey 128 background), mean over images',
  'DINO-b': 'cosine similarity of DINO CLS tokens: source background vs generated background (grey 128 foreground), mean over images',
  'CLIP-T': 'cosine similarity of the CLIP embeddings of the whole generated image and its prompt with the placeholder replaced by the class word (raw cosine), mean over images',
  DIV: 'mean pairwise LPIPS (AlexNet, v0.1) between images of the same prompt (different seeds), averaged over prompts with at least two images',
  ESR: 'edit success rate: an image succeeds when, for every target of its editing prompt, CLIP scores it higher with the prompt than with the same prompt without the target; successes / edited images',
};
