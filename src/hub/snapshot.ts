/**
 * Fetching the files inference needs at one revision into the cache: resolve the revision to a
 * commit, pick the files, ask the Hub for each missing file's etag and size, check free space, then
 * download a few at a time and link them into `snapshots/<commit>/`.
 */
import { createFolder } from "../folders.js";
import { readFile, statfs } from "node:fs/promises";
import { dirname } from "node:path";
import { BlossomError } from "../errors.js";
import { HubClient, type FileMetadata } from "./api.js";
import { fileSize, isFile, linkPointer, markNoExist, RepoCachePaths, writeRef } from "./cache.js";
import { planFiles, shardsFromIndex } from "./files.js";
import { withFileLock } from "./lock.js";
import { formatBytes, silentProgress, terminalProgress, type DownloadProgress } from "./progress.js";
import { checkRelativeFilename, isCommitHash } from "./ref.js";
import { downloadBlob } from "./transfer.js";
import { hubDownloadTimeoutMs } from "./settings.js";

export interface SnapshotDownloadOptions {
  repoId: string;
  revision: string;
  endpoint: string;
  token: string | undefined;
  cacheDir: string;
  signal?: AbortSignal | undefined;
  /** Draw progress bars (the caller decides whether stderr is a terminal). */
  progress: boolean;
  /** Files transferred at once. */
  concurrency?: number;
  /** Attempts per file before giving up (each resumes the last). */
  attempts?: number;
  retryDelayMs?: number;
  /** Silence after which a transfer is retried (default: HF_HUB_DOWNLOAD_TIMEOUT, 10 s). */
  idleTimeoutMs?: number;
  fetch?: typeof fetch;
  /** Free bytes where the cache lives; `fs.statfs` unless a test says otherwise. */
  freeBytes?: (dir: string) => Promise<number>;
}

export interface SnapshotDownloadResult {
  dir: string;
  commit: string;
  /** Files whose contents came over the network in this call. */
  downloadedFiles: string[];
  downloadedBytes: number;
}

const DEFAULT_CONCURRENCY = 4;
const METADATA_CONCURRENCY = 8;
const DEFAULT_ATTEMPTS = 3;
const DEFAULT_RETRY_DELAY_MS = 1_000;

/**
 * Runs `task` over `items`, at most `limit` at once. After a failure no new task starts, the ones
 * running finish (a half-done shard is worth keeping for resume), then the first error is thrown.
 */
export async function runPool<T, R>(items: readonly T[], limit: number, task: (item: T) => Promise<R>): Promise<R[]> {
  const results: R[] = new Array(items.length);
  let next = 0;
  let failure: { error: unknown } | undefined;
  const worker = async (): Promise<void> => {
    while (failure === undefined && next < items.length) {
      const index = next++;
      try {
        results[index] = await task(items[index]!);
      } catch (error) {
        failure ??= { error };
      }
    }
  };
  await Promise.all(Array.from({ length: Math.min(limit, items.length) }, worker));
  if (failure !== undefined) throw failure.error;
  return results;
}

async function freeBytesOnDisk(dir: string): Promise<number> {
  const info = await statfs(dir);
  return info.bavail * info.bsize;
}

interface BlobJob {
  meta: FileMetadata;
  /** Every file of the snapshot with this content (the same blob can back several names). */
  filenames: string[];
}

export async function downloadSnapshot(options: SnapshotDownloadOptions): Promise<SnapshotDownloadResult> {
  const { repoId, revision, signal } = options;
  const client = new HubClient({ endpoint: options.endpoint, token: options.token, signal, fetch: options.fetch, attempts: options.attempts, retryDelayMs: options.retryDelayMs });
  const where = `${repoId}@${revision}`;
  const info = await client.revisionInfo(repoId, revision);
  const commit = info.sha;
  for (const name of info.siblings) checkRelativeFilename(name, `${where} file list`);
  const plan = planFiles(info.siblings, where);

  const paths = new RepoCachePaths(options.cacheDir, repoId);
  createFolder(paths.snapshot(commit));
  await writeRef(paths, revision, commit);
  for (const name of plan.absentFiles) await markNoExist(paths, commit, name);

  const result: SnapshotDownloadResult = { dir: paths.snapshot(commit), commit, downloadedFiles: [], downloadedBytes: 0 };
  const fetchFiles = async (filenames: string[], showProgress: boolean): Promise<void> => {
    const fetched = await fetchIntoSnapshot(client, paths, commit, filenames, options, showProgress);
    result.downloadedFiles.push(...fetched.files);
    result.downloadedBytes += fetched.bytes;
  };

  let weightFiles: string[];
  if (plan.weights.kind === "sharded") {
    const index = plan.weights.index;
    await fetchFiles([index], false);
    const indexPath = paths.pointer(commit, index);
    const shards = shardsFromIndex(await readFile(indexPath, "utf8"), `${where}/${index}`);
    const listed = new Set(info.siblings);
    const absent = shards.filter((shard) => !listed.has(shard));
    if (absent.length > 0) {
      throw new BlossomError("hub", `${where}/${index}: names shard(s) the repo does not have: ${absent.join(", ")}`);
    }
    weightFiles = shards;
  } else {
    weightFiles = [plan.weights.file];
  }
  await fetchFiles([...plan.baseFiles, ...weightFiles], options.progress);
  return result;
}

