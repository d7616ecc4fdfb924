/**
 * One benchmark configuration, run in processes of its own (spawned by src/bench/bench.ts; under
 * mpirun for tensor parallelism) so that its memory is its own and a crash or an out-of-memory
 * kill cannot take the benchmark down. The job comes as base64 JSON in argv; results go to stdout
 * as lines "BLOSSOM-BENCH <json>" (only rank 0 of an MPI job writes any).
 */
import { native } from "../backend/native.js";
import { openCheckpoint } from "../checkpoint/checkpoint.js";
import { BlossomError } from "../errors.js";
import { kvBytesPerToken, resolveKvDtype } from "../engine/kv-cache.js";
import { formatBytes, predictBatchMemory, type ModelShape } from "../engine/memory.js";
import type { TensorView } from "../checkpoint/safetensors.js";
import { loadModel, type LoadModelOptions, type Model, type ModelDType, type Strategy } from "../model.js";
import { bloomTensors } from "../models/bloom-weights.js";
import { bloomModules } from "../parallel/modules.js";
import { parseMaxMemory, planPlacement } from "../parallel/planner.js";
import { BloomTokenizer } from "../tokenizer/tokenizer.js";
import { isQuantScheme, quantizedMatrixBytes, quantSpec } from "../quant/scheme.js";
import { isInt8ExtraTensor } from "../quant/store.js";
import { messagePrefix, type CellResult, type ChildJob, type ChildMessage } from "./types.js";

function send(message: ChildMessage): void {
  process.stdout.write(messagePrefix + JSON.stringify(message) + "\n");
}

const bytesPer: Record<string, number> = { f32: 4, f16: 2, bf16: 2, i8: 1, fp32: 4, fp16: 2 };

/** Model shape and the weight bytes resident under the configuration, from the checkpoint's headers. */
function expectedShape(job: ChildJob): { shape: ModelShape; sharedWeights: number } {
  const { config } = job;
  const ck = openCheckpoint(config.model);
  try {
    // int8 dtypes quantize every matrix at load (src/quant/); a pre-quantized checkpoint is held as stored.
    const dtype = config.dtype;
    const int8 = isQuantScheme(dtype) && !ck.config.quantization ? quantSpec(dtype) : undefined;
    const asStored = dtype === "auto" || ck.config.quantization !== undefined;
    const matrixBytes = (v: TensorView) =>
      int8 ? quantizedMatrixBytes(v.shape[0]!, v.shape[1]!, int8.groupSize) : v.shape.reduce((a, b) => a * b, 1) * (asStored ? bytesPer[v.dtype]! : bytesPer[dtype]!);
    const tensors = bloomTensors(ck, ck.config.quantization ? { isExtraTensor: isInt8ExtraTensor } : {});
    const modules = bloomModules(tensors, matrixBytes);
    let weightBytes = modules.reduce((a, m) => a + m.bytes, 0);
    if (config.strategy === "pipeline" && config.deviceMemory) {
      const plan = planPlacement(modules, parseMaxMemory(config.deviceMemory), "auto");
      weightBytes -= plan.bytesPerDevice.get("disk") ?? 0;
      // Two staging buffers of the largest offloaded block.
      const blocks = modules.filter((m) => /^h\./.test(m.name) && plan.placement.get(m.name) === "disk");
      weightBytes += 2 * Math.max(0, ...blocks.map((m) => m.bytes));
    }
    const c = ck.config;
    return {
      shape: { vocabSize: c.vocabSize, hiddenSize: c.hiddenSize, numLayers: c.numLayers, numHeads: c.numHeads, kvBytesPerToken: kvBytesPerToken(c, resolveKvDtype(config.kvDtype)), weightBytes },
      sharedWeights: weightBytes,
    };
  } finally {
    ck.dispose();
  }
}

/** Tokens a sequence reserves in the KV cache: whole blocks of 16 (the engine's block size). */
function kvBlockRounded(tokens: number): number {
  return Math.ceil(tokens / 16) * 16;
}

function isOutOfMemory(err: unknown): boolean {
  if (err instanceof BlossomError) return err.code === "memory";
  const message = (err as Error)?.message ?? "";
  return err instanceof RangeError || /allocat|out of memory|ENOMEM/i.test(message);
}

/** Streams decoding in parallel: replicas each take a batch of the column's size. */
function streamsOf(job: ChildJob): number {
  return job.config.strategy === "replicas" ? (job.config.replicas ?? 2) : 1;
}

