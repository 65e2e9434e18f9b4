/**
 * `convert`: PyTorch checkpoints written byte for byte like torch.save (test/helpers/torch-save.ts)
 * -> safetensors with equal values; hostile pickles refused by name with nothing written.
 */
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { convertCheckpoints } from '../lib/convert/convert';
import { unpickle } from '../lib/convert/pickle';
import { openTorchCheckpoint } from '../lib/convert/torch-zip';
import { loadLpips } from '../lib/eval/scorers';
import { packageRoot } from '../lib/native';
import { readSafetensors } from '../lib/safetensors';
import { expectClose, loadCase } from './helpers/cases';
import { fixture } from './helpers/fixtures';
import { parameter, PickleWriter, PyValue, STORAGE, tensorV2, torchLegacy, torchZip } from './helpers/torch-save';

jest.setTimeout(60000);

let tmp: string;
beforeAll(() => {
  tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'si-convert-'));
});
afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }));

const bytesOf = (a: ArrayBufferView) => new Uint8Array(a.buffer, a.byteOffset, a.byteLength);
const f32 = (...v: number[]) => Float32Array.from(v);

// storage 0: 12 floats, viewed three ways; storage 1: halfs; 2: int64; 3: bool; 4: bf16 bits
const S0 = Float32Array.from({ length: 12 }, (_, i) => i * 0.5 - 2);
const S1 = Uint16Array.from([0x3c00, 0x4000, 0xc200]); // 1, 2, -3 in float16
const S2 = BigInt64Array.from([1n, -2n, 3n, 2n ** 40n]);
const S3 = Uint8Array.from([1, 0, 1]);
const S4 = Uint16Array.from([0x3f80, 0x4040]); // 1, 3 in bfloat16

/** A state dict like a module's: OrderedDict with `_metadata` state, parameters, strided views, nested dict, a non-tensor. */
function stateDict(legacy = false): PyValue {
  const t = (key: string, dtype: string, numel: number, offset: number, size: number[], stride: number[]) => tensorV2(key, dtype, numel, offset, size, stride, legacy);
  return {
    odict: [
      ['conv.weight', parameter(t('0', 'F32', 12, 0, [3, 4], [4, 1]))],
      ['conv.weight_t', t('0', 'F32', 12, 0, [4, 3], [1, 4])], // transposed view of the same storage
      ['conv.row2', t('0', 'F32', 12, 8, [4], [1])], // offset view
      ['conv.every_other', t('0', 'F32', 12, 1, [2, 2], [6, 2])], // non-contiguous strides
      ['half', t('1', 'F16', 3, 0, [3], [1])],
      ['ids', t('2', 'I64', 4, 0, [2, 2], [2, 1])],
      ['flag', t('3', 'BOOL', 3, 0, [3], [1])],
      ['bf', t('4', 'BF16', 2, 0, [2], [1])],
      ['scalar', t('0', 'F32', 12, 5, [], [])],
      ['step', 1234],
      ['sub', { dict: [['inner', t('0', 'F32', 12, 11, [1], [1])]] }],
    ],
    state: { dict: [['_metadata', { odict: [['', { dict: [['version', 1]] }]] }]] },
  };
}

const storages = () => ({ '0': bytesOf(S0), '1': bytesOf(S1), '2': bytesOf(S2), '3': S3, '4': bytesOf(S4) });

