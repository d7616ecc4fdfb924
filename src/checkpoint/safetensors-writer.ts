/**
 * Streaming safetensors writer: the header (names, dtypes, shapes, data offsets) is fixed up front
 * from tensor descriptors, then each tensor's bytes arrive in chunks and go straight to the file at
 * their offset. Nothing larger than one chunk is ever held in memory, so a 14 GB model can be
 * written from a machine with little RAM.
 *
 * The file is byte-for-byte what the reference implementation (Rust `safetensors`, used by
 * `safetensors.torch.save_file` and `save_pretrained`) writes for the same tensors: data ordered by
 * dtype (widest first) then name, header keys in data order after `__metadata__`, and the header
 * padded with spaces to a multiple of 8 bytes so every tensor starts 8-byte aligned.
 * Format: https://github.com/huggingface/safetensors#format
 */
import { mkdir, open, rename, rm, writeFile, type FileHandle } from "node:fs/promises";
import { basename, join } from "node:path";
import { BlossomError, checkpointError, parameterError } from "../errors.js";
import { HugePageWriter } from "./huge-page-writer.js";
import { compareCodePoints, sortedMap, stringifyJson } from "./json-text.js";

/** Element sizes; the key order is the reference's dtype order (its sort puts later ones first). */
export const SAFETENSORS_DTYPE_BYTES = {
  BOOL: 1,
  U8: 1,
  I8: 1,
  F8_E5M2: 1,
  F8_E4M3: 1,
  I16: 2,
  U16: 2,
  F16: 2,
  BF16: 2,
  I32: 4,
  U32: 4,
  F32: 4,
  F64: 8,
  I64: 8,
  U64: 8,
} as const;

export type SafetensorsDType = keyof typeof SAFETENSORS_DTYPE_BYTES;

const DTYPE_RANK = new Map(Object.keys(SAFETENSORS_DTYPE_BYTES).map((dtype, rank) => [dtype, rank]));

export interface TensorSpec {
  name: string;
  dtype: SafetensorsDType;
  shape: readonly number[];
}

/** A tensor plus a way to produce its bytes (little-endian, C order), in chunks of any size. */
export interface TensorSource extends TensorSpec {
  data(): Iterable<Uint8Array> | AsyncIterable<Uint8Array>;
}

export function tensorElementCount(shape: readonly number[]): number {
  return shape.reduce((product, dim) => product * dim, 1);
}

export function tensorByteLength(spec: TensorSpec): number {
  return tensorElementCount(spec.shape) * SAFETENSORS_DTYPE_BYTES[spec.dtype];
}

export interface SafetensorsLayout {
  /** The 8-byte little-endian header length followed by the padded JSON header. */
  header: Uint8Array;
  /** Where tensor data starts in the file (header.length). */
  dataStart: number;
  /** Tensors in the order their bytes lie in the file. */
  order: TensorSpec[];
  /** Byte range of each tensor relative to dataStart. */
  offsets: Map<string, [begin: number, end: number]>;
  fileSize: number;
}

export type TensorOrder = "reference" | "given";

function validateSpec(spec: TensorSpec, file: string): void {
  if (typeof spec.name !== "string" || spec.name.length === 0 || spec.name === "__metadata__") {
    throw checkpointError(file, `invalid tensor name ${JSON.stringify(spec.name)}`);
  }
  if (!(spec.dtype in SAFETENSORS_DTYPE_BYTES)) {
    throw checkpointError(file, `tensor ${spec.name}: unknown dtype ${JSON.stringify(spec.dtype)}, expected one of ${Object.keys(SAFETENSORS_DTYPE_BYTES).join(", ")}`);
  }
  if (!Array.isArray(spec.shape) || spec.shape.some((dim) => !Number.isSafeInteger(dim) || dim < 0)) {
    throw checkpointError(file, `tensor ${spec.name}: shape must be a list of non-negative integers, got ${JSON.stringify(spec.shape)}`);
  }
  if (!Number.isSafeInteger(tensorByteLength(spec))) {
    throw checkpointError(file, `tensor ${spec.name}: ${JSON.stringify(spec.shape)} is too large`);
  }
}

