import { homedir } from "node:os";
import { join } from "node:path";

/** Where Blossom keeps what it creates: $BLOSSOM_CACHE, else $XDG_CACHE_HOME/blossom, else ~/.cache/blossom. */
export function blossomCacheDir(): string {
  return process.env.BLOSSOM_CACHE ?? join(process.env.XDG_CACHE_HOME ?? join(homedir(), ".cache"), "blossom");
}
