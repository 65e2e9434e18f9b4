/**
 * CLIP BPE tokenizer, a port of transformers 4.33's slow `CLIPTokenizer`
 * (src/transformers/models/clip/tokenization_clip.py) on the path it takes WITHOUT ftfy:
 * `BasicTokenizer(strip_accents=False, do_split_on_punc=False)` cleans the text, then the CLIP
 * pre-tokenisation regex, then byte-level BPE. The golden ids in fixtures/tokenizer/ come from that path.
 *
 * Placeholders (`*`, `<hair1>`, ...) are split out of the raw text before BPE, the way
 * `PreTrainedTokenizer.tokenize` splits added tokens with its trie, and each occurrence is ONE position
 * holding the id of `*</w>` (265): the text encoder then swaps in the learned embedding at those positions.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { SingleInsertError, describeValue, invalidParameterError } from './errors';

export { CLASS_TEMPLATE, TRAIN_TEMPLATE, fill } from './prompts';

/** SD v1.5's `model_max_length`; used when tokenizer_config.json has none (transformers' CLIP default, 77). */
export const CLIP_MAX_LENGTH = 77;
/** CLIPTokenizer.__init__ keeps `merges.txt` lines [1 : 49152 - 256 - 2 + 1]: the 48894 merges CLIP trained. */
const CLIP_NUM_MERGES = 49152 - 256 - 2;
/** Every placeholder occurrence is encoded as this vocab entry (id 265 in CLIP's vocab). */
export const PLACEHOLDER_TOKEN = '*</w>';
/** Upper bound on the per-word BPE cache so a long-running process cannot grow it without limit. */
const BPE_CACHE_LIMIT = 100_000;

const DEFAULT_BOS = '<|startoftext|>';
const DEFAULT_EOS = '<|endoftext|>';

const TOKENIZER_FILES = ['vocab.json', 'merges.txt', 'tokenizer_config.json', 'special_tokens_map.json'] as const;

/** The pattern of CLIPTokenizer.__init__ (`self.pat`, compiled with re.IGNORECASE); `u` for \p{..}. */
const CLIP_PRETOKENIZE =
  /<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+/giu;

// BasicTokenizer._clean_text: drop NUL, U+FFFD and control chars (category C*, but \t \n \r are whitespace),
// map whitespace (\t \n \r and category Zs) to a space. (transformers/tokenization_utils.py _is_control/_is_whitespace)
const DROP_CHARS = /[\0\uFFFD]|(?![\t\n\r])\p{C}/gu;
const WHITESPACE_CHARS = /[\t\n\r\p{Zs}]/gu;
// BasicTokenizer._is_chinese_char: the CJK ideograph blocks only (not kana or hangul).
const CJK_CHARS =
  /([\u4E00-\u9FFF\u3400-\u4DBF\u{20000}-\u{2A6DF}\u{2A700}-\u{2B73F}\u{2B740}-\u{2B81F}\u{2B820}-\u{2CEAF}\uF900-\uFAFF\u{2F800}-\u{2FA1F}])/gu;
/** Printable ASCII needs none of the unicode steps above (no controls, CJK or NFC changes). */
const PRINTABLE_ASCII = /^[\x20-\x7e]*$/;
/** After cleaning, Python's str.split() splits on what JS calls \s (only ' ', U+2028, U+2029 are left). */
const SPLIT_WHITESPACE = /\s+/u;

// Placeholder-like text left over after the known placeholders were split out (see checkUnknownPlaceholders).
const ANGLE_PLACEHOLDER_LIKE = /<[^<>\s]+>/gu;
const STAR_PLACEHOLDER_LIKE = /\*+[\p{L}\p{N}_]*/gu;

/** `bytes_to_unicode()` of tokenization_clip.py: byte -> printable character, avoiding whitespace/controls. */
function bytesToUnicode(): string[] {
  const bs: number[] = [];
  for (let b = 0x21; b <= 0x7e; b++) bs.push(b); // '!'..'~'
  for (let b = 0xa1; b <= 0xac; b++) bs.push(b); // '¡'..'¬'
  for (let b = 0xae; b <= 0xff; b++) bs.push(b); // '®'..'ÿ'
  const table = new Array<string>(256);
  for (const b of bs) table[b] = String.fromCharCode(b);
  let n = 0;
  for (let b = 0; b < 256; b++) {
    if (table[b] === undefined) table[b] = String.fromCharCode(256 + n++);
  }
  return table;
}

