/**
 * Writes PyTorch checkpoints byte for byte the way `torch.save` lays them out, for the converter's
 * tests: a tiny pickle writer (protocol 2, the opcodes CPython's pickle.py emits for these objects,
 * with its memo: BINPUT after each new object, BINGET for repeats), the zip format
 * (`archive/data.pkl`, `archive/data/<key>`, `archive/version`, STORED entries, data aligned to 64
 * bytes like PyTorch's writer) and the legacy format (magic, protocol, sys_info, object, keys, storages).
 */
import * as zlib from 'node:zlib';
import { crc32 } from '../../lib/png';

export type PyValue =
  | string
  | number
  | boolean
  | null
  | { int64: bigint }
  | { float: number }
  | { tuple: PyValue[] }
  | { list: PyValue[] }
  | { dict: Array<[PyValue, PyValue]> }
  | { global: [string, string] }
  | { reduce: [PyValue, PyValue] }
  | { build: [PyValue, PyValue] }
  | { persid: PyValue }
  | { odict: Array<[PyValue, PyValue]>; state?: PyValue }
  | { raw: number[] };

export class PickleWriter {
  private out: number[] = [];
  private memo = new Map<string, number>();

  constructor(protocol = 2) {
    this.out.push(0x80, protocol);
  }

  private u32(n: number) {
    this.out.push(n & 0xff, (n >>> 8) & 0xff, (n >>> 16) & 0xff, (n >>> 24) & 0xff);
  }
  private put() {
    const n = this.memo.size;
    if (n < 256) this.out.push(0x71, n); // BINPUT
    else {
      this.out.push(0x72); // LONG_BINPUT
      this.u32(n);
    }
    return n;
  }
  private text(s: string) {
    this.out.push(...Buffer.from(s, 'utf8'));
  }

  write(v: PyValue): this {
    if (v === null) this.out.push(0x4e);
    else if (v === true) this.out.push(0x88);
    else if (v === false) this.out.push(0x89);
    else if (typeof v === 'number') {
      if (!Number.isInteger(v)) throw new Error('use { float }');
      if (v >= 0 && v < 256) this.out.push(0x4b, v); // BININT1
      else if (v >= 0 && v < 65536) this.out.push(0x4d, v & 0xff, v >> 8); // BININT2
      else if (v >= -(2 ** 31) && v < 2 ** 31) {
        this.out.push(0x4a); // BININT
        this.u32(v >>> 0);
      } else this.write({ int64: BigInt(v) });
    } else if (typeof v === 'string') {
      const key = `s:${v}`;
      const hit = this.memo.get(key);
      if (hit !== undefined) this.out.push(0x68, hit); // BINGET
      else {
        const b = Buffer.from(v, 'utf8');
        this.out.push(0x58); // BINUNICODE
        this.u32(b.length);
        this.out.push(...b);
        this.memo.set(key, this.put());
      }
    } else if ('int64' in v) {
      // LONG1: little-endian two's complement, minimal length
      const bytes: number[] = [];
      let x = v.int64;
      for (;;) {
        bytes.push(Number(x & 0xffn));
        x >>= 8n;
        const sign = bytes[bytes.length - 1] & 0x80;
        if ((x === 0n && !sign) || (x === -1n && sign)) break;
      }
      this.out.push(0x8a, bytes.length, ...bytes);
    } else if ('float' in v) {
      const b = Buffer.alloc(8);
      b.writeDoubleBE(v.float);
      this.out.push(0x47, ...b); // BINFLOAT
    } else if ('raw' in v) {
      this.out.push(...v.raw);
    } else if ('tuple' in v) {
      const n = v.tuple.length;
      if (n === 0) this.out.push(0x29); // EMPTY_TUPLE
      else if (n <= 3) {
        v.tuple.forEach((x) => this.write(x));
        this.out.push([0x85, 0x86, 0x87][n - 1]); // TUPLE1..3
        this.put();
      } else {
        this.out.push(0x28); // MARK
        v.tuple.forEach((x) => this.write(x));
        this.out.push(0x74); // TUPLE
        this.put();
      }
    } else if ('list' in v) {
      this.out.push(0x5d); // EMPTY_LIST
      this.put();
      if (v.list.length) {
        this.out.push(0x28);
        v.list.forEach((x) => this.write(x));
        this.out.push(0x65); // APPENDS
      }
    } else if ('dict' in v) {
      this.out.push(0x7d); // EMPTY_DICT
      this.put();
      if (v.dict.length) {
        this.out.push(0x28);
        for (const [k, x] of v.dict) this.write(k).write(x);
        this.out.push(0x75); // SETITEMS
      }
    } else if ('global' in v) {
      const key = `g:${v.global.join('.')}`;
      const hit = this.memo.get(key);
      if (hit !== undefined) this.out.push(0x68, hit);
      else {
        this.out.push(0x63); // GLOBAL
        this.text(`${v.global[0]}\n${v.global[1]}\n`);
        this.memo.set(key, this.put());
      }
    } else if ('reduce' in v) {
      this.write(v.reduce[0]).write(v.reduce[1]);
      this.out.push(0x52); // REDUCE
      this.put();
    } else if ('build' in v) {
      this.write(v.build[0]).write(v.build[1]);
      this.out.push(0x62); // BUILD
    } else if ('persid' in v) {
      this.write(v.persid);
      this.out.push(0x51); // BINPERSID
    } else if ('odict' in v) {
      // OrderedDict.__reduce__: (OrderedDict, (), state, None, items) -> REDUCE, SETITEMS, BUILD
      this.write({ global: ['collections', 'OrderedDict'] });
      this.out.push(0x29, 0x52); // EMPTY_TUPLE REDUCE
      this.put();
      if (v.odict.length) {
        this.out.push(0x28);
        for (const [k, x] of v.odict) this.write(k).write(x);
        this.out.push(0x75);
      }
      if (v.state !== undefined) {
        this.write(v.state);
        this.out.push(0x62);
      }
    }
    return this;
  }

