// Using trained concepts: loading concept folders, composing several (embeddings + LoRAs) in one
// generation, the pipeline lock, the fixture LoRA through `loras`, the CLI and the case runner.
// Concept folders are built here with writeSafetensors, as training would write them.
import { createHash } from 'node:crypto';
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { Writable } from 'node:stream';
import sharp from 'sharp';
import { runGenerate } from '../lib/cli/commands/generate';
import { Concept, loadConcept, modelIdentity, planAdapters, safetensorsHeaderSha256, withAdapters } from '../lib/concepts';
import { AbortError } from '../lib/errors';
import { generate, GenerateOptions, GenerateResult } from '../lib/generate';
import { loadPipeline, Pipeline } from '../lib/models';
import { NativeTensor, packageRoot, Tensor } from '../lib/native';
import { readSafetensors, writeSafetensors } from '../lib/safetensors';
import { expectClose, loadCase } from './helpers/cases';
import { fixture } from './helpers/fixtures';

// lora_outputs golden: single-model outputs (README: atol = rtol = 1e-4)
const LORA_TOL = 1e-4;
const HIDDEN = 32; // the tiny text encoder's width
const STAR_ID = 265;
const LORA_FILE = fixture('lora', 'lora.safetensors');

let pipeline: Pipeline;
let tmp: string;
let loraTensors: Record<string, NativeTensor>;

/** Deterministic pseudo-random vectors (no Math.random: tests must be reproducible). */
function vectors(n: number, seed: number, hidden = HIDDEN): Float32Array {
  const out = new Float32Array(n * hidden);
  let s = seed >>> 0;
  for (let i = 0; i < out.length; i++) {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    out[i] = ((s / 2 ** 32) * 2 - 1) * 0.8;
  }
  return out;
}

interface ConceptSpec {
  placeholder?: string;
  classWord?: string;
  seed: number;
  /** 'fixture' = the fixture LoRA; 'unet-flipped' = its UNet half with up * -1.5; null = stage I only */
  lora: 'fixture' | 'unet-flipped' | null;
  baseModel?: object;
  hidden?: number;
  manifest?: (m: any) => void;
}

async function makeConcept(name: string, spec: ConceptSpec): Promise<string> {
  const dir = path.join(tmp, name);
  fs.mkdirSync(dir, { recursive: true });
  const hidden = spec.hidden ?? HIDDEN;
  await writeSafetensors(path.join(dir, 'embedding.safetensors'), { emb_params: { dtype: 'F32', shape: [1, hidden], data: vectors(1, spec.seed, hidden) } });
  if (spec.lora === 'fixture') fs.copyFileSync(LORA_FILE, path.join(dir, 'lora.safetensors'));
  if (spec.lora === 'unet-flipped') {
    const t: Record<string, Tensor> = {};
    for (const [k, v] of Object.entries(loraTensors)) {
      if (!k.startsWith('lora_unet_')) continue;
      t[k] = k.endsWith('.lora_up.weight') ? { ...v, data: (v.data as Float32Array).map((x) => -1.5 * x) } : v;
    }
    await writeSafetensors(path.join(dir, 'lora.safetensors'), t);
  }
  const placeholder = spec.placeholder ?? '*';
  const classWord = spec.classWord ?? 'face';
  const manifest: any = {
    format: 'singleinsert-native.concept',
    version: 1,
    placeholder,
    classWord,
    prompt: `${placeholder} ${classWord}`,
    files: { embedding: 'embedding.safetensors', lora: spec.lora ? 'lora.safetensors' : null, encoder: 'encoder.safetensors' },
    embedding: { key: 'emb_params', shape: [1, hidden] },
    lora: spec.lora ? { format: 'kohya', rank: 4, alpha: 1, modules: 144 } : null,
    hyperparameters: {},
    baseModel: spec.baseModel ?? (await modelIdentity(pipeline)),
    library: { name: 'singleinsert-native', version: '0.1.0', torch: 'test' },
    createdAt: '2024-01-01T00:00:00Z',
  };
  spec.manifest?.(manifest);
  fs.writeFileSync(path.join(dir, 'concept.json'), JSON.stringify(manifest, null, 2));
  return dir;
}

