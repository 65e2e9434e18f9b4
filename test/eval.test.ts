/**
 * `eval`: --images on a small folder of PNGs (made here with sharp) writes metrics.json,
 * metrics.csv and report.html with the copied images; a missing metric model skips only its
 * metrics; --concept generates the grid with the tiny model and scores it with attention masks; the
 * report opens in headless Chromium without errors and shows the table and the images (skipped
 * with a message when /usr/bin/chromium is absent).
 */
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { Writable } from 'node:stream';
import sharp from 'sharp';
import { formatSummary, runEval } from '../lib/cli/commands/eval';
import { EvalResult } from '../lib/eval/eval';
import { METRICS } from '../lib/eval/metrics';
import { loadPipeline } from '../lib/models';
import { packageRoot } from '../lib/native';
import { writeSafetensors } from '../lib/safetensors';
import { fixture } from './helpers/fixtures';

jest.setTimeout(300000);

let tmp: string;
const quiet = new Writable({ write: (_c, _e, cb) => cb() });

/** A 64x64 PNG: a disc of `fg` colour over a background pattern; and its mask. */
async function png(file: string, fg: [number, number, number], pattern: number, maskFile?: string) {
  const w = 64, h = 64;
  const rgb = Buffer.alloc(w * h * 3);
  const mask = Buffer.alloc(w * h);
  for (let y = 0; y < h; y++) {
    for (let x = 0; x < w; x++) {
      const i = y * w + x;
      const inside = (x - 32) ** 2 + (y - 30) ** 2 < 18 ** 2;
      mask[i] = inside ? 255 : 0;
      const bg = [(x * pattern) % 256, (y * 3 + pattern * 40) % 256, ((x + y) * 2) % 256];
      rgb.set(inside ? fg.map((c, k) => (c + ((x + y + k) % 7)) % 256) : bg, 3 * i);
    }
  }
  await sharp(rgb, { raw: { width: w, height: h, channels: 3 } }).png().toFile(file);
  if (maskFile) await sharp(mask, { raw: { width: w, height: h, channels: 1 } }).png().toFile(maskFile);
}

let imagesDir: string;
const savedCache = process.env.HF_HUB_CACHE;
beforeAll(async () => {
  tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'si-eval-'));
  // the default CLIP/DINO come from the Hugging Face cache: keep this machine's cache out of the tests
  process.env.HF_HUB_CACHE = path.join(tmp, 'no-cache');
  imagesDir = path.join(tmp, 'method-x');
  fs.mkdirSync(path.join(imagesDir, 'masks'), { recursive: true });
  await png(path.join(tmp, 'source.png'), [200, 80, 40], 1, path.join(tmp, 'source_mask.png'));
  // two prompts x two seeds (the second pair identical: DIV 0)
  await png(path.join(imagesDir, 'glasses-0.png'), [200, 80, 40], 2, path.join(imagesDir, 'masks', 'glasses-0.png'));
  await png(path.join(imagesDir, 'glasses-1.png'), [190, 90, 40], 3, path.join(imagesDir, 'masks', 'glasses-1.png'));
  await png(path.join(imagesDir, 'beach-0.png'), [210, 70, 50], 4, path.join(imagesDir, 'masks', 'beach-0.png'));
  fs.copyFileSync(path.join(imagesDir, 'beach-0.png'), path.join(imagesDir, 'beach-1.png'));
  fs.copyFileSync(path.join(imagesDir, 'masks', 'beach-0.png'), path.join(imagesDir, 'masks', 'beach-1.png'));
  fs.writeFileSync(
    path.join(imagesDir, 'prompts.txt'),
    ['# file<TAB>prompt', 'glasses-0.png\ta * face wearing sunglasses', 'glasses-1.png\ta * face wearing sunglasses', 'beach-0.png | a * face on the beach', 'beach-1.png | a * face on the beach'].join('\n'),
  );
});
afterAll(() => {
  if (savedCache === undefined) delete process.env.HF_HUB_CACHE;
  else process.env.HF_HUB_CACHE = savedCache;
  fs.rmSync(tmp, { recursive: true, force: true });
});

const models = { clip: fixture('tiny-clip'), dino: fixture('tiny-sd', 'dino'), lpips: fixture('lpips') };

