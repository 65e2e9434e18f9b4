/**
 * The safetensors reader and writer (native/safetensors.cc through lib/safetensors.ts):
 * 1. round trips for every dtype, exact bytes, and the layout of what the writer produces;
 * 2. every fixture file reads back with the shapes its manifest lists;
 * 3. a corpus of malformed files, each rejected with its own message naming the file (and key);
 * 4. argument checks of writeSafetensors ("Expected ... for ... but received ...").
 */
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { SingleInsertError } from '../lib/errors';
import { DType, native, NativeTensor, Tensor, TypedArray } from '../lib/native';
import { readSafetensors, readSafetensorsHeader, writeSafetensors } from '../lib/safetensors';
import { fixture, fixturesDir } from './helpers/fixtures';

let tmp: string;
beforeAll(() => {
  tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'si-safetensors-'));
});
afterAll(() => {
  fs.rmSync(tmp, { recursive: true, force: true });
});

const bytesOf = (a: ArrayBufferView) => Buffer.from(a.buffer, a.byteOffset, a.byteLength);
const escapeRe = (s: string) => s.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
/** Case JSON files come from Python's json module, which writes bare NaN / Infinity / -Infinity. */
const parsePythonJson = (text: string) => JSON.parse(text.replace(/([:\[,]\s*)(-?Infinity|NaN)(?=\s*[,\]}])/g, '$1"$2"'));

/** The raw layout of a file: header length, header text (with its padding) and the data section. */
function rawLayout(file: string) {
  const buf = fs.readFileSync(file);
  const n = Number(buf.readBigUInt64LE(0));
  const headerText = buf.subarray(8, 8 + n).toString('utf8');
  return { buf, n, headerText, header: JSON.parse(headerText) as Record<string, any>, data: buf.subarray(8 + n) };
}

/** Keys of a JSON object in the order they appear in its text (JSON.parse would move integer-like keys first). */
function topLevelKeyOrder(headerText: string, keys: string[]): string[] {
  const pos = (k: string) => {
    const i = headerText.indexOf(JSON.stringify(k) + ':{');
    if (i < 0) throw new Error(`key ${k} not found in header`);
    return i;
  };
  return [...keys].sort((a, b) => pos(a) - pos(b));
}

/** Byte order of the UTF-8 encodings (what std::sort on std::string does). */
const utf8Order = (a: string, b: string) => Buffer.compare(Buffer.from(a, 'utf8'), Buffer.from(b, 'utf8'));

