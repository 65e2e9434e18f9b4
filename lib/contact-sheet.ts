/**
 * A contact sheet: generated images in a grid, one row per prompt and one column per image of that
 * prompt (seed / batch index), with the prompt written under its row. Drawn with sharp: the tiles
 * are composited raw onto a white canvas, and the labels are one SVG overlay (sharp renders it
 * with librsvg).
 *
 * Layout (all in pixels; `gap` is the outer margin and the space between tiles and rows):
 *   width  = cols * tileWidth + (cols + 1) * gap
 *   height = rows * (tileHeight + labelHeight) + (rows + 1) * gap
 *   tile (r, c) at left = gap + c * (tileWidth + gap), top = gap + r * (tileHeight + labelHeight + gap)
 *   row r's label below its tiles: top = tile top + tileHeight, left = gap, width = width - 2 * gap
 * tileHeight = round(tileWidth * imageHeight / imageWidth). cols is the longest row; shorter rows
 * leave their last cells blank.
 */
import sharp from 'sharp';
import { invalidParameterError, SingleInsertError } from './errors';

export interface SheetImage {
  width: number;
  height: number;
  /** HWC uint8 RGB */
  rgb: Uint8Array;
}

export interface SheetRow {
  label: string;
  images: SheetImage[];
}

export interface ContactSheetOptions {
  /** tile width; images are resized to it (keeping their aspect ratio). Default: the images' width */
  tileWidth?: number;
  /** the text band under each row; default 28 */
  labelHeight?: number;
  /** margin and spacing; default 8 */
  gap?: number;
}

export interface SheetLayout {
  width: number;
  height: number;
  rows: number;
  cols: number;
  tileWidth: number;
  tileHeight: number;
  labelHeight: number;
  gap: number;
}

export const DEFAULT_LABEL_HEIGHT = 28;
export const DEFAULT_GAP = 8;
/** Label text size relative to the label band, and a generous average glyph width for sans-serif text. */
const FONT_FRACTION = 0.5;
const GLYPH_WIDTH = 0.6;

const isPositiveInt = (v: unknown): v is number => typeof v === 'number' && Number.isInteger(v) && v >= 1;
const isNonNegativeInt = (v: unknown): v is number => typeof v === 'number' && Number.isInteger(v) && v >= 0;

/** The sheet's size for a grid (the formula in the file comment). */
export function sheetLayout(rows: number, cols: number, tileWidth: number, tileHeight: number, labelHeight = DEFAULT_LABEL_HEIGHT, gap = DEFAULT_GAP): SheetLayout {
  for (const [name, v] of Object.entries({ rows, cols, tileWidth, tileHeight })) if (!isPositiveInt(v)) throw invalidParameterError(name, 'a positive integer', v);
  if (!isNonNegativeInt(labelHeight)) throw invalidParameterError('labelHeight', 'a non-negative integer', labelHeight);
  if (!isNonNegativeInt(gap)) throw invalidParameterError('gap', 'a non-negative integer', gap);
  return {
    width: cols * tileWidth + (cols + 1) * gap,
    height: rows * (tileHeight + labelHeight) + (rows + 1) * gap,
    rows,
    cols,
    tileWidth,
    tileHeight,
    labelHeight,
    gap,
  };
}

/** Where tile (row, col) goes. */
export function tilePosition(layout: SheetLayout, row: number, col: number): { left: number; top: number } {
  return { left: layout.gap + col * (layout.tileWidth + layout.gap), top: layout.gap + row * (layout.tileHeight + layout.labelHeight + layout.gap) };
}

