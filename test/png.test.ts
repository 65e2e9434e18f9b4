import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import sharp from 'sharp';
import { crc32, encodePng, insertTextChunks, readPngText, writeFileAtomic, writeNewFile } from '../lib/png';

// a deterministic 13x7 RGB test pattern (odd sizes catch stride mistakes)
function pattern(width = 13, height = 7) {
  const rgb = new Uint8Array(width * height * 3);
  for (let i = 0; i < rgb.length; i++) rgb[i] = (i * 37 + (i % 3) * 91) & 0xff;
  return { width, height, rgb };
}

describe('PNG text chunks', () => {
  test('crc32 matches the standard check value', () => {
    // CRC-32/ISO-HDLC check value of "123456789"
    expect(crc32(Buffer.from('123456789'))).toBe(0xcbf43926);
    expect(crc32(Buffer.from('6789'), crc32(Buffer.from('12345')))).toBe(0xcbf43926);
    expect(crc32(new Uint8Array(0))).toBe(0);
  });

  test('the parameters tEXt chunk round-trips and sits right after IHDR', async () => {
    const parameters = 'a photo of * face\nNegative prompt: blurry\nSteps: 25, Sampler: DDIM, CFG scale: 7.5, Seed: 42, Size: 512x512, Model: tiny-sd';
    const png = await encodePng(pattern(), { parameters });
    expect(png.toString('latin1', 12, 16)).toBe('IHDR');
    expect(png.toString('latin1', 33 + 4, 33 + 8)).toBe('tEXt');
    expect(readPngText(png)).toEqual({ parameters });
  });

  test('the PNG decodes with sharp to the same pixels', async () => {
    const img = pattern();
    const png = await encodePng(img, { parameters: 'x' });
    const { data, info } = await sharp(png).raw().toBuffer({ resolveWithObject: true });
    expect([info.width, info.height, info.channels]).toEqual([13, 7, 3]);
    expect(Buffer.from(data).equals(Buffer.from(img.rgb))).toBe(true);
    // sharp reads the text back too (libvips exposes PNG text as comments)
    const meta = await sharp(png).metadata();
    expect(meta.comments).toEqual([{ keyword: 'parameters', text: 'x' }]);
  });

  test('non-Latin-1 text goes into iTXt as UTF-8 (like PIL)', async () => {
    const text = 'ein Foto von * 顔 — café';
    const png = await encodePng(pattern(), { parameters: text, Software: 'singleinsert-native' });
    expect(png.toString('latin1', 33 + 4, 33 + 8)).toBe('iTXt');
    expect(readPngText(png)).toEqual({ parameters: text, Software: 'singleinsert-native' });
  });

  test('equal input gives equal bytes', async () => {
    const [a, b] = await Promise.all([encodePng(pattern(), { parameters: 'p' }), encodePng(pattern(), { parameters: 'p' })]);
    expect(a.equals(b)).toBe(true);
  });

  test('a corrupted chunk is reported by its CRC', async () => {
    const png = Buffer.from(await encodePng(pattern(), { parameters: 'hello' }));
    png[33 + 8 + 12] ^= 1; // a byte of the text
    expect(() => readPngText(png)).toThrow(/PNG chunk tEXt at byte 33 has CRC [0-9a-f]+, expected [0-9a-f]+/);
  });

  test('errors', async () => {
    expect(() => insertTextChunks(Buffer.from('not a png at all, really not one'), {})).toThrow('Expected PNG data (signature, then IHDR)');
    await expect(encodePng({ width: 2, height: 2, rgb: new Uint8Array(5) })).rejects.toThrow('Expected a Uint8Array of 2x2x3 = 12 bytes for image.rgb but received "5 bytes"');
    await expect(encodePng(pattern(), { 'bad\0key': 'x' })).rejects.toThrow(/for keyword/);
  });
});

describe('files', () => {
  let dir: string;
  beforeEach(() => (dir = fs.mkdtempSync(path.join(os.tmpdir(), 'si-png-'))));
  afterEach(() => fs.rmSync(dir, { recursive: true, force: true }));

  test('writeNewFile never overwrites and leaves no temporary files', async () => {
    const a = await writeNewFile(dir, '42-0', '.png', Buffer.from('a'));
    const b = await writeNewFile(dir, '42-0', '.png', Buffer.from('b'));
    const c = await writeNewFile(dir, '42-0', '.png', Buffer.from('c'));
    expect([a, b, c].map((f) => path.basename(f))).toEqual(['42-0.png', '42-0-1.png', '42-0-2.png']);
    expect([a, b, c].map((f) => fs.readFileSync(f, 'utf8'))).toEqual(['a', 'b', 'c']);
    expect(fs.readdirSync(dir).sort()).toEqual(['42-0-1.png', '42-0-2.png', '42-0.png']);
  });

  test('concurrent writers to the same name all get their own file', async () => {
    const files = await Promise.all(Array.from({ length: 6 }, (_, i) => writeNewFile(path.join(dir, 'sub'), 's', '.png', Buffer.from(String(i)))));
    expect(new Set(files).size).toBe(6);
    expect(files.map((f) => fs.readFileSync(f, 'utf8')).sort()).toEqual(['0', '1', '2', '3', '4', '5']);
  });

  test('writeFileAtomic replaces through a rename', async () => {
    const f = path.join(dir, 'x.png');
    await writeFileAtomic(f, Buffer.from('one'));
    await writeFileAtomic(f, Buffer.from('two'));
    expect(fs.readFileSync(f, 'utf8')).toBe('two');
    expect(fs.readdirSync(dir)).toEqual(['x.png']);
  });
});