const small = (extra: Partial<GenerateOptions> = {}): GenerateOptions => ({ prompt: 'a photo of * face', steps: 2, width: 64, height: 64, scheduler: 'ddim', seed: 5, ...extra });
const bytes = (r: GenerateResult) => Buffer.from(r.images[0].rgb);
const same = (a: GenerateResult, b: GenerateResult) => Buffer.from(a.images[0].float.buffer).equals(Buffer.from(b.images[0].float.buffer));

let dirA: string;
let dirB: string;
let dirStage1: string;
let conceptA: Concept;
let conceptB: Concept;
let plain: GenerateResult;

beforeAll(async () => {
  tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'si-concepts-'));
  pipeline = await loadPipeline(fixture('tiny-sd'));
  loraTensors = (await readSafetensors(LORA_FILE)).tensors;
  dirA = await makeConcept('a', { seed: 1, lora: 'fixture' });
  dirB = await makeConcept('b', { seed: 2, lora: 'unet-flipped', placeholder: '<b>', classWord: 'dog' });
  dirStage1 = await makeConcept('stage1', { seed: 3, lora: null, classWord: 'cat' });
  conceptA = await pipeline.loadConcept(dirA);
  conceptB = await pipeline.loadConcept(dirB);
  plain = await generate(pipeline, small({ prompt: 'a photo of a face next to a dog' }));
});

afterAll(() => {
  pipeline?.dispose();
  fs.rmSync(tmp, { recursive: true, force: true });
});

