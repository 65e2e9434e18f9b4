import * as fs from 'node:fs';
import { native, NativeTensor, Tensor } from '../lib/native';
import {
  ddpmAddNoise,
  resolveSchedulerConfig,
  SCHEDULER_NAMES,
  schedulerInfo,
  schedulerTrajectory,
} from '../lib/schedulers';
import * as path from 'node:path';
import { diff, expectClose, GoldenCase } from './helpers/cases';
import { fixture } from './helpers/fixtures';

// The reference trajectories are float32 and their own float32-vs-float64 error is at most 1.3e-5
// absolute on values up to 40 (README); the port repeats the reference's float32 operation order,
// so it should sit far inside rtol 1e-5. The atol only covers values that pass near 0.
const TRAJ_RTOL = 1e-5;
const TRAJ_ATOL = 1e-6;
// add_noise is two multiplies and an add on float32 tables.
const ADD_NOISE_TOL = 1e-6;
// Hand computation in float64 against the float32 native step.
const HAND_RTOL = 1e-5;

const CONFIG_FILE = fixture('tiny-sd', 'scheduler', 'scheduler_config.json');
const rawConfig = JSON.parse(fs.readFileSync(CONFIG_FILE, 'utf8'));

// golden case prefix -> our scheduler name
const CASES: Array<[string, string]> = [
  ['pndm', 'pndm'],
  ['ddim', 'ddim'],
  ['euler', 'euler'],
  ['dpmsolver_multistep', 'dpmpp-2m'],
];

/**
 * helpers/cases.ts loadCase, except that the JSON may hold Python's `-Infinity` (the DPM-Solver
 * cases' effective_config has "lambda_min_clipped": -Infinity, which JSON.parse refuses).
 */
async function loadCase(name: string): Promise<GoldenCase> {
  const dir = fixture('cases');
  const text = fs.readFileSync(path.join(dir, `${name}.json`), 'utf8').replace(/:\s*-Infinity\b/g, ': "-Infinity"');
  const { tensors } = await native().readSafetensors(path.join(dir, `${name}.safetensors`));
  return { name, json: JSON.parse(text), tensors };
}

const numbers = (t: Tensor | ArrayLike<number | bigint>): number[] =>
  Array.from(((t as Tensor).data ?? t) as ArrayLike<number | bigint>, (v) => Number(v));

function maxAbsDiff(a: ArrayLike<number>, b: ArrayLike<number>): number {
  expect(a.length).toBe(b.length);
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i] - b[i]));
  return m;
}

describe('scheduler golden trajectories (diffusers 0.25.1, fake model eps = 0.1·x + 0.05·sin(t/100))', () => {
  for (const [prefix, name] of CASES) {
    for (const steps of [10, 25]) {
      const caseName = `scheduler_${prefix}_${steps}`;
      describe(caseName, () => {
        let golden: GoldenCase;
        beforeAll(async () => {
          golden = await loadCase(caseName);
        });

        test('resolved config equals the effective config of the reference', () => {
          const resolved = resolveSchedulerConfig(rawConfig, CONFIG_FILE, name);
          const effective = golden.json.call.effective_config;
          for (const [key, value] of Object.entries(resolved)) {
            if (key === 'scheduler') continue;
            expect([key, effective[key]]).toEqual([key, value]);
          }
          if (name === 'dpmpp-2m') expect(effective.lambda_min_clipped).toBe('-Infinity');
        });

        test('timesteps, sigmas and init_noise_sigma', () => {
          const info = schedulerInfo(name, rawConfig, steps, CONFIG_FILE);
          const ts = golden.tensors['output.timesteps'];
          expect(numbers(info.timesteps)).toEqual(numbers(ts));
          expect(info.timestepDtype).toBe(ts.dtype);
          expect(info.numModelCalls).toBe(ts.shape[0]);
          expect(info.initNoiseSigma).toBe(numbers(golden.tensors['output.init_noise_sigma'])[0]);
          const sigmas = golden.tensors['output.sigmas'];
          if (sigmas) {
            const d = maxAbsDiff(info.sigmas!, numbers(sigmas));
            // eslint-disable-next-line no-console
            console.log(`${caseName} sigmas: max abs ${d.toExponential(2)}`);
            expect(numbers(info.sigmas!)).toEqual(numbers(sigmas));
          } else {
            expect(info.sigmas).toBeUndefined();
          }
        });

        test('trajectory, model inputs and model outputs', async () => {
          const out = await schedulerTrajectory(name, rawConfig, steps, golden.tensors['input.noise'], {}, CONFIG_FILE);
          expect(numbers(out.timesteps)).toEqual(numbers(golden.tensors['output.timesteps']));
          for (const key of ['trajectory', 'model_inputs', 'model_outputs'] as const) {
            expectClose(`${caseName} ${key}`, out[key], golden.tensors[`output.${key}`], TRAJ_ATOL, TRAJ_RTOL);
          }
        });
      });
    }
  }

  test('concurrent runs do not share state (fresh scheduler per call)', async () => {
    const golden = await loadCase('scheduler_pndm_10');
    const noise = golden.tensors['input.noise'];
    const runs = await Promise.all([1, 2, 3].map(() => schedulerTrajectory('pndm', rawConfig, 10, noise)));
    for (const r of runs) expect(numbers(r.trajectory)).toEqual(numbers(runs[0].trajectory));
    expectClose('pndm_10 concurrent', runs[2].trajectory, golden.tensors['output.trajectory'], TRAJ_ATOL, TRAJ_RTOL);
  });
});

