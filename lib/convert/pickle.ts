/**
 * A restricted unpickler for PyTorch checkpoints: it reads the pickle opcodes that `torch.save`
 * writes and builds plain values (strings, numbers, lists, tuples, dicts, tensor references), and
 * nothing else. It never calls anything: the few "callables" a checkpoint names are interpreted by
 * this file from an ALLOW-LIST (the same idea as `torch.load(weights_only=True)`'s
 * `_weights_only_unpickler`), and every other global — `os.system`, `builtins.eval`, `subprocess.*`,
 * a model class — is refused by name the moment the pickle mentions it, before anything else happens.
 *
 * The opcodes are those of CPython's Lib/pickle.py (protocols 0-5). Values:
 *   str -> string; bytes -> Uint8Array; int -> number (bigint beyond 2^53); float -> number;
 *   True/False/None -> boolean/null; list -> Array; tuple -> PyTuple; dict / OrderedDict -> Map;
 *   a tensor -> TensorRef; a storage (persistent id) -> StorageRef.
 */

/** A storage dtype: torch.<Name>Storage -> safetensors dtype and element size. */
export interface StorageType {
  name: string;
  dtype: 'F64' | 'F32' | 'F16' | 'BF16' | 'I64' | 'I32' | 'I16' | 'I8' | 'U8' | 'BOOL';
  itemSize: number;
}

/** torch's legacy typed storages (torch/storage.py), the names `torch.save` pickles as storage types. */
export const STORAGE_TYPES: Record<string, StorageType> = Object.fromEntries(
  (
    [
      ['DoubleStorage', 'F64', 8],
      ['FloatStorage', 'F32', 4],
      ['HalfStorage', 'F16', 2],
      ['BFloat16Storage', 'BF16', 2],
      ['LongStorage', 'I64', 8],
      ['IntStorage', 'I32', 4],
      ['ShortStorage', 'I16', 2],
      ['CharStorage', 'I8', 1],
      ['ByteStorage', 'U8', 1],
      ['BoolStorage', 'BOOL', 1],
    ] as const
  ).map(([name, dtype, itemSize]) => [name, { name, dtype, itemSize }]),
);

export class PyTuple {
  constructor(readonly items: unknown[]) {}
}

/** A global the pickle names (only allow-listed ones are ever created). */
export class PyGlobal {
  constructor(
    readonly module: string,
    readonly name: string,
  ) {}
  get qualified(): string {
    return `${this.module}.${this.name}`;
  }
}

/** A storage named by a persistent id: the bytes live outside the pickle (zip entry or legacy file tail). */
export class StorageRef {
  constructor(
    readonly key: string,
    readonly type: StorageType,
    readonly location: string,
    /** elements in the storage (as the pickle states it) */
    readonly numel: number,
    /** legacy format views: element offset into the root storage `key` */
    readonly viewOffset = 0,
  ) {}
}

/** A tensor view: `storage[offset + sum(i_d * stride_d)]` for each index. */
export class TensorRef {
  constructor(
    readonly storage: StorageRef,
    readonly offset: number,
    readonly shape: number[],
    readonly stride: number[],
  ) {}
  get dtype(): StorageType['dtype'] {
    return this.storage.type.dtype;
  }
}

/** Thrown for anything the restricted unpickler will not load; the message names the file. */
export class UnpicklingRefused extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'UnpicklingRefused';
  }
}

/** `persistent_load(pid)`: turns a persistent id into a StorageRef (or throws). */
export type PersistentLoad = (pid: unknown) => unknown;

/** The globals a checkpoint may name. Storage types are data, the rest are interpreted below. */
const ALLOWED_GLOBALS = new Set<string>([
  'collections.OrderedDict',
  'torch._utils._rebuild_tensor',
  'torch._utils._rebuild_tensor_v2',
  'torch._utils._rebuild_parameter',
  'torch._utils._rebuild_parameter_with_state',
  // protocol-2 pickles of `bytes` objects: _codecs.encode(str, 'latin1')
  '_codecs.encode',
  ...Object.keys(STORAGE_TYPES).map((n) => `torch.${n}`),
]);

