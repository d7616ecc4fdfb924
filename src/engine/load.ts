/**
 * Builds a ready engine from a checkpoint folder: maps the files, validates and maps the weights,
 * sizes the KV cache. Runs wherever the engine runs (the worker thread, or in-process for tests).
 */
import type { Backend, MappedWeightsReport } from "../backend/backend.js";
import { CpuBackend, type LinearPanels } from "../backend/cpu.js";
import { native } from "../backend/native.js";
import { processBytesFor } from "./memory.js";
import { MpiCollectives, TensorParallelWeightStore, tensorShard } from "../parallel/tensor.js";
import type { ModelShard } from "../models/bloom.js";
import { openCheckpoint, type Checkpoint } from "../checkpoint/checkpoint.js";
import { BlossomError } from "../errors.js";
import { BloomModel } from "../models/bloom.js";
import { bloomTensors } from "../models/bloom-weights.js";
import { Engine } from "./engine.js";
import { defaultKvCacheTokens, KVCachePool, kvBytesPerToken, resolveKvDtype } from "./kv-cache.js";
import type { KVDType } from "../backend/backend.js";
import type { TensorView } from "../checkpoint/safetensors.js";
import { bloomModules, matrixBytesAs } from "../parallel/modules.js";
import { PipelineWeightStore, type OffloadOptions } from "../parallel/offload.js";
import { parseMaxMemory, planForProcess, type PlacementMode } from "../parallel/planner.js";
import { matrixDtype, ResidentWeightStore, WeightBuilder, type WeightDType, type WeightStore } from "./weights.js";
import { int8MatrixFactory, isInt8ExtraTensor } from "../quant/store.js";
import { isQuantScheme, scaleTensorName } from "../quant/scheme.js";

export interface EngineOptions {
  dtype?: WeightDType;
  threads?: number;
  backend?: Backend;
  /** KV-cache capacity in tokens across all sequences (default: defaultKvCacheTokens, a quarter of free memory shared by the machine's ranks). */
  kvCacheTokens?: number;
  kvBlockSize?: number;
  /** How the KV cache stores keys and values (default fp32; fp16 / bf16 take half the memory and bandwidth). */
  kvDtype?: KVDType;
  /** Pipeline placement with offload (strategy "pipeline"); absent: every layer resident. */
  pipeline?: PipelineOptions;
  /** Tensor parallelism over MPI (strategy "tensor"): initialises MPI in this thread and loads this rank's slice. */
  tensorParallel?: boolean;
  /** dtype int8: inputs per weight scale (default 256, quant/scheme.ts defaultGroupSize; a multiple of 32). */
  int8GroupSize?: number;
  /** dtype int8-mixed: |activation| from which an input feature is computed in fp32 (default 6). */
  int8Threshold?: number;
  /** Which matrices only linear() reads are stored in column panels (default: the measured policy; null: none). */
  linearPanels?: LinearPanels | null;
}

export interface PipelineOptions extends OffloadOptions {
  /** Per-device budgets, "0:2GiB,1:2GiB,cpu:4GiB,disk". */
  maxMemory: string;
  placement?: PlacementMode;
}

