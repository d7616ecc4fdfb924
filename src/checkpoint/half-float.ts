/**
 * Exact float32 ↔ float16 / bfloat16 conversions, round-to-nearest-even like PyTorch's `.to()`.
 * Node 20 has no Float16Array, so these work on raw bit patterns (numbers holding 16-bit values).
 */

const f32 = new Float32Array(1);
const u32 = new Uint32Array(f32.buffer);

/** Bits of the float32 nearest to `x` (the value a Float32Array would store). */
export function float32Bits(x: number): number {
  f32[0] = x;
  return u32[0];
}

/** bfloat16 bits of float32 bits `u`: round to nearest even; NaN stays NaN (quieted), sign kept. */
export function bfloat16FromFloat32Bits(u: number): number {
  if ((u & 0x7fffffff) > 0x7f800000) return ((u >>> 16) | 0x0040) & 0xffff;
  // Adding 0x7fff plus the lowest kept bit rounds ties to even; a carry into the exponent is the
  // correct result, including overflow to infinity.
  return ((u + 0x7fff + ((u >>> 16) & 1)) >>> 16) & 0xffff;
}

/** float16 bits of float32 bits `u`: round to nearest even, with subnormals, overflow to ±inf, NaN kept. */
export function float16FromFloat32Bits(u: number): number {
  const sign = (u >>> 16) & 0x8000;
  const magnitude = u & 0x7fffffff;
  if (magnitude >= 0x7f800000) return sign | (magnitude === 0x7f800000 ? 0x7c00 : 0x7e00 | ((magnitude >>> 13) & 0x3ff));
  // 65520 = 65504 + half an ulp: the tie rounds to even, which is infinity (65504's mantissa is odd).
  if (magnitude >= 0x477ff000) return sign | 0x7c00;
  if (magnitude >= 0x38800000) {
    // Normal result: rebias the exponent (127 → 15), keep 10 of 23 mantissa bits, round the other 13.
    let half = (magnitude >>> 13) - (112 << 10);
    const rest = magnitude & 0x1fff;
    if (rest > 0x1000 || (rest === 0x1000 && (half & 1) !== 0)) half++;
    return sign | half;
  }
  // Subnormal result k·2^-24. At or below 2^-25 (half the smallest subnormal) everything rounds to 0.
  if (magnitude <= 0x33000000) return sign;
  const exponent = magnitude >>> 23;
  const mantissa = (magnitude & 0x7fffff) | 0x800000;
  const shift = 126 - exponent; // 14..24
  let k = mantissa >>> shift;
  const rest = mantissa & ((1 << shift) - 1);
  const halfway = 1 << (shift - 1);
  if (rest > halfway || (rest === halfway && (k & 1) !== 0)) k++;
  return sign | k;
}

export function float32ToBfloat16(x: number): number {
  return bfloat16FromFloat32Bits(float32Bits(x));
}

export function float32ToFloat16(x: number): number {
  return float16FromFloat32Bits(float32Bits(x));
}

export function bfloat16ToFloat32(bits: number): number {
  u32[0] = (bits & 0xffff) << 16;
  return f32[0];
}

export function float16ToFloat32(bits: number): number {
  const sign = bits & 0x8000 ? -1 : 1;
  const exponent = (bits >>> 10) & 0x1f;
  const mantissa = bits & 0x3ff;
  if (exponent === 0) return sign * mantissa * 2 ** -24;
  if (exponent === 0x1f) return mantissa === 0 ? sign * Infinity : NaN;
  return sign * (1024 + mantissa) * 2 ** (exponent - 25);
}

/** Converts `source` into `target` (same length) as bfloat16 bits. */
export function convertToBfloat16(source: Float32Array, target: Uint16Array): void {
  const bits = new Uint32Array(source.buffer, source.byteOffset, source.length);
  for (let i = 0; i < bits.length; i++) {
    const u = bits[i];
    target[i] = (u & 0x7fffffff) > 0x7f800000 ? (u >>> 16) | 0x0040 : (u + 0x7fff + ((u >>> 16) & 1)) >>> 16;
  }
}

/** Converts `source` into `target` (same length) as float16 bits. */
export function convertToFloat16(source: Float32Array, target: Uint16Array): void {
  const bits = new Uint32Array(source.buffer, source.byteOffset, source.length);
  for (let i = 0; i < bits.length; i++) {
    const u = bits[i];
    const magnitude = u & 0x7fffffff;
    if (magnitude >= 0x38800000 && magnitude < 0x477ff000) {
      // The common case (a normal half), rounded like bfloat16 above: the carry is the rounding.
      target[i] = ((u >>> 16) & 0x8000) | (((magnitude + 0x0fff + ((magnitude >>> 13) & 1)) >>> 13) - (112 << 10));
    } else {
      target[i] = float16FromFloat32Bits(u);
    }
  }
}
