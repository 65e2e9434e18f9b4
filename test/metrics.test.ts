/**
 * The metric definitions (lib/eval/metrics.ts) on constructed inputs, with the tiny models:
 * identical images score CLIP-I/DINO 1 and LPIPS 0; the same foreground on other backgrounds keeps
 * the foreground scores at 1 and lowers the background ones; DIV of identical images is 0; the ESR
 * rule; masks from attention maps; prompt handling and presets.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import {
  attentionMask,
  binaryMask,
  composite,
  cosine,
  diversity,
  editSucceeded,
  editSuccessRate,
  GREY,
  Mask,
  mean,
  pairs,
  resizeBilinear,
  RgbImage,
  scoringPrompt,
} from '../lib/eval/metrics';
import { findMask, imagesFromPromptsFile, readPromptsFile } from '../lib/eval/inputs';
import { matchEdit, readPresets } from '../lib/presets';
import { ClipScorer, DinoScorer, LpipsScorer } from '../lib/eval/scorers';
import { fixture } from './helpers/fixtures';

jest.setTimeout(120000);

/** A deterministic test picture: a coloured disc (the "concept") on a background pattern. */
function picture(width: number, height: number, background: (x: number, y: number) => [number, number, number], seed = 1): { image: RgbImage; mask: Mask } {
  const data = new Uint8Array(width * height * 3);
  const m = new Uint8Array(width * height);
  const cx = width / 2, cy = height / 2, r = Math.min(width, height) * 0.3;
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) {
      const i = y * width + x;
      const inside = (x - cx) ** 2 + (y - cy) ** 2 < r * r;
      m[i] = inside ? 1 : 0;
      const c: [number, number, number] = inside ? [200 + ((x * seed) % 40), 60 + ((y * 7) % 50), 40] : background(x, y);
      data.set(c, 3 * i);
    }
  }
  return { image: { data, width, height }, mask: { data: m, width, height } };
}
const stripes = (x: number, y: number): [number, number, number] => (((x >> 2) + (y >> 3)) % 2 ? [20, 120, 220] : [240, 240, 230]);
const gradient = (x: number, y: number): [number, number, number] => [x * 3, 255 - y * 3, (x * y) % 256];
const checker = (x: number, y: number): [number, number, number] => (((x >> 3) + (y >> 3)) % 2 ? [10, 10, 10] : [90, 200, 90]);

let clip: ClipScorer;
let dino: DinoScorer;
let lpips: LpipsScorer;
beforeAll(async () => {
  clip = await ClipScorer.load(fixture('tiny-clip'));
  dino = await DinoScorer.load(fixture('tiny-sd', 'dino'));
  lpips = await LpipsScorer.load(fixture('lpips'));
});
afterAll(() => {
  clip?.dispose();
  dino?.dispose();
  lpips?.dispose();
});

describe('views and cosine', () => {
  test('composite keeps one half and greys the other', () => {
    const { image, mask } = picture(8, 8, stripes);
    const fg = composite(image, mask, 'foreground');
    const bg = composite(image, mask, 'background');
    for (let i = 0; i < 64; i++) {
      const keepFg = mask.data[i] === 1;
      expect(Array.from(fg.data.subarray(3 * i, 3 * i + 3))).toEqual(keepFg ? Array.from(image.data.subarray(3 * i, 3 * i + 3)) : [GREY, GREY, GREY]);
      expect(Array.from(bg.data.subarray(3 * i, 3 * i + 3))).toEqual(keepFg ? [GREY, GREY, GREY] : Array.from(image.data.subarray(3 * i, 3 * i + 3)));
    }
    expect(() => composite(image, { data: new Uint8Array(4), width: 2, height: 2 }, 'foreground')).toThrow('mask is 2x2 but the image is 8x8');
  });

  test('cosine, mean, pairs, binaryMask', () => {
    expect(cosine([1, 0], [0, 1])).toBe(0);
    expect(cosine([1, 2, 3], [2, 4, 6])).toBeCloseTo(1, 12);
    expect(cosine([1, 0], [-1, 0])).toBe(-1);
    expect(cosine([0, 0], [1, 1])).toBe(0);
    expect(mean([1, null, 3, undefined, NaN])).toBe(2);
    expect(mean([])).toBeNull();
    expect(pairs(3)).toEqual([[0, 1], [0, 2], [1, 2]]);
    expect(Array.from(binaryMask(Uint8Array.from([0, 127, 128, 255]), 2, 2).data)).toEqual([0, 0, 1, 1]);
  });
});

