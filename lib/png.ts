/**
 * PNG output: pixels encoded by sharp, plus text chunks carrying the generation parameters the way
 * AUTOMATIC1111's web UI stores them (keyword `parameters`), so other tools read them back.
 *
 * Chunk layout (PNG spec, ISO/IEC 15948 §5.3 and §11.3.4): length (4 bytes, big endian), type
 * (4 ASCII bytes), data, CRC-32 over type + data. Text goes right after IHDR, the first chunk.
 * Like PIL's `PngInfo.add_text` (which A1111 uses), a value that fits Latin-1 becomes `tEXt`,
 * anything else an uncompressed UTF-8 `iTXt`.
 */
import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { inflateSync } from 'node:zlib';
import sharp from 'sharp';
import { invalidParameterError, SingleInsertError } from './errors';

/** An 8-bit RGB image, rows top to bottom, HWC. */
export interface RgbImage {
  width: number;
  height: number;
  rgb: Uint8Array;
}

const PNG_SIGNATURE = Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]);
// signature + IHDR chunk (4 length + 4 type + 13 data + 4 CRC)
const IHDR_END = 8 + 4 + 4 + 13 + 4;

// ---------------------------------------------------------------- CRC-32

// CRC-32 with the reflected polynomial 0xEDB88320, as PNG (and zlib) define it (PNG spec annex D).
const CRC_TABLE = (() => {
  const table = new Uint32Array(256);
  for (let n = 0; n < 256; n++) {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    table[n] = c >>> 0;
  }
  return table;
})();

/** CRC-32 of `data`; pass a previous result as `crc` to continue over several buffers. */
export function crc32(data: Uint8Array, crc = 0): number {
  let c = (crc ^ 0xffffffff) >>> 0;
  for (let i = 0; i < data.length; i++) c = CRC_TABLE[(c ^ data[i]) & 0xff] ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}

// ---------------------------------------------------------------- chunks

function chunk(type: string, data: Buffer): Buffer {
  const typeBytes = Buffer.from(type, 'latin1');
  const out = Buffer.alloc(12 + data.length);
  out.writeUInt32BE(data.length, 0);
  typeBytes.copy(out, 4);
  data.copy(out, 8);
  out.writeUInt32BE(crc32(data, crc32(typeBytes)), 8 + data.length);
  return out;
}

const isLatin1 = (s: string) => /^[\u0000-\u00ff]*$/.test(s);

function checkKeyword(keyword: string): void {
  // 1-79 Latin-1 characters, no NUL, no leading/trailing/double spaces (§11.3.4.2); we allow printable ASCII
  if (typeof keyword !== 'string' || !/^[\x21-\x7e]([\x20-\x7e]{0,77}[\x21-\x7e])?$/.test(keyword) || keyword.includes('  ')) {
    throw invalidParameterError('keyword', 'a PNG text keyword (1-79 printable ASCII characters)', keyword);
  }
}

/** A `tEXt` chunk when `text` is Latin-1, otherwise an uncompressed UTF-8 `iTXt` chunk. */
export function textChunk(keyword: string, text: string): Buffer {
  checkKeyword(keyword);
  if (typeof text !== 'string') throw invalidParameterError(`the PNG text "${keyword}"`, 'a string', text);
  if (isLatin1(text)) return chunk('tEXt', Buffer.concat([Buffer.from(keyword, 'latin1'), Buffer.from([0]), Buffer.from(text, 'latin1')]));
  // keyword \0, compression flag 0, method 0, language tag "" \0, translated keyword "" \0, text
  return chunk('iTXt', Buffer.concat([Buffer.from(keyword, 'latin1'), Buffer.from([0, 0, 0, 0, 0]), Buffer.from(text, 'utf8')]));
}

function checkSignature(png: Uint8Array): Buffer {
  const buf = Buffer.from(png.buffer, png.byteOffset, png.byteLength);
  if (buf.length < IHDR_END || !buf.subarray(0, 8).equals(PNG_SIGNATURE) || buf.toString('latin1', 12, 16) !== 'IHDR') {
    throw new SingleInsertError('Expected PNG data (signature, then IHDR) but the buffer does not start like a PNG');
  }
  return buf;
}

/** Inserts text chunks after IHDR (a new buffer; the image data is untouched). */
export function insertTextChunks(png: Uint8Array, text: Record<string, string>): Buffer {
  const buf = checkSignature(png);
  const chunks = Object.entries(text).map(([k, v]) => textChunk(k, v));
  return Buffer.concat([buf.subarray(0, IHDR_END), ...chunks, buf.subarray(IHDR_END)]);
}

/**
 * The text chunks of a PNG (`tEXt`, `zTXt`, `iTXt`) as keyword -> text. Checks every chunk's
 * CRC, so a broken insertion is caught.
 */
