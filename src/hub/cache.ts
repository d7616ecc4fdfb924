/**
 * The Hugging Face cache layout, byte for byte what huggingface_hub's `file_download.py` writes, so
 * a model fetched by Python is reused here and the other way round:
 *
 *   <cache>/models--org--name/
 *     blobs/<etag>                    file contents, named by the Hub's etag (sha256 for LFS, git sha1 otherwise)
 *     blobs/<etag>.incomplete         a partial download, resumed from its length
 *     snapshots/<commit>/<filename>   relative symlink to ../../blobs/<etag>
 *     refs/<revision>                 the commit a branch or tag pointed to when last resolved
 *     .no_exist/<commit>/<filename>   empty marker: the file is known to be absent at that commit
 *   <cache>/.locks/models--org--name/ lock files (Blossom's are `<etag>.blossom.lock`)
 */
import { createFolder } from "../folders.js";
import { randomBytes } from "node:crypto";
import { constants as fsConstants } from "node:fs";
import { copyFile, lstat, readFile, readdir, realpath, rename, rm, stat, symlink, writeFile } from "node:fs/promises";
import { dirname, join, relative, sep } from "node:path";
import { BlossomError } from "../errors.js";
import { isCommitHash } from "./ref.js";

const REPO_FOLDER_PREFIX = "models--";
const REPO_ID_SEPARATOR = "--";

export function repoFolderName(repoId: string): string {
  return REPO_FOLDER_PREFIX + repoId.split("/").join(REPO_ID_SEPARATOR);
}

export function repoIdFromFolderName(folder: string): string | undefined {
  if (!folder.startsWith(REPO_FOLDER_PREFIX)) return undefined;
  return folder.slice(REPO_FOLDER_PREFIX.length).split(REPO_ID_SEPARATOR).join("/");
}

/** Every path one cached repo uses. */
export class RepoCachePaths {
  readonly root: string;
  readonly lockDir: string;

  constructor(
    readonly cacheDir: string,
    readonly repoId: string,
  ) {
    this.root = join(cacheDir, repoFolderName(repoId));
    this.lockDir = join(cacheDir, ".locks", repoFolderName(repoId));
  }

  blob(etag: string): string {
    return join(this.root, "blobs", etag);
  }
  incomplete(etag: string): string {
    return `${this.blob(etag)}.incomplete`;
  }
  lock(etag: string): string {
    return join(this.lockDir, `${etag}.blossom.lock`);
  }
  snapshot(commit: string): string {
    return join(this.root, "snapshots", commit);
  }
  pointer(commit: string, filename: string): string {
    return join(this.snapshot(commit), ...filename.split("/"));
  }
  ref(revision: string): string {
    return join(this.root, "refs", ...revision.split("/"));
  }
  noExist(commit: string, filename: string): string {
    return join(this.root, ".no_exist", commit, ...filename.split("/"));
  }
}

/** True when `path` (following symlinks) is a regular file. */
export async function isFile(path: string): Promise<boolean> {
  try {
    return (await stat(path)).isFile();
  } catch {
    return false;
  }
}

export async function fileSize(path: string): Promise<number | undefined> {
  try {
    return (await stat(path)).size;
  } catch {
    return undefined;
  }
}

/** The commit `revision` pointed to when last resolved, or undefined when never cached. */
export async function readRef(paths: RepoCachePaths, revision: string): Promise<string | undefined> {
  if (isCommitHash(revision)) return revision;
  try {
    const commit = (await readFile(paths.ref(revision), "utf8")).trim();
    return isCommitHash(commit) ? commit : undefined;
  } catch {
    return undefined;
  }
}

/** Writes refs/<revision> (huggingface_hub writes no ref for a revision that is itself a commit). */
export async function writeRef(paths: RepoCachePaths, revision: string, commit: string): Promise<void> {
  if (revision === commit) return;
  await writeFileAtomic(paths.ref(revision), commit);
}

export async function markNoExist(paths: RepoCachePaths, commit: string, filename: string): Promise<void> {
  const marker = paths.noExist(commit, filename);
  createFolder(dirname(marker));
  await writeFile(marker, "");
}

/**
 * Points snapshots/<commit>/<filename> at its blob with a relative link, as huggingface_hub does (so a
 * moved cache keeps working); copies where the file system has no symlinks. The link is made beside
 * the pointer and renamed over it, so two processes linking the same file never see a missing or
 * half-made pointer (and a copy never writes through an existing link into the blob).
 */