describe('round trip', () => {
  // One tensor per dtype, with the awkward values of each: signed zeros, infinities, NaN payloads,
  // denormals, extremes. F16/BF16 are bit patterns in a Uint16Array.
  const f32 = new Float32Array(12);
  f32.set([0, -0, 1.5, -2.25, Infinity, -Infinity, 3.4028234663852886e38, 1.401298464324817e-45, Math.PI, -1e-20]);
  new Uint32Array(f32.buffer).set([0x7fc00001, 0xffa00000], 10); // quiet NaN with a payload, negative signalling NaN
  const f64 = new Float64Array([0, -0, 1.5, -2.25, Infinity, -Infinity, Number.MAX_VALUE, Number.MIN_VALUE, Math.PI, NaN, 1e300, -1e-300]);
  new BigUint64Array(f64.buffer).set([0x7ff8000000000123n], 9);

  const all: Record<string, Tensor & { dtype: DType }> = {
    f64: { dtype: 'F64', shape: [3, 4], data: f64 },
    f32: { dtype: 'F32', shape: [2, 3, 2], data: f32 },
    f16: { dtype: 'F16', shape: [9], data: new Uint16Array([0x0000, 0x8000, 0x3c00, 0x7c00, 0xfc00, 0x7e01, 0x0001, 0x7bff, 0xffff]) },
    bf16: { dtype: 'BF16', shape: [3, 3], data: new Uint16Array([0x0000, 0x8000, 0x3f80, 0x7f80, 0xff80, 0x7fc1, 0x0001, 0x7f7f, 0xc049]) },
    i64: { dtype: 'I64', shape: [6], data: new BigInt64Array([0n, -1n, 2n ** 63n - 1n, -(2n ** 63n), 123456789012345678n, 2n ** 53n + 1n]) },
    i32: { dtype: 'I32', shape: [2, 2], data: new Int32Array([0, -1, 2147483647, -2147483648]) },
    i16: { dtype: 'I16', shape: [4], data: new Int16Array([0, -1, 32767, -32768]) },
    i8: { dtype: 'I8', shape: [4, 1], data: new Int8Array([0, -1, 127, -128]) },
    u8: { dtype: 'U8', shape: [5], data: new Uint8Array([0, 1, 127, 128, 255]) },
    bool: { dtype: 'BOOL', shape: [2, 2], data: new Uint8Array([1, 0, 0, 1]) },
  };

  function expectSameTensor(name: string, got: NativeTensor | undefined, want: Tensor & { dtype: DType }) {
    expect(got).toBeDefined();
    expect({ name, dtype: got!.dtype, shape: got!.shape }).toEqual({ name, dtype: want.dtype, shape: want.shape });
    // by name: the addon builds its typed arrays in Node's main realm, not in jest's sandbox
    expect(got!.data.constructor.name).toBe(want.data.constructor.name);
    expect(got!.data.length).toBe(want.data.length);
    // byte equality: -0 stays -0, NaN payloads survive, nothing is converted
    expect(bytesOf(got!.data).equals(bytesOf(want.data))).toBe(true);
  }

  test('every dtype comes back with identical values, bytes and typed array types', async () => {
    const file = path.join(tmp, 'all-dtypes.safetensors');
    await writeSafetensors(file, all);
    const back = await readSafetensors(file);
    expect(Object.keys(back.tensors).sort()).toEqual(Object.keys(all).sort());
    for (const [name, t] of Object.entries(all)) expectSameTensor(name, back.tensors[name], t);
    // plain value equality too, for the types where it is meaningful
    expect(Array.from(back.tensors.i64.data as BigInt64Array)).toEqual(Array.from(all.i64.data as BigInt64Array));
    expect(Array.from(back.tensors.u8.data as Uint8Array)).toEqual([0, 1, 127, 128, 255]);
    expect(Object.is((back.tensors.f64.data as Float64Array)[1], -0)).toBe(true);
    expect(Number.isNaN((back.tensors.f32.data as Float32Array)[10])).toBe(true);
    expect(back.metadata).toEqual({});

    const header = await readSafetensorsHeader(file);
    expect(header.metadata).toEqual({});
    for (const [name, t] of Object.entries(all)) {
      expect(header.tensors[name]).toEqual({ dtype: t.dtype, shape: t.shape, byteLength: t.data.byteLength });
    }
  });

  test('each dtype on its own (a file with a single tensor)', async () => {
    for (const [name, t] of Object.entries(all)) {
      const file = path.join(tmp, `single-${name}.safetensors`);
      await writeSafetensors(file, { [name]: t });
      const back = await readSafetensors(file);
      expect(Object.keys(back.tensors)).toEqual([name]);
      expectSameTensor(name, back.tensors[name], t);
      const { n, header, data } = rawLayout(file);
      expect(header[name]).toEqual({ dtype: t.dtype, shape: t.shape, data_offsets: [0, t.data.byteLength] });
      expect(data.length).toBe(t.data.byteLength);
      expect(data.equals(bytesOf(t.data))).toBe(true); // raw little-endian data, unchanged
      expect((8 + n) % 8).toBe(0);
    }
  });

  test('the default dtype follows the typed array', async () => {
    const file = path.join(tmp, 'defaults.safetensors');
    await writeSafetensors(file, {
      a: { shape: [2], data: new Float32Array([1, 2]) },
      b: { shape: [1], data: new Float64Array([3]) },
      c: { shape: [1], data: new BigInt64Array([4n]) },
      d: { shape: [1], data: new Int32Array([5]) },
      e: { shape: [1], data: new Int16Array([6]) },
      f: { shape: [1], data: new Int8Array([7]) },
      g: { shape: [1], data: new Uint8Array([8]) },
      h: { shape: [1], data: new Uint16Array([0x3c00]) },
    });
    const { tensors } = await readSafetensorsHeader(file);
    expect(Object.fromEntries(Object.entries(tensors).map(([k, t]) => [k, t.dtype]))).toEqual({
      a: 'F32', b: 'F64', c: 'I64', d: 'I32', e: 'I16', f: 'I8', g: 'U8', h: 'F16',
    });
  });

  test('empty tensors ([0], [2,0,3]) and 0-dim tensors ([]) keep their shapes', async () => {
    const file = path.join(tmp, 'empty-and-scalars.safetensors');
    const tensors: Record<string, Tensor & { dtype: DType }> = {
      empty: { dtype: 'F32', shape: [0], data: new Float32Array(0) },
      empty3d: { dtype: 'I64', shape: [2, 0, 3], data: new BigInt64Array(0) },
      empty_bf16: { dtype: 'BF16', shape: [0, 5], data: new Uint16Array(0) },
      scalar: { dtype: 'F32', shape: [], data: new Float32Array([0.7 * Math.log(100)]) },
      scalar_i64: { dtype: 'I64', shape: [], data: new BigInt64Array([-42n]) },
      scalar_bool: { dtype: 'BOOL', shape: [], data: new Uint8Array([1]) },
      z_after: { dtype: 'I8', shape: [3], data: new Int8Array([1, 2, 3]) },
    };
    await writeSafetensors(file, tensors);
    const back = await readSafetensors(file);
    for (const [name, t] of Object.entries(tensors)) expectSameTensor(name, back.tensors[name], t);
    const { header, data } = rawLayout(file);
    expect(header.empty).toEqual({ dtype: 'F32', shape: [0], data_offsets: [0, 0] });
    expect(header.empty3d.shape).toEqual([2, 0, 3]);
    expect(header.scalar.shape).toEqual([]);
    expect(header.scalar.data_offsets[1] - header.scalar.data_offsets[0]).toBe(4);
    expect(data.length).toBe(4 + 8 + 1 + 3);
  });

  test('a file with no tensors at all', async () => {
    const file = path.join(tmp, 'nothing.safetensors');
    await writeSafetensors(file, {});
    const { buf, n, headerText } = rawLayout(file);
    expect(n).toBe(8);
    expect(headerText).toBe('{}      ');
    expect(buf.length).toBe(16);
    expect(await readSafetensors(file)).toEqual({ metadata: {}, tensors: {} });

    const withMeta = path.join(tmp, 'only-metadata.safetensors');
    await writeSafetensors(withMeta, {}, { format: 'pt' });
    expect(await readSafetensors(withMeta)).toEqual({ metadata: { format: 'pt' }, tensors: {} });
  });

  test('metadata strings (unicode, quotes, backslashes, control characters) survive', async () => {
    const file = path.join(tmp, 'metadata.safetensors');
    const metadata = {
      format: 'pt',
      'quoted "key"': 'say "cheese"',
      backslash: 'C:\\models\\sd15\\',
      unicode: 'héllo wörld — 日本語 🚀 ﬁ',
      'ключ': 'значение',
      newline: 'line1\nline2\r\n\ttab',
      control: '\u0001\u001f',
      json: '{"a": [1, 2, {"b": null}]}',
      empty: '',
    };
    await writeSafetensors(file, { x: { shape: [1], data: new Float32Array([1]) } }, metadata);
    const back = await readSafetensors(file);
    expect(back.metadata).toEqual(metadata);
    expect((await readSafetensorsHeader(file)).metadata).toEqual(metadata);
    // the header is standard JSON that another reader parses to the same strings
    const { header } = rawLayout(file);
    expect(header.__metadata__).toEqual(metadata);
  });

  test('tensor names that need JSON escapes, and unicode names', async () => {
    const file = path.join(tmp, 'names.safetensors');
    const names = ['a"b', 'back\\slash', 'new\nline', 'tab\there', 'ctl\u0002', 'ünï', '日本', '🚀.weight', 'sp ace', '/slash/'];
    const tensors: Record<string, Tensor> = {};
    names.forEach((n, i) => (tensors[n] = { dtype: 'I32', shape: [1], data: new Int32Array([i]) }));
    await writeSafetensors(file, tensors);
    const back = await readSafetensors(file);
    expect(Object.keys(back.tensors).sort()).toEqual([...names].sort());
    names.forEach((n, i) => expect(Array.from(back.tensors[n].data as Int32Array)).toEqual([i]));
    const { header } = rawLayout(file);
    expect(Object.keys(header).sort()).toEqual([...names].sort());
  });

  test('names and metadata keys such as __proto__ and constructor are ordinary keys', async () => {
    const file = path.join(tmp, 'proto.safetensors');
    const tensors: Record<string, Tensor> = {};
    for (const [i, name] of ['__proto__', 'constructor', 'toString', 'hasOwnProperty'].entries()) {
      Object.defineProperty(tensors, name, { value: { dtype: 'I32', shape: [1], data: new Int32Array([i]) }, enumerable: true });
    }
    const metadata = JSON.parse('{"__proto__": "p", "constructor": "c"}') as Record<string, string>;
    await writeSafetensors(file, tensors, metadata);
    expect(Object.keys(rawLayout(file).header).sort()).toEqual(['__metadata__', '__proto__', 'constructor', 'hasOwnProperty', 'toString']);
    for (const back of [await readSafetensors(file), await readSafetensorsHeader(file)]) {
      expect(Object.keys(back.tensors).sort()).toEqual(['__proto__', 'constructor', 'hasOwnProperty', 'toString']);
      expect(Object.getOwnPropertyDescriptor(back.tensors, '__proto__')?.value.shape).toEqual([1]);
      expect(Object.getPrototypeOf(back.tensors)).not.toHaveProperty('dtype'); // the prototype was not replaced
      expect(Object.keys(back.metadata).sort()).toEqual(['__proto__', 'constructor']);
      expect(Object.getOwnPropertyDescriptor(back.metadata, '__proto__')?.value).toBe('p');
    }
    const full = await readSafetensors(file);
    expect(Array.from(Object.getOwnPropertyDescriptor(full.tensors, '__proto__')!.value.data)).toEqual([0]);
  });

  test('raw layout: 8-byte LE length, __metadata__ first, keys sorted, space padding, contiguous data', async () => {
    const file = path.join(tmp, 'layout.safetensors');
    // inserted out of order, with names whose byte order differs from naive expectations
    const names = ['zeta', 'b10', 'b9', 'B', 'alpha.weight', 'alpha', 'é', '_under', 'a'];
    const tensors: Record<string, Tensor> = {};
    names.forEach((n, i) => (tensors[n] = { dtype: 'F32', shape: [i + 1], data: new Float32Array(i + 1).fill(i) }));
    await writeSafetensors(file, tensors, { z: '1', a: '2' });
    const { buf, n, headerText, header, data } = rawLayout(file);

    expect(buf.readUInt32LE(4)).toBe(0); // high half of the u64 length
    expect(n % 8).toBe(0);
    expect(8 + n + data.length).toBe(buf.length);
    expect(headerText.startsWith('{"__metadata__":{"a":"2","z":"1"}')).toBe(true);
    const trimmed = headerText.replace(/ +$/, '');
    expect(trimmed.endsWith('}')).toBe(true);
    expect(n - Buffer.byteLength(trimmed)).toBeLessThan(8); // padding is only what alignment needs
    expect(headerText.slice(trimmed.length)).toMatch(/^ *$/);

    const sorted = [...names].sort(utf8Order);
    expect(sorted).toEqual(['B', '_under', 'a', 'alpha', 'alpha.weight', 'b10', 'b9', 'zeta', 'é']);
    expect(topLevelKeyOrder(headerText, names)).toEqual(sorted);
    // data is laid out in the same sorted order, back to back
    let offset = 0;
    for (const name of sorted) {
      const entry = header[name];
      expect(entry.data_offsets).toEqual([offset, offset + entry.shape[0] * 4]);
      const i = names.indexOf(name);
      expect(data.subarray(offset, offset + (i + 1) * 4).equals(bytesOf(new Float32Array(i + 1).fill(i)))).toBe(true);
      offset += entry.shape[0] * 4;
    }
    expect(offset).toBe(data.length);
  });

  test('identical input gives byte-identical files, whatever the key insertion order', async () => {
    const make = (reverse: boolean): Record<string, Tensor> => {
      const entries: Array<[string, Tensor]> = [
        ['w', { dtype: 'F32', shape: [2, 2], data: new Float32Array([1, 2, 3, 4]) }],
        ['b', { dtype: 'F16', shape: [3], data: new Uint16Array([1, 2, 3]) }],
        ['ids', { dtype: 'I64', shape: [2], data: new BigInt64Array([5n, 6n]) }],
      ];
      return Object.fromEntries(reverse ? entries.reverse() : entries);
    };
    const f1 = path.join(tmp, 'same-1.safetensors');
    const f2 = path.join(tmp, 'same-2.safetensors');
    const f3 = path.join(tmp, 'same-3.safetensors');
    await writeSafetensors(f1, make(false), { b: '2', a: '1' });
    await writeSafetensors(f2, make(false), { b: '2', a: '1' });
    await writeSafetensors(f3, make(true), { a: '1', b: '2' });
    const b1 = fs.readFileSync(f1);
    expect(b1.equals(fs.readFileSync(f2))).toBe(true);
    expect(b1.equals(fs.readFileSync(f3))).toBe(true);
  });

  test('inherited enumerable properties are not written', async () => {
    const file = path.join(tmp, 'inherited.safetensors');
    const proto = { inherited: { shape: [1], data: new Float32Array([9]) } };
    const tensors = Object.assign(Object.create(proto), { own: { shape: [1], data: new Float32Array([1]) } });
    const metadata = Object.assign(Object.create({ inheritedKey: 'x' }), { ownKey: 'y' });
    await writeSafetensors(file, tensors, metadata);
    const back = await readSafetensors(file);
    expect(Object.keys(back.tensors)).toEqual(['own']);
    expect(back.metadata).toEqual({ ownKey: 'y' });
  });

  test('subarray views are written from their own offset', async () => {
    const file = path.join(tmp, 'views.safetensors');
    const big = new Float32Array([9, 9, 1, 2, 3, 9]);
    await writeSafetensors(file, { v: { shape: [3], data: big.subarray(2, 5) } });
    const back = await readSafetensors(file);
    expect(Array.from(back.tensors.v.data as Float32Array)).toEqual([1, 2, 3]);
  });

  test('the writer leaves no temp file behind and replaces an existing file', async () => {
    const dir = fs.mkdtempSync(path.join(tmp, 'clean-'));
    const file = path.join(dir, 'out.safetensors');
    await writeSafetensors(file, { a: { shape: [1], data: new Float32Array([1]) } });
    expect(fs.readdirSync(dir)).toEqual(['out.safetensors']);
    await writeSafetensors(file, { b: { shape: [2], data: new Float32Array([2, 3]) } });
    expect(fs.readdirSync(dir)).toEqual(['out.safetensors']);
    const back = await readSafetensors(file);
    expect(Object.keys(back.tensors)).toEqual(['b']);
  });

  test('a failed rename (target is a folder) reports the file and removes the temp file', async () => {
    const dir = fs.mkdtempSync(path.join(tmp, 'rename-'));
    const target = path.join(dir, 'is-a-folder.safetensors');
    fs.mkdirSync(target);
    fs.writeFileSync(path.join(target, 'keep'), 'x');
    await expect(writeSafetensors(target, { a: { shape: [1], data: new Float32Array([1]) } })).rejects.toThrow(
      new RegExp(`${escapeRe(target)}: cannot move the finished file into place: `),
    );
    expect(fs.readdirSync(dir)).toEqual(['is-a-folder.safetensors']);
    expect(fs.readdirSync(target)).toEqual(['keep']);
  });

  test('writing into a missing folder fails clearly and creates nothing', async () => {
    const dir = fs.mkdtempSync(path.join(tmp, 'missing-'));
    const file = path.join(dir, 'no', 'such', 'folder', 'x.safetensors');
    const p = writeSafetensors(file, { a: { shape: [1], data: new Float32Array([1]) } });
    await expect(p).rejects.toThrow(SingleInsertError);
    await expect(p).rejects.toThrow(`Cannot write ${file}: the folder ${path.join(dir, 'no', 'such', 'folder')} does not exist`);
    expect(fs.readdirSync(dir)).toEqual([]);
    // the native writer alone (no JS pre-check) also refuses, naming the file
    await expect(native().writeSafetensors(file, { a: { dtype: 'F32', shape: [1], data: new Float32Array([1]) } }, {})).rejects.toThrow(
      `${file}: cannot write: No such file or directory`,
    );
    expect(fs.readdirSync(dir)).toEqual([]);
  });

  test('names the writer refuses: empty and __metadata__', async () => {
    const file = path.join(tmp, 'bad-names.safetensors');
    const t = { shape: [1], data: new Float32Array([1]) };
    await expect(writeSafetensors(file, { '': t })).rejects.toThrow(`${file}: tensor names must not be empty`);
    await expect(writeSafetensors(file, { __metadata__: t })).rejects.toThrow(`${file}: "__metadata__" is reserved and cannot name a tensor`);
    expect(fs.existsSync(file)).toBe(false);
  });
});

