/**
 * Reading PyTorch checkpoints (`torch.save` files: `.pth`, `.pt`, `.bin`, `.ckpt`) without Python
 * and without executing anything: the pickle goes through the restricted unpickler of ./pickle.ts,
 * and the tensor bytes are read from where the format keeps them.
 *
 * Two layouts (torch/serialization.py):
 * - zip (torch >= 1.6, `_use_new_zipfile_serialization=True`, the default): a zip archive (STORED
 *   entries, data aligned to 64 bytes; zip64 for large files) with `<root>/data.pkl` (the pickle,
 *   protocol 2), `<root>/data/<key>` (one entry per storage, raw little-endian elements),
 *   `<root>/version` and, since torch 2.1, `<root>/byteorder`. `<root>` is `archive` or the file's stem.
 * - legacy (torch < 1.6): five things back to back: a pickled magic number
 *   (0x1950a86a20f9469cfc6c), the protocol version (1001), a sys_info dict, the object pickle, a
 *   pickled list of storage keys, then for every key an int64 element count and the raw elements.
 *
 * The zip parsing (end of central directory, zip64 records, central directory, local headers) is
 * written here against PKWARE's APPNOTE.TXT; deflated entries (rare in torch files) go through
 * node:zlib.
 */
import * as fs from 'node:fs';
import * as zlib from 'node:zlib';
import { PyGlobal, PyTuple, STORAGE_TYPES, StorageRef, TensorRef, unpickle, UnpicklingRefused } from './pickle';

/** torch/serialization.py MAGIC_NUMBER and PROTOCOL_VERSION of the legacy format. */
const LEGACY_MAGIC = 0x1950a86a20f9469cfc6cn;
const LEGACY_PROTOCOL = 1001;

// ---------------------------------------------------------------- random-access file

class RandomAccessFile {
  readonly size: number;
  private readonly fd: number;
  constructor(readonly path: string) {
    this.fd = fs.openSync(path, 'r');
    this.size = fs.fstatSync(this.fd).size;
  }
  read(offset: number, length: number, what: string): Uint8Array {
    if (offset < 0 || length < 0 || offset + length > this.size) {
      throw new UnpicklingRefused(`${this.path} is truncated: ${what} needs bytes ${offset}..${offset + length} but the file has ${this.size}`);
    }
    const buf = Buffer.allocUnsafe(length);
    let done = 0;
    while (done < length) {
      // at most 1 GiB per call: large reads come back short or are refused by some platforms
      const n = fs.readSync(this.fd, buf, done, Math.min(length - done, 2 ** 30), offset + done);
      if (n <= 0) throw new UnpicklingRefused(`${this.path}: unexpected end of file reading ${what}`);
      done += n;
    }
    return new Uint8Array(buf.buffer, buf.byteOffset, length);
  }
  close(): void {
    fs.closeSync(this.fd);
  }
}

// ---------------------------------------------------------------- zip

export interface ZipEntry {
  name: string;
  method: number;
  compressedSize: number;
  size: number;
  localHeaderOffset: number;
}

const u16 = (b: Uint8Array, o: number) => b[o] | (b[o + 1] << 8);
const u32 = (b: Uint8Array, o: number) => (b[o] | (b[o + 1] << 8) | (b[o + 2] << 16)) + b[o + 3] * 0x1000000;
const u64 = (b: Uint8Array, o: number) => {
  const v = u32(b, o) + u32(b, o + 4) * 0x100000000;
  if (!Number.isSafeInteger(v)) throw new UnpicklingRefused(`zip offset ${v} is too large`);
  return v;
};

/** Whether the file starts like a zip archive (a local file header, or an empty archive's EOCD). */
export function isZipFile(head: Uint8Array): boolean {
  return head.length >= 4 && head[0] === 0x50 && head[1] === 0x4b && ((head[2] === 3 && head[3] === 4) || (head[2] === 5 && head[3] === 6));
}