async function runCell(model: Model, job: ChildJob, batchSize: number, promptTokens: number, shape: ModelShape): Promise<CellResult> {
  const { settings, config } = job;
  const streams = streamsOf(job);
  const processes = config.strategy === "tensor" ? (config.ranks ?? 2) : 1;
  const predicted = predictBatchMemory(shape, batchSize, promptTokens, settings.newTokens, { streams, processes });
  if (predicted.total > settings.maxMemoryBytes) {
    return {
      batchSize,
      status: "oom",
      reason: `predicted ${formatBytes(predicted.total)} (weights ${formatBytes(predicted.weights)}, KV cache ${formatBytes(predicted.kvCache)}, activations ${formatBytes(predicted.activations)}, runtime ${formatBytes(predicted.runtime)}) > budget ${formatBytes(settings.maxMemoryBytes)}`,
      predicted,
    };
  }
  const sequences = batchSize * streams;
  const prompts = Array.from({ length: sequences }, (_, i) => job.prompts[i % job.prompts.length]!);
  // Every sequence generates exactly newTokens, as in the guide's batches (padded rows run to the end).
  const params = { maxNewTokens: settings.newTokens, minNewTokens: settings.newTokens };
  send({ type: "cellStart", batchSize });
  let peakRss = native().residentBytes();
  const sampler = setInterval(() => (peakRss = Math.max(peakRss, native().residentBytes())), 25);
  try {
    await model.generate(prompts, params); // warm-up
    let tokens = 0, ttft = 0;
    const started = performance.now();
    for (let cycle = 0; cycle < settings.cycles; cycle++) {
      send({ type: "progress", batchSize, cycle, cycles: settings.cycles, elapsedMs: performance.now() - started });
      const r = await model.generate(prompts, params);
      tokens += r.numGeneratedTokens.reduce((a, b) => a + b, 0);
      ttft += Math.max(...r.timeToFirstToken);
    }
    const seconds = (performance.now() - started) / 1000;
    peakRss = Math.max(peakRss, native().residentBytes());
    return {
      batchSize,
      status: "ok",
      msPerToken: (seconds * 1000) / tokens,
      tokensPerSecond: tokens / seconds,
      latencyPerBatchMs: (seconds * 1000) / settings.cycles,
      timeToFirstTokenMs: (ttft * 1000) / settings.cycles,
      newTokensGenerated: tokens,
      sequences,
      promptTokens,
      peakRssBytes: peakRss,
      predicted,
    };
  } catch (err) {
    if (isOutOfMemory(err)) return { batchSize, status: "oom", reason: `allocation failed at run time: ${(err as Error).message}`, predicted };
    throw err;
  } finally {
    clearInterval(sampler);
  }
}

async function run(job: ChildJob): Promise<void> {
  const { config, settings } = job;
  const { shape, sharedWeights } = expectedShape(job);
  const tokenizer = BloomTokenizer.fromDir(config.model);
  const promptTokens = Math.max(...(await Promise.all(job.prompts.map(async (p) => (await tokenizer.encode(p)).length))));
  // Size the KV pool for the largest batch that may fit; it is reserved, and only used blocks become resident.
  const streams = streamsOf(job);
  const room = Math.max(0, settings.maxMemoryBytes - sharedWeights) / streams;
  const largest = Math.max(...settings.batchSizes);
  const options: LoadModelOptions = {
    dtype: config.dtype as ModelDType,
    ...(config.kvDtype !== undefined ? { kvDtype: resolveKvDtype(config.kvDtype) } : {}),
    strategy: config.strategy as Strategy,
    ...(config.threads !== undefined ? { threads: config.threads } : {}),
    ...(config.strategy === "pipeline" ? { maxMemory: config.deviceMemory ?? "cpu:1TiB,disk" } : {}),
    ...(config.strategy === "replicas" ? { replicas: streams } : {}),
    // BLOSSOM_BENCH_KV_TOKENS overrides the pool size (to reproduce a KV cache that runs out at run time).
    kvCacheTokens: process.env.BLOSSOM_BENCH_KV_TOKENS
      ? Number(process.env.BLOSSOM_BENCH_KV_TOKENS)
      : Math.max(256, Math.min(largest * kvBlockRounded(promptTokens + settings.newTokens), Math.floor(room / shape.kvBytesPerToken))),
    maxBatchSize: largest,
  };
  const started = performance.now();
  const model = await loadModel(config.model, options); // tensor-parallel followers never return from this
  const loadSeconds = (performance.now() - started) / 1000;
  send({ type: "loaded", loadSeconds, rssAfterLoadBytes: native().residentBytes(), engine: model.info });
  try {
    for (const batchSize of settings.batchSizes) send({ type: "cell", cell: await runCell(model, job, batchSize, promptTokens, shape) });
  } finally {
    await model.dispose();
  }
}

const job = JSON.parse(Buffer.from(process.argv[2] ?? "", "base64").toString("utf8")) as ChildJob;
run(job).then(
  () => process.exit(0),
  (err: unknown) => {
    send({ type: "failed", error: err instanceof Error ? err.message : String(err) });
    process.exit(1);
  },
);
