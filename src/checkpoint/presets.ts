/**
 * The dimensions of the published BLOOM checkpoints (bigscience/bloom-*), so `create-random` can
 * write a model of the real size, and the config.json each of them ships with.
 */
import { parameterError } from "../errors.js";
import { PythonFloat, sortedMap, stringifyJson } from "./json-text.js";

export interface BloomPreset {
  name: string;
  /** The Hub model whose dimensions these are, if any. */
  hubModel?: string;
  hiddenSize: number;
  numLayers: number;
  numHeads: number;
  vocabSize: number;
}

export const presets: Record<string, BloomPreset> = {
  // For tests and quick demos: small enough to write in milliseconds, 4 heads of 16 like tiny-bloom-a.
  tiny: { name: "tiny", hiddenSize: 64, numLayers: 2, numHeads: 4, vocabSize: 1024 },
  "bloom-560m": { name: "bloom-560m", hubModel: "bigscience/bloom-560m", hiddenSize: 1024, numLayers: 24, numHeads: 16, vocabSize: 250880 },
  "bloom-1b7": { name: "bloom-1b7", hubModel: "bigscience/bloom-1b7", hiddenSize: 2048, numLayers: 24, numHeads: 16, vocabSize: 250880 },
  "bloom-3b": { name: "bloom-3b", hubModel: "bigscience/bloom-3b", hiddenSize: 2560, numLayers: 30, numHeads: 32, vocabSize: 250880 },
  "bloom-7b1": { name: "bloom-7b1", hubModel: "bigscience/bloom-7b1", hiddenSize: 4096, numLayers: 30, numHeads: 32, vocabSize: 250880 },
};

export type CheckpointDType = "bf16" | "fp16" | "fp32";

export const TORCH_DTYPE_NAMES: Record<CheckpointDType, string> = {
  bf16: "bfloat16",
  fp16: "float16",
  fp32: "float32",
};

export function getPreset(name: string): BloomPreset {
  const preset = Object.hasOwn(presets, name) ? presets[name] : undefined;
  if (!preset) throw parameterError("preset", `unknown preset ${JSON.stringify(name)}; expected one of ${Object.keys(presets).join(", ")}`);
  return preset;
}

/** Every weight, in the state-dict order of transformers' BloomForCausalLM (without the `transformer.` prefix; lm_head is tied). */
export function bloomTensorShapes(preset: BloomPreset): Array<{ name: string; shape: number[] }> {
  const h = preset.hiddenSize;
  const tensors: Array<{ name: string; shape: number[] }> = [
    { name: "word_embeddings.weight", shape: [preset.vocabSize, h] },
    { name: "word_embeddings_layernorm.weight", shape: [h] },
    { name: "word_embeddings_layernorm.bias", shape: [h] },
  ];
  for (let i = 0; i < preset.numLayers; i++) {
    const layer = `h.${i}`;
    tensors.push(
      { name: `${layer}.input_layernorm.weight`, shape: [h] },
      { name: `${layer}.input_layernorm.bias`, shape: [h] },
      { name: `${layer}.self_attention.query_key_value.weight`, shape: [3 * h, h] },
      { name: `${layer}.self_attention.query_key_value.bias`, shape: [3 * h] },
      { name: `${layer}.self_attention.dense.weight`, shape: [h, h] },
      { name: `${layer}.self_attention.dense.bias`, shape: [h] },
      { name: `${layer}.post_attention_layernorm.weight`, shape: [h] },
      { name: `${layer}.post_attention_layernorm.bias`, shape: [h] },
      { name: `${layer}.mlp.dense_h_to_4h.weight`, shape: [4 * h, h] },
      { name: `${layer}.mlp.dense_h_to_4h.bias`, shape: [4 * h] },
      { name: `${layer}.mlp.dense_4h_to_h.weight`, shape: [h, 4 * h] },
      { name: `${layer}.mlp.dense_4h_to_h.bias`, shape: [h] },
    );
  }
  tensors.push({ name: "ln_f.weight", shape: [h] }, { name: "ln_f.bias", shape: [h] });
  return tensors;
}

export function presetParameterCount(preset: BloomPreset): number {
  return bloomTensorShapes(preset).reduce((sum, t) => sum + t.shape.reduce((a, b) => a * b, 1), 0);
}

/**
 * config.json for a preset: the keys bigscience's BLOOM configs carry (legacy Megatron ones
 * included, which loaders must ignore), minus `_name_or_path` and `transformers_version`, exactly
 * as in the golden fixtures.
 */
export function presetConfig(name: string, dtype: CheckpointDType = "bf16"): Record<string, unknown> {
  const preset = getPreset(name);
  if (!Object.hasOwn(TORCH_DTYPE_NAMES, dtype)) throw parameterError("dtype", `expected bf16, fp16 or fp32, got ${JSON.stringify(dtype)}`);
  return {
    apply_residual_connection_post_layernorm: false,
    architectures: ["BloomForCausalLM"],
    attention_dropout: 0,
    attention_softmax_in_fp32: true,
    bias_dropout_fusion: true,
    bos_token_id: 1,
    eos_token_id: 2,
    hidden_dropout: 0,
    hidden_size: preset.hiddenSize,
    initializer_range: 0.02,
    layer_norm_epsilon: 1e-5,
    masked_softmax_fusion: true,
    model_type: "bloom",
    n_head: preset.numHeads,
    n_inner: null,
    n_layer: preset.numLayers,
    offset_alibi: 100,
    pad_token_id: 3,
    pretraining_tp: 1,
    skip_bias_add: true,
    skip_bias_add_qkv: false,
    slow_but_exact: false,
    torch_dtype: TORCH_DTYPE_NAMES[dtype],
    unk_token_id: 0,
    use_cache: true,
    vocab_size: preset.vocabSize,
  };
}

/** Keys BloomConfig holds as Python floats, written `0.0` and `1e-05` rather than `0` and `0.00001`. */
const FLOAT_KEYS = new Set(["attention_dropout", "hidden_dropout", "initializer_range", "layer_norm_epsilon"]);

/** A config object (from {@link presetConfig}) as config.json text, the way `save_pretrained` writes it. */
export function configJsonText(config: Record<string, unknown>): string {
  const entries = Object.entries(config).map(([key, value]): [string, unknown] =>
    FLOAT_KEYS.has(key) && typeof value === "number" ? [key, new PythonFloat(value)] : [key, value],
  );
  return stringifyJson(sortedMap(new Map(entries))) + "\n";
}