describe('CLIP-I / DINO / LPIPS on constructed images', () => {
  test('identical images: CLIP-I 1, DINO 1, LPIPS 0 (foreground and background views alike)', async () => {
    const { image, mask } = picture(40, 40, stripes);
    const views = [composite(image, mask, 'foreground'), composite(image, mask, 'background'), image];
    const a = await clip.imageEmbeddings(views);
    const b = await clip.imageEmbeddings(views.map((v) => ({ ...v, data: v.data.slice() })));
    a.forEach((e, i) => expect(cosine(e, b[i])).toBeCloseTo(1, 6));
    const da = await dino.embeddings(views);
    const db = await dino.embeddings(views);
    da.forEach((e, i) => expect(cosine(e, db[i])).toBeCloseTo(1, 6));
    const d = await lpips.distances([[image, image], [views[0], views[0]]]);
    expect(d).toEqual([0, 0]);
  });

  test('same foreground, different backgrounds: f stays 1, b drops below it', async () => {
    const src = picture(48, 48, stripes);
    const others = [picture(48, 48, gradient), picture(48, 48, checker)];
    const [srcF, srcB] = await clip.imageEmbeddings([composite(src.image, src.mask, 'foreground'), composite(src.image, src.mask, 'background')]);
    const fg = await clip.imageEmbeddings(others.map((o) => composite(o.image, o.mask, 'foreground')));
    const bg = await clip.imageEmbeddings(others.map((o) => composite(o.image, o.mask, 'background')));
    const [dSrcF, dSrcB] = await dino.embeddings([composite(src.image, src.mask, 'foreground'), composite(src.image, src.mask, 'background')]);
    const dFg = await dino.embeddings(others.map((o) => composite(o.image, o.mask, 'foreground')));
    const dBg = await dino.embeddings(others.map((o) => composite(o.image, o.mask, 'background')));
    for (let k = 0; k < others.length; k++) {
      const f = cosine(srcF, fg[k]), b = cosine(srcB, bg[k]);
      const df = cosine(dSrcF, dFg[k]), db = cosine(dSrcB, dBg[k]);
      console.log(`background ${k}: CLIP-I-f ${f.toFixed(4)} CLIP-I-b ${b.toFixed(4)}  DINO-f ${df.toFixed(4)} DINO-b ${db.toFixed(4)}`);
      // the foreground views are pixel-identical: similarity 1 up to float error
      expect(f).toBeCloseTo(1, 5);
      expect(df).toBeCloseTo(1, 5);
      expect(b).toBeLessThan(f - 1e-3);
      expect(db).toBeLessThan(df - 1e-3);
    }
  });

  test('DIV: identical images give 0, different images more', async () => {
    const { image } = picture(64, 64, stripes);
    const same = [image, image, image, image];
    const d = await lpips.distances(pairs(same.length).map(([i, j]) => [same[i], same[j]]));
    expect(d).toHaveLength(6);
    expect(diversity(d)).toBe(0);
    const mixed = [picture(64, 64, stripes).image, picture(64, 64, gradient).image, picture(64, 64, checker).image];
    expect(diversity(await lpips.distances(pairs(3).map(([i, j]) => [mixed[i], mixed[j]])))).toBeGreaterThan(0);
    expect(diversity([])).toBeNull();
  });

  test('LPIPS resizes the second image of a pair to the first one\'s size', async () => {
    const a = picture(64, 64, stripes).image;
    const b = picture(32, 32, stripes).image;
    const [d] = await lpips.distances([[a, b]]);
    expect(Number.isFinite(d) && d >= 0).toBe(true);
  });
});

