/**
 * One wording for every option error (after sharp): "Expected <what> for <name> but received <value>".
 * Thrown before any native work so the stack points at the caller.
 */
export class SingleInsertError extends Error {
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'SingleInsertError';
  }
}

export function describeValue(value: unknown): string {
  if (typeof value === 'string') return JSON.stringify(value.length > 80 ? value.slice(0, 77) + '...' : value);
  if (typeof value === 'number' || typeof value === 'boolean' || value === null || value === undefined) return String(value);
  if (Array.isArray(value)) return `array of length ${value.length}`;
  if (typeof value === 'object') return `${(value as object).constructor?.name ?? 'object'}`;
  return typeof value;
}

export function invalidParameterError(name: string, expected: string, actual: unknown): SingleInsertError {
  return new SingleInsertError(`Expected ${expected} for ${name} but received ${describeValue(actual)}`);
}

/** Rejection value for a cancelled job, like the DOM's AbortError. */
export class AbortError extends Error {
  constructor(message = 'The operation was aborted') {
    super(message);
    this.name = 'AbortError';
  }
}
