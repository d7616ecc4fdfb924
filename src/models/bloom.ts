/**
 * BLOOM (BigScience, 2022), the forward pass over a ragged batch of sequences.
 *
 *   x = LayerNorm(E[ids])                                   word_embeddings + word_embeddings_layernorm
 *   for each block:
 *     ln  = LayerNorm(x)                                    input_layernorm
 *     qkv = ln W_qkv^T + b                                  fused, viewed per head as [q | k | v]
 *     a   = softmax(alibi + q k^T / sqrt(d)) v              causal, ALiBi, fp32 softmax
 *     x2  = a W_o^T + b + (post-LN residual ? ln : x)       self_attention.dense
 *     ln2 = LayerNorm(x2)                                   post_attention_layernorm
 *     x   = gelu(ln2 W_1^T + b1) W_2^T + b2 + (post-LN residual ? ln2 : x2)
 *   logits = LayerNorm(x) E^T                               ln_f, LM head tied to the embeddings
 *
 * Reference: transformers/models/bloom/modeling_bloom.py. Ops come from a Backend; weights from
 * a WeightStore; keys and values live in a paged KV cache. This file knows BLOOM, never threads
 * or SIMD.
 */
import type { AttentionBatch, Backend, ChainOpSpec, DeviceBuffer, KVLayer, OpChain } from "../backend/backend.js";
import type { BloomConfig } from "../checkpoint/config.js";
import type { WeightStore } from "../engine/weights.js";
import { alibiSlopes } from "../layers/alibi.js";

/** An op of a block, with what forward() does after it (see BloomModel.layerOps). */
interface LayerOp {
  op: ChainOpSpec;
  /** The name its output is traced under (onIntermediate). */
  name: string;
  /** Columns of its output. */
  width: number;
  /** Sum the output over the tensor-parallel ranks. */
  allReduce?: boolean;
}

/** What one forward step computes: the new tokens of every sequence in the batch. */
export interface ForwardStep {
  /** New token ids of all sequences, concatenated (T tokens). */
  tokenIds: Int32Array;
  /** Where each sequence's tokens sit in tokenIds and in the KV cache. */
  batch: AttentionBatch;
  /** Rows of the batch (0..T-1) whose next-token logits are wanted. */
  logitRows: Int32Array;
}

export interface KVCacheLayers {
  readonly blockSize: number;
  layer(i: number): KVLayer;
}

/** Receives named intermediates when debugging: (name, layer or -1, rows x cols fp32 values). */
export type IntermediateHook = (name: string, layer: number, values: Float32Array, rows: number, cols: number) => void;

/**
 * The slice of the model this process computes. One process holds everything; a tensor-parallel
 * rank holds a range of attention heads, of MLP columns and of the vocabulary.
 */
export interface ModelShard {
  headStart: number;
  numHeads: number;
  ffnStart: number;
  ffnSize: number;
  vocabStart: number;
  vocabSize: number;
}

/** Collectives between tensor-parallel ranks; absent on a single process. */
export interface Collectives {
  readonly rank: number;
  /** Sums a buffer over all ranks, in place. */
  allReduceSum(buffer: DeviceBuffer, length: number): void;
  /** Gathers each rank's logits (rows x its vocabulary shard) into rank 0's rows x vocab; undefined elsewhere. */
  gatherVocab(local: DeviceBuffer, rows: number): Float32Array | undefined;
}

export function fullShard(config: BloomConfig): ModelShard {
  return { headStart: 0, numHeads: config.numHeads, ffnStart: 0, ffnSize: 4 * config.hiddenSize, vocabStart: 0, vocabSize: config.vocabSize };
}

/** Activation buffers for up to `capacity` tokens, reused across steps. */
class Workspace {
  capacity = 0;
  hidden!: DeviceBuffer; // x
  hidden2!: DeviceBuffer; // x2 (after attention)
  normed!: DeviceBuffer; // ln / ln2
  qkv!: DeviceBuffer;
  attention!: DeviceBuffer;
  mlp!: DeviceBuffer; // gelu(ln2 W_1^T + b1)
  private logits: DeviceBuffer | undefined;