describe('DDPM training tables (scheduler_ddpm_add_noise)', () => {
  let golden: GoldenCase;
  beforeAll(async () => {
    golden = await loadCase('scheduler_ddpm_add_noise');
  });

  test('betas and alphas_cumprod equal the float32 reference tables', () => {
    const info = schedulerInfo('ddpm', rawConfig, 1, CONFIG_FILE);
    for (const [key, ours] of [['betas', info.betas], ['alphas_cumprod', info.alphasCumprod]] as const) {
      const d = maxAbsDiff(ours, numbers(golden.tensors[`output.${key}`]));
      // eslint-disable-next-line no-console
      console.log(`ddpm ${key}: max abs ${d.toExponential(2)}`);
      expect(Array.from(ours)).toEqual(numbers(golden.tensors[`output.${key}`]));
    }
  });

  test('add_noise', async () => {
    const t = golden.tensors;
    const out = await ddpmAddNoise(rawConfig, t['input.x0'], t['input.noise'], t['input.timesteps'], CONFIG_FILE);
    expectClose('ddpm add_noise', out, t['output.noisy'], ADD_NOISE_TOL, ADD_NOISE_TOL);
  });

  test('add_noise refuses float timesteps and timesteps outside the schedule', async () => {
    const t = golden.tensors;
    await expect(ddpmAddNoise(rawConfig, t['input.x0'], t['input.noise'], { dtype: 'F32', shape: [2], data: new Float32Array([1, 2]) })).rejects.toThrow(
      'Expected an int64 tensor (BigInt64Array data) for timesteps but received Float32Array',
    );
    await expect(
      ddpmAddNoise(rawConfig, t['input.x0'], t['input.noise'], { dtype: 'I64', shape: [2], data: new BigInt64Array([0n, 1000n]) }),
    ).rejects.toThrow('ddpmAddNoise: add_noise: timesteps must lie in [0, 1000), got 1000 at index 1');
  });
});

