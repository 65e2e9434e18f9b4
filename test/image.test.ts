// Image processors (CLIP, ViT/DINO) against the transformers 4.33 goldens, and the SingleInsert
// training inputs (image, mask, latent mask, crop policy, errors and warnings).
import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import sharp from 'sharp';
import {
  centerCrop,
  CLIP_VIT_B32_PREPROCESS,
  clipPreprocess,
  clipProcessorConfig,
  decodeImage,
  DINO_VITS16_PREPROCESS,
  loadTrainingInputs,
  nearestTorch,
  preprocessBatch,
  preprocessStages,
  RawImage,
  readPreprocessorConfig,
  resizeImage,
  resolvePreprocessorConfig,
  shortestEdgeSize,
  squareCropAroundBox,
  vitPreprocess,
} from '../lib/image';
import { readSafetensors } from '../lib/safetensors';
import { expectClose, loadCase } from './helpers/cases';
import { fixture } from './helpers/fixtures';

// Fixtures README, "Suggested tolerances": image-processor pixel_values about 0.02 (PIL bicubic),
// resized uint8 stages +-1. The Pillow port here is bit-exact, so the measured values are 0.
const PIXEL_ATOL = 0.02;
const STAGE_TOLERANCE = 1;

const root = path.resolve(__dirname, '..');
const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'si-image-'));
afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }));

/** Max abs difference and the number of differing values between two uint8 images; prints both. */
function compareStage(label: string, actual: RawImage, expected: RawImage): number {
  expect([actual.width, actual.height, actual.channels]).toEqual([expected.width, expected.height, expected.channels]);
  let max = 0, off = 0;
  for (let i = 0; i < actual.data.length; i++) {
    const d = Math.abs(actual.data[i] - expected.data[i]);
    if (d) off++;
    max = Math.max(max, d);
  }
  // eslint-disable-next-line no-console
  console.log(`${label}: ${actual.width}x${actual.height}, max abs ${max}, ${off} of ${actual.data.length} values differ`);
  expect(max).toBeLessThanOrEqual(STAGE_TOLERANCE);
  return max;
}

const png = async (rel: string): Promise<RawImage> => (await decodeImage(fixture(rel))).rgb;
const tensor = (t: { data: Float32Array; shape: number[] }) => ({ data: t.data, shape: t.shape });

