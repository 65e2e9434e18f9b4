// The Quick start's model choice: --model, then SINGLEINSERT_MODEL, then SD v1.5 in the local
// Hugging Face cache, then the embedded tiny model (the whole demo run is the README command).
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { EXAMPLE_IMAGE, EXAMPLE_MASK, findDemoModel } from '../lib/cli/commands/demo';
import { loadTrainingInputs } from '../lib/image';

describe('demo', () => {
  let tmp: string;
  beforeAll(() => {
    tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'si-demo-'));
  });
  afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }));

  test('an explicit model wins, then SINGLEINSERT_MODEL', async () => {
    expect(await findDemoModel('/models/x', { SINGLEINSERT_MODEL: '/models/y' })).toEqual({ path: '/models/x', tiny: false, label: '/models/x' });
    expect((await findDemoModel(undefined, { SINGLEINSERT_MODEL: '/models/y' })).path).toBe('/models/y');
  });

  test('SD v1.5 in the local Hugging Face cache is found', async () => {
    const snap = path.join(tmp, 'hub', 'models--runwayml--stable-diffusion-v1-5', 'snapshots', 'r1');
    fs.mkdirSync(snap, { recursive: true });
    fs.mkdirSync(path.join(tmp, 'hub', 'models--runwayml--stable-diffusion-v1-5', 'refs'));
    fs.writeFileSync(path.join(tmp, 'hub', 'models--runwayml--stable-diffusion-v1-5', 'refs', 'main'), 'r1');
    const m = await findDemoModel(undefined, { HF_HUB_CACHE: path.join(tmp, 'hub') });
    expect(m).toEqual({ path: snap, tiny: false, label: 'runwayml/stable-diffusion-v1-5 from the local Hugging Face cache' });
  });

  test('without real weights the embedded tiny model is used, and says so', async () => {
    const m = await findDemoModel(undefined, { HF_HUB_CACHE: path.join(tmp, 'empty'), SINGLEINSERT_CACHE: path.join(tmp, 'cache') });
    expect(m.tiny).toBe(true);
    expect(m.label).toContain('RANDOM weights');
    expect(fs.existsSync(path.join(m.path, 'model_index.json'))).toBe(true);
  });

  test('the bundled example image and mask are valid training inputs', async () => {
    const inputs = await loadTrainingInputs({ image: EXAMPLE_IMAGE, mask: EXAMPLE_MASK, resolution: 64, encoderSize: 32 });
    expect(inputs.image.shape).toEqual([1, 3, 64, 64]);
    expect(inputs.warnings).toEqual([]);
    const fg = (inputs.mask.data as Float32Array).reduce((a, b) => a + b, 0) / inputs.mask.data.length;
    expect(fg).toBeGreaterThan(0.1);
    expect(fg).toBeLessThan(0.9);
  });
});