/**
 * Lays out a safetensors file. `order: "reference"` (default) sorts like the reference writer;
 * `"given"` keeps the descriptors' order. Metadata values must be strings, as the format requires.
 */
export function planSafetensors(
  specs: readonly TensorSpec[],
  options: { metadata?: Record<string, string>; order?: TensorOrder; file?: string } = {},
): SafetensorsLayout {
  const file = options.file ?? "safetensors";
  const seen = new Set<string>();
  for (const spec of specs) {
    validateSpec(spec, file);
    if (seen.has(spec.name)) throw checkpointError(file, `tensor ${spec.name} is listed twice`);
    seen.add(spec.name);
  }
  const order = [...specs];
  if ((options.order ?? "reference") === "reference") {
    order.sort((a, b) => DTYPE_RANK.get(b.dtype)! - DTYPE_RANK.get(a.dtype)! || compareCodePoints(a.name, b.name));
  }
  const header = new Map<string, unknown>();
  if (options.metadata) {
    for (const [key, value] of Object.entries(options.metadata)) {
      if (typeof value !== "string") throw checkpointError(file, `__metadata__.${key} must be a string, got ${typeof value}`);
    }
    header.set("__metadata__", sortedMap(options.metadata));
  }
  const offsets = new Map<string, [number, number]>();
  let offset = 0;
  for (const spec of order) {
    const end = offset + tensorByteLength(spec);
    offsets.set(spec.name, [offset, end]);
    header.set(spec.name, new Map<string, unknown>([
      ["dtype", spec.dtype],
      ["shape", [...spec.shape]],
      ["data_offsets", [offset, end]],
    ]));
    offset = end;
  }
  const json = new TextEncoder().encode(compactJson(header));
  const padded = Math.ceil(json.length / 8) * 8;
  const bytes = new Uint8Array(8 + padded).fill(0x20, 8 + json.length);
  new DataView(bytes.buffer).setBigUint64(0, BigInt(padded), true);
  bytes.set(json, 8);
  return { header: bytes, dataStart: bytes.length, order, offsets, fileSize: bytes.length + offset };
}

/** serde_json's compact form: no spaces, keys in Map order. */
function compactJson(value: unknown): string {
  if (value instanceof Map) {
    const parts: string[] = [];
    for (const [key, item] of value) parts.push(`${JSON.stringify(String(key))}:${compactJson(item)}`);
    return `{${parts.join(",")}}`;
  }
  if (Array.isArray(value)) return `[${value.map(compactJson).join(",")}]`;
  return JSON.stringify(value);
}

/**
 * Writes one safetensors file. Tensors may be written in any order, each one's chunks in sequence;
 * the writer checks that no tensor receives more bytes than its shape holds and, on close, that
 * every tensor is complete. The file is written under a temporary name and renamed on close, so a
 * crash never leaves a truncated file under the real name.
 */
export class SafetensorsWriter {
  readonly path: string;
  readonly layout: SafetensorsLayout;
  private readonly written = new Map<string, number>();
  private handle: FileHandle | undefined;
  private readonly out: HugePageWriter;
  private readonly temporaryPath: string;

  private constructor(path: string, layout: SafetensorsLayout, handle: FileHandle, temporaryPath: string) {
    this.path = path;
    this.layout = layout;
    this.handle = handle;
    this.out = new HugePageWriter(handle);
    this.temporaryPath = temporaryPath;
    for (const spec of layout.order) this.written.set(spec.name, 0);
  }

  static async create(
    path: string,
    specs: readonly TensorSpec[],
    options: { metadata?: Record<string, string>; order?: TensorOrder } = {},
  ): Promise<SafetensorsWriter> {
    const layout = planSafetensors(specs, { ...options, file: basename(path) });
    const temporaryPath = `${path}.partial`;
    const handle = await open(temporaryPath, "w");
    try {
      // Sizing the file up front lets tensors be written in any order without sparse surprises
      // when a tensor is empty (the last bytes may otherwise never be written).
      await handle.truncate(layout.fileSize);
    } catch (err) {
      await handle.close();
      await rm(temporaryPath, { force: true });
      throw err;
    }
    const writer = new SafetensorsWriter(path, layout, handle, temporaryPath);
    // Staged with the first tensor's bytes, so the file's first 2 MiB are one write too.
    await writer.out.write(layout.header, 0);
    return writer;
  }

