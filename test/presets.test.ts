// Prompt presets (assets/presets.json): the ten edits with their ESR targets and the eight views.
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { expandPreset, PRESETS_FILE, readPresets, slug } from '../lib/presets';

let tmp: string;
beforeAll(() => {
  tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'si-presets-'));
});
afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }));

describe('assets/presets.json', () => {
  test('ten edits with one or two targets, eight named views, every template holding "{placeholder} {class}"', () => {
    const raw = JSON.parse(fs.readFileSync(PRESETS_FILE, 'utf8'));
    const p = readPresets();
    expect(p.edits).toHaveLength(10);
    expect(p.views).toHaveLength(8);
    expect(p.edits).toEqual(raw.edits);
    expect(p.views).toEqual(raw.views);
    for (const e of p.edits) {
      expect(e.targets.length).toBeGreaterThanOrEqual(1);
      expect(e.targets.length).toBeLessThanOrEqual(2);
      expect(e.template).toContain('{placeholder} {class}');
    }
    expect(p.edits[0]).toEqual({ template: 'a {placeholder} {class} wearing sunglasses', targets: ['sunglasses'], without: ['a {placeholder} {class}'] });
    expect(p.views[0]).toEqual({ name: 'front', template: 'a front view of a {placeholder} {class}' });
    expect(new Set(p.views.map((v) => v.name)).size).toBe(8);
  });
});

describe('expandPreset', () => {
  test('edits for a concept', () => {
    const prompts = expandPreset('edits', { placeholder: '*', class: 'face' });
    expect(prompts).toHaveLength(10);
    expect(prompts[0]).toEqual({ preset: 'edits', index: 0, name: 'sunglasses', template: 'a {placeholder} {class} wearing sunglasses', prompt: 'a * face wearing sunglasses', targets: ['sunglasses'] });
    expect(prompts[1]).toMatchObject({ name: 'santa-hat', prompt: 'a * face wearing a santa hat', targets: ['santa hat'] });
    expect(prompts[5].prompt).toBe('an oil painting of a * face');
    expect(new Set(prompts.map((p) => p.name)).size).toBe(10);
    for (const p of prompts) expect(p.prompt).not.toMatch(/[{}]/);
  });

  test('views, with another placeholder and class', () => {
    const prompts = expandPreset('views', { placeholder: '<me>', class: 'dog' });
    expect(prompts.map((p) => p.name)).toEqual(['front', 'three-quarter', 'side', 'back', 'from-above', 'from-below', 'close-up', 'full-body']);
    expect(prompts[0]).toEqual({ preset: 'views', index: 0, name: 'front', template: 'a front view of a {placeholder} {class}', prompt: 'a front view of a <me> dog' });
    expect(prompts.every((p) => p.prompt.includes('<me> dog') && p.targets === undefined)).toBe(true);
  });

  test('a subject in place of "{placeholder} {class}" (several concepts in every prompt)', () => {
    const prompts = expandPreset('edits', { subject: ' * face and <b> dog ' });
    expect(prompts[0].prompt).toBe('a * face and <b> dog wearing sunglasses');
    expect(prompts[5].prompt).toBe('an oil painting of a * face and <b> dog');
  });

  test('errors', () => {
    expect(() => expandPreset('poses' as 'edits', { placeholder: '*', class: 'face' })).toThrow('Expected one of edits, views for preset but received "poses"');
    expect(() => expandPreset('views', { placeholder: '*', class: '' })).toThrow('Expected non-empty string for class but received ""');
    expect(() => expandPreset('views', { subject: ' ' })).toThrow('Expected a non-empty string for subject but received " "');
  });

  test('readPresets checks a presets file', () => {
    const write = (name: string, json: unknown) => {
      const f = path.join(tmp, name);
      fs.writeFileSync(f, typeof json === 'string' ? json : JSON.stringify(json));
      return f;
    };
    const view = { name: 'front', template: 'a front view of a {placeholder} {class}' };
    const edit = { template: 'a {placeholder} {class} wearing sunglasses', targets: ['sunglasses'], without: ['a {placeholder} {class}'] };
    expect(readPresets(write('ok.json', { edits: [edit], views: [view] }))).toEqual({ edits: [edit], views: [view] });
    expect(() => readPresets(path.join(tmp, 'none.json'))).toThrow(`Cannot read the presets ${path.join(tmp, 'none.json')}: file not found`);
    expect(() => readPresets(write('bad.json', '{'))).toThrow(/^Cannot read the presets .*bad.json: /);
    let f = write('nosubject.json', { edits: [{ template: 'a {class} wearing sunglasses', targets: ['sunglasses'] }], views: [] });
    expect(() => readPresets(f)).toThrow(`${f}: expected edits[0].template to be a string holding "{placeholder} {class}" once but found "a {class} wearing sunglasses"`);
    f = write('targets.json', { edits: [{ ...edit, targets: ['a', 'b', 'c'] }], views: [] });
    expect(() => readPresets(f)).toThrow(`${f}: expected edits[0].targets to be one or two non-empty strings but found array of length 3`);
    f = write('without.json', { edits: [{ ...edit, without: [] }], views: [] });
    expect(() => readPresets(f)).toThrow(`${f}: expected edits[0].without to hold one template per target (1) but found array of length 0`);
    f = write('key.json', { edits: [], views: [{ name: 'x', template: 'a {placeholder} {class} at {time}' }] });
    expect(() => readPresets(f)).toThrow(`${f}: views[0].template: Unknown key {time} in prompt template`);
    f = write('dup.json', { edits: [], views: [view, view] });
    expect(() => readPresets(f)).toThrow(`${f}: view name "front" appears twice`);
  });

  test('slug', () => {
    expect(slug('Eiffel Tower')).toBe('eiffel-tower');
    expect(slug('  !!  ')).toBe('prompt');
  });
});
