#!/usr/bin/env node
// Benchmark (not a test): forward times of the tiny model's UNet, text encoder and VAE on CPU,
// and the time of one SingleInsert training step in each stage at the paper's batch sizes
// (stage I 16, stage II 4), medians of several runs, printed as one JSON object so later speed
// work has a baseline.
//   node scripts/bench-models.mjs [--model <diffusers folder>] [--runs 7] [--batch 2]
import path from 'node:path';
import { createRequire } from 'node:module';
import { fileURLToPath } from 'node:url';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const require = createRequire(import.meta.url);
const lib = require(path.join(root, 'dist', 'lib', 'index.js'));

const arg = (name, def) => {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 ? process.argv[i + 1] : def;
};
const model = path.resolve(arg('model', process.env.SINGLEINSERT_FIXTURES ? path.join(process.env.SINGLEINSERT_FIXTURES, 'tiny-sd') : path.join(root, '..', 'shared', 'fixtures', 'tiny-sd')));
const runs = Number(arg('runs', 7));
const batch = Number(arg('batch', 2));

function randn(n, seed) {
  // deterministic inputs (Box-Muller on a small LCG); speed does not depend on the values
  const out = new Float32Array(n);
  let s = seed >>> 0;
  const u = () => ((s = (1664525 * s + 1013904223) >>> 0) + 1) / 4294967297;
  for (let i = 0; i < n; i++) out[i] = Math.sqrt(-2 * Math.log(u())) * Math.cos(2 * Math.PI * u());
  return out;
}

async function time(fn) {
  await fn(); // warm-up
  const t = [];
  for (let i = 0; i < runs; i++) {
    const s = process.hrtime.bigint();
    await fn();
    t.push(Number(process.hrtime.bigint() - s) / 1e6);
  }
  t.sort((a, b) => a - b);
  return { medianMs: +t[Math.floor(t.length / 2)].toFixed(3), minMs: +t[0].toFixed(3), maxMs: +t[t.length - 1].toFixed(3) };
}

const p = await lib.loadPipeline(model);
const latent = (p.unet.config.sample_size ?? 8);
const hidden = p.textEncoder.config.hidden_size;
const channels = p.unet.config.in_channels;
const ids = { data: BigInt64Array.from({ length: batch * 77 }, (_, i) => BigInt(i % 77 === 0 ? 49406 : 49407)), shape: [batch, 77] };
const sample = { data: randn(batch * channels * latent * latent, 1), shape: [batch, channels, latent, latent] };
const context = { data: randn(batch * 77 * p.unet.config.cross_attention_dim, 2), shape: [batch, 77, p.unet.config.cross_attention_dim] };
const timestep = { data: BigInt64Array.from({ length: batch }, () => 500n), shape: [batch] };
const image = { data: randn(batch * 3 * latent * 8 * latent * 8, 3), shape: [batch, 3, latent * 8, latent * 8] };

const result = {
  benchmark: 'model forward times',
  model,
  device: 'cpu',
  batch,
  runs,
  latentSize: latent,
  textHidden: hidden,
  build: lib.buildInfo(),
  textEncoder: await time(() => p.textEncoder.run('forward', { input_ids: ids })),
  unet: await time(() => p.unet.run('forward', { sample, timestep, encoder_hidden_states: context })),
  vaeEncode: await time(() => p.vae.run('encode', { sample: image })),
  vaeDecode: await time(() => p.vae.run('decode', { latent: sample })),
};
// training steps on the fixture image (face64 + mask), at the model's own resolution
const fixtures = process.env.SINGLEINSERT_FIXTURES ?? path.join(root, '..', 'shared', 'fixtures');
const resolution = latent * 8;
const encoderConfig = lib.resolveConfig('clip_vision', { hidden_size: 32, intermediate_size: 37, num_hidden_layers: 2, num_attention_heads: 4, image_size: 32, patch_size: 8, projection_dim: hidden }, 'bench encoder');
const inputs = await lib.loadTrainingInputs({
  image: path.join(fixtures, 'cases', 'images', 'face64.png'),
  mask: path.join(fixtures, 'cases', 'images', 'face64_mask.png'),
  resolution,
  crop: 'none',
  encoderSize: 32,
});
const trainer = await lib.Trainer.create(p, { inputs, classWord: 'face', seed: 1, imageEncoder: { source: 'random', config: encoderConfig, weights: null, processor: null } });
let s1 = 0;
result.trainStage1Batch16 = await time(() => trainer.step({ stage: 1, batch: 16, lr: 1e-4, step: s1++ }));
await trainer.startStage2({ rank: 4 });
let s2 = 0;
result.trainStage2Batch4 = await time(() => trainer.step({ stage: 2, batch: 4, lr: 5e-5, step: s2++ }));
await trainer.dispose();
delete result.build.parallelInfo;
p.dispose();
console.log(JSON.stringify(result, null, 2));