const BYTE_ENCODER = bytesToUnicode();
const BYTE_DECODER = new Map<string, number>(BYTE_ENCODER.map((c, b) => [c, b]));
const UTF8_ENCODER = new TextEncoder();
// errors="replace" as in CLIPTokenizer: invalid UTF-8 becomes U+FFFD instead of throwing.
const UTF8_DECODER = new TextDecoder('utf-8', { fatal: false });

/** One content token (between BOS and EOS). `placeholder` is set when it stands for a placeholder occurrence. */
interface ContentToken {
  token: string;
  id: number;
  placeholder?: string;
}

/** A piece of raw text: either free text for BPE or one split-out added token (special token or placeholder). */
interface Segment {
  text: string;
  added?: 'special' | 'placeholder';
}

export interface CallOptions {
  /** Window length including BOS and EOS; defaults to the tokenizer's `model_max_length` (77). */
  maxLength?: number;
}

export interface CallResult {
  /** `[BOS] + ids[:maxLength-2] + [EOS]`, padded with the pad id (49407) to `maxLength`. */
  inputIds: number[];
  /** 1 for BOS, content and EOS; 0 for padding. */
  attentionMask: number[];
  truncated: boolean;
  /** The text that did not fit (decoded from the removed tokens), so a caller can warn. */
  truncatedText?: string;
}

export interface EncodePromptOptions {
  /** Placeholder strings to split out before BPE; each occurrence becomes one position with id 265. */
  placeholders?: string[];
  /**
   * Positions per occurrence for multi-vector placeholders (an N-vector textual-inversion embedding
   * takes N consecutive positions, all with id 265); default 1. Keys must be active placeholders.
   */
  placeholderLengths?: Record<string, number>;
  maxLength?: number;
}

export interface EncodedPrompt {
  /** `maxLength` ids: BOS, content, EOS, padding. */
  ids: number[];
  attentionMask: number[];
  /**
   * Placeholder -> indices into `ids` (BOS is index 0), in prompt order. Every active placeholder has a key,
   * possibly []. A placeholder of length N lists N consecutive indices per occurrence, so vector
   * `i % N` of its embedding goes to the i-th listed position.
   */
  placeholderPositions: Record<string, number[]>;
  truncated: boolean;
  truncatedText?: string;
  /**
   * All content tokens, untruncated: BPE strings, and the placeholder string itself at placeholder positions
   * (repeated N times for a placeholder of length N).
   */
  tokens: string[];
  /** All ids with BOS/EOS, untruncated (what `encode` returns for placeholder-free text). */
  untruncatedIds: number[];
}

export interface DecodeOptions {
  /** Drop BOS/EOS/pad ids (transformers' `skip_special_tokens`). Default false. */
  skipSpecialTokens?: boolean;
  /** transformers' `clean_up_tokenization_spaces` (True by default in 4.33): " ," -> "," etc. */
  cleanUpTokenizationSpaces?: boolean;
}

interface SpecialTokens {
  bos: string;
  eos: string;
  pad: string;
  unk: string;
}

function readTextFile(dir: string, name: string): string {
  const file = path.join(dir, name);
  try {
    return fs.readFileSync(file, 'utf8');
  } catch (err) {
    throw new SingleInsertError(`Cannot read tokenizer file ${file}: ${(err as Error).message}`, { cause: err });
  }
}

function readJsonFile(dir: string, name: string, optional: boolean): unknown {
  const file = path.join(dir, name);
  if (optional && !fs.existsSync(file)) return undefined;
  const text = readTextFile(dir, name);
  try {
    return JSON.parse(text) as unknown;
  } catch (err) {
    throw new SingleInsertError(`Broken tokenizer file ${file}: not valid JSON (${(err as Error).message})`, {
      cause: err,
    });
  }
}

