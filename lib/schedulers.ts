/**
 * Noise schedulers (diffusers 0.25.1): config resolution and typed wrappers over the native
 * bindings. The math is native (native/schedulers.cc); this file validates arguments and resolves
 * configs before anything crosses into C++.
 *
 * Resolution follows `<Scheduler>.from_config(raw scheduler_config.json)`: the keys of the target
 * scheduler's `__init__` take the file's values, missing keys take THAT scheduler's defaults, keys
 * it does not know are ignored. So the same SD v1.5 PNDM config gives DDIM/PNDM "leading" timestep
 * spacing and Euler/DPM-Solver "linspace" (their own defaults), exactly as in the golden fixtures.
 * Values we do not implement are refused with the file, the key and the value.
 */
import { describeValue, invalidParameterError, SingleInsertError } from './errors';
import { native, NativeTensor, Tensor, withCallerStack } from './native';

/** Schedulers for sampling. `dpmsolver_multistep` is accepted as an alias of `dpmpp-2m`. */
export const SCHEDULER_NAMES = ['ddim', 'pndm', 'euler', 'dpmpp-2m'] as const;
export type SchedulerName = (typeof SCHEDULER_NAMES)[number];
export const SCHEDULER_ALIASES: Readonly<Record<string, SchedulerName>> = { dpmsolver_multistep: 'dpmpp-2m' };
/** What a config can be resolved for: a sampler, or "ddpm" (the training tables: betas, alphas_cumprod, add_noise). */
export type ScheduleName = SchedulerName | 'ddpm';

const CLASS_NAMES: Readonly<Record<string, ScheduleName>> = {
  DDIMScheduler: 'ddim',
  PNDMScheduler: 'pndm',
  EulerDiscreteScheduler: 'euler',
  DPMSolverMultistepScheduler: 'dpmpp-2m',
  DDPMScheduler: 'ddpm',
};

export type Config = Record<string, unknown>;

/** A config resolved for one scheduler: every key it reads is present and supported. */
export interface ResolvedSchedulerConfig {
  scheduler: ScheduleName;
  num_train_timesteps: number;
  beta_start: number;
  beta_end: number;
  beta_schedule: 'scaled_linear' | 'linear';
  trained_betas: null;
  prediction_type: 'epsilon';
  timestep_spacing: 'leading' | 'linspace';
  steps_offset: number;
  [key: string]: unknown;
}

interface KeySpec {
  default: unknown;
  ok: (v: unknown) => boolean;
  expected: string;
}
const isInt = (v: unknown): v is number => typeof v === 'number' && Number.isInteger(v);
const is = (...allowed: unknown[]) => (v: unknown) => allowed.some((a) => a === v);
const bool = (v: unknown) => typeof v === 'boolean';
const spec = (ok: (v: unknown) => boolean, expected: string, def: unknown): KeySpec => ({ default: def, ok, expected });
const betaValue = (v: unknown) => typeof v === 'number' && v > 0 && v < 1;

// Keys of every scheduler's __init__ (same defaults in all five classes, except timestep_spacing).
const common = (spacing: 'leading' | 'linspace'): Record<string, KeySpec> => ({
  num_train_timesteps: spec((v) => isInt(v) && v >= 2, 'an integer >= 2', 1000),
  beta_start: spec(betaValue, 'a number in (0, 1)', 0.0001),
  beta_end: spec(betaValue, 'a number in (0, 1)', 0.02),
  beta_schedule: spec(is('scaled_linear', 'linear'), '"scaled_linear" or "linear"', 'linear'),
  trained_betas: spec(is(null), 'null', null),
  prediction_type: spec(is('epsilon'), '"epsilon"', 'epsilon'),
  timestep_spacing: spec(is('leading', 'linspace'), '"leading" or "linspace"', spacing),
  steps_offset: spec((v) => isInt(v) && v >= 0, 'a non-negative integer', 0),
});

