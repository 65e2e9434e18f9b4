import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import yargs from 'yargs';
import { ClipTokenizer, bundledTokenizerDir, fill, TRAIN_TEMPLATE, CLASS_TEMPLATE } from '../lib/tokenizer';
import { SingleInsertError } from '../lib/errors';
import * as tokenizeCommand from '../lib/cli/commands/tokenize';
import { runTokenize, TokenizeOptions, TokenizeResult } from '../lib/cli/commands/tokenize';
import { fixture } from './helpers/fixtures';

interface GoldenCase {
  text: string;
  tokens: string[];
  ids: number[];
  truncated: boolean;
  input_ids_77: number[];
  attention_mask_77: number[];
}
interface Golden {
  bos_token_id: number;
  eos_token_id: number;
  pad_token_id: number;
  model_max_length: number;
  id_of_star_token: number;
  cases: GoldenCase[];
}

const golden = JSON.parse(fs.readFileSync(fixture('tokenizer', 'golden_tokenization.json'), 'utf8')) as Golden;
const tokDir = fixture('tiny-sd', 'tokenizer');
const tok = ClipTokenizer.fromDir(tokDir);

const BOS = 49406;
const EOS = 49407;
const STAR = 265;
const FACE = 1710;

/** Reads one I64 tensor from a safetensors file (8-byte LE header length, JSON header, raw data). */
function readI64Tensor(file: string, key: string): { shape: number[]; data: number[] } {
  const buf = fs.readFileSync(file);
  const headerLen = Number(buf.readBigUInt64LE(0));
  const header = JSON.parse(buf.subarray(8, 8 + headerLen).toString('utf8')) as Record<
    string,
    { dtype: string; shape: number[]; data_offsets: [number, number] }
  >;
  const entry = header[key];
  if (entry === undefined || entry.dtype !== 'I64') throw new Error(`no I64 tensor ${key} in ${file}`);
  const [begin, end] = entry.data_offsets;
  const data: number[] = [];
  for (let off = 8 + headerLen + begin; off < 8 + headerLen + end; off += 8) data.push(Number(buf.readBigInt64LE(off)));
  return { shape: entry.shape, data };
}

/** Captures process.stdout.write while fn runs. */
async function captureStdout(fn: () => Promise<unknown>): Promise<string> {
  const chunks: string[] = [];
  const spy = jest.spyOn(process.stdout, 'write').mockImplementation((chunk: string | Uint8Array) => {
    chunks.push(typeof chunk === 'string' ? chunk : Buffer.from(chunk).toString('utf8'));
    return true;
  });
  try {
    await fn();
  } finally {
    spy.mockRestore();
  }
  return chunks.join('');
}