/** The central directory of a zip file (zip64 aware). */
function readZipDirectory(file: RandomAccessFile): ZipEntry[] {
  // 1. end of central directory: the last 22..(22 + 65535) bytes hold it
  const tailLength = Math.min(file.size, 22 + 0xffff);
  const tail = file.read(file.size - tailLength, tailLength, 'the zip end record');
  let eocd = -1;
  for (let i = tailLength - 22; i >= 0; i--) {
    if (u32(tail, i) === 0x06054b50) {
      eocd = i;
      break;
    }
  }
  if (eocd < 0) throw new UnpicklingRefused(`${file.path} is not a complete zip archive (no end of central directory record; truncated?)`);
  let count = u16(tail, eocd + 10);
  let cdSize = u32(tail, eocd + 12);
  let cdOffset = u32(tail, eocd + 16);
  // 2. zip64: a locator just before the EOCD points at the zip64 EOCD record
  const eocdAbs = file.size - tailLength + eocd;
  if ((count === 0xffff || cdSize === 0xffffffff || cdOffset === 0xffffffff) && eocdAbs >= 20) {
    const loc = file.read(eocdAbs - 20, 20, 'the zip64 locator');
    if (u32(loc, 0) === 0x07064b50) {
      const rec = file.read(u64(loc, 8), 56, 'the zip64 end record');
      if (u32(rec, 0) !== 0x06064b50) throw new UnpicklingRefused(`${file.path}: bad zip64 end of central directory record`);
      count = u64(rec, 32);
      cdSize = u64(rec, 40);
      cdOffset = u64(rec, 48);
    }
  }
  // 3. central directory entries
  const cd = file.read(cdOffset, cdSize, 'the zip central directory');
  const entries: ZipEntry[] = [];
  let p = 0;
  for (let i = 0; i < count; i++) {
    if (p + 46 > cd.length || u32(cd, p) !== 0x02014b50) throw new UnpicklingRefused(`${file.path}: corrupt zip central directory (entry ${i})`);
    const method = u16(cd, p + 10);
    let compressedSize = u32(cd, p + 20);
    let size = u32(cd, p + 24);
    const nameLength = u16(cd, p + 28), extraLength = u16(cd, p + 30), commentLength = u16(cd, p + 32);
    let localHeaderOffset = u32(cd, p + 42);
    const name = new TextDecoder('utf-8').decode(cd.subarray(p + 46, p + 46 + nameLength));
    // zip64 extended information (header id 1): the 0xffffffff fields, in this order
    let e = p + 46 + nameLength;
    const extraEnd = e + extraLength;
    while (e + 4 <= extraEnd) {
      const id = u16(cd, e), len = u16(cd, e + 2);
      if (id === 1) {
        let q = e + 4;
        if (size === 0xffffffff) (size = u64(cd, q)), (q += 8);
        if (compressedSize === 0xffffffff) (compressedSize = u64(cd, q)), (q += 8);
        if (localHeaderOffset === 0xffffffff) localHeaderOffset = u64(cd, q);
      }
      e += 4 + len;
    }
    entries.push({ name, method, compressedSize, size, localHeaderOffset });
    p += 46 + nameLength + extraLength + commentLength;
  }
  return entries;
}

/** An entry's bytes (STORED read in place, DEFLATE inflated). */
function readZipEntry(file: RandomAccessFile, entry: ZipEntry): Uint8Array {
  const header = file.read(entry.localHeaderOffset, 30, `the local header of ${entry.name}`);
  if (u32(header, 0) !== 0x04034b50) throw new UnpicklingRefused(`${file.path}: corrupt zip local header for ${entry.name}`);
  const dataOffset = entry.localHeaderOffset + 30 + u16(header, 26) + u16(header, 28);
  const raw = file.read(dataOffset, entry.compressedSize, entry.name);
  if (entry.method === 0) {
    if (entry.compressedSize !== entry.size) throw new UnpicklingRefused(`${file.path}: stored entry ${entry.name} has mismatched sizes`);
    return raw;
  }
  if (entry.method === 8) {
    const out = zlib.inflateRawSync(raw);
    if (out.length !== entry.size) throw new UnpicklingRefused(`${file.path}: ${entry.name} inflated to ${out.length} bytes, expected ${entry.size}`);
    return new Uint8Array(out.buffer, out.byteOffset, out.length);
  }
  throw new UnpicklingRefused(`${file.path}: ${entry.name} uses zip compression method ${entry.method} (only stored and deflate are supported)`);
}

