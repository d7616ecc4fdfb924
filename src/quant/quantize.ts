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
import { beginOutput, isInsidePartial, type OutputFolder } from "../folders.js";
import { copyFileSync, existsSync, readdirSync, statSync, writeFileSync } from "node:fs";
import { join, relative } from "node:path";
import { CpuBackend } from "../backend/cpu.js";
import { indexFileName, openCheckpoint } from "../checkpoint/checkpoint.js";
import type { SafetensorsDtype, TensorView } from "../checkpoint/safetensors.js";
import { BlossomError, checkpointError, parameterError } from "../errors.js";
import { bloomTensors } from "../models/bloom-weights.js";
import type { StorageDType } from "../backend/native.js";
import { native, type NativeRegion } from "../backend/native.js";
import { groupsPerRow, quantMethod, quantSpec, scaleTensorName, type QuantScheme } from "./scheme.js";
import { groupSizeMetadataKey } from "./store.js";
import { RANDOM_CHECKPOINT_MARKER } from "../checkpoint/create-random.js";
import { planShards, SafetensorsWriter, shardIndexJson, tensorByteLength, type TensorSpec } from "../checkpoint/safetensors-writer.js";

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

interface Planned extends TensorSpec {
  /** The source tensor, and whether this entry is its int8 values, its scales, or a copy. */
  source: TensorView;
  role: "values" | "scales" | "copy";
}

export async function quantizeCheckpoint(sourceDir: string, outDir: string, options: QuantizeCheckpointOptions): Promise<QuantizeCheckpointResult> {
  const started = performance.now();
  const spec = quantSpec(options.scheme, { groupSize: options.groupSize });
  const maxShardBytes = options.maxShardBytes ?? 5e9;
  if (!(maxShardBytes > 0)) throw parameterError("maxShardBytes", `expected a positive size, got ${maxShardBytes}`);
  if (existsSync(outDir) && (!statSync(outDir).isDirectory() || readdirSync(outDir).some((name) => !isInsidePartial(name)))) {
    throw parameterError("out", `${outDir} exists and is not an empty folder; choose a new folder`);
  }
  const backend = new CpuBackend(options.threads === undefined ? {} : { threads: options.threads });
  const checkpoint = openCheckpoint(sourceDir);
  const written: string[] = [];
  // Everything is written into a folder of this process's own and renamed into place at the end: a
  // second process quantizing into the same --out never mixes or deletes files with this one.
  let output: OutputFolder | undefined;
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

    // Shards in state-dict order, as save_pretrained splits them; each file lays its tensors out by
    // decreasing element size (the safetensors library's order), so every offset stays aligned.
    const shards = planShards(plan, { maxShardBytes });
    output = beginOutput(outDir);
    const work = output.work;
    const writerOf = new Map<string, SafetensorsWriter>();
    for (const [i, entries] of shards.shards.entries()) {
      const file = join(work, shards.files[i]!);
      const metadata: Record<string, string> = { format: "pt", ...(spec.scheme === "int8" ? { [groupSizeMetadataKey]: String(spec.groupSize) } : {}) };
      const writer = await SafetensorsWriter.create(file, entries, { metadata });
      writers.push(writer);
      written.push(file);
      for (const e of entries) writerOf.set(e.name, writer);
    }
    /** Writes `byteLength` bytes of a native region (a mapping or an allocation) as tensor `name`, in chunks. */
    const writeRegion = async (name: string, region: NativeRegion, byteOffset: number, byteLength: number) => {
      const chunk = 64 * 2 ** 20;
      for (let done = 0; done < byteLength; done += chunk) {
        await writerOf.get(name)!.write(name, new Uint8Array(native().view(region, byteOffset + done, Math.min(chunk, byteLength - done))).slice());
      }
    };

    const total = checkpoint.tensors.size;
    let done = 0, quantizedTensors = 0;
    for (const [name, view] of checkpoint.tensors) {
      if (matrices.has(name)) {
        const m = backend.quantizedMatrix(view, { ...spec, releaseSource: true });
        try {
          await writeRegion(name, m.region, m.byteOffset, m.outFeatures * m.inFeatures);
          const scalesBytes = m.outFeatures * groupsPerRow(m.inFeatures, spec.groupSize) * 2;
          await writeRegion(scaleTensorName(name), m.scalesRegion, m.scalesOffset, scalesBytes);
        } finally {
          backend.freeMatrix(m);
        }
        quantizedTensors++;
      } else {
        await writeRegion(name, view.region, view.byteOffset, view.byteLength);
      }
      // Read once: drop the source pages so a large checkpoint does not stay resident.
      native().advise(view.region, view.byteOffset, view.byteLength, "dontneed");
      options.onProgress?.(++done, total);
    }
    for (const w of writers) await w.close();

    const bytes = plan.reduce((a, e) => a + tensorByteLength(e), 0);
    if (shards.files.length > 1) {
      const indexFile = join(work, indexFileName);
      writeFileSync(indexFile, shardIndexJson(shards));
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
    const configFile = join(work, "config.json");
    writeFileSync(configFile, JSON.stringify(config, null, 2) + "\n");
    written.push(configFile);
    for (const name of readdirSync(sourceDir)) {
      // Following links: a Hub snapshot's files are symlinks into its blobs. create-random's marker
      // stays behind (it lets create-random overwrite the folder it made, which this one is not).
      if (name === "config.json" || name === RANDOM_CHECKPOINT_MARKER || isInsidePartial(name) || isWeightFile(name) || !statSync(join(sourceDir, name), { throwIfNoEntry: false })?.isFile()) continue;
      copyFileSync(join(sourceDir, name), join(work, name));
      written.push(join(work, name));
    }
    // In place over a missing or empty --out (made by the user), not one another process has filled meanwhile.
    if (!(await output.place())) throw parameterError("out", `${outDir} was written by another process while this one worked; choose a new folder`);
    const target = output.target;
    const files = written.map((f) => join(target, relative(work, f)));
    return { files, bytes, sourceBytes: checkpoint.totalBytes, quantizedTensors, seconds: (performance.now() - started) / 1000 };
  } catch (err) {
    for (const w of writers) await w.abort();
    output?.abort();
    if (err instanceof BlossomError) throw err;
    throw new BlossomError("internal", `quantize: ${(err as Error).message}`, { cause: err });
  } finally {
    checkpoint.dispose();
    backend.dispose();
  }
}
