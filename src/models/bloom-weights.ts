/**
 * The one place that maps checkpoint tensor names to BLOOM's weights: strips the optional
 * "transformer." prefix, accepts a tied or explicit lm_head, and checks every tensor's shape and
 * dtype against the config before anything is computed.
 */
import { join } from "node:path";
import type { Checkpoint } from "../checkpoint/checkpoint.js";
import type { BloomConfig } from "../checkpoint/config.js";
import { checkCoverage, type TensorView } from "../checkpoint/safetensors.js";
import { checkpointError } from "../errors.js";
import type { StorageDType } from "../backend/native.js";

export interface LinearTensors {
  weight: TensorView;
  bias: TensorView;
}
export interface NormTensors {
  weight: TensorView;
  bias: TensorView;
}
export interface BloomLayerTensors {
  inputLayernorm: NormTensors;
  queryKeyValue: LinearTensors;
  dense: LinearTensors;
  postAttentionLayernorm: NormTensors;
  denseHTo4h: LinearTensors;
  dense4hToH: LinearTensors;
}
export interface BloomTensors {
  wordEmbeddings: TensorView;
  wordEmbeddingsLayernorm: NormTensors;
  layers: BloomLayerTensors[];
  lnF: NormTensors;
  /** The LM head: its own tensor if the checkpoint stores one, else the tied word embeddings. */
  lmHead: TensorView;
  lmHeadTied: boolean;
}

const torchToStorage: Record<NonNullable<BloomConfig["torchDtype"]>, StorageDType> = { float32: "f32", float16: "f16", bfloat16: "bf16" };

/** Expected shape of every BLOOM tensor (canonical names, no prefix). */
export function bloomTensorShapes(config: BloomConfig): Map<string, number[]> {
  const H = config.hiddenSize, V = config.vocabSize;
  const shapes = new Map<string, number[]>([
    ["word_embeddings.weight", [V, H]],
    ["word_embeddings_layernorm.weight", [H]],
    ["word_embeddings_layernorm.bias", [H]],
    ["ln_f.weight", [H]],
    ["ln_f.bias", [H]],
  ]);
  for (let i = 0; i < config.numLayers; i++) {
    const p = `h.${i}.`;
    shapes.set(`${p}input_layernorm.weight`, [H]);
    shapes.set(`${p}input_layernorm.bias`, [H]);
    shapes.set(`${p}self_attention.query_key_value.weight`, [3 * H, H]);
    shapes.set(`${p}self_attention.query_key_value.bias`, [3 * H]);
    shapes.set(`${p}self_attention.dense.weight`, [H, H]);
    shapes.set(`${p}self_attention.dense.bias`, [H]);
    shapes.set(`${p}post_attention_layernorm.weight`, [H]);
    shapes.set(`${p}post_attention_layernorm.bias`, [H]);
    shapes.set(`${p}mlp.dense_h_to_4h.weight`, [4 * H, H]);
    shapes.set(`${p}mlp.dense_h_to_4h.bias`, [4 * H]);
    shapes.set(`${p}mlp.dense_4h_to_h.weight`, [H, 4 * H]);
    shapes.set(`${p}mlp.dense_4h_to_h.bias`, [H]);
  }
  return shapes;
}

/** Canonical name: without the "transformer." prefix some checkpoints (BloomForCausalLM's state dict) carry. */
export function canonicalBloomName(name: string): string {
  return name.startsWith("transformer.") ? name.slice("transformer.".length) : name;
}

/**
 * Maps and validates a checkpoint's tensors. `extraTensors` names tensors another component
 * (the int8 quantizer) owns, which are therefore not "unexpected".
 */
