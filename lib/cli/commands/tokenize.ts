/**
 * `singleinsert-native tokenize <prompt>`: show how a prompt is tokenised for the text encoder,
 * with placeholder positions and the exact 77 ids SD v1.5 sees. Prompts starting with "-" go after "--".
 *
 * The positional is declared optional (`[prompt]`) and required in the handler: yargs 17 never fills a
 * command positional from the words after "--" (it counts only `argv._` before moving "--" there; see
 * yargs/yargs-parser#177 and yargs/yargs#2423), so `tokenize -- "-a cat"` would fail validation with `<prompt>`.
 */
import type { ArgumentsCamelCase, Argv } from 'yargs';
import { ClipTokenizer, bundledTokenizerDir } from '../../tokenizer';
import { invalidParameterError } from '../../errors';

export const command = 'tokenize [prompt]';
export const desc = 'Show the CLIP tokens and the 77 input ids of a prompt';

export interface TokenizeOptions {
  prompt: string;
  /** Model folder (with tokenizer/) or tokenizer folder; default: the bundled tokenizer. */
  model?: string;
  placeholder?: string[];
  json?: boolean;
}

/** The `--json` shape; snake_case keys match fixtures/tokenizer/golden_tokenization.json. */
export interface TokenizeResult {
  tokens: string[];
  ids: number[];
  input_ids_77: number[];
  attention_mask_77: number[];
  truncated: boolean;
  truncatedText?: string;
  placeholderPositions: Record<string, number[]>;
}

export function builder(y: Argv): Argv<Partial<TokenizeOptions>> {
  return y
    .positional('prompt', {
      type: 'string',
      // type string keeps "1" or "007" as text; yargs would otherwise turn them into numbers.
      describe: 'prompt text (required; put it after -- if it starts with "-")',
    })
    .option('model', {
      type: 'string',
      describe: 'model folder (with tokenizer/) or tokenizer folder; default: the bundled SD v1.5 tokenizer',
    })
    .option('placeholder', {
      type: 'string',
      array: true,
      describe: 'placeholder string to encode as one position (repeatable), e.g. --placeholder "*"',
    })
    .option('json', { type: 'boolean', default: false, describe: 'print JSON instead of a table' }) as Argv<Partial<TokenizeOptions>>;
}

/** The handler's work without printing, for in-process tests and other commands. */
export async function runTokenize(opts: TokenizeOptions): Promise<TokenizeResult> {
  // yargs gives a number for a numeric positional unless typed; accept it and keep the text.
  const prompt: unknown = opts.prompt;
  if (typeof prompt !== 'string' && typeof prompt !== 'number') throw invalidParameterError('prompt', 'string', prompt);
  const tokenizer = ClipTokenizer.fromDir(opts.model ?? bundledTokenizerDir());
  const encoded = tokenizer.encodePrompt(String(prompt), { placeholders: opts.placeholder ?? [] });
  const result: TokenizeResult = {
    tokens: encoded.tokens,
    ids: encoded.untruncatedIds,
    input_ids_77: encoded.ids,
    attention_mask_77: encoded.attentionMask,
    truncated: encoded.truncated,
    placeholderPositions: encoded.placeholderPositions,
  };
  if (encoded.truncatedText !== undefined) result.truncatedText = encoded.truncatedText;
  return result;
}

/** Human output: one "index token id" line per position (BOS/EOS included), then the 77 ids. */
export function formatTokenizeTable(result: TokenizeResult): string {
  const rows: Array<[string, string, string]> = [['pos', 'token', 'id']];
  const kept = result.input_ids_77.length - 2;
  const tokens = ['<|startoftext|>', ...result.tokens, '<|endoftext|>'];
  tokens.forEach((token, i) => {
    const cut = i > kept && i < tokens.length - 1; // content past the window
    rows.push([cut ? `(${i})` : String(i), token, String(result.ids[i])]);
  });
  const w0 = Math.max(...rows.map((r) => r[0].length));
  const w1 = Math.max(...rows.map((r) => r[1].length));
  const lines = rows.map(([a, b, c]) => `${a.padStart(w0)}  ${b.padEnd(w1)}  ${c}`);
  for (const [placeholder, positions] of Object.entries(result.placeholderPositions)) {
    lines.push(`placeholder ${JSON.stringify(placeholder)} at ${positions.length > 0 ? positions.join(', ') : '(not in prompt)'}`);
  }
  if (result.truncated) {
    lines.push(`warning: prompt truncated to ${kept} tokens; dropped: ${JSON.stringify(result.truncatedText ?? '')}`);
  }
  lines.push(`input_ids (${result.input_ids_77.length}):`);
  lines.push(result.input_ids_77.join(' '));
  return lines.join('\n') + '\n';
}

/** The prompt plus any words after "--" (yargs leaves those in `argv._`, after the command name). */
function promptFromArgv(argv: ArgumentsCamelCase<Partial<TokenizeOptions>>): string {
  const at = argv._.indexOf('tokenize');
  const rest = at < 0 ? [] : argv._.slice(at + 1).map(String);
  const parts = argv.prompt === undefined ? rest : [String(argv.prompt), ...rest];
  if (parts.length === 0) {
    throw invalidParameterError('prompt', 'a prompt argument (after -- if it starts with "-")', undefined);
  }
  return parts.join(' ');
}

export async function handler(argv: ArgumentsCamelCase<Partial<TokenizeOptions>>): Promise<void> {
  const result = await runTokenize({
    prompt: promptFromArgv(argv),
    model: argv.model,
    placeholder: argv.placeholder,
    json: argv.json,
  });
  process.stdout.write(argv.json ? JSON.stringify(result) + '\n' : formatTokenizeTable(result));
}