async function fetchIntoSnapshot(
  client: HubClient,
  paths: RepoCachePaths,
  commit: string,
  filenames: string[],
  options: SnapshotDownloadOptions,
  showProgress: boolean,
): Promise<{ files: string[]; bytes: number }> {
  const { repoId, signal } = options;
  const missing: string[] = [];
  for (const name of filenames) if (!(await isFile(paths.pointer(commit, name)))) missing.push(name);
  if (missing.length === 0) return { files: [], bytes: 0 };

  const metas = await runPool(missing, METADATA_CONCURRENCY, (name) => client.fileMetadata(repoId, commit, name));
  const jobs = new Map<string, BlobJob>();
  for (const meta of metas) {
    if (meta.commit !== undefined && isCommitHash(meta.commit) && meta.commit !== commit) {
      throw new BlossomError("hub", `${repoId}/${meta.filename}: the Hub served commit ${meta.commit} when asked for ${commit}`);
    }
    const job = jobs.get(meta.etag);
    if (job === undefined) jobs.set(meta.etag, { meta, filenames: [meta.filename] });
    else job.filenames.push(meta.filename);
  }

  // Blobs already in the cache (another revision, or Python's huggingface_hub) only need links.
  const toDownload: BlobJob[] = [];
  for (const job of jobs.values()) {
    if (await isFile(paths.blob(job.meta.etag))) {
      for (const name of job.filenames) await linkPointer(paths.blob(job.meta.etag), paths.pointer(commit, name));
    } else {
      toDownload.push(job);
    }
  }
  if (toDownload.length === 0) return { files: [], bytes: 0 };

  createFolder(dirname(paths.blob("x")));
  let totalBytes = 0;
  let neededBytes = 0;
  for (const { meta } of toDownload) {
    const size = meta.size ?? 0;
    const partial = (await fileSize(paths.incomplete(meta.etag))) ?? 0;
    totalBytes += size;
    neededBytes += partial <= size ? size - partial : size;
  }
  const available = await (options.freeBytes ?? freeBytesOnDisk)(paths.root);
  if (neededBytes > available) {
    throw new BlossomError(
      "hub",
      `${repoId}: not enough free space in ${options.cacheDir}: the download needs ${formatBytes(neededBytes)} ` +
        `(${neededBytes} bytes) but ${formatBytes(available)} (${available} bytes) are available`,
    );
  }

  const progress: DownloadProgress = showProgress ? terminalProgress(totalBytes, toDownload.length) : silentProgress;
  let bytes = 0;
  const files: string[] = [];
  try {
    await runPool(toDownload, options.concurrency ?? DEFAULT_CONCURRENCY, async ({ meta, filenames }) => {
      const name = filenames[0]!;
      const label = `${repoId}/${name}`;
      const blob = paths.blob(meta.etag);
      await withFileLock(paths.lock(meta.etag), label, signal, async () => {
        if (await isFile(blob)) return; // another process finished it while we waited
        await downloadBlob(client, meta, label, paths.incomplete(meta.etag), blob, {
          signal,
          attempts: options.attempts ?? DEFAULT_ATTEMPTS,
          retryDelayMs: options.retryDelayMs ?? DEFAULT_RETRY_DELAY_MS,
          idleTimeoutMs: options.idleTimeoutMs ?? hubDownloadTimeoutMs(),
          onBytes: (count, restart) => {
            if (restart) {
              progress.fileStarted(name, meta.size, count);
            } else {
              bytes += count;
              progress.bytes(name, count);
            }
          },
        });
        files.push(...filenames);
      });
      for (const filename of filenames) await linkPointer(blob, paths.pointer(commit, filename));
      progress.fileDone(name);
    });
  } finally {
    progress.stop();
  }
  return { files, bytes };
}
