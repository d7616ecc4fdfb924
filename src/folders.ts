/**
 * Creating folders: one level at a time, because Node's recursive mkdir (sync and async) loops
 * forever when a parent cannot hold folders (e.g. under /proc), where a plain mkdir fails at once
 * with the reason. Synchronous everywhere (the Hub client's too): a few mkdir calls take microseconds.
 */
import { existsSync, mkdirSync, statSync } from "node:fs";
import { dirname, resolve } from "node:path";

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