// ---------------------------------------------------------------- checkpoints

/** A flattened checkpoint: every tensor under its dotted key, and what was left out. */
export interface TorchCheckpoint {
  file: string;
  format: 'zip' | 'legacy';
  /** dotted key -> tensor, in the pickle's order */
  tensors: Map<string, TensorRef>;
  /** non-tensor leaves that were skipped, e.g. "global_step (int)" */
  skipped: string[];
  /** the bytes of one tensor, contiguous, little-endian, in its own dtype */
  read(tensor: TensorRef): Uint8Array;
  close(): void;
}

/** Flattens nested dicts (and lists) of tensors to dotted keys, like a state dict's names. */
function flatten(value: unknown, prefix: string, tensors: Map<string, TensorRef>, skipped: string[]): void {
  const describeLeaf = (v: unknown) =>
    v === null ? 'None' : typeof v === 'number' ? (Number.isInteger(v) ? 'int' : 'float') : typeof v === 'bigint' ? 'int' : v instanceof Uint8Array ? 'bytes' : typeof v;
  if (value instanceof TensorRef) {
    tensors.set(prefix || 'tensor', value);
  } else if (value instanceof Map) {
    for (const [k, v] of value) flatten(v, prefix ? `${prefix}.${String(k)}` : String(k), tensors, skipped);
  } else if (Array.isArray(value) || value instanceof PyTuple) {
    const items = Array.isArray(value) ? value : value.items;
    items.forEach((v, i) => flatten(v, prefix ? `${prefix}.${i}` : String(i), tensors, skipped));
  } else if (value instanceof StorageRef || value instanceof PyGlobal) {
    skipped.push(`${prefix || '(root)'} (${value instanceof StorageRef ? 'bare storage' : value.qualified})`);
  } else {
    skipped.push(`${prefix || '(root)'} (${describeLeaf(value)})`);
  }
}

function storageType(v: unknown, source: string) {
  if (!(v instanceof PyGlobal) || v.module !== 'torch' || !(v.name in STORAGE_TYPES)) {
    throw new UnpicklingRefused(`unsupported storage type ${v instanceof PyGlobal ? v.qualified : String(v)} in ${source}`);
  }
  return STORAGE_TYPES[v.name];
}

const safeCount = (v: unknown): v is number => typeof v === 'number' && Number.isSafeInteger(v) && v >= 0;

/**
 * Gathers a (possibly strided) view out of its storage's bytes into a contiguous little-endian
 * buffer. Throws when the view reaches outside the storage.
 */
export function gatherTensor(t: TensorRef, storageBytes: Uint8Array, bigEndian: boolean, what: string): Uint8Array {
  const es = t.storage.type.itemSize;
  const numel = t.shape.reduce((a, b) => a * b, 1);
  const storageNumel = Math.floor(storageBytes.length / es);
  const base = t.offset + t.storage.viewOffset;
  if (numel > 0) {
    let maxIndex = base;
    t.shape.forEach((d, i) => (maxIndex += (d - 1) * t.stride[i]));
    if (maxIndex >= storageNumel) {
      throw new UnpicklingRefused(`${what}: tensor of shape [${t.shape}] with offset ${t.offset} and stride [${t.stride}] reads element ${maxIndex} of a ${storageNumel}-element storage`);
    }
  }
  const out = new Uint8Array(numel * es);
  // contiguous (row-major) views are one copy
  let expected = 1;
  let contiguous = true;
  for (let i = t.shape.length - 1; i >= 0; i--) {
    if (t.shape[i] !== 1 && t.stride[i] !== expected) contiguous = false;
    expected *= t.shape[i];
  }
  if (contiguous) {
    out.set(storageBytes.subarray(base * es, (base + numel) * es));
  } else {
    const idx = new Array(t.shape.length).fill(0);
    for (let n = 0; n < numel; n++) {
      let src = base;
      for (let d = 0; d < idx.length; d++) src += idx[d] * t.stride[d];
      for (let b = 0, from = src * es, to = n * es; b < es; b++) out[to + b] = storageBytes[from + b];
      for (let d = idx.length - 1; d >= 0; d--) {
        if (++idx[d] < t.shape[d]) break;
        idx[d] = 0;
      }
    }
  }
  if (bigEndian && es > 1) {
    for (let i = 0; i < out.length; i += es) out.subarray(i, i + es).reverse();
  }
  return out;
}

