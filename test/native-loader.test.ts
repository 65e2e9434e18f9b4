// lib/native.ts: a missing or unloadable addon is a clear error with the one command that fixes it.
import * as path from 'node:path';

describe('native()', () => {
  afterEach(() => {
    jest.dontMock('node:fs');
    jest.resetModules();
  });

  test('a missing addon names the expected path and `npm run build`', () => {
    jest.isolateModules(() => {
      jest.doMock('node:fs', () => {
        const real = jest.requireActual('node:fs');
        return { ...real, existsSync: (p: string) => (String(p).endsWith('singleinsert_native.node') ? false : real.existsSync(p)) };
      });
      const { native, addonPath, packageRoot } = require('../lib/native');
      expect(() => native()).toThrow(`The native addon is not built (expected ${addonPath}). Run \`npm run build\` in ${packageRoot}: it installs libtorch if needed and builds the addon.`);
      expect(addonPath).toBe(path.join(packageRoot, 'build', 'Release', 'singleinsert_native.node'));
    });
  });

  test('an addon that fails to load says why and how to rebuild', () => {
    jest.isolateModules(() => {
      const { addonPath } = jest.requireActual('../lib/native');
      jest.doMock(addonPath, () => {
        throw new Error('libtorch_cpu.so: cannot open shared object file');
      }, { virtual: true });
      const { native, packageRoot } = require('../lib/native');
      expect(() => native()).toThrow(`failed to load: libtorch_cpu.so: cannot open shared object file. Rebuild it against the installed libtorch with \`npm run build\` in ${packageRoot}.`);
      jest.dontMock(addonPath);
    });
  });

  test('the real addon loads and reports its libtorch', () => {
    const { native } = require('../lib/native');
    const info = native().buildInfo();
    expect(info.torchVersion).toMatch(/^\d+\.\d+/);
    expect(['LIBTORCH', 'python', 'system']).toContain(info.torchSource);
  });
});