describe('CLIP image processor', () => {
  test.each([
    ['clip_image_processor_32', () => readPreprocessorConfig(fixture('tiny-sd', 'image_encoder', 'preprocessor_config.json'))],
    ['clip_image_processor_224', () => CLIP_VIT_B32_PREPROCESS],
  ])('golden %s: resized and cropped stages, pixel_values', async (name, getConfig) => {
    const c = await loadCase(name);
    const config = getConfig();
    const size = c.json.call.config.size.shortest_edge;
    expect(config).toEqual(clipProcessorConfig(size));
    for (const [key, stage] of Object.entries<any>(c.json.call.stages)) {
      const input = await png(stage.input_png);
      const out = preprocessStages(input, config);
      expect([out.resized.height, out.resized.width]).toEqual(stage.resized_hw);
      compareStage(`${name} ${key} resized`, out.resized, await png(stage.resized_png));
      compareStage(`${name} ${key} cropped`, out.cropped, await png(stage.cropped_png));
      const expected = c.tensors[`output.pixel_values${key.slice(-1)}`];
      const pv = await clipPreprocess(fixture(stage.input_png), config);
      expectClose(`${name} ${key} pixel_values`, { data: pv.data, shape: [1, ...pv.shape] }, expected, PIXEL_ATOL, 0);
    }
  });

  test('golden clip_model: input.pixel_values [3,3,32,32] from the three images in one batch', async () => {
    const c = await loadCase('clip_model');
    const config = readPreprocessorConfig(fixture('tiny-clip', 'preprocessor_config.json'));
    const stages = Object.values<any>(c.json.call.stages);
    for (const stage of stages) {
      const out = preprocessStages(await png(stage.input_png), config);
      compareStage(`clip_model ${path.basename(stage.input_png)} resized`, out.resized, await png(stage.resized_png));
      compareStage(`clip_model ${path.basename(stage.input_png)} cropped`, out.cropped, await png(stage.cropped_png));
    }
    const batch = await preprocessBatch(stages.map((s) => fixture(s.input_png)), config);
    expectClose('clip_model pixel_values', tensor(batch), c.tensors['input.pixel_values'], PIXEL_ATOL, 0);
  });

  test('shortest-edge sizes truncate like transformers (int(size * long / short))', () => {
    expect(shortestEdgeSize(80, 56, 32)).toEqual({ width: 45, height: 32 });
    expect(shortestEdgeSize(45, 70, 224)).toEqual({ width: 224, height: 348 });
    expect(shortestEdgeSize(64, 30, 32)).toEqual({ width: 68, height: 32 });
    expect(shortestEdgeSize(32, 32, 32)).toEqual({ width: 32, height: 32 });
  });

  test('centre crop floors the offset and pads a too-small image with black', () => {
    const img: RawImage = { data: Uint8Array.from({ length: 5 * 4 }, (_, i) => i + 1), width: 5, height: 4, channels: 1 };
    expect(Array.from(centerCrop(img, 2, 2).data)).toEqual([7, 8, 12, 13]); // top (4-2)//2 = 1, left (5-2)//2 = 1
    const padded = centerCrop(img, 6, 5);
    expect([padded.width, padded.height]).toEqual([5, 6]);
    expect(Array.from(padded.data.slice(0, 5))).toEqual([0, 0, 0, 0, 0]);
    expect(Array.from(padded.data.slice(5, 10))).toEqual([1, 2, 3, 4, 5]);
  });

  test('a batch whose images come out in different sizes is refused', async () => {
    const config = { ...clipProcessorConfig(32), crop: null };
    await expect(preprocessBatch([fixture('cases/images/landscape_80x56.png'), fixture('cases/images/portrait_45x70.png')], config)).rejects.toThrow(
      /^Expected every image to preprocess to \[3,32,45\] but image 1 \(.*portrait_45x70\.png\) gave \[3,49,32\]; use a config with a centre crop or a square resize$/,
    );
  });
});

