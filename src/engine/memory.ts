/**
 * The memory budget: what a batch will need (weights + KV cache + activations), predicted before
 * running it, and what the machine has. The one place that owns these numbers.
 */
import { readFileSync, statSync } from "node:fs";
import { freemem } from "node:os";
import { join } from "node:path";
import { native } from "../backend/native.js";
import { BlossomError } from "../errors.js";

export interface ModelShape {
  vocabSize: number;
  hiddenSize: number;
  numLayers: number;
  numHeads: number;
  /** Bytes of weights resident while computing (all of them for a resident store). */
  weightBytes: number;
  kvBytesPerToken: number;
}

export interface BatchMemory {
  weights: number;
  kvCache: number;
  activations: number;
  /** Node, the addon and the tokenizer before any model (measured: ~100 MB). */
  runtime: number;
  total: number;
}

/** What a process running a model holds besides weights, KV cache and activations (Node, the addon, the tokenizer, the worker). */
export const runtimeBytes = 120 * 2 ** 20;

/**
 * What a process loading the model in `dir` holds besides its weights, estimated from the files so
 * that `blossom plan` and the load itself reserve the same: the runtime, plus the tokenizer, whose
 * in-memory form is ~13 times its tokenizer.json (measured: BLOOM's 250880-token file, 11.3 MB, adds
 * 142 MB resident).
 */
export function processBytesEstimate(dir: string): number {
  let tokenizerFile = 0;
  try {
    tokenizerFile = statSync(join(dir, "tokenizer.json")).size;
  } catch {
    // No tokenizer: loading will say so.
  }
  return runtimeBytes + 13 * tokenizerFile;
}

/** What to count for this process when budgeting memory for `dir`: the estimate, or its resident size if more. */
export function processBytesFor(dir: string): number {
  return Math.max(native().residentBytes(), processBytesEstimate(dir));
}

/**
 * Memory one generation batch needs: every sequence caches prompt + new tokens; the largest step is
 * the prefill of all prompts (11 fp32 activations of width hidden per token: hidden x2, norm, qkv x3,
 * attention, mlp x4) plus the logits of every sequence, and the samplers' scratch.
 */
export function predictBatchMemory(
  shape: ModelShape,
  batchSize: number,
  promptTokens: number,
  newTokens: number,
  /** streams: replicas decoding a batch each (weights shared); processes: tensor-parallel ranks. */
  parallel: { streams?: number; processes?: number } = {},
): BatchMemory {
  const streams = parallel.streams ?? 1, processes = parallel.processes ?? 1;
  const tokens = batchSize * (promptTokens + newTokens);
  const kvCache = streams * tokens * shape.kvBytesPerToken;
  const prefillTokens = batchSize * promptTokens;
  // Every rank holds full-width activations; logits are gathered on rank 0.
  const activations = streams * processes * 4 * 11 * prefillTokens * shape.hiddenSize + streams * (4 * batchSize * shape.vocabSize + 24 * shape.vocabSize);
  const runtime = runtimeBytes * processes;
  const total = shape.weightBytes + kvCache + activations + runtime;
  return { weights: shape.weightBytes, kvCache, activations, runtime, total };
}

/** MemAvailable from /proc/meminfo (falls back to os.freemem()). */
export function availableMemory(): number {
  try {
    const m = /MemAvailable:\s+(\d+) kB/.exec(readFileSync("/proc/meminfo", "utf8"));
    if (m) return Number(m[1]) * 1024;
  } catch {
    // Not Linux.
  }
  return freemem();
}

const units: Record<string, number> = { "": 1, b: 1, k: 2 ** 10, kb: 1e3, kib: 2 ** 10, m: 2 ** 20, mb: 1e6, mib: 2 ** 20, g: 2 ** 30, gb: 1e9, gib: 2 ** 30, t: 2 ** 40, tb: 1e12, tib: 2 ** 40 };

/** Parses "24GiB", "512MB", "1.5g", "1073741824" into bytes. */
export function parseSize(text: string, name = "size"): number {
  const m = /^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$/.exec(text);
  const unit = m?.[2]?.toLowerCase() ?? "";
  if (!m || !(unit in units)) throw new BlossomError("parameter", `${name}: expected a size like 24GiB, 512MB or 1073741824, got "${text}"`);
  return Math.round(Number(m[1]) * units[unit]!);
}

export function formatBytes(bytes: number): string {
  const abs = Math.abs(bytes);
  if (abs >= 2 ** 30) return `${(bytes / 2 ** 30).toFixed(2)} GiB`;
  if (abs >= 2 ** 20) return `${(bytes / 2 ** 20).toFixed(1)} MiB`;
  if (abs >= 2 ** 10) return `${(bytes / 2 ** 10).toFixed(1)} KiB`;
  return `${bytes} B`;
}