function checkConverted(tensors: Record<string, { dtype: string; shape: number[]; data: any }>) {
  const s = Array.from(S0);
  expect(tensors['conv.weight'].dtype).toBe('F32');
  expect(tensors['conv.weight'].shape).toEqual([3, 4]);
  expect(Array.from(tensors['conv.weight'].data)).toEqual(s);
  expect(tensors['conv.weight_t'].shape).toEqual([4, 3]);
  expect(Array.from(tensors['conv.weight_t'].data)).toEqual([0, 4, 8, 1, 5, 9, 2, 6, 10, 3, 7, 11].map((i) => s[i]));
  expect(Array.from(tensors['conv.row2'].data)).toEqual(s.slice(8, 12));
  expect(Array.from(tensors['conv.every_other'].data)).toEqual([1, 3, 7, 9].map((i) => s[i]));
  expect(tensors.half.dtype).toBe('F16');
  expect(Array.from(tensors.half.data)).toEqual(Array.from(S1));
  expect([tensors.ids.dtype, tensors.ids.shape]).toEqual(['I64', [2, 2]]);
  expect(Array.from(tensors.ids.data)).toEqual(Array.from(S2));
  expect(tensors.flag.dtype).toBe('BOOL');
  expect(Array.from(tensors.flag.data)).toEqual([1, 0, 1]);
  expect(tensors.bf.dtype).toBe('BF16');
  expect(Array.from(tensors.bf.data)).toEqual(Array.from(S4));
  expect(tensors.scalar.shape).toEqual([]);
  expect(Array.from(tensors.scalar.data)).toEqual([s[5]]);
  expect(Array.from(tensors['sub.inner'].data)).toEqual([s[11]]);
  expect(tensors.step).toBeUndefined();
}

describe('zip-format checkpoints (torch >= 1.6)', () => {
  test('every dtype, strided and offset views, parameters, nested dicts: values equal', async () => {
    const file = path.join(tmp, 'state.pth');
    fs.writeFileSync(file, torchZip(new PickleWriter().write(stateDict()).bytes(), storages()));
    const out = path.join(tmp, 'state.safetensors');
    const report = await convertCheckpoints([file], out);
    expect(report.tensors).toBe(10);
    expect(report.inputs[0].format).toBe('zip');
    expect(report.inputs[0].skipped).toEqual(['step (int)']);
    const { tensors, metadata } = await readSafetensors(out);
    expect(metadata).toEqual({ format: 'pt' });
    checkConverted(tensors);
  });

  test('a deflated data.pkl and a root folder named after the file (torch writes both ways)', async () => {
    const file = path.join(tmp, 'pytorch_model.bin');
    fs.writeFileSync(file, torchZip(new PickleWriter().write(stateDict()).bytes(), storages(), { deflatePickle: true, root: 'pytorch_model' }));
    const out = path.join(tmp, 'deflated.safetensors');
    await convertCheckpoints([file], out);
    checkConverted((await readSafetensors(out)).tensors);
  });

  test('--prefix keeps the keys under it and strips it (a Lightning .ckpt)', async () => {
    const ckpt: PyValue = { dict: [['state_dict', stateDict()], ['global_step', 7], ['epoch', 1]] };
    const file = path.join(tmp, 'model.ckpt');
    fs.writeFileSync(file, torchZip(new PickleWriter().write(ckpt).bytes(), storages()));
    const out = path.join(tmp, 'ckpt.safetensors');
    const r = await convertCheckpoints([file], out, { prefix: 'state_dict.' });
    expect(r.inputs[0].skipped).toEqual(['state_dict.step (int)', 'global_step (int)', 'epoch (int)']);
    checkConverted((await readSafetensors(out)).tensors);
  });
});

describe('legacy checkpoints (torch < 1.6)', () => {
  test('magic, sys_info, object, keys, storages: values equal', async () => {
    const file = path.join(tmp, 'legacy.pth');
    const s = storages();
    const numel: Record<string, number> = { '0': 12, '1': 3, '2': 4, '3': 3, '4': 2 };
    fs.writeFileSync(file, torchLegacy(new PickleWriter().write(stateDict(true)).bytes(), Object.fromEntries(Object.entries(s).map(([k, d]) => [k, { numel: numel[k], data: d }]))));
    const out = path.join(tmp, 'legacy.safetensors');
    const r = await convertCheckpoints([file], out);
    expect(r.inputs[0].format).toBe('legacy');
    checkConverted((await readSafetensors(out)).tensors);
  });
});

