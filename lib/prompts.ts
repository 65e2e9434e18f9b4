/**
 * Prompt templates of SingleInsert (Wu et al., 2023): stage I learns the concept embedding from
 * "{placeholder} {class}" (e.g. "* face") and regularises the background with the class prompt "{class}".
 */
import { SingleInsertError, invalidParameterError } from './errors';

/** Foreground prompt with the learned token, e.g. "* face". */
export const TRAIN_TEMPLATE = '{placeholder} {class}';
/** Class-only prompt for the background/regularisation branch, e.g. "face". */
export const CLASS_TEMPLATE = '{class}';
/** SingleInsert's default placeholder string. */
export const DEFAULT_PLACEHOLDER = '*';

export interface FillValues {
  class: string;
  placeholder?: string;
}

const TEMPLATE_KEY = /\{([^{}]*)\}/g;

/**
 * Replace `{class}` and `{placeholder}` in `template`. Any other `{key}` is an error rather than being
 * left in the prompt, where it would silently become ordinary tokens.
 */
export function fill(template: string, values: FillValues): string {
  if (typeof template !== 'string') throw invalidParameterError('template', 'string', template);
  if (typeof values !== 'object' || values === null) throw invalidParameterError('values', 'object', values);
  const cls: unknown = values.class;
  if (typeof cls !== 'string' || cls.trim().length === 0) {
    throw invalidParameterError('class', 'non-empty string', cls);
  }
  const placeholder: unknown = values.placeholder ?? DEFAULT_PLACEHOLDER;
  if (typeof placeholder !== 'string' || placeholder.length === 0) {
    throw invalidParameterError('placeholder', 'non-empty string', placeholder);
  }
  // A Map, not an object literal: "{constructor}" must not find Object.prototype members.
  const known = new Map<string, string>([
    ['class', cls],
    ['placeholder', placeholder],
  ]);
  return template.replace(TEMPLATE_KEY, (whole: string, key: string) => {
    const value = known.get(key);
    if (value === undefined) {
      throw new SingleInsertError(
        `Unknown key ${whole} in prompt template ${JSON.stringify(template)}; the known keys are {class}, {placeholder}`,
      );
    }
    return value;
  });
}