function openZipCheckpoint(file: RandomAccessFile): TorchCheckpoint {
  const entries = readZipDirectory(file);
  const pkl = entries.filter((e) => /^[^/]+\/data\.pkl$/.test(e.name));
  if (pkl.length !== 1) {
    throw new UnpicklingRefused(
      `${file.path} is a zip archive but not a PyTorch checkpoint: expected one <name>/data.pkl entry, found ${pkl.length ? pkl.map((e) => e.name).join(', ') : 'none'}`,
    );
  }
  const root = pkl[0].name.slice(0, -'data.pkl'.length);
  const byName = new Map(entries.map((e) => [e.name, e]));
  const byteorderEntry = byName.get(`${root}byteorder`);
  const bigEndian = byteorderEntry ? new TextDecoder().decode(readZipEntry(file, byteorderEntry)).trim() === 'big' : false;
  const source = `${file.path} (${pkl[0].name})`;
  // persistent ids: ('storage', storage_type, key, location, numel)
  const storages = new Map<string, StorageRef>();
  const persistentLoad = (pid: unknown) => {
    const items = pid instanceof PyTuple ? pid.items : null;
    if (!items || items.length !== 5 || items[0] !== 'storage' || typeof items[2] !== 'string' || typeof items[3] !== 'string' || !safeCount(items[4])) {
      throw new UnpicklingRefused(`unexpected persistent id in ${source}: only ('storage', type, key, location, numel) tuples are allowed`);
    }
    const key = items[2] as string;
    if (!byName.has(`${root}data/${key}`)) throw new UnpicklingRefused(`${source} refers to storage ${key}, but the archive has no ${root}data/${key}`);
    const ref = storages.get(key) ?? new StorageRef(key, storageType(items[1], source), items[3] as string, items[4] as number);
    storages.set(key, ref);
    return ref;
  };
  const { value } = unpickle(readZipEntry(file, pkl[0]), { source, persistentLoad });
  const tensors = new Map<string, TensorRef>();
  const skipped: string[] = [];
  flatten(value, '', tensors, skipped);
  const cache = new Map<string, Uint8Array>();
  return {
    file: file.path,
    format: 'zip',
    tensors,
    skipped,
    read(t) {
      let bytes = cache.get(t.storage.key);
      if (!bytes) {
        bytes = readZipEntry(file, byName.get(`${root}data/${t.storage.key}`)!);
        if (bytes.length < t.storage.numel * t.storage.type.itemSize) {
          throw new UnpicklingRefused(`${file.path}: storage ${t.storage.key} has ${bytes.length} bytes, the pickle says ${t.storage.numel} x ${t.storage.type.itemSize}`);
        }
        // keep only the storage being read: state dicts rarely share storages between distant keys
        cache.clear();
        cache.set(t.storage.key, bytes);
      }
      return gatherTensor(t, bytes, bigEndian, `${file.path} storage ${t.storage.key}`);
    },
    close: () => file.close(),
  };
}

