/**
 * The pipeline weight store: layers placed on compute devices or "cpu" stay resident; layers
 * placed on "disk" are not kept: each is read into one of two staging buffers while the layer
 * before it computes (double buffering on a background I/O thread) and its buffer is reused
 * after. An offloaded embedding/head (too big to stage) is used from its memory mapping and
 * dropped from memory after each step.
 *
 * Offloaded weights are read from the checkpoint itself when they are used as stored; when the
 * in-memory dtype differs they are converted once, at load, into --offload-folder (as Accelerate
 * writes its offload folder).
 */
import { createFolder } from "../folders.js";
import { closeSync, openSync, realpathSync, renameSync, rmSync, statSync, writeSync } from "node:fs";
import { createHash } from "node:crypto";
import { dirname, join, resolve } from "node:path";
import type { Backend, DeviceMatrix } from "../backend/backend.js";
import { bytesPerElement, type CpuMatrix, type CpuQuantizedMatrix } from "../backend/cpu.js";
import { native, type NativeRegion, type StorageDType } from "../backend/native.js";
import type { TensorView } from "../checkpoint/safetensors.js";
import { BlossomError } from "../errors.js";
import type { BloomTensors } from "../models/bloom-weights.js";
import type { BloomLayerWeights, DeviceLinear, DeviceNorm, WeightBuilder, WeightStore } from "../engine/weights.js";
import type { Plan } from "./planner.js";

export interface OffloadOptions {
  /** Where converted offloaded weights are written (needed when the in-memory dtype differs from the stored one). */
  offloadFolder?: string;
  /** Read each offloaded layer ahead, while the previous one computes (default true; false is for measuring). */
  prefetch?: boolean;
  /** Drop offloaded pages from the page cache after each read, so every pass reads the disk (a model larger than RAM). */
  evictPageCache?: boolean;
}

export interface OffloadStats {
  diskLayers: number;
  bytesRead: number;
  reads: number;
  /** Seconds the background reads took. */
  readSeconds: number;
  /** Seconds the forward pass waited for a read: the I/O prefetch did not hide. */
  waitSeconds: number;
  stagingBytes: number;
}

/** An offloaded matrix: the file ranges to read (int8 values and their scales, or one dense range), and how to use them once staged. */
interface MatrixSource {
  parts: { path: string; offset: number; bytes: number }[];
  /** The matrix over the staged parts (at `offsets` in `region`). */
  place(region: NativeRegion, offsets: number[]): DeviceMatrix;
}

function denseSource(path: string, offset: number, bytes: number, dtype: StorageDType, outFeatures: number, inFeatures: number): MatrixSource {
  return {
    parts: [{ path, offset, bytes }],
    place: (region, [byteOffset]) => ({ dtype, outFeatures, inFeatures, bytes, region, byteOffset: byteOffset!, owned: false }) satisfies CpuMatrix,
  };
}

const linearNames = ["queryKeyValue", "dense", "denseHTo4h", "dense4hToH"] as const;
type LinearName = (typeof linearNames)[number];

interface DiskLayer {
  index: number;
  norms: { inputLayernorm: DeviceNorm; postAttentionLayernorm: DeviceNorm };
  biases: Record<LinearName, DeviceLinear["bias"]>;
  sources: Record<LinearName, MatrixSource>;
  bytes: number;
}

const align = (n: number) => Math.ceil(n / 64) * 64;

export class PipelineWeightStore implements WeightStore {
  readonly wordEmbeddings: DeviceMatrix;
  readonly wordEmbeddingsLayernorm: DeviceNorm;
  readonly lnF: DeviceNorm;
  readonly lmHead: DeviceMatrix;
  readonly numLayers: number;
  readonly plan: Plan;
  private readonly resident = new Map<number, BloomLayerWeights>();
  private readonly disk = new Map<number, DiskLayer>();
  /** Disk layers in execution order. */
  private readonly diskOrder: number[];
  private readonly slots: NativeRegion[] = [];
  private readonly slotBytes: number;
  /** Disk layer -> [slot, tickets] of its pending or finished reads. */
  private readonly inFlight = new Map<number, [number, number[]]>();
  private readonly headOnDisk: boolean;
  private readonly headRange: { region: NativeRegion; byteOffset: number; byteLength: number } | undefined;
  private readonly ownedMapping: NativeRegion | undefined;
  private readonly prefetch: boolean;
  private readonly evict: boolean;
  private readonly stats: OffloadStats;
  /** Compute device of each module (numbered devices); cpu and disk modules compute on the first one. */
  private readonly computeDevice: (module: string) => number | undefined;

