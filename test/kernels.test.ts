/**
 * Kernel-level conformance: every native variant (scalar reference, AVX2) x weight dtype x odd shape
 * x epilogue against a pure-TypeScript reference that accumulates in fp64, plus layerNorm, embedding
 * and attention, and thread-count independence.
 *
 * Tolerance for linear. Weights are generated as exact f32/f16/bf16 values, so the only error in the
 * kernels is fp32 arithmetic. Any fp32 summation of K products, in any order, with or without FMA,
 * obeys |fl(sum) - sum| <= gamma_K * sum |x_k w_k|, gamma_K = K u / (1 - K u), u = 2^-24 (Higham,
 * "Accuracy and Stability of Numerical Algorithms", 2nd ed., eq. 3.5). Adding the bias is one more
 * term (K+1), GELU's derivative is below 1.13 in magnitude, and GELU itself and the residual add
 * each cost a few roundings relative to their operands; so per output
 *   tol = 1.2 gamma_{K+2} (sum |x_k w_k| + |b|) + 16 u (|v| + |y| + |residual|),
 * with v the pre-activation. This bound is rigorous yet still catches real bugs: dropping or
 * doubling one of K terms moves a result by about 1/K of sum |x w|, far above K u for the K here.
 */
import assert from "node:assert/strict";
import { after, describe, test } from "node:test";
import { DTypeCode, Epilogue, native, type NativeRegion, type StorageDType } from "../src/backend/native.js";
import { CpuBackend } from "../src/backend/cpu.js";
import type { KVDType, MatrixOptions } from "../src/backend/backend.js";
import { float32ToBfloat16, float32ToFloat16 } from "../src/checkpoint/half-float.js";
import type { TensorView } from "../src/checkpoint/safetensors.js";

const addon = native();
const u = 2 ** -24;
const gamma = (n: number) => (n * u) / (1 - n * u);
const cpu = addon.cpuInfo();
const hasAvx2 = cpu.avx2 && cpu.fma && cpu.f16c;
const variants = hasAvx2 ? (["scalar", "avx2"] as const) : (["scalar"] as const);
const initialThreads = addon.getThreads();
const initialVariant = addon.getKernelVariant();

after(() => {
  addon.setThreads(initialThreads);
  addon.setKernelVariant(initialVariant);
});

/** A small deterministic generator (xorshift32), so failures reproduce. */
function rng(seed: number): () => number {
  let s = seed >>> 0 || 0x9e3779b9;
  return () => {
    s ^= s << 13;
    s ^= s >>> 17;
    s ^= s << 5;
    return (s >>> 0) / 4294967296;
  };
}

function f16ToNumber(h: number): number {
  const sign = h & 0x8000 ? -1 : 1;
  const exp = (h >> 10) & 0x1f;
  const mant = h & 0x3ff;
  if (exp === 0) return sign * mant * 2 ** -24;
  if (exp === 31) return mant ? NaN : sign * Infinity;
  return sign * (1 + mant / 1024) * 2 ** (exp - 15);
}

function bf16ToNumber(h: number): number {
  const u32 = new Uint32Array([h << 16]);
  return new Float32Array(u32.buffer)[0]!;
}

/**
 * Weights (out, in) placed at `byteOffset` of a fresh region, as exact values of `dtype`.
 * f16 weights include subnormals and zeros; magnitudes stay below 1.
 */
function makeWeights(dtype: StorageDType, out: number, inF: number, seed: number, byteOffset = 0) {
  const n = out * inF;
  const esize = dtype === "f32" ? 4 : 2;
  const region: NativeRegion = addon.allocate(byteOffset + n * esize + 64);
  const values = new Float64Array(n);
  const r = rng(seed);
  const buf = addon.view(region, byteOffset, n * esize);
  if (dtype === "f32") {
    const a = new Float32Array(buf);
    for (let i = 0; i < n; i++) values[i] = a[i] = Math.fround(r() * 2 - 1);
  } else {
    const a = new Uint16Array(buf);
    for (let i = 0; i < n; i++) {
      const sign = r() < 0.5 ? 0x8000 : 0;
      let bits: number;
      if (dtype === "f16") {
        const exp = Math.floor(r() * 16); // 0 (zero/subnormal) .. 15 (values in [1, 2))
        bits = sign | (exp << 10) | Math.floor(r() * 1024);
        values[i] = f16ToNumber(bits);
      } else {
        const exp = 112 + Math.floor(r() * 16); // 2^-15 .. 2^0
        bits = sign | (exp << 7) | Math.floor(r() * 128);
        values[i] = bf16ToNumber(bits);
      }
      a[i] = bits;
    }
  }
  return { region, values, byteOffset };
}

function randomF32(n: number, seed: number, scale = 1): Float32Array {
  const r = rng(seed);
  const a = new Float32Array(n);
  for (let i = 0; i < n; i++) a[i] = (r() * 2 - 1) * scale;
  return a;
}

function geluTanh(x: number): number {
  return x * 0.5 * (1 + Math.tanh(0.79788456 * x * (1 + 0.044715 * x * x)));
}