describe('ClipTokenizer.fromDir', () => {
  it('reads ids and limits from the files', () => {
    expect(tok.bosTokenId).toBe(golden.bos_token_id);
    expect(tok.eosTokenId).toBe(golden.eos_token_id);
    expect(tok.padTokenId).toBe(golden.pad_token_id);
    expect(tok.modelMaxLength).toBe(golden.model_max_length);
    expect(tok.placeholderTokenId).toBe(golden.id_of_star_token);
    expect(tok.vocabSize).toBe(49408);
  });

  it('accepts the model folder that holds tokenizer/', () => {
    const t = ClipTokenizer.fromDir(fixture('tiny-sd'));
    expect(t.dir).toBe(path.resolve(tokDir));
    expect(t.encode('a face')).toEqual([BOS, 320, FACE, EOS]);
  });

  it('finds the bundled tokenizer, identical to the fixture one', () => {
    const dir = bundledTokenizerDir();
    expect(fs.existsSync(path.join(dir, 'vocab.json'))).toBe(true);
    for (const name of ['vocab.json', 'merges.txt', 'tokenizer_config.json', 'special_tokens_map.json']) {
      expect(fs.readFileSync(path.join(dir, name))).toEqual(fs.readFileSync(path.join(tokDir, name)));
    }
  });

  describe('errors name the file', () => {
    let tmp: string;
    beforeEach(() => {
      tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'si-tok-'));
      for (const name of fs.readdirSync(tokDir)) fs.copyFileSync(path.join(tokDir, name), path.join(tmp, name));
    });
    afterEach(() => fs.rmSync(tmp, { recursive: true, force: true }));

    it('missing merges.txt', () => {
      fs.rmSync(path.join(tmp, 'merges.txt'));
      expect(() => ClipTokenizer.fromDir(tmp)).toThrow(
        `Missing tokenizer file ${path.join(tmp, 'merges.txt')} (a tokenizer folder holds vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json)`,
      );
    });

    it('broken vocab.json', () => {
      fs.writeFileSync(path.join(tmp, 'vocab.json'), '{"a": 1,');
      expect(() => ClipTokenizer.fromDir(tmp)).toThrow(
        new RegExp(`^Broken tokenizer file ${path.join(tmp, 'vocab.json').replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}: not valid JSON`),
      );
    });

    it('special token missing from the vocab', () => {
      fs.writeFileSync(path.join(tmp, 'special_tokens_map.json'), JSON.stringify({ bos_token: '<|nope|>' }));
      expect(() => ClipTokenizer.fromDir(tmp)).toThrow(
        `Broken tokenizer in ${tmp}: the bos_token "<|nope|>" is not in vocab.json`,
      );
    });

    it('missing folder', () => {
      const missing = path.join(tmp, 'nope');
      expect(() => ClipTokenizer.fromDir(missing)).toThrow(`Tokenizer folder ${missing} does not exist or is not a folder`);
    });
  });
});

describe('golden tokenization (transformers 4.33 slow CLIPTokenizer, no ftfy)', () => {
  it('has 64 cases', () => {
    expect(golden.cases).toHaveLength(64);
  });

  it.each(golden.cases.map((c, i) => [i, JSON.stringify(c.text).slice(0, 60), c] as const))(
    'case %i %s',
    (_i, _label, c) => {
      expect(tok.tokenize(c.text)).toEqual(c.tokens);
      expect(tok.encode(c.text)).toEqual(c.ids);
      const r = tok.call(c.text, { maxLength: 77 });
      expect(r.inputIds).toEqual(c.input_ids_77);
      expect(r.attentionMask).toEqual(c.attention_mask_77);
      expect(r.truncated).toBe(c.truncated);
      // Placeholder-free encodePrompt is the same call.
      const e = tok.encodePrompt(c.text);
      expect(e.ids).toEqual(c.input_ids_77);
      expect(e.untruncatedIds).toEqual(c.ids);
    },
  );

  it('matches all 64 (summary)', () => {
    let same = 0;
    for (const c of golden.cases) {
      const r = tok.call(c.text);
      const ok =
        JSON.stringify(r.inputIds) === JSON.stringify(c.input_ids_77) &&
        JSON.stringify(r.attentionMask) === JSON.stringify(c.attention_mask_77) &&
        r.truncated === c.truncated &&
        JSON.stringify(tok.encode(c.text)) === JSON.stringify(c.ids);
      if (ok) same++;
    }
    console.log(`golden tokenization: ${same}/${golden.cases.length} identical`);
    expect(same).toBe(64);
  });

  it('reports the truncated text', () => {
    const long = golden.cases.filter((c) => c.truncated);
    expect(long.length).toBeGreaterThanOrEqual(2);
    const words = Array(77).fill('a').join(' ');
    const r = tok.call(words);
    expect(r.truncated).toBe(true);
    expect(r.truncatedText).toBe('a a');
    expect(r.inputIds[76]).toBe(EOS);
    const last = long[long.length - 1];
    const rl = tok.call(last.text);
    expect(rl.truncatedText).toBe(tok.decode(last.ids.slice(76, -1)));
    expect(rl.truncatedText).toBe(', the end');
    expect(tok.call('a cat').truncatedText).toBeUndefined();
  });

  it('uses maxLength', () => {
    const r = tok.call('a photo of a cat', { maxLength: 5 });
    expect(r.inputIds).toEqual([BOS, 320, 1125, 539, EOS]);
    expect(r.attentionMask).toEqual([1, 1, 1, 1, 1]);
    expect(r.truncated).toBe(true);
    expect(r.truncatedText).toBe('a cat');
    expect(() => tok.call('x', { maxLength: 1 })).toThrow('Expected integer >= 2 for maxLength but received 1');
  });
});