describe('ViT / DINO image processor', () => {
  test('golden dino_vit: input.pixel_values [2,3,32,32] (BILINEAR square resize, mean/std 0.5)', async () => {
    const c = await loadCase('dino_vit');
    const config = readPreprocessorConfig(fixture('tiny-sd', 'dino', 'preprocessor_config.json'));
    expect(config).toEqual({ ...DINO_VITS16_PREPROCESS, size: { height: 32, width: 32 } });
    const batch = await preprocessBatch(c.json.call.images.map((p: string) => fixture(p)), config);
    expectClose('dino_vit pixel_values', tensor(batch), c.tensors['input.pixel_values'], PIXEL_ATOL, 0);
    const one = await vitPreprocess(fixture(c.json.call.images[1]), config);
    expect(one.shape).toEqual([3, 32, 32]);
    expect(one.data).toEqual(batch.data.slice(3 * 32 * 32));
  });

  test("facebook/dino-vits16's own config (no crop keys) is a 224x224 square resize", () => {
    const real = { do_normalize: true, do_resize: true, feature_extractor_type: 'ViTFeatureExtractor', image_mean: [0.5, 0.5, 0.5], image_std: [0.5, 0.5, 0.5], resample: 2, size: 224 };
    expect(resolvePreprocessorConfig(real)).toEqual(DINO_VITS16_PREPROCESS);
    expect(resolvePreprocessorConfig({ image_processor_type: 'ViTImageProcessor', size: { height: 224, width: 224 } })).toEqual(DINO_VITS16_PREPROCESS);
  });

  test('an evaluation config with crop settings: shortest edge 256, centre crop 224', async () => {
    const evalCfg = resolvePreprocessorConfig({
      feature_extractor_type: 'ViTFeatureExtractor',
      size: 256,
      do_center_crop: true,
      crop_size: 224,
      resample: 3,
      image_mean: [0.485, 0.456, 0.406],
      image_std: [0.229, 0.224, 0.225],
    });
    expect(evalCfg.size).toEqual({ shortestEdge: 256 });
    expect(evalCfg.crop).toEqual({ height: 224, width: 224 });
    expect(evalCfg.resample).toBe('bicubic');
    const input = await png('cases/images/landscape_80x56.png');
    const out = preprocessStages(input, evalCfg);
    expect([out.resized.width, out.resized.height]).toEqual([365, 256]);
    expect(out.pixelValues.shape).toEqual([3, 224, 224]);
    // a dict size keeps its shape whatever the crop keys say
    const dict = resolvePreprocessorConfig({ image_processor_type: 'ViTImageProcessor', size: { shortest_edge: 256 }, crop_size: { height: 224, width: 224 }, do_center_crop: true });
    expect([dict.size, dict.crop]).toEqual([{ shortestEdge: 256 }, { height: 224, width: 224 }]);
    // do_center_crop false: crop keys are ignored and an integer size is a square
    const noCrop = resolvePreprocessorConfig({ feature_extractor_type: 'ViTFeatureExtractor', size: 256, crop_size: 224, do_center_crop: false });
    expect([noCrop.size, noCrop.crop]).toEqual([{ height: 256, width: 256 }, null]);
  });

  test('config errors name the file and the key', () => {
    expect(() => resolvePreprocessorConfig({ size: 32 })).toThrow(
      "Cannot tell which image processor preprocessor config is for: image_processor_type / feature_extractor_type is null; pass kind 'clip' or 'vit'",
    );
    expect(resolvePreprocessorConfig({ size: 32, crop_size: 32 }, 'clip')).toEqual(clipProcessorConfig(32));
    expect(resolvePreprocessorConfig({ size: 32 }, 'clip').crop).toEqual({ height: 224, width: 224 }); // CLIPImageProcessor's default crop_size
    expect(() => resolvePreprocessorConfig({ feature_extractor_type: 'CLIPFeatureExtractor', resample: 9 }, undefined, 'x.json')).toThrow(
      'Expected a PIL resampling code 0-5 for x.json: resample but received 9',
    );
    expect(() => resolvePreprocessorConfig({ feature_extractor_type: 'CLIPFeatureExtractor', size: { longest_edge: 3 } }, undefined, 'x.json')).toThrow(
      'Expected an integer, [height, width], {"shortest_edge"} or {"height", "width"} for x.json: size but received Object',
    );
    const nope = path.join(tmp, 'nope.json');
    expect(() => readPreprocessorConfig(nope)).toThrow(`Cannot read the preprocessor config ${nope}: the file does not exist`);
    const bad = path.join(tmp, 'bad.json');
    fs.writeFileSync(bad, '{ size: 3');
    expect(() => readPreprocessorConfig(bad)).toThrow(new RegExp(`^Cannot read the preprocessor config ${bad}: .*JSON`));
  });
});

describe('Pillow resize port', () => {
  test('same size is a copy; NEAREST samples pixel centres', () => {
    const img: RawImage = { data: Uint8Array.from([10, 20, 30, 40]), width: 4, height: 1, channels: 1 };
    const copy = resizeImage(img, 4, 1, 'bicubic');
    expect(Array.from(copy.data)).toEqual([10, 20, 30, 40]);
    expect(copy.data).not.toBe(img.data);
    expect(Array.from(resizeImage(img, 2, 1, 'nearest').data)).toEqual([20, 40]);
  });

  test('PyTorch nearest takes pixels 0, 8, 16, ... (not the centres)', () => {
    const src = Float32Array.from({ length: 64 }, (_, i) => i);
    expect(Array.from(nearestTorch(src, 1, 64, 1, 8))).toEqual([0, 8, 16, 24, 32, 40, 48, 56]);
    expect(Array.from(nearestTorch(Float32Array.from([0, 1, 2]), 1, 3, 1, 2))).toEqual([0, 1]); // floor(1 * 1.5)
  });
});