  bytes(): Uint8Array {
    return Uint8Array.from([...this.out, 0x2e]); // STOP
  }
}

/** Storage type per dtype, as torch names them. */
export const STORAGE: Record<string, string> = {
  F32: 'FloatStorage', F64: 'DoubleStorage', F16: 'HalfStorage', BF16: 'BFloat16Storage', I64: 'LongStorage', I32: 'IntStorage',
  I16: 'ShortStorage', I8: 'CharStorage', U8: 'ByteStorage', BOOL: 'BoolStorage',
};

/** `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict())` over a zip-format storage. */
export function tensorV2(key: string, dtype: string, numel: number, offset: number, size: number[], stride: number[], legacy = false): PyValue {
  const pid: PyValue[] = ['storage', { global: ['torch', STORAGE[dtype]] }, key, 'cpu', numel];
  if (legacy) pid.push(null);
  return {
    reduce: [
      { global: ['torch._utils', '_rebuild_tensor_v2'] },
      { tuple: [{ persid: { tuple: pid } }, offset, { tuple: size }, { tuple: stride }, false, { odict: [] }] },
    ],
  };
}

/** nn.Parameter as torch pickles it: _rebuild_parameter(tensor, requires_grad, OrderedDict()). */
export function parameter(tensor: PyValue): PyValue {
  return { reduce: [{ global: ['torch._utils', '_rebuild_parameter'] }, { tuple: [tensor, true, { odict: [] }] }] };
}

export interface ZipFileEntry {
  name: string;
  data: Uint8Array;
  deflate?: boolean;
}

