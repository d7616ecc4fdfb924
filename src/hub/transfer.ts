/**
 * One blob onto disk: streamed into `<blob>.incomplete`, resumed from that file's length with a Range
 * request (after an interruption in this run or a previous one), checked against the Hub's size and
 * etag, and only then renamed into place, so a partial or corrupted file is never used.
 */
import { createHash, type Hash } from "node:crypto";
import { createReadStream } from "node:fs";
import { open, rename, rm, stat } from "node:fs/promises";
import { setTimeout as sleep } from "node:timers/promises";
import { HugePageWriter } from "../checkpoint/huge-page-writer.js";
import { BlossomError } from "../errors.js";
import { abortedError, HubClient, HubConnectionError, HubTransientError, type FileMetadata } from "./api.js";

export interface TransferOptions {
  signal?: AbortSignal | undefined;
  /** Attempts per file for network failures and 5xx answers; each resumes where the last stopped. */
  attempts: number;
  /** Wait before retry k (1-based) is retryDelayMs · 2^(k-1). */
  retryDelayMs: number;
  /** Called with the bytes already on disk when a transfer (re)starts, then with each chunk's size. */
  onBytes?: ((bytes: number, restart: boolean) => void) | undefined;
  /**
   * A transfer that receives nothing (headers or bytes) for this long is abandoned and retried from
   * where it stopped, as huggingface_hub's HF_HUB_DOWNLOAD_TIMEOUT does.
   */
  idleTimeoutMs: number;
}

const WRITE_BATCH_BYTES = 1 << 20;

/**
 * The content check an etag allows: LFS etags are the sha256 of the content, plain git files carry
 * their git blob id (sha1 of "blob <size>\0" + content). Anything else is checked by size only.
 */
function contentHasher(etag: string, size: number | undefined): Hash | undefined {
  if (/^[0-9a-f]{64}$/.test(etag)) return createHash("sha256");
  if (/^[0-9a-f]{40}$/.test(etag) && size !== undefined) return createHash("sha1").update(`blob ${size}\0`);
  return undefined;
}

async function hashExisting(path: string, hasher: Hash | undefined, bytes: number, signal?: AbortSignal): Promise<void> {
  if (hasher === undefined || bytes === 0) return;
  for await (const chunk of createReadStream(path, { start: 0, end: bytes - 1, signal })) hasher.update(chunk as Buffer);
}

/** The connection ended before the whole file arrived, or the server would not resume as asked. */
class PrematureEndError extends Error {}

const NETWORK_ERROR_CODES = new Set(["ECONNRESET", "ECONNREFUSED", "ETIMEDOUT", "EPIPE", "EAI_AGAIN", "ENETUNREACH", "EHOSTUNREACH"]);

function isRetryable(err: unknown): boolean {
  if (err instanceof HubConnectionError || err instanceof HubTransientError || err instanceof PrematureEndError) return true;
  if (err instanceof BlossomError) return false;
  // undici reports a connection dropped mid-body as TypeError("terminated") whose cause is the socket error.
  const code = (err as { code?: unknown } | null)?.code;
  return err instanceof TypeError || (typeof code === "string" && (NETWORK_ERROR_CODES.has(code) || code.startsWith("UND_ERR")));
}

/**
 * Downloads `meta` into `incompletePath`, verifies it and renames it to `blobPath`. Leaves the
 * `.incomplete` file behind on a network failure (to resume later), deletes it on a verification failure.
 */
export async function downloadBlob(
  client: HubClient,
  meta: FileMetadata,
  label: string,
  incompletePath: string,
  blobPath: string,
  options: TransferOptions,
): Promise<void> {
  const hasher = await fillIncomplete(client, meta, label, incompletePath, options);
  await verify(meta, label, incompletePath, hasher);
  await rename(incompletePath, blobPath);
}