describe('DDIM with eta > 0 (DDIM paper eq. 12 with sigma_t of eq. 16)', () => {
  const ETA = 0.7;
  const STEPS = 10;
  let noise: NativeTensor;
  let alphasCumprod: number[];
  let varianceNoise: Tensor;

  beforeAll(async () => {
    noise = (await loadCase('scheduler_ddim_10')).tensors['input.noise'];
    alphasCumprod = numbers((await loadCase('scheduler_ddpm_add_noise')).tensors['output.alphas_cumprod']);
    const n = noise.data.length;
    const data = new Float32Array(STEPS * n);
    for (let i = 0; i < data.length; i++) data[i] = Math.sin(1.7 * i + 0.3) * 1.3; // fixed, noise-like values
    varianceNoise = { dtype: 'F32', shape: [STEPS, ...noise.shape], data };
  });

  test('two steps match a float64 hand computation with the given variance noise', async () => {
    const out = await schedulerTrajectory('ddim', rawConfig, STEPS, noise, { eta: ETA, varianceNoise });
    const n = noise.data.length;
    // leading spacing with steps_offset 1: 901, 801, ...; previous timestep t - 1000/10
    let x = numbers(noise);
    for (const [step, t] of [[0, 901], [1, 801]]) {
      const prevT = t - 100;
      const a = alphasCumprod[t], aPrev = alphasCumprod[prevT];
      const sigma = ETA * Math.sqrt((1 - aPrev) / (1 - a)) * Math.sqrt(1 - a / aPrev);
      const z = varianceNoise.data.subarray(step * n, (step + 1) * n) as Float32Array;
      const next = new Array<number>(n);
      for (let i = 0; i < n; i++) {
        const eps = 0.1 * x[i] + 0.05 * Math.sin(t / 100);
        const x0 = (x[i] - Math.sqrt(1 - a) * eps) / Math.sqrt(a);
        next[i] = Math.sqrt(aPrev) * x0 + Math.sqrt(1 - aPrev - sigma * sigma) * eps + sigma * z[i];
      }
      x = next;
      const shape = [1, ...noise.shape];
      const actual: Tensor = { shape, data: new Float32Array(out.trajectory.data.subarray((step + 1) * n, (step + 2) * n) as Float32Array) };
      expectClose(`ddim eta=${ETA} step ${step} (t=${t})`, actual, { shape, data: Float64Array.from(x) }, TRAJ_ATOL, HAND_RTOL);
    }
  });

  test('a seed gives a reproducible stochastic trajectory, different from eta = 0', async () => {
    const [a, b, c, det] = await Promise.all([
      schedulerTrajectory('ddim', rawConfig, STEPS, noise, { eta: ETA, seed: 42 }),
      schedulerTrajectory('ddim', rawConfig, STEPS, noise, { eta: ETA, seed: 42 }),
      schedulerTrajectory('ddim', rawConfig, STEPS, noise, { eta: ETA, seed: 43 }),
      schedulerTrajectory('ddim', rawConfig, STEPS, noise),
    ]);
    expect(numbers(a.trajectory)).toEqual(numbers(b.trajectory));
    expect(diff(a.trajectory, c.trajectory, 0, 0).maxAbs).toBeGreaterThan(1e-3);
    expect(diff(a.trajectory, det.trajectory, 0, 0).maxAbs).toBeGreaterThan(1e-3);
  });

  test('eta > 0 needs a seed or the noise; eta only applies to ddim', async () => {
    await expect(schedulerTrajectory('ddim', rawConfig, STEPS, noise, { eta: ETA })).rejects.toThrow(
      'Expected an integer (or varianceNoise) when eta > 0 for seed but received undefined',
    );
    await expect(schedulerTrajectory('euler', rawConfig, STEPS, noise, { eta: ETA, seed: 1 })).rejects.toThrow(
      'Expected 0 with the euler scheduler (eta applies to ddim only) for eta but received 0.7',
    );
    await expect(schedulerTrajectory('ddim', rawConfig, STEPS, noise, { eta: 1.5, seed: 1 })).rejects.toThrow(
      'Expected number between 0 and 1 for eta but received 1.5',
    );
    await expect(schedulerTrajectory('ddim', rawConfig, STEPS, noise, { varianceNoise })).rejects.toThrow(
      'Expected a number above 0 when varianceNoise is given for eta but received 0',
    );
    const wrong = { dtype: 'F32' as const, shape: [STEPS - 1, ...noise.shape], data: new Float32Array((STEPS - 1) * noise.data.length) };
    await expect(schedulerTrajectory('ddim', rawConfig, STEPS, noise, { eta: ETA, varianceNoise: wrong })).rejects.toThrow(
      /^schedulerTrajectory\(ddim\): noise per step must be \[10, \[1, 4, 8, 8\]\], got \[9, 1, 4, 8, 8\]/,
    );
  });
});