  constructor(
    tensors: BloomTensors,
    private readonly builder: WeightBuilder,
    private readonly backend: Backend,
    plan: Plan,
    dtypeOf: (view: TensorView) => StorageDType,
    options: OffloadOptions = {},
    /** The scales of a pre-quantized int8 matrix (blossom quantize's "<name>_scale" tensors). */
    scalesOf: (view: TensorView) => TensorView | undefined = () => undefined,
  ) {
    this.plan = plan;
    this.prefetch = options.prefetch ?? true;
    this.evict = options.evictPageCache ?? false;
    this.numLayers = tensors.layers.length;
    const device = (name: string) => plan.placement.get(name);
    const numbered = [...new Set(plan.placement.values())].filter((d): d is number => typeof d === "number").sort((a, b) => a - b);
    // Devices are numbered 0, 1, ... in the budgets; the backend creates one compute device per budget.
    const numberedBudgets = [...plan.budgets.keys()].filter((d): d is number => typeof d === "number").sort((a, b) => a - b);
    if (numberedBudgets.length > 0 && backend.createDevices) backend.createDevices(numberedBudgets.length);
    const main = numbered[0] ?? numberedBudgets[0];
    this.computeDevice = (module) => {
      if (!backend.createDevices || numberedBudgets.length === 0) return undefined;
      const d = device(module);
      return numberedBudgets.indexOf(typeof d === "number" ? d : main!);
    };

    // Embeddings and head: resident, or used from a mapping (the checkpoint's, or a converted copy in the
    // offload folder) whose pages are dropped after each step.
    this.headOnDisk = device("word_embeddings") === "disk";
    const emb = tensors.wordEmbeddings;
    if (this.headOnDisk && emb.dtype === "i8") {
      // A pre-quantized head is used from its mapping (half the bytes of bf16); its pages are dropped after each step.
      this.headRange = { region: emb.region, byteOffset: emb.byteOffset, byteLength: emb.byteLength };
      this.wordEmbeddings = builder.describe(emb, "embedding");
    } else if (this.headOnDisk) {
      const dtype = dtypeOf(emb);
      let region = emb.region, byteOffset = emb.byteOffset, bytes = emb.byteLength;
      if (dtype !== emb.dtype) {
        const folder = requireFolder(options, `offloading word_embeddings as ${dtype} (stored as ${emb.dtype})`, emb.file);
        const src = writeConverted(backend, emb, dtype, join(folder, "word_embeddings")).parts[0]!;
        this.ownedMapping = region = native().mapFile(src.path);
        byteOffset = 0;
        bytes = src.bytes;
      }
      this.headRange = { region, byteOffset, byteLength: bytes };
      const [outFeatures, inFeatures] = emb.shape as [number, number];
      // Streamed through the LM head in 32 MiB chunks: never all of it resident at once.
      const m: CpuMatrix = { dtype, outFeatures, inFeatures, bytes, region, byteOffset, owned: false, streamChunkBytes: 32 * 2 ** 20 };
      this.wordEmbeddings = m;
    } else {
      this.wordEmbeddings = builder.matrix(emb, "embedding");
    }
    this.wordEmbeddingsLayernorm = builder.norm(tensors.wordEmbeddingsLayernorm);
    this.lnF = builder.norm(tensors.lnF);
    this.lmHead = tensors.lmHeadTied ? this.wordEmbeddings : builder.matrix(tensors.lmHead, "lm_head");

    this.diskOrder = [];
    tensors.layers.forEach((layer, i) => {
      if (device(`h.${i}`) !== "disk") {
        this.resident.set(i, builder.layer(layer));
        return;
      }
      const sources = {} as Record<LinearName, MatrixSource>;
      const biases = {} as DiskLayer["biases"];
      let bytes = 0;
      for (const name of linearNames) {
        const t = layer[name];
        biases[name] = builder.vector(t.bias);
        const dtype = dtypeOf(t.weight);
        const [outFeatures, inFeatures] = t.weight.shape as [number, number];
        const scales = t.weight.dtype === "i8" ? scalesOf(t.weight) : undefined;
        if (scales) {
          // Pre-quantized: the matrix as the int8 store describes it, its values and scales staged.
          const proto = builder.describe(t.weight, "linear") as CpuQuantizedMatrix;
          sources[name] = {
            parts: [
              { path: t.weight.file, offset: t.weight.byteOffset, bytes: t.weight.byteLength },
              { path: scales.file, offset: scales.byteOffset, bytes: scales.byteLength },
            ],
            place: (region, [values, scaleOffset]) => ({ ...proto, region, byteOffset: values!, scalesRegion: region, scalesOffset: scaleOffset!, owned: false }),
          };
        } else if (dtype === t.weight.dtype) {
          sources[name] = denseSource(t.weight.file, t.weight.byteOffset, t.weight.byteLength, dtype, outFeatures, inFeatures);
        } else {
          const folder = requireFolder(options, `offloading h.${i} as ${dtype} (stored as ${t.weight.dtype})`, t.weight.file);
          sources[name] = writeConverted(backend, t.weight, dtype, join(folder, `h.${i}.${name}`));
        }
        for (const part of sources[name].parts) bytes += align(part.bytes);
      }
      this.disk.set(i, {
        index: i,
        norms: { inputLayernorm: builder.norm(layer.inputLayernorm), postAttentionLayernorm: builder.norm(layer.postAttentionLayernorm) },
        biases,
        sources,
        bytes,
      });
      this.diskOrder.push(i);
    });
    this.slotBytes = Math.max(0, ...[...this.disk.values()].map((d) => d.bytes));
    const slotCount = this.diskOrder.length === 0 ? 0 : this.diskOrder.length === 1 ? 1 : 2;
    for (let s = 0; s < slotCount; s++) this.slots.push(native().allocate(this.slotBytes));
    this.stats = { diskLayers: this.diskOrder.length, bytesRead: 0, reads: 0, readSeconds: 0, waitSeconds: 0, stagingBytes: slotCount * this.slotBytes };
    if (this.prefetch) for (let k = 0; k < slotCount; k++) this.queueRead(this.diskOrder[k]!, k);
  }

