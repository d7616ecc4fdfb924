/** The CPU backend: buffers are Float32Arrays, kernels run in the native addon's thread pool. */
import { availableMemory } from "../engine/memory.js";
import { BlossomError } from "../errors.js";
import type { TensorView } from "../checkpoint/safetensors.js";
import { kvEntryBytes, type AttentionBatch, type AttentionShape, type Backend, type DeviceBuffer, type DeviceMatrix, type KVBuffer, type KVDType, type KVLayer, type ChainOpSpec, type LinearOptions, type MappedWeightsReport, type MatrixOptions, type OpChain, type QuantizedMatrix, type QuantizeOptions } from "./backend.js";
import { ActivationMode, DTypeCode, Epilogue, native, type NativeChain, type NativeRegion, type StorageDType } from "./native.js";

export interface CpuMatrix extends DeviceMatrix {
  readonly dtype: StorageDType;
  readonly region: NativeRegion;
  readonly byteOffset: number;
  /** Set when the matrix lives in memory this backend allocated (a conversion, or a copy in panels). */
  readonly owned: boolean;
  /** > 0: stored in column panels of this many inputs (native/src/kernels.h WeightMatrix), not row-major. */
  readonly panelK?: number;
  /**
   * A memory-mapped matrix too big to keep resident (an offloaded LM head): linear() reads it in
   * chunks of about this many bytes, asking the kernel to read the next chunk ahead and dropping each
   * chunk's pages after use, so it never holds more than two chunks.
   */
  readonly streamChunkBytes?: number;
}

/** int8 values at (region, byteOffset), fp16 scales at (scalesRegion, scalesOffset); see native/src/quant.h. */
export interface CpuQuantizedMatrix extends QuantizedMatrix {
  readonly region: NativeRegion;
  readonly byteOffset: number;
  readonly scalesRegion: NativeRegion;
  readonly scalesOffset: number;
  /** Set when the matrix lives in memory this backend allocated (quantized at load): its arena. */
  readonly owned: boolean;
  readonly arena?: Arena;
}

/**
 * Matrices quantized at load are placed side by side in arenas of 64 MiB of huge pages. Allocated
 * one by one, every matrix would end in a partial 2 MiB page that the kernel backs with 4 KiB pages:
 * at bloom-560m's shapes (1-4 MiB matrices) 27 % of the int8 weights, which batch-1 decoding then
 * streams with a TLB miss every 4 KiB. An arena is released when its last matrix is freed.
 */
interface Arena {
  readonly region: NativeRegion;
  readonly size: number;
  used: number;
  live: number;
}
const arenaBytes = 64 * 2 ** 20;

const largeAllocation = 64 * 2 ** 20;

/**
 * Which matrices used only by linear() are copied at load into column panels (native/src/kernels.h):
 * those in `dtypes` with more than `above` inputs, in panels of `width` inputs. A row of x (fp32, 4
 * bytes per input) then fits in L1 beside the weight stream. Measured on the development machine
 * (bench:kernels --layout both, and the two layouts alternated in one process): bf16/fp16 rows of
 * 16384 inputs (bloom-7b1 dense_4h_to_h) at batch 1 79-86 % of the read bandwidth as rows, 95-99 % in
 * panels of 4096; 10240 inputs (bloom-3b) +10 %, 8192 (bloom-1b7) +4-7 %; batch 16-32 +10-30 %.
 * Batch 2-3 lose 3-4 % in the low-bandwidth state and gain ~20 % in the high one; batch 64 is even.
 * Rows of 4096 inputs gain nothing. Panels of 4096 beat 2048 and 8192 at batch 8-128 and tie 2048 at
 * batch 1. (Taking all panels in one parallel region, each thread's rows of every panel in turn,
 * measured 7-13 % slower than one region per panel.) fp32 weights (as many bytes as x) stay row-major:
 * in panels they gain nothing at batch 1, lose 3-8 % at batch 4-8 and gain 14-15 % at batch 16-32.
 */
export interface LinearPanels {
  width: number;
  above: number;
  dtypes: readonly StorageDType[];
}
export const defaultLinearPanels: LinearPanels = { width: 4096, above: 4096, dtypes: ["bf16", "f16"] };

/** The panel width a linear-only matrix of `dtype` with `inFeatures` inputs gets under `policy` (0: kept row-major). */
export function linearPanelWidth(policy: LinearPanels | null, dtype: StorageDType, inFeatures: number): number {
  if (!policy || !policy.dtypes.includes(dtype) || inFeatures <= policy.above || inFeatures <= policy.width) return 0;
  return policy.width;
}

