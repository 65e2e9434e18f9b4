/**
 * scripts/bench-gpu.mjs in its CPU smoke mode (--device cpu --quick: the tiny configs with random
 * weights, 64², one timed step per stage; ~3 s here). The full run needs a GPU: `npm run bench:gpu`.
 */
import { spawnSync } from 'node:child_process';
import * as path from 'node:path';

const root = path.resolve(__dirname, '..');

test('bench-gpu --device cpu --quick prints one JSON object with every phase of every variant', () => {
  const r = spawnSync(process.execPath, [path.join(root, 'scripts', 'bench-gpu.mjs'), '--device', 'cpu', '--quick'], { cwd: root, encoding: 'utf8', timeout: 60000 });
  expect(r.stderr).not.toMatch(/failed|Error/);
  expect(r.status).toBe(0);
  const out = JSON.parse(r.stdout);
  expect(out.settings).toMatchObject({ device: 'cpu', quick: true, variants: ['fp32', 'bf16'], resolution: 64 });
  expect(out.torch.version).toMatch(/^\d+\.\d+/);
  for (const v of ['fp32', 'bf16']) {
    const x = out.variants[v];
    expect(x.train.precision).toMatchObject({ unet: v, vae: v, textEncoder: v, lossScaling: false });
    for (const stage of ['stage1', 'stage2']) {
      expect(x.train[stage].secPerStep).toBeGreaterThan(0);
      expect(Number.isFinite(x.train[stage].losses.total)).toBe(true);
      expect(x.train[stage].peakMemoryBytes).toBeNull(); // no CUDA allocator on the CPU
    }
    expect(x.train.recipeSec).toBeCloseTo(50 * x.train.stage1.secPerStep + 100 * x.train.stage2.secPerStep, 6);
    expect(x.generate.itPerSec).toBeGreaterThan(0);
    expect(x.generate.warnings).toEqual([]);
  }
  expect(out.peakRssBytes).toBeGreaterThan(0);
  // eslint-disable-next-line no-console
  console.log(`bench-gpu quick on the CPU: ${out.totalSec.toFixed(1)} s; fp32 recipe ${out.variants.fp32.train.recipeSec.toFixed(1)} s, bf16 ${out.variants.bf16.train.recipeSec.toFixed(1)} s (tiny model, 64²)`);
});
