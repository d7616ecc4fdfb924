/**
 * The reference backend: every op in plain TypeScript, one obvious loop each, fp64 accumulation
 * where it costs nothing. Slow; it exists so kernel and model tests have something independent of
 * the native kernels to compare with. It still uses the addon to map files (weights are read
 * through views of the mappings).
 */
import { BlossomError } from "../errors.js";
import type { TensorView } from "../checkpoint/safetensors.js";
import type { AttentionBatch, AttentionShape, Backend, DeviceBuffer, DeviceMatrix, KVBuffer, KVDType, KVLayer, LinearOptions } from "./backend.js";
import { float32ToBfloat16, float32ToFloat16 } from "../checkpoint/half-float.js";
import { native, type StorageDType } from "./native.js";

interface RefMatrix extends DeviceMatrix {
  readonly data: Float32Array; // widened to fp32 (exact for f16/bf16)
}

/** Exact fp16 -> fp32. */
export function f16ToF32(h: number): number {
  const sign = h & 0x8000 ? -1 : 1;
  const exp = (h >> 10) & 0x1f;
  const mant = h & 0x3ff;
  if (exp === 0) return sign * mant * 2 ** -24;
  if (exp === 31) return mant ? NaN : sign * Infinity;
  return sign * (1 + mant / 1024) * 2 ** (exp - 15);
}

/** Exact bf16 -> fp32. */
export function bf16ToF32(h: number): number {
  const u = new Uint32Array([h << 16]);
  return new Float32Array(u.buffer)[0]!;
}

/** Reads a tensor's values as fp32 (exact widening). */
export function readTensorAsF32(view: TensorView): Float32Array {
  const n = view.shape.reduce((a, b) => a * b, 1);
  const bytes = new Uint8Array(native().view(view.region, view.byteOffset, view.byteLength)).slice();
  const dv = new DataView(bytes.buffer);
  const out = new Float32Array(n);
  for (let i = 0; i < n; i++) {
    switch (view.dtype) {
      case "f32": out[i] = dv.getFloat32(4 * i, true); break;
      case "f16": out[i] = f16ToF32(dv.getUint16(2 * i, true)); break;
      case "bf16": out[i] = bf16ToF32(dv.getUint16(2 * i, true)); break;
      case "i8": out[i] = dv.getInt8(i); break;
    }
  }
  return out;
}

function f32(b: DeviceBuffer): Float32Array {
  return b as Float32Array;
}

function geluTanh(x: number): number {
  return x * 0.5 * (1 + Math.tanh(0.79788456 * x * (1 + 0.044715 * x * x)));
}

export class ReferenceBackend implements Backend {
  readonly name = "reference";

  alloc(length: number): DeviceBuffer {
    return new Float32Array(length);
  }
  free(): void {}
  allocKV(length: number, dtype: KVDType): KVBuffer {
    return dtype === "fp32" ? new Float32Array(length) : new Uint16Array(length);
  }
  freeKV(): void {}
  upload(data: Float32Array): DeviceBuffer {
    return Float32Array.from(data);
  }
  download(buffer: DeviceBuffer, offset: number, length: number): Float32Array {
    // Host memory already: a view, valid until the buffer is next written.
    return f32(buffer).subarray(offset, offset + length);
  }

  matrix(view: TensorView, dtype: StorageDType): DeviceMatrix {
    if (view.shape.length !== 2) throw new BlossomError("checkpoint", `${view.file}: tensor "${view.name}" must be 2-D`);
    const data = readTensorAsF32(view);
    // Emulate the storage dtype's rounding so results match the native backend's conversions.
    if (dtype !== view.dtype && dtype !== "f32") {
      throw new BlossomError("internal", `the reference backend widens weights to fp32 only (asked for ${dtype})`);
    }
    const [outFeatures, inFeatures] = view.shape as [number, number];
    const m: RefMatrix = { dtype, outFeatures, inFeatures, bytes: data.byteLength, data };
    return m;
  }
  vector(view: TensorView): DeviceBuffer {
    return readTensorAsF32(view);
  }
  freeMatrix(): void {}

  embedding(out: DeviceBuffer, ids: Int32Array, table: DeviceMatrix, firstId?: number): void {
    const t = table as RefMatrix;
    const h = t.inFeatures;
    for (let i = 0; i < ids.length; i++) {
      const id = ids[i]! - (firstId ?? 0);
      if (id < 0 || id >= t.outFeatures) {
        if (firstId === undefined) throw new BlossomError("input", `token id ${ids[i]} is outside the vocabulary [0, ${t.outFeatures})`);
        f32(out).fill(0, i * h, (i + 1) * h);
        continue;
      }
      f32(out).set(t.data.subarray(id * h, (id + 1) * h), i * h);
    }
  }

