/**
 * Creating folders: one level at a time, because Node's recursive mkdir (sync and async) loops
 * forever when a parent cannot hold folders (e.g. under /proc), where a plain mkdir fails at once
 * with the reason. Synchronous everywhere (the Hub client's too): a few mkdir calls take microseconds.
 */
import { createHash, randomBytes } from "node:crypto";
import { existsSync, lstatSync, mkdirSync, readdirSync, readFileSync, readlinkSync, realpathSync, renameSync, rmSync, statSync } from "node:fs";
import { BlossomError } from "./errors.js";
import { withFileLock } from "./hub/lock.js";
import { hostname } from "node:os";
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
 * A tag of this machine and process namespace (hostname, boot, pid namespace): partial folders
 * record it, so a writer only removes leftovers whose pid it can check (not another host's on a
 * shared cache, nor a container's with the same hostname).
 */
const hostTag = (() => {
  const read = (path: string, link = false) => {
    try {
      return link ? readlinkSync(path) : readFileSync(path, "utf8").trim();
    } catch {
      return "";
    }
  };
  const identity = `${hostname()}\n${read("/proc/sys/kernel/random/boot_id")}\n${read("/proc/self/ns/pid", true)}`;
  return createHash("sha256").update(identity).digest("hex").slice(0, 6);
})();

function escapeRegExp(text: string): string {
  return text.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
}

/** Names of partial folders: `<base>.partial-<tag>-<pid>-<random>` beside a target, `.partial-…` inside one. */
const partialName = (base: string) => new RegExp(`^${escapeRegExp(base)}\\.partial-([0-9a-f]{6})-(\\d+)-[0-9a-f]{8}$`);
/** The lock an existing target holds inside itself while files are put in place (its parent may be read-only). */
const insideLock = ".blossom-output.lock";
/** Whether `name` is what output folders keep inside a target while writing (a partial folder, the lock). */
export const isInsidePartial = (name: string): boolean => name === insideLock || partialName("").test(name);

/** Removes partial folders for `base` in `parent` that dead processes of this machine left (exact names only). */
function removeDeadPartials(parent: string, base: string): void {
  const pattern = partialName(base);
  let names: string[];
  try {
    names = readdirSync(parent);
  } catch {
    return;
  }
  for (const name of names) {
    const m = pattern.exec(name);
    if (!m || m[1] !== hostTag) continue;
    const pid = Number(m[2]);
    if (pid !== process.pid && !processAlive(pid)) rmSync(join(parent, name), { recursive: true, force: true });
  }
}

/** Removes what dead writers of `target` left beside it (e.g. before reusing a finished cache entry). */
export function removeDeadPartialsOf(target: string): void {
  const real = resolve(target);
  removeDeadPartials(dirname(real), basename(real));
  removeDeadPartials(real, "");
}

function newPartial(parent: string, base: string): string {
  removeDeadPartials(parent, base);
  const work = join(parent, `${base}.partial-${hostTag}-${process.pid}-${randomBytes(4).toString("hex")}`);
  mkdirSync(work);
  return work;
}

/** An output folder being written: `work` is where its files go until `place` puts them at the target. */
export interface OutputFolder {
  /** The target, with symlinks resolved. */
  readonly target: string;
  readonly work: string;
  /**
   * Puts the written files at the target, holding its lock (`<target>/.blossom-output.lock` once it
   * exists, taken inside `<target>.lock` by a writer that began before it did, so any two writers
   * exclude each other; inside, the target's parent need not be writable): all of them when the
   * target is missing or holds nothing else; when it holds other files, only if `accept(others)`
   * says so (checked under the lock), file by file (each replacing its name), then `merge` (which can
   * remove stale files). Returns false, having put nothing, when not accepted.
   */
  place(options?: { accept: (others: string[]) => boolean; merge: (target: string) => Promise<void> }): Promise<boolean>;
  /** Removes what was written (only that). */
  abort(): void;
}

/**
 * Begins writing a folder at `target`. A missing target is written beside it and renamed into
 * place (a half-written folder never appears under its name). An existing folder (empty, an earlier
 * output, a symlink's folder, a mounted volume, the working folder) keeps its identity, mode and
 * other files: the files are staged in a hidden partial folder inside it (the same filesystem) and
 * moved up one by one. Two writers of one target never mix files: placing holds its lock.
 */
export function beginOutput(target: string): OutputFolder {
  if (!existsSync(target) && lstatSync(target, { throwIfNoEntry: false })?.isSymbolicLink()) {
    throw new BlossomError("parameter", `out: ${target} is a symbolic link to nothing (${readlinkSync(target)})`);
  }
  const real = existsSync(target) ? realpathSync(target) : resolve(target);
  if (existsSync(real) && !statSync(real).isDirectory()) throw new BlossomError("parameter", `out: ${real} exists and is not a folder`);
  const inside = existsSync(real);
  if (!inside) createFolder(dirname(real));
  const work = inside ? newPartial(real, "") : newPartial(dirname(real), basename(real));
  const moveUp = () => {
    for (const name of readdirSync(work)) renameSync(join(work, name), join(real, name));
    rmSync(work, { recursive: true, force: true });
  };
  return {
    target: real,
    work,
    place: (options) => {
      const intoExisting = () =>
        withFileLock(join(real, insideLock), real, undefined, async () => {
          const others = readdirSync(real).filter((name) => !isInsidePartial(name));
          if (others.length > 0 && !options?.accept(others)) return false;
          moveUp();
          if (others.length > 0) await options!.merge(real);
          return true;
        });
      if (inside) return intoExisting();
      return withFileLock(`${real}.lock`, real, undefined, async () => {
        if (!existsSync(real)) {
          // Atomic: it fails (ENOTEMPTY) rather than land on a folder another writer filled meanwhile.
          renameSync(work, real);
          return true;
        }
        return intoExisting();
      });
    },
    abort: () => rmSync(work, { recursive: true, force: true }),
  };
}
