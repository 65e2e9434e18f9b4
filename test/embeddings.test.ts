// Textual-inversion embeddings from other tools (A1111, diffusers) and our own, single- and
// multi-vector, and the tokenizer's multi-position placeholders they need.
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { loadEmbedding } from '../lib/embeddings';
import { SingleInsertError } from '../lib/errors';
import { generate } from '../lib/generate';
import { loadPipeline, Pipeline } from '../lib/models';
import { writeSafetensors } from '../lib/safetensors';
import { ClipTokenizer } from '../lib/tokenizer';
import { fixture } from './helpers/fixtures';

const HIDDEN = 32;
const STAR_ID = 265;

let tmp: string;
beforeAll(() => {
  tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'si-embeddings-'));
});
afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }));

const ramp = (n: number, offset = 0) => Float32Array.from({ length: n }, (_, i) => offset + i / 100);

/** float -> IEEE half bits (values here are exactly representable). */
function toHalf(x: number): number {
  const f = new Float32Array([x]);
  const u = new Uint32Array(f.buffer)[0];
  const sign = (u >>> 16) & 0x8000;
  const exp = ((u >>> 23) & 0xff) - 127 + 15;
  const frac = (u >>> 13) & 0x3ff;
  if (x === 0) return sign;
  return sign | (exp << 10) | frac;
}

async function write(name: string, tensors: Parameters<typeof writeSafetensors>[1], metadata: Record<string, string> = {}): Promise<string> {
  const file = path.join(tmp, name);
  await writeSafetensors(file, tensors, metadata);
  return file;
}