  /** Tensors in file order: writing them in this order writes the file sequentially. */
  get order(): readonly TensorSpec[] {
    return this.layout.order;
  }

  /** Appends `chunk` to tensor `name`. */
  async write(name: string, chunk: Uint8Array): Promise<void> {
    this.requireOpen();
    const range = this.layout.offsets.get(name);
    if (!range) throw checkpointError(basename(this.path), `tensor ${name} is not in this file's header`);
    const done = this.written.get(name)!;
    const capacity = range[1] - range[0];
    if (done + chunk.byteLength > capacity) {
      throw checkpointError(basename(this.path), `tensor ${name}: got ${done + chunk.byteLength} bytes, its dtype and shape hold ${capacity}`);
    }
    await this.out.write(chunk, this.layout.dataStart + range[0] + done);
    this.written.set(name, done + chunk.byteLength);
  }

  /** Writes all of a tensor's chunks and checks the total. Returns the byte count. */
  async writeTensor(name: string, chunks: Iterable<Uint8Array> | AsyncIterable<Uint8Array>, onChunk?: (bytes: number) => void): Promise<number> {
    for await (const chunk of chunks) {
      await this.write(name, chunk);
      onChunk?.(chunk.byteLength);
    }
    this.checkComplete(name);
    return this.written.get(name)!;
  }

  private checkComplete(name: string): void {
    const [begin, end] = this.layout.offsets.get(name)!;
    const done = this.written.get(name)!;
    if (done !== end - begin) {
      throw checkpointError(basename(this.path), `tensor ${name}: got ${done} bytes, its dtype and shape need ${end - begin}`);
    }
  }

  /** Checks every tensor is complete, then closes and moves the file to its final name. */
  async close(): Promise<void> {
    const handle = this.requireOpen();
    for (const spec of this.layout.order) this.checkComplete(spec.name);
    await this.out.flush();
    this.handle = undefined;
    await handle.close();
    await rename(this.temporaryPath, this.path);
  }

  /** Closes and deletes the partial file (safe to call after a failure, or twice). */
  async abort(): Promise<void> {
    const handle = this.handle;
    this.handle = undefined;
    if (handle) await handle.close().catch(() => undefined);
    await rm(this.temporaryPath, { force: true });
  }

  private requireOpen(): FileHandle {
    if (!this.handle) throw new BlossomError("internal", `${basename(this.path)}: writer is already closed`);
    return this.handle;
  }
}

/** Writes one safetensors file from tensor sources, in file order. */
export async function writeSafetensors(
  path: string,
  tensors: readonly TensorSource[],
  options: { metadata?: Record<string, string>; order?: TensorOrder; onBytes?: (bytes: number) => void; signal?: AbortSignal } = {},
): Promise<SafetensorsLayout> {
  const writer = await SafetensorsWriter.create(path, tensors, options);
  const byName = new Map(tensors.map((tensor) => [tensor.name, tensor]));
  try {
    for (const spec of writer.order) {
      throwIfAborted(options.signal);
      await writer.writeTensor(spec.name, byName.get(spec.name)!.data(), options.onBytes);
    }
    await writer.close();
  } catch (err) {
    await writer.abort();
    throw err;
  }
  return writer.layout;
}

function throwIfAborted(signal: AbortSignal | undefined): void {
  if (signal?.aborted) throw new BlossomError("aborted", "writing the checkpoint was aborted", { cause: signal.reason });
}

export const DEFAULT_MAX_SHARD_BYTES = 2 * 1024 ** 3;

export interface ShardPlan {
  /** File names, e.g. ["model.safetensors"] or ["model-00001-of-00003.safetensors", ...]. */
  files: string[];
  /** The tensors of each file, in the given (state-dict) order. */
  shards: TensorSpec[][];
  /** Sum of all tensors' bytes (the index's `total_size`). */
  totalSize: number;
  /** Tensor name → file name. */
  weightMap: Map<string, string>;
}

