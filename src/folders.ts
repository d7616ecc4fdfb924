/**
 * Creating folders: one level at a time, because Node's recursive mkdir (sync and async) loops
 * forever when a parent cannot hold folders (e.g. under /proc), where a plain mkdir fails at once
 * with the reason. Synchronous everywhere (the Hub client's too): a few mkdir calls take microseconds.
 */
import { createHash, randomBytes } from "node:crypto";
import { existsSync, mkdirSync, readdirSync, realpathSync, renameSync, rmSync, statSync } from "node:fs";
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

/** A short tag of this machine's name: partial folders record it, so a host only cleans up its own. */
const hostTag = createHash("sha256").update(hostname()).digest("hex").slice(0, 6);

function escapeRegExp(text: string): string {
  return text.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
}

/**
 * A new, empty folder to write `target` into before renaming it into place
 * (`<target>.partial-<host>-<pid>-<random>`: unique to this call, even among calls in one process);
 * first removes such folders that processes of this host which no longer run left beside it (a run
 * killed mid-write would otherwise leave its partial copy forever). Only names of exactly that form
 * are touched, and never another host's (a cache shared over the network).
 */
export function partialFolderFor(target: string): string {
  const real = resolve(target);
  const parent = dirname(real);
  const base = basename(real);
  createFolder(parent);
  const ours = new RegExp(`^${escapeRegExp(base)}\\.partial-([0-9a-f]{6})-(\\d+)-[0-9a-f]{8}$`);
  for (const name of readdirSync(parent)) {
    const m = ours.exec(name);
    if (!m || m[1] !== hostTag) continue;
    const pid = Number(m[2]);
    if (pid !== process.pid && !processAlive(pid)) rmSync(join(parent, name), { recursive: true, force: true });
  }
  const work = join(parent, `${base}.partial-${hostTag}-${process.pid}-${randomBytes(4).toString("hex")}`);
  mkdirSync(work);
  return work;
}

/** An output folder being written: `work` is where its files go; `commit` puts them at the target. */
export interface OutputFolder {
  /** The target, with symlinks resolved. */
  readonly target: string;
  readonly work: string;
  /**
   * Puts the written folder in place: a rename over a missing or empty target; file by file into an
   * empty target that cannot be replaced (a mount point, the working folder). Returns false, and
   * leaves `work` as it is, when the target holds files by now (another writer's, or earlier ones).
   */
  commit(): boolean;
  /** Moves each file of `work` into the non-empty target (replacing those of the same name), then removes `work`. */
  mergeInto(): void;
  /** Removes what was written. */
  abort(): void;
}

function isEmptyFolder(path: string): boolean {
  try {
    return statSync(path).isDirectory() && readdirSync(path).length === 0;
  } catch {
    return false;
  }
}

/**
 * Begins writing a folder at `target` (a new or empty folder, or one the caller will merge into):
 * written aside and renamed into place, so an interrupted run leaves nothing half-written there and
 * two writers never mix files. An empty target on another filesystem than its parent (a mounted
 * volume) is written in place, since nothing can be renamed onto it.
 */
export function beginOutput(target: string): OutputFolder {
  const real = existsSync(target) ? realpathSync(target) : resolve(target);
  if (isEmptyFolder(real) && statSync(real).dev !== statSync(dirname(real)).dev) {
    return {
      target: real,
      work: real,
      commit: () => true,
      mergeInto: () => undefined,
      abort: () => {
        for (const name of readdirSync(real)) rmSync(join(real, name), { recursive: true, force: true });
      },
    };
  }
  const work = partialFolderFor(real);
  const moveEach = () => {
    for (const name of readdirSync(work)) renameSync(join(work, name), join(real, name));
    rmSync(work, { recursive: true, force: true });
  };
  return {
    target: real,
    work,
    commit: () => {
      try {
        renameSync(work, real);
        return true;
      } catch (err) {
        const code = (err as NodeJS.ErrnoException).code;
        if (code === "ENOTEMPTY" || code === "EEXIST") return false;
        // An empty target that cannot be replaced (EBUSY: the working folder; ENOTDIR: a link).
        if (isEmptyFolder(real)) {
          moveEach();
          return true;
        }
        throw err;
      }
    },
    mergeInto: moveEach,
    abort: () => rmSync(work, { recursive: true, force: true }),
  };
}