function openLegacyCheckpoint(file: RandomAccessFile): TorchCheckpoint {
  const data = file.read(0, file.size, 'the checkpoint');
  const source = file.path;
  const noStorages = () => {
    throw new UnpicklingRefused(`unexpected persistent id in the header of ${source}`);
  };
  // 1.-3. magic number, protocol version, sys_info
  const magic = unpickle(data, { source, persistentLoad: noStorages });
  if (BigInt(magic.value as number | bigint) !== LEGACY_MAGIC) throw new UnpicklingRefused(`${source} is not a PyTorch checkpoint (bad magic number)`);
  const protocol = unpickle(data, { source, persistentLoad: noStorages }, magic.end);
  if (protocol.value !== LEGACY_PROTOCOL) throw new UnpicklingRefused(`${source}: unsupported legacy protocol version ${String(protocol.value)}`);
  const sysInfo = unpickle(data, { source, persistentLoad: noStorages }, protocol.end);
  const littleEndian = sysInfo.value instanceof Map ? sysInfo.value.get('little_endian') !== false : true;
  // 4. the object; persistent ids: ('storage', type, root_key, location, numel, view_metadata)
  const roots = new Map<string, { type: ReturnType<typeof storageType>; numel: number }>();
  const persistentLoad = (pid: unknown) => {
    const items = pid instanceof PyTuple ? pid.items : null;
    if (!items || items.length !== 6 || items[0] !== 'storage' || typeof items[2] !== 'string' || typeof items[3] !== 'string' || !safeCount(items[4])) {
      throw new UnpicklingRefused(`unexpected persistent id in ${source}: only ('storage', type, key, location, numel, view) tuples are allowed`);
    }
    const type = storageType(items[1], source);
    const key = items[2] as string;
    roots.set(key, { type, numel: items[4] as number });
    const view = items[5];
    if (view === null) return new StorageRef(key, type, items[3] as string, items[4] as number);
    const v = view instanceof PyTuple ? view.items : null;
    if (!v || v.length !== 3 || typeof v[0] !== 'string' || !safeCount(v[1]) || !safeCount(v[2])) throw new UnpicklingRefused(`bad storage view in ${source}`);
    return new StorageRef(key, type, items[3] as string, v[2] as number, v[1] as number);
  };
  const object = unpickle(data, { source, persistentLoad }, sysInfo.end);
  // 5. storage keys, then each storage: int64 element count + the elements
  const keysPickle = unpickle(data, { source, persistentLoad: noStorages }, object.end);
  if (!Array.isArray(keysPickle.value) || !keysPickle.value.every((k) => typeof k === 'string')) throw new UnpicklingRefused(`${source}: bad storage key list`);
  const offsets = new Map<string, { start: number; bytes: number }>();
  let pos = keysPickle.end;
  const dv = new DataView(data.buffer, data.byteOffset, data.byteLength);
  for (const key of keysPickle.value as string[]) {
    const root = roots.get(key);
    if (!root) throw new UnpicklingRefused(`${source}: storage ${key} is listed but not used`);
    if (pos + 8 > data.length) throw new UnpicklingRefused(`${source} is truncated: storage ${key} is missing`);
    const count = Number(dv.getBigInt64(pos, littleEndian));
    const bytes = count * root.type.itemSize;
    if (count < 0 || pos + 8 + bytes > data.length) throw new UnpicklingRefused(`${source} is truncated: storage ${key} needs ${bytes} bytes`);
    offsets.set(key, { start: pos + 8, bytes });
    pos += 8 + bytes;
  }
  const tensors = new Map<string, TensorRef>();
  const skipped: string[] = [];
  flatten(object.value, '', tensors, skipped);
  for (const t of tensors.values()) {
    if (!offsets.has(t.storage.key)) throw new UnpicklingRefused(`${source}: the data of storage ${t.storage.key} is missing`);
  }
  return {
    file: file.path,
    format: 'legacy',
    tensors,
    skipped,
    read(t) {
      const o = offsets.get(t.storage.key)!;
      return gatherTensor(t, data.subarray(o.start, o.start + o.bytes), !littleEndian, `${source} storage ${t.storage.key}`);
    },
    close: () => file.close(),
  };
}

/**
 * Opens a PyTorch checkpoint and reads its pickle (refusing anything but tensors and plain
 * containers); tensor bytes are read on demand with `read()`. Call `close()` when done.
 */
export function openTorchCheckpoint(path: string): TorchCheckpoint {
  let file: RandomAccessFile;
  try {
    file = new RandomAccessFile(path);
  } catch (e) {
    throw new UnpicklingRefused(`Cannot read ${path}: ${(e as NodeJS.ErrnoException).code === 'ENOENT' ? 'the file does not exist' : (e as Error).message}`);
  }
  try {
    const head = file.read(0, Math.min(4, file.size), 'the file header');
    if (isZipFile(head)) return openZipCheckpoint(file);
    if (head[0] === 0x80) return openLegacyCheckpoint(file);
    throw new UnpicklingRefused(`${path} is neither a zip-format nor a legacy PyTorch checkpoint (it starts with bytes ${Array.from(head, (b) => b.toString(16).padStart(2, '0')).join(' ')})`);
  } catch (e) {
    file.close();
    throw e;
  }
}