describe('loadEmbedding', () => {
  test('A1111 emb_params [N, hidden] (multi-vector) and [hidden]', async () => {
    const file = await write('my-style.safetensors', { emb_params: { dtype: 'F32', shape: [3, HIDDEN], data: ramp(3 * HIDDEN) } }, { name: 'my-style' });
    const e = await loadEmbedding(file, { hiddenSize: HIDDEN });
    expect(e).toMatchObject({ file, format: 'a1111', key: 'emb_params', numVectors: 3, hiddenSize: HIDDEN, suggestedPlaceholder: 'my-style', metadata: { name: 'my-style' } });
    expect(e.vectors.shape).toEqual([3, HIDDEN]);
    expect(Array.from(e.vectors.data)).toEqual(Array.from(ramp(3 * HIDDEN)));
    const one = await loadEmbedding(await write('flat.safetensors', { emb_params: { dtype: 'F32', shape: [HIDDEN], data: ramp(HIDDEN) } }));
    expect(one.vectors.shape).toEqual([1, HIDDEN]);
    expect(one.numVectors).toBe(1);
  });

  test('A1111 string_to_param.* flattened into safetensors (other keys ignored)', async () => {
    const file = await write('stp.safetensors', {
      'string_to_param.*': { dtype: 'F32', shape: [2, HIDDEN], data: ramp(2 * HIDDEN, 1) },
      'string_to_token.*': { dtype: 'I64', shape: [], data: BigInt64Array.of(265n) },
    });
    const e = await loadEmbedding(file);
    expect(e).toMatchObject({ format: 'a1111-string-to-param', key: 'string_to_param.*', numVectors: 2, suggestedPlaceholder: 'stp' });
    expect(e.vectors.data[0]).toBeCloseTo(1, 6);
  });

  test('diffusers learned_embeds: one key naming the token', async () => {
    const file = await write('learned_embeds.safetensors', { '<cat-toy>': { dtype: 'F32', shape: [HIDDEN], data: ramp(HIDDEN) } });
    const e = await loadEmbedding(file, { hiddenSize: HIDDEN });
    expect(e).toMatchObject({ format: 'diffusers', key: '<cat-toy>', numVectors: 1, suggestedPlaceholder: '<cat-toy>' });
    const multi = await loadEmbedding(await write('multi_diffusers.safetensors', { '<two>': { dtype: 'F32', shape: [2, HIDDEN], data: ramp(2 * HIDDEN) } }));
    expect(multi.numVectors).toBe(2);
  });

  test('F16 and BF16 embeddings are converted to float32', async () => {
    const values = [0.5, -1.25, 2, 0.125];
    const data = Float32Array.from({ length: HIDDEN }, (_, i) => values[i % 4]);
    const half = Uint16Array.from(data, toHalf);
    const bf16 = Uint16Array.from(new Uint32Array(data.buffer), (u) => u >>> 16);
    for (const [dtype, bits] of [['F16', half], ['BF16', bf16]] as const) {
      const e = await loadEmbedding(await write(`${dtype}.safetensors`, { emb_params: { dtype, shape: [1, HIDDEN], data: bits } }));
      expect(Array.from(e.vectors.data)).toEqual(Array.from(data));
    }
  });

  test('our own embedding.safetensors: the concept folder names the placeholder', async () => {
    const dir = path.join(tmp, 'concept');
    fs.mkdirSync(dir);
    await writeSafetensors(path.join(dir, 'embedding.safetensors'), { emb_params: { dtype: 'F32', shape: [1, HIDDEN], data: ramp(HIDDEN) } });
    fs.writeFileSync(path.join(dir, 'concept.json'), JSON.stringify({ format: 'singleinsert-native.concept', version: 1, placeholder: '<me>', files: { embedding: 'embedding.safetensors' } }));
    const e = await loadEmbedding(path.join(dir, 'embedding.safetensors'));
    expect(e).toMatchObject({ format: 'a1111', suggestedPlaceholder: '<me>', numVectors: 1 });
  });

  test('errors: hidden size, pickles, ambiguous files, SDXL, bad shapes, missing files', async () => {
    const wide = await write('wide.safetensors', { emb_params: { dtype: 'F32', shape: [2, 768], data: new Float32Array(2 * 768) } });
    await expect(loadEmbedding(wide, { hiddenSize: HIDDEN })).rejects.toThrow(
      `${wide}: the embedding emb_params has hidden size 768 but the text encoder expects 32; it was made for another model`,
    );
    await expect(loadEmbedding(path.join(tmp, 'x.pt'))).rejects.toThrow(`${path.join(tmp, 'x.pt')} is a PyTorch pickle; convert to safetensors first (embeddings are only read from .safetensors files, because unpickling can run code)`);
    await expect(loadEmbedding(path.join(tmp, 'x.bin'))).rejects.toThrow('is a PyTorch pickle; convert to safetensors first');
    // a torch.save zip renamed to .safetensors
    const zip = path.join(tmp, 'renamed.safetensors');
    fs.writeFileSync(zip, Buffer.concat([Buffer.from('PK\x03\x04'), Buffer.alloc(60)]));
    await expect(loadEmbedding(zip)).rejects.toThrow(`${zip} is a PyTorch pickle; convert to safetensors first`);
    await expect(loadEmbedding(path.join(tmp, 'missing.safetensors'))).rejects.toThrow(`Cannot read the embedding ${path.join(tmp, 'missing.safetensors')}: file not found`);
    const two = await write('two.safetensors', { a: { dtype: 'F32', shape: [HIDDEN], data: ramp(HIDDEN) }, b: { dtype: 'F32', shape: [HIDDEN], data: ramp(HIDDEN) } });
    await expect(loadEmbedding(two)).rejects.toThrow(`${two}: cannot tell which of its 2 tensors is the embedding (a, b)`);
    const sdxl = await write('sdxl.safetensors', { clip_g: { dtype: 'F32', shape: [1, 1280], data: new Float32Array(1280) }, clip_l: { dtype: 'F32', shape: [1, 768], data: new Float32Array(768) } });
    await expect(loadEmbedding(sdxl)).rejects.toThrow(`${sdxl}: is an SDXL embedding (keys clip_g, clip_l); this pipeline is Stable Diffusion v1.x`);
    const cube = await write('cube.safetensors', { emb_params: { dtype: 'F32', shape: [1, 2, HIDDEN], data: new Float32Array(2 * HIDDEN) } });
    await expect(loadEmbedding(cube)).rejects.toThrow(`${cube}: expected the embedding emb_params to be [hidden] or [N, hidden] but its shape is [1, 2, 32]`);
    const ints = await write('ints.safetensors', { emb_params: { dtype: 'I32', shape: [HIDDEN], data: new Int32Array(HIDDEN) } });
    await expect(loadEmbedding(ints)).rejects.toThrow('expected a floating-point tensor but found I32');
    await expect(loadEmbedding(tmp)).rejects.toThrow(`${tmp} is a folder; expected an embedding .safetensors file (for a concept folder use --concept)`);
  });
});

