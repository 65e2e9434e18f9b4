/**
 * The command line as users run it: `node bin/singleinsert-native.js ...` in a child process, with
 * the compiled dist/ (the tests run after bootstrap). Checks exit codes, stdout/stderr and that
 * errors are one line unless --verbose.
 */
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import type { FileReport, FolderReport } from '../lib/cli/commands/inspect';
import type { TokenizeResult } from '../lib/cli/commands/tokenize';
import { fixture } from './helpers/fixtures';

const root = path.resolve(__dirname, '..');
const pkg = JSON.parse(fs.readFileSync(path.join(root, 'package.json'), 'utf8'));
const tinyModels = JSON.parse(fs.readFileSync(fixture('manifests', 'tiny_models.json'), 'utf8')).models;

function cli(...args: string[]) {
  const r = spawnSync(process.execPath, ['bin/singleinsert-native.js', ...args], {
    cwd: root,
    encoding: 'utf8',
    timeout: 60000,
    env: { ...process.env, NO_COLOR: '1' },
  });
  if (r.error) throw r.error;
  return { status: r.status, stdout: r.stdout, stderr: r.stderr };
}
const STACK_LINE = /^\s+at /m;

beforeAll(() => {
  // a clear failure instead of 40 confusing ones when the TypeScript build is missing
  expect(fs.existsSync(path.join(root, 'dist', 'lib', 'cli', 'index.js'))).toBe(true);
});

describe('inspect', () => {
  test('<tiny-sd> --json prints the folder report as JSON', () => {
    const r = cli('inspect', fixture('tiny-sd'), '--json');
    expect(r.stderr).toBe('');
    expect(r.status).toBe(0);
    const report = JSON.parse(r.stdout) as FolderReport;
    expect(report.type).toBe('diffusers-folder');
    expect(report.path).toBe(fixture('tiny-sd'));
    expect(report.pipeline).toBe('StableDiffusionPipeline');
    const params = Object.fromEntries(report.components.map((c) => [c.name, c.parameters]));
    for (const name of ['unet', 'vae', 'text_encoder']) expect({ name, parameters: params[name] }).toEqual({ name, parameters: tinyModels[name].num_parameters });
    expect(report.totals.parameters).toBe(2164452 + 1028935 + 1597162);
  });

  test('<file> prints a table with totals and metadata', () => {
    const file = fixture('lora', 'lora.safetensors');
    const r = cli('inspect', file);
    expect(r.stderr).toBe('');
    expect(r.status).toBe(0);
    const lines = r.stdout.trimEnd().split('\n');
    expect(lines[0]).toBe(file);
    expect(lines[1]).toMatch(/^name\s+dtype\s+shape\s+parameters$/);
    expect(lines).toHaveLength(2 + 432 + 2);
    expect(lines).toContainEqual(expect.stringMatching(/^lora_unet_down_blocks_0_attentions_0_proj_in\.lora_down\.weight\s+F32\s+\[4, 32, 1, 1\]\s+128$/));
    expect(lines[432 + 2]).toMatch(/^432 tensors, [\d,]+ parameters \(F32 [\d,]+\), [\d,]+ bytes of data$/);
    expect(lines[432 + 3]).toMatch(/^metadata: \{.*"format":"pt".*\}$/);
  });

  test('<file> --json agrees with the table', () => {
    const file = fixture('tiny-sd-single-file', 'tiny-sd.safetensors');
    const r = cli('inspect', file, '--json');
    expect(r.status).toBe(0);
    const report = JSON.parse(r.stdout) as FileReport;
    expect(report.type).toBe('safetensors');
    expect(report.totals.tensors).toBe(710);
    expect(report.tensors).toHaveLength(710);
    expect(report.totals.parameters).toBe(2164452 + 1028935 + 1597162);
  });

  test('/nonexistent exits 1 with a one-line error and no stack trace', () => {
    const r = cli('inspect', '/nonexistent');
    expect(r.status).toBe(1);
    expect(r.stdout).toBe('');
    expect(r.stderr).toBe('singleinsert-native: /nonexistent does not exist\n');
    expect(r.stderr).not.toMatch(STACK_LINE);
  });

  test('/nonexistent --verbose shows the stack', () => {
    const r = cli('inspect', '/nonexistent', '--verbose');
    expect(r.status).toBe(1);
    expect(r.stdout).toBe('');
    expect(r.stderr).toMatch(/^singleinsert-native: SingleInsertError: \/nonexistent does not exist\n/);
    expect(r.stderr).toMatch(STACK_LINE);
    expect(r.stderr).toMatch(/at runInspect \(.*inspect\.js:\d+:\d+\)/);
  });

  test('a folder without model_index.json and a broken file fail with exit code 1', () => {
    const folder = fixture('tiny-sd', 'unet');
    const r1 = cli('inspect', folder);
    expect(r1.status).toBe(1);
    expect(r1.stderr).toBe(`singleinsert-native: ${folder} is a folder without model_index.json: expected a diffusers model folder or a .safetensors file\n`);

    const notSafetensors = fixture('tiny-sd', 'model_index.json');
    const r2 = cli('inspect', notSafetensors);
    expect(r2.status).toBe(1);
    expect(r2.stdout).toBe('');
    const [first, ...rest] = r2.stderr.trimEnd().split('\n');
    expect(first).toMatch(new RegExp(`^singleinsert-native: .*${notSafetensors.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}: header length \\d+ exceeds the limit`));
    expect(rest.join('\n')).not.toMatch(STACK_LINE);
  });

  test('missing <path> is a usage error', () => {
    const r = cli('inspect');
    expect(r.status).toBe(1);
    expect(r.stderr).toMatch(/^singleinsert-native: Not enough non-option arguments: got 0, need at least 1 \(see singleinsert-native --help\)\n$/);
  });
});

