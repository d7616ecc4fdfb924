/**
 * The op interface the model is written against. Buffers and matrices are opaque handles owned
 * by a backend, so a GPU backend can slot in beside the CPU one without touching src/models/.
 * All activations are fp32; weights keep their storage dtype and are converted inside kernels.
 */
import type { StorageDType } from "./native.js";
import type { TensorView } from "../checkpoint/safetensors.js";

/** An fp32 activation buffer on the backend's device. */
export interface DeviceBuffer {
  readonly length: number;
}

/** How Backend.matrix may hold a weight matrix. */
export interface MatrixOptions {
  /**
   * "linear": only ever passed to linear(), so the backend may copy it into a layout of its own that
   * linear() computes faster with; "embedding" (the default) keeps nn.Linear's row-major layout, for
   * tables that embedding() also reads by row.
   */
  use?: "linear" | "embedding";
  /** The caller will not read the source again: where the backend copies it, it may drop its pages as it goes. */
  releaseSource?: boolean;
}

/** A weight matrix (out, in) in some storage dtype: nn.Linear's layout, or one of the backend's own (MatrixOptions.use). */
export interface DeviceMatrix {
  readonly dtype: StorageDType | "int8";
  readonly outFeatures: number;
  readonly inFeatures: number;
  /** Bytes this matrix occupies (weights and any scales). */
  readonly bytes: number;
}

/**
 * An int8 matrix (src/quant/): int8 values with fp16 scales per group of `groupSize` inputs, and
 * what the kernels do with the activations it meets. linear() and embedding() dispatch on dtype.
 */
export interface QuantizedMatrix extends DeviceMatrix {
  readonly dtype: "int8";
  readonly scheme: "int8" | "int8-mixed";
  /** Inputs per scale (<= inFeatures). */
  readonly groupSize: number;
  readonly activationMode: "exact" | "grouped" | "mixed";
  /** int8-mixed: |activation| at which an input feature is computed in fp32. */
  readonly threshold: number;
}

/** How a weight matrix is quantized (src/quant/scheme.ts resolves and validates it). */
export interface QuantizeOptions {
  scheme: QuantizedMatrix["scheme"];
  groupSize: number;
  activationMode: QuantizedMatrix["activationMode"];
  threshold: number;
  /** The caller will not read the source again: a backend may drop its pages as it goes (keeps the load's peak memory low). */
  releaseSource?: boolean;
}

export interface LinearOptions {
  gelu?: boolean;
  residual?: DeviceBuffer;
}

/**
 * How the KV cache holds keys and values: fp32, or fp16 / bf16 (half the memory, and half the
 * bytes each decode step reads from it; attention widens them to fp32 and computes in fp32).
 */
export type KVDType = "fp32" | "fp16" | "bf16";
export const kvDtypes: readonly KVDType[] = ["fp32", "fp16", "bf16"];

/** Bytes of one KV-cache entry. */
export function kvEntryBytes(dtype: KVDType): number {
  return dtype === "fp32" ? 4 : 2;
}

/** A KV-cache buffer of `length` entries of its layer's dtype. */
export interface KVBuffer {
  readonly length: number;
}

/** One layer's paged KV cache: (blocks, heads, blockSize, headDim) entries of `dtype` for keys and for values. */
export interface KVLayer {
  readonly dtype: KVDType;
  k: KVBuffer;
  v: KVBuffer;
}

/**
 * A ragged batch as the attention op sees it. For sequence s, seqs[4s..4s+3] =
 * (first row of its new tokens in the batch, number of new tokens, tokens already cached,
 * offset of its block list in blockTable).
 */
export interface AttentionBatch {
  seqs: Int32Array;
  blockTable: Int32Array;
}

export interface AttentionShape {
  numHeads: number;
  headDim: number;
  blockSize: number;
}

/** One op of a chain (Backend.chain), of one row: a layer norm, a linear or attention. (BloomModel.forward runs the same ops over many rows.) */
export type ChainOpSpec =
  | { kind: "layerNorm"; y: DeviceBuffer; x: DeviceBuffer; cols: number; gamma: DeviceBuffer; beta: DeviceBuffer; eps: number }
  | { kind: "linear"; y: DeviceBuffer; x: DeviceBuffer; weight: DeviceMatrix; bias: DeviceBuffer | null; gelu?: boolean; residual?: DeviceBuffer }
  /** attention(y, x (the qkv row), 1, cache, batch, slopes, shape), the batch given to runChain. */
  | { kind: "attention"; y: DeviceBuffer; x: DeviceBuffer; cache: KVLayer; slopes: DeviceBuffer; shape: AttentionShape };

/** Ops prepared by Backend.chain. */
export interface OpChain {
  readonly __brand: "OpChain";
}

