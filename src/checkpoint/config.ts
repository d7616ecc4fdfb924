/**
 * config.json -> a typed, validated BloomConfig.
 *
 * Field names follow Hugging Face's BloomConfig, in camelCase; the JSON key each comes from is
 * noted beside it. Legacy keys real BLOOM configs carry (offset_alibi, skip_bias_add,
 * masked_softmax_fusion, ...) are accepted and ignored.
 */
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { z } from "zod";
import { checkpointError } from "../errors.js";

export interface BloomConfig {
  modelType: string; // model_type ("bloom")
  vocabSize: number; // vocab_size
  hiddenSize: number; // hidden_size (older files: n_embed)
  numLayers: number; // n_layer (alias num_hidden_layers)
  numHeads: number; // n_head (alias num_attention_heads)
  headDim: number; // hidden_size / n_head
  layerNormEpsilon: number; // layer_norm_epsilon
  applyResidualConnectionPostLayernorm: boolean; // apply_residual_connection_post_layernorm
  /** The LM head is the word embeddings (transformers' default for BLOOM); a stored lm_head.weight is then not used. */
  tieWordEmbeddings: boolean; // tie_word_embeddings
  bosTokenId: number | undefined; // bos_token_id
  eosTokenIds: number[]; // eos_token_id (a number or a list)
  padTokenId: number | undefined; // pad_token_id
  torchDtype: "float32" | "float16" | "bfloat16" | undefined; // torch_dtype (newer files: dtype)
  /** Present in checkpoints written by `blossom quantize`: how the weights were quantized. */
  quantization: QuantizationConfig | undefined; // quantization_config
  /** The parsed JSON as read, for keys Blossom does not interpret. */
  raw: Record<string, unknown>;
}

export interface QuantizationConfig {
  quantMethod: string; // quant_method ("blossom-int8")
  scheme: string; // scheme ("int8" | "int8-mixed")
  groupSize: number; // group_size
  raw: Record<string, unknown>;
}

const positiveInt = z.number().int().positive();
const tokenId = z.number().int().nonnegative();

const configSchema = z
  .object({
    model_type: z.string(),
    vocab_size: positiveInt,
    hidden_size: positiveInt.optional(),
    n_embed: positiveInt.optional(),
    n_layer: positiveInt.optional(),
    num_hidden_layers: positiveInt.optional(),
    n_head: positiveInt.optional(),
    num_attention_heads: positiveInt.optional(),
    layer_norm_epsilon: z.number().positive().finite().default(1e-5),
    apply_residual_connection_post_layernorm: z.boolean().default(false),
    tie_word_embeddings: z.boolean().default(true),
    bos_token_id: tokenId.nullish(),
    eos_token_id: z.union([tokenId, z.array(tokenId)]).nullish(),
    pad_token_id: tokenId.nullish(),
    torch_dtype: z.string().nullish(),
    dtype: z.string().nullish(),
    quantization_config: z
      .object({ quant_method: z.string(), scheme: z.string(), group_size: positiveInt })
      .passthrough()
      .optional(),
  })
  .passthrough();

const torchDtypes = { float32: "float32", float16: "float16", bfloat16: "bfloat16", fp32: "float32", fp16: "float16", bf16: "bfloat16" } as const;

/** Parses and validates a config.json object; `file` names the source in errors. */
export function parseBloomConfig(json: unknown, file: string): BloomConfig {
  const parsed = configSchema.safeParse(json);
  if (!parsed.success) {
    const issue = parsed.error.issues[0]!;
    const field = issue.path.join(".") || "(root)";
    throw checkpointError(file, `field "${field}": ${issue.message}`);
  }
  const c = parsed.data;
  if (c.model_type !== "bloom") {
    throw checkpointError(file, `field "model_type": expected "bloom", got ${JSON.stringify(c.model_type)}`);
  }
  const hiddenSize = c.hidden_size ?? c.n_embed;
  const numLayers = c.n_layer ?? c.num_hidden_layers;
  const numHeads = c.n_head ?? c.num_attention_heads;
  if (hiddenSize === undefined) throw checkpointError(file, `missing field "hidden_size" (or "n_embed")`);
  if (numLayers === undefined) throw checkpointError(file, `missing field "n_layer" (or "num_hidden_layers")`);
  if (numHeads === undefined) throw checkpointError(file, `missing field "n_head" (or "num_attention_heads")`);
  if (hiddenSize % numHeads !== 0) {
    throw checkpointError(file, `field "hidden_size" (${hiddenSize}) must be divisible by "n_head" (${numHeads})`);
  }
  const dtypeName = c.torch_dtype ?? c.dtype ?? undefined;
  let torchDtype: BloomConfig["torchDtype"];
  if (dtypeName !== undefined && dtypeName !== null) {
    torchDtype = torchDtypes[dtypeName as keyof typeof torchDtypes];
    if (!torchDtype) throw checkpointError(file, `field "torch_dtype": expected float32, float16 or bfloat16, got ${JSON.stringify(dtypeName)}`);
  }
  const eos = c.eos_token_id;
  const eosTokenIds = eos === undefined || eos === null ? [] : Array.isArray(eos) ? eos : [eos];
  for (const [name, id] of [
    ["bos_token_id", c.bos_token_id],
    ["pad_token_id", c.pad_token_id],
    ...eosTokenIds.map((e) => ["eos_token_id", e] as const),
  ] as const) {
    if (typeof id === "number" && id >= c.vocab_size) {
      throw checkpointError(file, `field "${name}" (${id}) is outside the vocabulary (vocab_size ${c.vocab_size})`);
    }
  }
  const q = c.quantization_config;
  return {
    modelType: c.model_type,
    vocabSize: c.vocab_size,
    hiddenSize,
    numLayers,
    numHeads,
    headDim: hiddenSize / numHeads,
    layerNormEpsilon: c.layer_norm_epsilon,
    applyResidualConnectionPostLayernorm: c.apply_residual_connection_post_layernorm,
    tieWordEmbeddings: c.tie_word_embeddings,
    bosTokenId: c.bos_token_id ?? undefined,
    eosTokenIds,
    padTokenId: c.pad_token_id ?? undefined,
    torchDtype,
    quantization: q ? { quantMethod: q.quant_method, scheme: q.scheme, groupSize: q.group_size, raw: q } : undefined,
    raw: json as Record<string, unknown>,
  };
}

/** Reads DIR/config.json. */
export function readBloomConfig(dir: string): BloomConfig {
  const file = join(dir, "config.json");
  let text: string;
  try {
    text = readFileSync(file, "utf8");
  } catch (err) {
    throw checkpointError(file, `cannot read (${(err as NodeJS.ErrnoException).code ?? String(err)}); a checkpoint folder needs config.json`);
  }
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (err) {
    throw checkpointError(file, `invalid JSON (${(err as Error).message})`);
  }
  return parseBloomConfig(json, file);
}
