#!/usr/bin/env node
// Summarises a scripts/gpu-check.sh run: reads the stage table, the jest JSON, the GPU test log (the
// measured differences the tests print), the benchmark JSONs and the build log from <dir>, and writes
// <dir>/gpu-check.json and <dir>/gpu-check.md.
//   node scripts/gpu-check-summary.mjs <dir>
import fs from 'node:fs';
import path from 'node:path';

const dir = path.resolve(process.argv[2] ?? 'gpu-check');
const read = (name) => (fs.existsSync(path.join(dir, name)) ? fs.readFileSync(path.join(dir, name), 'utf8') : null);
const readJson = (name) => {
  const text = read(name);
  if (text === null) return null;
  try {
    return JSON.parse(text);
  } catch (e) {
    return { unreadable: `${name}: ${e.message}` };
  }
};
const tail = (text, n) => (text ?? '').trimEnd().split('\n').slice(-n).join('\n');
const gib = (b) => (typeof b === 'number' ? `${(b / 2 ** 30).toFixed(2)} GiB` : '—');
const num = (v, digits = 3) => (typeof v === 'number' ? v.toFixed(digits) : '—');

// 1. stages
const stages = (read('stages.tsv') ?? '')
  .trim()
  .split('\n')
  .filter(Boolean)
  .map((line) => {
    const [name, status, seconds, rc] = line.split('\t');
    return { name, status, seconds: Number(seconds), rc };
  });
const stage = (name) => [...stages].reverse().find((s) => s.name === name);

// 2. tests
const jest = readJson('gpu-tests.json');
const tests = jest && !jest.unreadable
  ? {
      passed: jest.numPassedTests,
      failed: jest.numFailedTests,
      skipped: jest.numPendingTests,
      total: jest.numTotalTests,
      results: jest.testResults.flatMap((f) => f.assertionResults.map((a) => ({ test: a.fullName, status: a.status, ms: a.duration ?? null }))),
      failures: jest.testResults.flatMap((f) =>
        f.assertionResults.filter((a) => a.status === 'failed').map((a) => ({ test: a.fullName, message: a.failureMessages.join('\n').split('\n').slice(0, 12).join('\n') })),
      ),
      suiteError: jest.testResults.map((f) => f.failureMessage).filter((m) => m && jest.numFailedTests === 0).join('\n').slice(0, 2000) || null,
    }
  : null;
// the differences the tests measured (their console.log lines)
const measured = (read('gpu-tests.log') ?? '')
  .split('\n')
  .map((l) => l.trim())
  .filter((l) => /max abs|relative norm|relative to max|training on|memoryStats|libtorch .*CUDA|warnings/.test(l) && !l.startsWith('at '));

// 3. benchmarks
const bench = readJson('bench-gpu.json');
const pytorch = readJson('bench-pytorch.json');
const variants = bench?.variants
  ? Object.fromEntries(
      Object.entries(bench.variants).map(([name, v]) => [
        name,
        {
          recipeSec: v.train?.recipeSec ?? null,
          stage1SecPerStep: v.train?.stage1?.secPerStep ?? null,
          stage2SecPerStep: v.train?.stage2?.secPerStep ?? null,
          gradCheckpointing: v.train?.gradCheckpointing ?? null,
          trainError: v.train?.error ?? null,
          stage1PeakBytes: v.train?.stage1?.peakMemoryBytes ?? null,
          stage2PeakBytes: v.train?.stage2?.peakMemoryBytes ?? null,
          skippedSteps: (v.train?.stage1?.skippedSteps ?? 0) + (v.train?.stage2?.skippedSteps ?? 0),
          generateItPerSec: v.generate?.itPerSec ?? null,
          generatePeakBytes: v.generate?.peakMemoryBytes ?? null,
          generateError: v.generate?.error ?? null,
          warnings: v.generate?.warnings ?? [],
          meetsTargets: v.meetsTargets ?? null,
        },
      ]),
    )
  : null;

const build = stage('build');
const summary = {
  ok: build?.status === 'ok' && stage('gpu-tests')?.status === 'ok',
  dir,
  stages,
  env: tail(read('env.log'), 40),
  tests,
  measured,
  bench: bench ? { card: bench.card, torch: bench.torch, settings: bench.settings, mathOptions: bench.mathOptions, targets: bench.targets, totalSec: bench.totalSec, variants, unreadable: bench.unreadable } : null,
  pytorch,
  buildTail: build && build.status !== 'ok' ? tail(read('build.log'), 60) : null,
};
fs.writeFileSync(path.join(dir, 'gpu-check.json'), JSON.stringify(summary, null, 2) + '\n');

