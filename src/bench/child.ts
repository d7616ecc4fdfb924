/**
 * One benchmark configuration, run in its own process (forked by src/bench/bench.ts) so that its
 * peak RSS is its own and a crash or an out-of-memory kill cannot take the benchmark down.
 */
import { native } from "../backend/native.js";
import { openCheckpoint } from "../checkpoint/checkpoint.js";
import { BlossomError } from "../errors.js";
import { kvBytesPerToken } from "../engine/kv-cache.js";
import { formatBytes, predictBatchMemory, type ModelShape } from "../engine/memory.js";
import { loadModel, type Model, type ModelDType } from "../model.js";
import { BloomTokenizer } from "../tokenizer/tokenizer.js";
import { isQuantScheme, quantizedMatrixBytes, quantSpec } from "../quant/scheme.js";
import type { CellResult, ChildJob, ChildMessage } from "./types.js";

function send(message: ChildMessage): void {
  process.send!(message);
}

const bytesPer: Record<string, number> = { f32: 4, f16: 2, bf16: 2, i8: 1, fp32: 4, fp16: 2 };

/** Weight bytes the model will hold under `dtype`, from the checkpoint's headers, before loading it. */
function expectedWeightBytes(dir: string, dtype: string): { shape: Omit<ModelShape, "weightBytes">; weightBytes: number } {
  const ck = openCheckpoint(dir);
  try {
    let bytes = 0;
    // int8 dtypes quantize every matrix at load (src/quant/); a pre-quantized checkpoint is held as stored.
    const int8 = isQuantScheme(dtype) && !ck.config.quantization ? quantSpec(dtype) : undefined;
    const asStored = dtype === "auto" || ck.config.quantization !== undefined;
    for (const t of ck.tensors.values()) {
      const numel = t.shape.reduce((a, b) => a * b, 1);
      const matrix = t.shape.length === 2;
      if (!matrix) bytes += numel * 4;
      else if (int8) bytes += quantizedMatrixBytes(t.shape[0]!, t.shape[1]!, int8.groupSize);
      else bytes += numel * (asStored ? bytesPer[t.dtype]! : bytesPer[dtype]!);
    }
    const c = ck.config;
    return {
      weightBytes: bytes,
      shape: { vocabSize: c.vocabSize, hiddenSize: c.hiddenSize, numLayers: c.numLayers, numHeads: c.numHeads, kvBytesPerToken: kvBytesPerToken(c) },
    };
  } finally {
    ck.dispose();
  }
}

function isOutOfMemory(err: unknown): boolean {
  if (err instanceof BlossomError) return err.code === "memory";
  const message = (err as Error)?.message ?? "";
  return err instanceof RangeError || /allocat|out of memory|ENOMEM/i.test(message);
}

async function runCell(model: Model, job: ChildJob, batchSize: number, promptTokens: number, shape: ModelShape): Promise<CellResult> {
  const { settings } = job;
  const predicted = predictBatchMemory(shape, batchSize, promptTokens, settings.newTokens);
  if (predicted.total > settings.maxMemoryBytes) {
    return {
      batchSize,
      status: "oom",
      reason: `predicted ${formatBytes(predicted.total)} (weights ${formatBytes(predicted.weights)}, KV cache ${formatBytes(predicted.kvCache)}, activations ${formatBytes(predicted.activations)}) > budget ${formatBytes(settings.maxMemoryBytes)}`,
      predicted,
    };
  }
  const prompts = Array.from({ length: batchSize }, (_, i) => job.prompts[i % job.prompts.length]!);
  // Every sequence generates exactly newTokens, as in the guide's batches (padded rows run to the end).
  const params = { maxNewTokens: settings.newTokens, minNewTokens: settings.newTokens };
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
  const { shape, weightBytes } = expectedWeightBytes(config.model, config.dtype);
  const tokenizer = BloomTokenizer.fromDir(config.model);
  const promptTokens = Math.max(...(await Promise.all(job.prompts.map(async (p) => (await tokenizer.encode(p)).length))));
  const modelShape: ModelShape = { ...shape, weightBytes };
  // Size the KV pool for the largest batch that may fit; it is reserved, and only used blocks become resident.
  const room = Math.max(0, settings.maxMemoryBytes - weightBytes);
  const largest = Math.max(...settings.batchSizes);
  const started = performance.now();
  const model = await loadModel(config.model, {
    dtype: config.dtype as ModelDType,
    ...(config.threads !== undefined ? { threads: config.threads } : {}),
    // BLOSSOM_BENCH_KV_TOKENS overrides the pool size (to reproduce a KV cache that runs out at run time).
    kvCacheTokens: process.env.BLOSSOM_BENCH_KV_TOKENS
      ? Number(process.env.BLOSSOM_BENCH_KV_TOKENS)
      : Math.max(256, Math.min(largest * (promptTokens + settings.newTokens), Math.floor(room / shape.kvBytesPerToken))),
    maxBatchSize: largest,
  });
  const loadSeconds = (performance.now() - started) / 1000;
  send({ type: "loaded", loadSeconds, rssAfterLoadBytes: native().residentBytes(), engine: model.info });
  try {
    for (const batchSize of settings.batchSizes) {
      send({ type: "cell", cell: await runCell(model, job, batchSize, promptTokens, modelShape) });
    }
  } finally {
    await model.dispose();
  }
}

process.once("message", (job: ChildJob) => {
  run(job).then(
    () => process.exit(0),
    (err: unknown) => {
      send({ type: "failed", error: err instanceof Error ? err.message : String(err) });
      process.exit(1);
    },
  );
});