function isRecord(value: unknown): value is Record<string, unknown> {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

/** A special token entry is a string or an AddedToken dict `{ content, ... }` (both file formats occur). */
function specialTokenContent(value: unknown, file: string, key: string): string | undefined {
  if (value === undefined || value === null) return undefined;
  if (typeof value === 'string') return value;
  if (isRecord(value) && typeof value.content === 'string') return value.content;
  throw new SingleInsertError(
    `Broken tokenizer file ${file}: expected a string or {"content": string} for ${key} but received ${describeValue(value)}`,
  );
}

/**
 * Resolve the special tokens as `from_pretrained` does: CLIPTokenizer.__init__ defaults, overridden by
 * tokenizer_config.json, overridden by special_tokens_map.json.
 */
function resolveSpecialTokens(dir: string, config: Record<string, unknown> | undefined, map: unknown): SpecialTokens {
  const tokens: SpecialTokens = { bos: DEFAULT_BOS, eos: DEFAULT_EOS, pad: DEFAULT_EOS, unk: DEFAULT_EOS };
  const sources: Array<[string, unknown]> = [
    [path.join(dir, 'tokenizer_config.json'), config],
    [path.join(dir, 'special_tokens_map.json'), map],
  ];
  for (const [file, source] of sources) {
    if (source === undefined) continue;
    if (!isRecord(source)) {
      throw new SingleInsertError(`Broken tokenizer file ${file}: expected a JSON object but received ${describeValue(source)}`);
    }
    for (const key of ['bos', 'eos', 'pad', 'unk'] as const) {
      const content = specialTokenContent(source[`${key}_token`], file, `${key}_token`);
      if (content !== undefined) tokens[key] = content;
    }
  }
  return tokens;
}

function resolveMaxLength(dir: string, config: Record<string, unknown> | undefined): number {
  const value = config?.model_max_length;
  if (value === undefined || value === null) return CLIP_MAX_LENGTH;
  if (typeof value !== 'number' || !Number.isInteger(value) || value < 2) {
    throw new SingleInsertError(
      `Broken tokenizer file ${path.join(dir, 'tokenizer_config.json')}: expected an integer >= 2 for model_max_length but received ${describeValue(value)}`,
    );
  }
  // transformers writes VERY_LARGE_INTEGER (int(1e30)) when a model has no limit; CLIP's own limit is 77.
  return value > 1e6 ? CLIP_MAX_LENGTH : value;
}

function validatePlaceholderLengths(value: unknown, placeholders: string[]): Map<string, number> {
  const out = new Map<string, number>();
  if (value === undefined) return out;
  if (!isRecord(value)) throw invalidParameterError('placeholderLengths', 'an object of placeholder -> positive integer', value);
  for (const [p, n] of Object.entries(value)) {
    if (!placeholders.includes(p)) {
      throw invalidParameterError(`placeholderLengths[${JSON.stringify(p)}]`, `a key among the placeholders (${placeholders.map((x) => JSON.stringify(x)).join(', ') || 'none'})`, p);
    }
    if (typeof n !== 'number' || !Number.isInteger(n) || n < 1) throw invalidParameterError(`placeholderLengths[${JSON.stringify(p)}]`, 'a positive integer', n);
    out.set(p, n);
  }
  return out;
}

function validateMaxLength(value: unknown): number {
  if (typeof value !== 'number' || !Number.isInteger(value) || value < 2) {
    throw invalidParameterError('maxLength', 'integer >= 2', value);
  }
  return value;
}

/**
 * `BasicTokenizer.tokenize` with do_lower_case=True, strip_accents=False, do_split_on_punc=False,
 * joined with spaces as `CLIPTokenizer._tokenize` does: clean, space out CJK, NFC, split on whitespace, lower-case.
 */
export function basicClean(text: string): string {
  let t = text;
  if (!PRINTABLE_ASCII.test(t)) {
    t = t.replace(DROP_CHARS, '').replace(WHITESPACE_CHARS, ' ').replace(CJK_CHARS, ' $1 ').normalize('NFC');
  }
  const words = t.split(SPLIT_WHITESPACE);
  const out: string[] = [];
  // Lower-case word by word, as Python does (it matters for Greek final sigma).
  for (const w of words) if (w.length > 0) out.push(w.toLowerCase());
  return out.join(' ');
}

/** transformers' `clean_up_tokenization` (tokenization_utils_base.py). */
function cleanUpTokenization(text: string): string {
  return text
    .replaceAll(' .', '.')
    .replaceAll(' ?', '?')
    .replaceAll(' !', '!')
    .replaceAll(' ,', ',')
    .replaceAll(" ' ", "'")
    .replaceAll(" n't", "n't")
    .replaceAll(" 'm", "'m")
    .replaceAll(" 's", "'s")
    .replaceAll(" 've", "'ve")
    .replaceAll(" 're", "'re");
}

/**
 * Split raw text on added tokens, leftmost first and longest first at the same position, like
 * `Trie.split` in tokenization_utils.py. Matching is case-sensitive, as there.
 * `byLength` is the added tokens sorted longest first.
 */
function splitOnAddedTokens(
  text: string,
  byLength: readonly string[],
  kinds: ReadonlyMap<string, 'special' | 'placeholder'>,
): Segment[] {
  if (text.length === 0) return [];
  // Most prompts hold no added token at all: skip the scan.
  if (!byLength.some((t) => text.includes(t))) return [{ text }];
  const segments: Segment[] = [];
  let start = 0;
  let i = 0;
  while (i < text.length) {
    let hit: string | undefined;
    for (const candidate of byLength) {
      if (text.startsWith(candidate, i)) {
        hit = candidate;
        break;
      }
    }
    if (hit === undefined) {
      i++;
      continue;
    }
    if (i > start) segments.push({ text: text.slice(start, i) });
    segments.push({ text: hit, added: kinds.get(hit) });
    i += hit.length;
    start = i;
  }
  if (start < text.length) segments.push({ text: text.slice(start) });
  return segments;
}

function sortLongestFirst(tokens: Iterable<string>): string[] {
  return [...tokens].sort((a, b) => b.length - a.length);
}

/** bytes_to_unicode maps '!'..'~' to themselves, so such pre-tokens need no UTF-8 round trip. */
function byteEncode(pre: string): string {
  let ascii = true;
  for (let i = 0; i < pre.length; i++) {
    const c = pre.charCodeAt(i);
    if (c < 0x21 || c > 0x7e) {
      ascii = false;
      break;
    }
  }
  if (ascii) return pre;
  let encoded = '';
  for (const byte of UTF8_ENCODER.encode(pre)) encoded += BYTE_ENCODER[byte];
  return encoded;
}

/** Candidate locations of the bundled tokenizer: from lib/ (ts-jest, ts-node) and from dist/lib/ (built package). */
export function bundledTokenizerCandidates(): string[] {
  return [
    path.resolve(__dirname, '..', 'assets', 'tokenizer'),
    path.resolve(__dirname, '..', '..', 'assets', 'tokenizer'),
  ];
}

/** The package's bundled CLIP tokenizer (assets/tokenizer/, openai/CLIP's vocab as SD v1.5 ships it). */
export function bundledTokenizerDir(): string {
  const candidates = bundledTokenizerCandidates();
  for (const dir of candidates) {
    if (fs.existsSync(path.join(dir, 'vocab.json'))) return dir;
  }
  throw new SingleInsertError(
    `Cannot find the bundled tokenizer: no vocab.json in ${candidates.join(' or ')} (is assets/ missing from the package?)`,
  );
}

export class ClipTokenizer {
  readonly dir: string;
  readonly bosToken: string;
  readonly eosToken: string;
  readonly padToken: string;
  readonly bosTokenId: number;
  readonly eosTokenId: number;
  readonly padTokenId: number;
  readonly unkTokenId: number;
  /** Id of `*</w>`, used for every placeholder position. */
  readonly placeholderTokenId: number;
  readonly modelMaxLength: number;

  private readonly encoder: Map<string, number>;
  private readonly decoder: Map<number, string>;
  /** Merge ranks keyed by `a + ' ' + b` (merge tokens never contain spaces). */
  private readonly bpeRanks: Map<string, number>;
  /**
   * BPE result per pre-token (CLIPTokenizer.cache). Keyed by the raw pre-token rather than its byte-encoded
   * form: the mapping is one-to-one, and a hit then skips the UTF-8 encoding too.
   */
  private readonly cache = new Map<string, string[]>();
  /** Special tokens are no-split added tokens in transformers: split out of the raw text first. */
  private readonly specialSplit: Map<string, 'special' | 'placeholder'>;
  private readonly specialByLength: string[];
  private readonly specialIds: Set<number>;

  private constructor(
    dir: string,
    vocab: Map<string, number>,
    merges: Array<[string, string]>,
    special: SpecialTokens,
    modelMaxLength: number,
  ) {
    this.dir = dir;
    this.encoder = vocab;
    this.decoder = new Map<number, string>();
    for (const [token, id] of vocab) this.decoder.set(id, token);
    this.bpeRanks = new Map<string, number>();
    merges.forEach(([a, b], rank) => {
      const key = `${a} ${b}`;
      // dict(zip(...)) keeps the LAST rank of a duplicated pair; mirror that.
      this.bpeRanks.set(key, rank);
    });

    const idOf = (token: string, what: string): number => {
      const id = vocab.get(token);
      if (id === undefined) {
        throw new SingleInsertError(
          `Broken tokenizer in ${dir}: the ${what} ${JSON.stringify(token)} is not in vocab.json`,
        );
      }
      return id;
    };
    this.bosToken = special.bos;
    this.eosToken = special.eos;
    this.padToken = special.pad;
    this.bosTokenId = idOf(special.bos, 'bos_token');
    this.eosTokenId = idOf(special.eos, 'eos_token');
    this.padTokenId = idOf(special.pad, 'pad_token');
    this.unkTokenId = idOf(special.unk, 'unk_token');
    this.placeholderTokenId = idOf(PLACEHOLDER_TOKEN, 'placeholder token');
    this.modelMaxLength = modelMaxLength;
    this.specialSplit = new Map([
      [special.bos, 'special'],
      [special.eos, 'special'],
      [special.pad, 'special'],
      [special.unk, 'special'],
    ]);
    this.specialByLength = sortLongestFirst(this.specialSplit.keys());
    this.specialIds = new Set([this.bosTokenId, this.eosTokenId, this.padTokenId, this.unkTokenId]);
  }

  /**
   * Load from a tokenizer folder (vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json)
   * or from a model folder that has a `tokenizer/` subfolder. The two JSON config files are optional,
   * as in `from_pretrained`; vocab.json and merges.txt are required.
   */
  static fromDir(dir: string): ClipTokenizer {
    if (typeof dir !== 'string' || dir.length === 0) throw invalidParameterError('dir', 'non-empty string', dir);
    let tokDir = path.resolve(dir);
    if (!fs.existsSync(tokDir) || !fs.statSync(tokDir).isDirectory()) {
      throw new SingleInsertError(`Tokenizer folder ${tokDir} does not exist or is not a folder`);
    }
    if (!fs.existsSync(path.join(tokDir, 'vocab.json')) && fs.existsSync(path.join(tokDir, 'tokenizer', 'vocab.json'))) {
      tokDir = path.join(tokDir, 'tokenizer');
    }
    for (const required of ['vocab.json', 'merges.txt']) {
      if (!fs.existsSync(path.join(tokDir, required))) {
        throw new SingleInsertError(
          `Missing tokenizer file ${path.join(tokDir, required)} (a tokenizer folder holds ${TOKENIZER_FILES.join(', ')})`,
        );
      }
    }

    // vocab.json: token -> id
    const vocabJson = readJsonFile(tokDir, 'vocab.json', false);
    if (!isRecord(vocabJson)) {
      throw new SingleInsertError(`Broken tokenizer file ${path.join(tokDir, 'vocab.json')}: expected a JSON object of token -> id`);
    }
    const vocab = new Map<string, number>();
    for (const [token, id] of Object.entries(vocabJson)) {
      if (typeof id !== 'number' || !Number.isInteger(id) || id < 0) {
        throw new SingleInsertError(
          `Broken tokenizer file ${path.join(tokDir, 'vocab.json')}: expected a non-negative integer id for ${JSON.stringify(token)} but received ${describeValue(id)}`,
        );
      }
      vocab.set(token, id);
    }

    // merges.txt: read().strip().split("\n")[1 : 49152-256-2+1], each line split on whitespace.
    const mergesPath = path.join(tokDir, 'merges.txt');
    const lines = readTextFile(tokDir, 'merges.txt').trim().split(/\r?\n/).slice(1, CLIP_NUM_MERGES + 1);
    const merges: Array<[string, string]> = [];
    for (let i = 0; i < lines.length; i++) {
      const parts = lines[i].trim().split(/\s+/);
      if (parts.length !== 2) {
        throw new SingleInsertError(
          `Broken tokenizer file ${mergesPath}: line ${i + 2} should hold two symbols but holds ${JSON.stringify(lines[i])}`,
        );
      }
      merges.push([parts[0], parts[1]]);
    }
    if (merges.length === 0) throw new SingleInsertError(`Broken tokenizer file ${mergesPath}: no merges after the version line`);

    const configJson = readJsonFile(tokDir, 'tokenizer_config.json', true);
    if (configJson !== undefined && !isRecord(configJson)) {
      throw new SingleInsertError(`Broken tokenizer file ${path.join(tokDir, 'tokenizer_config.json')}: expected a JSON object`);
    }
    const mapJson = readJsonFile(tokDir, 'special_tokens_map.json', true);
    const special = resolveSpecialTokens(tokDir, configJson, mapJson);
    return new ClipTokenizer(tokDir, vocab, merges, special, resolveMaxLength(tokDir, configJson));
  }

  get vocabSize(): number {
    return this.encoder.size;
  }

  /** Id of a vocab string, or undefined. */
  tokenToId(token: string): number | undefined {
    return this.encoder.get(token);
  }

  /** Vocab string of an id, or undefined. */
  idToToken(id: number): string | undefined {
    return this.decoder.get(id);
  }

  /** Drop the per-word BPE cache (benchmarks; memory). */
  clearCache(): void {
    this.cache.clear();
  }

  /**
   * `CLIPTokenizer.bpe` on the byte-encoded `token`: merge the lowest-ranked adjacent pair until none is in
   * the merge table. Cached under the raw pre-token `pre`.
   */
  private bpe(pre: string): string[] {
    const cached = this.cache.get(pre);
    if (cached !== undefined) return cached;
    const token = byteEncode(pre);
    // word = tuple(token[:-1]) + (token[-1] + "</w>",); byte-encoded chars are all single UTF-16 units.
    let word = token.split('');
    word[word.length - 1] += '</w>';
    while (word.length > 1) {
      let bestRank = Infinity;
      let bestAt = -1;
      for (let i = 0; i < word.length - 1; i++) {
        const rank = this.bpeRanks.get(word[i] + ' ' + word[i + 1]);
        if (rank !== undefined && rank < bestRank) {
          bestRank = rank;
          bestAt = i;
        }
      }
      if (bestAt < 0) break;
      // Merge every non-overlapping occurrence, scanning left to right as the Python loop does.
      const first = word[bestAt];
      const second = word[bestAt + 1];
      const merged: string[] = [];
      let i = 0;
      while (i < word.length) {
        if (i < word.length - 1 && word[i] === first && word[i + 1] === second) {
          merged.push(first + second);
          i += 2;
        } else {
          merged.push(word[i]);
          i += 1;
        }
      }
      word = merged;
    }
    if (this.cache.size >= BPE_CACHE_LIMIT) this.cache.clear();
    this.cache.set(pre, word);
    return word;
  }

  /** `CLIPTokenizer._tokenize` on a piece of free text (no added tokens in it). */
  private tokenizeFreeText(text: string, out: string[]): void {
    const cleaned = basicClean(text);
    if (cleaned.length === 0) return;
    for (const match of cleaned.matchAll(CLIP_PRETOKENIZE)) {
      const pre = match[0];
      // The regex can match the special tokens in lower-cased text ("<|ENDOFTEXT|>"); CLIPTokenizer.cache
      // is seeded with them so they map to themselves, without "</w>".
      if (pre === DEFAULT_BOS || pre === DEFAULT_EOS) {
        out.push(pre);
        continue;
      }
      for (const piece of this.bpe(pre)) out.push(piece);
    }
  }

  private idOfToken(token: string): number {
    // _convert_token_to_id: unknown strings map to the unk id (cannot happen with a complete byte vocab).
    return this.encoder.get(token) ?? this.unkTokenId;
  }

  /** BPE strings of `text`, like `tokenizer.tokenize(text)` (special tokens are kept whole). */
  tokenize(text: string): string[] {
    if (typeof text !== 'string') throw invalidParameterError('text', 'string', text);
    const out: string[] = [];
    for (const seg of splitOnAddedTokens(text, this.specialByLength, this.specialSplit)) {
      if (seg.added) out.push(seg.text);
      else this.tokenizeFreeText(seg.text, out);
    }
    return out;
  }

  /** Ids with BOS and EOS, untruncated: `tokenizer(text).input_ids`. */
  encode(text: string): number[] {
    const ids = [this.bosTokenId];
    for (const token of this.tokenize(text)) ids.push(this.idOfToken(token));
    ids.push(this.eosTokenId);
    return ids;
  }

  /**
   * `tokenizer(text, padding="max_length", max_length=maxLength, truncation=True)`, the call SD's
   * `encode_prompt` makes: `[BOS] + ids[:maxLength-2] + [EOS]`, then padded with the pad id.
   */
  call(text: string, options: CallOptions = {}): CallResult {
    const maxLength = validateMaxLength(options.maxLength ?? this.modelMaxLength);
    const content = this.tokenize(text).map((token): ContentToken => ({ token, id: this.idOfToken(token) }));
    const { ids, attentionMask, truncated, truncatedText } = this.window(content, maxLength);
    return truncated ? { inputIds: ids, attentionMask, truncated, truncatedText } : { inputIds: ids, attentionMask, truncated };
  }

  /**
   * Encode a prompt with placeholders. Each placeholder occurrence is split out of the raw text before BPE
   * (longest first, like transformers' added tokens) and takes one position with the id of `*</w>`
   * (N positions with `placeholderLengths`). Throws when a placeholder would be truncated away, or when
   * the prompt holds placeholder-like text (`<...>`, `*x`) that is not an active placeholder.
   */
  encodePrompt(text: string, options: EncodePromptOptions = {}): EncodedPrompt {
    if (typeof text !== 'string') throw invalidParameterError('prompt', 'string', text);
    const maxLength = validateMaxLength(options.maxLength ?? this.modelMaxLength);
    const placeholders = this.validatePlaceholders(options.placeholders ?? []);
    const lengths = validatePlaceholderLengths(options.placeholderLengths, placeholders);

    const split = new Map(this.specialSplit);
    for (const p of placeholders) split.set(p, 'placeholder');
    const segments = splitOnAddedTokens(text, sortLongestFirst(split.keys()), split);
    if (placeholders.length > 0) this.checkUnknownPlaceholders(text, segments, placeholders);

    const content: ContentToken[] = [];
    for (const seg of segments) {
      if (seg.added === 'placeholder') {
        const n = lengths.get(seg.text) ?? 1;
        for (let i = 0; i < n; i++) content.push({ token: seg.text, id: this.placeholderTokenId, placeholder: seg.text });
      } else if (seg.added === 'special') {
        content.push({ token: seg.text, id: this.idOfToken(seg.text) });
      } else {
        const pieces: string[] = [];
        this.tokenizeFreeText(seg.text, pieces);
        for (const token of pieces) content.push({ token, id: this.idOfToken(token) });
      }
    }

    const windowed = this.window(content, maxLength);
    const placeholderPositions: Record<string, number[]> = {};
    for (const p of placeholders) placeholderPositions[p] = [];
    const capacity = maxLength - 2;
    content.forEach((item, k) => {
      if (item.placeholder === undefined) return;
      if (k >= capacity) {
        throw new SingleInsertError(
          `Placeholder ${JSON.stringify(item.placeholder)} is prompt token ${k + 1} but only ${capacity} tokens fit in the ` +
            `${maxLength}-token window (BOS + ${capacity} + EOS): the prompt is too long (${content.length} tokens). ` +
            `Shorten it so the placeholder is kept: ${describeValue(text)}`,
        );
      }
      placeholderPositions[item.placeholder].push(k + 1); // index into ids; BOS is 0
    });

    const result: EncodedPrompt = {
      ids: windowed.ids,
      attentionMask: windowed.attentionMask,
      placeholderPositions,
      truncated: windowed.truncated,
      tokens: content.map((c) => c.token),
      untruncatedIds: [this.bosTokenId, ...content.map((c) => c.id), this.eosTokenId],
    };
    if (windowed.truncatedText !== undefined) result.truncatedText = windowed.truncatedText;
    return result;
  }

  /**
   * `decode(ids)`: tokens joined, byte-decoded (errors="replace"), "</w>" -> " ", stripped
   * (`convert_tokens_to_string`), then `clean_up_tokenization` as transformers 4.33 does by default.
   */
  decode(ids: readonly number[], options: DecodeOptions = {}): string {
    if (!Array.isArray(ids)) throw invalidParameterError('ids', 'array of integers', ids);
    const tokens: string[] = [];
    for (const id of ids) {
      const token = typeof id === 'number' ? this.decoder.get(id) : undefined;
      if (token === undefined) {
        throw invalidParameterError('ids', `integer ids in the vocab (0..${this.encoder.size - 1})`, id);
      }
      if (options.skipSpecialTokens && this.specialIds.has(id)) continue;
      tokens.push(token);
    }
    const text = this.convertTokensToString(tokens);
    return options.cleanUpTokenizationSpaces === false ? text : cleanUpTokenization(text);
  }

  /** `CLIPTokenizer.convert_tokens_to_string`. */
  convertTokensToString(tokens: readonly string[]): string {
    const joined = tokens.join('');
    const bytes = new Uint8Array(joined.length);
    let n = 0;
    for (const ch of joined) {
      const byte = BYTE_DECODER.get(ch);
      // Placeholders are shown as their own text; anything else outside the byte alphabet is a bug.
      if (byte === undefined) {
        for (const b of UTF8_ENCODER.encode(ch)) bytes[n++] = b;
      } else {
        bytes[n++] = byte;
      }
    }
    return UTF8_DECODER.decode(bytes.subarray(0, n)).replaceAll('</w>', ' ').trim();
  }

  /** Truncate to maxLength-2 content tokens, add BOS/EOS, pad with the pad id (pad is also EOS: mask by count). */
  private window(content: ContentToken[], maxLength: number): {
    ids: number[];
    attentionMask: number[];
    truncated: boolean;
    truncatedText?: string;
  } {
    const capacity = maxLength - 2;
    const kept = content.slice(0, capacity);
    const ids = [this.bosTokenId, ...kept.map((c) => c.id), this.eosTokenId];
    const real = ids.length;
    while (ids.length < maxLength) ids.push(this.padTokenId);
    const attentionMask = ids.map((_, i) => (i < real ? 1 : 0));
    if (content.length <= capacity) return { ids, attentionMask, truncated: false };
    const truncatedText = this.convertTokensToString(content.slice(capacity).map((c) => c.token));
    return { ids, attentionMask, truncated: true, truncatedText };
  }

  private validatePlaceholders(value: unknown): string[] {
    if (!Array.isArray(value)) throw invalidParameterError('placeholders', 'array of strings', value);
    const out: string[] = [];
    for (const p of value) {
      if (typeof p !== 'string' || p.length === 0 || /\s/u.test(p)) {
        throw invalidParameterError('placeholders', 'non-empty strings without whitespace', p);
      }
      if (this.specialSplit.has(p)) throw invalidParameterError('placeholders', 'strings other than the special tokens', p);
      if (!out.includes(p)) out.push(p);
    }
    return out;
  }

  /**
   * With placeholders active, text that looks like a placeholder but is not one (`<hair2>`, `*2`, a stray `*`)
   * would silently become ordinary tokens (a stray `*` even gets id 265 without a position), so refuse it.
   */
  private checkUnknownPlaceholders(text: string, segments: Segment[], placeholders: string[]): void {
    const specials = new Set([...this.specialSplit.keys()].map((s) => s.toLowerCase()));
    for (const seg of segments) {
      if (seg.added) continue;
      const found = [...seg.text.matchAll(ANGLE_PLACEHOLDER_LIKE), ...seg.text.matchAll(STAR_PLACEHOLDER_LIKE)]
        .map((m) => m[0])
        .filter((s) => !specials.has(s.toLowerCase()));
      if (found.length > 0) {
        throw new SingleInsertError(
          `Unknown placeholder ${JSON.stringify(found[0])} in prompt ${describeValue(text)}; ` +
            `the known placeholders are ${placeholders.map((p) => JSON.stringify(p)).join(', ')}`,
        );
      }
    }
  }
}