const MARK = Symbol('mark');

function describe(v: unknown): string {
  if (v === null) return 'None';
  if (v === MARK) return 'MARK';
  if (v instanceof PyTuple) return `tuple(${v.items.length})`;
  if (v instanceof PyGlobal) return v.qualified;
  if (v instanceof TensorRef) return 'tensor';
  if (v instanceof StorageRef) return 'storage';
  if (v instanceof Map) return 'dict';
  if (Array.isArray(v)) return 'list';
  if (v instanceof Uint8Array) return 'bytes';
  return typeof v;
}

const isInt = (v: unknown): v is number => typeof v === 'number' && Number.isSafeInteger(v);
const isIntTuple = (v: unknown): v is PyTuple => v instanceof PyTuple && v.items.every((x) => isInt(x) && x >= 0);

export interface UnpickleOptions {
  /** names the source in messages, e.g. "model.pth (archive/data.pkl)" */
  source: string;
  persistentLoad: PersistentLoad;
}

/**
 * Reads one pickle from `data` starting at `start`. Returns the value and the offset just past its
 * STOP opcode (the legacy format stores several pickles back to back).
 */
export function unpickle(data: Uint8Array, options: UnpickleOptions, start = 0): { value: unknown; end: number } {
  const { source, persistentLoad } = options;
  const view = new DataView(data.buffer, data.byteOffset, data.byteLength);
  const refuse = (msg: string): never => {
    throw new UnpicklingRefused(`${msg} in ${source}`);
  };
  const stack: unknown[] = [];
  const marks: number[] = [];
  const memo = new Map<number, unknown>();
  let pos = start;

  const need = (n: number): number => {
    if (n < 0 || pos + n > data.length) refuse(`truncated pickle: needed ${n} more byte(s) at offset ${pos}, the data ends at ${data.length}`);
    const at = pos;
    pos += n;
    return at;
  };
  const u8 = () => data[need(1)];
  const u16 = () => view.getUint16(need(2), true);
  const u32 = () => view.getUint32(need(4), true);
  const u64 = (): number => {
    const at = need(8);
    const v = view.getBigUint64(at, true);
    if (v > BigInt(Number.MAX_SAFE_INTEGER)) refuse(`length ${v} at offset ${at} is too large`);
    return Number(v);
  };
  const bytes = (n: number) => data.subarray(need(n), pos);
  const utf8 = (n: number) => new TextDecoder('utf-8', { fatal: false }).decode(bytes(n));
  const latin1 = (n: number) => String.fromCharCode(...bytes(n));
  const line = (): string => {
    const end = data.indexOf(0x0a, pos);
    if (end < 0) refuse(`truncated pickle: unterminated text line at offset ${pos}`);
    const s = new TextDecoder('utf-8').decode(data.subarray(pos, end));
    pos = end + 1;
    return s;
  };
  const pop = (): unknown => {
    if (stack.length === 0 || (marks.length && stack.length <= marks[marks.length - 1])) refuse(`pickle stack underflow at offset ${pos - 1}`);
    return stack.pop();
  };
  const top = (): unknown => {
    if (stack.length === 0) refuse(`pickle stack underflow at offset ${pos - 1}`);
    return stack[stack.length - 1];
  };
  const popMark = (): unknown[] => {
    const m = marks.pop();
    if (m === undefined) refuse(`pickle MARK missing at offset ${pos - 1}`);
    return stack.splice(m!);
  };
  const signedLE = (b: Uint8Array): number | bigint => {
    if (b.length === 0) return 0;
    let v = 0n;
    for (let i = b.length - 1; i >= 0; i--) v = (v << 8n) | BigInt(b[i]);
    if (b[b.length - 1] & 0x80) v -= 1n << BigInt(8 * b.length);
    return v >= BigInt(Number.MIN_SAFE_INTEGER) && v <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(v) : v;
  };
  const findGlobal = (module: string, name: string): PyGlobal => {
    const qualified = `${module}.${name}`;
    if (!ALLOWED_GLOBALS.has(qualified)) {
      throw new UnpicklingRefused(`refusing to load global ${qualified} from ${source}: only tensors and plain containers are allowed`);
    }
    return new PyGlobal(module, name);
  };
  const setItem = (d: unknown, k: unknown, v: unknown) => {
    if (!(d instanceof Map)) refuse(`SETITEM on a ${describe(d)}, expected a dict`);
    (d as Map<unknown, unknown>).set(k, v);
  };
  const append = (l: unknown, items: unknown[]) => {
    if (!Array.isArray(l)) refuse(`APPEND on a ${describe(l)}, expected a list`);
    (l as unknown[]).push(...items);
  };

  // The interpretation of the allowed callables. Every branch checks its arguments' shapes.
  const call = (fn: unknown, args: unknown): unknown => {
    if (!(fn instanceof PyGlobal)) return refuse(`refusing to call a ${describe(fn)} (only allow-listed globals can be reduced)`);
    if (!(args instanceof PyTuple)) return refuse(`${fn.qualified} called with a ${describe(args)} instead of an argument tuple`);
    const a = args.items;
    const bad = (): never => refuse(`${fn.qualified} called with unexpected arguments (${a.map(describe).join(', ')})`);
    switch (fn.qualified) {
      case 'collections.OrderedDict': {
        if (a.length === 0) return new Map();
        if (a.length === 1 && Array.isArray(a[0])) {
          const m = new Map();
          for (const kv of a[0] as unknown[]) {
            if (!(kv instanceof PyTuple) && !Array.isArray(kv)) bad();
            const items = kv instanceof PyTuple ? kv.items : (kv as unknown[]);
            if (items.length !== 2) bad();
            m.set(items[0], items[1]);
          }
          return m;
        }
        return bad();
      }
      case 'torch._utils._rebuild_tensor':
      case 'torch._utils._rebuild_tensor_v2': {
        // _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks[, metadata])
        const v2 = fn.name === '_rebuild_tensor_v2';
        const [storage, offset, size, stride] = a;
        const okLength = v2 ? a.length === 6 || a.length === 7 : a.length === 4;
        if (!okLength || !(storage instanceof StorageRef) || !isInt(offset) || offset < 0 || !isIntTuple(size) || !isIntTuple(stride) || size.items.length !== stride.items.length) return bad();
        if (v2 && (typeof a[4] !== 'boolean' || !(a[5] instanceof Map))) return bad();
        return new TensorRef(storage, offset, size.items as number[], stride.items as number[]);
      }
      case 'torch._utils._rebuild_parameter':
      case 'torch._utils._rebuild_parameter_with_state': {
        // _rebuild_parameter(data, requires_grad, backward_hooks[, state]): the parameter's tensor
        const n = fn.name === '_rebuild_parameter' ? 3 : 4;
        if (a.length !== n || !(a[0] instanceof TensorRef) || typeof a[1] !== 'boolean' || !(a[2] instanceof Map)) return bad();
        return a[0];
      }
      case '_codecs.encode': {
        if (a.length !== 2 || typeof a[0] !== 'string' || !['latin1', 'latin-1'].includes(String(a[1]).toLowerCase())) return bad();
        return Uint8Array.from(a[0] as string, (c) => c.charCodeAt(0) & 0xff);
      }
      default:
        // storage types are data, not callables
        return refuse(`refusing to call ${fn.qualified} (it is only allowed as a storage type)`);
    }
  };

  for (;;) {
    const opAt = pos;
    if (pos >= data.length) refuse(`truncated pickle: no STOP opcode before the end of the data (offset ${pos})`);
    const op = data[pos++];
    switch (op) {
      case 0x80: // PROTO
        if (u8() > 5) refuse(`unsupported pickle protocol ${data[pos - 1]}`);
        break;
      case 0x95: // FRAME (a length hint; the data is read linearly anyway)
        u64();
        break;
      case 0x2e: // STOP
        if (stack.length !== 1 || marks.length) refuse(`malformed pickle: ${stack.length} values on the stack at STOP`);
        return { value: stack[0], end: pos };
      case 0x28: // MARK
        marks.push(stack.length);
        break;
      case 0x30: // POP
        pop();
        break;
      case 0x31: // POP_MARK
        popMark();
        break;
      case 0x32: // DUP
        stack.push(top());
        break;
      case 0x7d: // EMPTY_DICT
        stack.push(new Map());
        break;
      case 0x5d: // EMPTY_LIST
        stack.push([]);
        break;
      case 0x29: // EMPTY_TUPLE
        stack.push(new PyTuple([]));
        break;
      case 0x8f: // EMPTY_SET (kept as a list: sets hold no tensors in state dicts)
        stack.push([]);
        break;
      case 0x90: {
        // ADDITEMS
        const items = popMark();
        append(top(), items);
        break;
      }
      case 0x91: // FROZENSET
        stack.push(new PyTuple(popMark()));
        break;
      case 0x64: {
        // DICT
        const items = popMark();
        if (items.length % 2) refuse('DICT with an odd number of items');
        const m = new Map();
        for (let i = 0; i < items.length; i += 2) m.set(items[i], items[i + 1]);
        stack.push(m);
        break;
      }
      case 0x6c: // LIST
        stack.push(popMark());
        break;
      case 0x74: // TUPLE
        stack.push(new PyTuple(popMark()));
        break;
      case 0x85: // TUPLE1
        stack.push(new PyTuple([pop()]));
        break;
      case 0x86: {
        // TUPLE2
        const b = pop(), a = pop();
        stack.push(new PyTuple([a, b]));
        break;
      }
      case 0x87: {
        // TUPLE3
        const c = pop(), b = pop(), a = pop();
        stack.push(new PyTuple([a, b, c]));
        break;
      }
      case 0x73: {
        // SETITEM
        const v = pop(), k = pop();
        setItem(top(), k, v);
        break;
      }
      case 0x75: {
        // SETITEMS
        const items = popMark();
        if (items.length % 2) refuse('SETITEMS with an odd number of items');
        const d = top();
        for (let i = 0; i < items.length; i += 2) setItem(d, items[i], items[i + 1]);
        break;
      }
      case 0x61: {
        // APPEND
        const v = pop();
        append(top(), [v]);
        break;
      }
      case 0x65: {
        // APPENDS
        const items = popMark();
        append(top(), items);
        break;
      }
      case 0x58: // BINUNICODE
        stack.push(utf8(u32()));
        break;
      case 0x8c: // SHORT_BINUNICODE
        stack.push(utf8(u8()));
        break;
      case 0x8d: // BINUNICODE8
        stack.push(utf8(u64()));
        break;
      case 0x54: // BINSTRING (Python 2 str: read as latin-1 text, like encoding='latin1')
        stack.push(latin1(view.getInt32(need(4), true)));
        break;
      case 0x55: // SHORT_BINSTRING
        stack.push(latin1(u8()));
        break;
      case 0x42: // BINBYTES
        stack.push(bytes(u32()).slice());
        break;
      case 0x43: // SHORT_BINBYTES
        stack.push(bytes(u8()).slice());
        break;
      case 0x8e: // BINBYTES8
      case 0x96: // BYTEARRAY8
        stack.push(bytes(u64()).slice());
        break;
      case 0x4a: // BININT (signed 32-bit)
        stack.push(view.getInt32(need(4), true));
        break;
      case 0x4b: // BININT1
        stack.push(u8());
        break;
      case 0x4d: // BININT2
        stack.push(u16());
        break;
      case 0x8a: // LONG1
        stack.push(signedLE(bytes(u8())));
        break;
      case 0x8b: {
        // LONG4
        const n = view.getInt32(need(4), true);
        stack.push(signedLE(bytes(n)));
        break;
      }
      case 0x49: {
        // INT (text; "01"/"00" are True/False in protocol 0)
        const s = line();
        if (s === '01') stack.push(true);
        else if (s === '00') stack.push(false);
        else if (/^[+-]?\d+$/.test(s)) stack.push(Number(s));
        else refuse(`bad INT ${JSON.stringify(s)}`);
        break;
      }
      case 0x4c: {
        // LONG (text)
        const s = line().replace(/L$/, '');
        if (!/^[+-]?\d+$/.test(s)) refuse(`bad LONG ${JSON.stringify(s)}`);
        const b = BigInt(s);
        stack.push(b >= BigInt(Number.MIN_SAFE_INTEGER) && b <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(b) : b);
        break;
      }
      case 0x47: // BINFLOAT (big-endian double)
        stack.push(view.getFloat64(need(8), false));
        break;
      case 0x46: {
        // FLOAT (text)
        const f = Number(line());
        if (Number.isNaN(f)) refuse('bad FLOAT');
        stack.push(f);
        break;
      }
      case 0x4e: // NONE
        stack.push(null);
        break;
      case 0x88: // NEWTRUE
        stack.push(true);
        break;
      case 0x89: // NEWFALSE
        stack.push(false);
        break;
      case 0x71: // BINPUT
        memo.set(u8(), top());
        break;
      case 0x72: // LONG_BINPUT
        memo.set(u32(), top());
        break;
      case 0x70: // PUT (text)
        memo.set(Number(line()), top());
        break;
      case 0x94: // MEMOIZE
        memo.set(memo.size, top());
        break;
      case 0x68: // BINGET
      case 0x6a: // LONG_BINGET
      case 0x67: {
        // GET (text)
        const k = op === 0x68 ? u8() : op === 0x6a ? u32() : Number(line());
        if (!memo.has(k)) refuse(`memo key ${k} is not defined (offset ${opAt})`);
        stack.push(memo.get(k));
        break;
      }
      case 0x63: {
        // GLOBAL "module\nname\n"
        const module = line();
        const name = line();
        stack.push(findGlobal(module, name));
        break;
      }
      case 0x93: {
        // STACK_GLOBAL
        const name = pop(), module = pop();
        if (typeof module !== 'string' || typeof name !== 'string') refuse('STACK_GLOBAL with non-string names');
        stack.push(findGlobal(module as string, name as string));
        break;
      }
      case 0x52: {
        // REDUCE
        const args = pop(), fn = pop();
        stack.push(call(fn, args));
        break;
      }
      case 0x62: {
        // BUILD: state for an object. Tensors' and OrderedDicts' states (e.g. the `_metadata` a
        // state dict carries) are not needed; nothing else can reach here.
        const state = pop();
        const obj = top();
        if (!(obj instanceof Map) && !(obj instanceof TensorRef)) refuse(`BUILD on a ${describe(obj)} (state ${describe(state)})`);
        break;
      }
      case 0x51: // BINPERSID
        stack.push(persistentLoad(pop()));
        break;
      case 0x50: // PERSID (text)
        stack.push(persistentLoad(line()));
        break;
      case 0x81: // NEWOBJ
      case 0x92: // NEWOBJ_EX
      case 0x69: // INST
      case 0x6f: // OBJ
        refuse(`refusing to instantiate an object (pickle opcode 0x${op.toString(16)} at offset ${opAt}): only tensors and plain containers are allowed`);
        break;
      case 0x82: // EXT1
      case 0x83: // EXT2
      case 0x84: // EXT4
        refuse(`refusing the copyreg extension registry (opcode 0x${op.toString(16)} at offset ${opAt})`);
        break;
      default:
        refuse(`unsupported pickle opcode 0x${op.toString(16).padStart(2, '0')} at offset ${opAt}`);
    }
  }
}
