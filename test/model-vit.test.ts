// Parity of the DINO ViT port (native/vit.cc) with the transformers 4.33 golden, and the full-size
// key/shape manifest built on the meta device.
import * as fs from 'node:fs';
import { resolveConfig } from '../lib/config';
import { native, NativeModelHandle } from '../lib/native';
import { expectClose, loadCase } from './helpers/cases';
import { fixture } from './helpers/fixtures';

// Single-model outputs (fixtures README, "Suggested tolerances").
const ATOL = 1e-4;
const RTOL = 1e-4;

// Resolved the way the library does it (lib/config.ts fills transformers 4.33 ViTConfig defaults).
const resolveVit = (cfg: any): any => resolveConfig('vit', cfg, 'vit config');

const readJson = (...parts: string[]) => JSON.parse(fs.readFileSync(fixture(...parts), 'utf8'));

describe('vit (DINO ViTModel, no pooler)', () => {
  const config = resolveVit(readJson('tiny-sd', 'dino', 'config.json'));
  let model: NativeModelHandle;
  beforeAll(async () => {
    model = await native().loadModel('vit', JSON.stringify(config), { files: [fixture('tiny-sd', 'dino', 'model.safetensors')] }, { device: 'cpu', dtype: 'F32' });
  });
  afterAll(() => model?.dispose());

  test('golden dino_vit: last_hidden_state, cls, hidden_states', async () => {
    const c = await loadCase('dino_vit');
    const out = await model.run('forward', { pixel_values: c.tensors['input.pixel_values'] });
    expectClose('dino_vit last_hidden_state', out.last_hidden_state, c.tensors['output.last_hidden_state'], ATOL, RTOL);
    expectClose('dino_vit cls', out.cls, c.tensors['output.cls'], ATOL, RTOL);
    for (let i = 0; i <= 2; i++) {
      expectClose(`dino_vit hidden_states.${i}`, out[`hidden_states.${i}`], c.tensors[`intermediate.hidden_states.${i}`], ATOL, RTOL);
    }
  });

  test('an input of another size is refused, naming both sizes (no position interpolation)', async () => {
    const x = { dtype: 'F32' as const, shape: [1, 3, 48, 40], data: new Float32Array(3 * 48 * 40) };
    await expect(model.run('forward', { pixel_values: x })).rejects.toThrow("input image size (48*40) doesn't match model (32*32)");
  });

  test('manifest dino_vits16.json (198 keys, 21,665,664 parameters)', () => {
    const manifest = readJson('manifests', 'dino_vits16.json');
    const described = native().describeModel('vit', JSON.stringify(resolveVit(manifest.config)));
    const shapes: Record<string, number[]> = {};
    let params = 0;
    for (const [key, shape] of described) {
      shapes[key] = shape;
      params += shape.reduce((a, b) => a * b, 1);
    }
    // eslint-disable-next-line no-console
    console.log(`dino_vits16.json: ${described.length} keys, ${params} parameters`);
    expect(described.length).toBe(198);
    expect(shapes).toEqual(manifest.shapes);
    expect(params).toBe(manifest.num_parameters);
  });

  test('unsupported hidden_act is refused', () => {
    expect(() => native().describeModel('vit', JSON.stringify({ ...config, hidden_act: 'quick_gelu' }))).toThrow(
      'config key "hidden_act" is "quick_gelu", expected "gelu"',
    );
  });
});