describe('decode', () => {
  it('round-trips ASCII prompts (transformers decode semantics)', () => {
    expect(tok.decode(tok.encode('a photo of * face'))).toBe('<|startoftext|>a photo of * face <|endoftext|>');
    expect(tok.decode(tok.encode('a photo of * face'), { skipSpecialTokens: true })).toBe('a photo of * face');
    expect(tok.decode(tok.encode('A cat , a dog .'), { skipSpecialTokens: true })).toBe('a cat, a dog.');
    expect(tok.decode(tok.encode('café naïve'), { skipSpecialTokens: true })).toBe('café naïve');
  });

  it('rejects ids outside the vocab', () => {
    expect(() => tok.decode([49408])).toThrow('Expected integer ids in the vocab (0..49407) for ids but received 49408');
  });
});

describe('encodePrompt with placeholders', () => {
  const pad = (ids: number[]): number[] => [...ids, ...Array(77 - ids.length).fill(EOS)];
  const mask = (n: number): number[] => [...Array(n).fill(1), ...Array(77 - n).fill(0)];

  it('"* face" equals the text_encoder_replace_star golden ids', () => {
    const r = tok.encodePrompt('* face', { placeholders: ['*'] });
    expect(r.ids).toEqual(pad([BOS, STAR, FACE, EOS]));
    expect(r.attentionMask).toEqual(mask(4));
    expect(r.placeholderPositions).toEqual({ '*': [1] });
    expect(r.truncated).toBe(false);

    const { shape, data } = readI64Tensor(fixture('cases', 'text_encoder_replace_star.safetensors'), 'input.input_ids');
    expect(shape).toEqual([3, 77]);
    const prompts = ['a photo of * face', 'a * face wearing sunglasses, oil painting', 'face'];
    prompts.forEach((p, b) => {
      const e = tok.encodePrompt(p, { placeholders: ['*'] });
      expect(e.ids).toEqual(data.slice(b * 77, (b + 1) * 77));
      // The replacement positions are exactly where the golden ids hold 265.
      const golden265 = data.slice(b * 77, (b + 1) * 77).flatMap((id, i) => (id === STAR ? [i] : []));
      expect(e.placeholderPositions['*']).toEqual(golden265);
    });
  });

  it('"a photo of *, oil painting" keeps * as its own position', () => {
    const r = tok.encodePrompt('a photo of *, oil painting', { placeholders: ['*'] });
    const comma = tok.tokenToId(',</w>');
    expect(comma).toBe(267);
    expect(r.ids).toEqual(pad([BOS, 320, 1125, 539, STAR, 267, 2870, 3086, EOS]));
    expect(r.placeholderPositions).toEqual({ '*': [4] });
    // Without the split, "*," is one pre-token of the CLIP regex: why placeholders are split first.
    expect(tok.tokenize('a photo of *, oil painting')).not.toContain('*</w>');
  });

  it('"*face" is the placeholder then face', () => {
    const r = tok.encodePrompt('*face', { placeholders: ['*'] });
    expect(r.ids).toEqual(pad([BOS, STAR, FACE, EOS]));
    expect(r.placeholderPositions).toEqual({ '*': [1] });
  });

  it('two concepts get their own positions', () => {
    const r = tok.encodePrompt('a * face with <hair1> hair', { placeholders: ['*', '<hair1>'] });
    const withId = tok.tokenToId('with</w>');
    const hair = tok.tokenToId('hair</w>');
    expect(r.ids).toEqual(pad([BOS, 320, STAR, FACE, withId as number, STAR, hair as number, EOS]));
    expect(r.placeholderPositions).toEqual({ '*': [2], '<hair1>': [5] });
    expect(r.tokens).toEqual(['a</w>', '*', 'face</w>', 'with</w>', '<hair1>', 'hair</w>']);
    // Repeated placeholders list every position; keys for absent ones are [].
    const r2 = tok.encodePrompt('* and * and <hair1>', { placeholders: ['*', '<hair1>', '<eyes>'] });
    expect(r2.placeholderPositions).toEqual({ '*': [1, 3], '<hair1>': [5], '<eyes>': [] });
  });

  it('longest placeholder wins', () => {
    const r = tok.encodePrompt('*12 face', { placeholders: ['*1', '*12'] });
    expect(r.placeholderPositions).toEqual({ '*1': [], '*12': [1] });
  });

  it('keeps a placeholder at index 76 (the 75th content token), rejects one past it', () => {
    const kept = tok.encodePrompt(`${Array(74).fill('a').join(' ')} *`, { placeholders: ['*'] });
    expect(kept.placeholderPositions['*']).toEqual([75]);
    expect(kept.ids[75]).toBe(STAR);
    expect(kept.ids[76]).toBe(EOS);
    expect(kept.truncated).toBe(false);

    const cut = tok.encodePrompt(`${Array(74).fill('a').join(' ')} * b`, { placeholders: ['*'] });
    expect(cut.placeholderPositions['*']).toEqual([75]);
    expect(cut.truncated).toBe(true);
    expect(cut.truncatedText).toBe('b');

    const tooLong = `${Array(75).fill('a').join(' ')} * face`;
    expect(() => tok.encodePrompt(tooLong, { placeholders: ['*'] })).toThrow(SingleInsertError);
    expect(() => tok.encodePrompt(tooLong, { placeholders: ['*'] })).toThrow(
      /^Placeholder "\*" is prompt token 76 but only 75 tokens fit in the 77-token window \(BOS \+ 75 \+ EOS\): the prompt is too long \(77 tokens\)\./,
    );
  });

  it('empty prompt and a prompt of only a placeholder', () => {
    const empty = tok.encodePrompt('', { placeholders: ['*'] });
    expect(empty.ids).toEqual([BOS, ...Array(76).fill(EOS)]);
    expect(empty.attentionMask).toEqual(mask(2));
    expect(empty.placeholderPositions).toEqual({ '*': [] });
    expect(tok.encodePrompt('').ids).toEqual([BOS, ...Array(76).fill(EOS)]);

    const only = tok.encodePrompt('<hair1>', { placeholders: ['<hair1>'] });
    expect(only.ids).toEqual(pad([BOS, STAR, EOS]));
    expect(only.placeholderPositions).toEqual({ '<hair1>': [1] });
  });

  it('without placeholders "*" is plain text (id 265 anyway)', () => {
    const r = tok.encodePrompt('* face');
    expect(r.ids).toEqual(pad([BOS, STAR, FACE, EOS]));
    expect(r.placeholderPositions).toEqual({});
    expect(tok.encodePrompt('a <new1> dog').ids.slice(0, 8)).toEqual([BOS, 320, 283, 686, 272, 285, 1929, EOS]);
  });

  it('rejects unknown placeholder-like tokens with the known list', () => {
    expect(() => tok.encodePrompt('a * face with <hair2> hair', { placeholders: ['*', '<hair1>'] })).toThrow(
      'Unknown placeholder "<hair2>" in prompt "a * face with <hair2> hair"; the known placeholders are "*", "<hair1>"',
    );
    expect(() => tok.encodePrompt('a *2 face', { placeholders: ['*1'] })).toThrow(
      'Unknown placeholder "*2" in prompt "a *2 face"; the known placeholders are "*1"',
    );
    expect(() => tok.encodePrompt('a * face', { placeholders: ['<hair1>'] })).toThrow(
      'Unknown placeholder "*" in prompt "a * face"; the known placeholders are "<hair1>"',
    );
    // Case matters, as for transformers' added tokens.
    expect(() => tok.encodePrompt('<Hair1>', { placeholders: ['<hair1>'] })).toThrow('Unknown placeholder "<Hair1>"');
    // Special tokens are not placeholder-like.
    expect(tok.encodePrompt('<|endoftext|> *', { placeholders: ['*'] }).ids.slice(0, 4)).toEqual([BOS, EOS, STAR, EOS]);
  });

  it('validates placeholders', () => {
    expect(() => tok.encodePrompt('x', { placeholders: [''] })).toThrow(
      'Expected non-empty strings without whitespace for placeholders but received ""',
    );
    expect(() => tok.encodePrompt('x', { placeholders: ['<|endoftext|>'] })).toThrow(
      'Expected strings other than the special tokens for placeholders but received "<|endoftext|>"',
    );
    expect(() => tok.encodePrompt('x', { placeholders: '*' as unknown as string[] })).toThrow(
      'Expected array of strings for placeholders but received "*"',
    );
  });
});

