import * as fs from 'node:fs';
import * as path from 'node:path';

/** Root of the reference fixtures: env SINGLEINSERT_FIXTURES, default ../shared/fixtures next to the checkout. */
export function fixturesDir(): string {
  const dir = process.env.SINGLEINSERT_FIXTURES ?? path.resolve(__dirname, '..', '..', '..', 'shared', 'fixtures');
  if (!fs.existsSync(path.join(dir, 'README.md'))) {
    throw new Error(`Expected the reference fixtures at ${dir} (set SINGLEINSERT_FIXTURES) but found no README.md there`);
  }
  return dir;
}

export function fixture(...parts: string[]): string {
  return path.join(fixturesDir(), ...parts);
}
