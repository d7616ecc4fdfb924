/**
 * The whole native surface in one place: every function the C++ addon exports, typed.
 * Model code never calls this directly; it goes through a Backend (src/backend/backend.ts).
 */
import { createRequire } from "node:module";
import { fileURLToPath } from "node:url";

/** A file mapping or page-aligned allocation owned by the addon. Opaque to TypeScript. */
export type NativeRegion = { readonly __brand: "NativeRegion" };

/** Weight storage dtypes; the numbers are the addon's DType enum. */
export const DTypeCode = { f32: 0, f16: 1, bf16: 2, i8: 3 } as const;
export type StorageDType = keyof typeof DTypeCode;

export interface CpuInfo {
  model: string;
  avx2: boolean;
  fma: boolean;
  f16c: boolean;
  avx512f: boolean;
  logicalCores: number;
  physicalCores: number;
}

export type KernelVariant = "scalar" | "avx2";

export interface NativeAddon {
  // memory
  mapFile(path: string): NativeRegion;
  allocate(bytes: number): NativeRegion;
  /** Frees the region now and detaches its views. Returns false if it was already released. */
  release(region: NativeRegion): boolean;
  regionSize(region: NativeRegion): number;
  /** An ArrayBuffer over [byteOffset, byteOffset+byteLength) of the region, without copying (< 4 GiB). */
  view(region: NativeRegion, byteOffset: number, byteLength: number): ArrayBuffer;
  advise(region: NativeRegion, byteOffset: number, byteLength: number, how: "willneed" | "dontneed"): void;
  residentBytes(): number;
  // machine and threads
  cpuInfo(): CpuInfo;
  setThreads(threads: number): void;
  getThreads(): number;
  setKernelVariant(variant: KernelVariant | "auto"): void;
  getKernelVariant(): KernelVariant;
  // kernels
  /** y (rows, out) = epilogue(x (rows, in) @ W^T + bias) + residual; W is (out, in) at (region, offset). */
  linear(
    y: Float32Array,
    x: Float32Array,
    rows: number,
    weight: NativeRegion,
    weightOffset: number,
    weightDtype: number,
    outFeatures: number,
    inFeatures: number,
    bias: Float32Array | null,
    epilogue: number,
    residual: Float32Array | null,
  ): void;
  /** y (rows, cols) = layer_norm(x) * gamma + beta, fp32. */
  layerNorm(y: Float32Array, x: Float32Array, rows: number, cols: number, gamma: Float32Array, beta: Float32Array, eps: number): void;
  /** y (n, hidden) = table[ids] as fp32; table (vocab, hidden) at (region, offset). */
  embedding(y: Float32Array, ids: Int32Array, table: NativeRegion, tableOffset: number, dtype: number, vocab: number, hidden: number): void;
  convert(dst: NativeRegion, dstOffset: number, dstDtype: number, src: NativeRegion, srcOffset: number, srcDtype: number, n: number): void;
  /**
   * Ragged-batch ALiBi attention over a paged KV cache (see native/src/attention.cc).
   * seqs holds (tokenStart, numNew, pastLen, blockTableOffset) per sequence.
   */
  attention(
    out: Float32Array,
    qkv: Float32Array,
    numTokens: number,
    numHeads: number,
    headDim: number,
    kCache: Float32Array,
    vCache: Float32Array,
    blockSize: number,
    seqs: Int32Array,
    blockTable: Int32Array,
    slopes: Float32Array,
  ): void;
  // probes and benchmark inputs (native/src/probes.cc)
  /** GB/s: best of `runs` (default 5) multi-threaded AVX2 streaming reads over a fresh `bytes` buffer. */
  probeReadBandwidth(bytes: number, threads: number, runs?: number): number;
  /** GFLOP/s: best of `runs` (default 5) rounds of independent 256-bit FMA chains on `threads` threads. */
  probeFmaPeak(threads: number, runs?: number): number;
  /** Fills `count` values of `dtype` at (region, byteOffset) uniform in [-scale, scale), deterministic in `seed`. */
  fillRandom(region: NativeRegion, byteOffset: number, dtype: number, count: number, seed: number, scale: number): void;
  // int8 (native/src/quant.cc): q (out, in) int8 at (qRegion, qOffset), fp16 scales (out, ceil(in / groupSize)) at (sRegion, sOffset)
  /** Quantizes W (out, in) of an f32/f16/bf16 source: per group, scale = absmax / 127 (rounded up to fp16), q = round(w / scale). */
  quantizeWeights(
    qRegion: NativeRegion,
    qOffset: number,
    sRegion: NativeRegion,
    sOffset: number,
    source: NativeRegion,
    sourceOffset: number,
    sourceDtype: number,
    outFeatures: number,
    inFeatures: number,
    groupSize: number,
  ): void;
  /**
   * y (rows, out) = epilogue(x' @ dequant(W)^T + bias) + residual, where x' is x under `activationMode`
   * (ActivationMode). Returns the number of outlier features kept in fp32 (mixed mode), else 0.
   */
  linearInt8(
    y: Float32Array,
    x: Float32Array,
    rows: number,
    qRegion: NativeRegion,
    qOffset: number,
    sRegion: NativeRegion,
    sOffset: number,
    outFeatures: number,
    inFeatures: number,
    groupSize: number,
    bias: Float32Array | null,
    epilogue: number,
    residual: Float32Array | null,
    activationMode: number,
    threshold: number,
  ): number;
  /** y (n, hidden) = dequant(table)[ids]. */
  embeddingInt8(
    y: Float32Array,
    ids: Int32Array,
    qRegion: NativeRegion,
    qOffset: number,
    sRegion: NativeRegion,
    sOffset: number,
    vocab: number,
    hidden: number,
    groupSize: number,
  ): void;
}

/** What linearInt8 does to the activations (native/src/quant.h). */
export const ActivationMode = { exact: 0, grouped: 1, mixed: 2 } as const;

export const Epilogue = { none: 0, gelu: 1 } as const;

let addon: NativeAddon | undefined;

/** Loads build/Release/blossom_native.node (built by node-gyp during npm install). */
export function native(): NativeAddon {
  if (!addon) {
    const require = createRequire(import.meta.url);
    const path = fileURLToPath(new URL("../../../build/Release/blossom_native.node", import.meta.url));
    try {
      addon = require(path) as NativeAddon;
    } catch (err) {
      throw new Error(`cannot load the native addon at ${path}; run \`npm install\` (or \`npm run build:native\`) first`, {
        cause: err,
      });
    }
  }
  return addon;
}
