/** BLOOM as the planner sees it: its top-level modules in execution order, with their in-memory sizes. */
import type { StorageDType } from "../backend/native.js";
import type { TensorView } from "../checkpoint/safetensors.js";
import type { BloomTensors, LinearTensors, NormTensors } from "../models/bloom-weights.js";
import type { PlannedModule } from "./planner.js";

const elementBytes: Record<StorageDType, number> = { f32: 4, f16: 2, bf16: 2, i8: 1 };

/** Bytes of one weight matrix held as `dtype` (in memory or in the offload folder). */
export type MatrixBytes = (view: TensorView) => number;

export function matrixBytesAs(dtypeOf: (view: TensorView) => StorageDType): MatrixBytes {
  return (view) => view.shape.reduce((a, b) => a * b, 1) * elementBytes[dtypeOf(view)];
}

const vectorBytes = (v: TensorView) => v.shape.reduce((a, b) => a * b, 1) * 4; // vectors are fp32
const normBytes = (n: NormTensors) => vectorBytes(n.weight) + vectorBytes(n.bias);
const linearBytes = (l: LinearTensors, matrix: MatrixBytes) => matrix(l.weight) + vectorBytes(l.bias);

export function bloomModules(tensors: BloomTensors, matrix: MatrixBytes): PlannedModule[] {
  return [
    { name: "word_embeddings", bytes: matrix(tensors.wordEmbeddings) },
    { name: "word_embeddings_layernorm", bytes: normBytes(tensors.wordEmbeddingsLayernorm) },
    ...tensors.layers.map((l, i) => ({
      name: `h.${i}`,
      bytes:
        normBytes(l.inputLayernorm) +
        linearBytes(l.queryKeyValue, matrix) +
        linearBytes(l.dense, matrix) +
        normBytes(l.postAttentionLayernorm) +
        linearBytes(l.denseHTo4h, matrix) +
        linearBytes(l.dense4hToH, matrix),
    })),
    { name: "ln_f", bytes: normBytes(tensors.lnF) },
    tensors.lmHeadTied ? { name: "lm_head", bytes: 0, tiedTo: "word_embeddings" } : { name: "lm_head", bytes: matrix(tensors.lmHead) },
  ];
}
