/**
 * A local stand-in for the Hugging Face Hub on 127.0.0.1: the routes, status codes and headers
 * huggingface_hub and Blossom rely on, with faults to order (a connection cut mid-body, a corrupted
 * body) and a log of every request.
 *
 *   GET  /api/models/{repo}/revision/{rev}     → {id, sha, siblings: [{rfilename}]}; 404 RepoNotFound / RevisionNotFound
 *   HEAD|GET /{repo}/resolve/{rev}/{file}      → plain files: 200 with etag "<git blob sha1>", x-repo-commit;
 *                                                LFS files: 302 to /cdn/{sha256} with x-linked-etag "<sha256>", x-linked-size
 *   HEAD|GET /cdn/{sha256}                     → the content, honouring `Range: bytes=N-` with 206
 * Gated repos: metadata is public (as on the real Hub) unless `gatedApi` is set; files answer 401
 * GatedRepo without a token and 403 with a wrong one. Renamed repos answer 307 with a relative Location.
 */
import { createHash } from "node:crypto";
import { createServer, type IncomingMessage, type Server, type ServerResponse } from "node:http";
import type { AddressInfo } from "node:net";
import { mkdtemp, readdir, readFile, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import type { ResolveInternals, ResolveOptions } from "../../src/hub/resolve.js";

export interface FakeCommitSpec {
  files: Record<string, Buffer | string>;
  /** Branches and tags pointing at this commit. */
  refs?: string[];
}

export interface FakeRepoSpec {
  gated?: boolean;
  /** Gated metadata too (401 on the API route), as for a private repo. */
  gatedApi?: boolean;
  commits: FakeCommitSpec[];
}

interface FakeCommit {
  sha: string;
  files: Map<string, Buffer>;
}

interface FakeRepo {
  spec: FakeRepoSpec;
  commits: Map<string, FakeCommit>;
  refs: Map<string, string>;
}

export interface LoggedRequest {
  method: string;
  path: string;
  range: string | undefined;
  authorization: string | undefined;
}

export type Fault =
  /** Send `afterBytes` bytes of the body, then drop the connection; `times` times. */
  | { kind: "cut"; file: string; afterBytes: number; times: number }
  /** Flip one byte in the middle of the body; `times` times. */
  | { kind: "corrupt"; file: string; times: number }
  /** Send `afterBytes` bytes of the body (none, or not even the headers when -1), then fall silent with the connection open. */
  | { kind: "stall"; file: string; afterBytes: number; times: number }
  /** Answer the GET with this status (a JSON error body). */
  | { kind: "status"; file: string; status: number; times: number }
  /** Send no size (HEAD and GET without Content-Length) and end the GET cleanly after half the body. */
  | { kind: "unsized-truncated"; file: string; times: number }
  /** Give this ETag in the HEAD answer (and the GET's). */
  | { kind: "etag"; file: string; etag: string; times: number };

const LFS_FILE = /\.(safetensors|bin|h5|msgpack|onnx)$/;

export function gitBlobSha1(content: Buffer): string {
  return createHash("sha1").update(`blob ${content.length}\0`).update(content).digest("hex");
}

export function sha256(content: Buffer): string {
  return createHash("sha256").update(content).digest("hex");
}

export function isLfs(filename: string): boolean {
  return LFS_FILE.test(filename);
}

/** The name huggingface_hub gives a file's blob: sha256 for LFS files, the git blob id otherwise. */
export function blobName(filename: string, content: Buffer): string {
  return isLfs(filename) ? sha256(content) : gitBlobSha1(content);
}

export class FakeHub {
  readonly requests: LoggedRequest[] = [];
  readonly faults: Fault[] = [];
  /** The revision API answers this status `times` times (a Hub having trouble). */
  apiFailure: { status: number; times: number } | undefined;
  /** Responses left hanging by "stall" faults, ended when the hub stops. */
  private readonly stalled = new Set<ServerResponse>();
  /** Accepted tokens for gated repos. */
  readonly tokens = new Set<string>(["hf_fake_valid_token"]);
  private readonly repos = new Map<string, FakeRepo>();
  private readonly renames = new Map<string, string>();
  private readonly blobsBySha256 = new Map<string, { content: Buffer; filename: string }>();
  private server: Server | undefined;
  private port = 0;

  get url(): string {
    return `http://127.0.0.1:${this.port}`;
  }

  /** Adds a repo; returns each commit's sha in the order given. */
  addRepo(id: string, spec: FakeRepoSpec): string[] {
    const repo: FakeRepo = { spec, commits: new Map(), refs: new Map() };
    let parent = "";
    const shas: string[] = [];
    for (const commitSpec of spec.commits) {
      const files = new Map<string, Buffer>();
      const hash = createHash("sha1").update(`${id}\n${parent}\n`);
      for (const [name, content] of Object.entries(commitSpec.files).sort(([a], [b]) => a.localeCompare(b))) {
        const buffer = typeof content === "string" ? Buffer.from(content) : content;
        files.set(name, buffer);
        hash.update(`${name}\0${gitBlobSha1(buffer)}\n`);
        if (isLfs(name)) this.blobsBySha256.set(sha256(buffer), { content: buffer, filename: name });
      }
      const sha = hash.digest("hex");
      repo.commits.set(sha, { sha, files });
      for (const ref of commitSpec.refs ?? []) repo.refs.set(ref, sha);
      shas.push(sha);
      parent = sha;
    }
    this.repos.set(id, repo);
    return shas;
  }

  /** `oldId` now answers with a relative redirect to `newId`, as a renamed repo does. */
  rename(oldId: string, newId: string): void {
    this.renames.set(oldId, newId);
  }

  requestsFor(pattern: RegExp, method?: string): LoggedRequest[] {
    return this.requests.filter((r) => pattern.test(r.path) && (method === undefined || r.method === method));
  }

  async start(): Promise<void> {
    this.server = createServer((req, res) => this.handle(req, res));
    await new Promise<void>((resolve) => this.server!.listen(0, "127.0.0.1", resolve));
    this.port = (this.server!.address() as AddressInfo).port;
  }

  async stop(): Promise<void> {
    const server = this.server;
    if (server === undefined) return;
    this.server = undefined;
    for (const res of this.stalled) res.destroy();
    server.closeAllConnections();
    await new Promise<void>((resolve) => server.close(() => resolve()));
  }

  private handle(req: IncomingMessage, res: ServerResponse): void {
    const path = (req.url ?? "/").split("?")[0]!;
    this.requests.push({
      method: req.method ?? "GET",
      path: decodeURIComponent(path),
      range: req.headers.range,
      authorization: req.headers.authorization,
    });
    let match: RegExpExecArray | null;
    if ((match = /^\/api\/models\/(.+?)\/revision\/([^/]+)$/.exec(path)) !== null) {
      this.modelInfo(req, res, decodeURIComponent(match[1]!), decodeURIComponent(match[2]!));
    } else if ((match = /^\/cdn\/([0-9a-f]{64})$/.exec(path)) !== null) {
      const blob = this.blobsBySha256.get(match[1]!);
      if (blob === undefined) return this.error(res, 404, "EntryNotFound", "no such object");
      this.serveContent(req, res, blob.content, blob.filename, { etag: `"${match[1]}"` });
    } else if ((match = /^\/(.+?)\/resolve\/([^/]+)\/(.+)$/.exec(path)) !== null) {
      this.resolveFile(req, res, decodeURIComponent(match[1]!), decodeURIComponent(match[2]!), decodeURIComponent(match[3]!), path);
    } else {
      this.error(res, 404, undefined, "not found");
    }
  }

  private error(res: ServerResponse, status: number, code: string | undefined, message: string): void {
    const body = JSON.stringify({ error: message });
    res.writeHead(status, {
      "content-type": "application/json; charset=utf-8",
      "content-length": Buffer.byteLength(body),
      ...(code === undefined ? {} : { "x-error-code": code, "x-error-message": message }),
    });
    res.end(body);
  }

  private authorized(req: IncomingMessage): "none" | "bad" | "ok" {
    const header = req.headers.authorization;
    if (header === undefined) return "none";
    return this.tokens.has(header.replace(/^Bearer /, "")) ? "ok" : "bad";
  }

  /** Answers for a missing or gated repo, or undefined when the request may go on. */
  private denied(req: IncomingMessage, res: ServerResponse, id: string, forFiles: boolean): boolean {
    const repo = this.repos.get(id);
    if (repo === undefined) {
      this.error(res, 404, "RepoNotFound", "Repository not found");
      return true;
    }
    if (repo.spec.gated === true && (forFiles || repo.spec.gatedApi === true)) {
      const auth = this.authorized(req);
      if (auth === "none") {
        this.error(res, 401, "GatedRepo", `Access to model ${id} is restricted. You must be authenticated to access it.`);
        return true;
      }
      if (auth === "bad") {
        this.error(res, 403, "GatedRepo", `Access to model ${id} is restricted and you are not in the authorized list.`);
        return true;
      }
    }
    return false;
  }

  private commitFor(repo: FakeRepo, revision: string): FakeCommit | undefined {
    return repo.commits.get(repo.refs.get(revision) ?? revision);
  }

  private modelInfo(req: IncomingMessage, res: ServerResponse, id: string, revision: string): void {
    const renamed = this.renames.get(id);
    if (renamed !== undefined) {
      res.writeHead(307, { location: `/api/models/${renamed}/revision/${encodeURIComponent(revision)}`, "content-length": 0 });
      return void res.end();
    }
    if (this.apiFailure !== undefined && this.apiFailure.times > 0) {
      this.apiFailure.times--;
      return this.error(res, this.apiFailure.status, undefined, "the Hub is having trouble");
    }
    if (this.denied(req, res, id, false)) return;
    const repo = this.repos.get(id)!;
    const commit = this.commitFor(repo, revision);
    if (commit === undefined) return this.error(res, 404, "RevisionNotFound", `Invalid rev id: ${revision}`);
    const body = JSON.stringify({
      _id: `fake-${id}`,
      id,
      private: false,
      gated: repo.spec.gated === true ? "manual" : false,
      sha: commit.sha,
      siblings: [...commit.files.keys()].map((rfilename) => ({ rfilename })),
    });
    res.writeHead(200, { "content-type": "application/json; charset=utf-8", "content-length": Buffer.byteLength(body) });
    res.end(body);
  }

  private resolveFile(req: IncomingMessage, res: ServerResponse, id: string, revision: string, filename: string, rawPath: string): void {
    const renamed = this.renames.get(id);
    if (renamed !== undefined) {
      res.writeHead(307, { location: rawPath.replace(`/${id}/`, `/${renamed}/`), "content-length": 0 });
      return void res.end();
    }
    if (this.denied(req, res, id, true)) return;
    const repo = this.repos.get(id)!;
    const commit = this.commitFor(repo, revision);
    if (commit === undefined) return this.error(res, 404, "RevisionNotFound", `Invalid rev id: ${revision}`);
    const content = commit.files.get(filename);
    if (content === undefined) return this.error(res, 404, "EntryNotFound", `${filename} does not exist on "${revision}"`);
    if (isLfs(filename)) {
      const oid = sha256(content);
      const pointer = `version https://git-lfs.github.com/spec/v1\noid sha256:${oid}\nsize ${content.length}\n`;
      res.writeHead(302, {
        location: `${this.url}/cdn/${oid}`,
        "x-repo-commit": commit.sha,
        etag: `"${gitBlobSha1(Buffer.from(pointer))}"`,
        "x-linked-etag": `"${oid}"`,
        "x-linked-size": String(content.length),
        "content-length": 0,
      });
      return void res.end();
    }
    this.serveContent(req, res, content, filename, { etag: `"${gitBlobSha1(content)}"`, "x-repo-commit": commit.sha });
  }

  /** The next fault ordered for `filename`; a GET uses it up, a HEAD only looks. */
  private takeFault(filename: string, method: string | undefined): Fault | undefined {
    const index = this.faults.findIndex((f) => f.file === filename && f.times > 0);
    if (index < 0) return undefined;
    const fault = this.faults[index]!;
    if (method !== "HEAD") fault.times--;
    return fault;
  }

  private serveContent(
    req: IncomingMessage,
    res: ServerResponse,
    content: Buffer,
    filename: string,
    headers: Record<string, string>,
  ): void {
    let start = 0;
    const range = /^bytes=(\d+)-$/.exec(req.headers.range ?? "");
    if (range !== null) {
      start = Number(range[1]);
      if (start >= content.length) {
        res.writeHead(416, { "content-range": `bytes */${content.length}`, "content-length": 0 });
        return void res.end();
      }
    }
    const fault = this.takeFault(filename, req.method);
    if (fault?.kind === "status" && req.method !== "HEAD") return this.error(res, fault.status, undefined, `fault: ${fault.status}`);
    if (fault?.kind === "stall" && fault.afterBytes < 0) {
      this.stalled.add(res);
      return; // no answer at all
    }
    if (fault?.kind === "etag") headers = { ...headers, etag: `"${fault.etag}"` };
    const unsized = fault?.kind === "unsized-truncated";
    const status = range !== null ? 206 : 200;
    res.writeHead(status, {
      ...headers,
      "accept-ranges": "bytes",
      "content-type": "application/octet-stream",
      ...(unsized ? {} : { "content-length": content.length - start }),
      ...(status === 206 ? { "content-range": `bytes ${start}-${content.length - 1}/${content.length}` } : {}),
    });
    if (req.method === "HEAD") return void res.end();
    let body = content.subarray(start);
    if (unsized) return void res.end(body.subarray(0, body.length >> 1));
    if (fault?.kind === "stall") {
      this.stalled.add(res);
      res.write(body.subarray(0, fault.afterBytes));
      return;
    }
    if (fault?.kind === "corrupt") {
      body = Buffer.from(body);
      body[body.length >> 1]! ^= 0xff;
    }
    if (fault?.kind === "cut") {
      res.write(body.subarray(0, fault.afterBytes), () => res.socket?.destroy());
      return;
    }
    res.end(body);
  }
}

// ---------------------------------------------------------------------------------------------
// The test setup: tiny-bloom-b at two revisions plus repos for the error cases, and a fresh cache.

const repoRoot = fileURLToPath(new URL("../../../", import.meta.url));
export const FIXTURE_DIR = join(repoRoot, "..", "shared", "fixtures", "tiny-bloom-b");

export const REPO = "blossom-test/tiny-bloom-b";
export const GATED_REPO = "blossom-test/gated-bloom";
export const PRIVATE_REPO = "blossom-test/private-bloom";
export const BIN_ONLY_REPO = "blossom-test/bin-only";
export const SINGLE_NAME_REPO = "tiny-bloom-b";
export const VALID_TOKEN = "hf_fake_valid_token";

/** The checkpoint files (everything but golden/). */
export async function fixtureFiles(): Promise<Record<string, Buffer>> {
  const files: Record<string, Buffer> = {};
  for (const entry of await readdir(FIXTURE_DIR, { withFileTypes: true })) {
    if (entry.isFile()) files[entry.name] = await readFile(join(FIXTURE_DIR, entry.name));
  }
  return files;
}

/** Files a real repo carries that inference must never fetch. */
export function extraFiles(): Record<string, Buffer> {
  return {
    "pytorch_model.bin": Buffer.alloc(300_000, 7),
    "flax_model.msgpack": Buffer.alloc(1000, 9),
    "README.md": Buffer.from("# tiny-bloom-b\nA fixture.\n"),
    ".gitattributes": Buffer.from("*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"),
  };
}

export interface HubTestContext {
  hub: FakeHub;
  cacheDir: string;
  files: Record<string, Buffer>;
  /** The v1 commit: another config.json and no generation_config.json; same shards. */
  v1: string;
  v1Config: Buffer;
  main: string;
  /** Options for resolveModel that point at the fake Hub and the test cache, with no ambient settings. */
  options: ResolveOptions & ResolveInternals;
  cleanup(): Promise<void>;
}

export async function startHubTest(): Promise<HubTestContext> {
  const files = await fixtureFiles();
  const hub = new FakeHub();
  const v1Config = Buffer.from(JSON.stringify({ ...JSON.parse(files["config.json"]!.toString()), _v1: true }, null, 2));
  const { "generation_config.json": _dropped, ...withoutGenerationConfig } = files;
  const [v1, main] = hub.addRepo(REPO, {
    commits: [
      { files: { ...withoutGenerationConfig, ...extraFiles(), "config.json": v1Config }, refs: ["v1"] },
      { files: { ...files, ...extraFiles() }, refs: ["main"] },
    ],
  });
  hub.addRepo(GATED_REPO, { gated: true, commits: [{ files, refs: ["main"] }] });
  hub.addRepo(PRIVATE_REPO, { gated: true, gatedApi: true, commits: [{ files, refs: ["main"] }] });
  hub.addRepo(BIN_ONLY_REPO, {
    commits: [{ files: { "config.json": files["config.json"]!, "tokenizer.json": files["tokenizer.json"]!, ...extraFiles() }, refs: ["main"] }],
  });
  hub.addRepo(SINGLE_NAME_REPO, { commits: [{ files, refs: ["main"] }] });
  await hub.start();
  const cacheDir = await mkdtemp(join(tmpdir(), "blossom-hub-test-"));
  return {
    hub,
    cacheDir,
    files,
    v1: v1!,
    v1Config,
    main: main!,
    options: { endpoint: hub.url, cacheDir, token: "", offline: false, progress: false, retryDelayMs: 0 },
    async cleanup() {
      await hub.stop();
      await rm(cacheDir, { recursive: true, force: true });
    },
  };
}
