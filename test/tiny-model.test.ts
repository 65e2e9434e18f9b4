// The embedded tiny model: deterministic random weights in the real diffusers layout.
import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { runInspect } from '../lib/cli/commands/inspect';
import { loadPipeline } from '../lib/models';
import { ensureTinyModel } from '../lib/tiny-model';
import { fixture } from './helpers/fixtures';

const sha = (f: string) => crypto.createHash('sha256').update(fs.readFileSync(f)).digest('hex');

describe('embedded tiny model', () => {
  let a: string, b: string;
  let tmp: string;
  beforeAll(async () => {
    tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'si-tiny-'));
    a = await ensureTinyModel({ SINGLEINSERT_CACHE: path.join(tmp, 'a') });
    b = await ensureTinyModel({ SINGLEINSERT_CACHE: path.join(tmp, 'b') });
  });
  afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }));

  test('is built byte-identically on every machine and run', () => {
    for (const f of ['unet/diffusion_pytorch_model.safetensors', 'vae/diffusion_pytorch_model.safetensors', 'text_encoder/model.safetensors', 'image_encoder/model.safetensors']) {
      expect(sha(path.join(a, f))).toBe(sha(path.join(b, f)));
    }
    expect(fs.readdirSync(path.dirname(a)).filter((n) => n.includes('.tmp-'))).toEqual([]);
  });

  test("has the tiny fixture model's parameter counts", async () => {
    const report = await runInspect(a);
    const tiny = JSON.parse(fs.readFileSync(fixture('manifests', 'tiny_models.json'), 'utf8')).models;
    if (report.type !== 'diffusers-folder') throw new Error('expected a folder report');
    const params = Object.fromEntries(report.components.map((c) => [c.name, c.parameters]));
    expect(params.unet).toBe(tiny.unet.num_parameters);
    expect(params.vae).toBe(tiny.vae.num_parameters);
    expect(params.text_encoder).toBe(tiny.text_encoder.num_parameters);
  });

  test('a second call reuses the built folder', async () => {
    const before = fs.statSync(path.join(a, 'unet', 'diffusion_pytorch_model.safetensors')).mtimeMs;
    expect(await ensureTinyModel({ SINGLEINSERT_CACHE: path.join(tmp, 'a') })).toBe(a);
    expect(fs.statSync(path.join(a, 'unet', 'diffusion_pytorch_model.safetensors')).mtimeMs).toBe(before);
  });

  test('loads and generates finite images', async () => {
    const p = await loadPipeline(a);
    const r = await p.generate({ prompt: 'a face', steps: 3, seed: 7, scheduler: 'ddim' });
    expect(r.images[0].float.every((x) => Number.isFinite(x) && x >= 0 && x <= 1)).toBe(true);
    // not a constant picture: the random weights still produce structure
    const px = r.images[0].rgb;
    expect(new Set(px).size).toBeGreaterThan(10);
    p.dispose();
  });
});