interface LinearCase {
  dtype: StorageDType;
  out: number;
  inF: number;
  rows: number;
}

/** fp64 dot products and sum |x w| for every (row, output). */
function referenceDots(x: Float32Array, w: Float64Array, rows: number, out: number, inF: number) {
  const dot = new Float64Array(rows * out);
  const mag = new Float64Array(rows * out);
  for (let r = 0; r < rows; r++) {
    for (let o = 0; o < out; o++) {
      let s = 0, m = 0;
      for (let k = 0; k < inF; k++) {
        const p = x[r * inF + k]! * w[o * inF + k]!;
        s += p;
        m += Math.abs(p);
      }
      dot[r * out + o] = s;
      mag[r * out + o] = m;
    }
  }
  return { dot, mag };
}

/** Worst error / tolerance and worst absolute difference over all outputs (fails above 1). */
function compareLinear(
  y: Float32Array,
  ref: { dot: Float64Array; mag: Float64Array },
  c: LinearCase,
  bias: Float32Array | null,
  gelu: boolean,
  residual: Float32Array | null,
  label: string,
) {
  let worstRatio = 0, worstDiff = 0;
  for (let r = 0; r < c.rows; r++) {
    for (let o = 0; o < c.out; o++) {
      const i = r * c.out + o;
      const b = bias ? bias[o]! : 0;
      const v = ref.dot[i]! + b;
      const act = gelu ? geluTanh(v) : v;
      const res = residual ? residual[i]! : 0;
      const want = act + res;
      const tol = 1.2 * gamma(c.inF + 2) * (ref.mag[i]! + Math.abs(b)) + 16 * u * (Math.abs(v) + Math.abs(want) + Math.abs(res)) + 1e-30;
      const diff = Math.abs(y[i]! - want);
      if (!(diff <= tol)) {
        assert.fail(`${label}: y[${r}][${o}] = ${y[i]} but the fp64 reference is ${want} (|diff| ${diff.toExponential(3)} > tol ${tol.toExponential(3)})`);
      }
      worstRatio = Math.max(worstRatio, diff / tol);
      worstDiff = Math.max(worstDiff, diff);
    }
  }
  return { worstRatio, worstDiff };
}

const shapes: Array<[number, number]> = [
  [1, 1],
  [5, 3],
  [13, 17],
  [37, 100],
  [64, 257],
  [100, 520], // more than one k block in the GEMM path
  [19, 1030], // two k blocks and a tail that is not a multiple of 8
];
const rowCounts = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 64, 130];
const epilogues = [
  { bias: false, gelu: false, residual: false },
  { bias: true, gelu: false, residual: false },
  { bias: true, gelu: true, residual: false },
  { bias: false, gelu: true, residual: true },
  { bias: true, gelu: true, residual: true },
  { bias: false, gelu: false, residual: true },
];