  constructor(
    private readonly backend: Backend,
    private readonly hiddenSize: number,
    private readonly attentionWidth: number, // local heads x head_dim
    private readonly ffnSize: number,
  ) {}

  /** Changes whenever a buffer is replaced (a chain built on the old ones must not run). */
  generation = 0;

  ensure(tokens: number): void {
    if (tokens <= this.capacity) return;
    const cap = Math.max(tokens, Math.ceil(this.capacity * 1.5));
    const H = this.hiddenSize, b = this.backend;
    this.release();
    this.generation++;
    this.hidden = b.alloc(cap * H);
    this.hidden2 = b.alloc(cap * H);
    this.normed = b.alloc(cap * H);
    this.qkv = b.alloc(cap * 3 * this.attentionWidth);
    this.attention = b.alloc(cap * this.attentionWidth);
    this.mlp = b.alloc(cap * this.ffnSize);
    this.capacity = cap;
  }

  /** The logits buffer, grown to hold at least `length` floats. */
  logitsFor(length: number): DeviceBuffer {
    if (!this.logits || this.logits.length < length) {
      if (this.logits) this.backend.free(this.logits);
      this.logits = this.backend.alloc(length);
      this.generation++;
    }
    return this.logits;
  }

  release(): void {
    if (this.logits) this.backend.free(this.logits);
    this.logits = undefined;
    if (this.capacity === 0) return;
    for (const buf of [this.hidden, this.hidden2, this.normed, this.qkv, this.attention, this.mlp]) this.backend.free(buf);
    this.capacity = 0;
  }
}

export class BloomModel {
  readonly config: BloomConfig;
  readonly shard: ModelShard;
  private readonly backend: Backend;
  private readonly weights: WeightStore;
  private readonly slopes: DeviceBuffer;
  private readonly workspace: Workspace;
  private readonly comm: Collectives | undefined;
  /** Set to receive named intermediates (slow: copies every activation to the host). */
  onIntermediate: IntermediateHook | undefined;
  /**
   * Whether a step of one token runs its ops, attention included, as one chain (Backend.chain), where
   * the backend and the weights allow: same arithmetic, fewer calls. False runs every op on its own
   * (tests compare the two).
   */
  chainDecode = true;
  /** The decode chain and the workspace generation and KV cache it was built on; null once found impossible. */
  private decodeChain: { chain: OpChain; generation: number; kvCache: KVCacheLayers } | null | undefined;

  constructor(config: BloomConfig, weights: WeightStore, backend: Backend, parallel?: { shard: ModelShard; comm: Collectives }) {
    this.config = config;
    this.backend = backend;
    this.weights = weights;
    this.shard = parallel?.shard ?? fullShard(config);
    this.comm = parallel?.comm;
    const { headStart, numHeads, ffnSize } = this.shard;
    this.slopes = backend.upload(alibiSlopes(config.numHeads).slice(headStart, headStart + numHeads));
    this.workspace = new Workspace(backend, config.hiddenSize, numHeads * config.headDim, ffnSize);
  }

