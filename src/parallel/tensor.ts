/**
 * Tensor parallelism (DeepSpeed-Inference's way), over MPI: each rank holds a slice of every layer
 * and all ranks compute every step together.
 *
 *   query_key_value   split by heads (rows of W, contiguous: BLOOM's per-head [q|k|v] layout)
 *   dense_h_to_4h     split by output columns (rows of W, contiguous)
 *   self_attention.dense, dense_4h_to_h   split by input features (columns of W, copied out),
 *                     their partial sums all-reduced; bias and residual added on rank 0 only
 *   word_embeddings / tied head           split by vocabulary rows: a lookup is an all-reduce of
 *                     zero-padded rows, the head's logits are gathered on rank 0
 *
 * Head, column and vocabulary counts that N does not divide are split as evenly as possible, so any
 * N up to the number of heads works. Rank 0 runs the scheduler and broadcasts each step; the other
 * ranks follow. Only rank 0 talks to the user.
 */
import type { Backend, DeviceBuffer, DeviceMatrix } from "../backend/backend.js";
import type { CpuMatrix } from "../backend/cpu.js";
import { DTypeCode, native, type StorageDType } from "../backend/native.js";
import type { TensorView } from "../checkpoint/safetensors.js";
import type { BloomConfig } from "../checkpoint/config.js";
import { BlossomError } from "../errors.js";
import type { BloomTensors, LinearTensors } from "../models/bloom-weights.js";
import type { BloomModel, Collectives, ForwardStep, KVCacheLayers, ModelShard } from "../models/bloom.js";
import type { BloomLayerWeights, DeviceLinear, WeightBuilder, WeightStore, DeviceNorm } from "../engine/weights.js";

/** [start, start+size) of `total` items for `rank` of `ranks`, the first (total % ranks) ranks taking one more. */
export function evenSplit(total: number, ranks: number, rank: number): { start: number; size: number } {
  const base = Math.floor(total / ranks), extra = total % ranks;
  return { start: rank * base + Math.min(rank, extra), size: base + (rank < extra ? 1 : 0) };
}

export function tensorShard(config: BloomConfig, rank: number, size: number): ModelShard {
  if (size > config.numHeads) {
    throw new BlossomError("parameter", `tensor parallelism over ${size} ranks needs at least ${size} attention heads; this model has ${config.numHeads}`);
  }
  const heads = evenSplit(config.numHeads, size, rank);
  const ffn = evenSplit(4 * config.hiddenSize, size, rank);
  const vocab = evenSplit(config.vocabSize, size, rank);
  return { headStart: heads.start, numHeads: heads.size, ffnStart: ffn.start, ffnSize: ffn.size, vocabStart: vocab.start, vocabSize: vocab.size };
}

/** The MPI world as seen by the engine worker (which initialises MPI and makes every MPI call). */
export class MpiCollectives implements Collectives {
  readonly rank: number;
  readonly size: number;
  private readonly vocabCounts: Int32Array;
  private gathered: Float32Array | undefined;

  constructor(world: { rank: number; size: number }, private readonly config: BloomConfig) {
    this.rank = world.rank;
    this.size = world.size;
    this.vocabCounts = Int32Array.from({ length: world.size }, (_, r) => evenSplit(config.vocabSize, world.size, r).size);
  }

  allReduceSum(buffer: DeviceBuffer, length: number): void {
    native().mpiAllReduceSum(buffer as Float32Array, length);
  }

  gatherVocab(local: DeviceBuffer, rows: number): Float32Array | undefined {
    const V = this.config.vocabSize;
    const counts = Int32Array.from(this.vocabCounts, (c) => c * rows);
    const displs = new Int32Array(this.size);
    for (let r = 1; r < this.size; r++) displs[r] = displs[r - 1]! + counts[r - 1]!;
    if (this.rank === 0 && (!this.gathered || this.gathered.length < rows * V)) this.gathered = new Float32Array(rows * V);
    native().mpiGather(local as Float32Array, counts[this.rank]!, this.rank === 0 ? this.gathered! : null, counts, displs, 0);
    if (this.rank !== 0) return undefined;
    // Rank-major (rank, row, shard column) -> row-major (row, vocabulary).
    const out = new Float32Array(rows * V);
    let vocabStart = 0;
    for (let r = 0; r < this.size; r++) {
      const n = this.vocabCounts[r]!;
      for (let row = 0; row < rows; row++) {
        const from = displs[r]! + row * n;
        out.set(this.gathered!.subarray(from, from + n), row * V + vocabStart);
      }
      vocabStart += n;
    }
    return out;
  }