describe('prompt templates', () => {
  it('fills the SingleInsert templates', () => {
    expect(fill(TRAIN_TEMPLATE, { class: 'face' })).toBe('* face');
    expect(fill(TRAIN_TEMPLATE, { class: 'dog', placeholder: '<new1>' })).toBe('<new1> dog');
    expect(fill(CLASS_TEMPLATE, { class: 'face' })).toBe('face');
    expect(fill('a photo of {placeholder} {class}, {placeholder}', { class: 'cat' })).toBe('a photo of * cat, *');
    expect(fill('no keys', { class: 'cat' })).toBe('no keys');
  });

  it('rejects unknown keys and bad values', () => {
    expect(() => fill('{placeholder} {clas}', { class: 'face' })).toThrow(
      'Unknown key {clas} in prompt template "{placeholder} {clas}"; the known keys are {class}, {placeholder}',
    );
    expect(() => fill('{constructor}', { class: 'face' })).toThrow('Unknown key {constructor}');
    expect(() => fill(TRAIN_TEMPLATE, { class: 3 as unknown as string })).toThrow(
      'Expected non-empty string for class but received 3',
    );
    expect(() => fill(TRAIN_TEMPLATE, { class: '' })).toThrow('Expected non-empty string for class but received ""');
  });

  it('filled training prompt encodes with the placeholder at index 1', () => {
    const r = tok.encodePrompt(fill(TRAIN_TEMPLATE, { class: 'face' }), { placeholders: ['*'] });
    expect(r.ids.slice(0, 4)).toEqual([BOS, STAR, FACE, EOS]);
  });
});