describe('loadConcept', () => {
  test('reads concept.json, the embedding and the LoRA', async () => {
    const c = await loadConcept(dirA);
    expect(c.placeholder).toBe('*');
    expect(c.classWord).toBe('face');
    expect(c.prompt).toBe('* face');
    expect(c.hiddenSize).toBe(HIDDEN);
    expect(c.numVectors).toBe(1);
    expect(c.embedding.vectors.shape).toEqual([1, HIDDEN]);
    expect(Array.from(c.embedding.vectors.data)).toEqual(Array.from(vectors(1, 1)));
    expect(c.lora).toEqual({ file: path.join(dirA, 'lora.safetensors'), modules: 144, tensors: 432 });
    expect(c.warnings).toEqual([]);
    const s1 = await loadConcept(dirStage1);
    expect(s1.lora).toBeNull();
    // the placeholder can be renamed
    expect((await loadConcept(dirA, { placeholder: 'me' })).placeholder).toBe('me');
  });

  test('the class word falls back to the training prompt; files default when files is absent', async () => {
    const dir = await makeConcept('defaults', { seed: 4, lora: 'fixture', manifest: (m) => { delete m.classWord; delete m.files; } });
    const c = await loadConcept(dir);
    expect(c.classWord).toBe('face');
    expect(c.lora?.modules).toBe(144);
  });

  test('clear errors naming the file, key and shape', async () => {
    const bad = (name: string, edit: (m: any) => void, extra: Partial<ConceptSpec> = {}) => makeConcept(name, { seed: 9, lora: null, manifest: edit, ...extra });
    await expect(loadConcept(path.join(tmp, 'nope'))).rejects.toThrow(`Concept folder ${path.join(tmp, 'nope')} does not exist`);
    await expect(loadConcept(path.join(dirA, 'concept.json'))).rejects.toThrow(/is not a folder: a concept is a folder with concept.json/);

    const noJson = path.join(tmp, 'nojson');
    fs.mkdirSync(noJson);
    await expect(loadConcept(noJson)).rejects.toThrow(`${path.join(noJson, 'concept.json')} not found: a concept folder holds concept.json, embedding.safetensors and (after stage II) lora.safetensors`);

    const broken = await bad('broken', () => {});
    fs.writeFileSync(path.join(broken, 'concept.json'), '{ "format": "singleinsert-native.concept", ');
    await expect(loadConcept(broken)).rejects.toThrow(new RegExp(`^${path.join(broken, 'concept.json')}: invalid JSON \\(`));

    await expect(loadConcept(await bad('fmt', (m) => (m.format = 'something-else')))).rejects.toThrow('expected "format": "singleinsert-native.concept" but found "something-else"');
    await expect(loadConcept(await bad('ver', (m) => (m.version = 2)))).rejects.toThrow(
      'concept format version 2 is not supported; this library reads version 1 (the concept was written by a newer version: upgrade singleinsert-native)',
    );
    await expect(loadConcept(await bad('novers', (m) => delete m.version))).rejects.toThrow('concept format version undefined is not supported');

    const noEmb = await bad('noemb', () => {});
    fs.rmSync(path.join(noEmb, 'embedding.safetensors'));
    await expect(loadConcept(noEmb)).rejects.toThrow(`${path.join(noEmb, 'embedding.safetensors')} not found (named by files.embedding in ${path.join(noEmb, 'concept.json')})`);

    await expect(loadConcept(await bad('key', (m) => (m.embedding.key = 'string_to_param')))).rejects.toThrow(
      `${path.join(tmp, 'key', 'embedding.safetensors')}: no tensor "string_to_param" (named by ${path.join(tmp, 'key', 'concept.json')}); the file holds "emb_params"`,
    );
    await expect(loadConcept(await bad('shape', (m) => (m.embedding.shape = [1, 768])))).rejects.toThrow('emb_params has shape [1, 32] but');

    const noLora = await bad('nolora', (m) => (m.files.lora = 'lora.safetensors'));
    await expect(loadConcept(noLora)).rejects.toThrow(`${path.join(noLora, 'lora.safetensors')} not found (named by files.lora in`);
    await expect(loadConcept(await bad('escape', (m) => (m.files.embedding = '../a/embedding.safetensors')))).rejects.toThrow('files.embedding must name a file inside the concept folder');
    await expect(loadConcept(await bad('pickle', (m) => (m.files.embedding = 'embedding.pt')))).rejects.toThrow('embedding.pt is a PyTorch pickle; convert to safetensors first');

    const oddLora = await bad('oddlora', (m) => (m.files.lora = 'lora.safetensors'));
    await writeSafetensors(path.join(oddLora, 'lora.safetensors'), { 'unet.down.weight': { dtype: 'F32', shape: [1], data: new Float32Array(1) } });
    await expect(loadConcept(oddLora)).rejects.toThrow('expected kohya LoRA keys (lora_unet_*/lora_te_* .lora_down.weight, .lora_up.weight, .alpha) but found 1 other key(s), e.g. unet.down.weight');
  });

  test('an embedding of another width than the text encoder: error naming both', async () => {
    const wide = await makeConcept('wide', { seed: 5, lora: null, hidden: 768 });
    await expect(pipeline.loadConcept(wide)).rejects.toThrow(
      `${path.join(wide, 'embedding.safetensors')}: the embedding emb_params has hidden size 768 but the text encoder expects 32; it was made for another model`,
    );
    // loaded without a pipeline it is accepted, and generate refuses it
    const c = await loadConcept(wide);
    await expect(generate(pipeline, small({ concepts: [{ concept: c }] }))).rejects.toThrow(
      `concept "*" (${wide}): the embedding has hidden size 768 but the text encoder of ${fixture('tiny-sd')} has hidden size 32`,
    );
  });
});

