/**
 * Progress output for long CLI commands (generate, train): a bar with step, it/s and ETA on a
 * terminal (cli-progress), and plain, throttled lines otherwise (logs, CI, pipes). Written to
 * stderr by default so that stdout stays clean for `--json` and file lists.
 */
import { SingleBar } from 'cli-progress';

export interface ProgressUpdate {
  /** steps done (1-based after the first step) */
  step: number;
  /** total steps */
  steps: number;
  /** seconds since the first step started; rates are derived from it when not given */
  elapsedSec?: number;
  itPerSec?: number;
  etaSec?: number;
  /** extra text after the rate, e.g. "loss 0.0123" */
  info?: string;
}

export interface ProgressReporterOptions {
  /** printed before the bar or line, e.g. "sampling" */
  label?: string;
  /** default process.stderr */
  stream?: NodeJS.WritableStream & { isTTY?: boolean };
  /** bar (true) or plain lines (false); default: whether `stream` is a TTY */
  tty?: boolean;
  /** plain lines: at most one per this many milliseconds, besides the first and the last step (default 1000) */
  minIntervalMs?: number;
}

/** "4.2s", "3m05s", "1h02m" */
export function formatDuration(sec: number): string {
  if (!Number.isFinite(sec) || sec < 0) return '?';
  if (sec < 60) return `${sec.toFixed(sec < 10 ? 1 : 0)}s`;
  const s = Math.round(sec);
  if (s < 3600) return `${Math.floor(s / 60)}m${String(s % 60).padStart(2, '0')}s`;
  return `${Math.floor(s / 3600)}h${String(Math.floor((s % 3600) / 60)).padStart(2, '0')}m`;
}

/** "2.41 it/s", or "3.2 s/it" below one step per second (easier to read for slow CPU steps) */
export function formatRate(itPerSec: number | undefined): string {
  if (itPerSec === undefined || !Number.isFinite(itPerSec) || itPerSec <= 0) return '? it/s';
  return itPerSec >= 1 ? `${itPerSec.toFixed(2)} it/s` : `${(1 / itPerSec).toFixed(2)} s/it`;
}

function rates(e: ProgressUpdate): { itPerSec?: number; etaSec?: number } {
  let itPerSec = e.itPerSec;
  if (itPerSec === undefined && e.elapsedSec !== undefined && e.elapsedSec > 0) itPerSec = e.step / e.elapsedSec;
  let etaSec = e.etaSec;
  if (etaSec === undefined && itPerSec !== undefined && itPerSec > 0) etaSec = (e.steps - e.step) / itPerSec;
  return { itPerSec, etaSec };
}

export class ProgressReporter {
  private readonly label: string;
  private readonly stream: NodeJS.WritableStream & { isTTY?: boolean };
  private readonly tty: boolean;
  private readonly minIntervalMs: number;
  private bar: SingleBar | null = null;
  private lastLine = 0;
  private lastStep = -1;

  constructor(options: ProgressReporterOptions = {}) {
    this.label = options.label ?? '';
    this.stream = options.stream ?? process.stderr;
    this.tty = options.tty ?? Boolean(this.stream.isTTY);
    this.minIntervalMs = options.minIntervalMs ?? 1000;
  }

  update(e: ProgressUpdate): void {
    const { itPerSec, etaSec } = rates(e);
    const payload = { label: this.label, rate: formatRate(itPerSec), etaText: formatDuration(etaSec ?? NaN), info: e.info ? `  ${e.info}` : '' };
    if (this.tty) {
      if (!this.bar) {
        this.bar = new SingleBar({
          stream: this.stream as NodeJS.WriteStream,
          format: '{label} |{bar}| {value}/{total} | {rate} | ETA {etaText}{info}',
          barCompleteChar: '\u2588',
          barIncompleteChar: '\u2591',
          hideCursor: true,
          clearOnComplete: false,
          // the ETA comes from our own rate, not from cli-progress' smoothing
          etaBuffer: 1,
        });
        this.bar.start(e.steps, 0, payload);
      }
      if (this.bar.getTotal() !== e.steps) this.bar.setTotal(e.steps);
      this.bar.update(e.step, payload);
    } else {
      const now = Date.now();
      const edge = this.lastStep < 0 || e.step >= e.steps;
      if (e.step === this.lastStep || (!edge && now - this.lastLine < this.minIntervalMs)) return;
      this.lastLine = now;
      const eta = e.step >= e.steps ? `done in ${formatDuration(e.elapsedSec ?? NaN)}` : `ETA ${payload.etaText}`;
      this.stream.write(`${this.label ? `${this.label} ` : ''}${e.step}/${e.steps}  ${payload.rate}  ${eta}${payload.info}\n`);
    }
    this.lastStep = e.step;
  }

  /** A message line that does not break the bar. */
  log(line: string): void {
    if (this.bar) {
      this.stream.write('\r\x1b[2K');
      this.stream.write(`${line}\n`);
      this.bar.render();
    } else {
      this.stream.write(`${line}\n`);
    }
  }

  /** Ends the bar (leaves it on screen) and restores the cursor. Safe to call more than once. */
  stop(): void {
    if (this.bar) {
      this.bar.stop();
      this.bar = null;
    }
  }
}
