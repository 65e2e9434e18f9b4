import * as fs from 'node:fs';
import * as path from 'node:path';
import { native, NativeTensor, Tensor } from '../../lib/native';
import { fixturesDir } from './fixtures';

export interface GoldenCase {
  name: string;
  json: any;
  tensors: Record<string, NativeTensor>;
}

/** Reads cases/<name>.json and its safetensors file. */
export async function loadCase(name: string): Promise<GoldenCase> {
  const dir = path.join(fixturesDir(), 'cases');
  // Python's json writes -Infinity/Infinity/NaN (e.g. DPM-Solver's lambda_min_clipped), which JSON.parse rejects
  const text = fs.readFileSync(path.join(dir, `${name}.json`), 'utf8').replace(/(?<=[:\[,]\s*)(-?Infinity|NaN)(?=\s*[,\]}])/g, '"$1"');
  const json = JSON.parse(text);
  const { tensors } = await native().readSafetensors(path.join(dir, `${name}.safetensors`));
  return { name, json, tensors };
}

export interface Diff {
  maxAbs: number;
  maxRel: number;
  /** worst |a-b| - (atol + rtol*|b|), <= 0 when within tolerance */
  worstExcess: number;
}

function toNumbers(t: Tensor): Float64Array {
  const out = new Float64Array(t.data.length);
  for (let i = 0; i < t.data.length; i++) out[i] = Number((t.data as any)[i]);
  return out;
}

/** Element-wise comparison like numpy.allclose; shapes must match exactly. */
export function diff(actual: Tensor, expected: Tensor, atol: number, rtol: number): Diff {
  expect(actual.shape).toEqual(expected.shape);
  const a = toNumbers(actual), b = toNumbers(expected);
  let maxAbs = 0, maxRel = 0, worstExcess = -Infinity;
  for (let i = 0; i < a.length; i++) {
    const d = Math.abs(a[i] - b[i]);
    if (!(d <= Infinity)) return { maxAbs: NaN, maxRel: NaN, worstExcess: Infinity };
    maxAbs = Math.max(maxAbs, d);
    maxRel = Math.max(maxRel, d / Math.max(Math.abs(b[i]), 1e-12));
    worstExcess = Math.max(worstExcess, d - (atol + rtol * Math.abs(b[i])));
  }
  return { maxAbs, maxRel, worstExcess: a.length ? worstExcess : 0 };
}

/** Asserts closeness and prints the measured differences (so a drift shows how far it went). */
export function expectClose(label: string, actual: Tensor, expected: Tensor, atol: number, rtol: number): Diff {
  const d = diff(actual, expected, atol, rtol);
  // eslint-disable-next-line no-console
  console.log(`${label}: max abs ${d.maxAbs.toExponential(2)}, max rel ${d.maxRel.toExponential(2)} (atol ${atol}, rtol ${rtol})`);
  expect(d.worstExcess).toBeLessThanOrEqual(0);
  return d;
}