/** What settleMappedWeights found and did, in bytes (summed over the mapped files). */
export interface MappedWeightsReport {
  /** Bytes of weights used in place. */
  bytes: number;
  /** Of them, the bytes 2 MiB page-table entries could map (whole aligned 2 MiB pieces). */
  eligibleBytes: number;
  /** Bytes of the files' mappings mapped 2 MiB at a time before, and after. */
  hugeBytesBefore: number;
  hugeBytesAfter: number;
  /** Files whose pages were dropped and read again to get there. */
  filesReread: number;
}

export interface Backend {
  readonly name: string;

  alloc(length: number): DeviceBuffer;
  free(buffer: DeviceBuffer): void;
  /** A KV-cache buffer of `length` entries of `dtype` (large ones are resident only once touched). */
  allocKV(length: number, dtype: KVDType): KVBuffer;
  freeKV(buffer: KVBuffer): void;
  upload(data: Float32Array): DeviceBuffer;
  /**
   * `length` floats starting at `offset`, on the host. The result may be a view that stays valid
   * only until the buffer is next written; copy it to keep it.
   */
  download(buffer: DeviceBuffer, offset: number, length: number): Float32Array;

  /** A weight matrix, converted to `dtype` if that differs from how it is stored (an explicit, measured choice). */
  matrix(view: TensorView, dtype: StorageDType, options?: MatrixOptions): DeviceMatrix;
  /** A small parameter vector (bias, layer-norm gain), converted to fp32. */
  vector(view: TensorView): DeviceBuffer;
  /**
   * An int8 matrix quantized from `view` (f32/f16/bf16), or, given `scales`, one that wraps a
   * pre-quantized int8 tensor and its fp16 scales in place. Backends without int8 leave it out.
   */
  quantizedMatrix?(view: TensorView, options: QuantizeOptions, scales?: TensorView): QuantizedMatrix;
  /** Hint: nothing will read `view`'s bytes again (its data was copied or quantized); a backend may drop its pages. */
  releaseSource?(view: TensorView): void;
  /**
   * Makes the matrices handed out since the last call that are used in place from a mapped file
   * resident now, held by the page cache in 2 MiB pieces where it can (decoding streams them faster
   * so: see the CPU backend). Backends that copy every weight leave it out.
   */
  settleMappedWeights?(): MappedWeightsReport;
  /** Frees what matrix() allocated (a no-op for matrices used in place). */
  freeMatrix(matrix: DeviceMatrix): void;

  /**
   * out (n, hidden) = table[ids]. With firstId, the table is a vocabulary shard holding ids
   * [firstId, firstId + rows) and other ids give zero rows (tensor parallelism).
   */
  embedding(out: DeviceBuffer, ids: Int32Array, table: DeviceMatrix, firstId?: number): void;
  /** out (rows, cols) = layer_norm(x) * gamma + beta. */
  layerNorm(out: DeviceBuffer, x: DeviceBuffer, rows: number, cols: number, gamma: DeviceBuffer, beta: DeviceBuffer, eps: number): void;
  /** out (rows, out) = act(x (rows, in) @ W^T + bias) + residual. */
  linear(out: DeviceBuffer, x: DeviceBuffer, rows: number, weight: DeviceMatrix, bias: DeviceBuffer | null, options?: LinearOptions): void;
  /**
   * Single-row ops prepared once and run as one unit: a decode step's ops, attention included, with
   * the same arithmetic as the ops one by one. Undefined where the backend cannot chain them (a
   * matrix it streams from disk); then the caller runs the ops. The buffers must
   * stay allocated while the chain is used. A chain with attention ops takes the step's batch (one
   * sequence decoding one token).
   */
  chain?(ops: readonly ChainOpSpec[]): OpChain | undefined;
  /** Runs a chain; true if its ops ran as one job (false: one by one, the same results). */
  runChain?(chain: OpChain, batch?: AttentionBatch): boolean;
  /** Appends the batch's new keys/values to the cache, then out (tokens, heads*headDim) = ALiBi causal attention. */
  attention(out: DeviceBuffer, qkv: DeviceBuffer, numTokens: number, cache: KVLayer, batch: AttentionBatch, slopes: DeviceBuffer, shape: AttentionShape): void;
  /** out (rows.length, cols) = x[rows]. */
  gatherRows(out: DeviceBuffer, x: DeviceBuffer, rows: Int32Array, cols: number): void;

  /**
   * Pipeline devices: creates `count` compute devices (on the CPU backend, thread pools pinned to
   * disjoint sets of cores); useDevice(k) makes later ops run on device k, undefined on the default.
   */
  createDevices?(count: number): void;
  useDevice?(device: number | undefined): void;

  dispose(): void;
}
