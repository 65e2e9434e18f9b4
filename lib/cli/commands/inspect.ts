/**
 * `singleinsert-native inspect <path>`: what is inside a .safetensors file (name, dtype, shape,
 * totals) or a diffusers model folder (each component, its class and parameter count).
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import type { Argv } from 'yargs';
import { SingleInsertError } from '../../errors';
import { componentWeightFiles } from '../../model-files';
import { readSafetensorsHeader, SafetensorsHeaderEntry } from '../../safetensors';

export const command = 'inspect <path>';
export const desc = 'List the tensors of a .safetensors file or the components of a diffusers model folder';

export function builder(y: Argv) {
  return y
    .positional('path', { type: 'string', describe: '.safetensors file or diffusers model folder', demandOption: true })
    .option('json', { type: 'boolean', default: false, describe: 'print JSON' });
}

export interface FileReport {
  type: 'safetensors';
  path: string;
  metadata: Record<string, string>;
  tensors: Array<{ name: string; dtype: string; shape: number[]; parameters: number }>;
  totals: { tensors: number; parameters: number; bytes: number; byDtype: Record<string, number> };
}
export interface ComponentReport {
  name: string;
  library: string | null;
  class: string | null;
  weights: string[];
  tensors: number;
  parameters: number;
  dtypes: string[];
}
export interface FolderReport {
  type: 'diffusers-folder';
  path: string;
  pipeline: string;
  components: ComponentReport[];
  totals: { parameters: number };
}

const count = (shape: number[]) => shape.reduce((a, b) => a * b, 1);

async function inspectFile(file: string): Promise<FileReport> {
  const header = await readSafetensorsHeader(file);
  const tensors = Object.entries(header.tensors)
    .map(([name, t]: [string, SafetensorsHeaderEntry]) => ({ name, dtype: t.dtype, shape: t.shape, parameters: count(t.shape), bytes: t.byteLength }))
    .sort((a, b) => (a.name < b.name ? -1 : 1));
  const byDtype: Record<string, number> = {};
  for (const t of tensors) byDtype[t.dtype] = (byDtype[t.dtype] ?? 0) + t.parameters;
  return {
    type: 'safetensors',
    path: file,
    metadata: header.metadata,
    tensors: tensors.map(({ bytes: _b, ...t }) => t),
    totals: { tensors: tensors.length, parameters: tensors.reduce((a, t) => a + t.parameters, 0), bytes: tensors.reduce((a, t) => a + t.bytes, 0), byDtype },
  };
}

async function inspectFolder(dir: string): Promise<FolderReport> {
  const indexFile = path.join(dir, 'model_index.json');
  let index: Record<string, unknown>;
  try {
    index = JSON.parse(fs.readFileSync(indexFile, 'utf8'));
  } catch (e) {
    throw new SingleInsertError(`${indexFile}: ${(e as Error).message}`);
  }
  const components: ComponentReport[] = [];
  for (const [name, entry] of Object.entries(index)) {
    if (name.startsWith('_') || !Array.isArray(entry)) continue;
    const [library, cls] = entry as [string | null, string | null];
    const report: ComponentReport = { name, library, class: cls, weights: [], tensors: 0, parameters: 0, dtypes: [] };
    const compDir = path.join(dir, name);
    if (cls !== null && fs.existsSync(compDir) && ['unet', 'vae', 'text_encoder', 'image_encoder', 'safety_checker'].includes(name)) {
      const { files } = componentWeightFiles(compDir);
      const dtypes = new Set<string>();
      for (const f of files) {
        const header = await readSafetensorsHeader(f);
        for (const t of Object.values(header.tensors)) {
          report.tensors += 1;
          report.parameters += count(t.shape);
          dtypes.add(t.dtype);
        }
        report.weights.push(path.relative(dir, f));
      }
      report.dtypes = [...dtypes].sort();
    }
    components.push(report);
  }
  return {
    type: 'diffusers-folder',
    path: dir,
    pipeline: String(index._class_name ?? 'unknown'),
    components,
    totals: { parameters: components.reduce((a, c) => a + c.parameters, 0) },
  };
}

/** The command's work without printing (used by tests and the library). */
export async function runInspect(target: string): Promise<FileReport | FolderReport> {
  if (typeof target !== 'string' || !target) throw new SingleInsertError(`Expected a file or folder path for path but received ${JSON.stringify(target)}`);
  if (!fs.existsSync(target)) throw new SingleInsertError(`${target} does not exist`);
  const abs = path.resolve(target);
  if (fs.statSync(abs).isDirectory()) {
    if (!fs.existsSync(path.join(abs, 'model_index.json'))) {
      throw new SingleInsertError(`${abs} is a folder without model_index.json: expected a diffusers model folder or a .safetensors file`);
    }
    return inspectFolder(abs);
  }
  return inspectFile(abs);
}

const fmt = (n: number) => n.toLocaleString('en-US');

export function formatReport(r: FileReport | FolderReport): string {
  const lines: string[] = [];
  if (r.type === 'safetensors') {
    const w = Math.max(4, ...r.tensors.map((t) => t.name.length));
    lines.push(`${r.path}`);
    lines.push(`${'name'.padEnd(w)}  dtype  ${'shape'.padEnd(20)}  parameters`);
    for (const t of r.tensors) lines.push(`${t.name.padEnd(w)}  ${t.dtype.padEnd(5)}  ${('[' + t.shape.join(', ') + ']').padEnd(20)}  ${fmt(t.parameters).padStart(10)}`);
    const dt = Object.entries(r.totals.byDtype).map(([d, n]) => `${d} ${fmt(n)}`).join(', ');
    lines.push(`${fmt(r.totals.tensors)} tensors, ${fmt(r.totals.parameters)} parameters (${dt}), ${fmt(r.totals.bytes)} bytes of data`);
    if (Object.keys(r.metadata).length) lines.push(`metadata: ${JSON.stringify(r.metadata)}`);
  } else {
    lines.push(`${r.path}: ${r.pipeline}`);
    const w = Math.max(9, ...r.components.map((c) => c.name.length));
    lines.push(`${'component'.padEnd(w)}  ${'class'.padEnd(22)}  ${'parameters'.padStart(13)}  weights`);
    for (const c of r.components) {
      const cls = c.class ?? '(none)';
      const params = c.tensors ? fmt(c.parameters) : '-';
      const weights = `${c.weights.join(', ')}${c.dtypes.length ? ` (${c.dtypes.join(', ')})` : ''}`;
      lines.push(`${c.name.padEnd(w)}  ${cls.padEnd(22)}  ${params.padStart(13)}  ${weights}`.trimEnd());
    }
    lines.push(`total: ${fmt(r.totals.parameters)} parameters`);
  }
  return lines.join('\n') + '\n';
}

export async function handler(argv: { path: string; json?: boolean }): Promise<void> {
  const report = await runInspect(argv.path);
  process.stdout.write(argv.json ? JSON.stringify(report, null, 2) + '\n' : formatReport(report));
}