describe('modelIdentity', () => {
  const headerSha = (file: string) => {
    const buf = fs.readFileSync(file);
    const n = Number(buf.readBigUInt64LE(0));
    return createHash('sha256').update(buf.subarray(0, 8 + n)).digest('hex');
  };

  test('sha256 of the UNet weights header (first 8 + N bytes), folder and single file', async () => {
    const unetFile = fixture('tiny-sd', 'unet', 'diffusion_pytorch_model.safetensors');
    const id = await modelIdentity(pipeline);
    expect(id).toEqual({ path: fixture('tiny-sd'), unetWeights: [unetFile], unetHeaderSha256: headerSha(unetFile) });
    expect(await safetensorsHeaderSha256(unetFile)).toBe(id.unetHeaderSha256);
    const single = fixture('tiny-sd-single-file', 'tiny-sd.safetensors');
    const sid = await modelIdentity({ modelPath: single } as Pipeline);
    expect(sid).toEqual({ path: single, unetWeights: [single], unetHeaderSha256: headerSha(single) });
    expect(sid.unetHeaderSha256).not.toBe(id.unetHeaderSha256);
  });

  test('another recorded base model gives a clear warning, carried into the generation warnings', async () => {
    const other = await makeConcept('other-base', {
      seed: 6, lora: null, baseModel: { path: '/models/other', unetWeights: ['/models/other/unet/x.safetensors'], unetHeaderSha256: 'ab'.repeat(32) },
    });
    const c = await pipeline.loadConcept(other);
    expect(c.warnings).toHaveLength(1);
    expect(c.warnings[0]).toMatch(new RegExp(`^The concept ${other} was trained on /models/other \\(UNet header sha256 abababababab…\\) but the loaded model ${fixture('tiny-sd')} has [0-9a-f]{12}…: its embedding and LoRA were learned for other weights and may not work here$`));
    expect(conceptA.warnings).toEqual([]);
    const r = await generate(pipeline, small({ concepts: [{ concept: c }] }));
    expect(r.warnings).toContain(c.warnings[0]);
  });
});

