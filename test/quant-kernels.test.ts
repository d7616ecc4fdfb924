/**
 * int8 kernels (native/src/quant.cc) against the TypeScript reference (src/quant/reference.ts):
 * weight quantization bit-exact for every source dtype and group layout; linear_int8 in every
 * activation mode, AVX2 and scalar, over batch sizes that hit the 1-4 row blocks and the tails, with
 * bias, GELU and residual; the embedding lookup; and LLM.int8's outlier decomposition.
 */
import assert from "node:assert/strict";
import { after, describe, test } from "node:test";
import { ActivationMode, DTypeCode, Epilogue, native, type KernelVariant, type NativeRegion, type StorageDType } from "../src/backend/native.js";
import { readTensorAsF32 } from "../src/backend/reference.js";
import { f16ToF32 } from "../src/backend/reference.js";
import { linearInt8Reference, quantizeWeightsReference, roundHalfEven } from "../src/quant/reference.js";
import { float32ToFloat16 } from "../src/checkpoint/half-float.js";
import type { ActivationModeName } from "../src/quant/scheme.js";

const addon = native();
const cpu = addon.cpuInfo();
const variants: KernelVariant[] = ["scalar", ...(cpu.avx2 ? (["avx2"] as const) : []), ...(cpu.avx2 && cpu.avxVnni ? (["avx2-vnni"] as const) : [])];
after(() => addon.setKernelVariant("auto"));

function rng(seed: number): () => number {
  let s = seed >>> 0 || 1;
  return () => {
    s ^= s << 13;
    s ^= s >>> 17;
    s ^= s << 5;
    return (s >>> 0) / 4294967296;
  };
}

function randomF32(n: number, seed: number, scale = 1): Float32Array {
  const r = rng(seed);
  return Float32Array.from({ length: n }, () => (r() * 2 - 1) * scale);
}

const bytesPer: Record<StorageDType, number> = { f32: 4, f16: 2, bf16: 2, i8: 1 };

/** A native region holding `count` random values of `dtype` (the addon's own generator), and their exact fp32 values. */
function randomWeights(dtype: StorageDType, out: number, inFeatures: number, seed: number): { region: NativeRegion; values: Float32Array } {
  const n = out * inFeatures;
  const region = addon.allocate(n * bytesPer[dtype]);
  addon.fillRandom(region, 0, DTypeCode[dtype], n, seed, 0.05);
  const values = readTensorAsF32({ name: "w", file: "test", dtype, shape: [out, inFeatures], region, byteOffset: 0, byteLength: n * bytesPer[dtype] });
  return { region, values };
}

function regionFrom(bytes: Uint8Array): NativeRegion {
  const region = addon.allocate(Math.max(1, bytes.length));
  new Uint8Array(addon.view(region, 0, bytes.length)).set(bytes);
  return region;
}

interface Quantized {
  region: NativeRegion;
  scalesOffset: number;
  q: Int8Array;
  scales: Uint16Array;
}

function quantizeNative(src: NativeRegion, dtype: StorageDType, out: number, inFeatures: number, group: number): Quantized {
  const groups = Math.ceil(inFeatures / Math.min(group, inFeatures));
  const scalesOffset = Math.ceil((out * inFeatures) / 64) * 64;
  const region = addon.allocate(scalesOffset + out * groups * 2);
  addon.quantizeWeights(region, 0, region, scalesOffset, src, 0, DTypeCode[dtype], out, inFeatures, group);
  const q = new Int8Array(addon.view(region, 0, out * inFeatures)).slice();
  const scales = new Uint16Array(addon.view(region, scalesOffset, out * groups * 2)).slice();
  return { region, scalesOffset, q, scales };
}

function maxAbs(a: Float32Array): number {
  let m = 0;
  for (const v of a) m = Math.max(m, Math.abs(v));
  return m;
}

function maxDiff(a: Float32Array, b: Float32Array): number {
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i]! - b[i]!));
  return m;
}