export const bytesPerElement: Record<StorageDType, number> = { f32: 4, f16: 2, bf16: 2, i8: 1 };

/** A region of `bytes` from the addon, or a memory error naming what it was for. */
function allocateRegion(bytes: number, what: string): NativeRegion {
  try {
    return native().allocate(bytes);
  } catch (err) {
    throw new BlossomError("memory", `cannot allocate ${bytes} bytes${what}: ${(err as Error).message}`);
  }
}

/**
 * Calls `copy(r0, rows, sourceOffset)` for the rows of a row-major matrix `view` in slices of ~32 MiB
 * of source; with `release`, each slice's pages are dropped once copied, so a load that converts,
 * quantizes or re-lays out a matrix never holds more than a slice of it twice.
 */
function inSourceSlices(view: TensorView, release: boolean, copy: (r0: number, rows: number, sourceOffset: number) => void): void {
  const [outFeatures, inFeatures] = view.shape as [number, number];
  const rowBytes = inFeatures * bytesPerElement[view.dtype];
  const sliceRows = Math.max(1, Math.floor(32 * 2 ** 20 / rowBytes));
  for (let r0 = 0; r0 < outFeatures; r0 += sliceRows) {
    const rows = Math.min(sliceRows, outFeatures - r0);
    const source = view.byteOffset + r0 * rowBytes;
    copy(r0, rows, source);
    if (release) native().advise(view.region, source, rows * rowBytes, "dontneed");
  }
}

function f32(buffer: DeviceBuffer): Float32Array {
  return buffer as Float32Array;
}

const kvStorage: Record<KVDType, StorageDType> = { fp32: "f32", fp16: "f16", bf16: "bf16" };

export class CpuBackend implements Backend {
  readonly name = "cpu";

  private readonly panels: LinearPanels | null;

  /** `linearPanels`: which matrices to store in column panels (null: none); tests set small ones. */
  constructor(options: { threads?: number; linearPanels?: LinearPanels | null } = {}) {
    if (options.threads !== undefined) native().setThreads(options.threads);
    const p = options.linearPanels === undefined ? defaultLinearPanels : options.linearPanels;
    if (p && (!Number.isInteger(p.width) || p.width < 1 || !Number.isInteger(p.above) || p.above < 0)) {
      throw new BlossomError("parameter", `linearPanels: expected a positive integer width and a non-negative integer above, got ${JSON.stringify(p)}`);
    }
    this.panels = p;
  }

  get threads(): number {
    return native().getThreads();
  }

  /** Large buffers (the KV cache) come from the addon: page-aligned, huge pages, resident only once touched, freed at once. */
  private readonly regions = new WeakMap<object, NativeRegion>();

  private allocBytes(bytes: number): ArrayBuffer {
    // Smaller ones start on a cache line, as the kernels' vector loads of activations expect.
    if (bytes < largeAllocation) return native().allocAligned(bytes);
    if (bytes >= 2 ** 32) throw new BlossomError("memory", `a single buffer of ${bytes} bytes exceeds the 4 GiB limit of one view`);
    const region = allocateRegion(bytes, "");
    const buffer = native().view(region, 0, bytes);
    this.regions.set(buffer, region);
    return buffer;
  }
  private freeBytes(buffer: ArrayBufferLike): void {
    const region = this.regions.get(buffer);
    if (region) {
      this.regions.delete(buffer);
      native().release(region);
    }
  }

  alloc(length: number): DeviceBuffer {
    return new Float32Array(this.allocBytes(length * 4));
  }
  free(buffer: DeviceBuffer): void {
    this.freeBytes(f32(buffer).buffer);
  }
  /** fp32 caches are Float32Arrays, fp16 / bf16 ones Uint16Arrays of the raw 16-bit values. */
  allocKV(length: number, dtype: KVDType): KVBuffer {
    const bytes = this.allocBytes(length * kvEntryBytes(dtype));
    return dtype === "fp32" ? new Float32Array(bytes) : new Uint16Array(bytes);
  }
  freeKV(buffer: KVBuffer): void {
    this.freeBytes((buffer as Float32Array | Uint16Array).buffer);
  }
  upload(data: Float32Array): DeviceBuffer {
    return Float32Array.from(data);
  }
  download(buffer: DeviceBuffer, offset: number, length: number): Float32Array {
    // Host memory already: a view, valid until the buffer is next written.
    return f32(buffer).subarray(offset, offset + length);
  }