/** Gets all of the file into `incompletePath`, resuming after each failure; returns its content hash. */
async function fillIncomplete(
  client: HubClient,
  meta: FileMetadata,
  label: string,
  incompletePath: string,
  options: TransferOptions,
): Promise<Hash | undefined> {
  const { signal } = options;
  const attempts = Math.max(1, options.attempts);
  let lastError: unknown;
  for (let attempt = 1; attempt <= attempts; attempt++) {
    try {
      if (attempt > 1) await sleep(options.retryDelayMs * 2 ** (attempt - 2), undefined, { signal });
      if (signal?.aborted) throw abortedError(label);
      let onDisk = (await stat(incompletePath).catch(() => undefined))?.size ?? 0;
      if (meta.size !== undefined && onDisk > meta.size) {
        await rm(incompletePath, { force: true });
        onDisk = 0;
      }
      const hasher = contentHasher(meta.etag, meta.size);
      if (meta.size !== undefined && onDisk === meta.size) {
        // A previous run got every byte but stopped before the check.
        await hashExisting(incompletePath, hasher, onDisk, signal);
        options.onBytes?.(onDisk, true);
        return hasher;
      }
      const idle = new IdleWatch(options.idleTimeoutMs);
      try {
        await transferOnce(client, meta, label, incompletePath, onDisk, hasher, options, idle);
      } finally {
        idle.stop();
      }
      return hasher;
    } catch (err) {
      if (signal?.aborted) {
        throw new BlossomError("aborted", `${label}: aborted (the partial file is kept and the next run resumes it)`);
      }
      if (!isRetryable(err)) throw err;
      lastError = err;
    }
  }
  const reason = lastError instanceof Error ? lastError.message : String(lastError);
  const kept = ((await stat(incompletePath).catch(() => undefined))?.size ?? 0) > 0;
  throw new BlossomError(
    "hub",
    `${label}: download failed after ${attempts} attempts (${reason}); ` +
      (kept ? `the partial file ${incompletePath} is kept and the next run resumes it` : "nothing was received"),
    { cause: lastError },
  );
}

/** Aborts its signal once `ms` pass without a touch(): a server that has fallen silent. */
class IdleWatch {
  private readonly controller = new AbortController();
  private timer: NodeJS.Timeout | undefined;
  readonly signal = this.controller.signal;

  constructor(private readonly ms: number) {
    this.touch();
  }

  /** (Re)starts the deadline: a wait on the server begins. */
  touch(): void {
    clearTimeout(this.timer);
    this.timer = setTimeout(() => this.controller.abort(new Error(`nothing received for ${this.ms / 1000} s (HF_HUB_DOWNLOAD_TIMEOUT)`)), this.ms);
  }

  /** Pauses the deadline while this process works (hashing, writing). */
  stop(): void {
    clearTimeout(this.timer);
  }
}

