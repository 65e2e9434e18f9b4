/**
 * The evaluation's outputs besides metrics.json: `metrics.csv` (one row per summary / prompt / image)
 * and `report.html`, a single self-contained page (inline CSS, no scripts, no external resources;
 * images linked relatively from the report folder, so the folder can be zipped and opened anywhere).
 */
import { HIGHER_IS_BETTER, MetricName, METRICS } from './metrics';
import type { EvalResult, ImageResult } from './eval';

const esc = (s: unknown): string =>
  String(s).replace(/[&<>"']/g, (c) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' })[c]!);

/** A score with 4 decimals ("—" when not computed). */
export function formatScore(v: number | null | undefined): string {
  return typeof v === 'number' && Number.isFinite(v) ? v.toFixed(4) : '—';
}

const arrow = (m: MetricName) => (HIGHER_IS_BETTER[m] ? '↑' : '↓');
const IMAGE_METRICS = ['CLIP-I-f', 'CLIP-I-b', 'DINO-f', 'DINO-b', 'CLIP-T'] as const;

// ---------------------------------------------------------------- CSV

function csvField(v: unknown): string {
  const s = v === null || v === undefined ? '' : typeof v === 'number' ? (Number.isFinite(v) ? String(v) : '') : String(v);
  return /[",\n\r]/.test(s) ? `"${s.replace(/"/g, '""')}"` : s;
}

/** level,prompt,file,seed,<metrics in the paper's order>: a summary row, then prompts, then images. */
export function renderCsv(r: EvalResult): string {
  const rows: unknown[][] = [['level', 'prompt', 'file', 'seed', ...METRICS]];
  rows.push(['summary', '', '', '', ...METRICS.map((m) => r.summary[m])]);
  for (const p of r.prompts) rows.push(['prompt', p.prompt, '', '', ...METRICS.map((m) => p.metrics[m])]);
  for (const im of r.images) {
    rows.push(['image', im.prompt, im.reportImage, im.seed, ...IMAGE_METRICS.map((m) => im.scores[m]), '', im.esr ? (im.esr.success ? 1 : 0) : '']);
  }
  return rows.map((row) => row.map(csvField).join(',')).join('\r\n') + '\r\n';
}

// ---------------------------------------------------------------- HTML

const CSS = `
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px; color: #1d1d1f; background: #fafafa; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 17px; margin: 28px 0 8px; }
.meta { color: #555; margin: 0 0 16px; }
table { border-collapse: collapse; background: #fff; }
th, td { border: 1px solid #ddd; padding: 4px 10px; text-align: right; white-space: nowrap; }
th { background: #f0f0f0; } td.text, th.text { text-align: left; white-space: normal; max-width: 420px; }
td.skipped { color: #999; }
.notes li { color: #8a4b00; }
.source { display: flex; gap: 12px; align-items: flex-start; }
.source figure, .card figure { margin: 0; }
.source img { max-width: 256px; max-height: 256px; border: 1px solid #ccc; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(260px, 1fr)); gap: 14px; }
.card { background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: 10px; }
.card .pics { display: flex; gap: 6px; align-items: flex-start; } .card img.main { width: 192px; height: auto; border: 1px solid #ccc; }
.card img.mask { width: 48px; height: auto; border: 1px solid #ccc; image-rendering: pixelated; }
.card .prompt { font-size: 13px; margin: 6px 0; } .card dl { display: grid; grid-template-columns: auto auto; gap: 0 10px; margin: 4px 0; font-size: 12px; }
.card dt { color: #555; } .card dd { margin: 0; text-align: right; font-variant-numeric: tabular-nums; }
.verdict { display: inline-block; padding: 1px 8px; border-radius: 10px; font-size: 12px; }
.verdict.ok { background: #dff5e1; color: #11642a; } .verdict.fail { background: #fde2e1; color: #8c1d18; } .verdict.none { background: #eee; color: #666; }
.targets { font-size: 11px; color: #555; margin: 2px 0 0; padding-left: 16px; }
dl.defs dt { font-weight: 600; margin-top: 6px; } dl.defs dd { margin-left: 16px; }
`;

function summaryTable(r: EvalResult): string {
  const skippedReason = (m: MetricName) => r.skipped.find((s) => s.metrics.includes(m))?.reason;
  const head = METRICS.map((m) => `<th title="${HIGHER_IS_BETTER[m] ? 'higher' : 'lower'} is better">${esc(m)} ${arrow(m)}</th>`).join('');
  const cells = METRICS.map((m) => {
    const reason = skippedReason(m);
    return r.summary[m] === null ? `<td class="skipped" title="${esc(reason ?? 'not computed')}">—</td>` : `<td>${formatScore(r.summary[m])}</td>`;
  }).join('');
  return `<table id="summary"><thead><tr>${head}</tr></thead><tbody><tr>${cells}</tr></tbody></table>`;
}

function promptTable(r: EvalResult): string {
  const head = `<th class="text">prompt</th><th>images</th>${METRICS.map((m) => `<th>${esc(m)} ${arrow(m)}</th>`).join('')}`;
  const body = r.prompts
    .map((p) => `<tr><td class="text">${esc(p.prompt)}</td><td>${p.images}</td>${METRICS.map((m) => `<td${p.metrics[m] === null ? ' class="skipped"' : ''}>${formatScore(p.metrics[m])}</td>`).join('')}</tr>`)
    .join('\n');
  return `<table id="prompts"><thead><tr>${head}</tr></thead><tbody>\n${body}\n</tbody></table>`;
}

function card(im: ImageResult): string {
  const scores = IMAGE_METRICS.map((m) => `<dt>${esc(m)} ${arrow(m)}</dt><dd>${formatScore(im.scores[m])}</dd>`).join('');
  let verdict: string;
  if (!im.esr) verdict = '<span class="verdict none">no edit targets</span>';
  else {
    const rows = im.esr.targets.map((t) => `<li>${esc(t.target)}: ${formatScore(t.with)} with vs ${formatScore(t.without)} without</li>`).join('');
    verdict = `<span class="verdict ${im.esr.success ? 'ok' : 'fail'}">${im.esr.success ? '✓ edit succeeded' : '✗ edit failed'}</span><ul class="targets">${rows}</ul>`;
  }
  const maskLabel = im.mask === 'attention' ? 'mask from cross-attention' : im.mask === 'file' ? 'mask from file' : 'no mask';
  const mask = im.reportMask ? `<img class="mask" src="${esc(im.reportMask)}" alt="${esc(maskLabel)}" title="${esc(maskLabel)}">` : '';
  return `<div class="card" data-file="${esc(im.reportImage)}">
<div class="pics"><img class="main" src="${esc(im.reportImage)}" alt="${esc(im.prompt)}">${mask}</div>
<div class="prompt">${esc(im.prompt)}${im.seed !== null ? ` <small>(seed ${im.seed})</small>` : ''}</div>
<dl>${scores}</dl>
${verdict}
</div>`;
}

/** The report page. */
export function renderHtml(r: EvalResult): string {
  const notes = [...r.skipped.map((s) => `${s.metrics.join(', ')} skipped: ${s.reason}`), ...r.notes];
  const models = (['clip', 'dino', 'lpips'] as const).map((k) => `${k.toUpperCase()}: ${esc(r.models[k] ?? 'not given')}`).join(' · ');
  const sourceFigures = [
    `<figure><img src="${esc(r.source.reportImage)}" alt="source image"><figcaption>source</figcaption></figure>`,
    r.source.reportMask ? `<figure><img src="${esc(r.source.reportMask)}" alt="source mask"><figcaption>source mask</figcaption></figure>` : '',
  ].join('');
  const defs = METRICS.map((m) => `<dt>${esc(m)} ${arrow(m)}</dt><dd>${esc(r.definitions[m])}</dd>`).join('\n');
  return `<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>SingleInsert evaluation${r.classWord ? ` — ${esc(r.classWord)}` : ''}</title>
<style>${CSS}</style>
</head>
<body>
<h1>SingleInsert evaluation${r.classWord ? ` — ${esc(r.classWord)}` : ''}</h1>
<p class="meta">${r.counts.images} images, ${r.counts.prompts} prompts, ${r.counts.editedImages} with edit targets · ${models} · ${esc(r.createdAt)}</p>
<h2>Summary</h2>
${summaryTable(r)}
${notes.length ? `<ul class="notes" id="notes">${notes.map((n) => `<li>${esc(n)}</li>`).join('')}</ul>` : ''}
<h2>Source</h2>
<div class="source">${sourceFigures}</div>
<h2>Per prompt</h2>
${promptTable(r)}
<h2>Images</h2>
<div class="grid" id="images">
${r.images.map(card).join('\n')}
</div>
<h2>Definitions</h2>
<dl class="defs">
${defs}
</dl>
</body>
</html>
`;
}