  layerNorm(out: DeviceBuffer, x: DeviceBuffer, rows: number, cols: number, gamma: DeviceBuffer, beta: DeviceBuffer, eps: number): void {
    const X = f32(x), Y = f32(out), G = f32(gamma), B = f32(beta);
    for (let r = 0; r < rows; r++) {
      let sum = 0;
      for (let i = 0; i < cols; i++) sum += X[r * cols + i]!;
      const mean = sum / cols;
      let sq = 0;
      for (let i = 0; i < cols; i++) sq += (X[r * cols + i]! - mean) ** 2;
      const inv = 1 / Math.sqrt(sq / cols + eps);
      for (let i = 0; i < cols; i++) Y[r * cols + i] = (X[r * cols + i]! - mean) * inv * G[i]! + B[i]!;
    }
  }

  linear(out: DeviceBuffer, x: DeviceBuffer, rows: number, weight: DeviceMatrix, bias: DeviceBuffer | null, options: LinearOptions = {}): void {
    const W = (weight as RefMatrix).data, X = f32(x), Y = f32(out);
    const { outFeatures: n, inFeatures: k } = weight;
    const b = bias ? f32(bias) : null;
    const res = options.residual ? f32(options.residual) : null;
    for (let r = 0; r < rows; r++) {
      for (let o = 0; o < n; o++) {
        let acc = 0;
        for (let i = 0; i < k; i++) acc += X[r * k + i]! * W[o * k + i]!;
        let v = acc + (b ? b[o]! : 0);
        if (options.gelu) v = geluTanh(v);
        if (res) v += res[r * n + o]!;
        Y[r * n + o] = v;
      }
    }
  }

  attention(out: DeviceBuffer, qkv: DeviceBuffer, numTokens: number, cache: KVLayer, batch: AttentionBatch, slopes: DeviceBuffer, shape: AttentionShape): void {
    const { numHeads, headDim: d, blockSize } = shape;
    const Q = f32(qkv), O = f32(out), S = f32(slopes);
    // The cache's entries as fp32 (16-bit ones widened exactly) and how a new value is stored.
    const cacheOf = (b: KVBuffer) => {
      const raw = b as Float32Array | Uint16Array;
      if (cache.dtype === "fp32") return { get: (i: number) => raw[i]!, put: (i: number, x: number) => void (raw[i] = x) };
      const [widen, narrow] = cache.dtype === "fp16" ? [f16ToF32, float32ToFloat16] : [bf16ToF32, float32ToBfloat16];
      return { get: (i: number) => widen(raw[i]!), put: (i: number, x: number) => void (raw[i] = narrow(x)) };
    };
    const K = cacheOf(cache.k), V = cacheOf(cache.v);
    const stride = numHeads * 3 * d;
    const offset = (tableOffset: number, pos: number, h: number) => {
      const block = batch.blockTable[tableOffset + Math.floor(pos / blockSize)]!;
      return ((block * numHeads + h) * blockSize + (pos % blockSize)) * d;
    };
    const numSeqs = batch.seqs.length / 4;
    for (let s = 0; s < numSeqs; s++) {
      const [start, numNew, past, table] = [batch.seqs[4 * s]!, batch.seqs[4 * s + 1]!, batch.seqs[4 * s + 2]!, batch.seqs[4 * s + 3]!];
      if (start + numNew > numTokens) throw new BlossomError("internal", `attention: sequence ${s} runs past the batch`);
      for (let i = 0; i < numNew; i++) {
        for (let h = 0; h < numHeads; h++) {
          const o = offset(table, past + i, h);
          const row = (start + i) * stride + h * 3 * d;
          for (let e = 0; e < d; e++) {
            K.put(o + e, Q[row + d + e]!);
            V.put(o + e, Q[row + 2 * d + e]!);
          }
        }
      }
      const scale = 1 / Math.sqrt(d);
      for (let i = 0; i < numNew; i++) {
        const pos = past + i;
        for (let h = 0; h < numHeads; h++) {
          const q = (start + i) * stride + h * 3 * d;
          const scores = new Float64Array(pos + 1);
          let max = -Infinity;
          for (let j = 0; j <= pos; j++) {
            const k = offset(table, j, h);
            let dot = 0;
            for (let e = 0; e < d; e++) dot += Q[q + e]! * K.get(k + e);
            scores[j] = S[h]! * j + dot * scale;
            max = Math.max(max, scores[j]!);
          }
          let sum = 0;
          for (let j = 0; j <= pos; j++) sum += scores[j] = Math.exp(scores[j]! - max);
          const o = (start + i) * numHeads * d + h * d;
          for (let e = 0; e < d; e++) {
            let acc = 0;
            for (let j = 0; j <= pos; j++) acc += scores[j]! * V.get(offset(table, j, h) + e);
            O[o + e] = acc / sum;
          }
        }
      }
    }
  }

  gatherRows(out: DeviceBuffer, x: DeviceBuffer, rows: Int32Array, cols: number): void {
    for (let i = 0; i < rows.length; i++) f32(out).set(f32(x).subarray(rows[i]! * cols, (rows[i]! + 1) * cols), i * cols);
  }

  dispose(): void {}
}