describe('ESR', () => {
  test('the rule: every target must prefer the prompt with it', () => {
    expect(editSucceeded([{ target: 'sunglasses', with: 0.31, without: 0.29 }])).toBe(true);
    expect(editSucceeded([{ target: 'sunglasses', with: 0.29, without: 0.29 }])).toBe(false);
    expect(editSucceeded([{ target: 'hat', with: 0.3, without: 0.2 }, { target: 'sunglasses', with: 0.25, without: 0.26 }])).toBe(false);
    expect(editSucceeded([{ target: 'hat', with: 0.3, without: 0.2 }, { target: 'sunglasses', with: 0.27, without: 0.26 }])).toBe(true);
    expect(editSucceeded([])).toBe(false);
    expect(editSuccessRate([true, false, true, true])).toBe(0.75);
    expect(editSuccessRate([])).toBeNull();
  });

  test('with tiny CLIP: the verdict follows the cosines of the image with each text', async () => {
    const { image } = picture(40, 40, gradient);
    const [img] = await clip.imageEmbeddings([image]);
    const texts = ['a face wearing sunglasses', 'a face', 'a face on the beach'];
    const [withT, withoutT, other] = (await clip.textEmbeddings(texts)).map((t) => cosine(img, t));
    const verdict = editSucceeded([{ target: 'sunglasses', with: withT, without: withoutT }]);
    expect(verdict).toBe(withT > withoutT);
    // swapping the roles flips it (the texts differ, so the cosines differ)
    expect(withT).not.toBe(withoutT);
    expect(editSucceeded([{ target: 'x', with: withoutT, without: withT }])).toBe(!verdict);
    expect(Number.isFinite(other)).toBe(true);
  });

  test('CLIP image embeddings and DINO CLS tokens from PNG files match the goldens (clip_model, dino_vit)', async () => {
    const { readSafetensors } = await import('../lib/safetensors');
    const { decodeImage } = await import('../lib/image');
    const load = async (f: string) => {
      const { rgb } = await decodeImage(fixture('cases', 'images', f));
      return { data: rgb.data as Uint8Array, width: rgb.width, height: rgb.height };
    };
    const compare = (label: string, got: Float32Array[], ref: Float32Array) => {
      const d = got[0].length;
      let worst = 0;
      got.forEach((e, i) => e.forEach((v, k) => (worst = Math.max(worst, Math.abs(v - ref[i * d + k])))));
      console.log(`${label}: max abs ${worst.toExponential(2)}`);
      expect(worst).toBeLessThan(1e-4);
    };
    const clipCase = (await readSafetensors(fixture('cases', 'clip_model.safetensors'))).tensors;
    compare('CLIP image_embeds vs golden', await clip.imageEmbeddings(await Promise.all(['clip0_48x40.png', 'clip1_32x32.png', 'clip2_64x30.png'].map(load))), clipCase['output.image_embeds'].data as Float32Array);
    const dinoCase = (await readSafetensors(fixture('cases', 'dino_vit.safetensors'))).tensors;
    compare('DINO cls vs golden', await dino.embeddings(await Promise.all(['landscape_80x56.png', 'portrait_45x70.png'].map(load))), dinoCase['output.cls'].data as Float32Array);
  });

  test('CLIP text embeddings are those of CLIPModel (golden clip_model texts)', async () => {
    const golden = JSON.parse(fs.readFileSync(fixture('cases', 'clip_model.json'), 'utf8'));
    const { readSafetensors } = await import('../lib/safetensors');
    const { tensors } = await readSafetensors(fixture('cases', 'clip_model.safetensors'));
    const emb = await clip.textEmbeddings(golden.call.texts);
    const ref = tensors['output.text_embeds'].data as Float32Array;
    const P = emb[0].length;
    let worst = 0;
    emb.forEach((e, i) => e.forEach((v, k) => (worst = Math.max(worst, Math.abs(v - ref[i * P + k])))));
    console.log(`text_embeds vs golden: max abs ${worst.toExponential(2)}`);
    expect(worst).toBeLessThan(1e-4);
  });
});

