// The golden-case runner (scripts/run-case.mjs) as a user runs it: a child process per case.
import { execFileSync, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { loadComponent } from '../lib/models';
import { packageRoot } from '../lib/native';
import { readSafetensors, writeSafetensors } from '../lib/safetensors';
import { ClipTokenizer } from '../lib/tokenizer';
import { expectClose } from './helpers/cases';
import { fixture, fixturesDir } from './helpers/fixtures';

const RUNNER = path.join(packageRoot, 'scripts', 'run-case.mjs');
const run = (args: string[]) => spawnSync(process.execPath, [RUNNER, ...args], { encoding: 'utf8' });

let tmp: string;
beforeAll(() => {
  tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'si-run-case-'));
});
afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }));

// The kinds this runner supports so far; later issues add theirs (pipeline, losses, lpips).
const SUPPORTED = [
  'text_encoder', 'text_encoder_replace_star', 'unet', 'vae', 'image_encoder', 'dino_vit',
  'scheduler_ddpm_add_noise', 'scheduler_pndm_10', 'scheduler_pndm_25', 'scheduler_ddim_10', 'scheduler_ddim_25',
  'scheduler_euler_10', 'scheduler_euler_25', 'scheduler_dpmsolver_multistep_10', 'scheduler_dpmsolver_multistep_25', 'lora_outputs',
  'clip_image_processor_32', 'clip_image_processor_224', 'pipeline_ddim4', 'pipeline_pndm4', 'singleinsert_losses',
];

describe('run-case.mjs', () => {
  test.each(SUPPORTED)('%s: runs and every written tensor matches the golden', (name) => {
    const out = path.join(tmp, `${name}.safetensors`);
    const r = run(['--case', fixture('cases', `${name}.json`), '--model', fixture('tiny-sd'), '--out', out, '--compare']);
    console.log(r.stdout.trim());
    expect(r.stderr).toBe('');
    expect(r.status).toBe(0);
    expect(fs.existsSync(out)).toBe(true);
  });

  test('clip_model runs on the tiny CLIP folder', () => {
    const r = run(['--case', fixture('cases', 'clip_model.json'), '--model', fixture('tiny-clip'), '--out', path.join(tmp, 'clip.safetensors'), '--compare']);
    expect(r.status).toBe(0);
  });

  test('lpips_alex runs on the lpips folder', () => {
    const r = run(['--case', fixture('cases', 'lpips_alex.json'), '--model', fixture('lpips'), '--out', path.join(tmp, 'lpips.safetensors'), '--compare']);
    console.log(r.stdout.trim());
    expect(r.stderr).toBe('');
    expect(r.status).toBe(0);
  });

  test('writes the case outputs under the case names', async () => {
    const out = path.join(tmp, 'names.safetensors');
    execFileSync(process.execPath, [RUNNER, '--case', fixture('cases', 'vae.json'), '--model', fixture('tiny-sd'), '--out', out]);
    const names = Object.keys((await readSafetensors(out)).tensors).sort();
    const golden = JSON.parse(fs.readFileSync(fixture('cases', 'vae.json'), 'utf8'));
    const expected = Object.keys(golden.tensors).filter((k) => !k.startsWith('input.')).sort();
    expect(names).toEqual(expected);
  });

  test('works for a new case of a known kind: other prompts, no stored ids', async () => {
    const prompts = ['a dog on the beach', 'an oil painting of a * face'];
    const dir = path.join(tmp, 'cases');
    fs.mkdirSync(dir, { recursive: true });
    fs.writeFileSync(path.join(dir, 'text_encoder.json'), JSON.stringify({ name: 'text_encoder', file: 'text_encoder.safetensors', call: { prompts } }));
    await writeSafetensors(path.join(dir, 'text_encoder.safetensors'), { 'meta.unused': { dtype: 'F32', shape: [1], data: new Float32Array(1) } });
    const out = path.join(tmp, 'new.safetensors');
    const r = run(['--case', path.join(dir, 'text_encoder.json'), '--model', fixture('tiny-sd'), '--out', out]);
    expect(r.status).toBe(0);
    const written = (await readSafetensors(out)).tensors['output.last_hidden_state'];
    // the same computation through the library
    const tok = ClipTokenizer.fromDir(fixture('tiny-sd', 'tokenizer'));
    const ids = BigInt64Array.from(prompts.flatMap((p) => tok.call(p).inputIds).map(BigInt));
    const te = await loadComponent('clip_text', fixture('tiny-sd', 'text_encoder'));
    const direct = await te.run('forward', { input_ids: { data: ids, shape: [2, 77] } });
    te.dispose();
    expectClose('runner vs library', written, direct.last_hidden_state, 0, 0);
  });

  test('an unsupported kind exits with 3 and says so', () => {
    const dir = path.join(tmp, 'odd');
    fs.mkdirSync(dir, { recursive: true });
    fs.writeFileSync(path.join(dir, 'mystery_case.json'), JSON.stringify({ name: 'mystery_case', file: 'x.safetensors' }));
    const r = run(['--case', path.join(dir, 'mystery_case.json'), '--model', fixturesDir(), '--out', path.join(tmp, 'x.safetensors')]);
    expect(r.status).toBe(3);
    expect(r.stderr).toContain('case kind "mystery_case" (mystery_case) is not supported by this runner');
  });

  test('missing arguments exit with 2 and print the usage', () => {
    const r = run(['--case', 'x.json']);
    expect(r.status).toBe(2);
    expect(r.stderr).toContain('missing --model');
    expect(r.stderr).toContain('usage: node scripts/run-case.mjs');
  });
});