describe('generation with concepts', () => {
  const two = (extra: Partial<GenerateOptions> = {}) =>
    small({ prompt: 'a photo of a * face next to a <b> dog', concepts: [{ concept: conceptA }, { concept: conceptB }], returnIntermediates: true, ...extra });

  test('two concepts compose: both placeholders replaced in the text-encoder inputs (prompt and negative prompt)', async () => {
    const r = await generate(pipeline, two({ negativePrompt: 'a blurry <b>' }));
    const inter = r.intermediates!;
    // rows: [negative, prompt]
    const ids = Array.from(inter.text_input_ids.data as BigInt64Array, Number);
    expect(inter.text_input_ids.shape).toEqual([2, 77]);
    const index = Array.from(inter.replace_index.data as BigInt64Array, Number);
    const pairs = [];
    for (let i = 0; i < index.length; i += 2) pairs.push([index[i], index[i + 1]]);
    // "a blurry <b>": <b> is token 3; "a photo of a * face next to a <b> dog": * is 5, <b> is 10
    expect(pairs).toEqual([[0, 3], [1, 5], [1, 10]]);
    for (const [row, pos] of pairs) expect(ids[row * 77 + pos]).toBe(STAR_ID);
    const values = inter.replace_values.data as Float32Array;
    expect(inter.replace_values.shape).toEqual([3, HIDDEN]);
    expect(Array.from(values.subarray(0, HIDDEN))).toEqual(Array.from(vectors(1, 2)));
    expect(Array.from(values.subarray(HIDDEN, 2 * HIDDEN))).toEqual(Array.from(vectors(1, 1)));
    expect(Array.from(values.subarray(2 * HIDDEN))).toEqual(Array.from(vectors(1, 2)));
    // the replaced embeddings change the text encoder output
    const base = await pipeline.encodeIds({ dtype: 'I64', shape: [2, 77], data: inter.text_input_ids.data });
    expect(Buffer.from((base.data as Float32Array).buffer).equals(Buffer.from(Float32Array.from([...(inter.negative_prompt_embeds.data as Float32Array), ...(inter.prompt_embeds.data as Float32Array)]).buffer))).toBe(false);
    expect(r.warnings).toEqual([]);
  });

  test('both LoRAs are active: the result differs from each alone and from none', async () => {
    const both = await generate(pipeline, two());
    const onlyA = await generate(pipeline, two({ concepts: [{ concept: conceptA }, { concept: conceptB, loraScale: 0 }] }));
    const onlyB = await generate(pipeline, two({ concepts: [{ concept: conceptA, loraScale: 0 }, { concept: conceptB }] }));
    const none = await generate(pipeline, two({ concepts: [{ concept: conceptA, loraScale: 0 }, { concept: conceptB, loraScale: 0 }] }));
    const all = [both, onlyA, onlyB, none];
    for (let i = 0; i < all.length; i++) for (let j = i + 1; j < all.length; j++) expect(same(all[i], all[j])).toBe(false);
    // the embeddings alone equal the concepts with their LoRAs at scale 0 (nothing attached at 0)
    const embeddingsOnly = await generate(pipeline, two({ concepts: undefined, embeddings: [{ vectors: conceptA.embedding.vectors, placeholder: '*' }, { vectors: conceptB.embedding.vectors, placeholder: '<b>' }] }));
    expect(same(embeddingsOnly, none)).toBe(true);
  });

  test('the order of concepts and LoRAs does not change the image (identical bytes)', async () => {
    const ab = await generate(pipeline, two({ loras: [{ file: LORA_FILE, scale: 0.3 }, { file: path.join(dirB, 'lora.safetensors'), scale: 0.7 }] }));
    const ba = await generate(pipeline, two({
      concepts: [{ concept: conceptB }, { concept: conceptA }],
      loras: [{ file: path.join(dirB, 'lora.safetensors'), scale: 0.7 }, { file: LORA_FILE, scale: 0.3 }],
    }));
    expect(bytes(ab).equals(bytes(ba))).toBe(true);
    expect(same(ab, ba)).toBe(true);
  });

  test('the adapters are gone after a call, after a failing call and after an abort', async () => {
    const check = async () => expect(same(await generate(pipeline, small({ prompt: 'a photo of a face next to a dog' })), plain)).toBe(true);
    await generate(pipeline, two());
    await check();
    // the second LoRA is refused (a key that targets nothing): the first, already attached, comes off again
    const odd = path.join(tmp, 'odd-lora.safetensors');
    await writeSafetensors(odd, { ...loraTensors, 'lora_unet_nothing_here.lora_down.weight': { dtype: 'F32', shape: [4, 32], data: new Float32Array(128) } });
    await expect(generate(pipeline, two({ loras: [{ file: odd }] }))).rejects.toThrow(/^Cannot apply the LoRA of loras\[0\] \(.*odd-lora.safetensors\): .*lora_unet_nothing_here/s);
    await check();
    const controller = new AbortController();
    const run = generate(pipeline, two({ steps: 200 }), { signal: controller.signal, onProgress: () => controller.abort() });
    await expect(run).rejects.toBeInstanceOf(AbortError);
    await check();
  });

  test('concurrent calls with different LoRA sets do not see each other\'s adapters', async () => {
    const a = two();
    const b = small({ prompt: 'a photo of a face next to a dog' });
    const c = small({ prompt: 'a <b> dog', concepts: [{ concept: conceptB, loraScale: 0.5 }] });
    const seq = [await generate(pipeline, a), await generate(pipeline, b), await generate(pipeline, c)];
    const par = await Promise.all([generate(pipeline, a), generate(pipeline, b), generate(pipeline, c), generate(pipeline, b)]);
    expect(same(par[0], seq[0])).toBe(true);
    expect(same(par[1], seq[1])).toBe(true);
    expect(same(par[2], seq[2])).toBe(true);
    expect(same(par[3], seq[1])).toBe(true);
  });

  test('placeholders: duplicate, unknown, unused', async () => {
    await expect(generate(pipeline, small({ concepts: [{ concept: conceptA }, { concept: await pipeline.loadConcept(dirStage1) }] }))).rejects.toThrow(
      `Placeholder "*" is used by both concept "*" (${dirA}) and concept "*" (${dirStage1}); give one of them another placeholder (the concept option placeholder, or --concept name=<dir>)`,
    );
    // renamed, the two work together
    await expect(generate(pipeline, small({ prompt: '* and <s1>', concepts: [{ concept: conceptA }, { concept: await pipeline.loadConcept(dirStage1), placeholder: '<s1>' }] }))).resolves.toBeDefined();
    await expect(generate(pipeline, small({ prompt: 'a * face with <c>', concepts: [{ concept: conceptA }] }))).rejects.toThrow(
      'Unknown placeholder "<c>" in prompt "a * face with <c>"; the known placeholders are "*"',
    );
    await expect(generate(pipeline, small({ prompt: 'a * face', negativePrompt: '<x>', concepts: [{ concept: conceptA }] }))).rejects.toThrow('Unknown placeholder "<x>"');
    const r = await generate(pipeline, small({ prompt: 'a plain face', concepts: [{ concept: conceptA }, { concept: conceptB }] }));
    expect(r.warnings).toEqual(['The prompt "a plain face" uses none of the placeholders "*", "<b>": no learned embedding enters it']);
    const home = await generate(pipeline, small({ prompt: 'a me face at home, me', concepts: [{ concept: conceptA, placeholder: 'me' }] }));
    expect(home.warnings).toEqual(['The placeholder "me" occurs inside the word "home" of the prompt "a me face at home, me" and is replaced there too; a placeholder such as "<me>" avoids this']);
    await expect(generate(pipeline, small({ concepts: [{ concept: conceptA, placeholder: 'two words' }] }))).rejects.toThrow(
      'Expected a non-empty placeholder without whitespace for concepts[0].placeholder but received "two words"',
    );
    await expect(generate(pipeline, small({ concepts: [{ concept: {} as Concept }] }))).rejects.toThrow('Expected a concept from loadConcept / Pipeline.loadConcept for concepts[0].concept');
    await expect(generate(pipeline, small({ loras: [{ file: path.join(tmp, 'missing.safetensors') }] }))).rejects.toThrow(`Cannot read the LoRA ${path.join(tmp, 'missing.safetensors')}: file not found`);
    await expect(generate(pipeline, small({ loras: [{ file: 'x.pt' }] }))).rejects.toThrow('x.pt is a PyTorch pickle; convert to safetensors first');
  });

  test('without concepts the ids are those of the plain tokenizer call (backwards compatible)', async () => {
    const r = await generate(pipeline, small({ prompt: 'a photo of * face', returnIntermediates: true }));
    expect(r.intermediates!.replace_index).toBeUndefined();
    expect(Array.from(r.intermediates!.prompt_ids.data as BigInt64Array, Number)).toEqual(pipeline.tokenizer.call('a photo of * face').inputIds);
  });
});