describe('tokenize CLI command', () => {
  const parse = (args: string[]): Promise<unknown> =>
    yargs()
      .command(tokenizeCommand)
      .strict()
      .exitProcess(false)
      .fail((msg, err) => {
        throw err ?? new Error(msg);
      })
      .parseAsync(args);

  it('runTokenize returns the --json shape', async () => {
    const r: TokenizeResult = await runTokenize({ prompt: 'a * face', placeholder: ['*'], model: fixture('tiny-sd') });
    expect(Object.keys(r).sort()).toEqual(
      ['attention_mask_77', 'ids', 'input_ids_77', 'placeholderPositions', 'tokens', 'truncated'].sort(),
    );
    expect(r.tokens).toEqual(['a</w>', '*', 'face</w>']);
    expect(r.ids).toEqual([BOS, 320, STAR, FACE, EOS]);
    expect(r.input_ids_77).toHaveLength(77);
    expect(r.attention_mask_77.reduce((a, b) => a + b, 0)).toBe(5);
    expect(r.truncated).toBe(false);
    expect(r.placeholderPositions).toEqual({ '*': [2] });
  });

  it('uses the bundled tokenizer by default', async () => {
    const opts: TokenizeOptions = { prompt: 'a photo of an astronaut riding a horse on mars' };
    expect((await runTokenize(opts)).input_ids_77).toEqual(golden.cases[0].input_ids_77);
  });

  it('prints JSON through the yargs module', async () => {
    const out = await captureStdout(() => parse(['tokenize', '* face', '--placeholder', '*', '--json']));
    const parsed = JSON.parse(out) as TokenizeResult;
    expect(parsed.input_ids_77.slice(0, 4)).toEqual([BOS, STAR, FACE, EOS]);
    expect(parsed.placeholderPositions).toEqual({ '*': [1] });
  });

  it('prints a table with the 77 ids', async () => {
    const out = await captureStdout(() => parse(['tokenize', 'a face', '--model', tokDir]));
    const lines = out.trimEnd().split('\n');
    expect(lines[0]).toMatch(/^pos\s+token\s+id$/);
    expect(lines[2]).toMatch(/^\s*1\s+a<\/w>\s+320$/);
    expect(lines[lines.length - 1].split(' ').map(Number)).toEqual([BOS, 320, FACE, ...Array(74).fill(EOS)]);
  });

  it('accepts repeated --placeholder, a "-" prompt after --, and numeric text', async () => {
    const out = await captureStdout(() =>
      parse(['tokenize', '--placeholder', '*', '--placeholder', '<hair1>', '--json', '--', '-* with <hair1>']),
    );
    const parsed = JSON.parse(out) as TokenizeResult;
    expect(parsed.placeholderPositions).toEqual({ '*': [2], '<hair1>': [4] });
    expect(parsed.tokens[0]).toBe('-</w>');
    const num = JSON.parse(await captureStdout(() => parse(['tokenize', '007', '--json']))) as TokenizeResult;
    expect(num.tokens).toEqual(['0</w>', '0</w>', '7</w>']);
    // Unquoted words after -- are joined like a shell would.
    const words = JSON.parse(await captureStdout(() => parse(['tokenize', '--json', '--', '-a', 'cat']))) as TokenizeResult;
    expect(words.ids).toEqual(tok.encode('-a cat'));
  });

  it('requires a prompt', async () => {
    await expect(parse(['tokenize', '--json'])).rejects.toThrow(
      'Expected a prompt argument (after -- if it starts with "-") for prompt but received undefined',
    );
  });

  it('throws (does not exit) on errors', async () => {
    await expect(runTokenize({ prompt: 'a <x> face', placeholder: ['*'] })).rejects.toThrow(
      'Unknown placeholder "<x>" in prompt "a <x> face"; the known placeholders are "*"',
    );
  });
});