describe('multi-vector placeholders', () => {
  let tok: ClipTokenizer;
  beforeAll(() => {
    tok = ClipTokenizer.fromDir(fixture('tiny-sd', 'tokenizer'));
  });

  test('encodePrompt: a placeholder of length N takes N consecutive positions, in order', () => {
    const r = tok.encodePrompt('a <m> face and * and <m>', { placeholders: ['<m>', '*'], placeholderLengths: { '<m>': 3 } });
    // a(1) <m>(2,3,4) face(5) and(6) *(7) and(8) <m>(9,10,11)
    expect(r.placeholderPositions).toEqual({ '<m>': [2, 3, 4, 9, 10, 11], '*': [7] });
    expect(r.ids.slice(0, 13)).toEqual([49406, 320, STAR_ID, STAR_ID, STAR_ID, 1710, 537, STAR_ID, 537, STAR_ID, STAR_ID, STAR_ID, 49407]);
    expect(r.tokens).toEqual(['a</w>', '<m>', '<m>', '<m>', 'face</w>', 'and</w>', '*', 'and</w>', '<m>', '<m>', '<m>']);
    // length 1 is the old behaviour
    expect(tok.encodePrompt('a * face', { placeholders: ['*'], placeholderLengths: { '*': 1 } })).toEqual(tok.encodePrompt('a * face', { placeholders: ['*'] }));
  });

  test('encodePrompt: a multi-vector placeholder that would be cut off is refused; bad lengths too', () => {
    const words = Array(72).fill('a').join(' ');
    expect(tok.encodePrompt(`${words} <m>`, { placeholders: ['<m>'], placeholderLengths: { '<m>': 3 } }).placeholderPositions['<m>']).toEqual([73, 74, 75]);
    expect(() => tok.encodePrompt(`${words} a <m>`, { placeholders: ['<m>'], placeholderLengths: { '<m>': 3 } })).toThrow(SingleInsertError);
    expect(() => tok.encodePrompt(`${words} a <m>`, { placeholders: ['<m>'], placeholderLengths: { '<m>': 3 } })).toThrow(/Placeholder "<m>" is prompt token 76 but only 75 tokens fit/);
    expect(() => tok.encodePrompt('x', { placeholders: ['*'], placeholderLengths: { '<m>': 2 } })).toThrow('Expected a key among the placeholders ("*") for placeholderLengths["<m>"] but received "<m>"');
    expect(() => tok.encodePrompt('x', { placeholders: ['*'], placeholderLengths: { '*': 0 } })).toThrow('Expected a positive integer for placeholderLengths["*"] but received 0');
  });

  describe('in generate', () => {
    let pipeline: Pipeline;
    beforeAll(async () => {
      pipeline = await loadPipeline(fixture('tiny-sd'));
    });
    afterAll(() => pipeline?.dispose());

    test('a 3-vector embedding occupies 3 positions with its vectors in order', async () => {
      const file = await write('three.safetensors', { emb_params: { dtype: 'F32', shape: [3, HIDDEN], data: ramp(3 * HIDDEN, -0.5) } });
      const e = await loadEmbedding(file, { hiddenSize: HIDDEN });
      const r = await generate(pipeline, {
        prompt: 'a <m> face', steps: 1, width: 64, height: 64, scheduler: 'ddim', seed: 0, guidance: 1, returnIntermediates: true,
        embeddings: [{ vectors: e.vectors, placeholder: '<m>' }],
      });
      const inter = r.intermediates!;
      expect(inter.replace_index.shape).toEqual([3, 2]);
      expect(Array.from(inter.replace_index.data as BigInt64Array, Number)).toEqual([0, 2, 0, 3, 0, 4]);
      expect(Array.from(inter.replace_values.data as Float32Array)).toEqual(Array.from(e.vectors.data));
      const ids = Array.from(inter.text_input_ids.data as BigInt64Array, Number);
      expect(ids.slice(0, 7)).toEqual([49406, 320, STAR_ID, STAR_ID, STAR_ID, 1710, 49407]);
    });

    test('mismatched hidden size in generate names both sizes', async () => {
      await expect(
        generate(pipeline, { prompt: 'a <w>', steps: 1, width: 64, height: 64, embeddings: [{ vectors: { dtype: 'F32', shape: [2, 768], data: new Float32Array(1536) }, placeholder: '<w>' }] }),
      ).rejects.toThrow(`embeddings[0] ("<w>"): the embedding has hidden size 768 but the text encoder of ${fixture('tiny-sd')} has hidden size 32`);
      await expect(generate(pipeline, { prompt: 'x', embeddings: [{ vectors: { shape: [HIDDEN], data: new Int32Array(HIDDEN) }, placeholder: '<w>' }] })).rejects.toThrow(
        'Expected a float32 tensor [N, 32] for embeddings[0].vectors but received Object',
      );
    });
  });
});
