/**
 * `resolveModel(ref)`: a folder stays a folder; `org/name[@revision]` becomes the snapshot folder in
 * the Hugging Face cache, downloaded first if needed. Works offline (HF_HUB_OFFLINE=1, or the Hub
 * unreachable) from what the cache already holds.
 */
import { stat } from "node:fs/promises";
import { dirname } from "node:path";
import { BlossomError, parameterError } from "../errors.js";
import { HubConnectionError, HubTransientError } from "./api.js";
import { isFile, readRef, RepoCachePaths } from "./cache.js";
import { checkSnapshotFiles } from "./files.js";
import { DEFAULT_REVISION, isCommitHash, parseModelRef, revisionProblem } from "./ref.js";
import { hubCacheDir, hubEndpoint, hubOffline, hubToken } from "./settings.js";
import { downloadSnapshot, type SnapshotDownloadOptions } from "./snapshot.js";

export interface ResolveOptions {
  /** Used when the ref names none; a ref's own `@revision` must agree with it. Default "main". */
  revision?: string;
  /** Default HF_TOKEN, HUGGING_FACE_HUB_TOKEN, then the saved login token. "" sends none. */
  token?: string;
  /** Default HF_ENDPOINT, then https://huggingface.co. */
  endpoint?: string;
  /** Default HF_HUB_CACHE, then $HF_HOME/hub, then ~/.cache/huggingface/hub. */
  cacheDir?: string;
  /** Default HF_HUB_OFFLINE. */
  offline?: boolean;
  signal?: AbortSignal;
  /** Progress bars on stderr; default: when stderr is a terminal. */
  progress?: boolean;
}

export interface ResolvedModel {
  /** The folder holding config.json, the tokenizer files and the safetensors weights. */
  dir: string;
  repoId?: string;
  commit?: string;
  /** True when no file had to be downloaded (false for a plain folder, which is not the cache). */
  fromCache: boolean;
  /** Files and bytes that came over the network in this call (for a summary line). */
  downloadedFiles?: string[];
  downloadedBytes?: number;
}

/** Testing seams beyond the public options (retry pacing, a fake `statfs`). */
export type ResolveInternals = Pick<SnapshotDownloadOptions, "concurrency" | "attempts" | "retryDelayMs" | "idleTimeoutMs" | "fetch" | "freeBytes">;

async function isDirectory(path: string): Promise<boolean> {
  try {
    return (await stat(path)).isDirectory();
  } catch {
    return false;
  }
}

type CacheLookup = { ok: true; dir: string; commit: string; complete: boolean } | { ok: false; reason: string };

/** The cached snapshot for `revision`, and whether it holds what inference needs. */
async function lookInCache(paths: RepoCachePaths, revision: string): Promise<CacheLookup> {
  const commit = await readRef(paths, revision);
  if (commit === undefined) return { ok: false, reason: `no refs/${revision} in ${paths.root}, so the revision was never downloaded` };
  const dir = paths.snapshot(commit);
  if (!(await isDirectory(dir))) return { ok: false, reason: `no snapshot folder ${dir}` };
  const check = await checkSnapshotFiles(
    dir,
    (name) => isFile(paths.pointer(commit, name)),
    (name) => isFile(paths.noExist(commit, name)),
  );
  if (check.missingRequired.length > 0) {
    return { ok: false, reason: `snapshot ${commit} lacks ${check.missingRequired.join(", ")}` };
  }
  return { ok: true, dir, commit, complete: check.unknownOptional.length === 0 };
}

export async function resolveModel(ref: string, options: ResolveOptions & ResolveInternals = {}): Promise<ResolvedModel> {
  if (await isDirectory(ref)) return { dir: ref, fromCache: false };
  if (await isFile(ref)) throw new BlossomError("input", `model '${ref}': is a file; expected a checkpoint folder (config.json, tokenizer.json, *.safetensors) or a Hub id org/name[@revision]`);
  try {
    return await resolveHubModel(ref, options);
  } catch (err) {
    // "runs/bloom-1" where ./runs exists reads as a mistyped folder more likely than as a Hub repo.
    const parent = dirname(ref);
    if (err instanceof BlossomError && err.code === "hub" && parent !== "." && (await isDirectory(parent))) {
      throw new BlossomError("hub", `model '${ref}': no such folder in ${parent}, and as a Hub id: ${err.message}`, { cause: err });
    }
    throw err;
  }
}

async function resolveHubModel(ref: string, options: ResolveOptions & ResolveInternals): Promise<ResolvedModel> {
  const parsed = parseModelRef(ref);
  if (options.revision !== undefined) {
    const problem = revisionProblem(options.revision);
    if (problem !== undefined) throw parameterError("revision", `'${options.revision}': ${problem}`);
    if (parsed.revision !== undefined && parsed.revision !== options.revision) {
      throw parameterError("revision", `'${options.revision}' disagrees with the revision in '${ref}'`);
    }
  }
  const repoId = parsed.repoId;
  const revision = parsed.revision ?? options.revision ?? DEFAULT_REVISION;
  const cacheDir = hubCacheDir(options.cacheDir);
  const paths = new RepoCachePaths(cacheDir, repoId);
  const where = `${repoId}@${revision}`;

  if (hubOffline(options.offline)) {
    const cached = await lookInCache(paths, revision);
    if (cached.ok) return { dir: cached.dir, repoId, commit: cached.commit, fromCache: true };
    throw new BlossomError(
      "hub",
      `${where}: not available offline (HF_HUB_OFFLINE is set): ${cached.reason}. ` +
        `Run \`blossom download ${where}\` with network access first, or unset HF_HUB_OFFLINE.`,
    );
  }

  // A commit never moves: a complete snapshot needs no question to the Hub (huggingface_hub does the same).
  if (isCommitHash(revision)) {
    const cached = await lookInCache(paths, revision);
    if (cached.ok && cached.complete) return { dir: cached.dir, repoId, commit: cached.commit, fromCache: true };
  }

  try {
    const downloaded = await downloadSnapshot({
      repoId,
      revision,
      endpoint: hubEndpoint(options.endpoint),
      token: hubToken(options.token),
      cacheDir,
      signal: options.signal,
      progress: options.progress ?? process.stderr.isTTY === true,
      concurrency: options.concurrency,
      attempts: options.attempts,
      retryDelayMs: options.retryDelayMs,
      idleTimeoutMs: options.idleTimeoutMs,
      fetch: options.fetch,
      freeBytes: options.freeBytes,
    });
    return {
      dir: downloaded.dir,
      repoId,
      commit: downloaded.commit,
      fromCache: downloaded.downloadedFiles.length === 0,
      downloadedFiles: downloaded.downloadedFiles,
      downloadedBytes: downloaded.downloadedBytes,
    };
  } catch (err) {
    if (!(err instanceof HubConnectionError || err instanceof HubTransientError)) throw err;
    // Like huggingface_hub: with the Hub out of reach or failing (5xx, 429 after retries), what the
    // cache holds for this revision will do.
    const cached = await lookInCache(paths, revision);
    if (cached.ok) return { dir: cached.dir, repoId, commit: cached.commit, fromCache: true };
    throw new BlossomError("hub", `${err.message}, and ${where} is not in the cache: ${cached.reason}`, { cause: err });
  }
}