export async function linkPointer(blobPath: string, pointerPath: string): Promise<void> {
  createFolder(dirname(pointerPath));
  const temporary = `${pointerPath}.${process.pid}.${randomBytes(4).toString("hex")}.tmp`;
  try {
    await symlink(relative(dirname(pointerPath), blobPath), temporary);
  } catch {
    await copyFile(blobPath, temporary, fsConstants.COPYFILE_FICLONE);
  }
  await rename(temporary, pointerPath);
}

/** A write that readers never see half done. */
export async function writeFileAtomic(path: string, content: string): Promise<void> {
  createFolder(dirname(path));
  const temporary = `${path}.${process.pid}.${randomBytes(4).toString("hex")}.tmp`;
  await writeFile(temporary, content);
  await rename(temporary, path);
}

// ---------------------------------------------------------------------------------------------
// Listing and removing (`blossom cache ls|rm`)

export interface CachedRevision {
  commit: string;
  /** Branch and tag names whose refs/ file holds this commit. */
  refs: string[];
  path: string;
  files: number;
  /** Bytes of the distinct blobs this revision's files point to. */
  size: number;
}

export interface CachedRepo {
  repoId: string;
  path: string;
  revisions: CachedRevision[];
  /** Bytes on disk: complete blobs plus any files copied into snapshots (no-symlink file systems). */
  size: number;
  /** Bytes held by interrupted downloads (`*.incomplete`), resumed by the next download. */
  incompleteSize: number;
  /** refs/ names whose commit has no snapshot folder. */
  danglingRefs: string[];
}

async function listFilesRecursive(dir: string, prefix = ""): Promise<string[]> {
  let entries;
  try {
    entries = await readdir(dir, { withFileTypes: true });
  } catch {
    return [];
  }
  const out: string[] = [];
  for (const entry of entries) {
    const name = prefix === "" ? entry.name : `${prefix}/${entry.name}`;
    if (entry.isDirectory()) out.push(...(await listFilesRecursive(join(dir, entry.name), name)));
    else out.push(name);
  }
  return out;
}

async function readRefs(paths: RepoCachePaths): Promise<Map<string, string[]>> {
  const byCommit = new Map<string, string[]>();
  for (const name of await listFilesRecursive(join(paths.root, "refs"))) {
    const commit = (await readFile(join(paths.root, "refs", ...name.split("/")), "utf8").catch(() => "")).trim();
    if (!isCommitHash(commit)) continue;
    byCommit.set(commit, [...(byCommit.get(commit) ?? []), name]);
  }
  return byCommit;
}

/** Blobs (real paths) each snapshot's files resolve to; copied files stand for themselves. */
async function snapshotBlobs(paths: RepoCachePaths, commit: string): Promise<{ files: number; blobs: Map<string, number> }> {
  const blobs = new Map<string, number>();
  const names = await listFilesRecursive(paths.snapshot(commit));
  for (const name of names) {
    try {
      const target = await realpath(paths.pointer(commit, name));
      blobs.set(target, (await stat(target)).size);
    } catch {
      // A dangling link (its blob was deleted): the file is simply not cached any more.
    }
  }
  return { files: names.length, blobs };
}

export async function scanRepo(cacheDir: string, repoId: string): Promise<CachedRepo | undefined> {
  const paths = new RepoCachePaths(cacheDir, repoId);
  if (!(await stat(paths.root).catch(() => undefined))?.isDirectory()) return undefined;
  const refsByCommit = await readRefs(paths);
  const revisions: CachedRevision[] = [];
  const onDisk = new Map<string, number>();
  let snapshotDirs: string[] = [];
  try {
    snapshotDirs = (await readdir(join(paths.root, "snapshots"), { withFileTypes: true }))
      .filter((entry) => entry.isDirectory())
      .map((entry) => entry.name)
      .sort();
  } catch {
    // A repo folder with no snapshots yet (e.g. an interrupted first download).
  }
  for (const commit of snapshotDirs) {
    const { files, blobs } = await snapshotBlobs(paths, commit);
    for (const [blob, size] of blobs) onDisk.set(blob, size);
    revisions.push({
      commit,
      refs: (refsByCommit.get(commit) ?? []).sort(),
      path: paths.snapshot(commit),
      files,
      size: [...blobs.values()].reduce((a, b) => a + b, 0),
    });
  }
  let incompleteSize = 0;
  const blobsDir = join(paths.root, "blobs");
  for (const name of await readdir(blobsDir).catch(() => [] as string[])) {
    const info = await lstat(join(blobsDir, name)).catch(() => undefined);
    if (!info?.isFile()) continue;
    if (name.endsWith(".incomplete")) incompleteSize += info.size;
    else onDisk.set(await realpath(join(blobsDir, name)), info.size);
  }
  const danglingRefs = [...refsByCommit.entries()]
    .filter(([commit]) => !snapshotDirs.includes(commit))
    .flatMap(([, names]) => names);
  return {
    repoId,
    path: paths.root,
    revisions,
    size: [...onDisk.values()].reduce((a, b) => a + b, 0),
    incompleteSize,
    danglingRefs,
  };
}