describe('fixtures', () => {
  function walk(dir: string): string[] {
    const out: string[] = [];
    for (const e of fs.readdirSync(dir, { withFileTypes: true })) {
      const p = path.join(dir, e.name);
      if (e.isDirectory()) out.push(...walk(p));
      else if (e.name.endsWith('.safetensors')) out.push(p);
    }
    return out.sort();
  }
  const files = walk(fixturesDir());
  const rel = (f: string) => path.relative(fixturesDir(), f);
  const shapesOf = (t: Record<string, { shape: number[] }>) => Object.fromEntries(Object.entries(t).map(([k, v]) => [k, v.shape]));
  const numel = (s: number[]) => s.reduce((a, b) => a * b, 1);

  test('the walk finds every fixture folder', () => {
    const tops = new Set(files.map((f) => rel(f).split(path.sep)[0]));
    for (const d of ['cases', 'tiny-sd', 'lora', 'lpips', 'tiny-clip', 'tiny-sd-single-file']) expect(tops).toContain(d);
    expect(files.length).toBeGreaterThanOrEqual(32);
  });

  test.each(files.map((f) => [path.relative(fixturesDir(), f), f]))('%s reads back completely', async (_name, file) => {
    const [header, full] = await Promise.all([readSafetensorsHeader(file), readSafetensors(file)]);
    expect(Object.keys(full.tensors).sort()).toEqual(Object.keys(header.tensors).sort());
    expect(full.metadata).toEqual(header.metadata);
    let bytes = 0;
    for (const [name, h] of Object.entries(header.tensors)) {
      const t = full.tensors[name];
      expect({ name, dtype: t.dtype, shape: t.shape }).toEqual({ name, dtype: h.dtype, shape: h.shape });
      expect(t.data.length).toBe(numel(h.shape));
      expect(t.data.byteLength).toBe(h.byteLength);
      bytes += h.byteLength;
    }
    // the data section is exactly the tensors' bytes
    const { n } = rawLayout(file);
    expect(8 + n + bytes).toBe(fs.statSync(file).size);
  });

  const caseFiles = files.filter((f) => rel(f).startsWith('cases' + path.sep));
  test.each(caseFiles.map((f) => [path.basename(f, '.safetensors'), f]))('case %s matches the tensors of its JSON', async (name, file) => {
    const json = parsePythonJson(fs.readFileSync(file.replace(/\.safetensors$/, '.json'), 'utf8'));
    const DT: Record<string, string> = { float32: 'F32', int64: 'I64' };
    const expected = Object.fromEntries(
      Object.entries(json.tensors as Record<string, { dtype: string; shape: number[] }>).map(([k, v]) => {
        expect(DT[v.dtype]).toBeDefined(); // only float32/int64 in the cases
        return [k, { dtype: DT[v.dtype], shape: v.shape }];
      }),
    );
    const header = await readSafetensorsHeader(file);
    const actual = Object.fromEntries(Object.entries(header.tensors).map(([k, v]) => [k, { dtype: v.dtype, shape: v.shape }]));
    expect(actual).toEqual(expected);
    expect(Object.keys(actual).length).toBeGreaterThan(0);
    expect(json.name ?? name).toBe(name);
  });

  test('tiny-sd components match manifests/tiny_models.json', async () => {
    const manifest = JSON.parse(fs.readFileSync(fixture('manifests', 'tiny_models.json'), 'utf8'));
    const models = manifest.models as Record<string, { file: string; bytes: number; num_parameters: number; num_tensors: number; shapes: Record<string, number[]> }>;
    expect(Object.keys(models).sort()).toEqual(['dino', 'image_encoder', 'text_encoder', 'unet', 'vae']);
    for (const [kind, m] of Object.entries(models)) {
      const file = fixture('tiny-sd', m.file);
      const header = await readSafetensorsHeader(file);
      expect({ kind, shapes: shapesOf(header.tensors) }).toEqual({ kind, shapes: m.shapes });
      expect(Object.values(header.tensors).every((t) => t.dtype === 'F32')).toBe(true);
      expect(Object.keys(header.tensors).length).toBe(m.num_tensors);
      expect(Object.values(header.tensors).reduce((a, t) => a + numel(t.shape), 0)).toBe(m.num_parameters);
      expect(fs.statSync(file).size).toBe(m.bytes);
    }
    expect(models.unet.num_parameters).toBe(2164452);
    expect(models.vae.num_parameters).toBe(1028935);
    expect(models.text_encoder.num_parameters).toBe(1597162);
  });

  test('tiny-clip matches manifests/tiny_clip.json (logit_scale is a 0-dim tensor)', async () => {
    const m = JSON.parse(fs.readFileSync(fixture('manifests', 'tiny_clip.json'), 'utf8'));
    const file = fixture(m.file);
    const { tensors } = await readSafetensors(file);
    expect(shapesOf(tensors)).toEqual(m.shapes);
    expect(Object.keys(tensors).length).toBe(m.num_tensors);
    expect(Object.values(tensors).reduce((a, t) => a + numel(t.shape), 0)).toBe(m.num_parameters);
    expect(tensors.logit_scale.shape).toEqual([]);
    expect((tensors.logit_scale.data as Float32Array)[0]).toBe(Math.fround(m.logit_scale));
  });

  test('lora, lpips and the single-file checkpoint match their JSON listings', async () => {
    const lora = JSON.parse(fs.readFileSync(fixture('lora', 'lora_keys.json'), 'utf8'));
    const loraFile = await readSafetensors(fixture('lora', 'lora.safetensors'));
    expect(Object.keys(loraFile.tensors).length).toBe(432);
    expect(shapesOf(loraFile.tensors)).toEqual(shapesOf(lora.keys));
    for (const [k, v] of Object.entries(lora.keys as Record<string, { shape: number[]; value?: number }>)) {
      if (v.value !== undefined) expect({ k, value: (loraFile.tensors[k].data as Float32Array)[0] }).toEqual({ k, value: v.value });
    }

    const lpips = JSON.parse(fs.readFileSync(fixture('lpips', 'lpips_alex_tiny.json'), 'utf8'));
    const lpipsHeader = await readSafetensorsHeader(fixture('lpips', 'lpips_alex_tiny.safetensors'));
    expect(shapesOf(lpipsHeader.tensors)).toEqual(lpips.tiny_shapes);

    const conv = JSON.parse(fs.readFileSync(fixture('tiny-sd-single-file', 'conversion.json'), 'utf8'));
    const single = await readSafetensorsHeader(fixture(conv.checkpoint.file));
    expect(Object.keys(single.tensors).length).toBe(conv.checkpoint.num_tensors);
    expect(Object.keys(single.tensors).length).toBe(710);
    expect(shapesOf(single.tensors)).toEqual(shapesOf(conv.keys));
  });
});