describe("fp16 helpers of the reference", () => {
  test("round half to even and fp32 -> fp16 agree with known values", () => {
    assert.deepEqual([0.5, 1.5, 2.5, -0.5, -1.5, 2.4, 2.6].map(roundHalfEven), [0, 2, 2, -0, -2, 2, 3]);
    for (const [v, h] of [[1, 0x3c00], [65504, 0x7bff], [2 ** -24, 0x0001], [2 ** -14, 0x0400], [0.1, 0x2e66], [-2, 0xc000], [1e6, 0x7c00]] as const) {
      assert.equal(float32ToFloat16(v), h, `f16(${v})`);
    }
    for (let h = 0; h < 0x7c00; h += 7) assert.equal(float32ToFloat16(f16ToF32(h)), h, `round trip of ${h.toString(16)}`);
  });
});

describe("quantizeWeights", () => {
  const layouts = [
    { out: 37, in: 96, group: 32 },
    { out: 5, in: 100, group: 64 }, // last group of each row is 36 wide
    { out: 9, in: 64, group: 128 }, // group wider than a row: one scale per row
    { out: 3, in: 4096, group: 4096 },
  ];
  for (const dtype of ["f32", "f16", "bf16"] as const) {
    for (const { out, in: n, group } of layouts) {
      test(`${dtype} [${out}, ${n}] group ${group}: bit-exact with the reference`, () => {
        const { region, values } = randomWeights(dtype, out, n, out * 31 + n);
        // Edge rows: all zeros, tiny values (subnormal fp16 scales), and one large value.
        if (dtype === "f32") {
          const v = new Float32Array(addon.view(region, 0, out * n * 4));
          v.fill(0, 0, n);
          for (let k = 0; k < n; k++) v[n + k] = (k % 7) * 1e-7 - 3e-7;
          v[2 * n + 3] = 40;
          values.set(v);
        }
        for (const variant of variants) {
          addon.setKernelVariant(variant);
          const nat = quantizeNative(region, dtype, out, n, group);
          const ref = quantizeWeightsReference(values, out, n, Math.min(group, n));
          assert.deepEqual(nat.scales, ref.scales, `${variant}: scales`);
          assert.deepEqual(nat.q, ref.q, `${variant}: values`);
          addon.release(nat.region);
        }
        addon.release(region);
      });
    }
  }

  test("every dequantized weight is within half a step of the original, and no value clips", () => {
    const out = 16, n = 256, group = 64;
    const { region, values } = randomWeights("bf16", out, n, 5);
    const nat = quantizeNative(region, "bf16", out, n, group);
    for (let o = 0; o < out; o++) {
      for (let k = 0; k < n; k++) {
        const s = f16ToF32(nat.scales[o * (n / group) + Math.floor(k / group)]!);
        assert.ok(Math.abs(nat.q[o * n + k]! * s - values[o * n + k]!) <= s / 2 + 1e-12);
        assert.ok(Math.abs(nat.q[o * n + k]!) <= 127);
      }
    }
    addon.release(region);
    addon.release(nat.region);
  });
});