describe('eval --images', () => {
  let result: EvalResult;
  const out = () => path.join(tmp, 'report');

  beforeAll(async () => {
    result = await runEval(
      {
        images: imagesDir,
        prompts: path.join(imagesDir, 'prompts.txt'),
        source: path.join(tmp, 'source.png'),
        sourceMask: path.join(tmp, 'source_mask.png'),
        masks: path.join(imagesDir, 'masks'),
        class: 'face',
        ...models,
        out: out(),
      },
      { stderr: quiet },
    );
    console.log(formatSummary(result));
  });

  test('writes metrics.json, metrics.csv, report.html and the image copies', () => {
    for (const f of ['metrics.json', 'metrics.csv', 'report.html']) expect(fs.existsSync(path.join(out(), f))).toBe(true);
    const json = JSON.parse(fs.readFileSync(path.join(out(), 'metrics.json'), 'utf8'));
    expect(json.format).toBe('singleinsert-native.eval');
    expect(Object.keys(json.summary)).toEqual([...METRICS]);
    expect(json.images).toHaveLength(4);
    for (const im of json.images) {
      expect(fs.existsSync(path.join(out(), im.reportImage))).toBe(true);
      expect(fs.existsSync(path.join(out(), im.reportMask))).toBe(true);
    }
    expect(fs.existsSync(path.join(out(), json.source.reportImage))).toBe(true);
    // no temporary files left behind
    expect(fs.readdirSync(out()).filter((f) => f.endsWith('.tmp'))).toEqual([]);
  });

  test('every metric is computed; per-prompt DIV; ESR from the presets', () => {
    for (const m of METRICS) expect(typeof result.summary[m]).toBe('number');
    expect(result.skipped).toEqual([]);
    expect(result.counts).toEqual({ images: 4, prompts: 2, editedImages: 4, imagesWithMasks: 4 });
    const byPrompt = Object.fromEntries(result.prompts.map((p) => [p.prompt, p]));
    expect(byPrompt['a * face on the beach'].metrics.DIV).toBe(0); // two identical images
    expect(byPrompt['a * face wearing sunglasses'].metrics.DIV).toBeGreaterThan(0);
    expect(result.summary.DIV).toBeCloseTo(byPrompt['a * face wearing sunglasses'].metrics.DIV! / 2, 10);
    expect(result.images[0].scoringPrompt).toBe('a face wearing sunglasses');
    expect(result.images[0].esr!.targets.map((t) => t.target)).toEqual(['sunglasses']);
    // ESR = successes / edited images, each verdict = with > without
    const verdicts = result.images.map((im) => im.esr!.targets.every((t) => t.with > t.without));
    expect(result.images.map((im) => im.esr!.success)).toEqual(verdicts);
    expect(result.summary.ESR).toBe(verdicts.filter(Boolean).length / 4);
    // summary CLIP-T is the mean over images
    expect(result.summary['CLIP-T']).toBeCloseTo(result.images.reduce((a, im) => a + im.scores['CLIP-T']!, 0) / 4, 12);
    // identical images got identical scores
    expect(result.images[2].scores).toEqual(result.images[3].scores);
  });

  test('metrics.csv: header in the paper\'s order, summary, prompt and image rows', () => {
    const lines = fs.readFileSync(path.join(out(), 'metrics.csv'), 'utf8').trimEnd().split('\r\n');
    expect(lines[0]).toBe('level,prompt,file,seed,CLIP-I-f,CLIP-I-b,DINO-f,DINO-b,CLIP-T,DIV,ESR');
    expect(lines).toHaveLength(1 + 1 + 2 + 4);
    expect(lines[1].startsWith('summary,,,,')).toBe(true);
    expect(lines[2].startsWith('prompt,a * face wearing sunglasses,,,')).toBe(true);
    expect(lines[4]).toMatch(/^image,a \* face wearing sunglasses,images\/0-glasses-0\.png,,[-\d.]+,[-\d.]+,[-\d.]+,[-\d.]+,[-\d.]+,,[01]$/);
  });

  test('report.html: self-contained (no external resources, no scripts), relative image links', () => {
    const html = fs.readFileSync(path.join(out(), 'report.html'), 'utf8');
    expect(html).not.toMatch(/(src|href)="(https?:)?\/\//);
    expect(html).not.toMatch(/<script|<link /);
    const srcs = [...html.matchAll(/<img [^>]*src="([^"]+)"/g)].map((m) => m[1]);
    expect(srcs.length).toBe(2 + 4 * 2);
    for (const s of srcs) {
      expect(path.isAbsolute(s)).toBe(false);
      expect(fs.existsSync(path.join(out(), s))).toBe(true);
    }
    const header = [...html.matchAll(/<table id="summary"><thead><tr>(.*?)<\/tr>/g)][0][1];
    expect([...header.matchAll(/<th[^>]*>([^<]+)<\/th>/g)].map((m) => m[1])).toEqual(['CLIP-I-f ↑', 'CLIP-I-b ↓', 'DINO-f ↑', 'DINO-b ↓', 'CLIP-T ↑', 'DIV ↑', 'ESR ↑']);
  });

  test('a missing metric model skips only its metrics and the report says so', async () => {
    const r = await runEval(
      {
        images: imagesDir,
        prompts: path.join(imagesDir, 'prompts.txt'),
        source: path.join(tmp, 'source.png'),
        sourceMask: path.join(tmp, 'source_mask.png'),
        class: 'face',
        clip: fixture('tiny-clip'),
        out: path.join(tmp, 'report-clip-only'),
      },
      { stderr: quiet },
    );
    // no --masks: the f/b metrics have no masked images; no DINO/LPIPS
    expect(r.summary['DINO-f']).toBeNull();
    expect(r.summary.DIV).toBeNull();
    expect(r.summary['CLIP-T']).not.toBeNull();
    expect(r.summary.ESR).not.toBeNull();
    expect(r.summary['CLIP-I-f']).toBeNull();
    expect(r.skipped.map((s) => s.metrics)).toEqual([['DINO-f', 'DINO-b'], ['DIV']]);
    expect(r.skipped.map((s) => s.reason)).toEqual(expect.arrayContaining([expect.stringContaining('no DINO model was given (--dino)'), expect.stringContaining('no LPIPS model was given (--lpips)')]));
    expect(r.notes).toContainEqual(expect.stringContaining('4 of 4 images have no mask'));
    expect(r.notes).toContainEqual(`no --dino, and facebook/dino-vits16 is not in the local Hugging Face cache (${path.join(tmp, 'no-cache')})`);
    const html = fs.readFileSync(r.files.html, 'utf8');
    expect(html).toContain('DINO-f, DINO-b skipped: no DINO model was given (--dino)');
    expect(html).toContain('DIV skipped: no LPIPS model was given (--lpips)');
  });

  test('bad invocations say what is missing', async () => {
    await expect(runEval({ out: tmp }, { stderr: quiet })).rejects.toThrow('Give either --concept <dir> (generate and score) or --images <dir> (score existing images)');
    await expect(runEval({ images: imagesDir, out: tmp }, { stderr: quiet })).rejects.toThrow('--images needs --prompts');
    await expect(runEval({ images: imagesDir, prompts: path.join(imagesDir, 'prompts.txt'), out: tmp }, { stderr: quiet })).rejects.toThrow(/source image and its mask/);
  });

  test('the CLI prints the summary table', () => {
    const r = spawnSync(
      process.execPath,
      [path.join(packageRoot, 'bin', 'singleinsert-native.js'), 'eval', '--images', imagesDir, '--prompts', path.join(imagesDir, 'prompts.txt'), '--source', path.join(tmp, 'source.png'), '--source-mask', path.join(tmp, 'source_mask.png'), '--masks', path.join(imagesDir, 'masks'), '--class', 'face', '--clip', models.clip, '--dino', models.dino, '--lpips', models.lpips, '--out', path.join(tmp, 'report-cli')],
      { encoding: 'utf8', env: { ...process.env, HF_HUB_CACHE: path.join(tmp, 'no-cache') } },
    );
    expect(r.status).toBe(0);
    const lines = r.stdout.trimEnd().split('\n');
    expect(lines[0]).toBe('CLIP-I-f ↑  CLIP-I-b ↓  DINO-f ↑  DINO-b ↓  CLIP-T ↑  DIV ↑  ESR ↑');
    expect(lines[1]).toMatch(/^(\s*-?\d\.\d{4}){7}$/);
    expect(lines[2]).toBe(`4 images, 2 prompts → ${path.join(tmp, 'report-cli', 'report.html')}`);
  });

  // ------------------------------------------------------------ the report in a browser
  const CHROMIUM = '/usr/bin/chromium';
  const browserTest = fs.existsSync(CHROMIUM) ? test : test.skip;
  if (!fs.existsSync(CHROMIUM)) console.warn(`SKIPPED the report browser test: ${CHROMIUM} is not installed (apt-get install -y chromium)`);

  browserTest('report.html opens in headless Chromium without errors, shows the table and every image', () => {
    // a copy of the report with a checker script appended: the report itself has no scripts
    const html = fs.readFileSync(path.join(out(), 'report.html'), 'utf8');
    const checker = `<script>
window.__errors = [];
window.addEventListener('error', (e) => window.__errors.push(String(e.message || (e.target && e.target.src) || e)), true);
window.addEventListener('load', () => {
  const imgs = [...document.images].map((i) => ({ src: i.getAttribute('src'), w: i.naturalWidth, complete: i.complete }));
  const rows = document.querySelectorAll('#summary tbody tr td').length;
  const pre = document.createElement('pre');
  pre.id = 'check';
  pre.textContent = JSON.stringify({ imgs, rows, cards: document.querySelectorAll('#images .card').length, errors: window.__errors });
  document.body.appendChild(pre);
});
</script>`;
    const page = path.join(out(), 'report-check.html');
    fs.writeFileSync(page, html.replace('</body>', `${checker}\n</body>`));
    const profile = fs.mkdtempSync(path.join(os.tmpdir(), 'si-chromium-'));
    const r = spawnSync(
      CHROMIUM,
      ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-component-update', '--disable-sync', '--no-first-run', `--user-data-dir=${profile}`, '--virtual-time-budget=5000', '--dump-dom', `file://${page}`],
      { encoding: 'utf8', timeout: 60000 },
    );
    fs.rmSync(profile, { recursive: true, force: true });
    fs.rmSync(page);
    const m = /<pre id="check">(.*?)<\/pre>/s.exec(r.stdout);
    if (!m) throw new Error(`no check output from Chromium (status ${r.status}): ${r.stderr.slice(-2000)}`);
    const check = JSON.parse(m[1].replace(/&quot;/g, '"').replace(/&amp;/g, '&').replace(/&lt;/g, '<').replace(/&gt;/g, '>'));
    console.log(`chromium: ${check.imgs.length} images, ${check.cards} cards, ${check.rows} summary cells, errors ${JSON.stringify(check.errors)}`);
    expect(check.errors).toEqual([]);
    expect(check.rows).toBe(7);
    expect(check.cards).toBe(4);
    expect(check.imgs.length).toBe(10);
    for (const im of check.imgs) expect({ src: im.src, loaded: im.w > 0 }).toEqual({ src: im.src, loaded: true });
  });
});

describe('eval --concept (tiny model)', () => {
  let conceptDir: string;
  beforeAll(async () => {
    conceptDir = path.join(tmp, 'concept');
    fs.mkdirSync(conceptDir);
    const emb = Float32Array.from({ length: 32 }, (_, i) => Math.sin(i) * 0.5);
    await writeSafetensors(path.join(conceptDir, 'embedding.safetensors'), { emb_params: { dtype: 'F32', shape: [1, 32], data: emb } });
    fs.copyFileSync(fixture('lora', 'lora.safetensors'), path.join(conceptDir, 'lora.safetensors'));
    fs.writeFileSync(
      path.join(conceptDir, 'concept.json'),
      JSON.stringify({
        format: 'singleinsert-native.concept',
        version: 1,
        placeholder: '*',
        classWord: 'face',
        files: { embedding: 'embedding.safetensors', lora: 'lora.safetensors', encoder: 'encoder.safetensors' },
        embedding: { key: 'emb_params', shape: [1, 32] },
        inputs: { image: fixture('cases', 'images', 'face64.png'), mask: fixture('cases', 'images', 'face64_mask.png') },
      }),
    );
  });

  test('generates edits x seeds, masks from cross-attention, and scores them', async () => {
    const out = path.join(tmp, 'concept-report');
    const r = await runEval({ concept: conceptDir, model: fixture('tiny-sd'), seeds: 2, steps: 2, scheduler: 'ddim', width: 64, height: 64, ...models, out }, { stderr: quiet });
    console.log(formatSummary(r));
    expect(r.mode).toBe('concept');
    expect(r.counts).toEqual({ images: 20, prompts: 10, editedImages: 20, imagesWithMasks: 20 });
    expect(r.images.every((im) => im.mask === 'attention')).toBe(true);
    for (const m of METRICS) expect(typeof r.summary[m]).toBe('number');
    expect(r.images[0].prompt).toBe('a * face wearing sunglasses');
    expect(r.images[0].seed).toBe(0);
    expect(r.notes[0]).toMatch(/^generated with .*tiny-sd: 10 edit prompts × seeds 0\.\.1, 2 steps, ddim, guidance 7\.5$/);
    expect(r.notes).toContainEqual(expect.stringMatching(/^LoRA .*lora\.safetensors: \d+ modules$/));
    // the grid's first image is what generate() makes with the same concept, prompt and seed
    const base = await loadPipeline(fixture('tiny-sd'));
    try {
      const concept = await base.loadConcept(conceptDir);
      const direct = await base.generate({ prompt: 'a * face wearing sunglasses', concepts: [{ concept }], seed: 0, steps: 2, scheduler: 'ddim', width: 64, height: 64 });
      const { data } = await sharp(path.join(out, 'generated', 'edit00-seed0.png')).raw().toBuffer({ resolveWithObject: true });
      expect(Buffer.compare(Buffer.from(direct.images[0].rgb), data)).toBe(0);
    } finally {
      base.dispose();
    }
    expect(fs.readdirSync(path.join(out, 'generated')).filter((f) => f.endsWith('.png'))).toHaveLength(20);
    expect(fs.readdirSync(path.join(out, 'images')).filter((f) => f.endsWith('.mask.png'))).toHaveLength(21);
  });
});