describe('LPIPS weights: torchvision alexnet + lpips alex.pth merged', () => {
  test('convert --merge gives a file the LPIPS metric loads, with the golden distances', async () => {
    // the tiny fixture's tensors, saved the way torchvision (features.* + classifier.*) and lpips (lin*) ship them
    const { tensors } = await readSafetensors(fixture('lpips', 'lpips_alex_tiny.safetensors'));
    const save = (names: string[], extra: Record<string, Float32Array> = {}) => {
      const st: Record<string, Uint8Array> = {};
      const items: Array<[PyValue, PyValue]> = [];
      const all: Array<[string, { shape: number[]; data: Float32Array }]> = [...names.map((n) => [n, tensors[n] as any] as [string, any]), ...Object.entries(extra).map(([n, d]) => [n, { shape: [d.length], data: d }] as [string, any])];
      all.forEach(([name, t], i) => {
        const shape = t.shape as number[];
        const stride = shape.map((_, d) => shape.slice(d + 1).reduce((a, b) => a * b, 1));
        st[String(i)] = bytesOf(t.data);
        items.push([name, tensorV2(String(i), 'F32', t.data.length, 0, shape, stride)]);
      });
      return torchZip(new PickleWriter().write({ odict: items }).bytes(), st);
    };
    const alexnet = path.join(tmp, 'alexnet-owt.pth');
    const alex = path.join(tmp, 'alex.pth');
    fs.writeFileSync(alexnet, save(Object.keys(tensors).filter((k) => k.startsWith('features.')), { 'classifier.1.bias': f32(1, 2, 3) }));
    fs.writeFileSync(alex, save(Object.keys(tensors).filter((k) => k.startsWith('lin'))));
    fs.mkdirSync(path.join(tmp, 'lpips'));
    const out = path.join(tmp, 'lpips', 'lpips_alex.safetensors');
    const r = await convertCheckpoints([alexnet, alex], out);
    expect(r.tensors).toBe(16);
    const model = await loadLpips(path.join(tmp, 'lpips'));
    const c = await loadCase('lpips_alex');
    const d = await model.run('forward', { in0: c.tensors['input.in0'], in1: c.tensors['input.in1'] });
    model.dispose();
    expectClose('distance (converted weights)', d.distance, c.tensors['output.distance'], 1e-5, 0);
  });

  test('overlapping keys in merged inputs are refused', async () => {
    const file = path.join(tmp, 'dup.pth');
    fs.writeFileSync(file, torchZip(new PickleWriter().write(stateDict()).bytes(), storages()));
    const out = path.join(tmp, 'dup.safetensors');
    await expect(convertCheckpoints([file, file], out)).rejects.toThrow(/Key conv\.weight is in both .*dup\.pth and .*dup\.pth; merged inputs must not overlap/);
    expect(fs.existsSync(out)).toBe(false);
  });
});

const gl = (m: string, n: string): PyValue => ({ global: [m, n] });