  matrix(view: TensorView, dtype: StorageDType, options: MatrixOptions = {}): CpuMatrix {
    if (view.shape.length !== 2) throw new BlossomError("checkpoint", `${view.file}: tensor "${view.name}" must be 2-D to be used as a matrix`);
    const [outFeatures, inFeatures] = view.shape as [number, number];
    const panelK = options.use === "linear" && view.dtype !== "i8" ? linearPanelWidth(this.panels, dtype, inFeatures) : 0;
    if (panelK > 0) return this.panelledMatrix(view, dtype, panelK, options.releaseSource ?? false);
    if (dtype === view.dtype) {
      this.usedInPlace(view.region, view.byteOffset, view.byteLength);
      return { dtype, outFeatures, inFeatures, bytes: view.byteLength, region: view.region, byteOffset: view.byteOffset, owned: false };
    }
    if (dtype === "i8" || view.dtype === "i8") throw new BlossomError("internal", "int8 matrices are built by the quantizer");
    const n = outFeatures * inFeatures;
    const bytes = n * bytesPerElement[dtype];
    const region = native().allocate(bytes);
    native().convert(region, 0, DTypeCode[dtype], view.region, view.byteOffset, DTypeCode[view.dtype], n);
    if (options.releaseSource) this.releaseSource(view);
    return { dtype, outFeatures, inFeatures, bytes, region, byteOffset: 0, owned: true };
  }

  /** `view` converted to `dtype` and copied into column panels of `panelK` inputs (in source slices, inSourceSlices). */
  private panelledMatrix(view: TensorView, dtype: StorageDType, panelK: number, releaseSource: boolean): CpuMatrix {
    const [outFeatures, inFeatures] = view.shape as [number, number];
    const bytes = outFeatures * inFeatures * bytesPerElement[dtype];
    const region = allocateRegion(bytes, ` for "${view.name}"`);
    inSourceSlices(view, releaseSource, (r0, rows) =>
      native().toPanels(region, 0, DTypeCode[dtype], view.region, view.byteOffset, DTypeCode[view.dtype], outFeatures, inFeatures, panelK, r0, r0 + rows),
    );
    return { dtype, outFeatures, inFeatures, bytes, region, byteOffset: 0, owned: true, panelK };
  }

  quantizedMatrix(view: TensorView, options: QuantizeOptions, scales?: TensorView): CpuQuantizedMatrix {
    if (view.shape.length !== 2) throw new BlossomError("checkpoint", `${view.file}: tensor "${view.name}" must be 2-D to be used as a matrix`);
    const [outFeatures, inFeatures] = view.shape as [number, number];
    const groupSize = Math.min(options.groupSize, inFeatures);
    const groups = Math.ceil(inFeatures / groupSize);
    const { releaseSource, ...spec } = options;
    const common = { dtype: "int8" as const, outFeatures, inFeatures, ...spec, groupSize };
    if (scales) {
      // Pre-quantized: used in place from the mapping (the loader has checked dtypes and shapes).
      if (view.dtype !== "i8" || scales.dtype !== "f16") throw new BlossomError("internal", `quantizedMatrix: expected i8 values and f16 scales for "${view.name}"`);
      this.usedInPlace(view.region, view.byteOffset, view.byteLength);
      this.usedInPlace(scales.region, scales.byteOffset, scales.byteLength);
      return { ...common, bytes: view.byteLength + scales.byteLength, region: view.region, byteOffset: view.byteOffset, scalesRegion: scales.region, scalesOffset: scales.byteOffset, owned: false };
    }
    if (view.dtype === "i8") throw new BlossomError("internal", `quantizedMatrix: "${view.name}" is already int8 and needs its scales`);
    const qBytes = outFeatures * inFeatures;
    const scalesAt = Math.ceil(qBytes / 64) * 64;
    const bytes = qBytes + outFeatures * groups * 2;
    const { arena, offset: base } = this.arenaAllocate(scalesAt + outFeatures * groups * 2);
    const region = arena.region;
    const scalesOffset = base + scalesAt;
    inSourceSlices(view, releaseSource ?? false, (r0, rows, source) =>
      native().quantizeWeights(region, base + r0 * inFeatures, region, scalesOffset + r0 * groups * 2, view.region, source, DTypeCode[view.dtype], rows, inFeatures, groupSize),
    );
    // A NaN or infinite weight makes its group's scale NaN or Inf: refuse the tensor rather than compute garbage.
    const computed = new Uint16Array(native().view(region, scalesOffset, outFeatures * groups * 2));
    const bad = computed.findIndex((h) => (h & 0x7c00) === 0x7c00);
    if (bad >= 0) {
      this.freeMatrix({ ...common, bytes, region, byteOffset: base, scalesRegion: region, scalesOffset, owned: true, arena } as CpuQuantizedMatrix);
      throw new BlossomError("checkpoint", `${view.file}: tensor "${view.name}" holds NaN or infinite values (row ${Math.floor(bad / groups)}); int8 quantization needs finite weights`);
    }
    return { ...common, bytes, region, byteOffset: base, scalesRegion: region, scalesOffset, owned: true, arena };
  }

