#!/usr/bin/env node
// Regenerates the bundled example concept, assets/example/face.png (256x256 RGB, a stylised figure
// in front of a sky and a lawn) and assets/example/face_mask.png (8-bit gray, 255 = the figure,
// 0 = background). Both are drawn from one SVG description with sharp (librsvg), so they line up
// exactly; the mask is thresholded at 127 so it holds only 0 and 255 whatever the antialiasing.
// The output is deterministic for a given sharp/libvips build (no timestamps or metadata are
// written).
//
//   node scripts/make-example.mjs           write the two files
//   node scripts/make-example.mjs --check   exit 1 when the files on disk differ from a fresh render
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import sharp from 'sharp';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const outDir = path.join(root, 'assets', 'example');
const SIZE = 256;

const SKIN = '#f2c9a0';
const SKIN_SHADE = '#e3b088';
const HAIR = '#5b3a29';
const SHIRT = '#d1495b';

// The figure's silhouette: every shape that belongs to the concept. Drawn in colour for the image
// and in white for the mask.
function silhouette(fill) {
  const f = (colour) => fill ?? colour;
  return `
    <path d="M 60 256 C 60 206, 92 186, 128 186 C 164 186, 196 206, 196 256 Z" fill="${f(SHIRT)}"/>
    <rect x="114" y="150" width="28" height="44" rx="6" fill="${f(SKIN_SHADE)}"/>
    <ellipse cx="80" cy="114" rx="11" ry="15" fill="${f(SKIN_SHADE)}"/>
    <ellipse cx="176" cy="114" rx="11" ry="15" fill="${f(SKIN_SHADE)}"/>
    <ellipse cx="128" cy="110" rx="48" ry="56" fill="${f(SKIN)}"/>
    <path d="M 76 110 C 66 26, 190 26, 180 110 C 170 80, 150 70, 128 72 C 106 70, 86 80, 78 108 Z" fill="${f(HAIR)}"/>`;
}

// Details inside the silhouette (not in the mask on their own, they lie within it).
const details = `
    <path d="M 108 198 L 128 222 L 148 198" fill="none" stroke="#f4f1de" stroke-width="5" stroke-linejoin="round"/>
    <path d="M 96 94 Q 106 88 116 94" fill="none" stroke="${HAIR}" stroke-width="4" stroke-linecap="round"/>
    <path d="M 140 94 Q 150 88 160 94" fill="none" stroke="${HAIR}" stroke-width="4" stroke-linecap="round"/>
    <ellipse cx="106" cy="108" rx="10" ry="7" fill="#ffffff"/>
    <ellipse cx="150" cy="108" rx="10" ry="7" fill="#ffffff"/>
    <circle cx="107" cy="108" r="4.5" fill="#2b2d42"/>
    <circle cx="151" cy="108" r="4.5" fill="#2b2d42"/>
    <path d="M 128 112 L 122 132 L 132 132" fill="none" stroke="${SKIN_SHADE}" stroke-width="3" stroke-linejoin="round"/>
    <circle cx="98" cy="130" r="8" fill="#f28482" opacity="0.45"/>
    <circle cx="158" cy="130" r="8" fill="#f28482" opacity="0.45"/>
    <path d="M 110 142 Q 128 158 146 142" fill="none" stroke="#8c2f39" stroke-width="4" stroke-linecap="round"/>`;

const svg = (body) => `<svg xmlns="http://www.w3.org/2000/svg" width="${SIZE}" height="${SIZE}" viewBox="0 0 ${SIZE} ${SIZE}">${body}</svg>`;

const imageSvg = svg(`
  <defs>
    <linearGradient id="sky" x1="0" y1="0" x2="0" y2="1">
      <stop offset="0" stop-color="#7fb8e0"/><stop offset="1" stop-color="#e4f1f7"/>
    </linearGradient>
  </defs>
  <rect width="${SIZE}" height="${SIZE}" fill="url(#sky)"/>
  <circle cx="214" cy="42" r="20" fill="#ffd166"/>
  <ellipse cx="52" cy="52" rx="30" ry="11" fill="#ffffff" opacity="0.8"/>
  <path d="M 0 200 Q 128 180 256 204 L 256 256 L 0 256 Z" fill="#84a98c"/>
  <circle cx="24" cy="230" r="5" fill="#f6bd60"/><circle cx="232" cy="236" r="5" fill="#f28482"/>
  ${silhouette(null)}
  ${details}`);

const maskSvg = svg(`<rect width="${SIZE}" height="${SIZE}" fill="#000000"/>${silhouette('#ffffff')}`);

async function render() {
  const image = await sharp(Buffer.from(imageSvg))
    .flatten({ background: '#ffffff' })
    .removeAlpha()
    .png({ compressionLevel: 9, adaptiveFiltering: true })
    .toBuffer();
  const { data, info } = await sharp(Buffer.from(maskSvg)).removeAlpha().raw().toBuffer({ resolveWithObject: true });
  const gray = Buffer.alloc(info.width * info.height);
  for (let i = 0; i < gray.length; i++) gray[i] = data[i * info.channels] > 127 ? 255 : 0;
  const mask = await sharp(gray, { raw: { width: info.width, height: info.height, channels: 1 } })
    .toColourspace('b-w')
    .png({ compressionLevel: 9 })
    .toBuffer();
  return { 'face.png': image, 'face_mask.png': mask };
}

const files = await render();
if (process.argv.includes('--check')) {
  let same = true;
  for (const [name, buf] of Object.entries(files)) {
    const p = path.join(outDir, name);
    if (!fs.existsSync(p) || !fs.readFileSync(p).equals(buf)) {
      console.error(`${path.relative(root, p)} differs from a fresh render`);
      same = false;
    }
  }
  process.exit(same ? 0 : 1);
}
fs.mkdirSync(outDir, { recursive: true });
for (const [name, buf] of Object.entries(files)) {
  fs.writeFileSync(path.join(outDir, name), buf);
  console.log(`wrote ${path.relative(root, path.join(outDir, name))} (${buf.length} bytes)`);
}