  get weightBytes(): number {
    return this.builder.bytes + this.stats.stagingBytes;
  }

  offloadStats(): OffloadStats {
    return { ...this.stats };
  }

  private slotOf(layer: number): number {
    return this.diskOrder.indexOf(layer) % Math.max(1, this.slots.length);
  }

  private queueRead(layer: number, slot: number): void {
    const d = this.disk.get(layer)!;
    let offset = 0;
    const tickets: number[] = [];
    for (const name of linearNames) {
      for (const part of d.sources[name].parts) {
        tickets.push(native().readFile(part.path, part.offset, part.bytes, this.slots[slot]!, offset, this.evict));
        offset += align(part.bytes);
      }
    }
    this.inFlight.set(layer, [slot, tickets]);
    this.stats.bytesRead += d.bytes;
    this.stats.reads++;
  }

  beginStep(): void {
    this.backend.useDevice?.(this.computeDevice("word_embeddings"));
  }

  beginHead(): void {
    this.backend.useDevice?.(this.computeDevice("ln_f"));
  }

  layer(i: number): BloomLayerWeights {
    this.backend.useDevice?.(this.computeDevice(`h.${i}`));
    const resident = this.resident.get(i);
    if (resident) return resident;
    const d = this.disk.get(i);
    if (!d) throw new BlossomError("internal", `layer ${i} is neither resident nor offloaded`);
    if (!this.inFlight.has(i)) this.queueRead(i, this.slotOf(i));
    const [slot, tickets] = this.inFlight.get(i)!;
    for (const ticket of tickets) {
      const [waited, read] = native().waitRead(ticket);
      this.stats.waitSeconds += waited;
      this.stats.readSeconds += read;
    }
    const region = this.slots[slot]!;
    let offset = 0;
    const matrix = (name: LinearName): DeviceMatrix => {
      const s = d.sources[name];
      const offsets = s.parts.map((part) => {
        const at = offset;
        offset += align(part.bytes);
        return at;
      });
      return s.place(region, offsets);
    };
    const linear = (name: LinearName): DeviceLinear => ({ weight: matrix(name), bias: d.biases[name] });
    return {
      inputLayernorm: d.norms.inputLayernorm,
      queryKeyValue: linear("queryKeyValue"),
      dense: linear("dense"),
      postAttentionLayernorm: d.norms.postAttentionLayernorm,
      denseHTo4h: linear("denseHTo4h"),
      dense4hToH: linear("dense4hToH"),
    };
  }

