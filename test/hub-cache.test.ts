/** `blossom download` and `blossom cache ls|rm`, run as a child process against a fake Hub. */
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { lstat, readdir, stat } from "node:fs/promises";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { afterEach, beforeEach, describe, it } from "node:test";
import { promisify } from "node:util";
import { removeFromCache, scanCache } from "../src/hub/cache.js";
import { resolveModel } from "../src/hub/resolve.js";
import { blobName, GATED_REPO, REPO, sha256, startHubTest, type HubTestContext } from "./helpers/fake-hub.js";

const run = promisify(execFile);
/** A size as formatBytes prints it: "96 B", "1.2 kB", "927 kB". */
const SIZE = String.raw`\d+(?:\.\d)? [kMG]?B`;
const commandsModule = fileURLToPath(new URL("../src/cli/commands/hub.js", import.meta.url));
const errorsModule = fileURLToPath(new URL("../src/errors.js", import.meta.url));
const repoRoot = fileURLToPath(new URL("../../", import.meta.url));

// The lead's main.ts wires registerHubCommands in; this stand-in does the same with main's error handling.
const CLI = `
import { Command } from "commander";
import { registerHubCommands } from ${JSON.stringify(commandsModule)};
import { BlossomError } from ${JSON.stringify(errorsModule)};
const program = new Command().name("blossom").exitOverride();
registerHubCommands(program);
program.parseAsync(process.argv.slice(1), { from: "user" }).catch((err) => {
  process.stderr.write("blossom: " + (err instanceof BlossomError ? err.message : String(err)) + "\\n");
  process.exitCode = 1;
});
`;

interface CliResult {
  code: number;
  stdout: string;
  stderr: string;
}

async function blossom(args: string[], env: Record<string, string> = {}): Promise<CliResult> {
  const cleanEnv = { ...process.env };
  for (const name of ["HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE", "HF_ENDPOINT"]) delete cleanEnv[name];
  try {
    const { stdout, stderr } = await run(process.execPath, ["--input-type=module", "-e", CLI, ...args], {
      cwd: repoRoot,
      env: { ...cleanEnv, HF_HOME: "/nonexistent-blossom-test-home", ...env },
    });
    return { code: 0, stdout, stderr };
  } catch (err) {
    const failed = err as { code?: number; stdout?: string; stderr?: string };
    return { code: failed.code ?? -1, stdout: failed.stdout ?? "", stderr: failed.stderr ?? "" };
  }
}

