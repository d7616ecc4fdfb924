/**
 * The int8 schemes in plain TypeScript: weight quantization (bit-exact with the native quantizer),
 * activation quantization (bit-exact: the same fp32 division, round-half-even and clamp) and the
 * linear layer with fp64 accumulation. Slow; kernel tests compare the native variants against it.
 */
import { f16ToF32 } from "../backend/reference.js";
import { float32ToFloat16 } from "../checkpoint/half-float.js";
import type { ActivationModeName } from "./scheme.js";

const f32 = Math.fround;

/** Round half to even, as C's nearbyint in the default rounding mode. */
export function roundHalfEven(x: number): number {
  const r = Math.round(x);
  return r - x === 0.5 && r % 2 !== 0 ? r - 1 : r;
}

/** fp32 value -> fp16 bits, rounded up in magnitude for positive values (the native f32_to_f16_up). */
export function f32ToF16BitsUp(value: number): number {
  let h = float32ToFloat16(value);
  if (value > 0 && f16ToF32(h) < value && (h & 0x7c00) !== 0x7c00) h++;
  return h;
}

function quantizeValue(v: number, scale: number, levels = 127): number {
  const r = roundHalfEven(f32(v / scale));
  return Math.max(-levels, Math.min(levels, r));
}

/** Grouped activations are 16-bit: round(x / (absmax / 32767)). */
export const groupedLevels = 32767;

/** W (out, in) fp32 values -> int8 q and fp16 scale bits (out, ceil(in / groupSize)). */
export function quantizeWeightsReference(w: Float32Array, out: number, inFeatures: number, groupSize: number): { q: Int8Array; scales: Uint16Array } {
  const groups = Math.ceil(inFeatures / groupSize);
  const q = new Int8Array(out * inFeatures);
  const scales = new Uint16Array(out * groups);
  for (let o = 0; o < out; o++) {
    for (let g = 0; g < groups; g++) {
      const k0 = g * groupSize, k1 = Math.min(inFeatures, k0 + groupSize);
      let absmax = 0;
      for (let k = k0; k < k1; k++) absmax = Math.max(absmax, Math.abs(w[o * inFeatures + k]!));
      const h = f32ToF16BitsUp(f32(absmax / 127));
      scales[o * groups + g] = h;
      const s = f16ToF32(h);
      for (let k = k0; k < k1; k++) q[o * inFeatures + k] = s > 0 && Number.isFinite(s) ? quantizeValue(w[o * inFeatures + k]!, s) : 0;
    }
  }
  return { q, scales };
}

/** x' as the kernels see it, and the outlier features (mixed mode). */
export function prepareActivationsReference(
  x: Float32Array,
  rows: number,
  inFeatures: number,
  groupSize: number,
  mode: ActivationModeName,
  threshold: number,
): { xPrime: Float32Array; outliers: number[] } {
  if (mode === "exact") return { xPrime: x.slice(0, rows * inFeatures), outliers: [] };
  const xPrime = new Float32Array(rows * inFeatures);
  const outliers: number[] = [];
  const isOutlier = new Uint8Array(inFeatures);
  if (mode === "mixed" && threshold > 0 && Number.isFinite(threshold)) {
    for (let r = 0; r < rows; r++) for (let k = 0; k < inFeatures; k++) if (Math.abs(x[r * inFeatures + k]!) >= f32(threshold)) isOutlier[k] = 1;
    for (let k = 0; k < inFeatures; k++) if (isOutlier[k]) outliers.push(k);
  }
  const span = groupSize >= inFeatures || mode === "mixed" ? inFeatures : groupSize;
  const levels = mode === "grouped" ? groupedLevels : 127;
  for (let r = 0; r < rows; r++) {
    for (let k0 = 0; k0 < inFeatures; k0 += span) {
      const k1 = Math.min(inFeatures, k0 + span);
      let absmax = 0;
      for (let k = k0; k < k1; k++) if (!isOutlier[k]) absmax = Math.max(absmax, Math.abs(x[r * inFeatures + k]!));
      const s = f32(absmax / levels);
      for (let k = k0; k < k1; k++) {
        const v = x[r * inFeatures + k]!;
        xPrime[r * inFeatures + k] = isOutlier[k] ? v : s > 0 ? f32(quantizeValue(v, s, levels) * s) : 0;
      }
    }
  }
  return { xPrime, outliers };
}

function geluTanh(x: number): number {
  return x * 0.5 * (1 + Math.tanh(0.79788456 * x * (1 + 0.044715 * x * x)));
}

/** y (rows, out) = act(x' @ dequant(W)^T + bias) + residual, fp64 accumulation. */
export function linearInt8Reference(args: {
  x: Float32Array;
  rows: number;
  q: Int8Array;
  scales: Uint16Array;
  outFeatures: number;
  inFeatures: number;
  groupSize: number;
  bias?: Float32Array | null;
  gelu?: boolean;
  residual?: Float32Array | null;
  mode: ActivationModeName;
  threshold?: number;
}): { y: Float32Array; outliers: number[] } {
  const { rows, q, scales, outFeatures: out, inFeatures: n, groupSize } = args;
  const G = Math.min(groupSize, n);
  const groups = Math.ceil(n / G);
  const { xPrime, outliers } = prepareActivationsReference(args.x, rows, n, G, args.mode, args.threshold ?? 0);
  const y = new Float32Array(rows * out);
  for (let r = 0; r < rows; r++) {
    for (let o = 0; o < out; o++) {
      let acc = 0;
      for (let k = 0; k < n; k++) acc += xPrime[r * n + k]! * q[o * n + k]! * f16ToF32(scales[o * groups + Math.floor(k / G)]!);
      let v = acc + (args.bias ? args.bias[o]! : 0);
      if (args.gelu) v = geluTanh(v);
      if (args.residual) v += args.residual[r * out + o]!;
      y[r * out + o] = v;
    }
  }
  return { y, outliers };
}