/** One GET of the rest of the file, given up when `idle` fires (a server that has fallen silent). */
async function transferOnce(
  client: HubClient,
  meta: FileMetadata,
  label: string,
  incompletePath: string,
  onDisk: number,
  hasher: Hash | undefined,
  options: TransferOptions,
  idle: IdleWatch,
): Promise<void> {
  const headers: Record<string, string> = onDisk > 0 ? { range: `bytes=${onDisk}-` } : {};
  const response = await client.request(meta.downloadUrl, { headers, sendToken: meta.sendToken, signal: idle.signal }, label);
  // Only waits on the server count as its silence: hashing a large partial or writing to disk does not.
  idle.stop();
  let start = onDisk;
  if (response.status === 416) {
    // The server holds fewer bytes than our partial: the partial is not of this file. Start over.
    await response.body?.cancel();
    await rm(incompletePath, { force: true });
    throw new PrematureEndError(`the server refused to resume at byte ${onDisk}`);
  }
  if (!response.ok) {
    if (!meta.sendToken) throw await client.downloadError(response, label, meta.downloadUrl);
    throw await client.responseError(response, { repoId: meta.repoId, filename: meta.filename, ...(meta.commit !== undefined ? { revision: meta.commit } : {}) });
  }
  if (response.status === 206) {
    const range = /^bytes (\d+)-\d+\/(\d+|\*)$/.exec(response.headers.get("content-range") ?? "");
    if (range === null || Number(range[1]) !== onDisk) {
      await response.body?.cancel();
      await rm(incompletePath, { force: true });
      throw new PrematureEndError(`the server answered a different range (${response.headers.get("content-range")})`);
    }
  } else {
    start = 0; // a 200 answer sends the whole file, whatever we asked
  }
  if (start === 0 && onDisk > 0) {
    await rm(incompletePath, { force: true });
  } else {
    await hashExisting(incompletePath, hasher, start, options.signal);
  }
  options.onBytes?.(start, true);

  const file = await open(incompletePath, start === 0 ? "w" : "r+");
  // Written in aligned 2 MiB pieces, so the checkpoint lands in the page cache as huge folios.
  const out = new HugePageWriter(file, start);
  let received = 0;
  try {
    if (response.body === null) throw new PrematureEndError("empty response body");
    let batch: Buffer[] = [];
    let batchBytes = 0;
    const flush = async (): Promise<void> => {
      if (batchBytes === 0) return;
      const data = batch.length === 1 ? batch[0]! : Buffer.concat(batch, batchBytes);
      await out.write(data);
      hasher?.update(data);
      options.onBytes?.(data.length, false);
      received += data.length;
      batch = [];
      batchBytes = 0;
    };
    const chunks = (response.body as AsyncIterable<Uint8Array>)[Symbol.asyncIterator]();
    for (;;) {
      let next: IteratorResult<Uint8Array>;
      try {
        idle.touch();
        next = await chunks.next();
        idle.stop();
      } catch (err) {
        // What arrived before the connection dropped is a valid prefix: keep it for the resume.
        await flush();
        if (options.signal?.aborted) throw err;
        const cause = idle.signal.aborted ? String((idle.signal.reason as Error).message) : ((err as { cause?: { message?: string } }).cause?.message ?? (err as Error).message);
        const of = meta.size === undefined ? "" : ` of ${meta.size}`;
        throw new PrematureEndError(`connection lost at byte ${start + received}${of}: ${cause}`);
      }
      if (next.done === true) break;
      const chunk = next.value;
      batch.push(Buffer.from(chunk.buffer, chunk.byteOffset, chunk.byteLength));
      batchBytes += chunk.byteLength;
      if (batchBytes >= WRITE_BATCH_BYTES) await flush();
    }
    await flush();
  } finally {
    // What was received before a failure is a valid prefix: it goes to disk for the resume.
    await out.flush().finally(() => file.close());
  }
  if (meta.size !== undefined && start + received < meta.size) {
    throw new PrematureEndError(`connection ended at byte ${start + received} of ${meta.size}`);
  }
}

async function verify(meta: FileMetadata, label: string, incompletePath: string, hasher: Hash | undefined): Promise<void> {
  const size = (await stat(incompletePath)).size;
  if (hasher === undefined && meta.size === undefined && /^[0-9a-f]{40}$/.test(meta.etag)) {
    // No size was announced, so the git blob id (which starts with the size) is computed from what arrived.
    hasher = createHash("sha1").update(`blob ${size}\0`);
    await hashExisting(incompletePath, hasher, size);
  }
  const rejected = async (why: string): Promise<never> => {
    await rm(incompletePath, { force: true });
    throw new BlossomError(
      "hub",
      `${label}: downloaded file rejected: ${why}; the partial file was deleted, run the command again`,
    );
  };
  if (meta.size !== undefined && size !== meta.size) await rejected(`size ${size} bytes, expected ${meta.size}`);
  if (hasher !== undefined) {
    const digest = hasher.digest("hex");
    if (digest !== meta.etag) {
      await rejected(`${digest.length === 64 ? "sha256" : "git sha1"} ${digest}, expected ${meta.etag} (the Hub's ETag)`);
    }
  }
}
