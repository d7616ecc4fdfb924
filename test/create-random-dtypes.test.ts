import { test } from "node:test";
import assert from "node:assert/strict";
import {
  bfloat16ToFloat32,
  convertToBfloat16,
  convertToFloat16,
  float16ToFloat32,
  float32ToBfloat16,
  float32ToFloat16,
} from "../src/checkpoint/half-float.js";
import { fillRandomFloat32, randomTensorBytes } from "../src/checkpoint/random-weights.js";

const hex = (n: number) => "0x" + n.toString(16).padStart(4, "0");
const f32 = (x: number) => Math.fround(x);

/** The float32 next to x, away from zero (step 1) or towards it (-1): bit patterns grow with magnitude. */
function nudge(x: number, step: 1 | -1): number {
  const a = new Float32Array([x]);
  new Uint32Array(a.buffer)[0] += step;
  return a[0];
}

test("bfloat16: known values, ties to even, overflow, subnormals, NaN", () => {
  const cases: Array<[number, number]> = [
    [0, 0x0000],
    [-0, 0x8000],
    [1, 0x3f80],
    [-2, 0xc000],
    [f32(1 + 2 ** -8), 0x3f80], // halfway between 1 and 1+2^-7: even is 1
    [f32(1 + 3 * 2 ** -8), 0x3f82], // halfway between 1+2^-7 (odd) and 1+2^-6: up to even
    [f32(1 + 2 ** -8 + 2 ** -20), 0x3f81], // just above halfway: up
    [f32(1 + 2 ** -8 - 2 ** -20), 0x3f80], // just below halfway: down
    [3.3895313892515355e38, 0x7f7f], // largest finite bfloat16
    [f32(3.4028234663852886e38), 0x7f80], // largest float32 rounds up to infinity
    [Infinity, 0x7f80],
    [-Infinity, 0xff80],
    [2 ** -133, 0x0001], // smallest bfloat16 subnormal
    [f32(2 ** -134), 0x0000], // half of it: tie, to even (zero)
    [f32(3 * 2 ** -134), 0x0002], // 1.5 ulps: tie, to even (2)
    [f32(2 ** -126), 0x0080], // smallest normal
  ];
  for (const [value, bits] of cases) assert.equal(hex(float32ToBfloat16(value)), hex(bits), `bf16(${value})`);
  assert.equal(hex(float32ToBfloat16(NaN)), "0x7fc0");
  assert.ok(Number.isNaN(bfloat16ToFloat32(float32ToBfloat16(NaN))));
});

test("bfloat16: every finite pattern round-trips; midpoints go to even, neighbours of midpoints to nearest", () => {
  for (let bits = 0; bits < 0x10000; bits++) {
    const value = bfloat16ToFloat32(bits);
    if (Number.isNaN(value)) continue;
    assert.equal(float32ToBfloat16(value), bits);
    if ((bits & 0x7fff) >= 0x7f7f) continue; // no finite neighbour above
    const next = bfloat16ToFloat32(bits + 1);
    const midpoint = (value + next) / 2; // exact in float32: 9 significant bits
    const expectEven = (bits & 1) === 0 ? bits : bits + 1;
    assert.equal(float32ToBfloat16(midpoint), expectEven, `midpoint above ${hex(bits)}`);
    assert.equal(float32ToBfloat16(nudge(midpoint, 1)), bits + 1, `just past the midpoint above ${hex(bits)}`);
    assert.equal(float32ToBfloat16(nudge(midpoint, -1)), bits, `just before the midpoint above ${hex(bits)}`);
  }
});

test("float16: known values, ties to even, overflow, subnormals, NaN", () => {
  const cases: Array<[number, number]> = [
    [0, 0x0000],
    [-0, 0x8000],
    [1, 0x3c00],
    [-2, 0xc000],
    [0.1, 0x2e66],
    [65504, 0x7bff], // largest finite half
    [65519.99, 0x7bff], // below the 65520 midpoint
    [65520, 0x7c00], // midpoint: ties to even, which is infinity
    [1e6, 0x7c00],
    [-1e6, 0xfc00],
    [2 ** -14, 0x0400], // smallest normal
    [2 ** -24, 0x0001], // smallest subnormal
    [2 ** -25, 0x0000], // half of it: tie, to even (zero)
    [f32(2 ** -25 * 1.0000001), 0x0001], // just above: up
    [3 * 2 ** -25, 0x0002], // 1.5 subnormal ulps: tie, to even
    [5 * 2 ** -25, 0x0002], // 2.5 ulps: tie, to even
    [f32(2 ** -14 - 2 ** -25), 0x0400], // rounds up out of the subnormals into the smallest normal
    [1e-10, 0x0000],
    [Infinity, 0x7c00],
    [-Infinity, 0xfc00],
  ];
  for (const [value, bits] of cases) assert.equal(hex(float32ToFloat16(value)), hex(bits), `f16(${value})`);
  assert.equal(hex(float32ToFloat16(NaN)), "0x7e00");
  assert.ok(Number.isNaN(float16ToFloat32(float32ToFloat16(NaN))));
});