describe('the fixture LoRA through loras', () => {
  test('reproduces the lora_outputs golden (UNet and text encoder) while applied, at scale 1 and 0.5', async () => {
    const golden = await loadCase('lora_outputs');
    const unetIn = { sample: golden.tensors['input.latents'], timestep: golden.tensors['input.timesteps'], encoder_hidden_states: golden.tensors['input.encoder_hidden_states'] };
    const teIn = { input_ids: golden.tensors['input.input_ids'] };
    for (const scale of [1.0, 0.5]) {
      const plan = planAdapters([{ file: LORA_FILE, scale, source: 'lora' }]);
      const [u, t] = await withAdapters(pipeline, plan, async () => [(await pipeline.unet.run('forward', unetIn)).sample, (await pipeline.textEncoder.run('forward', teIn)).last_hidden_state]);
      expectClose(`lora_outputs unet scale ${scale}`, u, golden.tensors[`output.unet_sample_scale${scale.toFixed(1)}`], LORA_TOL, LORA_TOL);
      expectClose(`lora_outputs text scale ${scale}`, t, golden.tensors[`output.text_last_hidden_state_scale${scale.toFixed(1)}`], LORA_TOL, LORA_TOL);
    }
    // and removed afterwards
    expectClose('unet without LoRA', (await pipeline.unet.run('forward', unetIn)).sample, golden.tensors['intermediate.unet_sample_no_lora'], LORA_TOL, LORA_TOL);
  });

  test('generate: scale 0 equals no LoRA exactly, scale 1 differs', async () => {
    const p = { prompt: 'a photo of a face next to a dog' };
    expect(same(await generate(pipeline, small({ ...p, loras: [{ file: LORA_FILE, scale: 0 }] })), plain)).toBe(true);
    expect(same(await generate(pipeline, small({ ...p, loras: [{ file: LORA_FILE, scale: 1 }] })), plain)).toBe(false);
  });
});