  /**
   * Runs one step; returns logits (logitRows.length x vocab) on the host. The array may be a view
   * of a reused buffer: it is valid until the next forward().
   */
  forward(step: ForwardStep, kvCache: KVCacheLayers): Float32Array {
    if (step.tokenIds.length === 1 && step.logitRows.length === 1 && this.chainDecode && !this.onIntermediate) {
      const chained = this.chainedDecode(step, kvCache);
      if (chained) return chained;
    }
    const { backend: ops, weights, config } = this;
    const H = config.hiddenSize, T = step.tokenIds.length, eps = config.layerNormEpsilon;
    const { shard, comm } = this;
    // Bias and residual join a row-parallel linear's partial sums on one rank only, before the all-reduce.
    const first = !comm || comm.rank === 0;
    const ws = this.workspace;
    ws.ensure(Math.max(T, step.logitRows.length));

    weights.beginStep?.();
    ops.embedding(ws.normed, step.tokenIds, weights.wordEmbeddings, comm ? shard.vocabStart : undefined);
    comm?.allReduceSum(ws.normed, T * H); // each rank looked up the ids of its vocabulary shard
    this.trace("word_embeddings", -1, ws.normed, T, H);
    const emb = weights.wordEmbeddingsLayernorm;
    ops.layerNorm(ws.hidden, ws.normed, T, H, emb.weight, emb.bias, eps);
    this.trace("word_embeddings_layernorm", -1, ws.hidden, T, H);

    for (let i = 0; i < config.numLayers; i++) {
      for (const { op, name, width, allReduce } of this.layerOps(i, kvCache, first)) {
        this.runOp(op, T, step.batch);
        if (allReduce) comm?.allReduceSum(op.y, T * H);
        this.trace(name, i, op.y, T, width);
      }
      weights.releaseLayer(i);
    }

    // Final norm and LM head, only for the rows whose logits are wanted.
    const rows = step.logitRows.length;
    if (rows === 0) {
      weights.endStep?.();
      return new Float32Array(0);
    }
    weights.beginHead?.();
    ops.gatherRows(ws.hidden2, ws.hidden, step.logitRows, H);
    ops.layerNorm(ws.normed, ws.hidden2, rows, H, weights.lnF.weight, weights.lnF.bias, eps);
    this.trace("ln_f", -1, ws.normed, rows, H);
    const logits = ws.logitsFor(rows * shard.vocabSize);
    ops.linear(logits, ws.normed, rows, weights.lmHead, null);
    weights.endStep?.();
    if (comm) return comm.gatherVocab(logits, rows) ?? new Float32Array(0);
    return ops.download(logits, 0, rows * config.vocabSize);
  }

  /**
   * A step of one token with its logits (batch-1 decoding): the embedding, then the whole step as one
   * chain (every layer's norms, matrices and attention, the final norm and the LM head, for one row).
   * Decoding at batch 1 is bound by reading the weights; as a chain a thread goes from its share of
   * one matrix to its share of the next without returning to JavaScript between them (see
   * native/src/matmul.cc, run_chain). Undefined where it does not apply (tensor parallelism, weights
   * loaded per layer).
   */
  private chainedDecode(step: ForwardStep, kvCache: KVCacheLayers): Float32Array | undefined {
    const { backend: ops, weights, config } = this;
    if (this.comm || !weights.staysInPlace || !ops.chain || !ops.runChain || this.decodeChain === null) return undefined;
    // The chain's attention has one row: one sequence decoding that one token (any other batch, e.g.
    // one with an idle sequence beside it, takes the general path).
    const { seqs } = step.batch;
    if (seqs.length !== 4 || seqs[0] !== 0 || seqs[1] !== 1) return undefined;
    const ws = this.workspace;
    ws.ensure(1);
    const logits = ws.logitsFor(config.vocabSize);
    let built = this.decodeChain;
    if (!built || built.generation !== ws.generation || built.kvCache !== kvCache) {
      const chain = ops.chain(this.decodeChainOps(logits, kvCache));
      if (!chain) {
        this.decodeChain = null;
        return undefined;
      }
      built = this.decodeChain = { chain, generation: ws.generation, kvCache };
    }
    const H = config.hiddenSize;
    ops.embedding(ws.normed, step.tokenIds, weights.wordEmbeddings);
    const emb = weights.wordEmbeddingsLayernorm;
    ops.layerNorm(ws.hidden, ws.normed, 1, H, emb.weight, emb.bias, config.layerNormEpsilon);
    ops.runChain(built.chain, step.batch);
    return ops.download(logits, 0, config.vocabSize);
  }

  /** The decode chain's ops: forward()'s, for one row. */
  private decodeChainOps(logits: DeviceBuffer, kvCache: KVCacheLayers): ChainOpSpec[] {
    const { weights, config } = this;
    const ws = this.workspace, H = config.hiddenSize, eps = config.layerNormEpsilon;
    const list: ChainOpSpec[] = [];
    for (let i = 0; i < config.numLayers; i++) list.push(...this.layerOps(i, kvCache, true).map((o) => o.op));
    // The final norm reads the hidden state directly: forward() gathers the one row into hidden2 first (the same values).
    list.push({ kind: "layerNorm", y: ws.normed, x: ws.hidden, cols: H, gamma: weights.lnF.weight, beta: weights.lnF.bias, eps });
    list.push({ kind: "linear", y: logits, x: ws.normed, weight: weights.lmHead, bias: null });
    return list;
  }