export function bloomTensors(checkpoint: Checkpoint, options: { isExtraTensor?: (canonicalName: string) => boolean } = {}): BloomTensors {
  const { config } = checkpoint;
  // Checked before listing every layer's tensors: a corrupt n_layer (1e9) must not build a map that large.
  if (config.numLayers * 12 > checkpoint.tensors.size) {
    throw checkpointError(join(checkpoint.dir, "config.json"), `n_layer ${config.numLayers} needs 12 tensors a layer, but the checkpoint holds ${checkpoint.tensors.size} tensors in all`);
  }
  const shapes = bloomTensorShapes(config);
  const byName = new Map<string, TensorView>();
  let lmHead: TensorView | undefined;
  const expectedDtype = config.torchDtype && !config.quantization ? torchToStorage[config.torchDtype] : undefined;
  for (const [stored, view] of checkpoint.tensors) {
    const name = canonicalBloomName(stored);
    if (name === "lm_head.weight") {
      lmHead = view;
      continue;
    }
    if (byName.has(name)) throw checkpointError(view.file, `tensor "${stored}" appears twice (with and without the "transformer." prefix)`);
    if (!shapes.has(name)) {
      if (options.isExtraTensor?.(name)) continue;
      const layer = /^h\.(\d+)\./.exec(name);
      const why = layer && Number(layer[1]) >= config.numLayers ? ` (config.json has n_layer ${config.numLayers})` : "";
      throw checkpointError(view.file, `unexpected tensor "${stored}"${why}`);
    }
    byName.set(name, view);
  }
  for (const [name, shape] of shapes) {
    const view = byName.get(name);
    if (!view) {
      if (options.isExtraTensor?.(name)) continue;
      throw checkpointError(checkpoint.dir, `missing tensor "${name}" (expected shape [${shape.join(", ")}])`);
    }
    checkShape(view, shape, config);
    if (view.dtype === "i8" && !config.quantization) {
      throw checkpointError(view.file, `tensor "${view.name}" is int8 but config.json has no quantization_config`);
    }
    if (expectedDtype && view.dtype !== expectedDtype) {
      throw checkpointError(view.file, `tensor "${view.name}" is ${view.dtype} but config.json says torch_dtype ${config.torchDtype}`);
    }
  }
  if (lmHead) checkShape(lmHead, [config.vocabSize, config.hiddenSize], config);
  for (const f of checkpoint.files) checkCoverage(f.file, f.header);
  // Tied (transformers' default for BLOOM): the head is the embeddings, as BloomForCausalLM.tie_weights()
  // makes it; a stored copy is not read. Untied: the stored head is required.
  if (config.tieWordEmbeddings) lmHead = undefined;
  else if (!lmHead) throw checkpointError(checkpoint.dir, `missing tensor "lm_head.weight" (config.json has tie_word_embeddings false)`);
  else if (expectedDtype && lmHead.dtype !== expectedDtype && !config.quantization) {
    throw checkpointError(lmHead.file, `tensor "${lmHead.name}" is ${lmHead.dtype} but config.json says torch_dtype ${config.torchDtype}`);
  }
  const get = (name: string) => byName.get(name)!;
  const norm = (p: string): NormTensors => ({ weight: get(`${p}.weight`), bias: get(`${p}.bias`) });
  const linear = (p: string): LinearTensors => ({ weight: get(`${p}.weight`), bias: get(`${p}.bias`) });
  const layers: BloomLayerTensors[] = [];
  for (let i = 0; i < config.numLayers; i++) {
    const p = `h.${i}.`;
    layers.push({
      inputLayernorm: norm(`${p}input_layernorm`),
      queryKeyValue: linear(`${p}self_attention.query_key_value`),
      dense: linear(`${p}self_attention.dense`),
      postAttentionLayernorm: norm(`${p}post_attention_layernorm`),
      denseHTo4h: linear(`${p}mlp.dense_h_to_4h`),
      dense4hToH: linear(`${p}mlp.dense_4h_to_h`),
    });
  }
  const wordEmbeddings = get("word_embeddings.weight");
  return {
    wordEmbeddings,
    wordEmbeddingsLayernorm: norm("word_embeddings_layernorm"),
    layers,
    lnF: norm("ln_f"),
    lmHead: lmHead ?? wordEmbeddings,
    lmHeadTied: lmHead === undefined,
  };
}

function checkShape(view: TensorView, shape: number[], config: BloomConfig): void {
  if (view.shape.length !== shape.length || view.shape.some((d, i) => d !== shape[i])) {
    throw checkpointError(
      view.file,
      `tensor "${view.name}" has shape [${view.shape.join(", ")}] but config.json (hidden_size ${config.hiddenSize}, vocab_size ${config.vocabSize}) implies [${shape.join(", ")}]`,
    );
  }
}
