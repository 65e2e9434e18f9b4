// Contact sheets: the grid size formula, one tile per image at its computed place, labels drawn.
import sharp from 'sharp';
import { contactSheet, fitLabel, sheetLayout, tilePosition } from '../lib/contact-sheet';

/** A solid-colour RGB image. */
function solid(width: number, height: number, rgb: [number, number, number]) {
  const data = new Uint8Array(width * height * 3);
  for (let i = 0; i < width * height; i++) data.set(rgb, i * 3);
  return { width, height, rgb: data };
}

const colour = (r: number, c: number): [number, number, number] => [40 + 60 * r, 200 - 50 * c, (r * 3 + c) * 20];

async function pixels(png: Buffer) {
  const { data, info } = await sharp(png).raw().toBuffer({ resolveWithObject: true });
  return { data, info, at: (x: number, y: number) => Array.from(data.subarray((y * info.width + x) * info.channels, (y * info.width + x) * info.channels + 3)) };
}

describe('sheetLayout', () => {
  test('width = cols*tile + (cols+1)*gap, height = rows*(tile + label) + (rows+1)*gap', () => {
    expect(sheetLayout(3, 4, 64, 48, 28, 8)).toEqual({ width: 4 * 64 + 5 * 8, height: 3 * (48 + 28) + 4 * 8, rows: 3, cols: 4, tileWidth: 64, tileHeight: 48, labelHeight: 28, gap: 8 });
    expect(sheetLayout(1, 1, 512, 512)).toMatchObject({ width: 512 + 16, height: 512 + 28 + 16 });
    expect(sheetLayout(2, 2, 10, 10, 0, 0)).toMatchObject({ width: 20, height: 20 });
    const l = sheetLayout(3, 4, 64, 48, 28, 8);
    expect(tilePosition(l, 0, 0)).toEqual({ left: 8, top: 8 });
    expect(tilePosition(l, 2, 3)).toEqual({ left: 8 + 3 * 72, top: 8 + 2 * (48 + 28 + 8) });
    expect(() => sheetLayout(0, 1, 1, 1)).toThrow('Expected a positive integer for rows but received 0');
  });
});

describe('contactSheet', () => {
  test('one tile per image, at its computed place, with the computed size; labels drawn under each row', async () => {
    const rows = [0, 1, 2].map((r) => ({ label: `prompt number ${r}`, images: [0, 1].map((c) => solid(32, 24, colour(r, c))) }));
    const { png, layout } = await contactSheet(rows, { labelHeight: 20, gap: 6 });
    expect(layout).toMatchObject({ rows: 3, cols: 2, tileWidth: 32, tileHeight: 24, width: 2 * 32 + 3 * 6, height: 3 * (24 + 20) + 4 * 6 });
    const { info, at } = await pixels(png);
    expect([info.width, info.height, info.channels]).toEqual([layout.width, layout.height, 3]);
    for (let r = 0; r < 3; r++) {
      for (let c = 0; c < 2; c++) {
        const { left, top } = tilePosition(layout, r, c);
        // every pixel of the tile is the image's colour
        for (const [dx, dy] of [[0, 0], [31, 0], [0, 23], [31, 23], [16, 12]]) expect(at(left + dx, top + dy)).toEqual(colour(r, c));
        // the margin around it is white
        expect(at(left - 1, top)).toEqual([255, 255, 255]);
      }
      // the label band holds dark text pixels
      const { top } = tilePosition(layout, r, 0);
      let dark = 0;
      for (let y = top + 24; y < top + 24 + 20; y++) for (let x = 0; x < layout.width; x++) if (at(x, y)[0] < 128) dark++;
      expect(dark).toBeGreaterThan(5);
    }
  });

  test('tiles are resized to tileWidth; short rows leave blanks; mismatched sizes are refused', async () => {
    const rows = [
      { label: 'a', images: [solid(16, 16, [255, 0, 0]), solid(16, 16, [0, 0, 255])] },
      { label: 'b <&> "quoted"', images: [solid(16, 16, [0, 255, 0])] },
    ];
    const { png, layout } = await contactSheet(rows, { tileWidth: 40 });
    expect(layout).toMatchObject({ cols: 2, rows: 2, tileWidth: 40, tileHeight: 40, width: 2 * 40 + 3 * 8, height: 2 * (40 + 28) + 3 * 8 });
    const { at } = await pixels(png);
    const p = tilePosition(layout, 1, 0);
    expect(at(p.left + 20, p.top + 20)).toEqual([0, 255, 0]);
    const blank = tilePosition(layout, 1, 1);
    expect(at(blank.left + 20, blank.top + 20)).toEqual([255, 255, 255]);
    await expect(contactSheet([{ label: 'x', images: [solid(16, 16, [0, 0, 0]), solid(8, 16, [0, 0, 0])] }])).rejects.toThrow(
      'Every image of a contact sheet must have one size: rows[0].images[1] is 8x16, the first is 16x16',
    );
    await expect(contactSheet([])).rejects.toThrow('Expected a non-empty array of { label, images } for rows but received array of length 0');
  });

  test('fitLabel shortens long prompts with an ellipsis', () => {
    expect(fitLabel('short', 10)).toBe('short');
    expect(fitLabel('a very long prompt indeed', 10)).toBe('a very lo…');
    expect(fitLabel('tab\there\nnewline', 40)).toBe('tab here newline');
  });
});