  /**
   * Block i's ops, in order, written once for both paths: forward() runs them one by one over its
   * rows, all-reducing where `allReduce` says (tensor parallelism) and tracing each output under
   * `name` (`width` columns); the decode chain runs them for one row. `first`: this rank adds the
   * row-parallel linears' bias and residual (the one rank that does, before the all-reduce).
   */
  private layerOps(i: number, kvCache: KVCacheLayers, first: boolean): LayerOp[] {
    const { weights, config, shard } = this;
    const ws = this.workspace, H = config.hiddenSize, eps = config.layerNormEpsilon;
    const A = shard.numHeads * config.headDim; // this rank's attention width
    const postLN = config.applyResidualConnectionPostLayernorm;
    const shape = { numHeads: shard.numHeads, headDim: config.headDim, blockSize: kvCache.blockSize };
    const layer = weights.layer(i);
    return [
      // Attention block.
      { name: "attn_norm", width: H, op: { kind: "layerNorm", y: ws.normed, x: ws.hidden, cols: H, gamma: layer.inputLayernorm.weight, beta: layer.inputLayernorm.bias, eps } },
      { name: "qkv", width: 3 * A, op: { kind: "linear", y: ws.qkv, x: ws.normed, weight: layer.queryKeyValue.weight, bias: layer.queryKeyValue.bias } },
      { name: "attn", width: A, op: { kind: "attention", y: ws.attention, x: ws.qkv, cache: kvCache.layer(i), slopes: this.slopes, shape } },
      {
        name: "attn_out", // all-reduce point 1: after self_attention.dense
        width: H,
        allReduce: true,
        op: { kind: "linear", y: ws.hidden2, x: ws.attention, weight: layer.dense.weight, bias: first ? layer.dense.bias : null, ...(first ? { residual: postLN ? ws.normed : ws.hidden } : {}) },
      },
      // MLP block.
      { name: "ffn_norm", width: H, op: { kind: "layerNorm", y: ws.normed, x: ws.hidden2, cols: H, gamma: layer.postAttentionLayernorm.weight, beta: layer.postAttentionLayernorm.bias, eps } },
      { name: "ffn_gelu", width: shard.ffnSize, op: { kind: "linear", y: ws.mlp, x: ws.normed, weight: layer.denseHTo4h.weight, bias: layer.denseHTo4h.bias, gelu: true } },
      {
        name: "block_out", // all-reduce point 2: after mlp.dense_4h_to_h
        width: H,
        allReduce: true,
        op: { kind: "linear", y: ws.hidden, x: ws.mlp, weight: layer.dense4hToH.weight, bias: first ? layer.dense4hToH.bias : null, ...(first ? { residual: postLN ? ws.normed : ws.hidden2 } : {}) },
      },
    ];
  }

  /** Runs one op over `rows` rows (attention: the batch's new tokens). */
  private runOp(op: ChainOpSpec, rows: number, batch: AttentionBatch): void {
    const ops = this.backend;
    switch (op.kind) {
      case "layerNorm":
        return ops.layerNorm(op.y, op.x, rows, op.cols, op.gamma, op.beta, op.eps);
      case "linear":
        return ops.linear(op.y, op.x, rows, op.weight, op.bias, { ...(op.gelu ? { gelu: true } : {}), ...(op.residual ? { residual: op.residual } : {}) });
      case "attention":
        return ops.attention(op.y, op.x, rows, op.cache, batch, op.slopes, op.shape);
    }
  }

  private trace(name: string, layer: number, buffer: DeviceBuffer, rows: number, cols: number): void {
    if (this.onIntermediate) this.onIntermediate(name, layer, this.backend.download(buffer, 0, rows * cols), rows, cols);
  }

  dispose(): void {
    this.decodeChain = undefined; // it holds the workspace and every layer's KV cache
    this.workspace.release();
    this.backend.free(this.slopes);
  }
}