// 4. markdown
const md = [];
md.push(`# gpu-check: ${summary.ok ? 'build and GPU tests passed' : 'NOT OK'}`, '');
md.push('| stage | status | seconds |', '|---|---|---|');
for (const s of stages) md.push(`| ${s.name} | ${s.status} | ${s.seconds} |`);
md.push('', '## Environment', '', '```', summary.env || '(no env.log)', '```', '');
if (tests) {
  md.push(`## GPU tests: ${tests.passed} passed, ${tests.failed} failed, ${tests.skipped} skipped (of ${tests.total})`, '');
  for (const r of tests.results) md.push(`- ${r.status === 'passed' ? '✓' : r.status === 'failed' ? '✗' : '○'} ${r.test}`);
  for (const f of tests.failures) md.push('', `### ✗ ${f.test}`, '', '```', f.message, '```');
  if (tests.suiteError) md.push('', '### suite error', '', '```', tests.suiteError, '```');
  md.push('');
} else {
  md.push('## GPU tests: no result (see gpu-tests.log)', '');
}
if (measured.length) md.push('## Measured differences (from the test log)', '', '```', ...measured.slice(0, 150), '```', '');
if (bench && variants) {
  md.push(`## Benchmark (${bench.card ? `${bench.card.name}, compute capability ${bench.card.computeCapability}` : bench.settings?.device}; libtorch ${bench.torch?.version})`, '');
  md.push(`Targets: recipe (50 × stage I batch 16 + 100 × stage II batch 4, 512²) ≤ ${bench.targets?.recipeSec ?? '?'} s; generation (512², batch 1, CFG) ≥ ${bench.targets?.generateItPerSec ?? '?'} it/s.`, '');
  md.push('| variant | stage I s/step | stage II s/step | recipe s | gen it/s | peak train I / II | peak gen | notes |', '|---|---|---|---|---|---|---|---|');
  for (const [name, v] of Object.entries(variants)) {
    const notes = [v.gradCheckpointing ? 'grad checkpointing' : '', v.skippedSteps ? `${v.skippedSteps} skipped fp16 steps` : '', v.trainError ? `train: ${v.trainError}` : '', v.generateError ? `gen: ${v.generateError}` : '', ...v.warnings].filter(Boolean).join('; ');
    md.push(`| ${name} | ${num(v.stage1SecPerStep)} | ${num(v.stage2SecPerStep)} | ${num(v.recipeSec, 1)} | ${num(v.generateItPerSec, 1)} | ${gib(v.stage1PeakBytes)} / ${gib(v.stage2PeakBytes)} | ${gib(v.generatePeakBytes)} | ${notes} |`);
  }
  md.push('');
}
if (pytorch) {
  if (pytorch.available) {
    md.push(`## PyTorch baseline (torch ${pytorch.torch}, diffusers ${pytorch.diffusers}; UNet work only, see scripts/bench-pytorch.py)`, '');
    md.push('| dtype | stage I s/step | stage II s/step | recipe s | UNet calls/s (batch 2) |', '|---|---|---|---|---|');
    for (const [name, v] of Object.entries(pytorch.dtypes ?? {})) {
      md.push(`| ${name} | ${num(v.stage1?.secPerStep)} | ${num(v.stage2?.secPerStep)} | ${num(v.recipeSec, 1)} | ${num(v.generate?.itPerSec, 1)} | ${v.error ?? v.stage1?.error ?? ''}`);
    }
  } else {
    md.push(`## PyTorch baseline: not run (${pytorch.reason ?? pytorch.unreadable ?? 'unknown'})`);
  }
  md.push('');
}
if (summary.buildTail) md.push('## Build log (tail)', '', '```', summary.buildTail, '```', '');
fs.writeFileSync(path.join(dir, 'gpu-check.md'), md.join('\n') + '\n');
process.stdout.write(`wrote ${path.join(dir, 'gpu-check.json')} and gpu-check.md (${summary.ok ? 'ok' : 'not ok'})\n`);
