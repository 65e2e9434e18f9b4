/**
 * The command line: one yargs command module per file in ./commands. Only this file sets the
 * exit code; handlers throw. Errors print one clear line (the stack only with --verbose).
 */
import yargs from 'yargs';
import * as convert from './commands/convert';
import * as evaluate from './commands/eval';
import * as generate from './commands/generate';
import * as demo from './commands/demo';
import * as info from './commands/info';
import * as inspect from './commands/inspect';
import * as tokenize from './commands/tokenize';
import * as train from './commands/train';
import { SingleInsertError } from '../errors';

export function buildCli(argv: string[]) {
  return yargs(argv)
    .scriptName('singleinsert-native')
    .usage('$0 <command> [options]\n\nSingleInsert for Stable Diffusion v1.5: learn a concept from one image, then generate edits of it.')
    .command(generate)
    .command(evaluate)
    .command(convert)
    .command(demo)
    .command(inspect)
    .command(tokenize)
    .command(train)
    .command(info)
    .option('verbose', { type: 'boolean', default: false, describe: 'print stack traces and extra detail' })
    .demandCommand(1, 'Name a command')
    .strict()
    // "Unknown command: x" (and "Did you mean inspect?") rather than "Unknown argument: x"
    .strictCommands()
    .recommendCommands()
    .version(false)
    .option('version', { type: 'boolean', describe: 'print the version (with --verbose: libtorch and device details)' })
    .help()
    // With .fail(false) yargs throws a plain Error for usage mistakes, which main() could not tell
    // from a crash; a UsageError is printed as one line with a pointer to --help.
    .fail((msg, err) => {
      throw err ?? new UsageError(msg);
    });
}

/** A mistake on the command line (unknown command or option, missing argument). */
export class UsageError extends Error {
  constructor(message: string) {
    super(`${message} (see singleinsert-native --help)`);
    this.name = 'UsageError';
  }
}

export async function main(argv: string[]): Promise<void> {
  const verbose = argv.includes('--verbose');
  if (argv.includes('--version') && !argv.some((a) => !a.startsWith('-'))) {
    await info.runInfo({ json: false, verbose });
    return;
  }
  try {
    await buildCli(argv).parseAsync();
  } catch (e) {
    const err = e as Error;
    const known = err instanceof SingleInsertError || err.name === 'UsageError' || err.name === 'YError' || err.name === 'AbortError';
    process.stderr.write(`singleinsert-native: ${verbose && err.stack ? err.stack : err.message}\n`);
    if (!known && !verbose) process.stderr.write('(run with --verbose for the stack trace)\n');
    process.exitCode = err.name === 'AbortError' ? 130 : 1;
  }
}