  /** The smallest of every rank's `value`, a safe integer (each rank broadcasts its own in turn). */
  minAcrossRanks(value: number): number {
    let min = value;
    for (let root = 0; root < this.size; root++) {
      const v = Float64Array.of(root === this.rank ? value : 0);
      native().mpiBroadcast(v, root);
      min = Math.min(min, v[0]!);
    }
    return min;
  }

  /** Rank 0: sends the step to the followers before computing it. */
  broadcastStep(step: ForwardStep): void {
    const header = Int32Array.of(1, step.tokenIds.length, step.batch.seqs.length, step.batch.blockTable.length, step.logitRows.length);
    native().mpiBroadcast(header, 0);
    for (const a of [step.tokenIds, step.batch.seqs, step.batch.blockTable, step.logitRows]) if (a.length) native().mpiBroadcast(a, 0);
  }

  /** Rank 0: tells the followers to stop. */
  broadcastExit(): void {
    native().mpiBroadcast(Int32Array.of(0, 0, 0, 0, 0), 0);
  }

  /** Followers: the next step, or undefined when rank 0 is done. */
  receiveStep(): ForwardStep | undefined {
    const header = new Int32Array(5);
    native().mpiBroadcast(header, 0);
    if (header[0] === 0) return undefined;
    const [tokens, seqs, table, rows] = [header[1]!, header[2]!, header[3]!, header[4]!].map((n) => new Int32Array(n)) as [Int32Array, Int32Array, Int32Array, Int32Array];
    for (const a of [tokens, seqs, table, rows]) if (a.length) native().mpiBroadcast(a, 0);
    return { tokenIds: tokens, batch: { seqs, blockTable: table }, logitRows: rows };
  }
}

/** Followers' loop: compute every step rank 0 broadcasts, until it says stop. */
export function followSteps(model: BloomModel, kvCache: KVCacheLayers, comm: MpiCollectives): void {
  for (let step = comm.receiveStep(); step; step = comm.receiveStep()) {
    try {
      model.forward(step, kvCache);
    } catch (err) {
      // Rank 0 waits for this rank in the next collective: end the job rather than hang.
      process.stderr.write(`blossom (tensor-parallel rank ${comm.rank}): ${(err as Error).message}\n`);
      native().mpiAbort(1);
    }
  }
}

const elementBytes: Record<StorageDType, number> = { f32: 4, f16: 2, bf16: 2, i8: 1 };

/** Rows [start, start+count) of a 2-D tensor, or elements of a 1-D one: a view, no copy. */
function rowSlice(view: TensorView, start: number, count: number): TensorView {
  const rowElements = view.shape.length === 2 ? view.shape[1]! : 1;
  const rowBytes = rowElements * elementBytes[view.dtype];
  return {
    ...view,
    shape: view.shape.length === 2 ? [count, rowElements] : [count],
    byteOffset: view.byteOffset + start * rowBytes,
    byteLength: count * rowBytes,
  };
}

/** This rank's slice of every weight: row slices used in place, column slices copied out. */
export class TensorParallelWeightStore implements WeightStore {
  readonly wordEmbeddings: DeviceMatrix;
  readonly wordEmbeddingsLayernorm: DeviceNorm;
  readonly lnF: DeviceNorm;
  readonly lmHead: DeviceMatrix;
  readonly numLayers: number;
  private readonly layers: BloomLayerWeights[];
  private readonly owned: CpuMatrix[] = [];
  private ownedBytes = 0;