describe('CLI and case runner', () => {
  test('runGenerate --concept name=<dir> --concept <dir> --preset edits writes one PNG per image and sheet.png', async () => {
    const out = path.join(tmp, 'cli-out');
    const lines: string[] = [];
    const stderr = new Writable({ write: (c: Buffer, _e, cb) => (lines.push(String(c)), cb()) });
    const report = await runGenerate(
      { model: fixture('tiny-sd'), concept: [`me=${dirStage1}`, dirA], loraScale: [1, 0.5], preset: 'edits', steps: 1, scheduler: 'ddim', width: 64, height: 64, seed: 3, n: 2, out },
      { stderr, progress: false },
    );
    expect(report.concepts.map((c) => [c.placeholder, c.classWord, c.loraScale])).toEqual([['me', 'cat', 1], ['*', 'face', 0.5]]);
    expect(report.files).toHaveLength(20);
    expect(report.images[0].prompt).toBe('a me cat wearing sunglasses');
    expect(path.basename(report.files[0])).toBe('edits-00-sunglasses-3-0.png');
    expect(path.basename(report.files[19])).toBe('edits-09-sunflowers-3-1.png');
    for (const f of report.files) expect(fs.existsSync(f)).toBe(true);
    // "*" is active but no prompt uses it: one warning (the same for every row, printed once)
    expect(report.warnings).toEqual([`The placeholder "*" of concept "*" (${dirA}) appears in no prompt: its embedding does not enter the image`]);
    expect(lines.join('')).toBe(`warning: ${report.warnings[0]}\n`);
    expect(report.sheet).toBe(path.join(out, 'sheet.png'));
    const meta = await sharp(report.sheet!).metadata();
    // 2 columns of 256-px tiles (64 px images, upscaled), 10 rows: width = 2*256 + 3*8, height = 10*(256+28) + 11*8
    expect([meta.width, meta.height]).toEqual([2 * 256 + 3 * 8, 10 * (256 + 28) + 11 * 8]);
    // same seed in every row: the rows differ by prompt only
    expect(new Set(report.images.map((i) => i.parameters.match(/Seed: (\d+)/)![1]))).toEqual(new Set(['3']));
  });

  test('runGenerate with --prompt as the preset subject, --lora file:scale and --embedding file:placeholder', async () => {
    const out = path.join(tmp, 'cli-out2');
    const report = await runGenerate(
      {
        model: fixture('tiny-sd'), prompt: '* face and <e> dog', preset: 'views', concept: [dirA], lora: [`${LORA_FILE}:0.25`],
        embedding: [`${path.join(dirB, 'embedding.safetensors')}:<e>`], steps: 1, scheduler: 'ddim', width: 64, height: 64, seed: 1, out,
      },
      { progress: false },
    );
    expect(report.images.map((i) => i.prompt)[0]).toBe('a front view of a * face and <e> dog');
    expect(report.files).toHaveLength(8);
    expect(path.basename(report.files[7])).toBe('views-07-full-body-1-0.png');
    expect(report.warnings).toEqual([]);
    expect(fs.existsSync(report.sheet!)).toBe(true);
    await expect(runGenerate({ model: fixture('tiny-sd'), preset: 'views', out })).rejects.toThrow('--preset views needs a --concept (for its placeholder and class word) or a --prompt with the subject');
    await expect(runGenerate({ model: fixture('tiny-sd'), out })).rejects.toThrow('Expected a prompt (or --preset edits|views) for prompt but received undefined');
    await expect(runGenerate({ model: fixture('tiny-sd'), prompt: 'x', concept: [dirA], loraScale: [1, 2], out })).rejects.toThrow(
      'Expected at most 1 --lora-scale value(s), one per --concept in order, but received 2',
    );
  });

  test('the same concept through --concept and through --embedding + --lora gives the same image', async () => {
    const opts = { model: fixture('tiny-sd'), prompt: 'a * face', steps: 2, scheduler: 'ddim', width: 64, height: 64, seed: 8 };
    const a = await runGenerate({ ...opts, concept: [dirA], out: path.join(tmp, 'rt-a') }, { progress: false });
    const b = await runGenerate({ ...opts, embedding: [path.join(dirA, 'embedding.safetensors')], lora: [path.join(dirA, 'lora.safetensors')], out: path.join(tmp, 'rt-b') }, { progress: false });
    expect(fs.readFileSync(a.files[0]).equals(fs.readFileSync(b.files[0]))).toBe(true);
  });

  test('argument parsing: name=<dir>, file:scale, file:placeholder', async () => {
    const { parseConceptArg, parseLoraArg, parseEmbeddingArg } = await import('../lib/cli/commands/generate');
    expect(parseConceptArg('me=/x/y')).toEqual({ placeholder: 'me', dir: '/x/y' });
    expect(parseConceptArg('/x/y')).toEqual({ dir: '/x/y' });
    expect(parseConceptArg(dirA)).toEqual({ dir: dirA });
    expect(parseLoraArg('/x/l.safetensors:0.5')).toEqual({ file: '/x/l.safetensors', scale: 0.5 });
    expect(parseLoraArg('/x/l.safetensors:-1e-1')).toEqual({ file: '/x/l.safetensors', scale: -0.1 });
    expect(parseLoraArg('/x/l.safetensors')).toEqual({ file: '/x/l.safetensors', scale: 1 });
    expect(parseEmbeddingArg('/x/e.safetensors:<cat>')).toEqual({ file: '/x/e.safetensors', placeholder: '<cat>' });
    expect(parseEmbeddingArg('/x/e.safetensors')).toEqual({ file: '/x/e.safetensors' });
    expect(parseEmbeddingArg('C:\\x\\e.safetensors')).toEqual({ file: 'C:\\x\\e.safetensors' });
  });

  test('run-case.mjs: a pipeline case naming a LoRA equals generate() with that LoRA', async () => {
    const dir = path.join(tmp, 'case', 'cases');
    fs.mkdirSync(dir, { recursive: true });
    const json = JSON.parse(fs.readFileSync(fixture('cases', 'pipeline_ddim4.json'), 'utf8'));
    json.name = 'pipeline_ddim4_lora';
    json.file = 'pipeline_ddim4.safetensors';
    json.call.lora = { file: LORA_FILE, scale: 0.5 };
    json.call.embedding = { file: path.join(dirB, 'embedding.safetensors'), placeholder: '<b>' };
    json.call.args.prompt = 'a photo of an astronaut riding a <b> on mars';
    fs.writeFileSync(path.join(dir, 'pipeline_ddim4_lora.json'), JSON.stringify(json));
    fs.copyFileSync(fixture('cases', 'pipeline_ddim4.safetensors'), path.join(dir, 'pipeline_ddim4.safetensors'));
    const out = path.join(tmp, 'case-out.safetensors');
    const r = spawnSync(process.execPath, [path.join(packageRoot, 'scripts', 'run-case.mjs'), '--case', path.join(dir, 'pipeline_ddim4_lora.json'), '--model', fixture('tiny-sd'), '--out', out], { encoding: 'utf8' });
    expect(r.stderr).toBe('');
    expect(r.status).toBe(0);
    const written = (await readSafetensors(out)).tensors;
    const golden = await loadCase('pipeline_ddim4');
    const args = json.call.args;
    const direct = await generate(pipeline, {
      prompt: args.prompt, negativePrompt: args.negative_prompt, steps: args.num_inference_steps, guidance: args.guidance_scale, scheduler: 'ddim',
      width: args.width, height: args.height, latents: golden.tensors['input.latents'],
      loras: [{ file: LORA_FILE, scale: 0.5 }], embeddings: [{ vectors: conceptB.embedding.vectors, placeholder: '<b>' }],
    });
    expectClose('runner vs generate with LoRA + embedding', written['output.image'], { shape: [1, 64, 64, 3], data: direct.images[0].float }, 0, 0);
    expect(written['intermediate.replace_index'].shape).toEqual([1, 2]);
    // and the LoRA changed the image relative to the golden (which has none)
    let maxAbs = 0;
    (written['output.image'].data as Float32Array).forEach((v, i) => (maxAbs = Math.max(maxAbs, Math.abs(v - (golden.tensors['output.image'].data as Float32Array)[i]))));
    expect(maxAbs).toBeGreaterThan(1e-3);
  });
});
