/**
 * Download progress: on a terminal, one bar per file in flight plus a total with speed and ETA
 * (cli-progress, drawn on stderr so stdout stays clean for the path `blossom download` prints);
 * elsewhere nothing at all.
 */
import cliProgress from "cli-progress";

export interface DownloadProgress {
  /** A file's transfer (re)starts with `initial` bytes already on disk. */
  fileStarted(name: string, size: number | undefined, initial: number): void;
  bytes(name: string, count: number): void;
  fileDone(name: string): void;
  stop(): void;
}

export const silentProgress: DownloadProgress = {
  fileStarted() {},
  bytes() {},
  fileDone() {},
  stop() {},
};

/** Decimal units, as the Hub's web pages and `huggingface-cli scan-cache` show sizes. */
export function formatBytes(bytes: number): string {
  const units = ["B", "kB", "MB", "GB", "TB"];
  let value = bytes;
  let unit = 0;
  while (value >= 1000 && unit < units.length - 1) {
    value /= 1000;
    unit++;
  }
  return unit === 0 ? `${bytes} B` : `${value.toFixed(value >= 100 ? 0 : 1)} ${units[unit]}`;
}

function formatDuration(seconds: number): string {
  if (!Number.isFinite(seconds)) return "--";
  const s = Math.round(seconds);
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m${String(s % 60).padStart(2, "0")}s`;
  return `${Math.floor(s / 3600)}h${String(Math.floor((s % 3600) / 60)).padStart(2, "0")}m`;
}

function shortName(name: string, width: number): string {
  return name.length <= width ? name.padEnd(width) : `…${name.slice(name.length - width + 1)}`;
}

const SPEED_WINDOW_MS = 5_000;
const LABEL_WIDTH = 24;

/** A terminal display of `totalBytes` (resumed partials included) over `fileCount` files. */
export function terminalProgress(totalBytes: number, fileCount: number, stream: NodeJS.WriteStream = process.stderr): DownloadProgress {
  // Fit one line of the terminal: label, bar, percentage, then "1.0 GB/1.0 GB  596 MB/s  ETA 0s".
  const barSize = Math.max(10, Math.min(40, (stream.columns ?? 80) - LABEL_WIDTH - 1 - 5 - 36));
  const multibar = new cliProgress.MultiBar(
    {
      stream,
      barsize: barSize,
      hideCursor: true,
      clearOnComplete: false,
      fps: 5,
      autopadding: true,
      format: (options, params, payload: { label: string; detail: string }) => {
        const filled = Math.round(Math.min(1, params.progress) * barSize);
        const bar = "█".repeat(filled) + "░".repeat(barSize - filled);
        return `${payload.label} ${bar} ${String(Math.floor(params.progress * 100)).padStart(3)}% ${payload.detail}`;
      },
    },
    cliProgress.Presets.shades_classic,
  );
  const fileBars = new Map<string, { bar: cliProgress.SingleBar; done: number; size: number | undefined }>();
  let done = 0; // bytes on disk, resumed partials included
  let transferred = 0; // bytes received in this run: the speed
  let filesDone = 0;
  const samples: Array<{ at: number; transferred: number }> = [{ at: Date.now(), transferred: 0 }];

  const totalDetail = (): string => {
    const now = Date.now();
    samples.push({ at: now, transferred });
    while (samples.length > 2 && now - samples[0]!.at > SPEED_WINDOW_MS) samples.shift();
    const first = samples[0]!;
    const speed = now > first.at ? ((transferred - first.transferred) * 1000) / (now - first.at) : 0;
    const eta = speed > 0 ? (totalBytes - done) / speed : Number.POSITIVE_INFINITY;
    return `${formatBytes(done)}/${formatBytes(totalBytes)}  ${formatBytes(speed)}/s  ETA ${formatDuration(eta)}`;
  };
  const totalLabel = (): string => shortName(`total (${filesDone}/${fileCount} files)`, LABEL_WIDTH);
  const total = multibar.create(Math.max(totalBytes, 1), 0, { label: totalLabel(), detail: totalDetail() });
  const refreshTotal = (): void =>
    total.update(Math.min(done, Math.max(totalBytes, 1)), { label: totalLabel(), detail: totalDetail() });

  return {
    fileStarted(name, size, initial) {
      const existing = fileBars.get(name);
      // A restart after a failed attempt re-counts what is on disk: undo what this file counted before.
      done -= existing?.done ?? 0;
      const entry = existing ?? {
        bar: multibar.create(Math.max(size ?? 1, 1), 0, { label: shortName(`  ${name}`, LABEL_WIDTH), detail: "" }),
        done: 0,
        size,
      };
      entry.done = initial;
      done += initial;
      fileBars.set(name, entry);
      entry.bar.update(initial, { detail: `${formatBytes(initial)}/${size === undefined ? "?" : formatBytes(size)}` });
      refreshTotal();
    },
    bytes(name, count) {
      const entry = fileBars.get(name);
      if (entry === undefined) return;
      entry.done += count;
      done += count;
      transferred += count;
      entry.bar.update(entry.done, { detail: `${formatBytes(entry.done)}/${entry.size === undefined ? "?" : formatBytes(entry.size)}` });
      refreshTotal();
    },
    fileDone(name) {
      const entry = fileBars.get(name);
      if (entry !== undefined) {
        multibar.remove(entry.bar);
        fileBars.delete(name);
      }
      filesDone++;
      refreshTotal();
    },
    stop() {
      refreshTotal();
      multibar.stop();
    },
  };
}