describe("linear", () => {
  for (const dtype of ["f32", "f16", "bf16"] as const) {
    test(`${dtype}: every variant matches the fp64 reference on odd shapes, rows and epilogues`, () => {
      const summary = new Map<string, { worstRatio: number; worstDiff: number; calls: number }>();
      let seed = 100;
      for (const [out, inF] of shapes) {
        // Odd byte offsets (2 bytes for 16-bit types) check that weights need no alignment.
        const w = makeWeights(dtype, out, inF, seed++, dtype === "f32" ? 4 : 2);
        const bias = randomF32(out, seed++);
        for (const rows of rowCounts) {
          if (rows * out * inF > 3_000_000) continue; // keeps the fp64 reference fast
          const x = randomF32(rows * inF, seed++);
          const ref = referenceDots(x, w.values, rows, out, inF);
          const residual = randomF32(rows * out, seed++);
          for (const [e, epi] of epilogues.entries()) {
            // Every epilogue on small batches; a rotating one on the rest keeps the run short.
            if (rows > 4 && rows !== 64 && e !== rows % epilogues.length) continue;
            for (const variant of variants) {
              addon.setKernelVariant(variant);
              const y = new Float32Array(rows * out).fill(NaN);
              addon.linear(
                y,
                x,
                rows,
                w.region,
                w.byteOffset,
                DTypeCode[dtype],
                out,
                inF,
                epi.bias ? bias : null,
                epi.gelu ? Epilogue.gelu : Epilogue.none,
                epi.residual ? residual : null,
              );
              const label = `${variant} ${dtype} out=${out} in=${inF} rows=${rows} bias=${epi.bias} gelu=${epi.gelu} residual=${epi.residual}`;
              const r = compareLinear(y, ref, { dtype, out, inF, rows }, epi.bias ? bias : null, epi.gelu, epi.residual ? residual : null, label);
              const s = summary.get(variant) ?? { worstRatio: 0, worstDiff: 0, calls: 0 };
              summary.set(variant, { worstRatio: Math.max(s.worstRatio, r.worstRatio), worstDiff: Math.max(s.worstDiff, r.worstDiff), calls: s.calls + 1 });
            }
          }
        }
        addon.release(w.region);
      }
      for (const [variant, s] of summary) {
        console.log(`  linear ${dtype} ${variant}: ${s.calls} calls, max |diff| ${s.worstDiff.toExponential(2)}, max diff/tol ${s.worstRatio.toFixed(4)}`);
      }
      addon.setKernelVariant(initialVariant);
    });
  }

  test("results do not depend on the thread count (bitwise)", () => {
    for (const variant of variants) {
      addon.setKernelVariant(variant);
      for (const dtype of ["f32", "f16", "bf16"] as const) {
        for (const [out, inF, rows] of [
          [1000, 300, 1],
          [1000, 300, 3],
          [517, 1030, 9],
          [1000, 600, 70],
        ] as const) {
          const w = makeWeights(dtype, out, inF, out + inF + rows);
          const x = randomF32(rows * inF, 9);
          const bias = randomF32(out, 10);
          const results = [1, 2, 3].map((threads) => {
            addon.setThreads(threads);
            const y = new Float32Array(rows * out);
            addon.linear(y, x, rows, w.region, 0, DTypeCode[dtype], out, inF, bias, Epilogue.gelu, null);
            return y;
          });
          addon.release(w.region);
          assert.deepEqual(results[1], results[0], `${variant} ${dtype} ${out}x${inF} rows=${rows}: 2 threads differ from 1`);
          assert.deepEqual(results[2], results[0], `${variant} ${dtype} ${out}x${inF} rows=${rows}: 3 threads differ from 1`);
        }
      }
    }
    addon.setThreads(initialThreads);
    addon.setKernelVariant(initialVariant);
  });

  /** A copy of row-major weights (out, inF) in column panels of panelK inputs (native/src/kernels.h WeightMatrix). */
  function inPanels(w: { region: NativeRegion; byteOffset: number }, dtype: StorageDType, out: number, inF: number, panelK: number): NativeRegion {
    const es = dtype === "f32" ? 4 : 2;
    const region = addon.allocate(out * inF * es);
    for (let k0 = 0; k0 < inF; k0 += panelK) {
      addon.sliceColumns(region, out * k0 * es, DTypeCode[dtype], w.region, w.byteOffset, DTypeCode[dtype], out, inF, k0, Math.min(panelK, inF - k0));
    }
    return region;
  }

  test("a matrix in column panels matches the fp64 reference (every variant, dtype, epilogue; ragged last panel)", () => {
    let seed = 500, calls = 0, worst = 0;
    for (const dtype of ["f32", "f16", "bf16"] as const) {
      for (const [out, inF, panelK] of [
        [5, 17, 8], // panels 8, 8, 1
        [37, 100, 32],
        [64, 257, 64],
        [19, 1030, 512], // the last panel narrower than a vector
        [30, 2048, 1024],
      ] as const) {
        const w = makeWeights(dtype, out, inF, seed++, dtype === "f32" ? 4 : 2);
        const panels = inPanels(w, dtype, out, inF, panelK);
        const bias = randomF32(out, seed++);
        for (const rows of [1, 2, 3, 5, 9, 64, 130]) {
          if (rows * out * inF > 3_000_000) continue;
          const x = randomF32(rows * inF, seed++);
          const ref = referenceDots(x, w.values, rows, out, inF);
          const residual = randomF32(rows * out, seed++);
          for (const epi of epilogues) {
            for (const variant of variants) {
              addon.setKernelVariant(variant);
              const y = new Float32Array(rows * out).fill(NaN);
              const b = epi.bias ? bias : null, res = epi.residual ? residual : null;
              addon.linear(y, x, rows, panels, 0, DTypeCode[dtype], out, inF, b, epi.gelu ? Epilogue.gelu : Epilogue.none, res, panelK);
              const label = `panels of ${panelK}: ${variant} ${dtype} out=${out} in=${inF} rows=${rows} bias=${epi.bias} gelu=${epi.gelu} residual=${epi.residual}`;
              worst = Math.max(worst, compareLinear(y, ref, { dtype, out, inF, rows }, b, epi.gelu, res, label).worstRatio);
              calls++;
            }
          }
        }
        addon.release(panels);
        addon.release(w.region);
      }
    }
    console.log(`  linear in column panels: ${calls} calls, max diff/tol ${worst.toFixed(4)}`);
    addon.setKernelVariant(initialVariant);
  });

  test("column panels: results do not depend on the thread count (bitwise); panelK >= in is the row-major layout", () => {
    for (const variant of variants) {
      addon.setKernelVariant(variant);
      for (const dtype of ["f32", "bf16"] as const) {
        for (const [out, inF, rows, panelK] of [
          [1000, 300, 1, 128],
          [517, 1030, 9, 512],
          [1000, 600, 70, 256],
        ] as const) {
          const w = makeWeights(dtype, out, inF, out + inF + rows);
          const panels = inPanels(w, dtype, out, inF, panelK);
          const x = randomF32(rows * inF, 9);
          const bias = randomF32(out, 10);
          const run = (region: NativeRegion, k: number, threads: number) => {
            addon.setThreads(threads);
            const y = new Float32Array(rows * out);
            addon.linear(y, x, rows, region, 0, DTypeCode[dtype], out, inF, bias, Epilogue.gelu, null, k);
            return y;
          };
          const one = run(panels, panelK, 1);
          assert.deepEqual(run(panels, panelK, 2), one, `${variant} ${dtype} ${out}x${inF} rows=${rows}: 2 threads differ from 1`);
          assert.deepEqual(run(panels, panelK, 3), one, `${variant} ${dtype} ${out}x${inF} rows=${rows}: 3 threads differ from 1`);
          assert.deepEqual(run(w.region, inF, 2), run(w.region, 0, 2), `${variant} ${dtype}: panelK = in differs from row-major`);
          assert.deepEqual(run(w.region, inF + 8, 2), run(w.region, 0, 2), `${variant} ${dtype}: panelK > in differs from row-major`);
          addon.release(panels);
          addon.release(w.region);
        }
      }
    }
    addon.setThreads(initialThreads);
    addon.setKernelVariant(initialVariant);
  });

  test("y overlapping the residual is rejected", () => {
    const w = makeWeights("f32", 4, 4, 1);
    const y = new Float32Array(4);
    assert.throws(() => addon.linear(y, new Float32Array(4), 1, w.region, 0, DTypeCode.f32, 4, 4, null, 0, y), /overlap/);
    addon.release(w.region);
  });
});

