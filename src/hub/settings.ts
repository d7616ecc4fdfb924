/**
 * Where the Hub is, who we are and where the cache lives: the same environment variables, defaults
 * and precedence as Python's huggingface_hub (`constants.py`), so both share one cache and one login.
 */
import { readFileSync } from "node:fs";
import { homedir } from "node:os";
import { join } from "node:path";
import { BlossomError } from "../errors.js";

export const DEFAULT_ENDPOINT = "https://huggingface.co";

function env(name: string): string | undefined {
  const value = process.env[name];
  return value === undefined || value.trim() === "" ? undefined : value.trim();
}

function expandHome(path: string): string {
  return path === "~" || path.startsWith("~/") ? join(homedir(), path.slice(1)) : path;
}

function isTrue(value: string | undefined): boolean {
  return value !== undefined && ["1", "ON", "YES", "TRUE"].includes(value.toUpperCase());
}

export function hubEndpoint(override?: string): string {
  return (override ?? env("HF_ENDPOINT") ?? DEFAULT_ENDPOINT).replace(/\/+$/, "");
}

/** `$HF_HOME`, else `$XDG_CACHE_HOME/huggingface`, else `~/.cache/huggingface`. */
export function hfHome(): string {
  return expandHome(env("HF_HOME") ?? join(env("XDG_CACHE_HOME") ?? join(homedir(), ".cache"), "huggingface"));
}

/** `$HF_HUB_CACHE`, else the legacy `$HUGGINGFACE_HUB_CACHE`, else `$HF_HOME/hub`. */
export function hubCacheDir(override?: string): string {
  return expandHome(override ?? env("HF_HUB_CACHE") ?? env("HUGGINGFACE_HUB_CACHE") ?? join(hfHome(), "hub"));
}

/**
 * The explicit token, else `HF_TOKEN`, `HUGGING_FACE_HUB_TOKEN`, else the file `huggingface-cli login`
 * writes (`$HF_TOKEN_PATH`, default `$HF_HOME/token`). An empty explicit token means "send none".
 */
export function hubToken(override?: string): string | undefined {
  if (override !== undefined) return override.trim() === "" ? undefined : override.trim();
  const fromEnv = env("HF_TOKEN") ?? env("HUGGING_FACE_HUB_TOKEN");
  if (fromEnv !== undefined) return fromEnv;
  try {
    const saved = readFileSync(expandHome(env("HF_TOKEN_PATH") ?? join(hfHome(), "token")), "utf8").trim();
    return saved === "" ? undefined : saved;
  } catch {
    return undefined;
  }
}

/** `HF_HUB_OFFLINE` (or the older `TRANSFORMERS_OFFLINE`) set to 1/ON/YES/TRUE. */
export function hubOffline(override?: boolean): boolean {
  return override ?? isTrue(env("HF_HUB_OFFLINE") ?? env("TRANSFORMERS_OFFLINE"));
}

/**
 * How long a file transfer may receive nothing before it is abandoned and retried from where it
 * stopped: `HF_HUB_DOWNLOAD_TIMEOUT` seconds, 10 by default (huggingface_hub's variable and default).
 */
export function hubDownloadTimeoutMs(): number {
  const value = env("HF_HUB_DOWNLOAD_TIMEOUT");
  if (value === undefined) return 10_000;
  const seconds = Number(value);
  if (!(seconds > 0) || !Number.isFinite(seconds)) throw new BlossomError("parameter", `HF_HUB_DOWNLOAD_TIMEOUT: expected a positive number of seconds, got ${JSON.stringify(value)}`);
  // Timers hold at most 2^31 - 1 ms (24.8 days; a larger value fires at once): a huge value means "no limit".
  return Math.min(seconds * 1000, 2 ** 31 - 1);
}
