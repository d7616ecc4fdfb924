/**
 * `blossom quantize`: writes a pre-quantized checkpoint that every command loads directly,
 * memory-mapped, with no re-quantization (the way microsoft/bloom-deepspeed-inference-int8 ships a
 * ready checkpoint).
 *
 * Layout: Hugging Face's, with each quantized matrix `X.weight` stored as I8 [out, in] plus
 * `X.weight_scale` F16 [out, ceil(in / group)]; every other tensor as it was. config.json gains
 *   quantization_config: { quant_method: "blossom-int8", scheme, group_size, scale_dtype: "float16",
 *                          activations, threshold (int8-mixed), quantized_tensors }
 * int8-mixed has one scale per row; its group_size records the widest row, so every row is one group.
 * The tokenizer and every other top-level file are copied alongside.
 */
import { copyFileSync, existsSync, mkdirSync, readdirSync, rmSync, statSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { CpuBackend } from "../backend/cpu.js";
import { indexFileName, openCheckpoint, singleFileName } from "../checkpoint/checkpoint.js";
import type { SafetensorsDtype, TensorView } from "../checkpoint/safetensors.js";
import { BlossomError, checkpointError, parameterError } from "../errors.js";
import { bloomTensors } from "../models/bloom-weights.js";
import type { StorageDType } from "../backend/native.js";
import { native } from "../backend/native.js";
import { groupsPerRow, quantMethod, quantSpec, scaleTensorName, type QuantScheme } from "./scheme.js";
import { alignedOrder, SafetensorsWriter, tensorBytes, type TensorEntry } from "./safetensors-writer.js";

export interface QuantizeCheckpointOptions {
  scheme: QuantScheme;
  groupSize?: number | undefined;
  /** Shard the weights into files of at most this many bytes (default 5 GB, as transformers does). */
  maxShardBytes?: number | undefined;
  threads?: number | undefined;
  /** Called after each tensor: (tensors done, tensors in all). */
  onProgress?: ((done: number, total: number) => void) | undefined;
}

export interface QuantizeCheckpointResult {
  files: string[];
  /** Bytes of tensor data written, and what the source held. */
  bytes: number;
  sourceBytes: number;
  quantizedTensors: number;
  seconds: number;
}

const safetensorsName: Record<StorageDType, SafetensorsDtype> = { f32: "F32", f16: "F16", bf16: "BF16", i8: "I8" };

/** Files of the source folder that are weights in some format (not copied), besides config.json. */
function isWeightFile(name: string): boolean {
  return /\.(safetensors|bin|pt|pth|h5|msgpack|ckpt)$/.test(name) || name.endsWith(".index.json");
}

interface Planned extends TensorEntry {
  /** The source tensor, and whether this entry is its int8 values, its scales, or a copy. */
  source: TensorView;
  role: "values" | "scales" | "copy";
}

export function quantizeCheckpoint(sourceDir: string, outDir: string, options: QuantizeCheckpointOptions): QuantizeCheckpointResult {
  const started = performance.now();
  const spec = quantSpec(options.scheme, { groupSize: options.groupSize });
  const maxShardBytes = options.maxShardBytes ?? 5e9;
  if (!(maxShardBytes > 0)) throw parameterError("maxShardBytes", `expected a positive size, got ${maxShardBytes}`);
  if (existsSync(outDir) && (!statSync(outDir).isDirectory() || readdirSync(outDir).length > 0)) {
    throw parameterError("out", `${outDir} exists and is not an empty folder; choose a new folder`);
  }
  const backend = new CpuBackend(options.threads === undefined ? {} : { threads: options.threads });
  const checkpoint = openCheckpoint(sourceDir);
  const written: string[] = [];
  const writers: SafetensorsWriter[] = [];
  try {
    if (checkpoint.config.quantization) throw checkpointError(join(sourceDir, "config.json"), `the checkpoint is already quantized (${checkpoint.config.quantization.scheme})`);
    const tensors = bloomTensors(checkpoint);
    // The matrices the model multiplies by: the tied (or separate) embedding / head and the block linears.
    const matrices = new Set<string>([tensors.wordEmbeddings.name, ...(tensors.lmHeadTied ? [] : [tensors.lmHead.name])]);
    for (const l of tensors.layers) for (const lin of [l.queryKeyValue, l.dense, l.denseHTo4h, l.dense4hToH]) matrices.add(lin.weight.name);

    const plan: Planned[] = [];
    let widestRow = 0;
    for (const [name, view] of checkpoint.tensors) {
      if (!matrices.has(name)) {
        plan.push({ name, dtype: safetensorsName[view.dtype], shape: view.shape, source: view, role: "copy" });
        continue;
      }
      const [out, inFeatures] = view.shape as [number, number];
      widestRow = Math.max(widestRow, inFeatures);
      plan.push({ name, dtype: "I8", shape: [out, inFeatures], source: view, role: "values" });
      plan.push({ name: scaleTensorName(name), dtype: "F16", shape: [out, groupsPerRow(inFeatures, spec.groupSize)], source: view, role: "scales" });
    }

    // Shards in aligned order; each shard's data starts aligned, so offsets stay aligned within it.
    const shards: Planned[][] = [[]];
    let size = 0;
    for (const entry of alignedOrder(plan)) {
      const bytes = tensorBytes(entry);
      if (size > 0 && size + bytes > maxShardBytes) {
        shards.push([]);
        size = 0;
      }
      shards.at(-1)!.push(entry);
      size += bytes;
    }
    const shardName = (i: number) => (shards.length === 1 ? singleFileName : `model-${String(i + 1).padStart(5, "0")}-of-${String(shards.length).padStart(5, "0")}.safetensors`);

    mkdirSync(outDir, { recursive: true });
    const writerOf = new Map<string, SafetensorsWriter>();
    shards.forEach((entries, i) => {
      const file = join(outDir, shardName(i));
      const writer = new SafetensorsWriter(file, entries);
      writers.push(writer);
      written.push(file);
      for (const e of entries) writerOf.set(e.name, writer);
    });

    const total = checkpoint.tensors.size;
    let done = 0, quantizedTensors = 0;
    for (const [name, view] of checkpoint.tensors) {
      if (matrices.has(name)) {
        const m = backend.quantizedMatrix(view, { ...spec, releaseSource: true });
        try {
          writerOf.get(name)!.writeRegion(name, m.region, m.byteOffset, m.outFeatures * m.inFeatures);
          const scalesBytes = m.outFeatures * groupsPerRow(m.inFeatures, spec.groupSize) * 2;
          writerOf.get(scaleTensorName(name))!.writeRegion(scaleTensorName(name), m.scalesRegion, m.scalesOffset, scalesBytes);
        } finally {
          backend.freeMatrix(m);
        }
        quantizedTensors++;
      } else {
        writerOf.get(name)!.writeRegion(name, view.region, view.byteOffset, view.byteLength);
      }
      // Read once: drop the source pages so a large checkpoint does not stay resident.
      native().advise(view.region, view.byteOffset, view.byteLength, "dontneed");
      options.onProgress?.(++done, total);
    }
    for (const w of writers) w.close();

    const bytes = writers.reduce((a, w) => a + w.dataBytes, 0);
    if (shards.length > 1) {
      const weightMap: Record<string, string> = {};
      shards.forEach((entries, i) => entries.forEach((e) => (weightMap[e.name] = shardName(i))));
      const sorted = Object.fromEntries(Object.entries(weightMap).sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0)));
      const indexFile = join(outDir, indexFileName);
      writeFileSync(indexFile, JSON.stringify({ metadata: { total_size: bytes }, weight_map: sorted }, null, 2) + "\n");
      written.push(indexFile);
    }
    const config = {
      ...checkpoint.config.raw,
      quantization_config: {
        quant_method: quantMethod,
        scheme: spec.scheme,
        group_size: spec.scheme === "int8-mixed" ? widestRow : spec.groupSize,
        scale_dtype: "float16",
        activations: spec.scheme === "int8-mixed" ? "per-token, outlier features in fp32" : "per-token, per-group",
        ...(spec.scheme === "int8-mixed" ? { threshold: spec.threshold } : {}),
        quantized_tensors: quantizedTensors,
      },
    };
    const configFile = join(outDir, "config.json");
    writeFileSync(configFile, JSON.stringify(config, null, 2) + "\n");
    written.push(configFile);
    for (const f of readdirSync(sourceDir, { withFileTypes: true })) {
      if (!f.isFile() || f.name === "config.json" || isWeightFile(f.name)) continue;
      copyFileSync(join(sourceDir, f.name), join(outDir, f.name));
      written.push(join(outDir, f.name));
    }
    return { files: written, bytes, sourceBytes: checkpoint.totalBytes, quantizedTensors, seconds: (performance.now() - started) / 1000 };
  } catch (err) {
    for (const w of writers) w.abort();
    for (const f of written) rmSync(f, { force: true });
    if (err instanceof BlossomError) throw err;
    throw new BlossomError("internal", `quantize: ${(err as Error).message}`, { cause: err });
  } finally {
    checkpoint.dispose();
    backend.dispose();
  }
}