describe('attention masks', () => {
  test('normalised to [0, 1], upsampled, >= 0.5 is foreground', () => {
    // 2x2 map: one hot cell -> the upsampled quarter around it
    const { mask, degenerate } = attentionMask(Float32Array.from([0, 0, 0, 4]), 2, 2, 8, 8);
    expect(degenerate).toBe(false);
    const rows = Array.from({ length: 8 }, (_, y) => Array.from(mask.data.subarray(y * 8, y * 8 + 8)).join(''));
    // bilinear weights of the hot cell along each axis: 0, 0, .125, .375, .625, .875, 1, 1; foreground where wx * wy >= 0.5
    expect(rows).toEqual(['00000000', '00000000', '00000000', '00000000', '00000111', '00001111', '00001111', '00001111']);
    // scale and offset do not matter
    expect(Array.from(attentionMask(Float32Array.from([10, 10, 10, 50]), 2, 2, 8, 8).mask.data)).toEqual(Array.from(mask.data));
  });

  test('a constant map is degenerate: all foreground', () => {
    const r = attentionMask(new Float32Array(4).fill(3), 2, 2, 4, 4);
    expect(r.degenerate).toBe(true);
    expect(Array.from(r.mask.data)).toEqual(new Array(16).fill(1));
  });

  test('bilinear resize matches torch (align_corners=False): corners clamp, centres interpolate', () => {
    // torch.nn.functional.interpolate(tensor([[0., 1.]]), size=4, mode='linear') -> [0, 0.25, 0.75, 1]
    expect(Array.from(resizeBilinear(Float32Array.from([0, 1]), 1, 2, 1, 4))).toEqual([0, 0.25, 0.75, 1]);
    expect(Array.from(resizeBilinear(Float32Array.from([0, 1, 2, 3]), 2, 2, 2, 2))).toEqual([0, 1, 2, 3]);
  });
});