// Per scheduler, the further keys of its diffusers 0.25.1 __init__ that change the result.
// (clip_sample_range, dynamic_thresholding_ratio, sample_max_value, sigma_min/sigma_max only act
// with clipping, thresholding or Karras sigmas, which are refused, so they are not read.)
const SPECS: Record<ScheduleName, Record<string, KeySpec>> = {
  // scheduling_ddim.py
  ddim: {
    ...common('leading'),
    clip_sample: spec(is(false), 'false', true),
    set_alpha_to_one: spec(bool, 'a boolean', true),
    thresholding: spec(is(false), 'false', false),
    rescale_betas_zero_snr: spec(is(false), 'false', false),
  },
  // scheduling_pndm.py
  pndm: {
    ...common('leading'),
    skip_prk_steps: spec(is(true), 'true (the Runge-Kutta warm-up steps are not supported)', false),
    set_alpha_to_one: spec(bool, 'a boolean', false),
  },
  // scheduling_euler_discrete.py
  euler: {
    ...common('linspace'),
    interpolation_type: spec(is('linear'), '"linear"', 'linear'),
    use_karras_sigmas: spec(is(false), 'false', false),
    timestep_type: spec(is('discrete'), '"discrete"', 'discrete'),
    rescale_betas_zero_snr: spec(is(false), 'false', false),
  },
  // scheduling_dpmsolver_multistep.py (0.25.1 has no final_sigmas_type: the last step goes to sigma(t=0))
  'dpmpp-2m': {
    ...common('linspace'),
    solver_order: spec(is(1, 2), '1 or 2', 2),
    algorithm_type: spec(is('dpmsolver++'), '"dpmsolver++"', 'dpmsolver++'),
    solver_type: spec(is('midpoint'), '"midpoint"', 'midpoint'),
    lower_order_final: spec(bool, 'a boolean', true),
    euler_at_final: spec(bool, 'a boolean', false),
    thresholding: spec(is(false), 'false', false),
    use_karras_sigmas: spec(is(false), 'false', false),
    use_lu_lambdas: spec(is(false), 'false', false),
    variance_type: spec(is(null), 'null', null),
  },
  // scheduling_ddpm.py: only the tables are used (training), so only the keys that shape them
  ddpm: {
    ...common('leading'),
    rescale_betas_zero_snr: spec(is(false), 'false', false),
  },
};

// Checked but not passed on: JSON cannot carry -Infinity, and only the default is implemented.
const DPM_LAMBDA_MIN_CLIPPED = 'lambda_min_clipped';

/** Canonical sampler name for a user value ("dpmsolver_multistep" -> "dpmpp-2m"). */
export function schedulerName(value: unknown): SchedulerName {
  if (typeof value === 'string') {
    if ((SCHEDULER_NAMES as readonly string[]).includes(value)) return value as SchedulerName;
    if (Object.prototype.hasOwnProperty.call(SCHEDULER_ALIASES, value)) return SCHEDULER_ALIASES[value];
  }
  throw invalidParameterError('scheduler', `one of ${SCHEDULER_NAMES.join(', ')}`, value);
}

function scheduleName(value: unknown): ScheduleName {
  return value === 'ddpm' ? 'ddpm' : schedulerName(value);
}

/**
 * Resolves a raw scheduler_config.json object for one scheduler (default: the one its
 * `_class_name` names). `source` names the file in errors.
 */
export function resolveSchedulerConfig(raw: Config, source: string, scheduler?: string): ResolvedSchedulerConfig {
  if (raw === null || typeof raw !== 'object' || Array.isArray(raw)) throw new SingleInsertError(`${source}: expected a JSON object`);
  let name: ScheduleName;
  if (scheduler !== undefined) {
    name = scheduleName(scheduler);
  } else {
    const cls = raw._class_name;
    if (typeof cls !== 'string' || !Object.prototype.hasOwnProperty.call(CLASS_NAMES, cls)) {
      throw new SingleInsertError(
        `${source}: config key "_class_name" is ${describeValue(cls)}, expected one of ${Object.keys(CLASS_NAMES).join(', ')} (or name the scheduler)`,
      );
    }
    name = CLASS_NAMES[cls];
  }
  const out: Config = { scheduler: name };
  for (const [key, s] of Object.entries(SPECS[name])) {
    const value = Object.prototype.hasOwnProperty.call(raw, key) ? raw[key] : s.default;
    if (!s.ok(value)) {
      throw new SingleInsertError(`${source}: config key "${key}" is ${JSON.stringify(value)}, expected ${s.expected} (this value is not supported)`);
    }
    out[key] = value;
  }
  if (name === 'dpmpp-2m') {
    const v = raw[DPM_LAMBDA_MIN_CLIPPED];
    if (v !== undefined && v !== null && v !== -Infinity) {
      throw new SingleInsertError(`${source}: config key "${DPM_LAMBDA_MIN_CLIPPED}" is ${JSON.stringify(v)}, expected -Infinity (this value is not supported)`);
    }
  }
  return out as ResolvedSchedulerConfig;
}

function checkSteps(steps: unknown, config: ResolvedSchedulerConfig): number {
  const max = config.num_train_timesteps;
  if (!isInt(steps) || steps < 1 || steps > max) throw invalidParameterError('steps', `integer between 1 and ${max}`, steps);
  return steps;
}

function checkTensor(value: unknown, name: string): Tensor {
  const t = value as Tensor;
  if (t === null || typeof t !== 'object' || !Array.isArray(t.shape) || !ArrayBuffer.isView(t.data)) {
    throw invalidParameterError(name, 'a tensor { data, shape }', value);
  }
  return t;
}

// ---------------------------------------------------------------- bindings

