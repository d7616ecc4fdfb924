/**
 * Creating folders: one level at a time, because Node's recursive mkdir (sync and async) loops
 * forever when a parent cannot hold folders (e.g. under /proc), where a plain mkdir fails at once
 * with the reason. Synchronous everywhere (the Hub client's too): a few mkdir calls take microseconds.
 */
import { randomBytes } from "node:crypto";
import { existsSync, mkdirSync, readdirSync, rmSync, statSync } from "node:fs";
import { basename, dirname, join, resolve } from "node:path";

/** The folders to create, outermost first: `path` and its missing parents. */
function missingFolders(path: string, exists: (p: string) => boolean): string[] {
  const missing: string[] = [];
  for (let p = resolve(path); !exists(p); ) {
    missing.push(p);
    const parent = dirname(p);
    if (parent === p) break;
    p = parent;
  }
  return missing.reverse();
}

function notAFolder(path: string): NodeJS.ErrnoException {
  const e = new Error(`ENOTDIR: not a directory, mkdir '${path}'`) as NodeJS.ErrnoException;
  e.code = "ENOTDIR";
  e.syscall = "mkdir";
  return e;
}

/** mkdir -p that fails (ENOENT, EPERM, ENOTDIR, ...) instead of hanging. */
export function createFolder(path: string): void {
  for (const dir of missingFolders(path, existsSync)) {
    try {
      mkdirSync(dir);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== "EEXIST") throw err;
    }
  }
  if (!statSync(path).isDirectory()) throw notAFolder(resolve(path));
}

/** Whether a process with this pid runs on this machine. */
export function processAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === "EPERM";
  }
}

/**
 * A new, empty folder to write `target` into before renaming it into place
 * (`<target>.partial-<pid>-<random>`: unique to this call, even among calls in one process); first
 * removes such folders that processes which no longer run left beside it (a run killed mid-write
 * would otherwise leave its partial copy forever).
 */
export function partialFolderFor(target: string): string {
  const parent = dirname(resolve(target));
  const prefix = `${basename(resolve(target))}.partial-`;
  createFolder(parent);
  for (const name of readdirSync(parent)) {
    if (!name.startsWith(prefix)) continue;
    const pid = Number(name.slice(prefix.length).split("-")[0]);
    if (Number.isInteger(pid) && pid > 0 && pid !== process.pid && !processAlive(pid)) rmSync(join(parent, name), { recursive: true, force: true });
  }
  const work = join(parent, `${prefix}${process.pid}-${randomBytes(4).toString("hex")}`);
  mkdirSync(work);
  return work;
}
