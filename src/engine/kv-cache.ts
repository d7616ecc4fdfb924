/**
 * The KV cache: a preallocated pool of fixed-size blocks per layer, handed out to sequences, so
 * its use can be counted and capped and sequences of any length can come and go (continuous
 * batching) without fragmentation. Layout per layer: (blocks, heads, blockSize, headDim) entries
 * for keys and the same for values, fp32 or (option kvDtype) fp16 / bf16. The pool's memory is
 * reserved up front but only touched pages become resident.
 */
import { freemem } from "node:os";
import { kvDtypes, kvEntryBytes, type Backend, type KVDType, type KVLayer } from "../backend/backend.js";
import { BlossomError } from "../errors.js";
import type { KVCacheLayers } from "../models/bloom.js";

export interface KVCacheShape {
  numLayers: number;
  numHeads: number;
  headDim: number;
  blockSize: number;
  numBlocks: number;
  dtype: KVDType;
}

/** Bytes one cached token takes across all layers (keys and values). */
export function kvBytesPerToken(shape: Pick<KVCacheShape, "numLayers" | "numHeads" | "headDim">, dtype: KVDType = "fp32"): number {
  return 2 * shape.numLayers * shape.numHeads * shape.headDim * kvEntryBytes(dtype);
}

/**
 * The default KV-cache capacity: what fits in a quarter of free memory, shared by `engines` engines
 * on this machine (replicas, or tensor-parallel ranks), at least 4096 and at most 1M tokens each.
 */
export function defaultKvCacheTokens(bytesPerToken: number, engines = 1, freeBytes = freemem()): number {
  return Math.min(1 << 20, Math.max(4096, Math.floor(freeBytes / 4 / engines / bytesPerToken)));
}

/** The KV-cache dtype option, validated ("fp32" when absent). */
export function resolveKvDtype(value: unknown): KVDType {
  if (value === undefined) return "fp32";
  if (typeof value === "string" && (kvDtypes as readonly string[]).includes(value)) return value as KVDType;
  throw new BlossomError("parameter", `kvDtype: expected one of ${kvDtypes.join(", ")}, got ${JSON.stringify(value)}`);
}

export class KVCachePool implements KVCacheLayers {
  readonly blockSize: number;
  readonly numBlocks: number;
  readonly shape: KVCacheShape;
  private readonly layers: KVLayer[];
  private readonly freeBlocks: number[];
  private readonly backend: Backend;

  constructor(backend: Backend, shape: KVCacheShape) {
    if (shape.numBlocks < 1) throw new BlossomError("memory", "the KV cache needs at least one block");
    this.backend = backend;
    this.shape = shape;
    this.blockSize = shape.blockSize;
    this.numBlocks = shape.numBlocks;
    const entries = shape.numBlocks * shape.numHeads * shape.blockSize * shape.headDim;
    this.layers = [];
    for (let i = 0; i < shape.numLayers; i++) this.layers.push({ dtype: shape.dtype, k: backend.allocKV(entries, shape.dtype), v: backend.allocKV(entries, shape.dtype) });
    // Popped from the end: low block numbers first, and recently freed (still resident) blocks reused first.
    this.freeBlocks = Array.from({ length: shape.numBlocks }, (_, i) => shape.numBlocks - 1 - i);
  }

  layer(i: number): KVLayer {
    return this.layers[i]!;
  }

  get freeBlockCount(): number {
    return this.freeBlocks.length;
  }
  get capacityTokens(): number {
    return this.numBlocks * this.blockSize;
  }
  blocksFor(tokens: number): number {
    return Math.ceil(tokens / this.blockSize);
  }

  /** Grows `blocks` so it holds `tokens` positions. Returns false (and takes nothing) if the pool is short. */
  reserve(blocks: number[], tokens: number): boolean {
    const needed = this.blocksFor(tokens) - blocks.length;
    if (needed <= 0) return true;
    if (needed > this.freeBlocks.length) return false;
    for (let i = 0; i < needed; i++) blocks.push(this.freeBlocks.pop()!);
    return true;
  }

  release(blocks: number[]): void {
    for (const b of blocks) this.freeBlocks.push(b);
    blocks.length = 0;
  }

  dispose(): void {
    for (const l of this.layers) {
      this.backend.freeKV(l.k);
      this.backend.freeKV(l.v);
    }
    this.layers.length = 0;
  }
}
