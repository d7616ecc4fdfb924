/**
 * One writer per blob. Tensor-parallel ranks (and two shells) resolve the same model at the same
 * time; without a lock they would append to the same `.incomplete` file. huggingface_hub uses
 * `flock` on `.locks/<repo>/<etag>.lock`, which Node cannot take, so Blossom keeps its own lock file
 * beside it: created exclusively, holding the owner's pid and host, touched while held, and taken
 * over when the owner is gone (same host, dead pid) or has not touched it for a minute.
 */
import { createFolder, processAlive } from "../folders.js";
import { hostname } from "node:os";
import { open, readFile, rm, stat, utimes } from "node:fs/promises";
import { dirname } from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import { abortedError } from "./api.js";

const POLL_MS = 200;
const TOUCH_MS = 10_000;
const STALE_MS = 60_000;

interface LockOwner {
  pid: number;
  host: string;
}


async function isStale(lockPath: string): Promise<boolean> {
  try {
    const [text, info] = await Promise.all([readFile(lockPath, "utf8"), stat(lockPath)]);
    if (Date.now() - info.mtimeMs > STALE_MS) return true;
    let owner: LockOwner;
    try {
      owner = JSON.parse(text) as LockOwner;
    } catch {
      // Being written this instant, or garbage: the age test above will decide later.
      return false;
    }
    return owner.host === hostname() && !processAlive(owner.pid);
  } catch {
    return false; // gone already: the next attempt to create it will tell
  }
}

/**
 * Runs `fn` holding the lock at `lockPath`, waiting (abortably) while another live owner holds it.
 * The wait ends when that owner finishes, dies or stops touching the lock.
 */
export async function withFileLock<T>(lockPath: string, what: string, signal: AbortSignal | undefined, fn: () => Promise<T>): Promise<T> {
  createFolder(dirname(lockPath));
  for (;;) {
    if (signal?.aborted) throw abortedError(what);
    try {
      const handle = await open(lockPath, "wx");
      await handle.writeFile(JSON.stringify({ pid: process.pid, host: hostname() } satisfies LockOwner));
      await handle.close();
      break;
    } catch (err) {
      if ((err as { code?: string }).code !== "EEXIST") throw err;
    }
    if (await isStale(lockPath)) {
      await rm(lockPath, { force: true });
      continue;
    }
    try {
      await sleep(POLL_MS, undefined, { signal });
    } catch {
      throw abortedError(what);
    }
  }
  const toucher = setInterval(() => {
    const now = new Date();
    utimes(lockPath, now, now).catch(() => undefined);
  }, TOUCH_MS);
  toucher.unref();
  try {
    return await fn();
  } finally {
    clearInterval(toucher);
    await rm(lockPath, { force: true });
  }
}
