/** Tests are TypeScript, run through ts-jest against the sources in lib/; the addon is loaded from build/. */
module.exports = {
  testEnvironment: 'node',
  roots: ['<rootDir>/test'],
  testMatch: ['**/*.test.ts'],
  transform: { '^.+\\.ts$': ['ts-jest', { tsconfig: 'tsconfig.test.json' }] },
  testTimeout: 120000,
  // libtorch tests are CPU-heavy on 2 cores: run files in two workers at most.
  maxWorkers: 2,
};