/** A zip archive as PyTorch's writer makes it (STORED, data offsets aligned to 64 with a padding extra field). */
export function zip(entries: ZipFileEntry[]): Buffer {
  const parts: Buffer[] = [];
  const central: Buffer[] = [];
  let offset = 0;
  for (const e of entries) {
    const name = Buffer.from(e.name, 'utf8');
    const body = e.deflate ? zlib.deflateRawSync(e.data) : Buffer.from(e.data);
    const crc = crc32(e.data) >>> 0;
    // local header (30 bytes) + name + extra padding so the data starts on a 64-byte boundary
    const pad = (64 - ((offset + 30 + name.length + 4) % 64)) % 64;
    const extra = Buffer.alloc(4 + pad);
    extra.writeUInt16LE(0x4b50 + 1, 0); // an unknown extra id ("FB" padding in PyTorch's miniz)
    extra.writeUInt16LE(pad, 2);
    const local = Buffer.alloc(30);
    local.writeUInt32LE(0x04034b50, 0);
    local.writeUInt16LE(e.deflate ? 20 : 0, 4);
    local.writeUInt16LE(e.deflate ? 8 : 0, 8);
    local.writeUInt32LE(crc, 14);
    local.writeUInt32LE(body.length, 18);
    local.writeUInt32LE(e.data.length, 22);
    local.writeUInt16LE(name.length, 26);
    local.writeUInt16LE(extra.length, 28);
    parts.push(local, name, extra, body);
    const cd = Buffer.alloc(46);
    cd.writeUInt32LE(0x02014b50, 0);
    cd.writeUInt16LE(e.deflate ? 20 : 0, 6);
    cd.writeUInt16LE(e.deflate ? 8 : 0, 10);
    cd.writeUInt32LE(crc, 16);
    cd.writeUInt32LE(body.length, 20);
    cd.writeUInt32LE(e.data.length, 24);
    cd.writeUInt16LE(name.length, 28);
    cd.writeUInt32LE(offset, 42);
    central.push(cd, name);
    offset += 30 + name.length + extra.length + body.length;
  }
  const cdBytes = Buffer.concat(central);
  const eocd = Buffer.alloc(22);
  eocd.writeUInt32LE(0x06054b50, 0);
  eocd.writeUInt16LE(entries.length, 8);
  eocd.writeUInt16LE(entries.length, 10);
  eocd.writeUInt32LE(cdBytes.length, 12);
  eocd.writeUInt32LE(offset, 16);
  return Buffer.concat([...parts, cdBytes, eocd]);
}

/** A zip-format checkpoint: `archive/data.pkl`, `archive/data/<key>` per storage, `archive/version`. */
export function torchZip(pickle: Uint8Array, storages: Record<string, Uint8Array>, options: { deflatePickle?: boolean; root?: string } = {}): Buffer {
  const root = options.root ?? 'archive';
  return zip([
    { name: `${root}/data.pkl`, data: pickle, deflate: options.deflatePickle },
    { name: `${root}/byteorder`, data: Buffer.from('little') },
    ...Object.entries(storages).map(([k, data]) => ({ name: `${root}/data/${k}`, data })),
    { name: `${root}/version`, data: Buffer.from('3\n') },
  ]);
}

/** A legacy-format checkpoint (torch < 1.6): the five pickles/records back to back. */
export function torchLegacy(object: Uint8Array, storages: Record<string, { numel: number; data: Uint8Array }>): Buffer {
  const magic = new PickleWriter().write({ int64: 0x1950a86a20f9469cfc6cn }).bytes();
  const protocol = new PickleWriter().write(1001).bytes();
  const sysInfo = new PickleWriter()
    .write({ dict: [['protocol_version', 1001], ['little_endian', true], ['type_sizes', { dict: [['short', 2], ['int', 4], ['long', 4]] }]] })
    .bytes();
  const keys = new PickleWriter().write({ list: Object.keys(storages) }).bytes();
  const blobs = Object.values(storages).map(({ numel, data }) => {
    const n = Buffer.alloc(8);
    n.writeBigInt64LE(BigInt(numel));
    return Buffer.concat([n, Buffer.from(data)]);
  });
  return Buffer.concat([magic, protocol, sysInfo, object, keys, ...blobs].map((b) => Buffer.from(b)));
}
