/**
 * Device information (buildInfo's CUDA fields, memoryStats, mathOptions) and random-weight models
 * (lib/random-model.ts, native/random_init.h), on the CPU.
 */
import { buildInfo, memoryStats, resetPeakMemory } from '../lib/info';
import { native } from '../lib/native';
import { loadRandomModel, loadRandomPipeline, TINY_CONFIGS } from '../lib/random-model';
import * as path from 'node:path';

describe('buildInfo, memoryStats, mathOptions', () => {
  test('buildInfo has the CUDA fields (no devices in a CPU build)', () => {
    const b = buildInfo();
    expect(typeof b.cudaExtras).toBe('boolean');
    expect(Array.isArray(b.cudaDevices)).toBe(true);
    if (!b.cudaAvailable) expect(b.cudaDevices).toEqual([]);
    for (const d of b.cudaDevices) expect(Object.keys(d).sort()).toEqual(['computeCapability', 'index', 'multiProcessors', 'name', 'totalMemoryBytes']);
  });

  test('memoryStats on the CPU: the process peak RSS, no allocator numbers; bad devices are refused', () => {
    resetPeakMemory('cpu'); // a no-op on the CPU
    const m = memoryStats('cpu');
    expect(m).toEqual({ peakAllocatedBytes: null, allocatedBytes: null, reservedBytes: null, peakRssBytes: expect.any(Number) });
    expect(m.peakRssBytes).toBeGreaterThan(10 * 2 ** 20);
    expect(() => memoryStats('gpu')).toThrow('Expected "cpu", "cuda" or "cuda:N" for device but received "gpu"');
  });

  test('mathOptions reads and sets libtorch\'s TF32 and cuDNN switches', () => {
    const before = native().mathOptions();
    expect(before).toEqual({ tf32CuDNN: expect.any(Boolean), tf32CuBLAS: expect.any(Boolean), cudnnBenchmark: expect.any(Boolean) });
    expect(native().mathOptions({ tf32: false, cudnnBenchmark: true })).toEqual(before);
    expect(native().mathOptions()).toEqual({ tf32CuDNN: false, tf32CuBLAS: false, cudnnBenchmark: true });
    // back to the cuDNN values (tf32 sets the cuBLAS switch too; it only acts on CUDA)
    native().mathOptions({ tf32: before.tf32CuDNN, cudnnBenchmark: before.cudnnBenchmark });
    expect(native().mathOptions()).toMatchObject({ tf32CuDNN: before.tf32CuDNN, cudnnBenchmark: before.cudnnBenchmark });
  });
});

describe('random-weight models', () => {
  test('a tiny random pipeline generates; the same seed gives the same weights, another seed others', async () => {
    const a = await loadRandomPipeline(TINY_CONFIGS, { seed: 1 });
    const b = await loadRandomPipeline(TINY_CONFIGS, { seed: 1 });
    const c = await loadRandomPipeline(TINY_CONFIGS, { seed: 2 });
    try {
      expect(a.unet.loadedTensors).toBe(Object.keys(await a.unet.stateDict()).length);
      const [wa, wb, wc] = await Promise.all([a, b, c].map((p) => p.unet.stateDict()));
      const bytes = (t: { data: ArrayBufferView }) => Buffer.from(t.data.buffer, t.data.byteOffset, t.data.byteLength);
      expect(Object.keys(wa).every((k) => bytes(wa[k]).equals(bytes(wb[k])))).toBe(true);
      expect(bytes(wa['conv_in.weight']).equals(bytes(wc['conv_in.weight']))).toBe(false);
      // the recipe: conv weights N(0, 1/fan_in), norm weights 1 + N(0, 0.1^2)
      const stats = (d: Float32Array) => {
        const mean = d.reduce((s, v) => s + v, 0) / d.length;
        return { mean, std: Math.sqrt(d.reduce((s, v) => s + (v - mean) ** 2, 0) / d.length) };
      };
      const conv = stats(wa['down_blocks.0.resnets.0.conv1.weight'].data as Float32Array);
      expect(conv.std).toBeCloseTo(Math.sqrt(1 / (32 * 9)), 2);
      const norm = stats(wa['down_blocks.0.resnets.0.norm1.weight'].data as Float32Array);
      expect(norm.mean).toBeCloseTo(1, 1);
      const r = await a.generate({ prompt: 'a red cube', steps: 2, width: 64, height: 64, scheduler: 'ddim', seed: 0 });
      expect(Array.from(r.images[0].float).every(Number.isFinite)).toBe(true);
      expect(a.description).toContain('random weights');
    } finally {
      for (const p of [a, b, c]) p.dispose();
    }
  });

  test('loadRandomModel in bf16 with channelsLast; weights.random refuses files', async () => {
    const unet = await loadRandomModel('unet', path.join(TINY_CONFIGS, 'unet', 'config.json'), { dtype: 'bf16', channelsLast: true, seed: 3 });
    try {
      expect(unet.dtype).toBe('bf16');
      const out = await unet.run('forward', {
        sample: { data: new Float32Array(4 * 64).fill(0.5), shape: [1, 4, 8, 8] },
        timestep: { data: BigInt64Array.of(10n), shape: [1] },
        encoder_hidden_states: { data: new Float32Array(77 * 32).fill(0.1), shape: [1, 77, 32] },
      });
      expect(out.sample.shape).toEqual([1, 4, 8, 8]);
      expect(Array.from(out.sample.data as Float32Array).every(Number.isFinite)).toBe(true);
    } finally {
      unet.dispose();
    }
    expect(() => native().loadModel('unet', '{}', { files: ['x.safetensors'], random: 1 })).toThrow('Expected no weights.files with weights.random (the weights are drawn, not read)');
    expect(() => native().loadModel('unet', '{}', { files: [], random: -1 })).toThrow('Expected a non-negative safe integer seed for weights.random');
  });
});
