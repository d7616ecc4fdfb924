/**
 * The two Hub routes Blossom needs, spoken the way huggingface_hub speaks them:
 *   GET  {endpoint}/api/models/{repo}/revision/{revision}  → {sha, siblings: [{rfilename}]}
 *   HEAD {endpoint}/{repo}/resolve/{commit}/{filename}     → x-repo-commit, etag / x-linked-etag,
 *        x-linked-size / content-length; LFS files answer 302 to a CDN address, fetched without the token.
 * Error answers carry `x-error-code` (RepoNotFound, RevisionNotFound, EntryNotFound, GatedRepo), which
 * turns into a message that says what to do.
 */
import { setTimeout as sleep } from "node:timers/promises";
import { BlossomError } from "../errors.js";

/** The Hub could not be reached at all (as opposed to answering with an error). */
export class HubConnectionError extends BlossomError {
  constructor(message: string, options?: { cause?: unknown }) {
    super("hub", message, options);
    this.name = "HubConnectionError";
  }
}

/** The Hub answered with a status worth retrying (5xx, 429). */
export class HubTransientError extends BlossomError {
  constructor(message: string) {
    super("hub", message);
    this.name = "HubTransientError";
  }
}

export interface RevisionInfo {
  /** The commit the revision points to. */
  sha: string;
  /** Every file in the repo at that commit. */
  siblings: string[];
}

export interface FileMetadata {
  repoId: string;
  filename: string;
  commit: string | undefined;
  /** The normalized etag: sha256 of the content for LFS files, git blob sha1 otherwise. */
  etag: string;
  size: number | undefined;
  /** Where to GET the content: the CDN address for LFS files, the resolve address otherwise. */
  downloadUrl: string;
  /** The token goes to the Hub only, never to the CDN (whose address is already signed). */
  sendToken: boolean;
}

export interface HubClientOptions {
  endpoint: string;
  token: string | undefined;
  signal?: AbortSignal | undefined;
  fetch?: typeof fetch | undefined;
  /** Tries of a metadata request that the Hub answers with 5xx or 429 (default 3). */
  attempts?: number | undefined;
  /** Wait before retry k (1-based) is retryDelayMs · 2^(k-1) (default 1 s). */
  retryDelayMs?: number | undefined;
}

const METADATA_TIMEOUT_MS = 30_000;
const MAX_RELATIVE_REDIRECTS = 5;