describe("CpuBackend: weights only linear() reads, in column panels", () => {
  const view = (dtype: StorageDType, out: number, inF: number, seed: number): TensorView => {
    const w = makeWeights(dtype, out, inF, seed);
    return { name: `w${seed}`, file: "test", dtype, shape: [out, inF], region: w.region, byteOffset: 0, byteLength: out * inF * (dtype === "f32" ? 4 : 2) };
  };

  test("the default policy: bf16/fp16 matrices with more than 4096 inputs, for use by linear() only", () => {
    const backend = new CpuBackend();
    const cases: Array<[StorageDType, StorageDType, number, MatrixOptions, number | undefined]> = [
      ["bf16", "bf16", 16384, { use: "linear" }, 4096],
      ["f16", "f16", 10240, { use: "linear" }, 4096], // panels 4096, 4096, 2048
      ["f32", "bf16", 8192, { use: "linear" }, 4096], // converted, then in panels
      ["bf16", "bf16", 16384, { use: "embedding" }, undefined],
      ["bf16", "bf16", 16384, {}, undefined],
      ["bf16", "bf16", 4096, { use: "linear" }, undefined],
      ["f32", "f32", 16384, { use: "linear" }, undefined],
    ];
    for (const [stored, dtype, inF, options, panelK] of cases) {
      const v = view(stored, 3, inF, inF);
      const m = backend.matrix(v, dtype, options);
      assert.equal(m.panelK, panelK, `${stored} -> ${dtype} in=${inF} ${JSON.stringify(options)}`);
      backend.freeMatrix(m);
      addon.release(v.region);
    }
  });

  test("linear() through a matrix in panels equals the row-major one (as stored or converted), and releaseSource drops the source's pages", () => {
    const backend = new CpuBackend({ linearPanels: { width: 96, above: 100, dtypes: ["f32", "f16", "bf16"] } });
    const pairs: Array<[StorageDType, StorageDType]> = [["f32", "f32"], ["f16", "f16"], ["bf16", "bf16"], ["f32", "bf16"], ["f32", "f16"], ["bf16", "f32"]];
    for (const [stored, dtype] of pairs) {
      const [out, inF, rows] = [70, 300, 3];
      const v = view(stored, out, inF, 41);
      const rowMajor = backend.matrix(v, dtype);
      const x = randomF32(rows * inF, 5), bias = randomF32(out, 6), residual = randomF32(rows * out, 7);
      const want = new Float32Array(rows * out);
      backend.linear(want, x, rows, rowMajor, bias, { gelu: true, residual });
      const panelled = backend.matrix(v, dtype, { use: "linear", releaseSource: true });
      assert.equal(panelled.panelK, 96);
      assert.equal(addon.residentBytes(new Uint8Array(addon.view(v.region, 0, v.byteLength))), 0, `${stored} -> ${dtype}: source pages still resident`);
      const got = new Float32Array(rows * out);
      backend.linear(got, x, rows, panelled, bias, { gelu: true, residual });
      for (let i = 0; i < got.length; i++) assert.ok(Math.abs(got[i]! - want[i]!) <= 1e-5 * (1 + Math.abs(want[i]!)), `${stored} -> ${dtype}: y[${i}] ${got[i]} vs ${want[i]}`);
      backend.freeMatrix(panelled);
      backend.freeMatrix(rowMajor);
      addon.release(v.region);
    }
  });

  test("bad arguments are refused with the parameter's name", () => {
    assert.throws(() => new CpuBackend({ linearPanels: { width: 0, above: 0, dtypes: ["bf16"] } }), /linearPanels/);
    const w = makeWeights("bf16", 4, 64, 3);
    const dst = addon.allocate(4 * 64 * 2);
    assert.throws(() => addon.toPanels(dst, 0, DTypeCode.bf16, w.region, 0, DTypeCode.bf16, 4, 64, 16, 2, 5), /toPanels: row range/);
    assert.throws(() => addon.toPanels(dst, 0, DTypeCode.bf16, w.region, 0, DTypeCode.bf16, 4, 64, 0, 0, 4), /toPanels: panelK/);
    assert.throws(() => addon.toPanels(dst, 8, DTypeCode.bf16, w.region, 0, DTypeCode.bf16, 4, 64, 16, 0, 4), /toPanels: dst/);
    assert.throws(() => addon.linear(new Float32Array(4), new Float32Array(64), 1, w.region, 0, DTypeCode.bf16, 4, 64, null, 0, null, -1), /linear: panelK/);
    addon.release(dst);
    addon.release(w.region);
  });
});

