/**
 * LPIPS v0.1 / AlexNet (native/lpips.h) against the golden case `lpips_alex` (lpips 0.1.4 with a
 * width-reduced random trunk), loaded the way the evaluation loads it: the conv widths read off the
 * weight file (lib/eval/scorers.ts loadLpips). Also the full-size key/shape set on the meta device.
 */
import * as path from 'node:path';
import { describeModel } from '../lib/models';
import { resolveConfig } from '../lib/config';
import { loadLpips, lpipsWeightFile } from '../lib/eval/scorers';
import { expectClose, loadCase } from './helpers/cases';
import { fixture } from './helpers/fixtures';

jest.setTimeout(120000);

describe('lpips_alex golden', () => {
  test('distance, per-layer terms and every intermediate', async () => {
    const c = await loadCase('lpips_alex');
    const model = await loadLpips(fixture('lpips'));
    try {
      expect(model.config).toEqual({ channels: [16, 48, 96, 64, 64] });
      const out = await model.run('forward', { in0: c.tensors['input.in0'], in1: c.tensors['input.in1'] });
      expectClose('distance', out.distance, c.tensors['output.distance'], 1e-5, 0);
      expectClose('per_layer', out.per_layer, c.tensors['output.per_layer'], 1e-5, 1e-4);
      for (const name of Object.keys(c.tensors).filter((k) => k.startsWith('intermediate.'))) {
        const key = name.slice('intermediate.'.length);
        expectClose(key, out[key], c.tensors[name], 1e-4, 1e-4);
      }
      // pair0 is two identical images: exactly 0
      expect((out.distance.data as Float32Array)[0]).toBe(0);
    } finally {
      model.dispose();
    }
  });

  test('a folder with one .safetensors file, or the file itself, loads', async () => {
    expect(lpipsWeightFile(fixture('lpips'))).toBe(fixture('lpips', 'lpips_alex_tiny.safetensors'));
    const m = await loadLpips(fixture('lpips', 'lpips_alex_tiny.safetensors'));
    expect(m.loadedTensors).toBe(15);
    m.dispose();
  });

  test('a file without the LPIPS keys is refused with the missing keys named', async () => {
    await expect(loadLpips(fixture('tiny-clip', 'model.safetensors'))).rejects.toThrow(/is not an LPIPS AlexNet weight file: missing features\.0\.weight/);
    await expect(loadLpips(fixture('tiny-sd'))).rejects.toThrow(/holds no \.safetensors file for LPIPS.*singleinsert-native convert/);
  });
});

describe('lpips manifest', () => {
  test('full-size AlexNet + lin layers: key -> shape on the meta device', () => {
    const config = resolveConfig('lpips', {}, 'defaults');
    expect(config).toEqual({ channels: [64, 192, 384, 256, 256] });
    const shapes = Object.fromEntries(describeModel('lpips', config));
    const C = [64, 192, 384, 256, 256];
    expect(shapes).toEqual({
      'features.0.weight': [64, 3, 11, 11],
      'features.0.bias': [64],
      'features.3.weight': [192, 64, 5, 5],
      'features.3.bias': [192],
      'features.6.weight': [384, 192, 3, 3],
      'features.6.bias': [384],
      'features.8.weight': [256, 384, 3, 3],
      'features.8.bias': [256],
      'features.10.weight': [256, 256, 3, 3],
      'features.10.bias': [256],
      ...Object.fromEntries(C.map((c, k) => [`lin${k}.model.1.weight`, [1, c, 1, 1]])),
    });
    const params = Object.values(shapes).reduce((n, s) => n + s.reduce((a, b) => a * b, 1), 0);
    // torchvision AlexNet features (2,469,696) + lpips lin layers (1,152)
    expect(params).toBe(2469696 + 1152);
  });

  test('a channels list of the wrong length is refused with the file name', () => {
    expect(() => resolveConfig('lpips', { channels: [1, 2] }, path.join('x', 'lpips.safetensors'))).toThrow(
      /lpips\.safetensors: config key "channels" is \[1,2\], expected a list of 5 positive integers/,
    );
  });
});