describe("linearInt8 against the reference", () => {
  const cases = [
    { out: 67, in: 128, group: 32 },
    { out: 40, in: 96, group: 64 }, // partial last group
    { out: 33, in: 100, group: 64 }, // in not a multiple of 32: the float paths
    { out: 50, in: 256, group: 256 }, // per-row scales (int8-mixed's layout)
    { out: 21, in: 1536, group: 96 }, // batches > 4 work in blocks of 512 inputs: a block boundary inside a group
    { out: 19, in: 1088, group: 1088 }, // per-row scales split across input blocks
  ];
  const modes: ActivationModeName[] = ["exact", "grouped", "mixed"];
  for (const { out, in: n, group } of cases) {
    const { region, values } = randomWeights("bf16", out, n, out + n);
    const nat = quantizeNative(region, "bf16", out, n, group);
    addon.release(region);
    void values;
    const G = Math.min(group, n);
    for (const mode of modes) {
      test(`[${out}, ${n}] group ${group}, ${mode}: every variant and batch size`, () => {
        for (const rows of [1, 2, 3, 4, 5, 8, 13, 17]) {
          const x = randomF32(rows * n, rows * 7 + n, 2);
          // Two features that exceed the mixed threshold in some token.
          x[3] = 9;
          if (rows > 2) x[2 * n + n - 1] = -7.5;
          const bias = randomF32(out, 3);
          const residual = randomF32(rows * out, 4);
          for (const [gelu, withResidual] of [[false, false], [true, false], [false, true]] as const) {
            const ref = linearInt8Reference({ x, rows, q: nat.q, scales: nat.scales, outFeatures: out, inFeatures: n, groupSize: G, bias, gelu, residual: withResidual ? residual : null, mode, threshold: 6 });
            let simd: Float32Array | undefined;
            for (const variant of variants) {
              addon.setKernelVariant(variant);
              const y = new Float32Array(rows * out);
              const outliers = addon.linearInt8(y, x, rows, nat.region, 0, nat.region, nat.scalesOffset, out, n, G, bias, gelu ? Epilogue.gelu : Epilogue.none, withResidual ? residual : null, ActivationMode[mode], 6);
              // AVX-VNNI only fuses exact integer operations: bit-identical to plain AVX2.
              if (variant !== "scalar") {
                if (simd) assert.deepEqual(y, simd, `${variant} differs from avx2 at rows ${rows}`);
                simd = y;
              }
              const diff = maxDiff(y, ref.y);
              const tol = 2e-5 * Math.max(1, maxAbs(ref.y));
              assert.ok(diff <= tol, `${variant} rows ${rows} gelu ${gelu} residual ${withResidual}: max |diff| ${diff} > ${tol}`);
              assert.equal(outliers, mode === "mixed" ? ref.outliers.length : 0);
            }
          }
        }
      });
    }
  }

  test("grouped activations: each token is quantized on its own, so results do not depend on the batch", () => {
    const out = 64, n = 256;
    const { region } = randomWeights("bf16", out, n, 9);
    const nat = quantizeNative(region, "bf16", out, n, 64);
    const x = randomF32(8 * n, 10, 3);
    const all = new Float32Array(8 * out);
    addon.linearInt8(all, x, 8, nat.region, 0, nat.region, nat.scalesOffset, out, n, 64, null, 0, null, ActivationMode.grouped, 0);
    for (let r = 0; r < 8; r++) {
      const one = new Float32Array(out);
      addon.linearInt8(one, x.subarray(r * n, (r + 1) * n), 1, nat.region, 0, nat.region, nat.scalesOffset, out, n, 64, null, 0, null, ActivationMode.grouped, 0);
      assert.ok(maxDiff(one, all.subarray(r * out, (r + 1) * out)) <= 1e-5);
    }
    addon.release(region);
    addon.release(nat.region);
  });

  test("rejects scales that do not cover the matrix, and a zero group size", () => {
    const region = addon.allocate(64 * 64 + 64 * 2);
    const y = new Float32Array(64), x = new Float32Array(64);
    assert.throws(() => addon.linearInt8(y, x, 1, region, 0, region, 64 * 64, 64, 64, 32, null, 0, null, 1, 0), /outside the region/);
    assert.throws(() => addon.linearInt8(y, x, 1, region, 0, region, 64 * 64, 64, 64, 0, null, 0, null, 1, 0), /groupSize/);
    assert.throws(() => addon.linearInt8(y, x, 1, region, 0, region, 64 * 64 + 1, 64, 64, 64, null, 0, null, 1, 0), /even byte offset/);
    addon.release(region);
  });
});