  private arena: Arena | undefined;

  private arenaAllocate(bytes: number): { arena: Arena; offset: number } {
    let arena = this.arena;
    const offset = arena ? Math.ceil(arena.used / 64) * 64 : 0;
    if (!arena || offset + bytes > arena.size) {
      const size = Math.max(arenaBytes, Math.ceil(bytes / 2 ** 21) * 2 ** 21);
      arena = this.arena = { region: allocateRegion(size, " for int8 weights"), size, used: 0, live: 0 };
      return this.arenaAllocate(bytes);
    }
    arena.used = offset + bytes;
    arena.live++;
    return { arena, offset };
  }

  /** Byte ranges of mapped regions that matrices use in place, since the last settleMappedWeights(). */
  private inPlace = new Map<NativeRegion, [number, number][]>();

  private usedInPlace(region: NativeRegion, byteOffset: number, byteLength: number): void {
    if (byteLength === 0) return;
    const list = this.inPlace.get(region);
    if (list) list.push([byteOffset, byteLength]);
    else this.inPlace.set(region, [[byteOffset, byteLength]]);
  }

  /**
   * Decoding streams every weight once per token. A checkpoint's pages that the page cache holds in
   * pieces smaller than 2 MiB (a file just written or copied is held so) take 512 page-table entries
   * per 2 MiB; read again through the mapping they come back as 2 MiB folios with one entry each
   * (native/src/memory.cc, settle_file_pages). Measured on the development machine, bloom-560m bf16,
   * the same checkpoint in both states, decode steps alternated in one process: 2.0-2.5 % faster per
   * step from 2 MiB folios, in both bandwidth states. Costs one read from disk of the pieces read again, once.
   */
  settleMappedWeights(): MappedWeightsReport {
    const report: MappedWeightsReport = { bytes: 0, eligibleBytes: 0, hugeBytesBefore: 0, hugeBytesAfter: 0, filesReread: 0 };
    // Weights that cannot all stay resident (a sharded checkpoint larger than the memory available,
    // each shard of which would fit) are left to be paged in on use: touching them all would only
    // evict the first ones. (The native side checks each file the same way.)
    let total = 0;
    for (const list of this.inPlace.values()) for (const [, length] of list) total += length;
    if (total > availableMemory()) {
      report.bytes = total;
      this.inPlace.clear();
      return report;
    }
    for (const [region, list] of this.inPlace) {
      // Adjacent tensors merged, so a 2 MiB piece spanning two of them counts.
      list.sort((a, b) => a[0] - b[0]);
      const merged: number[] = [];
      for (const [offset, length] of list) {
        report.bytes += length;
        const n = merged.length;
        if (n > 0 && offset <= merged[n - 2]! + merged[n - 1]!) merged[n - 1] = Math.max(merged[n - 1]!, offset + length - merged[n - 2]!);
        else merged.push(offset, length);
      }
      const r = native().settleFilePages(region, Float64Array.from(merged));
      report.eligibleBytes += r.eligibleBytes;
      report.hugeBytesBefore += r.beforeBytes;
      report.hugeBytesAfter += r.afterBytes;
      if (r.reread) report.filesReread++;
    }
    this.inPlace.clear();
    return report;
  }

  releaseSource(view: TensorView): void {
    if (view.byteLength > 0) native().advise(view.region, view.byteOffset, view.byteLength, "dontneed");
  }

  vector(view: TensorView): DeviceBuffer {
    const n = view.shape.reduce((a, b) => a * b, 1);
    const out = new Float32Array(n);
    if (n === 0) return out;
    const dst = native().allocate(n * 4);
    try {
      native().convert(dst, 0, DTypeCode.f32, view.region, view.byteOffset, DTypeCode[view.dtype], n);
      out.set(new Float32Array(native().view(dst, 0, n * 4)));
    } finally {
      native().release(dst);
    }
    return out;
  }