  releaseLayer(i: number): void {
    if (!this.disk.has(i)) return;
    const slot = this.inFlight.get(i)![0];
    this.inFlight.delete(i);
    if (!this.prefetch) return;
    // The slot is free: start reading the disk layer that will use it next (wrapping to the next step).
    const k = this.diskOrder.indexOf(i);
    const next = this.diskOrder[(k + this.slots.length) % this.diskOrder.length]!;
    if (!this.inFlight.has(next)) this.queueRead(next, slot);
  }

  endStep(): void {
    this.backend.useDevice?.(undefined);
    if (!this.headRange) return;
    // Drop the embedding/head pages this step touched: they are read again, from the page cache or the disk.
    const r = this.headRange;
    native().advise(r.region, r.byteOffset, r.byteLength, "dontneed");
  }

  dispose(): void {
    for (const [, [, tickets]] of this.inFlight) {
      for (const ticket of tickets) {
        try {
          native().waitRead(ticket);
        } catch {
          // The read failed; nothing to wait for.
        }
      }
    }
    this.inFlight.clear();
    for (const s of this.slots) native().release(s);
    this.slots.length = 0;
    this.backend.useDevice?.(undefined);
    this.backend.createDevices?.(0);
    if (this.ownedMapping) native().release(this.ownedMapping);
    this.builder.freeAll();
  }
}

/** The offload folder, created if needed; never the checkpoint's own folder (`source`: a file of it). */
function requireFolder(options: OffloadOptions, what: string, source: string): string {
  if (!options.offloadFolder) throw new BlossomError("parameter", `${what} needs --offload-folder, where the converted weights are written`);
  if (resolve(options.offloadFolder) === resolve(dirname(source))) {
    throw new BlossomError("parameter", `offloadFolder: ${options.offloadFolder} is the checkpoint's own folder; the converted weights need a folder of their own`);
  }
  try {
    createFolder(options.offloadFolder);
  } catch (err) {
    throw new BlossomError("parameter", `offloadFolder: cannot use ${options.offloadFolder} as a folder (${(err as NodeJS.ErrnoException).code ?? String(err)})`);
  }
  return options.offloadFolder;
}

/**
 * Converts a matrix to `dtype` and writes it beside `base` (in the offload folder), named by the
 * dtype and the source tensor (its file, that file's modification time, its place in it): processes
 * sharing a folder with other models or dtypes never read each other's conversions (a reader opens
 * a layer's file by name when it first needs it).
 */
function writeConverted(backend: Backend, view: TensorView, dtype: StorageDType, base: string): MatrixSource {
  const source = realpathSync(view.file);
  const key = createHash("sha256").update(`${source}\n${statSync(source).mtimeMs}\n${view.byteOffset}\n${view.byteLength}\n${dtype}`).digest("hex").slice(0, 12);
  const file = `${base}.${dtype}.${key}.bin`;
  const [outFeatures, inFeatures] = view.shape as [number, number];
  const bytes = outFeatures * inFeatures * bytesPerElement[dtype];
  // Converted before from this very source (its name says so): reused, so the folder holds one set
  // per source and dtype instead of growing with every load.
  if (statSync(file, { throwIfNoEntry: false })?.size === bytes) return denseSource(file, 0, bytes, dtype, outFeatures, inFeatures);
  const m = backend.matrix(view, dtype) as CpuMatrix;
  // Written aside and renamed into place: another process using the same folder keeps the file it
  // mapped (truncating that file under its mapping would kill it with SIGBUS).
  const partial = `${file}.${process.pid}.partial`;
  const fd = openSync(partial, "w");
  let written = false;
  try {
    const chunk = 1 << 30;
    for (let off = 0; off < m.bytes; off += chunk) {
      const n = Math.min(chunk, m.bytes - off);
      writeSync(fd, new Uint8Array(native().view(m.region, m.byteOffset + off, n)));
    }
    written = true;
  } finally {
    closeSync(fd);
    backend.freeMatrix(m);
    if (!written) rmSync(partial, { force: true });
  }
  renameSync(partial, file);
  return denseSource(file, 0, m.bytes, dtype, m.outFeatures, m.inFeatures);
}