describe("LLM.int8 outlier decomposition", () => {
  // One token has a feature far above the others, as LLMs' outlier features are.
  const out = 96, n = 512, rows = 4;
  const { region, values } = randomWeights("f32", out, n, 21);
  const nat = quantizeNative(region, "f32", out, n, n);
  addon.release(region);
  const x = randomF32(rows * n, 22, 1);
  x[1 * n + 17] = 60;
  x[3 * n + 200] = -25;
  // fp32 truth with the same int8 weights: isolates what happens to the activations.
  const dequantized = new Float32Array(out * n);
  for (let o = 0; o < out; o++) for (let k = 0; k < n; k++) dequantized[o * n + k] = nat.q[o * n + k]! * f16ToF32(nat.scales[o]!);
  const truth = new Float32Array(rows * out);
  for (let r = 0; r < rows; r++) for (let o = 0; o < out; o++) {
    let s = 0;
    for (let k = 0; k < n; k++) s += x[r * n + k]! * dequantized[o * n + k]!;
    truth[r * out + o] = s;
  }
  void values;

  for (const variant of variants) {
    test(`${variant}: features at or above the threshold are found and computed in fp32`, () => {
      addon.setKernelVariant(variant);
      const mixed = new Float32Array(rows * out);
      const plain = new Float32Array(rows * out);
      assert.equal(addon.linearInt8(mixed, x, rows, nat.region, 0, nat.region, nat.scalesOffset, out, n, n, null, 0, null, ActivationMode.mixed, 6), 2);
      assert.equal(addon.linearInt8(plain, x, rows, nat.region, 0, nat.region, nat.scalesOffset, out, n, n, null, 0, null, ActivationMode.mixed, 0), 0);
      // Exactly at the threshold counts as an outlier (bitsandbytes: |x| >= threshold).
      const atThreshold = x.slice();
      atThreshold[5] = 6;
      assert.equal(addon.linearInt8(new Float32Array(rows * out), atThreshold, rows, nat.region, 0, nat.region, nat.scalesOffset, out, n, n, null, 0, null, ActivationMode.mixed, 6), 3);
      const errMixed = maxDiff(mixed, truth), errPlain = maxDiff(plain, truth);
      // Without decomposition the outlier inflates every token-1/-3 scale, crushing the other features.
      assert.ok(errMixed * 5 < errPlain, `mixed error ${errMixed} should be far below plain vector-wise ${errPlain}`);
      // The outlier feature itself is fp32: moving it by much less than an int8 step moves y exactly by dx * w.
      const nudged = x.slice();
      nudged[1 * n + 17] = 60 + 0.01;
      const y2 = new Float32Array(rows * out);
      addon.linearInt8(y2, nudged, rows, nat.region, 0, nat.region, nat.scalesOffset, out, n, n, null, 0, null, ActivationMode.mixed, 6);
      for (let o = 0; o < out; o++) {
        const expected = 0.01 * dequantized[o * n + 17]!;
        assert.ok(Math.abs(y2[out + o]! - mixed[out + o]! - expected) <= 1e-5, `output ${o}`);
      }
    });
  }
});

describe("embeddingInt8", () => {
  test("rows are the dequantized table rows", () => {
    const vocab = 50, hidden = 96;
    const { region } = randomWeights("bf16", vocab, hidden, 8);
    const nat = quantizeNative(region, "bf16", vocab, hidden, 64);
    const ids = Int32Array.from([0, 7, 49, 7]);
    const y = new Float32Array(ids.length * hidden);
    addon.embeddingInt8(y, ids, nat.region, 0, nat.region, nat.scalesOffset, vocab, hidden, 64);
    ids.forEach((id, i) => {
      for (let k = 0; k < hidden; k++) {
        assert.equal(y[i * hidden + k], Math.fround(nat.q[id * hidden + k]! * f16ToF32(nat.scales[id * 2 + Math.floor(k / 64)]!)));
      }
    });
    assert.throws(() => addon.embeddingInt8(y, Int32Array.from([50]), nat.region, 0, nat.region, nat.scalesOffset, vocab, hidden, 64), /outside the vocabulary/);
    addon.release(region);
    addon.release(nat.region);
  });
});

void regionFrom;