describe('benchmark (printed, not asserted)', () => {
  it('tokenises the 64 golden prompts 1,000 times', () => {
    const texts = golden.cases.map((c) => c.text);
    const t0 = performance.now();
    const fresh = ClipTokenizer.fromDir(tokDir);
    const tLoad = performance.now() - t0;

    const t1 = performance.now();
    for (const t of texts) fresh.call(t);
    const tCold = performance.now() - t1;

    const t2 = performance.now();
    for (let i = 0; i < 1000; i++) for (const t of texts) fresh.call(t);
    const tCached = performance.now() - t2;

    const t3 = performance.now();
    for (let i = 0; i < 1000; i++) {
      fresh.clearCache();
      for (const t of texts) fresh.call(t);
    }
    const tUncached = performance.now() - t3;

    console.log(
      `tokenizer benchmark: load ${tLoad.toFixed(1)} ms; first pass over 64 prompts (cold cache) ${tCold.toFixed(2)} ms; ` +
        `64 prompts x 1000 with the word cache ${tCached.toFixed(1)} ms (${((tCached / 64000) * 1000).toFixed(2)} us/prompt); ` +
        `64 prompts x 1000 with the cache cleared every pass ${tUncached.toFixed(1)} ms (${((tUncached / 64000) * 1000).toFixed(2)} us/prompt)`,
    );
    expect(fresh.call(texts[0]).inputIds).toEqual(golden.cases[0].input_ids_77);
  });
});
