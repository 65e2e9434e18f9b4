/**
 * The cross-attention recorder (native/attention.h AttentionRecorder, lib/generate.ts
 * `recordAttention`): the evaluation's default masks. On the tiny model: the maps are finite,
 * non-negative, at the latent size, one per image, they add up to what the recording rule says,
 * and recording does not change the generated images.
 */
import { generate, GenerateOptions } from '../lib/generate';
import { loadPipeline, Pipeline } from '../lib/models';
import { classTokenIndex } from '../lib/eval/grid';
import { fixture } from './helpers/fixtures';

jest.setTimeout(120000);

let pipeline: Pipeline;
beforeAll(async () => {
  pipeline = await loadPipeline(fixture('tiny-sd'));
});
afterAll(() => pipeline?.dispose());

const small = (extra: Partial<GenerateOptions> = {}): GenerateOptions => ({
  prompt: ['a photo of * face', 'a * face wearing sunglasses'],
  steps: 3,
  width: 64,
  height: 48,
  scheduler: 'ddim',
  seed: 7,
  numImages: 2,
  ...extra,
});

// tiny UNet: 2 CrossAttnDownBlock2D + mid + 2 CrossAttnUpBlock2D, one transformer per resnet:
// 2*2 down + 1 mid + 3*2 up = 11 cross-attention layers per UNet call
const CROSS_ATTENTION_LAYERS = 11;

describe('recordAttention', () => {
  test.each([
    ['with classifier-free guidance', 7.5],
    ['without guidance (guidance 1)', 1],
  ])('%s: maps are finite, non-negative, [B, H/8, W/8]; images unchanged', async (_name, guidance) => {
    const plain = await generate(pipeline, small({ guidance }));
    const recorded = await generate(pipeline, small({ guidance, recordAttention: { tokenIndex: [5, 3] } }));
    expect(plain.attentionMaps).toBeUndefined();
    const maps = recorded.attentionMaps!;
    expect(maps.dtype).toBe('F32');
    expect(maps.shape).toEqual([4, 6, 8]);
    const data = maps.data as Float32Array;
    expect(Array.from(data).every((v) => Number.isFinite(v) && v >= 0)).toBe(true);
    // each layer adds softmax probabilities (<= 1 per position): 11 layers x 3 calls bound every value
    expect(Math.max(...data)).toBeLessThanOrEqual(CROSS_ATTENTION_LAYERS * 3 + 1e-4);
    expect(Math.max(...data)).toBeGreaterThan(0);
    // the recording leaves the images bit-identical
    recorded.images.forEach((im, i) => expect(Buffer.from(im.float.buffer).equals(Buffer.from(plain.images[i].float.buffer))).toBe(true));
    // images of one prompt share the token index but not the map (different noise)
    const plane = 6 * 8;
    expect(Array.from(data.subarray(0, plane))).not.toEqual(Array.from(data.subarray(plane, 2 * plane)));
  });

  test('one token index for every prompt, and the mean over tokens sums to one per layer and call', async () => {
    // the probabilities of one query over all 77 keys sum to 1; summed over the 77 recorded maps that
    // makes exactly layers x calls at every latent position (upsampling keeps constants constant)
    const total = new Float32Array(6 * 8);
    for (let t = 0; t < 77; t++) {
      const r = await generate(pipeline, small({ prompt: 'a * face', numImages: 1, steps: 1, guidance: 1, recordAttention: { tokenIndex: t } }));
      const d = r.attentionMaps!.data as Float32Array;
      d.forEach((v, i) => (total[i] += v));
    }
    for (const v of total) expect(v).toBeCloseTo(CROSS_ATTENTION_LAYERS * 1, 3);
  });

  test('invalid token indices are refused before any native work', async () => {
    await expect(generate(pipeline, small({ recordAttention: { tokenIndex: 77 } }))).rejects.toThrow(
      'Expected an integer between 0 and 76, or an array of 2 of them (one per prompt) for recordAttention.tokenIndex but received 77',
    );
    await expect(generate(pipeline, small({ recordAttention: { tokenIndex: [1] } }))).rejects.toThrow(/for recordAttention\.tokenIndex but received array of length 1/);
  });

  test('classTokenIndex finds the class word (its last token) after the placeholder', () => {
    const tok = pipeline.tokenizer;
    // BOS a photo of * face -> face is id position 5
    expect(classTokenIndex(tok, 'a photo of * face', 'face', '*')).toBe(5);
    expect(classTokenIndex(tok, 'a * teddy bear on the beach', 'teddy bear', '*')).toBe(4);
    // no class word: the placeholder's position
    expect(classTokenIndex(tok, 'an oil painting of *', 'cat', '*')).toBe(5);
  });
});