test("float16: every finite pattern round-trips; midpoints go to even, neighbours of midpoints to nearest", () => {
  for (let bits = 0; bits < 0x10000; bits++) {
    const value = float16ToFloat32(bits);
    if (!Number.isFinite(value)) continue;
    assert.equal(float32ToFloat16(value), bits, `round trip ${hex(bits)}`);
    if ((bits & 0x7fff) >= 0x7bff) continue;
    const next = float16ToFloat32(bits + 1);
    const midpoint = (value + next) / 2; // exact in float32: at most 12 significant bits
    const expectEven = (bits & 1) === 0 ? bits : bits + 1;
    assert.equal(float32ToFloat16(midpoint), expectEven, `midpoint above ${hex(bits)}`);
    {
      assert.equal(float32ToFloat16(nudge(midpoint, 1)), bits + 1, `just past the midpoint above ${hex(bits)}`);
      assert.equal(float32ToFloat16(nudge(midpoint, -1)), bits, `just before the midpoint above ${hex(bits)}`);
    }
  }
});

test("bulk converters equal the scalar ones", () => {
  const values = new Float32Array(20000);
  fillRandomFloat32(values, 1, "bulk", 0, { mean: 0, std: 3000 });
  values.set([0, -0, NaN, Infinity, -Infinity, 65520, 65504, 2 ** -25, 2 ** -24, 1e-40, 3.4e38, -1e-8], 0);
  const bf = new Uint16Array(values.length);
  const half = new Uint16Array(values.length);
  convertToBfloat16(values, bf);
  convertToFloat16(values, half);
  for (let i = 0; i < values.length; i++) {
    assert.equal(bf[i], float32ToBfloat16(values[i]), `bf16 at ${i} (${values[i]})`);
    assert.equal(half[i], float32ToFloat16(values[i]), `f16 at ${i} (${values[i]})`);
  }
});

test("random values: seeded, independent of chunking, close to N(mean, std)", () => {
  const whole = new Float32Array(300_000);
  fillRandomFloat32(whole, 42, "h.0.mlp.dense_h_to_4h.weight", 0, { mean: 0, std: 0.02 });
  // The same range in odd pieces that straddle generator blocks.
  const pieces = new Float32Array(whole.length);
  for (const [start, end] of [[0, 1], [1, 65_535], [65_535, 65_537], [65_537, 200_001], [200_001, 300_000]]) {
    fillRandomFloat32(pieces.subarray(start, end), 42, "h.0.mlp.dense_h_to_4h.weight", start, { mean: 0, std: 0.02 });
  }
  assert.deepEqual(pieces, whole);

  let sum = 0;
  let squares = 0;
  for (const x of whole) {
    sum += x;
    squares += x * x;
  }
  const mean = sum / whole.length;
  const std = Math.sqrt(squares / whole.length - mean * mean);
  assert.ok(Math.abs(mean) < 2e-4, `mean ${mean}`);
  assert.ok(Math.abs(std - 0.02) < 2e-4, `std ${std}`);

  const other = new Float32Array(1000);
  fillRandomFloat32(other, 43, "h.0.mlp.dense_h_to_4h.weight", 0, { mean: 0, std: 0.02 });
  assert.notDeepEqual(other, whole.subarray(0, 1000), "another seed gives other values");
  fillRandomFloat32(other, 42, "h.1.mlp.dense_h_to_4h.weight", 0, { mean: 0, std: 0.02 });
  assert.notDeepEqual(other, whole.subarray(0, 1000), "another tensor gives other values");
});

test("half-precision random bytes are the float32 values rounded to nearest even", () => {
  const init = { mean: 1, std: 0.5 };
  const values = new Float32Array(randomTensorBytes("F32", 9, "t", 1000, 5000, init).buffer);
  const bf = new Uint16Array(randomTensorBytes("BF16", 9, "t", 1000, 5000, init).buffer);
  const half = new Uint16Array(randomTensorBytes("F16", 9, "t", 1000, 5000, init).buffer);
  for (let i = 0; i < values.length; i++) {
    assert.equal(bf[i], float32ToBfloat16(values[i]));
    assert.equal(half[i], float32ToFloat16(values[i]));
  }
});