describe("probes and fills", () => {
  test("fillRandom is deterministic, in range, and not all zero", () => {
    const n = 100_003;
    const region = addon.allocate(n * 4 * 2);
    addon.fillRandom(region, 0, DTypeCode.f32, n, 42, 0.5);
    addon.fillRandom(region, n * 4, DTypeCode.f32, n, 42, 0.5);
    const a = new Float32Array(addon.view(region, 0, n * 4));
    const b = new Float32Array(addon.view(region, n * 4, n * 4));
    assert.deepEqual(a, b);
    let nonzero = 0;
    for (const v of a) {
      assert.ok(v >= -0.5 && v < 0.5, `value ${v} outside [-0.5, 0.5)`);
      if (v !== 0) nonzero++;
    }
    assert.ok(nonzero > n * 0.99);
    addon.release(region);
  });

  test("probes report positive rates", () => {
    assert.ok(addon.probeReadBandwidth(16 * 2 ** 20, 1, 1) > 0);
    assert.ok(addon.probeFmaPeak(1, 1) > 0);
    assert.throws(() => addon.probeReadBandwidth(1024, 1, 1), /1048576/);
    // A kept buffer (benchmarks probe between runs without allocating and freeing a GiB each time).
    const buffer = addon.allocate(16 * 2 ** 20);
    try {
      assert.ok(addon.probeReadBandwidth(16 * 2 ** 20, 1, 1, buffer) > 0);
      assert.throws(() => addon.probeReadBandwidth(32 * 2 ** 20, 1, 1, buffer), /smaller than bytes/);
    } finally {
      addon.release(buffer);
    }
    assert.throws(() => addon.probeReadBandwidth(16 * 2 ** 20, 1, 1, buffer), /region was released/);
  });
});

describe("allocAligned (the CPU backend's activation and KV-cache buffers)", () => {
  test("zeroed, the requested length, and resident only where touched", () => {
    for (const bytes of [1, 4, 100, 4096, 1000 * 4]) {
      const b = new Uint8Array(addon.allocAligned(bytes));
      assert.equal(b.length, bytes);
      assert.ok(b.every((v) => v === 0), `allocAligned(${bytes}) is not zeroed`);
    }
    // A KV cache is sized for its capacity and filled token by token: 48 MiB must not become
    // resident before it is written (an allocator that clears it eagerly would make it so).
    // Residency of the buffer's own pages, so memory the rest of the process frees meanwhile
    // does not enter the count.
    const size = 48 << 20;
    const big = new Float32Array(addon.allocAligned(size));
    const untouched = addon.residentBytes(big);
    // (Up to one 2 MiB page where the kernel backs anonymous memory with huge pages by default.)
    assert.ok(untouched <= 4 << 20, `48 MiB allocation made ${untouched} bytes resident before use`);
    big.fill(1, 0, big.length / 2);
    const half = addon.residentBytes(big);
    assert.ok(half >= (24 << 20) - 8192 && half <= (28 << 20), `writing half of 48 MiB made ${half} bytes resident`);
    assert.equal(big[big.length / 2 - 1], 1);
    assert.equal(big[big.length / 2], 0);
  });

  test("a bad size is refused with the parameter's name", () => {
    assert.throws(() => addon.residentBytes("x" as unknown as ArrayBuffer), /residentBytes: expected nothing, an ArrayBuffer or a typed array/);
    assert.throws(() => addon.allocAligned(-1), /allocAligned: bytes/);
    assert.throws(() => addon.allocAligned(2 ** 33), /allocAligned: a buffer must be smaller than 4 GiB/);
  });
});