export interface LoadedEngine {
  checkpoint: Checkpoint;
  weights: WeightStore;
  model: BloomModel;
  engine: Engine;
  backend: Backend;
  dtype: WeightDType;
  loadSeconds: number;
  /** A resident load's matrices used in place from the checkpoint's mapping, and how they are mapped. */
  mappedWeights?: MappedWeightsReport;
  /** Tensor parallelism: this rank's collectives (rank 0 leads, the others follow). */
  comm?: MpiCollectives;
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
  const kvDtype = resolveKvDtype(options.kvDtype);
  let world: { rank: number; size: number; localSize: number } | undefined;
  if (options.tensorParallel) world = native().mpiInit();
  // Ranks sharing a machine share its cores.
  const threads = options.threads ?? (world ? Math.max(1, Math.floor(native().cpuInfo().physicalCores / world.localSize)) : undefined);
  const backend = options.backend ?? new CpuBackend({ ...(threads === undefined ? {} : { threads }), ...(options.linearPanels !== undefined ? { linearPanels: options.linearPanels } : {}) });
  const checkpoint = openCheckpoint(dir);
  let weights: WeightStore | undefined;
  try {
    // int8 is a store policy (src/quant/store.ts): quantized at load, or used in place if pre-quantized.
    const int8 = int8MatrixFactory(checkpoint, backend, { dtype, groupSize: options.int8GroupSize, threshold: options.int8Threshold });
    const tensors = bloomTensors(checkpoint, checkpoint.config.quantization ? { isExtraTensor: isInt8ExtraTensor } : {});
    const dtypeOf = (view: TensorView) => matrixDtype(view.dtype, dtype);
    const releaseCheckpointPages = () => {
      for (const view of checkpoint.tensors.values()) backend.releaseSource?.(view);
    };
    // Matrices only linear() reads may take a layout of the backend's own (the embedding table keeps
    // its rows); every tensor is built once, so a copy may drop its source's pages as it goes.
    const builder = new WeightBuilder(
      backend,
      int8?.makeMatrix ?? ((view, role) => backend.matrix(view, dtypeOf(view), { use: role === "embedding" ? "embedding" : "linear", releaseSource: true })),
    );
    const { config } = checkpoint;
    let comm: MpiCollectives | undefined;
    let shard: ModelShard | undefined;
    let mappedWeights: MappedWeightsReport | undefined;
    if (world) {
      if (options.pipeline) throw new BlossomError("parameter", "strategy tensor cannot be combined with pipeline placement");
      shard = tensorShard(config, world.rank, world.size);
      comm = new MpiCollectives(world, config);
      if (checkpoint.config.quantization) {
        throw new BlossomError("parameter", "tensor parallelism quantizes at load: load the original checkpoint with --dtype int8, not a pre-quantized one");
      }
      const quantized = isQuantScheme(dtype);
      weights = new TensorParallelWeightStore(tensors, builder, backend, shard, config, (v) => (quantized ? v.dtype : dtypeOf(v)), quantized);
    } else if (options.pipeline) {
      if (isQuantScheme(dtype)) {
        throw new BlossomError("parameter", `dtype ${dtype} with pipeline offload reads a quantized checkpoint (loadModel makes one in the cache; or run \`blossom quantize\`)`);
      }
      const { maxMemory, placement, ...offload } = options.pipeline;
      // Offloading maps, reads ahead and drops small pieces of the checkpoint (a bias, an embedding
      // row, a chunk of the LM head): mapped 2 MiB at a time, each would keep a whole huge page resident.
      for (const view of checkpoint.tensors.values()) native().advise(view.region, view.byteOffset, view.byteLength, "nohugepage");
      const modules = bloomModules(tensors, matrixBytesAs(dtypeOf));
      const { plan } = planForProcess(modules, parseMaxMemory(maxMemory), placement ?? "auto", processBytesFor(checkpoint.dir));
      weights = new PipelineWeightStore(tensors, builder, backend, plan, dtypeOf, offload, (v) => checkpoint.tensors.get(scaleTensorName(v.name)));
      // Loading copied the small tensors (layer norms, biases) out of the mapping, and where the page
      // cache holds the file in large folios, reading one mapped the folio's neighbours too. Drop
      // every page: what is used in place is faulted back in on use. (bench:offload with the file in
      // 2 MiB folios: peak RSS 580-590 MiB against a 520 MiB budget without this, 397-409 with it.)
      releaseCheckpointPages();
    } else {
      weights = new ResidentWeightStore(tensors, builder);
      // Every matrix now lives in its int8 copy and every small tensor in an fp32 one: drop the
      // mapped checkpoint's pages. (The matrices dropped theirs as they were quantized; the small
      // tensors between them would otherwise keep whole pages resident: with 2 MiB pages, tens of MiB.)
      if (int8?.quantizesAtLoad) releaseCheckpointPages();
      // Matrices used in place from the mapping: resident now, in 2 MiB pages where the page cache can hold them so.
      mappedWeights = backend.settleMappedWeights?.();
    }
    const model = new BloomModel(config, weights, backend, comm && shard ? { shard, comm } : undefined);
    const blockSize = options.kvBlockSize ?? 16;
    const numHeads = shard?.numHeads ?? config.numHeads;
    const perToken = kvBytesPerToken({ numLayers: config.numLayers, numHeads, headDim: config.headDim }, kvDtype);
    // Tensor-parallel ranks on one machine share its memory; their caches must have the same number
    // of blocks (rank 0 hands out block ids that every rank uses): the smallest rank's.
    const tokens = options.kvCacheTokens ?? defaultKvCacheTokens(perToken, world?.localSize ?? 1);
    let numBlocks = Math.max(1, Math.ceil(tokens / blockSize));
    if (comm) numBlocks = comm.minAcrossRanks(numBlocks);
    const kvCache = new KVCachePool(backend, {
      numLayers: config.numLayers,
      numHeads,
      headDim: config.headDim,
      blockSize,
      numBlocks,
      dtype: kvDtype,
    });
    const leader = comm && comm.rank === 0 ? comm : undefined;
    const engine = new Engine(model, kvCache, leader ? (step) => leader.broadcastStep(step) : undefined);
    const w = weights;
    return {
      checkpoint,
      weights: w,
      model,
      engine,
      backend,
      dtype: int8?.scheme ?? dtype,
      loadSeconds: (performance.now() - started) / 1000,
      ...(mappedWeights ? { mappedWeights } : {}),
      ...(comm ? { comm } : {}),
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