describe('squareCropAroundBox (the crop policy)', () => {
  test('10% margin on each side of the longer bbox side, centred, inside the image', () => {
    expect(squareCropAroundBox({ left: 100, top: 200, right: 200, bottom: 250 }, 1000, 800)).toEqual({ left: 90, top: 165, size: 120, bboxFits: true });
  });
  test('shifted (not shrunk) to stay inside the image', () => {
    expect(squareCropAroundBox({ left: 0, top: 10, right: 100, bottom: 90 }, 1000, 800)).toEqual({ left: 0, top: 0, size: 120, bboxFits: true });
    expect(squareCropAroundBox({ left: 950, top: 700, right: 1000, bottom: 800 }, 1000, 800)).toEqual({ left: 880, top: 680, size: 120, bboxFits: true });
  });
  test('at least 64 px', () => {
    expect(squareCropAroundBox({ left: 500, top: 400, right: 510, bottom: 410 }, 1000, 800)).toEqual({ left: 473, top: 373, size: 64, bboxFits: true });
  });
  test('a square larger than the image becomes the largest square the image holds', () => {
    expect(squareCropAroundBox({ left: 10, top: 10, right: 150, bottom: 90 }, 200, 100)).toEqual({ left: 30, top: 0, size: 100, bboxFits: false });
    expect(squareCropAroundBox({ left: 20, top: 5, right: 80, bottom: 95 }, 200, 100)).toEqual({ left: 0, top: 0, size: 100, bboxFits: true });
  });
});