describe('version and info', () => {
  test('--version prints the package version', () => {
    const r = cli('--version');
    expect(r.status).toBe(0);
    expect(r.stderr).toBe('');
    expect(r.stdout).toBe(`${pkg.version}\n`);
  });

  test('--version --verbose adds libtorch details', () => {
    const r = cli('--version', '--verbose');
    expect(r.status).toBe(0);
    const lines = r.stdout.trimEnd().split('\n');
    expect(lines[0]).toBe(`singleinsert-native ${pkg.version}`);
    expect(lines[1]).toMatch(/^libtorch \d+\.\d+\.\d+.* \((system|python|LIBTORCH)\), (Release|Debug) build, N-API \d+$/);
  });

  test('info --json has torchVersion and the package version', () => {
    const r = cli('info', '--json');
    expect(r.status).toBe(0);
    expect(r.stderr).toBe('');
    const info = JSON.parse(r.stdout);
    expect(info.version).toBe(pkg.version);
    expect(info.torchVersion).toMatch(/^\d+\.\d+\.\d+/);
    expect(['system', 'python', 'LIBTORCH']).toContain(info.torchSource);
    expect(typeof info.cudaAvailable).toBe('boolean');
    expect(info.threads).toBeGreaterThanOrEqual(1);
  });
});

describe('usage errors', () => {
  test('an unknown command exits non-zero with a helpful one-line message', () => {
    const r = cli('frobnicate');
    expect(r.status).not.toBe(0);
    expect(r.stdout).toBe('');
    expect(r.stderr).toBe('singleinsert-native: Unknown command: frobnicate (see singleinsert-native --help)\n');
  });

  test('a near miss suggests the command', () => {
    const r = cli('inspec', fixture('tiny-sd'));
    expect(r.status).not.toBe(0);
    expect(r.stderr).toBe('singleinsert-native: Did you mean inspect? (see singleinsert-native --help)\n');
  });

  test('no command at all', () => {
    const r = cli();
    expect(r.status).not.toBe(0);
    expect(r.stderr).toBe('singleinsert-native: Name a command (see singleinsert-native --help)\n');
  });

  test('an unknown option', () => {
    const r = cli('info', '--jsn');
    expect(r.status).not.toBe(0);
    expect(r.stderr).toBe('singleinsert-native: Unknown argument: jsn (see singleinsert-native --help)\n');
  });

  test('--help lists the commands and exits 0', () => {
    const r = cli('--help');
    expect(r.status).toBe(0);
    for (const c of ['inspect <path>', 'tokenize [prompt]', 'info']) expect(r.stdout).toContain(`singleinsert-native ${c}`);
  });
});

describe('tokenize', () => {
  test('--json -- "-a cat": a prompt starting with "-" goes after --', () => {
    const r = cli('tokenize', '--json', '--', '-a cat');
    expect(r.stderr).toBe('');
    expect(r.status).toBe(0);
    const out = JSON.parse(r.stdout) as TokenizeResult;
    expect(out.tokens).toEqual(['-</w>', 'a</w>', 'cat</w>']);
    expect(out.ids).toEqual([49406, 268, 320, 2368, 49407]);
    expect(out.input_ids_77).toHaveLength(77);
    expect(out.input_ids_77.slice(0, 5)).toEqual([49406, 268, 320, 2368, 49407]);
  });

  test('-- "-a cat" --json: exits 0 and tokenizes the prompt', () => {
    // Everything after "--" is operands (POSIX), so here "--json" is read as more prompt text and
    // the table is printed; the assertions hold whether or not a later version treats it as the flag.
    const r = cli('tokenize', '--', '-a cat', '--json');
    expect(r.stderr).toBe('');
    expect(r.status).toBe(0);
    expect(r.stdout).toMatch(/-<\/w>[\s\S]*a<\/w>[\s\S]*cat<\/w>/);
  });

  test('a plain prompt prints the table', () => {
    const r = cli('tokenize', 'a photo of * face');
    expect(r.status).toBe(0);
    const lines = r.stdout.trimEnd().split('\n');
    expect(lines[0]).toMatch(/^pos\s+token\s+id$/);
    expect(lines[lines.length - 1].split(' ')).toHaveLength(77);
  });
});