/** Every model repo in the cache (datasets and spaces are not Blossom's concern). */
export async function scanCache(cacheDir: string): Promise<CachedRepo[]> {
  const entries = await readdir(cacheDir, { withFileTypes: true }).catch(() => []);
  const repos: CachedRepo[] = [];
  for (const entry of entries) {
    const repoId = entry.isDirectory() ? repoIdFromFolderName(entry.name) : undefined;
    if (repoId === undefined) continue;
    const repo = await scanRepo(cacheDir, repoId);
    if (repo !== undefined) repos.push(repo);
  }
  return repos.sort((a, b) => a.repoId.localeCompare(b.repoId));
}

export interface RemovalResult {
  repoId: string;
  /** Commits whose snapshots were removed. */
  commits: string[];
  refs: string[];
  freedBytes: number;
  /** True when the whole repo folder went. */
  repoRemoved: boolean;
}

async function resolveCachedCommit(repo: CachedRepo, paths: RepoCachePaths, revision: string): Promise<string> {
  const viaRef = await readRef(paths, revision);
  if (viaRef !== undefined && repo.revisions.some((r) => r.commit === viaRef)) return viaRef;
  // A short hash as `cache ls` prints it, if it names exactly one snapshot.
  const matches = /^[0-9a-f]{7,40}$/.test(revision) ? repo.revisions.filter((r) => r.commit.startsWith(revision)) : [];
  if (matches.length === 1) return matches[0]!.commit;
  const known = repo.revisions.map((r) => (r.refs.length > 0 ? `${r.commit} (${r.refs.join(", ")})` : r.commit));
  throw new BlossomError(
    "hub",
    `${repo.repoId}@${revision}: no such cached revision; cached: ${known.length > 0 ? known.join("; ") : "none"}`,
  );
}

/**
 * Removes a repo, or one revision of it: its snapshot, every ref pointing at it, its .no_exist markers,
 * and the blobs no remaining snapshot uses (the same rule as huggingface_hub's delete strategy).
 */
export async function removeFromCache(cacheDir: string, repoId: string, revision?: string): Promise<RemovalResult> {
  const paths = new RepoCachePaths(cacheDir, repoId);
  const repo = await scanRepo(cacheDir, repoId);
  if (repo === undefined) throw new BlossomError("hub", `${repoId}: not in the cache ${cacheDir}`);
  const removeWholeRepo = async (): Promise<RemovalResult> => {
    await rm(paths.root, { recursive: true, force: true });
    await rm(paths.lockDir, { recursive: true, force: true });
    return {
      repoId,
      commits: repo.revisions.map((r) => r.commit),
      refs: repo.revisions.flatMap((r) => r.refs).concat(repo.danglingRefs),
      freedBytes: repo.size + repo.incompleteSize,
      repoRemoved: true,
    };
  };
  if (revision === undefined) return removeWholeRepo();

  const commit = await resolveCachedCommit(repo, paths, revision);
  const remaining = repo.revisions.filter((r) => r.commit !== commit);
  if (remaining.length === 0) return removeWholeRepo();
  const removed = repo.revisions.find((r) => r.commit === commit)!;

  const stillUsed = new Set<string>();
  for (const other of remaining) for (const blob of (await snapshotBlobs(paths, other.commit)).blobs.keys()) stillUsed.add(blob);
  const { blobs } = await snapshotBlobs(paths, commit);
  const blobsDir = (await realpath(join(paths.root, "blobs")).catch(() => join(paths.root, "blobs"))) + sep;
  let freedBytes = 0;
  for (const [blob, size] of blobs) {
    if (stillUsed.has(blob)) continue;
    if (blob.startsWith(blobsDir)) {
      await rm(blob, { force: true });
    }
    freedBytes += size; // a copied snapshot file is freed by removing the snapshot below
  }
  await rm(paths.snapshot(commit), { recursive: true, force: true });
  await rm(join(paths.root, ".no_exist", commit), { recursive: true, force: true });
  for (const ref of removed.refs) await rm(paths.ref(ref), { force: true });
  return { repoId, commits: [commit], refs: removed.refs, freedBytes, repoRemoved: false };
}