describe("blossom download / cache", () => {
  let t: HubTestContext;
  let root: string;
  beforeEach(async () => {
    t = await startHubTest();
    root = join(t.cacheDir, "models--blossom-test--tiny-bloom-b");
  });
  afterEach(async () => {
    await t.cleanup();
  });

  it("download prints the snapshot folder on stdout and one summary line on stderr, no progress off a terminal", async () => {
    const first = await blossom(["download", `${REPO}@v1`, "--cache-dir", t.cacheDir], { HF_ENDPOINT: t.hub.url });
    assert.equal(first.code, 0, first.stderr);
    assert.equal(first.stdout, `${join(root, "snapshots", t.v1)}\n`);
    assert.match(first.stderr, new RegExp(`^${REPO} @ ${t.v1}: downloaded 7 file\\(s\\), ${SIZE} in \\d+\\.\\d s\\n$`));

    const second = await blossom(["download", REPO, "--revision", "v1", "--cache-dir", t.cacheDir], { HF_ENDPOINT: t.hub.url });
    assert.equal(second.stdout, first.stdout);
    assert.equal(second.stderr, `${REPO} @ ${t.v1}: already in the cache\n`);

    const quiet = await blossom(["download", REPO, "-q"], { HF_ENDPOINT: t.hub.url, HF_HUB_CACHE: t.cacheDir });
    assert.equal(quiet.stdout, `${join(root, "snapshots", t.main)}\n`);
    assert.equal(quiet.stderr, "");
  });

  it("download fails with exit code 1 and the Hub's advice for a gated repo, and succeeds with --token", async () => {
    const denied = await blossom(["download", GATED_REPO, "--cache-dir", t.cacheDir], { HF_ENDPOINT: t.hub.url });
    assert.equal(denied.code, 1);
    assert.equal(denied.stdout, "");
    assert.match(denied.stderr, /^blossom: blossom-test\/gated-bloom: access denied .* set HF_TOKEN \(or pass --token\)/);
    const allowed = await blossom(["download", GATED_REPO, "--cache-dir", t.cacheDir, "--token", "hf_fake_valid_token"], {
      HF_ENDPOINT: t.hub.url,
    });
    assert.equal(allowed.code, 0, allowed.stderr);
  });

  it("cache ls shows repos, revisions with refs, sizes and folders", async () => {
    const empty = await blossom(["cache", "ls", "--cache-dir", t.cacheDir]);
    assert.equal(empty.stdout, `no models in the cache ${t.cacheDir}\n`);
    await resolveModel(`${REPO}@v1`, t.options);
    await resolveModel(REPO, t.options);
    const listed = await blossom(["cache", "ls", "--cache-dir", t.cacheDir]);
    assert.equal(listed.code, 0, listed.stderr);
    const lines = listed.stdout.trimEnd().split("\n");
    assert.match(lines[0]!, /^REPO\s+REVISION\s+REFS\s+FILES\s+SIZE\s+PATH$/);
    assert.match(lines[1]!, new RegExp(`^${REPO}\\s+${SIZE}\\s+${root}$`));
    const v1Line = lines.find((line) => line.includes(t.v1))!;
    const mainLine = lines.find((line) => line.includes(t.main))!;
    assert.match(v1Line, new RegExp(`^\\s+${t.v1}\\s+v1\\s+7\\s+${SIZE}\\s+${join(root, "snapshots", t.v1)}$`));
    assert.match(mainLine, new RegExp(`^\\s+${t.main}\\s+main\\s+8\\s+${SIZE}\\s+${join(root, "snapshots", t.main)}$`));
    assert.match(lines.at(-1)!, new RegExp(`^1 repo\\(s\\), 2 revision\\(s\\), ${SIZE} on disk in ${t.cacheDir}$`));

    // Size on disk counts each shared blob once.
    const [repo] = await scanCache(t.cacheDir);
    const distinct = new Set<string>();
    let expected = 0;
    for (const [name, content] of Object.entries(t.files)) {
      for (const variant of name === "config.json" ? [content, t.v1Config] : [content]) {
        const blob = blobName(name, variant);
        if (!distinct.has(blob)) expected += variant.length;
        distinct.add(blob);
      }
    }
    assert.equal(repo!.size, expected);
  });

  it("cache rm repo@rev removes that snapshot, its refs, markers and the blobs only it used", async () => {
    const v1 = await resolveModel(`${REPO}@v1`, t.options);
    const main = await resolveModel(REPO, t.options);
    const removed = await blossom(["cache", "rm", `${REPO}@v1`, "--cache-dir", t.cacheDir]);
    assert.equal(removed.code, 0, removed.stderr);
    assert.equal(removed.stdout, `removed ${REPO}@v1 (commit ${t.v1}, refs v1): freed ${t.v1Config.length} B\n`);
    await assert.rejects(stat(v1.dir));
    await assert.rejects(stat(join(root, "refs", "v1")));
    await assert.rejects(stat(join(root, ".no_exist", t.v1)));
    await assert.rejects(stat(join(root, "blobs", blobName("config.json", t.v1Config))));
    // Shards are shared with main and stay; main still loads offline.
    assert.ok((await lstat(join(root, "blobs", sha256(t.files["model-00001-of-00002.safetensors"]!)))).isFile());
    const offline = await resolveModel(REPO, { ...t.options, offline: true });
    assert.equal(offline.dir, main.dir);

    const unknown = await blossom(["cache", "rm", `${REPO}@v9`, "--cache-dir", t.cacheDir]);
    assert.equal(unknown.code, 1);
    assert.equal(unknown.stderr, `blossom: ${REPO}@v9: no such cached revision; cached: ${t.main} (main)\n`);

    const all = await blossom(["cache", "rm", REPO, "--cache-dir", t.cacheDir]);
    assert.match(all.stdout, new RegExp(`^removed ${REPO} \\(1 revision\\(s\\)\\): freed ${SIZE}\\n$`));
    assert.deepEqual(await readdir(t.cacheDir).then((names) => names.filter((n) => n.startsWith("models--"))), []);
    await assert.rejects(removeFromCache(t.cacheDir, REPO), /not in the cache/);
  });

  it("cache ls shows a partial download, cache rm takes a short commit hash and removes partials with the repo", async () => {
    t.hub.faults.push({ kind: "cut", file: "model-00002-of-00002.safetensors", afterBytes: 100_000, times: 1 });
    await assert.rejects(resolveModel(REPO, { ...t.options, attempts: 1 }), /next run resumes/);
    const listed = await blossom(["cache", "ls", REPO, "--cache-dir", t.cacheDir]);
    assert.match(listed.stdout, /\(\+100 kB partial\)/);

    await resolveModel(REPO, t.options);
    await resolveModel(`${REPO}@v1`, t.options);
    const result = await removeFromCache(t.cacheDir, REPO, t.main.slice(0, 10));
    assert.deepEqual(result.commits, [t.main]);
    assert.deepEqual(result.refs, ["main"]);
    // Only main's config.json and generation_config.json were not shared with v1.
    assert.equal(result.freedBytes, t.files["config.json"]!.length + t.files["generation_config.json"]!.length);

    const all = await removeFromCache(t.cacheDir, REPO);
    assert.equal(all.repoRemoved, true);
    await assert.rejects(stat(root));
  });
});