  constructor(
    tensors: BloomTensors,
    private readonly builder: WeightBuilder,
    private readonly backend: Backend,
    shard: ModelShard,
    config: BloomConfig,
    /** The dtype a column slice is copied into; with `quantized`, the builder then quantizes the copy. */
    dtypeOf: (view: TensorView) => StorageDType,
    private readonly quantized = false,
  ) {
    const d = config.headDim;
    const rowParallel = (t: LinearTensors, start: number, count: number): DeviceLinear => ({
      weight: builder.matrix(rowSlice(t.weight, start, count), "linear"),
      bias: builder.vector(rowSlice(t.bias, start, count)),
    });
    const columnParallel = (t: LinearTensors, start: number, count: number): DeviceLinear => ({
      weight: this.columns(t.weight, start, count, dtypeOf(t.weight)),
      bias: builder.vector(t.bias), // added on rank 0 only
    });
    this.layers = tensors.layers.map((l) => ({
      inputLayernorm: builder.norm(l.inputLayernorm),
      queryKeyValue: rowParallel(l.queryKeyValue, 3 * d * shard.headStart, 3 * d * shard.numHeads),
      dense: columnParallel(l.dense, d * shard.headStart, d * shard.numHeads),
      postAttentionLayernorm: builder.norm(l.postAttentionLayernorm),
      denseHTo4h: rowParallel(l.denseHTo4h, shard.ffnStart, shard.ffnSize),
      dense4hToH: columnParallel(l.dense4hToH, shard.ffnStart, shard.ffnSize),
    }));
    this.numLayers = this.layers.length;
    this.wordEmbeddings = builder.matrix(rowSlice(tensors.wordEmbeddings, shard.vocabStart, shard.vocabSize), "embedding");
    this.wordEmbeddingsLayernorm = builder.norm(tensors.wordEmbeddingsLayernorm);
    this.lnF = builder.norm(tensors.lnF);
    this.lmHead = tensors.lmHeadTied ? this.wordEmbeddings : builder.matrix(rowSlice(tensors.lmHead, shard.vocabStart, shard.vocabSize), "lm_head");
  }

  /** W[:, start : start+count] in `dtype`, copied into memory this store owns (and quantized, for int8 dtypes). */
  private columns(view: TensorView, start: number, count: number, dtype: StorageDType): DeviceMatrix {
    const [rows, cols] = view.shape as [number, number];
    if (view.dtype === "i8") throw new BlossomError("parameter", "tensor parallelism quantizes at load: load the original checkpoint with --dtype int8, not a pre-quantized one");
    const bytes = rows * count * elementBytes[dtype];
    const region = native().allocate(bytes);
    native().sliceColumns(region, 0, DTypeCode[dtype], view.region, view.byteOffset, DTypeCode[view.dtype], rows, cols, start, count);
    // The copy touched every row of the mapped matrix; drop those pages so this rank keeps only its slice.
    native().advise(view.region, view.byteOffset, view.byteLength, "dontneed");
    const slice: TensorView = { ...view, name: `${view.name}[:, ${start}:${start + count}]`, dtype, shape: [rows, count], region, byteOffset: 0, byteLength: bytes };
    if (this.quantized) {
      const m = this.builder.matrix(slice, "linear");
      native().release(region);
      return m;
    }
    // The slice as it is, or (long rows) the backend's copy in column panels, made from it.
    const made = this.backend.matrix(slice, dtype, { use: "linear", releaseSource: true }) as CpuMatrix;
    const inPlace = made.region === region;
    if (!inPlace) native().release(region);
    const m: CpuMatrix = inPlace ? { ...made, owned: true } : made;
    this.owned.push(m);
    this.ownedBytes += m.bytes;
    return m;
  }

  get weightBytes(): number {
    return this.builder.bytes + this.ownedBytes;
  }
  layer(i: number): BloomLayerWeights {
    return this.layers[i]!;
  }
  releaseLayer(): void {}
  dispose(): void {
    for (const m of this.owned) this.backend.freeMatrix(m);
    this.builder.freeAll();
  }
}