/**
 * Splits tensors, in the given order, into files of at most `maxShardBytes` of tensor data the way
 * `save_pretrained` does: a new shard starts when the next tensor would overflow the current one;
 * a tensor larger than the limit gets a shard of its own.
 */
export function planShards(
  tensors: readonly TensorSpec[],
  options: { maxShardBytes?: number; prefix?: string } = {},
): ShardPlan {
  const maxShardBytes = options.maxShardBytes ?? DEFAULT_MAX_SHARD_BYTES;
  const prefix = options.prefix ?? "model";
  if (!(maxShardBytes > 0)) throw parameterError("maxShardBytes", `must be a positive number of bytes, got ${maxShardBytes}`);
  const shards: TensorSpec[][] = [];
  let current: TensorSpec[] = [];
  let currentBytes = 0;
  let totalSize = 0;
  for (const tensor of tensors) {
    validateSpec(tensor, prefix);
    const bytes = tensorByteLength(tensor);
    if (current.length > 0 && currentBytes + bytes > maxShardBytes) {
      shards.push(current);
      current = [];
      currentBytes = 0;
    }
    current.push(tensor);
    currentBytes += bytes;
    totalSize += bytes;
  }
  if (current.length > 0 || shards.length === 0) shards.push(current);
  const count = shards.length;
  const pad = (n: number) => String(n).padStart(5, "0");
  const files = count === 1 ? [`${prefix}.safetensors`] : shards.map((_, i) => `${prefix}-${pad(i + 1)}-of-${pad(count)}.safetensors`);
  const weightMap = new Map<string, string>();
  shards.forEach((shard, i) => shard.forEach((tensor) => weightMap.set(tensor.name, files[i])));
  return { files, shards, totalSize, weightMap };
}

/** The text of `model.safetensors.index.json`, as `save_pretrained` writes it (sorted keys, 2-space indent). */
export function shardIndexJson(plan: ShardPlan): string {
  const index = new Map<string, unknown>([
    ["metadata", new Map([["total_size", plan.totalSize]])],
    ["weight_map", sortedMap(plan.weightMap)],
  ]);
  return stringifyJson(index) + "\n";
}

export interface ShardedCheckpointResult {
  files: string[];
  /** `model.safetensors.index.json` when there is more than one file. */
  indexFile?: string;
  totalSize: number;
  weightMap: Map<string, string>;
}

/**
 * Writes tensors (in state-dict order) as `model.safetensors`, or as
 * `model-0000k-of-0000N.safetensors` plus `model.safetensors.index.json` when they exceed
 * `maxShardBytes` (default 2 GiB, so each file's tensors can be mapped as < 4 GiB views on Node 20).
 * `metadata` defaults to `{"format": "pt"}`, which transformers expects in every file.
 */
export async function writeShardedCheckpoint(
  dir: string,
  tensors: readonly TensorSource[],
  options: {
    maxShardBytes?: number;
    metadata?: Record<string, string>;
    prefix?: string;
    onProgress?: (doneBytes: number, totalBytes: number) => void;
    signal?: AbortSignal;
  } = {},
): Promise<ShardedCheckpointResult> {
  const plan = planShards(tensors, options);
  const byName = new Map(tensors.map((tensor) => [tensor.name, tensor]));
  await mkdir(dir, { recursive: true });
  let done = 0;
  const onBytes = (bytes: number) => {
    done += bytes;
    options.onProgress?.(done, plan.totalSize);
  };
  for (let i = 0; i < plan.files.length; i++) {
    await writeSafetensors(join(dir, plan.files[i]), plan.shards[i].map((spec) => byName.get(spec.name)!), {
      metadata: options.metadata ?? { format: "pt" },
      onBytes,
      signal: options.signal,
    });
  }
  let indexFile: string | undefined;
  if (plan.files.length > 1) {
    indexFile = `${options.prefix ?? "model"}.safetensors.index.json`;
    await writeFile(join(dir, indexFile), shardIndexJson(plan));
  }
  return { files: plan.files, indexFile, totalSize: plan.totalSize, weightMap: plan.weightMap };
}
