/**
 * The whole native surface in one place: every function the C++ addon exports, typed.
 * Model code never calls this directly; it goes through a Backend (src/backend/backend.ts).
 */
import { createRequire } from "node:module";
import { fileURLToPath } from "node:url";

/** A file mapping or page-aligned allocation owned by the addon. Opaque to TypeScript. */
export type NativeRegion = { readonly __brand: "NativeRegion" };
export type NativeChain = { readonly __brand: "NativeChain" };

/** Weight storage dtypes; the numbers are the addon's DType enum. */
export const DTypeCode = { f32: 0, f16: 1, bf16: 2, i8: 3 } as const;
export type StorageDType = keyof typeof DTypeCode;

export interface CpuInfo {
  model: string;
  avx2: boolean;
  fma: boolean;
  f16c: boolean;
  avx512f: boolean;
  /** AVX-VNNI (vpdpwssd/vpdpbusd, VEX-encoded): the int8 kernels use it where present. */
  avxVnni: boolean;
  logicalCores: number;
  physicalCores: number;
}

/** scalar reference; AVX2/FMA/F16C; the same plus AVX-VNNI in the int8 kernels (identical results). */
export type KernelVariant = "scalar" | "avx2" | "avx2-vnni";

export interface NativeAddon {
  // memory
  mapFile(path: string): NativeRegion;
  allocate(bytes: number): NativeRegion;
  /** A zeroed ArrayBuffer starting on a 64-byte boundary, freed by the garbage collector. */
  allocAligned(bytes: number): ArrayBuffer;
  /** Frees the region now and detaches its views. Returns false if it was already released. */
  release(region: NativeRegion): boolean;
  regionSize(region: NativeRegion): number;
  /** An ArrayBuffer over [byteOffset, byteOffset+byteLength) of the region, without copying (< 4 GiB). */
  view(region: NativeRegion, byteOffset: number, byteLength: number): ArrayBuffer;
  advise(region: NativeRegion, byteOffset: number, byteLength: number, how: "willneed" | "dontneed" | "nohugepage"): void;
  /**
   * For a file mapping: makes the (byteOffset, byteLength) ranges resident and, where the page cache
   * holds them in pieces smaller than 2 MiB, drops them and reads them again through the mapping so
   * that they come back as 2 MiB folios (native/src/memory.cc). All zeros for other regions.
   */
  settleFilePages(region: NativeRegion, ranges: Float64Array): { eligibleBytes: number; beforeBytes: number; afterBytes: number; reread: boolean };
  /**
   * Single-row ops to run as one thread-pool job (native/src/matmul.cc run_chain).
   * An op: [0, y, x, cols, gamma, beta, eps], [1, y, x, wRegion, wOffset, wDtype, out, in, panelK, bias, epilogue, residual]
   * or [2, out, qkv, kCache, vCache, kvDtype, numHeads, headDim, blockSize, slopes] (attention of one
   * token: runChain then takes the step's seqs and blockTable, one sequence decoding one token), or
   * [3, y, x, qRegion, qOffset, sRegion, sOffset, out, in, groupSize, activationMode, threshold, bias,
   * epilogue, residual] (linearInt8 of one row).
   */
  createChain(ops: unknown[][]): NativeChain;
  runChain(chain: NativeChain, seqs?: Int32Array, blockTable?: Int32Array): boolean;
  /** The process's resident set in bytes; with a buffer, the bytes of it in resident pages. */
  residentBytes(buffer?: ArrayBufferLike | ArrayBufferView): number;
  /**
   * Queues a background read of [fileOffset, fileOffset+byteLength) of `path` into the region at
   * dstOffset (disk offload); with evictAfter the pages are then dropped from the page cache.
   * Returns a ticket for waitRead.
   */
  readFile(path: string, fileOffset: number, byteLength: number, dst: NativeRegion, dstOffset: number, evictAfter: boolean): number;
  /** Blocks until the read is done; returns [seconds spent waiting, seconds the read took]. Throws on a read error. */
  waitRead(ticket: number): [number, number];
  // machine and threads
  cpuInfo(): CpuInfo;
  setThreads(threads: number): void;
  getThreads(): number;
  /** Pipeline devices: one dedicated pool per device, its threads pinned to the listed cores. */
  createDevices(cpuSets: number[][]): void;
  /** Kernels run on device `index`'s pool from now on; -1 returns to the default pool. */
  useDevice(index: number): void;
  setKernelVariant(variant: KernelVariant | "auto"): void;
  getKernelVariant(): KernelVariant;
  // kernels
  /**
   * y (rows, out) = epilogue(x (rows, in) @ W^T + bias) + residual; W is (out, in) at (region, offset),
   * row-major, or with panelK > 0 in column panels of panelK inputs (native/src/kernels.h WeightMatrix).
   */
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
    panelK?: number,
  ): void;
  /** y (rows, cols) = layer_norm(x) * gamma + beta, fp32. */
  layerNorm(y: Float32Array, x: Float32Array, rows: number, cols: number, gamma: Float32Array, beta: Float32Array, eps: number): void;
  /** y (n, hidden) = table[ids] as fp32; table (vocab, hidden) at (region, offset). */
  embedding(y: Float32Array, ids: Int32Array, table: NativeRegion, tableOffset: number, dtype: number, vocab: number, hidden: number): void;
  convert(dst: NativeRegion, dstOffset: number, dstDtype: number, src: NativeRegion, srcOffset: number, srcDtype: number, n: number): void;
  /** dst (rows, count) = src (rows, cols)[:, first : first+count], converted: a row-split tensor-parallel shard. */
  /** Rows [rowBegin, rowEnd) of a row-major (out, in) matrix at src, converted, into dst's copy of it in column panels of panelK inputs. */
  toPanels(dst: NativeRegion, dstOffset: number, dstDtype: number, src: NativeRegion, srcOffset: number, srcDtype: number, out: number, inF: number, panelK: number, rowBegin: number, rowEnd: number): void;
  sliceColumns(dst: NativeRegion, dstOffset: number, dstDtype: number, src: NativeRegion, srcOffset: number, srcDtype: number, rows: number, cols: number, first: number, count: number): void;
  /** Embedding lookup in a vocabulary shard holding ids [firstId, firstId+vocab); other ids give zero rows. */
  embeddingShard(y: Float32Array, ids: Int32Array, table: NativeRegion, tableOffset: number, dtype: number, vocab: number, hidden: number, firstId: number): void;
  /**
   * Greedy choice for many rows: ids[r] = argmax of row r (lowest id on ties), logprobs[r] its log-softmax;
   * rows with suppressRows[r] set first mask the `suppress` ids to -inf (eos during min_new_tokens).
   */
  greedyRows(logits: Float32Array, rows: number, stride: number, vocab: number, suppress: Int32Array, suppressRows: Uint8Array, ids: Int32Array, logprobs: Float64Array): void;
  // MPI (tensor parallelism); every call but mpiAvailable throws when the addon was built without MPI.
  mpiAvailable(): boolean;
  /** MPI_Init_thread (FUNNELED) from the calling thread, once; the world and this node's share of it. */
  mpiInit(): { rank: number; size: number; localRank: number; localSize: number };
  mpiAllReduceSum(data: Float32Array, count: number): void;
  /** Broadcasts the array's bytes from `root`, in place. */
  mpiBroadcast(data: ArrayBufferView, root: number): void;
  /** Rank `root` receives counts[r] floats from rank r at displs[r] into recv (null elsewhere). */
  mpiGather(send: Float32Array, count: number, recv: Float32Array | null, counts: Int32Array, displs: Int32Array, root: number): void;
  mpiFinalize(): void;
  /** Ends every rank of the MPI job with `code` (a rank failed; the others would wait for it forever). */
  mpiAbort(code: number): never;
  /**
   * Ragged-batch ALiBi attention over a paged KV cache (see native/src/attention.cc).
   * seqs holds (tokenStart, numNew, pastLen, blockTableOffset) per sequence. kvDtype (default
   * DTypeCode.f32): the caches' dtype, f32 in Float32Arrays or f16 / bf16 bits in Uint16Arrays.
   */
  attention(
    out: Float32Array,
    qkv: Float32Array,
    numTokens: number,
    numHeads: number,
    headDim: number,
    kCache: Float32Array | Uint16Array,
    vCache: Float32Array | Uint16Array,
    blockSize: number,
    seqs: Int32Array,
    blockTable: Int32Array,
    slopes: Float32Array,
    kvDtype?: number,
  ): void;
  // probes and benchmark inputs (native/src/probes.cc)
  /**
   * GB/s: best of `runs` (default 5) multi-threaded AVX2 streaming reads over a `bytes` buffer: a fresh
   * one freed after, or `buffer` (an allocated region of at least `bytes`) kept by a caller that probes often.
   */
  probeReadBandwidth(bytes: number, threads: number, runs?: number, buffer?: NativeRegion): number;
  /** GFLOP/s: best of `runs` (default 5) rounds of independent 256-bit FMA chains on `threads` threads. */
  probeFmaPeak(threads: number, runs?: number): number;
  /** Fills `count` values of `dtype` at (region, byteOffset) uniform in [-scale, scale), deterministic in `seed`. */
  fillRandom(region: NativeRegion, byteOffset: number, dtype: number, count: number, seed: number, scale: number): void;
  /**
   * Sets one of linear's blocking parameters for tuning experiments (bench/tune-linear.ts):
   * gemvMaxRows, gemvChunkBytes, gemvPrefetch, kc, nb, mc. Returns false for an unknown name or value.
   */
  setLinearTuning(name: string, value: number): boolean;
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
