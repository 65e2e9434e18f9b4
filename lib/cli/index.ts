/**
 * The command line: one yargs command module per file in ./commands. Only this file sets the
 * exit code; handlers throw. Errors print one clear line (the stack only with --verbose).
 */
import yargs from 'yargs';
import * as info from './commands/info';
import * as inspect from './commands/inspect';
import * as tokenize from './commands/tokenize';
import { SingleInsertError } from '../errors';

export function buildCli(argv: string[]) {
  return yargs(argv)
    .scriptName('singleinsert-native')
    .usage('$0 <command> [options]\n\nSingleInsert for Stable Diffusion v1.5: learn a concept from one image, then generate edits of it.')
    .command(inspect)
    .command(tokenize)
    .command(info)
    .option('verbose', { type: 'boolean', default: false, describe: 'print stack traces and extra detail' })
    .demandCommand(1, 'Name a command (see --help)')
    .strict()
    .version(false)
    .option('version', { type: 'boolean', describe: 'print the version (with --verbose: libtorch and device details)' })
    .help()
    .fail(false);
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
    const known = err instanceof SingleInsertError || err.name === 'YError' || err.name === 'AbortError';
    process.stderr.write(`singleinsert-native: ${verbose && err.stack ? err.stack : err.message}\n`);
    if (!known && !verbose) process.stderr.write('(run with --verbose for the stack trace)\n');
    process.exitCode = err.name === 'AbortError' ? 130 : 1;
  }
}
