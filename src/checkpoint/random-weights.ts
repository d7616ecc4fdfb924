/**
 * Seeded random tensor contents for `create-random`, fast enough to write gigabytes in seconds.
 *
 * Every tensor is cut into fixed blocks of {@link RANDOM_BLOCK_ELEMENTS} values and every block has
 * its own generator state derived from (seed, tensor name, block index). The bytes therefore do not
 * depend on chunk sizes, shard layout, write order or how many worker threads share the work.
 */
import { convertToBfloat16, convertToFloat16 } from "./half-float.js";

export type RandomDType = "F32" | "F16" | "BF16";

/** How one tensor is initialised: `mean + std * z` with z ~ N(0, 1), truncated at about ±4.4σ. */
export interface RandomInit {
  mean: number;
  std: number;
}

export const RANDOM_BLOCK_ELEMENTS = 1 << 16;

/** A 32-bit avalanche mix (the "lowbias32" finalizer): every input bit affects every output bit. */
function mix32(x: number): number {
  x ^= x >>> 16;
  x = Math.imul(x, 0x21f0aaad);
  x ^= x >>> 15;
  x = Math.imul(x, 0x735a2d97);
  x ^= x >>> 15;
  return x >>> 0;
}

/** FNV-1a over the UTF-16 code units of a tensor name. */
export function nameHash(name: string): number {
  let h = 0x811c9dc5;
  for (let i = 0; i < name.length; i++) h = Math.imul(h ^ name.charCodeAt(i), 0x01000193);
  return h >>> 0;
}

/**
 * Inverse normal CDF at 2^16 + 1 evenly spaced probabilities; a 32-bit random number picks a cell
 * with its high 16 bits and interpolates linearly with the low 16. One table read per value is
 * several times faster than Box-Muller in JavaScript; the two end knots sit at p = 2^-18 and
 * 1 - 2^-18 so the tails stop near ±4.4σ, which weight init does not miss.
 */
const TABLE_CELLS = 1 << 16;
let normalTable: Float32Array | undefined;

function inverseNormalCdf(p: number): number {
  // Acklam's rational approximation (relative error < 1.2e-9), ample for a float32 table.
  const a = [-3.969683028665376e1, 2.209460984245205e2, -2.759285104469687e2, 1.38357751867269e2, -3.066479806614716e1, 2.506628277459239];
  const b = [-5.447609879822406e1, 1.615858368580409e2, -1.556989798598866e2, 6.680131188771972e1, -1.328068155288572e1];
  const c = [-7.784894002430293e-3, -3.223964580411365e-1, -2.400758277161838, -2.549732539343734, 4.374664141464968, 2.938163982698783];
  const d = [7.784695709041462e-3, 3.224671290700398e-1, 2.445134137142996, 3.754408661907416];
  const low = 0.02425;
  if (p < low) {
    const q = Math.sqrt(-2 * Math.log(p));
    return (((((c[0] * q + c[1]) * q + c[2]) * q + c[3]) * q + c[4]) * q + c[5]) / ((((d[0] * q + d[1]) * q + d[2]) * q + d[3]) * q + 1);
  }
  if (p > 1 - low) return -inverseNormalCdf(1 - p);
  const q = p - 0.5;
  const r = q * q;
  return ((((((a[0] * r + a[1]) * r + a[2]) * r + a[3]) * r + a[4]) * r + a[5]) * q) / (((((b[0] * r + b[1]) * r + b[2]) * r + b[3]) * r + b[4]) * r + 1);
}

function getNormalTable(): Float32Array {
  if (!normalTable) {
    normalTable = new Float32Array(TABLE_CELLS + 1);
    const edge = 2 ** -18;
    for (let i = 0; i <= TABLE_CELLS; i++) {
      const p = i === 0 ? edge : i === TABLE_CELLS ? 1 - edge : i / TABLE_CELLS;
      normalTable[i] = inverseNormalCdf(p);
    }
  }
  return normalTable;
}

/**
 * Fills `out` with `mean + std * z`, where `out[0]` is element `firstElement` of the tensor. The
 * values equal those a single pass over the whole tensor would give, whatever `firstElement` is.
 * The generator is xoshiro128** (Blackman & Vigna), seeded per block through {@link mix32}.
 */
export function fillRandomFloat32(out: Float32Array, seed: number, tensorName: string, firstElement: number, init: RandomInit): void {
  const table = getNormalTable();
  const streamKey = mix32(nameHash(tensorName) ^ mix32(seed >>> 0));
  const { mean, std } = init;
  let done = 0;
  while (done < out.length) {
    const element = firstElement + done;
    const block = Math.floor(element / RANDOM_BLOCK_ELEMENTS);
    const skip = element - block * RANDOM_BLOCK_ELEMENTS;
    const count = Math.min(out.length - done, RANDOM_BLOCK_ELEMENTS - skip);
    const base = mix32(streamKey ^ mix32(block ^ mix32(Math.floor(block / 2 ** 32))));
    let s0 = mix32(base + 0x9e3779b9);
    let s1 = mix32(base + 0x3c6ef372);
    let s2 = mix32(base + 0xdaa66d2b);
    let s3 = mix32(base + 0x78dde6e4);
    if ((s0 | s1 | s2 | s3) === 0) s0 = 1;
    for (let i = -skip; i < count; i++) {
      const result = Math.imul(rotl(Math.imul(s1, 5), 7), 9) >>> 0;
      const t = s1 << 9;
      s2 ^= s0;
      s3 ^= s1;
      s1 ^= s2;
      s0 ^= s3;
      s2 ^= t;
      s3 = rotl(s3, 11);
      if (i < 0) continue;
      const cell = result >>> 16;
      const fraction = (result & 0xffff) * (1 / 65536);
      const low = table[cell];
      out[done + i] = mean + std * (low + fraction * (table[cell + 1] - low));
    }
    done += count;
  }
}

function rotl(x: number, k: number): number {
  return (x << k) | (x >>> (32 - k));
}

/**
 * The bytes (little-endian) of elements [firstElement, firstElement + count) of a random tensor in
 * `dtype`. Half-precision values are the float32 values rounded to nearest even, so one seed gives
 * the same model in every dtype, up to rounding.
 */
export function randomTensorBytes(
  dtype: RandomDType,
  seed: number,
  tensorName: string,
  firstElement: number,
  count: number,
  init: RandomInit,
  scratch?: Float32Array,
): Uint8Array<ArrayBuffer> {
  if (dtype === "F32") {
    const values = new Float32Array(count);
    fillRandomFloat32(values, seed, tensorName, firstElement, init);
    return new Uint8Array(values.buffer);
  }
  const values = scratch && scratch.length >= count ? scratch.subarray(0, count) : new Float32Array(count);
  fillRandomFloat32(values, seed, tensorName, firstElement, init);
  const half = new Uint16Array(count);
  if (dtype === "BF16") convertToBfloat16(values, half);
  else convertToFloat16(values, half);
  return new Uint8Array(half.buffer);
}