describe('argument and config validation', () => {
  test('scheduler names', () => {
    expect(SCHEDULER_NAMES).toEqual(['ddim', 'pndm', 'euler', 'dpmpp-2m']);
    expect(() => schedulerInfo('lms', rawConfig, 10)).toThrow('Expected one of ddim, pndm, euler, dpmpp-2m for scheduler but received "lms"');
    expect(() => schedulerInfo(7 as any, rawConfig, 10)).toThrow('Expected one of ddim, pndm, euler, dpmpp-2m for scheduler but received 7');
    expect(schedulerInfo('dpmsolver_multistep', rawConfig, 10).name).toBe('dpmpp-2m');
  });

  test('steps', () => {
    for (const steps of [0, -3, 2.5, 1001, NaN]) {
      expect(() => schedulerInfo('ddim', rawConfig, steps)).toThrow(`Expected integer between 1 and 1000 for steps but received ${steps}`);
    }
    expect(() => schedulerInfo('euler', { ...rawConfig, num_train_timesteps: 50 }, 51)).toThrow('Expected integer between 1 and 50 for steps but received 51');
    // the extremes are valid
    expect(numbers(schedulerInfo('pndm', rawConfig, 1).timesteps)).toEqual([1]);
    expect(numbers(schedulerInfo('euler', rawConfig, 1).timesteps)).toEqual([0]);
    expect(numbers(schedulerInfo('dpmpp-2m', rawConfig, 1).timesteps)).toEqual([999]);
    expect(schedulerInfo('dpmpp-2m', rawConfig, 1000).numModelCalls).toBe(1000);
    // as in diffusers, "leading" + steps_offset 1 runs past the table at 1000 steps (refused up front here)
    expect(() => schedulerInfo('ddim', rawConfig, 1000)).toThrow(
      'schedulerInfo(ddim): ddim: timestep 1000 is outside the 1000-step training schedule (steps_offset 1 with 1000 steps)',
    );
  });

  test('class defaults: a key a scheduler does not have is not checked', () => {
    // DDIM's clip_sample default is true: refused when the file does not say false ...
    const { clip_sample: _omit, ...noClip } = rawConfig;
    expect(() => resolveSchedulerConfig(noClip, 'cfg.json', 'ddim')).toThrow(
      'cfg.json: config key "clip_sample" is true, expected false (this value is not supported)',
    );
    // ... while Euler has no clip_sample at all
    expect(resolveSchedulerConfig({ ...rawConfig, clip_sample: true }, 'cfg.json', 'euler').clip_sample).toBeUndefined();
    // the default scheduler is the file's class
    expect(resolveSchedulerConfig(rawConfig, 'cfg.json').scheduler).toBe('pndm');
    expect(() => resolveSchedulerConfig({ ...rawConfig, _class_name: 'LMSDiscreteScheduler' }, 'cfg.json')).toThrow(
      'cfg.json: config key "_class_name" is "LMSDiscreteScheduler", expected one of DDIMScheduler, PNDMScheduler, EulerDiscreteScheduler, DPMSolverMultistepScheduler, DDPMScheduler (or name the scheduler)',
    );
    // a config that says "leading" gives Euler leading timesteps (+ steps_offset) and sqrt(sigma_max² + 1)
    const leading = schedulerInfo('euler', { ...rawConfig, timestep_spacing: 'leading' }, 10);
    expect(Array.from(leading.timesteps)).toEqual([901, 801, 701, 601, 501, 401, 301, 201, 101, 1]);
    expect(leading.initNoiseSigma).toBeCloseTo(Math.sqrt(leading.sigmas![0] ** 2 + 1), 5);
  });

  const refused: Array<[string, Record<string, unknown>, string, string]> = [
    ['ddim', { beta_schedule: 'squaredcos_cap_v2' }, 'beta_schedule', '"squaredcos_cap_v2", expected "scaled_linear" or "linear"'],
    ['euler', { prediction_type: 'v_prediction' }, 'prediction_type', '"v_prediction", expected "epsilon"'],
    ['pndm', { skip_prk_steps: false }, 'skip_prk_steps', 'false, expected true (the Runge-Kutta warm-up steps are not supported)'],
    ['ddim', { clip_sample: true }, 'clip_sample', 'true, expected false'],
    ['ddim', { timestep_spacing: 'trailing' }, 'timestep_spacing', '"trailing", expected "leading" or "linspace"'],
    ['pndm', { trained_betas: [0.1, 0.2] }, 'trained_betas', '[0.1,0.2], expected null'],
    ['euler', { use_karras_sigmas: true }, 'use_karras_sigmas', 'true, expected false'],
    ['dpmpp-2m', { algorithm_type: 'sde-dpmsolver++' }, 'algorithm_type', '"sde-dpmsolver++", expected "dpmsolver++"'],
    ['dpmpp-2m', { solver_order: 3 }, 'solver_order', '3, expected 1 or 2'],
    ['dpmpp-2m', { solver_type: 'heun' }, 'solver_type', '"heun", expected "midpoint"'],
    ['dpmpp-2m', { lambda_min_clipped: -5.1 }, 'lambda_min_clipped', '-5.1, expected -Infinity'],
    ['ddim', { steps_offset: -1 }, 'steps_offset', '-1, expected a non-negative integer'],
    ['ddim', { num_train_timesteps: 1 }, 'num_train_timesteps', '1, expected an integer >= 2'],
  ];
  test.each(refused)('%s refuses %j', (name, change, key, message) => {
    expect(() => schedulerInfo(name, { ...rawConfig, ...change }, 10, 'cfg.json')).toThrow(
      `cfg.json: config key "${key}" is ${message} (this value is not supported)`,
    );
  });

  test('the native side refuses a config resolved for another scheduler', () => {
    const forPndm = JSON.stringify(resolveSchedulerConfig(rawConfig, 'cfg.json', 'pndm'));
    expect(() => (native() as any).schedulerInfo('euler', forPndm, 10)).toThrow(
      'schedulerInfo(euler): the config was resolved for pndm, not for euler (resolve the raw config with resolveSchedulerConfig(raw, source, "euler"))',
    );
    expect(() => (native() as any).schedulerInfo('lms', forPndm, 10)).toThrow(
      'schedulerInfo(lms): unknown scheduler "lms" (expected ddim, pndm, euler, dpmpp-2m or ddpm)',
    );
    const broken = JSON.stringify({ ...JSON.parse(forPndm), skip_prk_steps: false });
    expect(() => (native() as any).schedulerInfo('pndm', broken, 10)).toThrow(
      'schedulerInfo(pndm): config key "skip_prk_steps" is false, expected true (the other value is not supported)',
    );
  });
});