describe('hostile and broken files are refused, nothing is written', () => {
  const hostile: Array<[string, PyValue, RegExp]> = [
    ['os.system + REDUCE', { reduce: [gl('os', 'system'), { tuple: ['touch /tmp/pwned'] }] }, /refusing to load global os\.system from .*: only tensors and plain containers are allowed/],
    ['posix.system', { reduce: [gl('posix', 'system'), { tuple: ['id'] }] }, /refusing to load global posix\.system from /],
    ['builtins.eval', { reduce: [gl('builtins', 'eval'), { tuple: ['1+1'] }] }, /refusing to load global builtins\.eval from /],
    ['subprocess.Popen', { reduce: [gl('subprocess', 'Popen'), { tuple: [{ list: ['ls'] }] }] }, /refusing to load global subprocess\.Popen from /],
    [
      'a disallowed callable nested inside an allowed one',
      { reduce: [gl('collections', 'OrderedDict'), { tuple: [{ reduce: [{ reduce: [gl('builtins', 'getattr'), { tuple: [gl('os', 'path'), 'join'] }] }, { tuple: [] }] }] }] },
      /refusing to load global builtins\.getattr from /,
    ],
    ['reducing the result of a reduce', { reduce: [{ reduce: [gl('collections', 'OrderedDict'), { tuple: [] }] }, { tuple: [] }] }, /refusing to call a dict \(only allow-listed globals can be reduced\)/],
    [
      'an allowed global with a wrong argument shape',
      { reduce: [gl('torch._utils', '_rebuild_tensor_v2'), { tuple: ['not a storage', 0, { tuple: [2] }, { tuple: [1] }, false, { odict: [] }] }] },
      /torch\._utils\._rebuild_tensor_v2 called with unexpected arguments \(string, number, tuple\(1\), tuple\(1\), boolean, dict\)/,
    ],
    ['a storage type called like a function', { reduce: [gl('torch', 'FloatStorage'), { tuple: [] }] }, /refusing to call torch\.FloatStorage \(it is only allowed as a storage type\)/],
    ['NEWOBJ (instantiating a class)', { raw: [0x63, ...Buffer.from('collections\nOrderedDict\n'), 0x29, 0x81] }, /refusing to instantiate an object \(pickle opcode 0x81/],
    ['STACK_GLOBAL (protocol 4) of os.system', { raw: [0x8c, 2, ...Buffer.from('os'), 0x8c, 6, ...Buffer.from('system'), 0x93] }, /refusing to load global os\.system from /],
  ];

  test.each(hostile)('%s', async (_name, value, message) => {
    const file = path.join(tmp, 'evil.pth');
    fs.writeFileSync(file, torchZip(new PickleWriter().write(value).bytes(), {}));
    const out = path.join(tmp, 'evil.safetensors');
    await expect(convertCheckpoints([file], out)).rejects.toThrow(message);
    expect(fs.existsSync(out)).toBe(false);
    expect(fs.readdirSync(tmp).filter((f) => f.endsWith('.tmp'))).toEqual([]);
    expect(fs.existsSync('/tmp/pwned')).toBe(false);
  });

  test('a legacy pickle with os.system in its object is refused', async () => {
    const file = path.join(tmp, 'evil-legacy.pth');
    fs.writeFileSync(file, torchLegacy(new PickleWriter().write({ reduce: [gl('os', 'system'), { tuple: ['id'] }] }).bytes(), {}));
    await expect(convertCheckpoints([file], path.join(tmp, 'x.safetensors'))).rejects.toThrow(/refusing to load global os\.system from .*evil-legacy\.pth/);
  });

  test('a truncated zip file', async () => {
    const file = path.join(tmp, 'truncated.pth');
    const whole = torchZip(new PickleWriter().write(stateDict()).bytes(), storages());
    fs.writeFileSync(file, whole.subarray(0, Math.floor(whole.length / 2)));
    const out = path.join(tmp, 'truncated.safetensors');
    await expect(convertCheckpoints([file], out)).rejects.toThrow(/truncated\.pth is not a complete zip archive \(no end of central directory record; truncated\?\)/);
    expect(fs.existsSync(out)).toBe(false);
  });

  test('a truncated pickle inside a valid zip', async () => {
    const file = path.join(tmp, 'cut.pth');
    const pkl = new PickleWriter().write(stateDict()).bytes();
    fs.writeFileSync(file, torchZip(pkl.subarray(0, 50), storages()));
    await expect(convertCheckpoints([file], path.join(tmp, 'cut.safetensors'))).rejects.toThrow(/truncated pickle/);
  });

  test('a storage shorter than its tensor: refused, the partial output removed', async () => {
    const file = path.join(tmp, 'short.pth');
    const value: PyValue = { odict: [['w', tensorV2('0', 'F32', 12, 0, [3, 4], [4, 1])]] };
    fs.writeFileSync(file, torchZip(new PickleWriter().write(value).bytes(), { '0': bytesOf(S0).subarray(0, 16) }));
    const out = path.join(tmp, 'short.safetensors');
    await expect(convertCheckpoints([file], out)).rejects.toThrow(/storage 0 has 16 bytes, the pickle says 12 x 4/);
    expect(fs.existsSync(out)).toBe(false);
    expect(fs.readdirSync(tmp).filter((f) => f.endsWith('.tmp'))).toEqual([]);
  });

  test('a view reaching outside its storage', async () => {
    const file = path.join(tmp, 'oob.pth');
    const value: PyValue = { odict: [['w', tensorV2('0', 'F32', 12, 10, [4], [1])]] };
    fs.writeFileSync(file, torchZip(new PickleWriter().write(value).bytes(), { '0': bytesOf(S0) }));
    await expect(convertCheckpoints([file], path.join(tmp, 'oob.safetensors'))).rejects.toThrow(/reads element 13 of a 12-element storage/);
  });

  test('a zip without data.pkl', async () => {
    const { zip } = await import('./helpers/torch-save');
    const file = path.join(tmp, 'nopkl.pth');
    fs.writeFileSync(file, zip([{ name: 'archive/data/0', data: bytesOf(S0) }, { name: 'archive/version', data: Buffer.from('3\n') }]));
    await expect(convertCheckpoints([file], path.join(tmp, 'nopkl.safetensors'))).rejects.toThrow(/nopkl\.pth is a zip archive but not a PyTorch checkpoint: expected one <name>\/data\.pkl entry, found none/);
  });

  test('a file that is neither format', async () => {
    const file = path.join(tmp, 'text.pth');
    fs.writeFileSync(file, 'hello');
    await expect(convertCheckpoints([file], path.join(tmp, 'text.safetensors'))).rejects.toThrow(/is neither a zip-format nor a legacy PyTorch checkpoint/);
  });

  test('the unpickler never reaches a later opcode after a refusal (nothing is evaluated)', () => {
    // GLOBAL os.system is refused at the GLOBAL opcode itself, before its arguments are even read
    const pkl = new PickleWriter().write({ reduce: [gl('os', 'system'), { tuple: ['x'] }] }).bytes();
    expect(() => unpickle(pkl, { source: 'test', persistentLoad: () => null })).toThrow(/^refusing to load global os\.system from test/);
    expect(() => openTorchCheckpoint(path.join(tmp, 'does-not-exist.pth'))).toThrow(/the file does not exist/);
  });
});

describe('CLI', () => {
  test('convert <in> <out> --merge prints the report; a refused file exits 1 with one line', () => {
    const a = path.join(tmp, 'cli-a.pth');
    const b = path.join(tmp, 'cli-b.pth');
    fs.writeFileSync(a, torchZip(new PickleWriter().write({ odict: [['x', tensorV2('0', 'F32', 12, 0, [12], [1])]] }).bytes(), { '0': bytesOf(S0) }));
    fs.writeFileSync(b, torchZip(new PickleWriter().write({ odict: [['y', tensorV2('0', 'I64', 4, 0, [4], [1])]] }).bytes(), { '0': bytesOf(S2) }));
    const out = path.join(tmp, 'cli.safetensors');
    const cli = (...args: string[]) => spawnSync(process.execPath, [path.join(packageRoot, 'bin', 'singleinsert-native.js'), ...args], { encoding: 'utf8' });
    const r = cli('convert', a, out, '--merge', b);
    expect(r.stderr).toBe('');
    expect(r.status).toBe(0);
    expect(r.stdout).toMatch(/^wrote .*cli\.safetensors: 2 tensors, 0\.0 MiB \(1 F32, 1 I64\)\n  .*cli-a\.pth \(zip\): 1 tensors\n  .*cli-b\.pth \(zip\): 1 tensors\n$/);
    const evil = path.join(tmp, 'cli-evil.pth');
    fs.writeFileSync(evil, torchZip(new PickleWriter().write({ reduce: [gl('os', 'system'), { tuple: ['id'] }] }).bytes(), {}));
    const bad = cli('convert', evil, path.join(tmp, 'cli-evil.safetensors'));
    expect(bad.status).toBe(1);
    expect(bad.stderr).toBe(`singleinsert-native: refusing to load global os.system from ${evil} (archive/data.pkl): only tensors and plain containers are allowed\n`);
    expect(fs.existsSync(path.join(tmp, 'cli-evil.safetensors'))).toBe(false);
  });
});

// keep the storage-type table honest
test('storage names', () => {
  expect(Object.keys(STORAGE).sort()).toEqual(['BF16', 'BOOL', 'F16', 'F32', 'F64', 'I16', 'I32', 'I64', 'I8', 'U8']);
});
