/**
 * `inspect` without the CLI around it: runInspect's report for diffusers folders and single
 * .safetensors files (counts checked against the fixture manifests), formatReport's text, and errors.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { FileReport, FolderReport, formatReport, runInspect } from '../lib/cli/commands/inspect';
import { SingleInsertError } from '../lib/errors';
import { writeSafetensors } from '../lib/safetensors';
import { fixture } from './helpers/fixtures';

interface ManifestModel {
  file: string;
  num_parameters: number;
  num_tensors: number;
  shapes: Record<string, number[]>;
}
const tinyModels = JSON.parse(fs.readFileSync(fixture('manifests', 'tiny_models.json'), 'utf8')).models as Record<string, ManifestModel>;
const numel = (s: number[]) => s.reduce((a, b) => a * b, 1);
const fmt = (n: number) => n.toLocaleString('en-US');

let tmp: string;
beforeAll(() => {
  tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'si-inspect-'));
});
afterAll(() => {
  fs.rmSync(tmp, { recursive: true, force: true });
});

describe('diffusers folder (tiny-sd)', () => {
  let report: FolderReport;
  beforeAll(async () => {
    report = (await runInspect(fixture('tiny-sd'))) as FolderReport;
  });

  test('reports the pipeline and every model_index.json component in order', () => {
    expect(report.type).toBe('diffusers-folder');
    expect(report.path).toBe(fixture('tiny-sd'));
    expect(report.pipeline).toBe('StableDiffusionPipeline');
    const index = JSON.parse(fs.readFileSync(fixture('tiny-sd', 'model_index.json'), 'utf8'));
    const expected = Object.entries(index).filter(([k, v]) => !k.startsWith('_') && Array.isArray(v));
    expect(report.components.map((c) => [c.name, [c.library, c.class]])).toEqual(expected);
    // image_encoder/ and dino/ are in the folder but not in model_index.json
    expect(report.components.map((c) => c.name)).not.toContain('image_encoder');
  });

  test.each(['unet', 'vae', 'text_encoder'])('%s parameter and tensor counts equal manifests/tiny_models.json', (name) => {
    const c = report.components.find((x) => x.name === name)!;
    const m = tinyModels[name];
    expect(c.parameters).toBe(m.num_parameters);
    expect(c.parameters).toBe(Object.values(m.shapes).reduce((a, s) => a + numel(s), 0));
    expect(c.tensors).toBe(m.num_tensors);
    expect(c.weights).toEqual([m.file]);
    expect(c.dtypes).toEqual(['F32']);
  });

  test('the README numbers: unet 2,164,452 / vae 1,028,935 / text_encoder 1,597,162', () => {
    const byName = Object.fromEntries(report.components.map((c) => [c.name, c.parameters]));
    expect(byName).toMatchObject({ unet: 2164452, vae: 1028935, text_encoder: 1597162 });
    expect(report.totals.parameters).toBe(2164452 + 1028935 + 1597162);
  });

  test('components without weights report nothing', () => {
    for (const name of ['feature_extractor', 'safety_checker', 'scheduler', 'tokenizer']) {
      const c = report.components.find((x) => x.name === name)!;
      expect({ name, tensors: c.tensors, parameters: c.parameters, weights: c.weights }).toEqual({ name, tensors: 0, parameters: 0, weights: [] });
    }
    expect(report.components.find((x) => x.name === 'safety_checker')).toMatchObject({ library: null, class: null });
  });

  test('formatReport', () => {
    const text = formatReport(report);
    const lines = text.trimEnd().split('\n');
    expect(text.endsWith('\n')).toBe(true);
    expect(lines[0]).toBe(`${fixture('tiny-sd')}: StableDiffusionPipeline`);
    expect(lines[1]).toMatch(/^component\s+class\s+parameters\s+weights$/);
    expect(lines).toContainEqual(expect.stringMatching(/^unet\s+UNet2DConditionModel\s+2,164,452\s+unet\/diffusion_pytorch_model\.safetensors \(F32\)$/));
    expect(lines).toContainEqual(expect.stringMatching(/^vae\s+AutoencoderKL\s+1,028,935\s+vae\/diffusion_pytorch_model\.safetensors \(F32\)$/));
    expect(lines).toContainEqual(expect.stringMatching(/^text_encoder\s+CLIPTextModel\s+1,597,162\s+text_encoder\/model\.safetensors \(F32\)$/));
    expect(lines).toContainEqual(expect.stringMatching(/^safety_checker\s+\(none\)\s+-$/));
    expect(lines).toContainEqual(expect.stringMatching(/^scheduler\s+PNDMScheduler\s+-$/));
    expect(lines[lines.length - 1]).toBe('total: 4,790,549 parameters');
    expect(lines.length).toBe(2 + report.components.length + 1);
    for (const line of lines) expect(line).toBe(line.trimEnd()); // no trailing blanks after empty columns
  });

  test('a relative path is reported as absolute', async () => {
    const rel = path.relative(process.cwd(), fixture('tiny-sd'));
    const r = (await runInspect(rel)) as FolderReport;
    expect(r.path).toBe(fixture('tiny-sd'));
    expect(r.totals).toEqual(report.totals);
  });
});

describe('single .safetensors files', () => {
  test('lora/lora.safetensors: 432 tensors, totals from lora_keys.json', async () => {
    const keys = JSON.parse(fs.readFileSync(fixture('lora', 'lora_keys.json'), 'utf8')).keys as Record<string, { shape: number[] }>;
    const params = Object.values(keys).reduce((a, k) => a + numel(k.shape), 0);
    const r = (await runInspect(fixture('lora', 'lora.safetensors'))) as FileReport;
    expect(r.type).toBe('safetensors');
    expect(r.path).toBe(fixture('lora', 'lora.safetensors'));
    expect(r.totals).toEqual({ tensors: 432, parameters: params, bytes: params * 4, byDtype: { F32: params } });
    expect(r.tensors).toHaveLength(432);
    // sorted by name, each with its own count
    const names = r.tensors.map((t) => t.name);
    expect(names).toEqual([...Object.keys(keys)].sort());
    for (const t of r.tensors) {
      expect(t).toEqual({ name: t.name, dtype: 'F32', shape: keys[t.name].shape, parameters: numel(keys[t.name].shape) });
    }
    const alpha = r.tensors.find((t) => t.name.endsWith('.alpha'))!;
    expect(alpha.shape).toEqual([]);
    expect(alpha.parameters).toBe(1);
    expect(r.metadata).toMatchObject({ format: 'pt' });

    const text = formatReport(r);
    const lines = text.trimEnd().split('\n');
    expect(lines[0]).toBe(fixture('lora', 'lora.safetensors'));
    expect(lines[1]).toMatch(/^name\s+dtype\s+shape\s+parameters$/);
    expect(lines).toContainEqual(expect.stringMatching(/^lora_te_text_model_encoder_layers_0_mlp_fc1\.alpha\s+F32\s+\[\]\s+1$/));
    expect(lines).toContainEqual(expect.stringMatching(/^lora_te_text_model_encoder_layers_0_mlp_fc1\.lora_down\.weight\s+F32\s+\[4, 32\]\s+128$/));
    expect(lines).toContain(`432 tensors, ${fmt(params)} parameters (F32 ${fmt(params)}), ${fmt(params * 4)} bytes of data`);
    expect(lines[lines.length - 1]).toBe(`metadata: ${JSON.stringify(r.metadata)}`);
    expect(lines.length).toBe(2 + 432 + 2);
  });

  test('tiny-sd-single-file/tiny-sd.safetensors: 710 tensors, the three components together', async () => {
    const r = (await runInspect(fixture('tiny-sd-single-file', 'tiny-sd.safetensors'))) as FileReport;
    const total = tinyModels.unet.num_parameters + tinyModels.vae.num_parameters + tinyModels.text_encoder.num_parameters;
    expect(r.totals.tensors).toBe(710);
    expect(r.totals.tensors).toBe(tinyModels.unet.num_tensors + tinyModels.vae.num_tensors + tinyModels.text_encoder.num_tensors);
    expect(r.totals.parameters).toBe(total);
    expect(r.totals.bytes).toBe(total * 4);
    expect(r.totals.byDtype).toEqual({ F32: total });
    const prefixCount = (p: string) => r.tensors.filter((t) => t.name.startsWith(p)).length;
    expect([prefixCount('model.diffusion_model.'), prefixCount('first_stage_model.'), prefixCount('cond_stage_model.transformer.')]).toEqual([494, 180, 36]);
    expect(formatReport(r)).toContain(`710 tensors, ${fmt(total)} parameters (F32 ${fmt(total)}), ${fmt(total * 4)} bytes of data\n`);
  });

  test('mixed dtypes, 0-dim and empty tensors, metadata', async () => {
    const file = path.join(tmp, 'mixed.safetensors');
    await writeSafetensors(
      file,
      {
        'b.weight': { dtype: 'F16', shape: [2, 3], data: new Uint16Array(6) },
        'a.ids': { dtype: 'I64', shape: [4], data: new BigInt64Array(4) },
        scale: { dtype: 'F32', shape: [], data: new Float32Array([2]) },
        nothing: { dtype: 'F32', shape: [0, 7], data: new Float32Array(0) },
      },
      { note: 'mixed' },
    );
    const r = (await runInspect(file)) as FileReport;
    expect(r.tensors.map((t) => [t.name, t.dtype, t.shape, t.parameters])).toEqual([
      ['a.ids', 'I64', [4], 4],
      ['b.weight', 'F16', [2, 3], 6],
      ['nothing', 'F32', [0, 7], 0],
      ['scale', 'F32', [], 1],
    ]);
    expect(r.totals).toEqual({ tensors: 4, parameters: 11, bytes: 4 * 8 + 6 * 2 + 4, byDtype: { I64: 4, F16: 6, F32: 1 } });
    expect(r.metadata).toEqual({ note: 'mixed' });
    const text = formatReport(r);
    expect(text).toContain('4 tensors, 11 parameters (I64 4, F16 6, F32 1), 48 bytes of data\n');
    expect(text).toContain('metadata: {"note":"mixed"}\n');
    expect(text).toMatch(/\nnothing\s+F32\s+\[0, 7\]\s+0\n/);
  });

  test('a file without metadata prints no metadata line', async () => {
    const file = path.join(tmp, 'plain.safetensors');
    await writeSafetensors(file, { x: { shape: [3], data: new Float32Array(3) } });
    const text = formatReport(await runInspect(file));
    expect(text).not.toContain('metadata:');
    expect(text.trimEnd().split('\n').pop()).toBe('1 tensors, 3 parameters (F32 3), 12 bytes of data');
  });
});

describe('sharded component weights', () => {
  test('a component with a .safetensors.index.json sums its shards', async () => {
    const dir = fs.mkdtempSync(path.join(tmp, 'sharded-'));
    fs.writeFileSync(
      path.join(dir, 'model_index.json'),
      JSON.stringify({ _class_name: 'StableDiffusionPipeline', unet: ['diffusers', 'UNet2DConditionModel'], scheduler: ['diffusers', 'PNDMScheduler'] }),
    );
    const unet = path.join(dir, 'unet');
    fs.mkdirSync(unet);
    await writeSafetensors(path.join(unet, 'part-1.safetensors'), { a: { shape: [2, 2], data: new Float32Array(4) } });
    await writeSafetensors(path.join(unet, 'part-2.safetensors'), { b: { dtype: 'BF16', shape: [3], data: new Uint16Array(3) }, c: { shape: [], data: new Float32Array(1) } });
    fs.writeFileSync(
      path.join(unet, 'diffusion_pytorch_model.safetensors.index.json'),
      JSON.stringify({ metadata: {}, weight_map: { a: 'part-1.safetensors', b: 'part-2.safetensors', c: 'part-2.safetensors' } }),
    );
    const r = (await runInspect(dir)) as FolderReport;
    const c = r.components.find((x) => x.name === 'unet')!;
    expect(c).toEqual({
      name: 'unet',
      library: 'diffusers',
      class: 'UNet2DConditionModel',
      weights: [path.join('unet', 'part-1.safetensors'), path.join('unet', 'part-2.safetensors')],
      tensors: 3,
      parameters: 8,
      dtypes: ['BF16', 'F32'],
    });
    expect(r.totals.parameters).toBe(8);
  });
});

describe('errors', () => {
  test('a missing path', async () => {
    const missing = path.join(tmp, 'no-such-model');
    await expect(runInspect(missing)).rejects.toThrow(SingleInsertError);
    await expect(runInspect(missing)).rejects.toThrow(`${missing} does not exist`);
  });

  test('an empty or non-string path', async () => {
    await expect(runInspect('')).rejects.toThrow('Expected a file or folder path for path but received ""');
    await expect(runInspect(undefined as unknown as string)).rejects.toThrow('Expected a file or folder path for path but received undefined');
  });

  test('a folder without model_index.json', async () => {
    const dir = fs.mkdtempSync(path.join(tmp, 'no-index-'));
    await expect(runInspect(dir)).rejects.toThrow(SingleInsertError);
    await expect(runInspect(dir)).rejects.toThrow(
      `${dir} is a folder without model_index.json: expected a diffusers model folder or a .safetensors file`,
    );
    // a component folder (unet/) is not a model folder either
    await expect(runInspect(fixture('tiny-sd', 'unet'))).rejects.toThrow(`${fixture('tiny-sd', 'unet')} is a folder without model_index.json`);
  });

  test('a model_index.json that is not JSON', async () => {
    const dir = fs.mkdtempSync(path.join(tmp, 'bad-index-'));
    fs.writeFileSync(path.join(dir, 'model_index.json'), '{"unet": [');
    await expect(runInspect(dir)).rejects.toThrow(SingleInsertError);
    await expect(runInspect(dir)).rejects.toThrow(new RegExp(`^${path.join(dir, 'model_index.json').replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}: `));
  });

  test('a broken (truncated) .safetensors file names the file and the tensor', async () => {
    const src = fs.readFileSync(fixture('lora', 'lora.safetensors'));
    const file = path.join(tmp, 'truncated-lora.safetensors');
    fs.writeFileSync(file, src.subarray(0, src.length - 4));
    // the tensor that ends last is the one that no longer fits
    const n = Number(src.readBigUInt64LE(0));
    const header = JSON.parse(src.subarray(8, 8 + n).toString('utf8')) as Record<string, { data_offsets?: [number, number] }>;
    const [lastName, last] = Object.entries(header)
      .filter(([k]) => k !== '__metadata__')
      .sort((a, b) => b[1].data_offsets![1] - a[1].data_offsets![1])[0];
    const dataSize = src.length - 4 - 8 - n;
    await expect(runInspect(file)).rejects.toThrow(
      `${file}: tensor "${lastName}": data_offsets [${last.data_offsets![0]}, ${last.data_offsets![1]}] go beyond the data section (${dataSize} bytes): truncated file?`,
    );
  });

  test('a file that is not safetensors at all', async () => {
    const file = path.join(tmp, 'model_index.json');
    fs.copyFileSync(fixture('tiny-sd', 'model_index.json'), file);
    await expect(runInspect(file)).rejects.toThrow(new RegExp(`${file.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}: header length \\d+ exceeds the limit`));
  });

  test('a broken component file inside a model folder names that file', async () => {
    const dir = fs.mkdtempSync(path.join(tmp, 'broken-component-'));
    fs.copyFileSync(fixture('tiny-sd', 'model_index.json'), path.join(dir, 'model_index.json'));
    fs.symlinkSync(fixture('tiny-sd', 'unet'), path.join(dir, 'unet'));
    fs.mkdirSync(path.join(dir, 'vae'));
    const broken = path.join(dir, 'vae', 'diffusion_pytorch_model.safetensors');
    fs.writeFileSync(broken, Buffer.from([1, 2, 3]));
    await expect(runInspect(dir)).rejects.toThrow(`${broken}: truncated file: 3 bytes, shorter than the 8-byte header length`);
  });

  test('a component folder with only pickle weights is refused', async () => {
    const dir = fs.mkdtempSync(path.join(tmp, 'pickle-'));
    fs.copyFileSync(fixture('tiny-sd', 'model_index.json'), path.join(dir, 'model_index.json'));
    fs.mkdirSync(path.join(dir, 'unet'));
    fs.writeFileSync(path.join(dir, 'unet', 'diffusion_pytorch_model.bin'), 'not really a pickle');
    await expect(runInspect(dir)).rejects.toThrow(SingleInsertError);
    await expect(runInspect(dir)).rejects.toThrow('has only PyTorch pickle weights (diffusion_pytorch_model.bin)');
  });
});