function escapeXml(text: string): string {
  return text.replace(/[<>&'"]/g, (c) => ({ '<': '&lt;', '>': '&gt;', '&': '&amp;', "'": '&apos;', '"': '&quot;' })[c]!);
}

/** Shortens text to about `maxChars` characters with an ellipsis. */
export function fitLabel(text: string, maxChars: number): string {
  // drop control characters, which are not allowed in XML
  // eslint-disable-next-line no-control-regex
  const clean = text.replace(/[\x00-\x08\x0b\x0c\x0e-\x1f]/g, ' ').replace(/\s+/g, ' ').trim();
  const chars = [...clean];
  if (chars.length <= maxChars) return clean;
  return chars.slice(0, Math.max(0, maxChars - 1)).join('') + '…';
}

function labelsSvg(layout: SheetLayout, labels: string[]): Buffer {
  const fontSize = Math.max(6, Math.round(layout.labelHeight * FONT_FRACTION));
  const textWidth = Math.max(0, layout.width - 2 * layout.gap);
  const maxChars = Math.max(1, Math.floor(textWidth / (fontSize * GLYPH_WIDTH)));
  const texts = labels.map((label, r) => {
    const { top } = tilePosition(layout, r, 0);
    const y = top + layout.tileHeight + Math.round(layout.labelHeight * 0.68);
    return `<text x="${layout.gap}" y="${y}">${escapeXml(fitLabel(label, maxChars))}</text>`;
  });
  return Buffer.from(
    `<svg xmlns="http://www.w3.org/2000/svg" width="${layout.width}" height="${layout.height}">` +
      `<g font-family="DejaVu Sans, Arial, Helvetica, sans-serif" font-size="${fontSize}" fill="#202020">${texts.join('')}</g></svg>`,
  );
}

function checkRows(rows: unknown): SheetRow[] {
  if (!Array.isArray(rows) || rows.length === 0) throw invalidParameterError('rows', 'a non-empty array of { label, images }', rows);
  rows.forEach((r, i) => {
    if (r === null || typeof r !== 'object' || typeof r.label !== 'string' || !Array.isArray(r.images) || r.images.length === 0) {
      throw invalidParameterError(`rows[${i}]`, 'an object { label: string, images: non-empty array }', r);
    }
    r.images.forEach((im: SheetImage, j: number) => {
      if (!im || !isPositiveInt(im.width) || !isPositiveInt(im.height) || !(im.rgb instanceof Uint8Array || Object.prototype.toString.call(im.rgb) === '[object Uint8Array]') || im.rgb.length !== im.width * im.height * 3) {
        throw invalidParameterError(`rows[${i}].images[${j}]`, 'an RGB image { width, height, rgb: Uint8Array of width*height*3 }', im);
      }
    });
  });
  return rows as SheetRow[];
}

/** Draws the sheet; resolves to PNG bytes and the layout it used. */
export async function contactSheet(rows: SheetRow[], options: ContactSheetOptions = {}): Promise<{ png: Buffer; layout: SheetLayout }> {
  const list = checkRows(rows);
  if (options === null || typeof options !== 'object') throw invalidParameterError('options', 'an object', options);
  const first = list[0].images[0];
  for (const [i, r] of list.entries()) {
    for (const [j, im] of r.images.entries()) {
      if (im.width !== first.width || im.height !== first.height) {
        throw new SingleInsertError(`Every image of a contact sheet must have one size: rows[${i}].images[${j}] is ${im.width}x${im.height}, the first is ${first.width}x${first.height}`);
      }
    }
  }
  const tileWidth = options.tileWidth ?? first.width;
  if (!isPositiveInt(tileWidth)) throw invalidParameterError('tileWidth', 'a positive integer', tileWidth);
  const tileHeight = Math.max(1, Math.round((tileWidth * first.height) / first.width));
  const cols = Math.max(...list.map((r) => r.images.length));
  const layout = sheetLayout(list.length, cols, tileWidth, tileHeight, options.labelHeight ?? DEFAULT_LABEL_HEIGHT, options.gap ?? DEFAULT_GAP);

  const layers: sharp.OverlayOptions[] = [];
  for (const [r, row] of list.entries()) {
    for (const [c, im] of row.images.entries()) {
      let input = Buffer.from(im.rgb.buffer, im.rgb.byteOffset, im.rgb.byteLength);
      if (tileWidth !== im.width || tileHeight !== im.height) {
        input = await sharp(input, { raw: { width: im.width, height: im.height, channels: 3 } }).resize(tileWidth, tileHeight, { fit: 'fill' }).raw().toBuffer();
      }
      layers.push({ input, raw: { width: tileWidth, height: tileHeight, channels: 3 }, ...tilePosition(layout, r, c) });
    }
  }
  if (layout.labelHeight > 0) layers.push({ input: labelsSvg(layout, list.map((r) => r.label)), left: 0, top: 0 });
  const png = await sharp({ create: { width: layout.width, height: layout.height, channels: 3, background: '#ffffff' } })
    .composite(layers)
    .removeAlpha()
    .png()
    .toBuffer();
  return { png, layout };
}