  freeMatrix(matrix: DeviceMatrix): void {
    const arena = (matrix as CpuQuantizedMatrix).arena;
    if (arena) {
      // An arena goes with its last matrix (the next allocation starts a new one).
      if (--arena.live === 0) {
        native().release(arena.region);
        if (arena === this.arena) this.arena = undefined;
      }
      return;
    }
    const m = matrix as CpuMatrix;
    if (m.owned) native().release(m.region);
  }

  embedding(out: DeviceBuffer, ids: Int32Array, table: DeviceMatrix, firstId?: number): void {
    if (table.dtype === "int8") {
      const q = table as CpuQuantizedMatrix;
      if (firstId === undefined) {
        native().embeddingInt8(f32(out), ids, q.region, q.byteOffset, q.scalesRegion, q.scalesOffset, q.outFeatures, q.inFeatures, q.groupSize);
        return;
      }
      // A vocabulary shard: look up the ids it holds, zero the rows of the others.
      const local = Int32Array.from(ids, (id) => (id >= firstId && id < firstId + q.outFeatures ? id - firstId : 0));
      native().embeddingInt8(f32(out), local, q.region, q.byteOffset, q.scalesRegion, q.scalesOffset, q.outFeatures, q.inFeatures, q.groupSize);
      ids.forEach((id, i) => {
        if (id < firstId || id >= firstId + q.outFeatures) f32(out).fill(0, i * q.inFeatures, (i + 1) * q.inFeatures);
      });
      return;
    }
    const t = table as CpuMatrix;
    if (firstId === undefined) native().embedding(f32(out), ids, t.region, t.byteOffset, DTypeCode[t.dtype], t.outFeatures, t.inFeatures);
    else native().embeddingShard(f32(out), ids, t.region, t.byteOffset, DTypeCode[t.dtype], t.outFeatures, t.inFeatures, firstId);
  }

  /** Chains of single-row ops (attention included) run as one thread-pool job (native run_chain: the threads stream one matrix after another without returning here). */
  chain(ops: readonly ChainOpSpec[]): OpChain | undefined {
    const descriptors: unknown[][] = [];
    for (const op of ops) {
      if (op.kind === "layerNorm") {
        descriptors.push([0, f32(op.y), f32(op.x), op.cols, f32(op.gamma), f32(op.beta), op.eps]);
        continue;
      }
      if (op.kind === "attention") {
        const { cache, shape } = op;
        descriptors.push([2, f32(op.y), f32(op.x), cache.k, cache.v, DTypeCode[kvStorage[cache.dtype]], shape.numHeads, shape.headDim, shape.blockSize, f32(op.slopes)]);
        continue;
      }
      if (op.weight.dtype === "int8") {
        const q = op.weight as CpuQuantizedMatrix;
        descriptors.push([3, f32(op.y), f32(op.x), q.region, q.byteOffset, q.scalesRegion, q.scalesOffset, q.outFeatures, q.inFeatures, q.groupSize,
          ActivationMode[q.activationMode], q.threshold, op.bias ? f32(op.bias) : null, op.gelu ? Epilogue.gelu : Epilogue.none, op.residual ? f32(op.residual) : null]);
        continue;
      }
      const w = op.weight as CpuMatrix;
      if (w.streamChunkBytes !== undefined) return undefined;
      descriptors.push([1, f32(op.y), f32(op.x), w.region, w.byteOffset, DTypeCode[w.dtype], w.outFeatures, w.inFeatures, w.panelK ?? 0,
        op.bias ? f32(op.bias) : null, op.gelu ? Epilogue.gelu : Epilogue.none, op.residual ? f32(op.residual) : null]);
    }
    return native().createChain(descriptors) as unknown as OpChain;
  }

  runChain(chain: OpChain, batch?: AttentionBatch): boolean {
    return native().runChain(chain as unknown as NativeChain, batch?.seqs, batch?.blockTable);
  }

  layerNorm(out: DeviceBuffer, x: DeviceBuffer, rows: number, cols: number, gamma: DeviceBuffer, beta: DeviceBuffer, eps: number): void {
    native().layerNorm(f32(out), f32(x), rows, cols, f32(gamma), f32(beta), eps);
  }

