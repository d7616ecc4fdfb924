/** resolveModel against a fake Hub: download, cache layout, reuse, revisions, resume, rejection, access, offline. */
import assert from "node:assert/strict";
import { lstat, mkdir, readdir, readFile, readlink, rm, stat, symlink, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { afterEach, beforeEach, describe, it } from "node:test";
import { downloadFileToCacheDir, scanCacheDir } from "@huggingface/hub";
import { BlossomError } from "../src/errors.js";
import { parseModelRef } from "../src/hub/ref.js";
import { resolveModel } from "../src/hub/resolve.js";
import { hubDownloadTimeoutMs } from "../src/hub/settings.js";
import {
  BIN_ONLY_REPO,
  blobName,
  gitBlobSha1,
  sha256,
  FIXTURE_DIR,
  GATED_REPO,
  PRIVATE_REPO,
  REPO,
  SINGLE_NAME_REPO,
  startHubTest,
  VALID_TOKEN,
  type HubTestContext,
} from "./helpers/fake-hub.js";

const INFERENCE_FILES = [
  "config.json",
  "generation_config.json",
  "model-00001-of-00002.safetensors",
  "model-00002-of-00002.safetensors",
  "model.safetensors.index.json",
  "special_tokens_map.json",
  "tokenizer.json",
  "tokenizer_config.json",
];
const SHARD = "model-00001-of-00002.safetensors";

const repoDir = (t: HubTestContext): string => join(t.cacheDir, "models--blossom-test--tiny-bloom-b");

function hubError(pattern: RegExp): (err: unknown) => boolean {
  return (err: unknown) => {
    assert.ok(err instanceof BlossomError, `expected a BlossomError, got ${String(err)}`);
    assert.match(err.message, pattern);
    return true;
  };
}

describe("model references", () => {
  it("parses org/name[@revision] and bare names, and rejects malformed ids naming the ref", () => {
    assert.deepEqual(parseModelRef("bigscience/bloom"), { repoId: "bigscience/bloom", revision: undefined });
    assert.deepEqual(parseModelRef("bigscience/bloom-560m@refs/pr/1"), { repoId: "bigscience/bloom-560m", revision: "refs/pr/1" });
    assert.deepEqual(parseModelRef("gpt2@main"), { repoId: "gpt2", revision: "main" });
    for (const bad of ["a/b/c", "org/-name", "org--x/name", "org/na..me", "org/name@", "org/name@../x", "./missing-folder", "/no/such/dir"]) {
      assert.throws(() => parseModelRef(bad), (err: unknown) => err instanceof BlossomError && err.message.includes(`'${bad}'`));
    }
  });

  it("returns an existing folder unchanged without touching the network", async () => {
    const resolved = await resolveModel(FIXTURE_DIR, { endpoint: "http://127.0.0.1:9", offline: false });
    assert.deepEqual(resolved, { dir: FIXTURE_DIR, fromCache: false });
  });
});

describe("HF_HUB_DOWNLOAD_TIMEOUT", () => {
  it("is seconds (default 10); a huge value means no limit rather than a timer that fires at once", () => {
    const saved = process.env.HF_HUB_DOWNLOAD_TIMEOUT;
    try {
      delete process.env.HF_HUB_DOWNLOAD_TIMEOUT;
      assert.equal(hubDownloadTimeoutMs(), 10_000);
      process.env.HF_HUB_DOWNLOAD_TIMEOUT = "2.5";
      assert.equal(hubDownloadTimeoutMs(), 2500);
      // setTimeout fires at once for more than 2^31 - 1 ms.
      process.env.HF_HUB_DOWNLOAD_TIMEOUT = "3000000";
      assert.equal(hubDownloadTimeoutMs(), 2 ** 31 - 1);
      for (const bad of ["0", "-1", "soon"]) {
        process.env.HF_HUB_DOWNLOAD_TIMEOUT = bad;
        assert.throws(() => hubDownloadTimeoutMs(), /HF_HUB_DOWNLOAD_TIMEOUT: expected a positive number of seconds/);
      }
    } finally {
      if (saved === undefined) delete process.env.HF_HUB_DOWNLOAD_TIMEOUT;
      else process.env.HF_HUB_DOWNLOAD_TIMEOUT = saved;
    }
  });
});

describe("resolveModel with a Hub", () => {
  let t: HubTestContext;
  beforeEach(async () => {
    t = await startHubTest();
  });
  afterEach(async () => {
    await t.cleanup();
  });

  it("downloads only config, tokenizer and safetensors files into huggingface_hub's cache layout", async () => {
    const resolved = await resolveModel(REPO, t.options);
    const snapshot = join(repoDir(t), "snapshots", t.main);
    assert.equal(resolved.dir, snapshot);
    assert.equal(resolved.repoId, REPO);
    assert.equal(resolved.commit, t.main);
    assert.equal(resolved.fromCache, false);
    assert.deepEqual((await readdir(snapshot)).sort(), INFERENCE_FILES);

    // Python's layout: snapshots/<commit>/<file> → ../../blobs/<etag>, refs/main = commit, nothing else.
    const expectedBlobs = new Set<string>();
    for (const name of INFERENCE_FILES) {
      const pointer = join(snapshot, name);
      assert.ok((await lstat(pointer)).isSymbolicLink(), `${name} is a symlink`);
      const blob = blobName(name, t.files[name]!);
      expectedBlobs.add(blob);
      assert.equal(await readlink(pointer), `../../blobs/${blob}`);
      assert.deepEqual(await readFile(pointer), t.files[name]);
    }
    assert.equal(blobName(SHARD, t.files[SHARD]!), sha256(t.files[SHARD]!), "LFS blobs are named by sha256");
    assert.equal(blobName("config.json", t.files["config.json"]!), gitBlobSha1(t.files["config.json"]!));
    assert.deepEqual(new Set(await readdir(join(repoDir(t), "blobs"))), expectedBlobs);
    assert.equal(await readFile(join(repoDir(t), "refs", "main"), "utf8"), t.main);

    // Never a .bin, .msgpack or README, not even a HEAD.
    assert.deepEqual(t.hub.requestsFor(/\.(bin|msgpack|md)$|gitattributes/), []);
    // Large files came from the CDN address without the token.
    assert.equal(t.hub.requestsFor(/^\/cdn\//, "GET").length, 2);
  });

  it("writes a cache that the Hugging Face JS client reads as huggingface_hub's layout", async () => {
    await resolveModel(REPO, t.options);
    const scanned = await scanCacheDir(t.cacheDir);
    assert.deepEqual(scanned.warnings, []);
    assert.equal(scanned.repos.length, 1);
    const [repo] = scanned.repos;
    assert.deepEqual(repo!.id, { name: REPO, type: "model" });
    assert.equal(repo!.revisions.length, 1);
    assert.equal(repo!.revisions[0]!.commitOid, t.main);
    assert.deepEqual(repo!.revisions[0]!.refs, ["main"]);
    assert.equal(repo!.revisions[0]!.files.length, INFERENCE_FILES.length);
    // Its downloader takes a cached commit's file from our cache without asking the (dead) Hub.
    const pointer = await downloadFileToCacheDir({
      repo: REPO,
      path: "tokenizer.json",
      revision: t.main,
      cacheDir: t.cacheDir,
      hubUrl: "http://127.0.0.1:9",
    });
    assert.equal(pointer, join(repoDir(t), "snapshots", t.main, "tokenizer.json"));
  });

  it("reuses the cache: no file requests while the Hub is up, and no network at all once it is gone", async () => {
    await resolveModel(REPO, t.options);
    const before = t.hub.requests.length;
    const again = await resolveModel(REPO, t.options);
    assert.equal(again.fromCache, true);
    assert.deepEqual(
      t.hub.requests.slice(before).map((r) => r.path),
      [`/api/models/${REPO}/revision/main`],
      "only the revision is asked for",
    );
    await t.hub.stop();
    const offline = await resolveModel(REPO, t.options);
    assert.equal(offline.dir, again.dir);
    assert.equal(offline.fromCache, true);
    assert.equal(offline.commit, t.main);
  });

  it("pins revisions: a tag and a commit resolve to their own snapshots, sharing unchanged blobs", async () => {
    const tagged = await resolveModel(`${REPO}@v1`, t.options);
    assert.equal(tagged.commit, t.v1);
    assert.deepEqual(await readFile(join(tagged.dir, "config.json")), t.v1Config);
    assert.equal(await readFile(join(repoDir(t), "refs", "v1"), "utf8"), t.v1);
    // v1 has no generation_config.json: recorded as huggingface_hub records a known-absent file.
    assert.ok((await stat(join(repoDir(t), ".no_exist", t.v1, "generation_config.json"))).isFile());

    const latest = await resolveModel(REPO, { ...t.options, revision: "main" });
    assert.equal(latest.commit, t.main);
    assert.notEqual(latest.dir, tagged.dir);
    assert.deepEqual(await readFile(join(latest.dir, "config.json")), t.files["config.json"]);
    const shardInode = async (dir: string): Promise<number> => (await stat(join(dir, SHARD))).ino;
    assert.equal(await shardInode(latest.dir), await shardInode(tagged.dir), "one blob backs both snapshots");
    assert.equal(t.hub.requestsFor(/^\/cdn\//, "GET").length, 2, "shards were downloaded once");

    // A commit hash whose snapshot is complete needs no request at all.
    const before = t.hub.requests.length;
    const byCommit = await resolveModel(`${REPO}@${t.v1}`, t.options);
    assert.equal(byCommit.dir, tagged.dir);
    assert.equal(byCommit.fromCache, true);
    assert.equal(t.hub.requests.length, before);
    await assert.rejects(resolveModel(`${REPO}@v1`, { ...t.options, revision: "main" }), hubError(/disagrees/));
  });

  it("resumes an interrupted transfer with a Range request, within one call", async () => {
    t.hub.faults.push({ kind: "cut", file: SHARD, afterBytes: 200_000, times: 1 });
    const resolved = await resolveModel(REPO, t.options);
    assert.deepEqual(await readFile(join(resolved.dir, SHARD)), t.files[SHARD]);
    const shardGets = t.hub.requestsFor(new RegExp(`^/cdn/${sha256(t.files[SHARD]!)}$`), "GET");
    assert.deepEqual(
      shardGets.map((r) => r.range),
      [undefined, "bytes=200000-"],
    );
  });

  it("keeps the partial file of a failed run and resumes it in the next run", async () => {
    t.hub.faults.push({ kind: "cut", file: SHARD, afterBytes: 150_000, times: 2 });
    await assert.rejects(resolveModel(REPO, { ...t.options, attempts: 2 }), hubError(/failed after 2 attempts.*next run resumes/));
    const etag = sha256(t.files[SHARD]!);
    const partial = join(repoDir(t), "blobs", `${etag}.incomplete`);
    // The first attempt stopped at 150 000 bytes, the second resumed and stopped 150 000 bytes later.
    assert.equal((await stat(partial)).size, 300_000);
    await assert.rejects(stat(join(repoDir(t), "blobs", etag)), "no blob is made from a partial file");
    await assert.rejects(lstat(join(repoDir(t), "snapshots", t.main, SHARD)));

    const before = t.hub.requests.length;
    const resolved = await resolveModel(REPO, t.options);
    assert.deepEqual(await readFile(join(resolved.dir, SHARD)), t.files[SHARD]);
    const resumed = t.hub.requests.slice(before).filter((r) => r.path === `/cdn/${etag}` && r.method === "GET");
    assert.deepEqual(resumed.map((r) => r.range), ["bytes=300000-"]);
    await assert.rejects(stat(partial), "the partial file became the blob");
  });

  it("rejects a corrupted download, deletes it, and succeeds on the next run", async () => {
    t.hub.faults.push({ kind: "corrupt", file: SHARD, times: 1 });
    const etag = sha256(t.files[SHARD]!);
    await assert.rejects(resolveModel(REPO, t.options), hubError(new RegExp(`${SHARD}: downloaded file rejected: sha256 [0-9a-f]{64}, expected ${etag}`)));
    const blobs = await readdir(join(repoDir(t), "blobs"));
    assert.ok(!blobs.some((name) => name.startsWith(etag)), "neither blob nor partial is kept");
    await assert.rejects(lstat(join(repoDir(t), "snapshots", t.main, SHARD)));

    // A plain (non-LFS) file is checked against its git blob id.
    t.hub.faults.push({ kind: "corrupt", file: "tokenizer.json", times: 1 });
    await rm(t.cacheDir, { recursive: true, force: true });
    await assert.rejects(resolveModel(REPO, t.options), hubError(/tokenizer\.json: downloaded file rejected: git sha1/));

    const resolved = await resolveModel(REPO, t.options);
    assert.deepEqual(await readFile(join(resolved.dir, SHARD)), t.files[SHARD]);
    assert.deepEqual(await readFile(join(resolved.dir, "tokenizer.json")), t.files["tokenizer.json"]);
  });

  it("gives up on a server that falls silent (no answer, or a body that stops) and resumes from where it stopped", async () => {
    // Only waits on the server count (hashing and writing do not), so a loaded machine does not trip it.
    const idle = { ...t.options, idleTimeoutMs: 1000 };
    // The body stops after 100 000 bytes with the connection left open: the next try resumes there.
    t.hub.faults.push({ kind: "stall", file: SHARD, afterBytes: 100_000, times: 1 });
    const resolved = await resolveModel(REPO, idle);
    assert.deepEqual(await readFile(join(resolved.dir, SHARD)), t.files[SHARD]);
    const gets = t.hub.requestsFor(new RegExp(`^/cdn/${sha256(t.files[SHARD]!)}$`), "GET");
    assert.deepEqual(gets.map((r) => r.range), [undefined, "bytes=100000-"]);

    // A server that never answers, every time: a bounded failure that says why.
    await rm(t.cacheDir, { recursive: true, force: true });
    t.hub.faults.push({ kind: "stall", file: SHARD, afterBytes: -1, times: 2 });
    await assert.rejects(resolveModel(REPO, { ...idle, attempts: 2 }), hubError(/failed after 2 attempts \(.*: nothing received for 1 s \(HF_HUB_DOWNLOAD_TIMEOUT\)\); nothing was received$/));
  });

  it("checks a plain file's git blob id against what arrived when no size was announced", async () => {
    t.hub.faults.push({ kind: "unsized-truncated", file: "config.json", times: 1 });
    await assert.rejects(resolveModel(REPO, t.options), hubError(/config\.json: downloaded file rejected: git sha1 [0-9a-f]{40}, expected/));
    const resolved = await resolveModel(REPO, t.options);
    assert.deepEqual(await readFile(join(resolved.dir, "config.json")), t.files["config.json"]);
  });

  it("refuses an ETag that cannot name a cache file", async () => {
    for (const etag of ["..", "."]) {
      t.hub.faults.push({ kind: "etag", file: "config.json", etag, times: 1 });
      await assert.rejects(resolveModel(REPO, t.options), hubError(new RegExp(`config\\.json: unusable ETag '"${etag.replace(/\./g, "\\.")}"'`)));
      t.hub.faults.length = 0;
    }
    // Nothing was written beside the repo's folder (an etag ".." once named models--…-b.incomplete).
    assert.deepEqual((await readdir(t.cacheDir)).sort(), [".locks", "models--blossom-test--tiny-bloom-b"]);
    assert.deepEqual(await readdir(join(t.cacheDir, ".locks")), ["models--blossom-test--tiny-bloom-b"]);
  });

  it("names the download server, not the repo, when the CDN answers an error; retries its 5xx", async () => {
    t.hub.faults.push({ kind: "status", file: SHARD, status: 403, times: 1 });
    await assert.rejects(resolveModel(REPO, t.options), (err: unknown) => {
      const message = (err as Error).message;
      assert.match(message, new RegExp(`${SHARD}: the download server http://127\\.0\\.0\\.1:\\d+ refused the file \\(403\\); the signed address`));
      assert.doesNotMatch(message, /gated|HF_TOKEN/);
      return true;
    });
    t.hub.faults.push({ kind: "status", file: SHARD, status: 503, times: 1 });
    const resolved = await resolveModel(REPO, t.options);
    assert.deepEqual(await readFile(join(resolved.dir, SHARD)), t.files[SHARD]);
  });

  it("retries the Hub's 5xx/429 on metadata, and falls back to the cache when it keeps failing", async () => {
    t.hub.apiFailure = { status: 503, times: 1 };
    await resolveModel(REPO, t.options); // the second try answers
    t.hub.apiFailure = { status: 500, times: 100 };
    const cached = await resolveModel(REPO, t.options);
    assert.equal(cached.fromCache, true);
    assert.equal(cached.commit, t.main);
    // Not in the cache: the failure itself, after the tries.
    t.hub.apiFailure = { status: 429, times: 100 };
    const before = t.hub.requestsFor(/^\/api\/models\//).length;
    await assert.rejects(resolveModel(`${REPO}@v1`, { ...t.options, attempts: 2 }), hubError(/answered 429.*not in the cache/));
    assert.equal(t.hub.requestsFor(/^\/api\/models\//).length - before, 2);
  });

  it("answers a gated repo's 401 with advice, and downloads with a valid token", async () => {
    await assert.rejects(resolveModel(GATED_REPO, t.options), hubError(/gated-bloom.*gated or private.*no token was sent: set HF_TOKEN/));
    await assert.rejects(resolveModel(PRIVATE_REPO, t.options), hubError(/private-bloom.*gated or private.*set HF_TOKEN/));
    await assert.rejects(resolveModel(GATED_REPO, { ...t.options, token: "hf_wrong" }), hubError(/token sent was not accepted/));
    const before = t.hub.requests.length;
    const resolved = await resolveModel(GATED_REPO, { ...t.options, token: VALID_TOKEN });
    assert.deepEqual(await readFile(join(resolved.dir, SHARD)), t.files[SHARD]);
    // The token went to the Hub, never to the CDN.
    const sent = t.hub.requests.slice(before);
    const toHub = sent.filter((r) => !r.path.startsWith("/cdn/"));
    const toCdn = sent.filter((r) => r.path.startsWith("/cdn/"));
    assert.ok(toHub.length > 0 && toHub.every((r) => r.authorization === `Bearer ${VALID_TOKEN}`));
    assert.ok(toCdn.length === 2 && toCdn.every((r) => r.authorization === undefined));
  });

  it("reports an unknown repo (404 RepoNotFound) and an unknown revision (404 RevisionNotFound)", async () => {
    await assert.rejects(resolveModel("blossom-test/does-not-exist", t.options), hubError(/blossom-test\/does-not-exist: no such model repo on http:\/\/127\.0\.0\.1/));
    await assert.rejects(resolveModel(`${REPO}@nope`, t.options), hubError(/revision 'nope' not found in blossom-test\/tiny-bloom-b/));
    await assert.rejects(
      resolveModel(BIN_ONLY_REPO, t.options),
      hubError(/bin-only@main: no safetensors weights.*pytorch_model\.bin/),
    );
  });

  it("offline mode uses only the cache, and says what is missing", async () => {
    const saved = process.env["HF_HUB_OFFLINE"];
    process.env["HF_HUB_OFFLINE"] = "1";
    try {
      const { offline: _unset, ...ambient } = t.options;
      await assert.rejects(resolveModel(REPO, ambient), hubError(/not available offline \(HF_HUB_OFFLINE is set\).*never downloaded.*blossom download/));
      assert.equal(t.hub.requests.length, 0);
      await resolveModel(REPO, { ...t.options, offline: false });
      const before = t.hub.requests.length;
      const cached = await resolveModel(REPO, ambient);
      assert.equal(cached.commit, t.main);
      assert.equal(cached.fromCache, true);
      assert.equal(t.hub.requests.length, before, "no request offline");

      await rm(join(repoDir(t), "blobs", sha256(t.files["model-00002-of-00002.safetensors"]!)));
      await assert.rejects(resolveModel(REPO, ambient), hubError(/lacks model-00002-of-00002\.safetensors/));
      await assert.rejects(resolveModel(`${REPO}@v1`, ambient), hubError(/no refs\/v1/));
    } finally {
      if (saved === undefined) delete process.env["HF_HUB_OFFLINE"];
      else process.env["HF_HUB_OFFLINE"] = saved;
    }
  });

  it("uses a cache written by Python's huggingface_hub without downloading anything", async () => {
    // What hf_hub_download leaves behind: blobs named by etag, relative links, refs/main.
    const root = repoDir(t);
    await mkdir(join(root, "blobs"), { recursive: true });
    await mkdir(join(root, "refs"), { recursive: true });
    await writeFile(join(root, "refs", "main"), t.main);
    for (const name of INFERENCE_FILES) {
      const blob = blobName(name, t.files[name]!);
      await writeFile(join(root, "blobs", blob), t.files[name]!);
      await mkdir(join(root, "snapshots", t.main), { recursive: true });
      await symlink(`../../blobs/${blob}`, join(root, "snapshots", t.main, name));
    }
    const resolved = await resolveModel(REPO, t.options);
    assert.equal(resolved.fromCache, true);
    assert.equal(t.hub.requestsFor(/resolve|cdn/).length, 0);
    assert.equal(resolved.dir, join(root, "snapshots", t.main));
  });

  it("refuses to start without the free space the download needs", async () => {
    await assert.rejects(
      resolveModel(REPO, { ...t.options, freeBytes: async () => 1000 }),
      hubError(/not enough free space in .*: the download needs .* \(\d+ bytes\) but 1\.0 kB \(1000 bytes\) are available/),
    );
    assert.equal(t.hub.requestsFor(/^\/cdn\//, "GET").length, 0, "nothing was transferred");
  });

  it("downloads each blob once when two resolves of one model race", async () => {
    const [a, b] = await Promise.all([resolveModel(REPO, t.options), resolveModel(REPO, t.options)]);
    assert.equal(a.dir, b.dir);
    assert.equal(t.hub.requestsFor(/^\/cdn\//, "GET").length, 2);
    assert.deepEqual(await readFile(join(a.dir, SHARD)), t.files[SHARD]);
    assert.deepEqual(await readdir(join(t.cacheDir, ".locks", "models--blossom-test--tiny-bloom-b")), [], "locks released");
  });

  it("resolves a bare name, follows a renamed repo's relative redirect, and honours an AbortSignal", async () => {
    const bare = await resolveModel(SINGLE_NAME_REPO, t.options);
    assert.equal(bare.dir, join(t.cacheDir, "models--tiny-bloom-b", "snapshots", bare.commit!));
    t.hub.rename("blossom-test/old-name", REPO);
    const renamed = await resolveModel("blossom-test/old-name", t.options);
    assert.deepEqual(await readFile(join(renamed.dir, SHARD)), t.files[SHARD]);
    const controller = new AbortController();
    controller.abort();
    await assert.rejects(
      resolveModel(`${REPO}@v1`, { ...t.options, signal: controller.signal }),
      (err: unknown) => err instanceof BlossomError && err.code === "aborted",
    );
  });
});