describe('malformed files', () => {
  /** 8-byte LE length + header text (as is) + data bytes. `length` overrides the declared header length. */
  function build(name: string, header: string | Buffer | object, data: number | Buffer = 0, length?: bigint): string {
    const h = Buffer.isBuffer(header) ? header : Buffer.from(typeof header === 'string' ? header : JSON.stringify(header), 'utf8');
    const len = Buffer.alloc(8);
    len.writeBigUInt64LE(length ?? BigInt(h.length));
    const body = typeof data === 'number' ? Buffer.alloc(data, 0xab) : data;
    const file = path.join(tmp, `${name}.safetensors`);
    fs.writeFileSync(file, Buffer.concat([len, h, body]));
    return file;
  }
  const f32 = (shape: number[], offsets: number[]) => ({ dtype: 'F32', shape, data_offsets: offsets });

  // [label, make the file, the exact text after "<file>: "]
  const corpus: Array<[string, () => string, string]> = [
    ['empty file', () => (fs.writeFileSync(path.join(tmp, 'empty.safetensors'), ''), path.join(tmp, 'empty.safetensors')),
      'empty file (0 bytes), expected a safetensors header'],
    ['shorter than 8 bytes', () => (fs.writeFileSync(path.join(tmp, 'short.safetensors'), Buffer.from([1, 2, 3, 4, 5])), path.join(tmp, 'short.safetensors')),
      'truncated file: 5 bytes, shorter than the 8-byte header length'],
    // the bound is the reference implementation's MAX_HEADER_SIZE, 100,000,000 bytes
    ['header length over the 100 MB bound', () => build('huge-length', '{}      ', 8, 100_000_001n),
      'header length 100000001 exceeds the limit of 100000000 bytes (not a safetensors file?)'],
    ['header length exactly at the bound (then beyond the end of the file)', () => build('limit-length', '{}      ', 8, 100_000_000n),
      'header length 100000000 goes beyond the end of the file (24 bytes): truncated file?'],
    ['not a safetensors file at all (text)', () => (fs.writeFileSync(path.join(tmp, 'text.safetensors'), 'hello world, this is not a tensor file\n'), path.join(tmp, 'text.safetensors')),
      `header length ${Buffer.from('hello wo').readBigUInt64LE(0)} exceeds the limit of 100000000 bytes (not a safetensors file?)`],
    ['header length beyond the end of the file', () => build('beyond-eof', '{}', 0, 1000n),
      'header length 1000 goes beyond the end of the file (10 bytes): truncated file?'],
    ['header length 0', () => build('zero-length', '', 0),
      'header is empty (length 0), expected a JSON object'],
    ['invalid JSON', () => build('invalid-json', '{"a" 1}'),
      "invalid JSON header: expected ':' at byte 5"],
    ['truncated JSON', () => build('truncated-json', '{"a": {"dtype": "F32"'),
      "invalid JSON header: expected '}' at byte 21"],
    ['data after the JSON value', () => build('json-trailing', '{} x'),
      'invalid JSON header: unexpected data after the JSON value at byte 3'],
    ['header that is a JSON array', () => build('array-header', '[1, 2]'),
      'header is a JSON array, expected an object'],
    ['header that is a JSON string', () => build('string-header', '"abc"'),
      'header is a JSON string, expected an object'],
    ['entry that is not an object', () => build('entry-number', { a: 5 }),
      'tensor "a": entry is a JSON number, expected an object with dtype, shape and data_offsets'],
    ['entry missing dtype', () => build('no-dtype', { w: { shape: [1], data_offsets: [0, 4] } }, 4),
      'tensor "w": entry lacks dtype'],
    ['entry missing shape', () => build('no-shape', { w: { dtype: 'F32', data_offsets: [0, 4] } }, 4),
      'tensor "w": entry lacks shape'],
    ['entry missing data_offsets', () => build('no-offsets', { w: { dtype: 'F32', shape: [1] } }, 4),
      'tensor "w": entry lacks data_offsets'],
    ['dtype that is not a string', () => build('dtype-number', { w: { dtype: 4, shape: [1], data_offsets: [0, 4] } }, 4),
      'tensor "w": dtype is a JSON number, expected a string'],
    ['unknown dtype', () => build('unknown-dtype', { w: { dtype: 'F8_E4M3', shape: [1], data_offsets: [0, 1] } }, 1),
      'tensor "w": unknown dtype "F8_E4M3" (expected one of F64, F32, F16, BF16, I64, I32, I16, I8, U8, BOOL)'],
    ['lower-case dtype', () => build('lower-dtype', { w: { dtype: 'f32', shape: [1], data_offsets: [0, 4] } }, 4),
      'tensor "w": unknown dtype "f32"'],
    ['shape that is not an array', () => build('shape-string', { w: { dtype: 'F32', shape: '2', data_offsets: [0, 8] } }, 8),
      'tensor "w": shape is a JSON string, expected an array of non-negative integers'],
    ['negative shape entry', () => build('negative-shape', { w: f32([2, -1], [0, 8]) }, 8),
      'tensor "w": shape entry -1 is not a non-negative integer'],
    ['non-integer shape entry (2.5)', () => build('fraction-shape', { w: f32([2.5], [0, 10]) }, 10),
      'tensor "w": shape entry 2.5 is not a non-negative integer'],
    ['shape entry in exponent form', () => build('exp-shape', '{"w":{"dtype":"F32","shape":[1e1],"data_offsets":[0,40]}}', 40),
      'tensor "w": shape entry 1e1 is not a non-negative integer'],
    ['shape entry that is a string', () => build('string-shape', { w: { dtype: 'F32', shape: ['2'], data_offsets: [0, 8] } }, 8),
      'tensor "w": shape entry string is not a non-negative integer'],
    ['shape x dtype size != byte length', () => build('size-mismatch', { w: f32([2, 3], [0, 20]) }, 20),
      'tensor "w": shape [2, 3] of F32 needs 24 bytes but data_offsets span 20'],
    ['shape whose element count overflows', () => build('overflow-shape', { w: f32([4294967296, 4294967296, 16], [0, 4]) }, 4),
      'tensor "w": shape [4294967296, 4294967296, 16] of F32 needs too many bytes but data_offsets span 4'],
    ['data_offsets not a pair', () => build('offsets-one', { w: f32([1], [4]) }, 4),
      'tensor "w": data_offsets must be an array of two integers [begin, end]'],
    ['negative data_offsets', () => build('offsets-negative', { w: f32([1], [-4, 0]) }, 4),
      'tensor "w": data_offsets [-4, 0] are not non-negative integers'],
    ['data_offsets end < begin', () => build('offsets-reversed', { w: f32([2], [8, 0]) }, 8),
      'tensor "w": data_offsets end 0 is before begin 8'],
    ['data_offsets out of range (truncated data)', () => build('truncated-data', { w: f32([4], [0, 16]) }, 8),
      'tensor "w": data_offsets [0, 16] go beyond the data section (8 bytes): truncated file?'],
    ['overlapping tensors', () => build('overlap', { a: f32([2], [0, 8]), b: f32([2], [4, 12]) }, 12),
      'tensor "b": data_offsets [4, 12] overlap tensor "a"'],
    ['two tensors on the same bytes', () => build('aliased', { a: f32([2], [0, 8]), b: f32([2], [0, 8]) }, 8),
      'tensor "b": data_offsets [0, 8] overlap tensor "a"'],
    ['gap between tensors (non-contiguous)', () => build('gap', { a: f32([1], [0, 4]), b: f32([1], [8, 12]) }, 12),
      'tensor "b": data is not contiguous, 4 unused bytes before it'],
    ['gap before the first tensor', () => build('gap-first', { a: f32([1], [4, 8]) }, 8),
      'tensor "a": data is not contiguous, 4 unused bytes before it'],
    ['trailing bytes after the last tensor', () => build('trailing', { a: f32([1], [0, 4]) }, 8),
      'data section has 4 bytes after the last tensor (not contiguous)'],
    ['data but no tensors', () => build('data-no-tensors', { __metadata__: { a: 'b' } }, 3),
      'data section has 3 bytes after the last tensor (not contiguous)'],
    ['duplicate keys', () => build('duplicate', '{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}', 8),
      'invalid JSON header: duplicate key "a" at byte 57'],
    ['duplicate key inside an entry', () => build('duplicate-field', '{"a":{"dtype":"F32","dtype":"I32","shape":[1],"data_offsets":[0,4]}}', 4),
      'invalid JSON header: duplicate key "dtype" at byte 27'],
    ['__metadata__ with a non-string value', () => build('metadata-number', { __metadata__: { step: 5 }, a: f32([1], [0, 4]) }, 4),
      '__metadata__ key "step" is a JSON number, expected a string'],
    ['__metadata__ that is not an object', () => build('metadata-string', { __metadata__: 'pt' }),
      '__metadata__ is a JSON string, expected an object of strings'],
    ['nesting deeper than the parser allows', () => build('deep', `{"__metadata__":${'['.repeat(100)}${']'.repeat(100)}}`),
      'invalid JSON header: nesting deeper than 64'],
    ['invalid UTF-8 in a tensor name', () => build('bad-utf8-key', Buffer.concat([Buffer.from('{"w'), Buffer.from([0xff]), Buffer.from('":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}')]), 4),
      'invalid JSON header: invalid UTF-8 in string at byte 3'],
    ['overlong UTF-8 in a metadata value', () => build('overlong-utf8', Buffer.concat([Buffer.from('{"__metadata__":{"k":"'), Buffer.from([0xc0, 0xaf]), Buffer.from('"}}')])),
      'invalid JSON header: invalid UTF-8 in string at byte 22'],
    ['UTF-8 encoded surrogate in a string', () => build('surrogate-utf8', Buffer.concat([Buffer.from('{"__metadata__":{"k":"'), Buffer.from([0xed, 0xa0, 0x80]), Buffer.from('"}}')])),
      'invalid JSON header: invalid UTF-8 in string at byte 22'],
    ['lone surrogate \\u escape', () => build('lone-surrogate', '{"__metadata__":{"k":"\\ud800x"}}'),
      'invalid JSON header: lone surrogate in \\u escape at byte 28'],
    ['key with characters that need escaping', () => build('escaped-key', { 'we"ird\nkey': f32([1], [0, 8]) }, 8),
      'tensor "we\\"ird\\nkey": shape [1] of F32 needs 4 bytes but data_offsets span 8'],
  ];

  test('the corpus has at least 15 distinct malformed files', () => {
    expect(corpus.length).toBeGreaterThanOrEqual(15);
    expect(new Set(corpus.map((c) => c[2])).size).toBeGreaterThanOrEqual(15);
  });

  test.each(corpus)('%s', async (_label, make, message) => {
    const file = make();
    const re = new RegExp(`${escapeRe(file)}: ${escapeRe(message)}`);
    await expect(readSafetensors(file)).rejects.toThrow(re);
    await expect(readSafetensorsHeader(file)).rejects.toThrow(re);
  });

  test('a valid hand-built file passes the same checks (control for the builder)', async () => {
    const data = Buffer.concat([bytesOf(new Float32Array([1, 2])), bytesOf(new Int8Array([-3]))]);
    const file = build('hand-built-ok', { __metadata__: { k: 'v' }, b: { dtype: 'I8', shape: [1], data_offsets: [8, 9] }, a: f32([2], [0, 8]) }, data);
    const back = await readSafetensors(file);
    expect(back.metadata).toEqual({ k: 'v' });
    expect(Array.from(back.tensors.a.data as Float32Array)).toEqual([1, 2]);
    expect(Array.from(back.tensors.b.data as Int8Array)).toEqual([-3]);
    // header padded with trailing whitespace (any amount) is fine, as in the reference format
    const padded = build('hand-built-padded', JSON.stringify({ a: f32([2], [0, 8]) }) + '   \n\t ', bytesOf(new Float32Array([5, 6])));
    expect(Array.from((await readSafetensors(padded)).tensors.a.data as Float32Array)).toEqual([5, 6]);
    // empty tensors may sit anywhere within the data, including at its end
    const empties = build('hand-built-empties', { a: f32([1], [0, 4]), e: f32([0], [4, 4]), z: f32([2, 0], [0, 0]) }, 4);
    const h = await readSafetensorsHeader(empties);
    expect(h.tensors.e).toEqual({ dtype: 'F32', shape: [0], byteLength: 0 });
    expect(h.tensors.z).toEqual({ dtype: 'F32', shape: [2, 0], byteLength: 0 });
  });

  test('a directory and a missing file give clear errors', async () => {
    const dir = fs.mkdtempSync(path.join(tmp, 'a-folder-'));
    await expect(readSafetensors(dir)).rejects.toThrow(`${dir}: is a directory, expected a .safetensors file`);
    await expect(readSafetensorsHeader(dir)).rejects.toThrow(`${dir}: is a directory, expected a .safetensors file`);
    const missing = path.join(tmp, 'does-not-exist.safetensors');
    await expect(readSafetensors(missing)).rejects.toThrow(`${missing}: cannot open: No such file or directory`);
    await expect(readSafetensorsHeader(missing)).rejects.toThrow(`${missing}: cannot open: No such file or directory`);
  });

  test('a bad path argument is refused before any native work', async () => {
    await expect(readSafetensors('')).rejects.toThrow(SingleInsertError);
    await expect(readSafetensors('')).rejects.toThrow('Expected a non-empty file path string for path but received ""');
    await expect(readSafetensorsHeader(42 as unknown as string)).rejects.toThrow('Expected a non-empty file path string for path but received 42');
  });

  test('errors carry the caller stack, not an empty async frame (plain node, compiled dist/)', () => {
    // In a child process: under jest the addon's errors come from another realm, so this checks the
    // behaviour users get. The tests run after bootstrap, so dist/ is there.
    const script = path.join(tmp, 'caller-stack-probe.js');
    const missing = path.join(tmp, 'nope.safetensors');
    fs.writeFileSync(
      script,
      `const { readSafetensors } = require(${JSON.stringify(path.resolve(__dirname, '..', 'dist', 'lib', 'safetensors.js'))});\n` +
        `async function userCode() { await readSafetensors(${JSON.stringify(missing)}); }\n` +
        `userCode().catch((e) => { process.stdout.write(e.stack); });\n`,
    );
    const r = spawnSync(process.execPath, [script], { encoding: 'utf8' });
    expect(r.status).toBe(0);
    expect(r.stdout).toContain(`${missing}: cannot open: No such file or directory`);
    expect(r.stdout).toMatch(/at userCode \(.*caller-stack-probe\.js:2:/);
  });
});

describe('writeSafetensors argument checks', () => {
  const file = () => path.join(tmp, 'args.safetensors');
  const ok = { shape: [2], data: new Float32Array([1, 2]) };

  const cases: Array<[string, () => Promise<void>, string]> = [
    ['wrong typed array for the dtype (F32 given Float64Array)',
      () => writeSafetensors(file(), { w: { dtype: 'F32', shape: [2], data: new Float64Array(2) } }),
      'Expected a Float32Array for dtype F32 for tensors["w"].data but received Float64Array'],
    ['wrong typed array for I64 (Int32Array)',
      () => writeSafetensors(file(), { ids: { dtype: 'I64', shape: [2], data: new Int32Array(2) } }),
      'Expected a BigInt64Array for dtype I64 for tensors["ids"].data but received Int32Array'],
    ['wrong typed array for BF16 (Float32Array)',
      () => writeSafetensors(file(), { w: { dtype: 'BF16', shape: [2], data: new Float32Array(2) } }),
      'Expected a Uint16Array for dtype BF16 for tensors["w"].data but received Float32Array'],
    ['wrong typed array for BOOL (Int8Array)',
      () => writeSafetensors(file(), { m: { dtype: 'BOOL', shape: [2], data: new Int8Array(2) } }),
      'Expected a Uint8Array for dtype BOOL for tensors["m"].data but received Int8Array'],
    ['unknown dtype',
      () => writeSafetensors(file(), { w: { dtype: 'F8' as DType, shape: [2], data: new Uint8Array(2) } }),
      'Expected one of F64, F32, F16, BF16, I64, I32, I16, I8, U8, BOOL for tensors["w"].dtype but received "F8"'],
    ['data that is not a typed array',
      () => writeSafetensors(file(), { w: { shape: [2], data: [1, 2] as unknown as TypedArray } }),
      'Expected a typed array for tensors["w"].data but received array of length 2'],
    ['tensor that is not an object',
      () => writeSafetensors(file(), { w: 5 as unknown as Tensor }),
      'Expected an object { dtype?, shape, data } for tensors["w"] but received 5'],
    ['shape / element count mismatch',
      () => writeSafetensors(file(), { w: { dtype: 'F32', shape: [2, 3], data: new Float32Array(5) } }),
      'Expected 6 elements for tensors["w"].data (shape [2,3]) but received 5'],
    ['0-dim shape with two elements',
      () => writeSafetensors(file(), { s: { shape: [], data: new Float32Array(2) } }),
      'Expected 1 elements for tensors["s"].data (shape []) but received 2'],
    ['negative shape',
      () => writeSafetensors(file(), { w: { shape: [-2], data: new Float32Array(2) } }),
      'Expected an array of non-negative integers for tensors["w"].shape but received array of length 1'],
    ['non-integer shape',
      () => writeSafetensors(file(), { w: { shape: [2.5], data: new Float32Array(2) } }),
      'Expected an array of non-negative integers for tensors["w"].shape but received array of length 1'],
    ['non-string metadata value',
      () => writeSafetensors(file(), { w: ok }, { step: 5 as unknown as string }),
      'Expected a string for metadata["step"] but received 5'],
    ['metadata that is not an object',
      () => writeSafetensors(file(), { w: ok }, null as unknown as Record<string, string>),
      'Expected an object of strings for metadata but received null'],
    ['empty path',
      () => writeSafetensors('', { w: ok }),
      'Expected a non-empty file path string for path but received ""'],
    ['path that is not a string',
      () => writeSafetensors(undefined as unknown as string, { w: ok }),
      'Expected a non-empty file path string for path but received undefined'],
    ['tensors that are not an object',
      () => writeSafetensors(file(), null as unknown as Record<string, Tensor>),
      'Expected an object of { dtype?, shape, data } for tensors but received null'],
  ];

  test.each(cases)('%s', async (_label, call, message) => {
    const p = call();
    await expect(p).rejects.toThrow(SingleInsertError);
    await expect(p).rejects.toThrow(message);
    expect(fs.existsSync(file())).toBe(false);
  });

  test('every message uses the "Expected ... for ... but received ..." wording', () => {
    for (const [, , message] of cases) expect(message).toMatch(/^Expected .+ for .+ but received .+$/);
  });
});