describe("layerNorm", () => {
  test("matches the fp64 reference", () => {
    for (const variant of variants) {
      addon.setKernelVariant(variant);
      let worst = 0;
      for (const cols of [1, 7, 64, 1000, 1030]) {
        for (const rows of [1, 3, 17]) {
          // An offset mean makes the two-pass variance matter.
          const x = randomF32(rows * cols, cols + rows).map((v) => v * 3 + 5);
          const g = randomF32(cols, 2);
          const b = randomF32(cols, 3);
          const y = new Float32Array(rows * cols);
          addon.layerNorm(y, x, rows, cols, g, b, 1e-5);
          for (let r = 0; r < rows; r++) {
            let mean = 0;
            for (let i = 0; i < cols; i++) mean += x[r * cols + i]!;
            mean /= cols;
            let variance = 0;
            for (let i = 0; i < cols; i++) variance += (x[r * cols + i]! - mean) ** 2;
            variance /= cols;
            const inv = 1 / Math.sqrt(variance + 1e-5);
            for (let i = 0; i < cols; i++) {
              const normed = (x[r * cols + i]! - mean) * inv;
              const want = normed * g[i]! + b[i]!;
              // The mean is a sum of `cols` terms (error ~ cols u |x|); relative to the spread
              // (std ~ 1.7 here, |x| < 8) that is the dominant error of the normalised value.
              const tol = (cols * u * 8 * inv + 8 * u) * (1 + Math.abs(normed)) * Math.abs(g[i]!) + 4 * u * Math.abs(want) + 1e-7;
              const diff = Math.abs(y[r * cols + i]! - want);
              assert.ok(diff <= tol, `${variant} layerNorm cols=${cols} [${r}][${i}]: ${y[r * cols + i]} vs ${want}`);
              worst = Math.max(worst, diff);
            }
          }
        }
      }
      console.log(`  layerNorm ${variant}: max |diff| ${worst.toExponential(2)}`);
    }
    addon.setKernelVariant(initialVariant);
  });
});

describe("embedding", () => {
  test("rows are the table's values, exactly, for every dtype", () => {
    for (const dtype of ["f32", "f16", "bf16"] as const) {
      const vocab = 50, hidden = 37;
      const t = makeWeights(dtype, vocab, hidden, 77, 0);
      const ids = Int32Array.from([0, 49, 7, 7, 13]);
      const y = new Float32Array(ids.length * hidden);
      addon.embedding(y, ids, t.region, 0, DTypeCode[dtype], vocab, hidden);
      for (let i = 0; i < ids.length; i++) {
        for (let j = 0; j < hidden; j++) assert.equal(y[i * hidden + j], t.values[ids[i]! * hidden + j], `${dtype} id ${ids[i]} [${j}]`);
      }
      assert.throws(() => addon.embedding(y, Int32Array.from([50]), t.region, 0, DTypeCode[dtype], vocab, hidden), /outside the vocabulary/);
      addon.release(t.region);
    }
  });
});

