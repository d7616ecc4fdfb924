/**
 * Weight stores: the model asks for a layer's weights and the store decides where they live.
 * The resident store keeps every layer ready: used in place from the memory-mapped files when
 * the requested dtype is the stored one, converted once at load otherwise. Offload and int8
 * are further store policies (src/parallel/, src/quant/), not changes to the model.
 */
import type { Backend, DeviceBuffer, DeviceMatrix } from "../backend/backend.js";
import type { StorageDType } from "../backend/native.js";
import type { BloomLayerTensors, BloomTensors, LinearTensors, NormTensors } from "../models/bloom-weights.js";
import type { TensorView } from "../checkpoint/safetensors.js";
import type { OffloadStats } from "../parallel/offload.js";

export interface DeviceNorm {
  weight: DeviceBuffer;
  bias: DeviceBuffer;
}
export interface DeviceLinear {
  weight: DeviceMatrix;
  bias: DeviceBuffer;
}
export interface BloomLayerWeights {
  inputLayernorm: DeviceNorm;
  queryKeyValue: DeviceLinear;
  dense: DeviceLinear;
  postAttentionLayernorm: DeviceNorm;
  denseHTo4h: DeviceLinear;
  dense4hToH: DeviceLinear;
}

export interface WeightStore {
  readonly wordEmbeddings: DeviceMatrix;
  readonly wordEmbeddingsLayernorm: DeviceNorm;
  readonly lnF: DeviceNorm;
  readonly lmHead: DeviceMatrix;
  readonly numLayers: number;
  /** The weights of layer i, ready to compute with. */
  layer(i: number): BloomLayerWeights;
  /** Every matrix stays where it is between steps, with nothing to load or drop per layer (no hooks below do anything). */
  readonly staysInPlace?: boolean;
  /** Called when the forward pass has finished with layer i (offloading stores drop it). */
  releaseLayer(i: number): void;
  /** Called at the start of each forward step (before the embeddings). */
  beginStep?(): void;
  /** Called before the final norm and head. */
  beginHead?(): void;
  /** Called at the end of each forward step (after the head). */
  endStep?(): void;
  /** Disk-offload figures, for stores that offload. */
  offloadStats?(): OffloadStats;
  /** Bytes of weight data the store holds or maps (matrices in their in-memory dtype, plus fp32 vectors). */
  readonly weightBytes: number;
  dispose(): void;
}

/** In-memory weight formats, as the CLI's --dtype and loadModel's dtype name them. */
export type WeightDType = "auto" | "fp32" | "bf16" | "fp16" | "int8" | "int8-mixed";
const storageOf: Record<"fp32" | "bf16" | "fp16", StorageDType> = { fp32: "f32", bf16: "bf16", fp16: "f16" };

/** How a matrix stored as `stored` is held in memory under the requested dtype (int8 dtypes go through src/quant/store.ts). */
export function matrixDtype(stored: StorageDType, requested: WeightDType): StorageDType {
  if (requested === "int8" || requested === "int8-mixed") throw new Error(`internal: ${requested} matrices are built by the int8 store`);
  return requested === "auto" ? stored : storageOf[requested];
}

/**
 * Builds device weights from checkpoint tensors. `matrix` decides each weight matrix's in-memory
 * form (so int8 stores can substitute quantized matrices); vectors are always fp32.
 */
export class WeightBuilder {
  bytes = 0;
  private readonly matrices: DeviceMatrix[] = [];
  constructor(
    private readonly backend: Backend,
    private readonly makeMatrix: (view: TensorView, role: "embedding" | "lm_head" | "linear") => DeviceMatrix,
  ) {}

  /**
   * The matrix makeMatrix would build, without holding it: for matrices used in place (as stored,
   * or pre-quantized), a description of how to compute with their bytes wherever they are staged.
   */
  describe(view: TensorView, role: "embedding" | "lm_head" | "linear"): DeviceMatrix {
    return this.makeMatrix(view, role);
  }

  matrix(view: TensorView, role: "embedding" | "lm_head" | "linear"): DeviceMatrix {
    const m = this.makeMatrix(view, role);
    this.matrices.push(m);
    this.bytes += m.bytes;
    return m;
  }
  vector(view: TensorView): DeviceBuffer {
    const v = this.backend.vector(view);
    this.bytes += v.length * 4;
    return v;
  }
  norm(t: NormTensors): DeviceNorm {
    return { weight: this.vector(t.weight), bias: this.vector(t.bias) };
  }
  linear(t: LinearTensors): DeviceLinear {
    return { weight: this.matrix(t.weight, "linear"), bias: this.vector(t.bias) };
  }
  layer(t: BloomLayerTensors): BloomLayerWeights {
    return {
      inputLayernorm: this.norm(t.inputLayernorm),
      queryKeyValue: this.linear(t.queryKeyValue),
      dense: this.linear(t.dense),
      postAttentionLayernorm: this.norm(t.postAttentionLayernorm),
      denseHTo4h: this.linear(t.denseHTo4h),
      dense4hToH: this.linear(t.dense4hToH),
    };
  }
  freeAll(): void {
    for (const m of this.matrices) this.backend.freeMatrix(m);
    this.matrices.length = 0;
  }
}

/** Every layer resident (mapped in place, or converted once at load). */
export class ResidentWeightStore implements WeightStore {
  readonly staysInPlace = true;
  readonly wordEmbeddings: DeviceMatrix;
  readonly wordEmbeddingsLayernorm: DeviceNorm;
  readonly lnF: DeviceNorm;
  readonly lmHead: DeviceMatrix;
  readonly numLayers: number;
  private readonly layers: BloomLayerWeights[];
  private readonly builder: WeightBuilder;

  constructor(tensors: BloomTensors, builder: WeightBuilder) {
    this.builder = builder;
    this.wordEmbeddings = builder.matrix(tensors.wordEmbeddings, "embedding");
    this.wordEmbeddingsLayernorm = builder.norm(tensors.wordEmbeddingsLayernorm);
    this.layers = tensors.layers.map((l) => builder.layer(l));
    this.lnF = builder.norm(tensors.lnF);
    // A tied head shares the embedding matrix: same memory, read twice per token.
    this.lmHead = tensors.lmHeadTied ? this.wordEmbeddings : builder.matrix(tensors.lmHead, "lm_head");
    this.numLayers = this.layers.length;
  }

  get weightBytes(): number {
    return this.builder.bytes;
  }
  layer(i: number): BloomLayerWeights {
    return this.layers[i]!;
  }
  releaseLayer(): void {}
  dispose(): void {
    this.builder.freeAll();
  }
}