export interface SchedulerInfo {
  name: ScheduleName;
  /** the model's timesteps in call order (PNDM: one more than the steps) */
  timesteps: Float64Array;
  /** how the UNet receives them: int64, or float32 for Euler (fractional values) */
  timestepDtype: 'I64' | 'F32';
  /** Euler / DPM-Solver: numModelCalls + 1 values */
  sigmas?: Float64Array;
  initNoiseSigma: number;
  numModelCalls: number;
  betas: Float32Array;
  alphasCumprod: Float32Array;
}

export interface TrajectoryOptions {
  /** DDIM only: 0 (deterministic, default) to 1 (DDPM-like) */
  eta?: number;
  /** seed of the per-call generator that draws DDIM's variance noise when eta > 0 */
  seed?: number;
  /** DDIM with eta > 0: the variance noise per step, [numModelCalls, ...noise.shape], instead of a seed */
  varianceNoise?: Tensor;
}

export interface SchedulerTrajectory {
  timesteps: NativeTensor;
  /** [n+1, ...]: the start (noise · initNoiseSigma), then the sample after each step */
  trajectory: NativeTensor;
  model_inputs: NativeTensor;
  model_outputs: NativeTensor;
}

interface SchedulerAddon {
  schedulerInfo(name: string, configJson: string, steps: number): SchedulerInfo;
  schedulerTrajectory(name: string, configJson: string, steps: number, noise: Tensor, options?: TrajectoryOptions): Promise<SchedulerTrajectory>;
  ddpmAddNoise(configJson: string, x0: Tensor, noise: Tensor, timesteps: Tensor): Promise<NativeTensor>;
}

const addon = () => native() as unknown as SchedulerAddon;

/** Timesteps, sigmas and tables of `name` with `steps` inference steps; `config` is the raw scheduler config. */
export function schedulerInfo(name: string, config: Config, steps: number, source = 'scheduler config'): SchedulerInfo {
  const canonical = name === 'ddpm' ? 'ddpm' : schedulerName(name);
  const resolved = resolveSchedulerConfig(config, source, canonical);
  return addon().schedulerInfo(canonical, JSON.stringify(resolved), checkSteps(steps, resolved));
}

/**
 * Runs the scheduler on the golden fixtures' fake model, eps = 0.1·input + 0.05·sin(t/100),
 * recording every step: what the golden scheduler cases check.
 */
export async function schedulerTrajectory(
  name: string,
  config: Config,
  steps: number,
  noise: Tensor,
  options: TrajectoryOptions = {},
  source = 'scheduler config',
): Promise<SchedulerTrajectory> {
  const canonical = schedulerName(name);
  const resolved = resolveSchedulerConfig(config, source, canonical);
  checkSteps(steps, resolved);
  checkTensor(noise, 'noise');
  const eta = options.eta ?? 0;
  if (typeof eta !== 'number' || !(eta >= 0 && eta <= 1)) throw invalidParameterError('eta', 'number between 0 and 1', eta);
  if (eta !== 0 && canonical !== 'ddim') throw invalidParameterError('eta', `0 with the ${canonical} scheduler (eta applies to ddim only)`, eta);
  if (options.seed !== undefined && !(isInt(options.seed) && options.seed >= 0 && options.seed <= Number.MAX_SAFE_INTEGER)) {
    throw invalidParameterError('seed', 'non-negative integer', options.seed);
  }
  if (options.varianceNoise !== undefined) {
    checkTensor(options.varianceNoise, 'varianceNoise');
    if (eta === 0) throw invalidParameterError('eta', 'a number above 0 when varianceNoise is given', eta);
  }
  if (eta > 0 && options.seed === undefined && options.varianceNoise === undefined) {
    throw invalidParameterError('seed', 'an integer (or varianceNoise) when eta > 0', options.seed);
  }
  const stack = new Error();
  return withCallerStack(addon().schedulerTrajectory(canonical, JSON.stringify(resolved), steps, noise, { eta, seed: options.seed, varianceNoise: options.varianceNoise }), stack);
}

/** DDPMScheduler.add_noise: sqrt(ab[t])·x0 + sqrt(1 − ab[t])·noise with the config's betas; timesteps int64 [B]. */
export async function ddpmAddNoise(config: Config, x0: Tensor, noise: Tensor, timesteps: Tensor, source = 'scheduler config'): Promise<NativeTensor> {
  const resolved = resolveSchedulerConfig(config, source, 'ddpm');
  checkTensor(x0, 'x0');
  checkTensor(noise, 'noise');
  checkTensor(timesteps, 'timesteps');
  // (not instanceof: typed arrays from another realm, e.g. a vm context, are not instances of ours)
  if (Object.prototype.toString.call(timesteps.data) !== '[object BigInt64Array]') throw invalidParameterError('timesteps', 'an int64 tensor (BigInt64Array data)', timesteps.data);
  const stack = new Error();
  return withCallerStack(addon().ddpmAddNoise(JSON.stringify(resolved), x0, noise, timesteps), stack);
}