  linear(out: DeviceBuffer, x: DeviceBuffer, rows: number, weight: DeviceMatrix, bias: DeviceBuffer | null, options: LinearOptions = {}): void {
    if (weight.dtype === "int8") {
      const q = weight as CpuQuantizedMatrix;
      native().linearInt8(
        f32(out),
        f32(x),
        rows,
        q.region,
        q.byteOffset,
        q.scalesRegion,
        q.scalesOffset,
        q.outFeatures,
        q.inFeatures,
        q.groupSize,
        bias ? f32(bias) : null,
        options.gelu ? Epilogue.gelu : Epilogue.none,
        options.residual ? f32(options.residual) : null,
        ActivationMode[q.activationMode],
        q.threshold,
      );
      return;
    }
    const w = weight as CpuMatrix;
    if (w.streamChunkBytes !== undefined && !bias && !options.gelu && !options.residual) return this.streamedLinear(f32(out), f32(x), rows, w);
    native().linear(
      f32(out),
      f32(x),
      rows,
      w.region,
      w.byteOffset,
      DTypeCode[w.dtype],
      w.outFeatures,
      w.inFeatures,
      bias ? f32(bias) : null,
      options.gelu ? Epilogue.gelu : Epilogue.none,
      options.residual ? f32(options.residual) : null,
      w.panelK ?? 0,
    );
  }

  /** out (rows, out) = x @ W^T over row chunks of a memory-mapped W, each read ahead and dropped after. */
  private streamedLinear(out: Float32Array, x: Float32Array, rows: number, w: CpuMatrix): void {
    const rowBytes = w.inFeatures * bytesPerElement[w.dtype];
    const chunkRows = Math.max(1, Math.floor(w.streamChunkBytes! / rowBytes));
    const n = native();
    const range = (start: number) => [w.byteOffset + start * rowBytes, Math.min(chunkRows, w.outFeatures - start) * rowBytes] as const;
    const part = rows > 1 ? new Float32Array(rows * chunkRows) : undefined;
    n.advise(w.region, ...range(0), "willneed");
    for (let start = 0; start < w.outFeatures; start += chunkRows) {
      const count = Math.min(chunkRows, w.outFeatures - start);
      if (start + chunkRows < w.outFeatures) n.advise(w.region, ...range(start + chunkRows), "willneed");
      const [offset] = range(start);
      if (rows === 1) {
        n.linear(out.subarray(start, start + count), x, 1, w.region, offset, DTypeCode[w.dtype], count, w.inFeatures, null, Epilogue.none, null);
      } else {
        n.linear(part!, x, rows, w.region, offset, DTypeCode[w.dtype], count, w.inFeatures, null, Epilogue.none, null);
        for (let r = 0; r < rows; r++) out.set(part!.subarray(r * count, (r + 1) * count), r * w.outFeatures + start);
      }
      n.advise(w.region, ...range(start), "dontneed");
    }
  }

  attention(out: DeviceBuffer, qkv: DeviceBuffer, numTokens: number, cache: KVLayer, batch: AttentionBatch, slopes: DeviceBuffer, shape: AttentionShape): void {
    native().attention(
      f32(out),
      f32(qkv),
      numTokens,
      shape.numHeads,
      shape.headDim,
      cache.k as Float32Array | Uint16Array,
      cache.v as Float32Array | Uint16Array,
      shape.blockSize,
      batch.seqs,
      batch.blockTable,
      f32(slopes),
      DTypeCode[kvStorage[cache.dtype]],
    );
  }

  gatherRows(out: DeviceBuffer, x: DeviceBuffer, rows: Int32Array, cols: number): void {
    const src = f32(x);
    const dst = f32(out);
    for (let i = 0; i < rows.length; i++) {
      const r = rows[i]!;
      dst.set(src.subarray(r * cols, (r + 1) * cols), i * cols);
    }
  }

  /** Cores split evenly among the devices (device k takes a contiguous share; more devices than cores share). */
  createDevices(count: number): void {
    const cores = native().cpuInfo().logicalCores;
    const sets = Array.from({ length: count }, (_, k) => {
      const from = Math.floor((k * cores) / count), to = Math.max(from + 1, Math.floor(((k + 1) * cores) / count));
      return Array.from({ length: to - from }, (_, i) => (from + i) % cores);
    });
    native().createDevices(sets);
  }

  useDevice(device: number | undefined): void {
    native().useDevice(device ?? -1);
  }

  dispose(): void {
    // Matrices (and with the last of each, its arena) are freed by their owner, the weight store.
  }
}
