/**
 * A quantized copy of a checkpoint in Blossom's cache, made once (as `blossom quantize` would) and
 * then memory-mapped. Strategies that share or stream weights use it instead of quantizing at load:
 * replicas map one int8 copy instead of quantizing one each, and pipeline offload reads int8 layers
 * from disk.
 */
import { createHash } from "node:crypto";
import { existsSync, realpathSync, statSync } from "node:fs";
import { basename, dirname, join } from "node:path";
import { Worker } from "node:worker_threads";
import { blossomCacheDir } from "../cache.js";
import { createFolder, removeDeadPartialsOf } from "../folders.js";
import { BlossomError } from "../errors.js";
import { quantSpec, type QuantScheme } from "./scheme.js";

export async function quantizedCopy(source: string, scheme: QuantScheme, groupSize?: number): Promise<string> {
  const spec = quantSpec(scheme, scheme === "int8" ? { groupSize } : {});
  const real = realpathSync(source);
  // The source's identity: its path and its config's modification time.
  const stamp = statSync(join(real, "config.json")).mtimeMs;
  const key = createHash("sha256").update(`${real}\n${stamp}\n${scheme}\n${spec.groupSize}`).digest("hex").slice(0, 16);
  const out = join(blossomCacheDir(), "quantized", `${basename(real)}-${scheme}-g${spec.groupSize}-${key}`);
  if (existsSync(join(out, "config.json"))) {
    removeDeadPartialsOf(out); // what writers killed mid-way left beside it
    return out;
  }
  try {
    createFolder(dirname(out));
  } catch (err) {
    throw new BlossomError("parameter", `BLOSSOM_CACHE: cannot keep the quantized copy in ${dirname(out)} (${(err as NodeJS.ErrnoException).code ?? String(err)}); set BLOSSOM_CACHE to a writable folder`);
  }
  // quantizeCheckpoint writes beside `out` and renames into place (or finds another process's there).
  const result = await new Promise<{ ok: boolean; message?: string }>((resolve, reject) => {
    const worker = new Worker(new URL("./cache-worker.js", import.meta.url), {
      workerData: { source: real, out, scheme, ...(scheme === "int8" ? { groupSize: spec.groupSize } : {}) },
    });
    worker.once("message", resolve);
    worker.once("error", reject);
  });
  if (!result.ok && !existsSync(join(out, "config.json"))) {
    throw new BlossomError("checkpoint", `quantizing ${source} into the cache failed: ${result.message}`);
  }
  return out;
}