describe('loadTrainingInputs', () => {
  const face = fixture('cases', 'images', 'face64.png');
  const faceMask = fixture('cases', 'images', 'face64_mask.png');
  let golden: Record<string, any>;
  beforeAll(async () => {
    golden = (await readSafetensors(fixture('cases', 'singleinsert_losses.safetensors'))).tensors;
  });

  test("golden singleinsert_losses: crop 'none' at 64 gives input.image, mask_fullres and mask_latent exactly", async () => {
    const t = await loadTrainingInputs({ image: face, mask: faceMask, resolution: 64, crop: 'none' });
    expect(t.crop).toEqual({ left: 0, top: 0, size: 64 });
    expect(t.warnings).toEqual([]);
    expectClose('singleinsert image', tensor(t.image), golden['input.image'], 0, 0);
    expectClose('singleinsert mask', tensor(t.mask), { data: golden['input.mask_fullres'].data, shape: [1, 1, 64, 64] }, 0, 0);
    expectClose('singleinsert maskLatent', tensor(t.maskLatent), { data: golden['intermediate.mask_latent'].data.slice(0, 64), shape: [1, 1, 8, 8] }, 0, 0);
    // the interpolate-nearest rule on mask_fullres
    const m = golden['input.mask_fullres'].data as Float32Array;
    for (let y = 0; y < 8; y++) for (let x = 0; x < 8; x++) expect(t.maskLatent.data[y * 8 + x]).toBe(m[8 * y * 64 + 8 * x]);
    expect(t.encoderPixels.shape).toEqual([1, 3, 224, 224]);
    expect(Array.from(t.encoderPixels.data)).toEqual(Array.from((await clipPreprocess(face)).data));
    // a tiny encoder config (tiny-sd/image_encoder, 32 px)
    const encoderConfig = readPreprocessorConfig(fixture('tiny-sd', 'image_encoder', 'preprocessor_config.json'));
    const small = await loadTrainingInputs({ image: face, mask: faceMask, resolution: 64, crop: 'none', encoderConfig });
    expect(small.encoderPixels.shape).toEqual([1, 3, 32, 32]);
  });

  test('default crop (mask-bbox) follows squareCropAroundBox; mask stays binary after resizing', async () => {
    const t = await loadTrainingInputs({ image: face, mask: faceMask, resolution: 128 });
    // the face64 ellipse's bbox fits a >= 64 px square only as the whole image
    expect(t.crop).toEqual({ left: 0, top: 0, size: 64 });
    expect(t.image.shape).toEqual([1, 3, 128, 128]);
    expect(t.mask.shape).toEqual([1, 1, 128, 128]);
    expect(t.maskLatent.shape).toEqual([1, 1, 16, 16]);
    expect(new Set(t.mask.data)).toEqual(new Set([0, 1]));
    expect(t.preview.width).toBe(128);
    let lo = Infinity, hi = -Infinity;
    for (const v of t.image.data) { lo = Math.min(lo, v); hi = Math.max(hi, v); }
    expect(lo).toBeGreaterThanOrEqual(-1);
    expect(hi).toBeLessThanOrEqual(1);
  });

  test('the bundled example (assets/example) crops around the figure', async () => {
    const dir = path.join(root, 'assets', 'example');
    const bytes = fs.statSync(path.join(dir, 'face.png')).size + fs.statSync(path.join(dir, 'face_mask.png')).size;
    expect(bytes).toBeLessThan(100 * 1024);
    const mask = await sharp(path.join(dir, 'face_mask.png')).metadata();
    expect([mask.width, mask.height, mask.channels]).toEqual([256, 256, 1]);
    const t = await loadTrainingInputs({ image: path.join(dir, 'face.png'), mask: path.join(dir, 'face_mask.png') });
    // eslint-disable-next-line no-console
    console.log(`example crop ${JSON.stringify(t.crop)}, warnings ${JSON.stringify(t.warnings)}`);
    expect(t.warnings).toEqual([]);
    expect(t.image.shape).toEqual([1, 3, 512, 512]);
    expect(t.crop.size).toBeGreaterThanOrEqual(200);
  });

  test('make-example.mjs reproduces the bundled files byte for byte', () => {
    execFileSync(process.execPath, [path.join(root, 'scripts', 'make-example.mjs'), '--check'], { stdio: 'pipe' });
  });

  test('an alpha channel is the mask when no mask is given', async () => {
    const rgb = await sharp(face).raw().toBuffer();
    const m = await sharp(faceMask).toColourspace('b-w').raw().toBuffer();
    const rgba = Buffer.alloc(64 * 64 * 4);
    for (let i = 0; i < 64 * 64; i++) {
      rgb.copy(rgba, i * 4, i * 3, i * 3 + 3);
      rgba[i * 4 + 3] = m[i];
    }
    const file = path.join(tmp, 'face_rgba.png');
    await sharp(rgba, { raw: { width: 64, height: 64, channels: 4 } }).png().toFile(file);
    const fromAlpha = await loadTrainingInputs({ image: file, resolution: 64, crop: 'none' });
    const explicit = await loadTrainingInputs({ image: face, mask: faceMask, resolution: 64, crop: 'none' });
    expect(fromAlpha.image.data).toEqual(explicit.image.data); // alpha dropped, RGB kept
    expect(fromAlpha.mask.data).toEqual(explicit.mask.data);
    expect(fromAlpha.maskLatent.data).toEqual(explicit.maskLatent.data);
  });

  test('EXIF orientation 6 is applied before cropping (JPEG)', async () => {
    // stored 96 wide x 64 tall: left half red, right half blue; orientation 6 = rotate 90 degrees clockwise
    const raw = Buffer.alloc(96 * 64 * 3);
    for (let y = 0; y < 64; y++) for (let x = 0; x < 96; x++) raw.set(x < 48 ? [220, 20, 20] : [20, 20, 220], (y * 96 + x) * 3);
    const jpg = await sharp(raw, { raw: { width: 96, height: 64, channels: 3 } }).jpeg({ quality: 95 }).withMetadata({ orientation: 6 }).toBuffer();
    expect((await sharp(jpg).metadata()).orientation).toBe(6);
    const decoded = await decodeImage(jpg);
    expect([decoded.rgb.width, decoded.rgb.height]).toEqual([64, 96]);
    // after a clockwise turn the stored left half (red) is the top half
    const at = (x: number, y: number) => Array.from(decoded.rgb.data.slice((y * 64 + x) * 3, (y * 64 + x) * 3 + 3));
    expect(at(32, 10)[0]).toBeGreaterThan(180);
    expect(at(32, 85)[2]).toBeGreaterThan(180);
    // a mask drawn on the upright (64x96) image: the bottom 40 rows
    const mask = Buffer.alloc(64 * 96);
    mask.fill(255, 56 * 64);
    const maskPng = await sharp(mask, { raw: { width: 64, height: 96, channels: 1 } }).toColourspace('b-w').png().toBuffer();
    const t = await loadTrainingInputs({ image: jpg, mask: maskPng, resolution: 64 });
    expect(t.crop).toEqual({ left: 0, top: 32, size: 64 });
    // crop rows 0-15 are upright rows 32-47 (red), rows 16-63 the blue half (a few rows of JPEG ringing left out)
    const redMinusBlue = (row: number) => t.image.data[row * 64 + 32] - t.image.data[2 * 4096 + row * 64 + 32];
    for (let row = 0; row < 13; row++) expect(redMinusBlue(row)).toBeGreaterThan(1);
    for (let row = 19; row < 64; row++) expect(redMinusBlue(row)).toBeLessThan(-1);
  });

  test('16-bit PNG and grayscale inputs become 8-bit RGB', async () => {
    const rgb = await sharp(face).raw().toBuffer();
    const u16 = new Uint16Array(rgb.length);
    for (let i = 0; i < rgb.length; i++) u16[i] = rgb[i] * 257;
    const file16 = path.join(tmp, 'face16.png');
    await sharp(u16, { raw: { width: 64, height: 64, channels: 3 } }).toColourspace('rgb16').png().toFile(file16);
    expect((await sharp(file16).metadata()).depth).toBe('ushort');
    const t16 = await loadTrainingInputs({ image: file16, mask: faceMask, resolution: 64, crop: 'none' });
    expectClose('16-bit png image', tensor(t16.image), golden['input.image'], 0, 0);

    const gray = Buffer.alloc(64 * 64);
    for (let i = 0; i < gray.length; i++) gray[i] = rgb[i * 3 + 1];
    const fileGray = path.join(tmp, 'face_gray.png');
    await sharp(gray, { raw: { width: 64, height: 64, channels: 1 } }).toColourspace('b-w').png().toFile(fileGray);
    expect((await sharp(fileGray).metadata()).channels).toBe(1);
    const tg = await loadTrainingInputs({ image: fileGray, mask: faceMask, resolution: 64, crop: 'none' });
    for (let i = 0; i < 4096; i++) {
      const expected = Math.fround(Math.fround(Math.fround(gray[i] / 255) * 2) - 1);
      expect([tg.image.data[i], tg.image.data[4096 + i], tg.image.data[8192 + i]]).toEqual([expected, expected, expected]);
    }
  });

  test('a mask of the same aspect ratio but another size is resized; softMask keeps gray levels', async () => {
    const half = await sharp(faceMask).resize(32, 32, { kernel: 'nearest' }).png().toBuffer();
    const t = await loadTrainingInputs({ image: face, mask: half, resolution: 64, crop: 'none' });
    expect(new Set(t.mask.data)).toEqual(new Set([0, 1]));
    const blurred = await sharp(faceMask).blur(3).png().toBuffer();
    const soft = await loadTrainingInputs({ image: face, mask: blurred, resolution: 64, crop: 'none', softMask: true });
    const levels = new Set(soft.mask.data);
    expect(levels.size).toBeGreaterThan(10);
    for (const v of levels) expect(v >= 0 && v <= 1).toBe(true);
  });

  test('a mask covering >= 99% is a warning, not an error', async () => {
    const white = await sharp({ create: { width: 64, height: 64, channels: 3, background: '#ffffff' } }).png().toBuffer();
    const t = await loadTrainingInputs({ image: face, mask: white, resolution: 64 });
    expect(t.warnings).toEqual(['the mask (mask buffer) covers 100.0% of the image (>= 99%): there is almost no background for the background loss']);
    const small = await sharp({ create: { width: 64, height: 64, channels: 3, background: '#000000' } })
      .composite([{ input: { create: { width: 8, height: 8, channels: 3, background: '#ffffff' } }, left: 28, top: 28 }])
      .png()
      .toBuffer();
    const t2 = await loadTrainingInputs({ image: face, mask: small, resolution: 512 });
    expect(t2.warnings).toEqual(['the 64x64 crop is upscaled more than 4x to 512x512']);
  });

  describe('errors', () => {
    const blank = (w: number, h: number, colour = '#000000') => sharp({ create: { width: w, height: h, channels: 3, background: colour } }).png().toBuffer();

    test('missing or unreadable image and mask, named', async () => {
      const missing = path.join(tmp, 'missing.png');
      await expect(loadTrainingInputs({ image: missing, mask: faceMask })).rejects.toThrow(`Cannot read the image ${missing}: the file does not exist`);
      await expect(loadTrainingInputs({ image: face, mask: missing })).rejects.toThrow(`Cannot read the mask ${missing}: the file does not exist`);
      const text = path.join(tmp, 'not-an-image.png');
      fs.writeFileSync(text, 'hello');
      await expect(loadTrainingInputs({ image: text, mask: faceMask })).rejects.toThrow(`Cannot read the image ${text}: Input file contains unsupported image format`);
      await expect(loadTrainingInputs({ image: Buffer.from('hello'), mask: faceMask })).rejects.toThrow(
        'Cannot read the image (image buffer): Input buffer contains unsupported image format',
      );
      await expect(loadTrainingInputs({ image: face, mask: text })).rejects.toMatchObject({ name: 'SingleInsertError' });
    });

    test('mask aspect ratio differs from the image', async () => {
      await expect(loadTrainingInputs({ image: face, mask: await blank(64, 32, '#ffffff') })).rejects.toThrow(
        `The mask (mask buffer) is 64x32 but the image ${face} is 64x64: their aspect ratios differ`,
      );
    });

    test('empty mask', async () => {
      const file = path.join(tmp, 'empty_mask.png');
      fs.writeFileSync(file, await blank(64, 64, '#7f7f7f'));
      await expect(loadTrainingInputs({ image: face, mask: file })).rejects.toThrow(`the mask ${file} has no foreground pixel (> 127)`);
    });

    test('image smaller than 64 px on a side', async () => {
      await expect(loadTrainingInputs({ image: fixture('cases/images/portrait_45x70.png') })).rejects.toThrow(
        `The image ${fixture('cases/images/portrait_45x70.png')} is 45x70 pixels; it needs at least 64 pixels on each side`,
      );
    });

    test('no mask and no alpha channel (or an opaque one)', async () => {
      await expect(loadTrainingInputs({ image: face })).rejects.toThrow(
        `No mask was given and the image ${face} cannot serve as one (it has no alpha channel): pass a mask (white = the concept) or an image with a transparent background`,
      );
      const opaque = await sharp({ create: { width: 64, height: 64, channels: 4, background: { r: 1, g: 2, b: 3, alpha: 1 } } }).png().toBuffer();
      await expect(loadTrainingInputs({ image: opaque })).rejects.toThrow(
        'No mask was given and the image (image buffer) cannot serve as one (its alpha channel is fully opaque): pass a mask (white = the concept) or an image with a transparent background',
      );
    });

    test("crop 'none' on a non-square image", async () => {
      await expect(loadTrainingInputs({ image: await blank(96, 64), mask: await blank(96, 64, '#ffffff'), crop: 'none' })).rejects.toThrow(
        "crop 'none' needs a square image but the image (image buffer) is 96x64; use crop 'mask-bbox' (the default)",
      );
    });

    test('options', async () => {
      for (const resolution of [500, 0, -64, 64.5, '512']) {
        await expect(loadTrainingInputs({ image: face, mask: faceMask, resolution: resolution as number })).rejects.toThrow(
          `Expected a positive multiple of 64 for resolution but received ${typeof resolution === 'string' ? '"512"' : resolution}`,
        );
      }
      await expect(loadTrainingInputs({ image: face, mask: faceMask, crop: 'center' as any })).rejects.toThrow(`Expected 'mask-bbox' or 'none' for crop but received "center"`);
      await expect(loadTrainingInputs({ image: face, mask: faceMask, softMask: 1 as any })).rejects.toThrow('Expected a boolean for softMask but received 1');
      await expect(loadTrainingInputs({ image: 42 as any })).rejects.toThrow(
        'Expected a file path, a Buffer or a raw image { data, width, height, channels } for image but received 42',
      );
      await expect(loadTrainingInputs({ image: { data: new Uint8Array(5), width: 2, height: 2, channels: 3 } })).rejects.toThrow(
        'Expected 12 bytes for image.data (2x2x3) but received 5',
      );
    });
  });
});