describe("attention", () => {
  /** fp64 ALiBi attention over the paged cache, after appending the new keys and values. */
  function referenceAttention(
    qkv: Float32Array,
    heads: number,
    d: number,
    kCache: Float64Array,
    vCache: Float64Array,
    blockSize: number,
    seqs: Int32Array,
    table: Int32Array,
    slopes: Float32Array,
    numTokens: number,
    store: (x: number) => number = (x) => x,
  ): Float64Array {
    const out = new Float64Array(numTokens * heads * d);
    const stride = heads * 3 * d;
    const at = (tableOffset: number, pos: number, h: number) =>
      ((table[tableOffset + Math.floor(pos / blockSize)]! * heads + h) * blockSize + (pos % blockSize)) * d;
    for (let s = 0; s < seqs.length / 4; s++) {
      const [start, numNew, past, off] = [seqs[4 * s]!, seqs[4 * s + 1]!, seqs[4 * s + 2]!, seqs[4 * s + 3]!];
      for (let i = 0; i < numNew; i++) {
        for (let h = 0; h < heads; h++) {
          const o = at(off, past + i, h);
          for (let e = 0; e < d; e++) {
            kCache[o + e] = store(qkv[(start + i) * stride + h * 3 * d + d + e]!);
            vCache[o + e] = store(qkv[(start + i) * stride + h * 3 * d + 2 * d + e]!);
          }
        }
      }
      for (let i = 0; i < numNew; i++) {
        const pos = past + i;
        for (let h = 0; h < heads; h++) {
          const q = (start + i) * stride + h * 3 * d;
          const scores: number[] = [];
          for (let j = 0; j <= pos; j++) {
            let dot = 0;
            const k = at(off, j, h);
            for (let e = 0; e < d; e++) dot += qkv[q + e]! * kCache[k + e]!;
            scores.push(slopes[h]! * j + dot / Math.sqrt(d));
          }
          const mx = Math.max(...scores);
          const ex = scores.map((sc) => Math.exp(sc - mx));
          const sum = ex.reduce((a, b) => a + b, 0);
          for (let j = 0; j <= pos; j++) {
            const v = at(off, j, h);
            for (let e = 0; e < d; e++) out[(start + i) * heads * d + h * d + e] += (ex[j]! / sum) * vCache[v + e]!;
          }
        }
      }
    }
    return out;
  }

  /** Random data for a ragged batch over a shuffled pool of blocks: spec rows are (tokenStart, numNew, pastLen). */
  function raggedBatch(spec: readonly (readonly [number, number, number])[], blockSize: number, numBlocks: number) {
    const pool = Array.from({ length: numBlocks }, (_, i) => i);
    const shuffle = rng(5);
    for (let i = pool.length - 1; i > 0; i--) {
      const k = Math.floor(shuffle() * (i + 1));
      [pool[i], pool[k]] = [pool[k]!, pool[i]!];
    }
    const seqs = new Int32Array(spec.length * 4);
    const tableList: number[] = [];
    spec.forEach(([start, numNew, past], i) => {
      seqs.set([start, numNew, past, tableList.length], 4 * i);
      for (let b = 0; b < Math.ceil((past + numNew) / blockSize); b++) tableList.push(pool.pop()!);
    });
    return { seqs, table: Int32Array.from(tableList) };
  }

  /**
   * A KV cache of `dtype` filled from fp32 values: the array the addon takes (16-bit caches hold the
   * rounded bits) and how the reference reads an entry and rounds a stored one.
   */
  const kvFormats = {
    fp32: { code: DTypeCode.f32, make: (x: Float32Array) => x, read: (c: Float32Array | Uint16Array) => Float64Array.from(c), store: (x: number) => Math.fround(x) },
    fp16: {
      code: DTypeCode.f16,
      make: (x: Float32Array) => Uint16Array.from(x, float32ToFloat16),
      read: (c: Float32Array | Uint16Array) => Float64Array.from(c, f16ToNumber),
      store: (x: number) => f16ToNumber(float32ToFloat16(x)),
    },
    bf16: {
      code: DTypeCode.bf16,
      make: (x: Float32Array) => Uint16Array.from(x, float32ToBfloat16),
      read: (c: Float32Array | Uint16Array) => Float64Array.from(c, bf16ToNumber),
      store: (x: number) => bf16ToNumber(float32ToBfloat16(x)),
    },
  } as const;

  function checkAgainstReference(
    label: string,
    spec: readonly (readonly [number, number, number])[],
    heads: number,
    d: number,
    blockSize: number,
    numBlocks: number,
    kvDtypes: readonly KVDType[] = ["fp32", "fp16", "bf16"],
  ) {
    const numTokens = spec.reduce((n, [, numNew]) => n + numNew, 0);
    const { seqs, table } = raggedBatch(spec, blockSize, numBlocks);
    const slopes = Float32Array.from({ length: heads }, (_, h) => 2 ** ((-8 * (h + 1)) / heads));
    for (const kv of kvDtypes) {
      const format = kvFormats[kv];
      for (const variant of variants) {
        addon.setKernelVariant(variant);
        const qkv = randomF32(numTokens * heads * 3 * d, 31, 2);
        const kCache = format.make(randomF32(numBlocks * heads * blockSize * d, 32));
        const vCache = format.make(randomF32(numBlocks * heads * blockSize * d, 33));
        // The reference attends over exactly what the cache holds: 16-bit entries widened, and the
        // new keys and values rounded (to nearest even) as they are appended.
        const kRef = format.read(kCache), vRef = format.read(vCache);
        const want = referenceAttention(qkv, heads, d, kRef, vRef, blockSize, seqs, table, slopes, numTokens, format.store);
        const out = new Float32Array(numTokens * heads * d);
        addon.attention(out, qkv, numTokens, heads, d, kCache, vCache, blockSize, seqs, table, slopes, format.code);
        assert.deepEqual(format.read(kCache), kRef, `${variant} ${kv}: k cache after append`);
        assert.deepEqual(format.read(vCache), vRef, `${variant} ${kv}: v cache after append`);
        let worst = 0;
        for (let i = 0; i < out.length; i++) {
          // Outputs are convex combinations of |v| <= 1: softmax weights carry a relative error of
          // a few ulps per score (|score| < ~50 here) plus the d-term dot products.
          const diff = Math.abs(out[i]! - want[i]!);
          assert.ok(diff <= 2e-5, `${variant} ${kv} attention out[${i}] = ${out[i]} vs ${want[i]}`);
          worst = Math.max(worst, diff);
        }
        console.log(`  attention ${label} heads=${heads} d=${d} blockSize=${blockSize} kv ${kv} ${variant}: max |diff| ${worst.toExponential(2)}`);
      }
    }
    addon.setKernelVariant(initialVariant);
  }

  // Decoding batches (one new token per sequence) go through the one-pass kernel: head groups of
  // one sequence (batch 1: the heads are split among the threads), of all heads (many sequences),
  // groups that do not divide the heads, a first token, ends inside and at the end of a block.
  for (const [heads, d, blockSize, spec] of [
    [16, 64, 16, [[0, 1, 100]]],
    [6, 24, 16, [[0, 1, 0], [1, 1, 15], [2, 1, 16], [3, 1, 40], [4, 1, 100]]],
    [5, 16, 8, [[0, 1, 30], [1, 1, 7]]],
    [2, 128, 16, [[0, 1, 33], [1, 1, 64], [2, 1, 5]]],
    [4, 80, 4, [[0, 1, 21]]],
    // Long caches are split into ranges of 128 keys merged after: 176 blocks of 4 in 5 ranges;
    // split (26 and 17 blocks of 16) and unsplit sequences in one batch.
    [4, 32, 4, [[0, 1, 700]]],
    [3, 16, 16, [[0, 1, 400], [1, 1, 5], [2, 1, 260], [3, 1, 255]]],
  ] as const) {
    test(`decoding batch (${spec.length} sequences) matches the fp64 reference (heads ${heads}, headDim ${d}, blockSize ${blockSize})`, () => {
      checkAgainstReference("decode", spec, heads, d, blockSize, Math.max(48, spec.reduce((n, [, , past]) => n + Math.ceil((past + 1) / blockSize), 0)));
    });
  }

  for (const [heads, d, blockSize] of [
    [3, 12, 4],
    [4, 64, 16], // 8-key groups within blocks, one 64-wide value pass
    [2, 128, 16], // two value passes
    [3, 24, 8], // a partial value pass
  ] as const) {
    test(`ragged batch over a paged cache matches the fp64 reference (heads ${heads}, headDim ${d}, blockSize ${blockSize})`, () => {
      // Four sequences (tokenStart, numNew, pastLen): a prefill of 6 after nothing, one decode
      // token after 9, three tokens after 2, two tokens after 37 (several blocks of keys). Each
      // sequence's blocks come from a shuffled pool, so block tables are not contiguous.
      checkAgainstReference("ragged", [[0, 6, 0], [6, 1, 9], [7, 3, 2], [10, 2, 37]], heads, d, blockSize, 40);
    });
  }

  // Sequences with 16 or more new tokens (prefills) take the tiled kernel (AVX2): tiles of 6
  // queries and their ragged last tile, a prefill after nothing and after a cached prefix, beside a
  // decode token and a short chunk; head dims of 8, 24 (16 + 8) and 64, chunks of 16 keys across
  // blocks of 4, 8 and 16.
  for (const [heads, d, blockSize] of [
    [2, 64, 16],
    [3, 24, 8],
    [4, 8, 4],
  ] as const) {
    test(`prefills in tiles match the fp64 reference (heads ${heads}, headDim ${d}, blockSize ${blockSize})`, () => {
      checkAgainstReference("prefill", [[0, 70, 0], [70, 1, 12], [71, 45, 37], [116, 3, 5], [119, 16, 0], [135, 17, 3]], heads, d, blockSize, 64);
    });
  }

  test("decoding attention gives the same bits with 1, 2 and 3 threads (long caches split by length, not by threads)", () => {
    const [heads, d, blockSize] = [4, 64, 16];
    const spec = [[0, 1, 900], [1, 1, 40], [2, 1, 300]] as const;
    const { seqs, table } = raggedBatch(spec, blockSize, 90);
    const slopes = Float32Array.from({ length: heads }, (_, h) => 2 ** ((-8 * (h + 1)) / heads));
    const qkv = randomF32(spec.length * heads * 3 * d, 41, 2);
    const outputs = [1, 2, 3].map((threads) => {
      addon.setThreads(threads);
      const kCache = randomF32(90 * heads * blockSize * d, 42), vCache = randomF32(90 * heads * blockSize * d, 43);
      const out = new Float32Array(spec.length * heads * d);
      addon.attention(out, qkv, spec.length, heads, d, kCache, vCache, blockSize, seqs, table, slopes);
      return out;
    });
    addon.setThreads(initialThreads);
    assert.deepEqual(outputs[1], outputs[0]);
    assert.deepEqual(outputs[2], outputs[0]);
  });

  test("a KV cache of the wrong array type for its dtype, or an unknown dtype, is refused by name", () => {
    const [heads, d, blockSize] = [2, 8, 4];
    const qkv = new Float32Array(3 * heads * d), out = new Float32Array(heads * d);
    const seqs = Int32Array.from([0, 1, 0, 0]), table = Int32Array.from([0]), slopes = new Float32Array(heads);
    const call = (k: Float32Array | Uint16Array, v: Float32Array | Uint16Array, code?: number) => () =>
      addon.attention(out, qkv, 1, heads, d, k, v, blockSize, seqs, table, slopes, code);
    const f32 = () => new Float32Array(heads * blockSize * d), u16 = () => new Uint16Array(heads * blockSize * d);
    assert.throws(call(u16(), u16()), /attention: kCache \(fp32: a Float32Array\): wrong typed array type/);
    assert.throws(call(f32(), f32(), DTypeCode.f16), /attention: kCache \(fp16\/bf16: a Uint16Array\): wrong typed array type/);
    assert.throws(call(u16(), f32(), DTypeCode.bf16), /attention: vCache \(fp16\/bf16: a Uint16Array\)/);
    assert.throws(call(u16(), u16(), DTypeCode.i8), /attention: kvDtype must be F32, F16 or BF16/);
    assert.throws(call(u16(), u16(), 9), /attention: kvDtype: unknown dtype code 9/);
    assert.doesNotThrow(call(u16(), u16(), DTypeCode.bf16));
  });
});