/** `W/"abc"` and `"abc"` → `abc`, as huggingface_hub's `_normalize_etag`. */
export function normalizeEtag(etag: string): string {
  return etag.replace(/^W\//, "").replace(/^"|"$/g, "");
}

function encodePath(filename: string): string {
  return filename.split("/").map(encodeURIComponent).join("/");
}

function isAbortError(err: unknown): boolean {
  return err instanceof Error && (err.name === "AbortError" || err.name === "TimeoutError");
}

/** AbortSignal.any arrived in Node 20.3; before it, the caller's signal alone (no metadata timeout). */
function combineSignals(signals: AbortSignal[]): AbortSignal | null {
  if (signals.length <= 1) return signals[0] ?? null;
  return typeof AbortSignal.any === "function" ? AbortSignal.any(signals) : signals[0]!;
}

export function abortedError(what: string): BlossomError {
  return new BlossomError("aborted", `${what}: aborted`);
}

export class HubClient {
  readonly endpoint: string;
  private readonly token: string | undefined;
  private readonly signal: AbortSignal | undefined;
  private readonly fetchImpl: typeof fetch;
  private readonly attempts: number;
  private readonly retryDelayMs: number;

  constructor(options: HubClientOptions) {
    this.endpoint = options.endpoint;
    this.token = options.token;
    this.signal = options.signal;
    this.fetchImpl = options.fetch ?? fetch;
    this.attempts = Math.max(1, options.attempts ?? 3);
    this.retryDelayMs = options.retryDelayMs ?? 1_000;
  }

  /** Runs a metadata call again, with growing waits, while the Hub answers 5xx or 429. */
  private async retrying<T>(what: string, call: () => Promise<T>): Promise<T> {
    for (let attempt = 1; ; attempt++) {
      try {
        return await call();
      } catch (err) {
        if (!(err instanceof HubTransientError) || attempt >= this.attempts) throw err;
        try {
          await sleep(this.retryDelayMs * 2 ** (attempt - 1), undefined, { signal: this.signal });
        } catch {
          throw abortedError(what);
        }
      }
    }
  }

  get hasToken(): boolean {
    return this.token !== undefined;
  }

  /**
   * A request with Blossom's headers. `Accept-Encoding: identity` keeps sizes and byte ranges about
   * the file itself rather than a compressed copy.
   */
  async request(
    url: string,
    init: { method?: string; headers?: Record<string, string>; sendToken: boolean; redirect?: "follow" | "manual"; timeoutMs?: number; signal?: AbortSignal },
    what: string,
  ): Promise<Response> {
    if (this.signal?.aborted) throw abortedError(what);
    const headers: Record<string, string> = { "accept-encoding": "identity", "user-agent": "blossom", ...init.headers };
    if (init.sendToken && this.token !== undefined) headers["authorization"] = `Bearer ${this.token}`;
    const signals = [this.signal, init.signal, init.timeoutMs === undefined ? undefined : AbortSignal.timeout(init.timeoutMs)].filter(
      (s): s is AbortSignal => s !== undefined,
    );
    try {
      return await this.fetchImpl(url, {
        method: init.method ?? "GET",
        headers,
        redirect: init.redirect ?? "follow",
        signal: combineSignals(signals),
      });
    } catch (err) {
      if (this.signal?.aborted) throw abortedError(what);
      const cause = (err as { cause?: { code?: string; message?: string } }).cause;
      if (init.signal?.aborted) {
        // The caller's own deadline (a download's idle timeout): the server was reached but said nothing.
        throw new HubConnectionError(`${what}: ${new URL(url).origin}: ${String((init.signal.reason as Error | undefined)?.message ?? "timed out")}`, { cause: err });
      }
      const reason = isAbortError(err) ? "timed out" : (cause?.code ?? cause?.message ?? (err as Error).message);
      throw new HubConnectionError(`${what}: cannot reach ${new URL(url).origin} (${reason})`, { cause: err });
    }
  }

  /** Resolves a branch, tag or commit to its commit and file list. */
  async revisionInfo(repoId: string, revision: string): Promise<RevisionInfo> {
    return this.retrying(`${repoId}@${revision}`, () => this.revisionInfoOnce(repoId, revision));
  }

  private async revisionInfoOnce(repoId: string, revision: string): Promise<RevisionInfo> {
    const url = `${this.endpoint}/api/models/${repoId}/revision/${encodeURIComponent(revision)}`;
    const what = `${repoId}@${revision}`;
    const response = await this.request(url, { sendToken: true, timeoutMs: METADATA_TIMEOUT_MS }, what);
    if (!response.ok) throw await this.responseError(response, { repoId, revision });
    let body: { sha?: unknown; siblings?: unknown };
    try {
      body = (await response.json()) as typeof body;
    } catch (err) {
      throw new BlossomError("hub", `${what}: ${url} did not answer JSON (${(err as Error).message})`);
    }
    if (typeof body.sha !== "string" || !/^[0-9a-f]{40}$/.test(body.sha) || !Array.isArray(body.siblings)) {
      throw new BlossomError("hub", `${what}: ${url} answered without a commit "sha" and a "siblings" list`);
    }
    const siblings = body.siblings
      .map((s: unknown) => (s as { rfilename?: unknown } | null)?.rfilename)
      .filter((name): name is string => typeof name === "string");
    return { sha: body.sha, siblings };
  }

  /**
   * HEADs a file at a commit. Relative redirects (a renamed repo) are followed; an absolute one is the
   * CDN and becomes the download address, as in huggingface_hub's `get_hf_file_metadata`.
   */
  async fileMetadata(repoId: string, commit: string, filename: string): Promise<FileMetadata> {
    return this.retrying(`${repoId}/${filename}`, () => this.fileMetadataOnce(repoId, commit, filename));
  }

  private async fileMetadataOnce(repoId: string, commit: string, filename: string): Promise<FileMetadata> {
    let url = `${this.endpoint}/${repoId}/resolve/${encodeURIComponent(commit)}/${encodePath(filename)}`;
    const what = `${repoId}/${filename}`;
    for (let hop = 0; hop <= MAX_RELATIVE_REDIRECTS; hop++) {
      const response = await this.request(url, { method: "HEAD", sendToken: true, redirect: "manual", timeoutMs: METADATA_TIMEOUT_MS }, what);
      const location = response.headers.get("location");
      if (response.status >= 300 && response.status < 400 && location !== null) {
        const absolute = /^[a-z][a-z0-9+.-]*:\/\//i.test(location) || location.startsWith("//");
        if (!absolute) {
          url = new URL(location, url).href;
          continue;
        }
        return this.metadataFrom(response, repoId, filename, new URL(location, url).href, false);
      }
      if (!response.ok) throw await this.responseError(response, { repoId, revision: commit, filename });
      return this.metadataFrom(response, repoId, filename, url, true);
    }
    throw new BlossomError("hub", `${what}: more than ${MAX_RELATIVE_REDIRECTS} redirects from ${this.endpoint}`);
  }

  private metadataFrom(response: Response, repoId: string, filename: string, downloadUrl: string, sendToken: boolean): FileMetadata {
    const rawEtag = response.headers.get("x-linked-etag") ?? response.headers.get("etag");
    if (rawEtag === null || normalizeEtag(rawEtag) === "") {
      throw new BlossomError("hub", `${filename}: the Hub sent no ETag, so the file cannot be cached or verified`);
    }
    const etag = normalizeEtag(rawEtag);
    // The etag names the blob file in the cache: no path separators, and not "." or "..".
    if (!/^[A-Za-z0-9._-]+$/.test(etag) || /^\.+$/.test(etag)) throw new BlossomError("hub", `${filename}: unusable ETag '${rawEtag}'`);
    const sizeHeader = response.headers.get("x-linked-size") ?? response.headers.get("content-length");
    const size = sizeHeader !== null && /^\d+$/.test(sizeHeader) ? Number(sizeHeader) : undefined;
    return { repoId, filename, commit: response.headers.get("x-repo-commit") ?? undefined, etag, size, downloadUrl, sendToken };
  }

  /** Turns an error answer into a message that names the repo, revision or file and the fix. */
  async responseError(
    response: Response,
    about: { repoId: string; revision?: string; filename?: string },
  ): Promise<BlossomError> {
    const code = response.headers.get("x-error-code");
    const suffix = await errorDetail(response);
    const repo = `${about.repoId}${about.revision !== undefined ? `@${about.revision}` : ""}`;
    const target = about.filename !== undefined ? `${about.repoId}/${about.filename}` : repo;
    const tokenAdvice = this.hasToken
      ? "the token sent was not accepted for it"
      : "no token was sent: set HF_TOKEN (or pass --token) to a token with access";
    if (code === "GatedRepo" || ((response.status === 401 || response.status === 403) && code !== "RepoNotFound")) {
      // Access is granted per repo, so name the repo rather than whichever file was asked for first.
      return new BlossomError(
        "hub",
        `${about.repoId}: access denied by ${this.endpoint}: the repo is gated or private; accept its conditions at ` +
          `${this.endpoint}/${about.repoId} and use a token with access — ${tokenAdvice}${suffix}`,
      );
    }
    if (code === "RepoNotFound" || (response.status === 404 && code === null && about.filename === undefined)) {
      const privateHint = this.hasToken ? "" : " (if it is private, set HF_TOKEN)";
      return new BlossomError("hub", `${about.repoId}: no such model repo on ${this.endpoint}${privateHint}, and no local folder by that name${suffix}`);
    }
    if (code === "RevisionNotFound") {
      return new BlossomError("hub", `${repo}: revision '${about.revision}' not found in ${about.repoId} on ${this.endpoint}${suffix}`);
    }
    if (code === "EntryNotFound" || response.status === 404) {
      return new BlossomError("hub", `${target}: file not found at revision ${about.revision ?? "?"}${suffix}`);
    }
    if (response.status >= 500 || response.status === 429) {
      return new HubTransientError(`${target}: ${this.endpoint} answered ${response.status}${suffix}`);
    }
    return new BlossomError("hub", `${target}: ${this.endpoint} answered ${response.status}${suffix}`);
  }

  /**
   * An error answer from the server an LFS file is downloaded from (a CDN the Hub redirected to,
   * sent no token): it says nothing about the repo's access, so the message names that server.
   */
  async downloadError(response: Response, label: string, url: string): Promise<BlossomError> {
    const suffix = await errorDetail(response);
    const origin = new URL(url).origin;
    const status = response.status;
    if (status >= 500 || status === 429) return new HubTransientError(`${label}: the download server ${origin} answered ${status}${suffix}`);
    if (status === 401 || status === 403) {
      return new BlossomError("hub", `${label}: the download server ${origin} refused the file (${status}); the signed address the Hub gave may have expired: run the command again${suffix}`);
    }
    if (status === 404) return new BlossomError("hub", `${label}: the download server ${origin} has no such file (404), though the Hub listed it${suffix}`);
    return new BlossomError("hub", `${label}: the download server ${origin} answered ${status}${suffix}`);
  }
}

/** " (status: message)" from an error answer's JSON `error` or the start of its text; "" if none. */
async function errorDetail(response: Response): Promise<string> {
  let detail = "";
  try {
    const text = await response.text();
    try {
      const parsed = JSON.parse(text) as { error?: unknown };
      detail = typeof parsed.error === "string" ? parsed.error : "";
    } catch {
      detail = text.slice(0, 200);
    }
  } catch {
    // The body is only a detail.
  }
  return detail === "" ? "" : ` (${response.status}: ${detail})`;
}
