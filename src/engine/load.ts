/**
 * Builds a ready engine from a checkpoint folder: maps the files, validates and maps the weights,
 * sizes the KV cache. Runs wherever the engine runs (the worker thread, or in-process for tests).
 */
import { freemem } from "node:os";
import type { Backend } from "../backend/backend.js";
import { CpuBackend } from "../backend/cpu.js";
import { openCheckpoint, type Checkpoint } from "../checkpoint/checkpoint.js";
import { BlossomError } from "../errors.js";
import { BloomModel } from "../models/bloom.js";
import { bloomTensors } from "../models/bloom-weights.js";
import { Engine } from "./engine.js";
import { KVCachePool, kvBytesPerToken } from "./kv-cache.js";
import { matrixDtype, ResidentWeightStore, WeightBuilder, type WeightDType, type WeightStore } from "./weights.js";
import { int8MatrixFactory, isInt8ExtraTensor } from "../quant/store.js";

export interface EngineOptions {
  dtype?: WeightDType;
  threads?: number;
  backend?: Backend;
  /** KV-cache capacity in tokens across all sequences (default: fits in a quarter of free memory, at most 1M tokens). */
  kvCacheTokens?: number;
  kvBlockSize?: number;
  /** dtype int8: inputs per weight scale (default 128; a multiple of 32). */
  int8GroupSize?: number;
  /** dtype int8-mixed: |activation| from which an input feature is computed in fp32 (default 6). */
  int8Threshold?: number;
}

export interface LoadedEngine {
  checkpoint: Checkpoint;
  weights: WeightStore;
  model: BloomModel;
  engine: Engine;
  backend: Backend;
  dtype: WeightDType;
  loadSeconds: number;
  dispose(): void;
}

export const weightDtypes: readonly WeightDType[] = ["auto", "fp32", "bf16", "fp16", "int8", "int8-mixed"];

export function loadEngine(dir: string, options: EngineOptions = {}): LoadedEngine {
  const started = performance.now();
  const dtype = options.dtype ?? "auto";
  if (!weightDtypes.includes(dtype)) {
    throw new BlossomError("parameter", `dtype: expected one of ${weightDtypes.join(", ")}, got ${JSON.stringify(dtype)}`);
  }
  if (options.threads !== undefined && (!Number.isInteger(options.threads) || options.threads < 1 || options.threads > 1024)) {
    throw new BlossomError("parameter", `threads: expected an integer from 1 to 1024, got ${options.threads}`);
  }
  const backend = options.backend ?? new CpuBackend(options.threads === undefined ? {} : { threads: options.threads });
  const checkpoint = openCheckpoint(dir);
  let weights: WeightStore | undefined;
  try {
    // int8 is a store policy (src/quant/store.ts): quantized at load, or used in place if pre-quantized.
    const int8 = int8MatrixFactory(checkpoint, backend, { dtype, groupSize: options.int8GroupSize, threshold: options.int8Threshold });
    const tensors = bloomTensors(checkpoint, checkpoint.config.quantization ? { isExtraTensor: isInt8ExtraTensor } : {});
    const builder = new WeightBuilder(backend, int8?.makeMatrix ?? ((view) => backend.matrix(view, matrixDtype(view.dtype, dtype))));
    weights = new ResidentWeightStore(tensors, builder);
    const { config } = checkpoint;
    const model = new BloomModel(config, weights, backend);
    const blockSize = options.kvBlockSize ?? 16;
    const perToken = kvBytesPerToken({ numLayers: config.numLayers, numHeads: config.numHeads, headDim: config.headDim });
    const tokens = options.kvCacheTokens ?? Math.min(1 << 20, Math.max(4096, Math.floor(freemem() / 4 / perToken)));
    const kvCache = new KVCachePool(backend, {
      numLayers: config.numLayers,
      numHeads: config.numHeads,
      headDim: config.headDim,
      blockSize,
      numBlocks: Math.max(1, Math.ceil(tokens / blockSize)),
    });
    const engine = new Engine(model, kvCache);
    const w = weights;
    return {
      checkpoint,
      weights: w,
      model,
      engine,
      backend,
      dtype: int8?.scheme ?? dtype,
      loadSeconds: (performance.now() - started) / 1000,
      dispose() {
        model.dispose();
        kvCache.dispose();
        w.dispose();
        checkpoint.dispose();
      },
    };
  } catch (err) {
    weights?.dispose();
    checkpoint.dispose();
    throw err;
  }
}