export function readPngText(png: Uint8Array): Record<string, string> {
  const buf = checkSignature(png);
  const out: Record<string, string> = {};
  let pos = 8;
  while (pos + 12 <= buf.length) {
    const length = buf.readUInt32BE(pos);
    const type = buf.toString('latin1', pos + 4, pos + 8);
    if (pos + 12 + length > buf.length) throw new SingleInsertError(`PNG chunk ${type} at byte ${pos} runs past the end of the data`);
    const data = buf.subarray(pos + 8, pos + 8 + length);
    const crc = buf.readUInt32BE(pos + 8 + length);
    const actual = crc32(data, crc32(buf.subarray(pos + 4, pos + 8)));
    if (crc !== actual) throw new SingleInsertError(`PNG chunk ${type} at byte ${pos} has CRC ${crc.toString(16)}, expected ${actual.toString(16)}`);
    const nul = data.indexOf(0);
    if (type === 'tEXt' && nul > 0) {
      out[data.toString('latin1', 0, nul)] = data.toString('latin1', nul + 1);
    } else if (type === 'zTXt' && nul > 0) {
      out[data.toString('latin1', 0, nul)] = inflateSync(data.subarray(nul + 2)).toString('latin1');
    } else if (type === 'iTXt' && nul > 0) {
      const compressed = data[nul + 1] === 1;
      const langEnd = data.indexOf(0, nul + 3);
      const transEnd = data.indexOf(0, langEnd + 1);
      const body = data.subarray(transEnd + 1);
      out[data.toString('latin1', 0, nul)] = (compressed ? inflateSync(body) : body).toString('utf8');
    } else if (type === 'IEND') {
      break;
    }
    pos += 12 + length;
  }
  return out;
}

// ---------------------------------------------------------------- encoding and files

function checkImage(image: RgbImage): void {
  if (image === null || typeof image !== 'object') throw invalidParameterError('image', 'an object { width, height, rgb }', image);
  const { width, height, rgb } = image;
  if (!Number.isInteger(width) || width < 1) throw invalidParameterError('image.width', 'a positive integer', width);
  if (!Number.isInteger(height) || height < 1) throw invalidParameterError('image.height', 'a positive integer', height);
  if (!(rgb instanceof Uint8Array) || rgb.length !== width * height * 3) {
    throw invalidParameterError('image.rgb', `a Uint8Array of ${width}x${height}x3 = ${width * height * 3} bytes`, rgb instanceof Uint8Array ? `${rgb.length} bytes` : rgb);
  }
}

/** PNG bytes of an RGB image (sharp), with `text` chunks after IHDR. Deterministic for equal input. */
export async function encodePng(image: RgbImage, text: Record<string, string> = {}): Promise<Buffer> {
  checkImage(image);
  const png = await sharp(Buffer.from(image.rgb.buffer, image.rgb.byteOffset, image.rgb.byteLength), {
    raw: { width: image.width, height: image.height, channels: 3 },
  })
    .png()
    .toBuffer();
  return Object.keys(text).length ? insertTextChunks(png, text) : png;
}

/** Writes `data` to `file` through a temporary file in the same folder and a rename: readers never see half a file. */
export async function writeFileAtomic(file: string, data: Uint8Array): Promise<void> {
  const tmp = path.join(path.dirname(file), `.${path.basename(file)}.${process.pid}.${crypto.randomBytes(4).toString('hex')}.tmp`);
  try {
    await fs.promises.writeFile(tmp, data, { flag: 'wx' });
    await fs.promises.rename(tmp, file);
  } catch (e) {
    await fs.promises.rm(tmp, { force: true });
    throw e;
  }
}

/**
 * Writes `data` as `<dir>/<base><ext>`, or `<base>-1<ext>`, `<base>-2<ext>`, ... when that name is
 * taken: never overwrites. Atomic (temporary file, then a hard link, which fails instead of
 * replacing an existing name). Returns the path written.
 */
export async function writeNewFile(dir: string, base: string, ext: string, data: Uint8Array): Promise<string> {
  await fs.promises.mkdir(dir, { recursive: true });
  const tmp = path.join(dir, `.${base}${ext}.${process.pid}.${crypto.randomBytes(4).toString('hex')}.tmp`);
  await fs.promises.writeFile(tmp, data, { flag: 'wx' });
  try {
    for (let i = 0; ; i++) {
      const file = path.join(dir, i === 0 ? `${base}${ext}` : `${base}-${i}${ext}`);
      try {
        await fs.promises.link(tmp, file);
        return file;
      } catch (e) {
        const code = (e as NodeJS.ErrnoException).code;
        if (code === 'EEXIST') continue;
        // file systems without hard links: check, then rename (not race-free, still no silent overwrite in practice)
        if (code === 'EPERM' || code === 'ENOTSUP' || code === 'EOPNOTSUPP') {
          if (fs.existsSync(file)) continue;
          await fs.promises.rename(tmp, file);
          return file;
        }
        throw new SingleInsertError(`Cannot write ${file}: ${(e as Error).message}`, { cause: e });
      }
    }
  } finally {
    await fs.promises.rm(tmp, { force: true });
  }
}