describe('prompts, presets, prompt files', () => {
  test('scoringPrompt: "<placeholder> <class>" becomes the class word', () => {
    expect(scoringPrompt('a * face wearing sunglasses', 'face', '*')).toBe('a face wearing sunglasses');
    expect(scoringPrompt('an oil painting of *', 'cat', '*')).toBe('an oil painting of cat');
    expect(scoringPrompt('a photo of <sks>  dog', 'dog', '<sks>')).toBe('a photo of dog');
    expect(scoringPrompt('a  face ', 'face', '')).toBe('a face');
  });

  test('assets/presets.json: ten edits with one or two targets and explicit without prompts; eight views', () => {
    const p = readPresets();
    expect(p.edits).toHaveLength(10);
    for (const e of p.edits) {
      expect(e.targets.length).toBeGreaterThanOrEqual(1);
      expect(e.targets.length).toBeLessThanOrEqual(2);
      expect(e.without).toHaveLength(e.targets.length);
      e.targets.forEach((t, i) => {
        expect(e.template).toContain(t);
        expect(e.without[i]).not.toContain(t);
      });
    }
    expect(p.views.map((v) => v.name)).toEqual(['front', 'three-quarter', 'side', 'back', 'from-above', 'from-below', 'close-up', 'full-body']);
    expect(matchEdit('a * face wearing sunglasses', p, 'face', '*')?.targets).toEqual(['sunglasses']);
    expect(matchEdit('A face  wearing sunglasses', p, 'face', '*')?.targets).toEqual(['sunglasses']);
    expect(matchEdit('a * face wearing a hat and sunglasses', p, 'face', '*')?.targets).toEqual(['hat', 'sunglasses']);
    expect(matchEdit('a * face', p, 'face', '*')).toBeNull();
  });

  test('a presets file that lacks without prompts is refused', () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'si-presets-'));
    const f = path.join(dir, 'p.json');
    fs.writeFileSync(f, JSON.stringify({ edits: [{ template: 'a {placeholder} {class} with a hat', targets: ['hat'] }], views: [] }));
    expect(() => readPresets(f)).toThrow(`${f}: expected edits[0].without to hold one template per target (1) but found undefined`);
    fs.rmSync(dir, { recursive: true });
  });

  test('prompt files: text lines (tab or " | "), file -> prompt JSON, detailed JSON; masks found by name', () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'si-prompts-'));
    for (const f of ['a.png', 'b.png', 'c.png']) fs.writeFileSync(path.join(dir, f), '');
    fs.mkdirSync(path.join(dir, 'masks'));
    fs.writeFileSync(path.join(dir, 'masks', 'a_mask.png'), '');
    fs.writeFileSync(path.join(dir, 'masks', 'b.png'), '');
    const txt = path.join(dir, 'p.txt');
    fs.writeFileSync(txt, '# comment\na.png\ta * face wearing sunglasses\n\nb.png | a * face\n');
    expect(readPromptsFile(txt).entries).toEqual([
      { file: 'a.png', prompt: 'a * face wearing sunglasses' },
      { file: 'b.png', prompt: 'a * face' },
    ]);
    const obj = path.join(dir, 'p.json');
    fs.writeFileSync(obj, JSON.stringify({ 'a.png': 'x', 'b.png': 'y' }));
    expect(readPromptsFile(obj).entries).toEqual([{ file: 'a.png', prompt: 'x' }, { file: 'b.png', prompt: 'y' }]);
    const detailed = path.join(dir, 'd.json');
    fs.writeFileSync(detailed, JSON.stringify({ class: 'face', images: [{ file: 'c.png', prompt: 'a * face in a hat', seed: 3, targets: ['hat'], without: ['a * face'] }] }));
    const d = readPromptsFile(detailed);
    expect(d.classWord).toBe('face');
    expect(d.entries[0]).toEqual({ file: 'c.png', prompt: 'a * face in a hat', seed: 3, targets: ['hat'], without: ['a * face'] });
    expect(findMask(path.join(dir, 'masks'), path.join(dir, 'a.png'))).toBe(path.join(dir, 'masks', 'a_mask.png'));
    expect(findMask(path.join(dir, 'masks'), path.join(dir, 'b.png'))).toBe(path.join(dir, 'masks', 'b.png'));
    expect(findMask(path.join(dir, 'masks'), path.join(dir, 'c.png'))).toBeNull();

    const notes: string[] = [];
    const specs = imagesFromPromptsFile(dir, readPromptsFile(txt), { masksDir: path.join(dir, 'masks'), presets: readPresets(), classWord: 'face', placeholder: '*' }, notes);
    expect(specs.map((s) => [path.basename(s.file), s.maskFile && path.basename(s.maskFile), s.edit?.targets])).toEqual([
      ['a.png', 'a_mask.png', ['sunglasses']],
      ['b.png', 'b.png', undefined],
    ]);
    expect(specs[0].edit!.without).toEqual(['a * face']);
    expect(notes).toEqual(['1 image(s) in ' + dir + ' are not in the prompts file and were not scored (c.png)']);

    const bad = path.join(dir, 'bad.txt');
    fs.writeFileSync(bad, 'a.png a prompt without separator\n');
    expect(() => readPromptsFile(bad)).toThrow(`${bad} line 1: expected "<file><TAB><prompt>" or "<file> | <prompt>"`);
    fs.writeFileSync(bad, 'missing.png\tx\n');
    expect(() => imagesFromPromptsFile(dir, readPromptsFile(bad), { presets: readPresets(), classWord: 'face', placeholder: '*' }, [])).toThrow(/lists missing\.png, but .* does not exist/);
    fs.rmSync(dir, { recursive: true });
  });
});
