/** `blossom download` and `blossom cache ls|rm`: the Hugging Face cache from the command line. */
import { BlossomError } from "../../errors.js";
import { existsSync, statSync } from "node:fs";
import type { Command } from "commander";
import { removeFromCache, scanCache, scanRepo, type CachedRepo } from "../../hub/cache.js";
import { formatBytes } from "../../hub/progress.js";
import { parseModelRef } from "../../hub/ref.js";
import { resolveModel } from "../../hub/resolve.js";
import { hubCacheDir } from "../../hub/settings.js";

/** Where the Hub cache is, as src/hub/settings.ts resolves it. */
const cacheDirHelp = "cache folder (default: $HF_HUB_CACHE, else $HUGGINGFACE_HUB_CACHE, else $HF_HOME/hub; HF_HOME defaults to $XDG_CACHE_HOME/huggingface, else ~/.cache/huggingface)";

interface DownloadFlags {
  revision?: string;
  cacheDir?: string;
  token?: string;
  quiet?: boolean;
}

/** Left-aligned columns, two spaces apart. */
function table(rows: string[][]): string {
  const widths = rows[0]!.map((_, column) => Math.max(...rows.map((row) => row[column]!.length)));
  return rows.map((row) => row.map((cell, column) => (column === row.length - 1 ? cell : cell.padEnd(widths[column]!))).join("  ")).join("\n");
}

function describeCache(repos: CachedRepo[], cacheDir: string): string {
  if (repos.length === 0) return `no models in the cache ${cacheDir}`;
  const rows = [["REPO", "REVISION", "REFS", "FILES", "SIZE", "PATH"]];
  for (const repo of repos) {
    const partial = repo.incompleteSize > 0 ? ` (+${formatBytes(repo.incompleteSize)} partial)` : "";
    rows.push([repo.repoId, "", "", "", formatBytes(repo.size) + partial, repo.path]);
    for (const revision of repo.revisions) {
      rows.push(["", revision.commit, revision.refs.join(",") || "-", String(revision.files), formatBytes(revision.size), revision.path]);
    }
  }
  const revisions = repos.reduce((count, repo) => count + repo.revisions.length, 0);
  const total = repos.reduce((sum, repo) => sum + repo.size + repo.incompleteSize, 0);
  return `${table(rows)}\n\n${repos.length} repo(s), ${revisions} revision(s), ${formatBytes(total)} on disk in ${cacheDir}`;
}

export function registerHubCommands(program: Command): void {
  program
    .command("download <ref>")
    .description("fetch a model (org/name[@revision]) from the Hugging Face Hub into the cache and print its folder")
    .option("--revision <revision>", "branch, tag or commit (default: the @revision in <ref>, else main)")
    .option("--cache-dir <dir>", cacheDirHelp)
    .option("--token <token>", "access token for gated or private repos (default: $HF_TOKEN, else $HUGGING_FACE_HUB_TOKEN, else the saved login)")
    .option("-q, --quiet", "print only the folder")
    .action(async (ref: string, flags: DownloadFlags) => {
      const controller = new AbortController();
      const onInterrupt = (): void => controller.abort();
      process.once("SIGINT", onInterrupt);
      const started = performance.now();
      try {
        const model = await resolveModel(ref, {
          revision: flags.revision,
          cacheDir: flags.cacheDir,
          token: flags.token,
          signal: controller.signal,
          progress: flags.quiet !== true && process.stderr.isTTY === true,
        });
        if (flags.quiet !== true && model.repoId !== undefined) {
          const seconds = ((performance.now() - started) / 1000).toFixed(1);
          const files = model.downloadedFiles ?? [];
          const what =
            files.length > 0
              ? `downloaded ${files.length} file(s), ${formatBytes(model.downloadedBytes ?? 0)} in ${seconds} s`
              : "already in the cache";
          process.stderr.write(`${model.repoId} @ ${model.commit}: ${what}\n`);
        }
        process.stdout.write(`${model.dir}\n`);
      } finally {
        process.off("SIGINT", onInterrupt);
      }
    });

  const cache = program.command("cache").description("show and clean the Hugging Face model cache (shared with Python)");
  cache
    .command("ls [repo]")
    .description("list cached models: revisions, refs, size on disk and folders")
    .option("--cache-dir <dir>", cacheDirHelp)
    .action(async (repo: string | undefined, flags: { cacheDir?: string }) => {
      const cacheDir = hubCacheDir(flags.cacheDir);
      if (existsSync(cacheDir) && !statSync(cacheDir).isDirectory()) throw new BlossomError("parameter", `cacheDir: ${cacheDir} is a file, expected the cache folder`);
      let repos: CachedRepo[];
      if (repo === undefined) {
        repos = await scanCache(cacheDir);
      } else {
        const one = await scanRepo(cacheDir, parseModelRef(repo).repoId);
        repos = one === undefined ? [] : [one];
      }
      process.stdout.write(`${describeCache(repos, cacheDir)}\n`);
    });
  cache
    .command("rm <ref>")
    .description("remove a cached model (org/name), or one revision of it (org/name@revision) and the files only it used")
    .option("--cache-dir <dir>", cacheDirHelp)
    .action(async (ref: string, flags: { cacheDir?: string }) => {
      const cacheDir = hubCacheDir(flags.cacheDir);
      const { repoId, revision } = parseModelRef(ref);
      const removed = await removeFromCache(cacheDir, repoId, revision);
      const what = removed.repoRemoved
        ? `${repoId} (${removed.commits.length} revision(s))`
        : `${repoId}@${revision} (commit ${removed.commits[0]}${removed.refs.length > 0 ? `, refs ${removed.refs.join(", ")}` : ""})`;
      process.stdout.write(`removed ${what}: freed ${formatBytes(removed.freedBytes)}\n`);
    });
}
