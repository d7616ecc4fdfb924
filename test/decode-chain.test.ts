/**
 * Batch-1 decoding runs each layer's ops between two attention calls as one chain (BloomModel's
 * chainedDecode, native run_chain): the same arithmetic as the ops one by one, so the logits must
 * agree bit for bit, on every fixture, with the fast kernels and the scalar ones.
 */
import assert from "node:assert/strict";
import { availableParallelism } from "node:os";
import { test } from "node:test";
import type { OpChain } from "../src/backend/backend.js";
import { CpuBackend, type CpuMatrix } from "../src/backend/cpu.js";
import { native } from "../src/backend/native.js";
import { loadEngine, type EngineOptions, type LoadedEngine } from "../src/engine/load.js";
import { fixtureDir, fixtureNames, type FixtureName } from "./helpers/fixtures.js";

/** Logits of a prompt (6 tokens unless given), then of 12 decode steps, one token each. */
function decodeLogits(loaded: LoadedEngine, prompt = [5, 6, 7, 8, 9, 10]): Float32Array[] {
  const { engine } = loaded;
  const seq = engine.createSequence();
  const out = [engine.step([{ sequence: seq, tokens: prompt, logits: "last" }])[0]!.slice()];
  for (let i = 0; i < 12; i++) out.push(engine.step([{ sequence: seq, tokens: [11 + 3 * i], logits: "last" }])[0]!.slice());
  engine.freeSequence(seq);
  return out;
}

/**
 * Loads `name` twice with `options`, one copy decoding through the chain and one op by op, and
 * asserts the chain was built and every step's logits agree bit for bit. `check` looks at the
 * chained copy first.
 */
function assertChainMatches(name: FixtureName, options: EngineOptions, label: string, prompt?: number[], check?: (chained: LoadedEngine) => void): void {
  const chained = loadEngine(fixtureDir(name), options);
  const single = loadEngine(fixtureDir(name), options);
  single.model.chainDecode = false;
  try {
    check?.(chained);
    const a = decodeLogits(chained, prompt), b = decodeLogits(single, prompt);
    assert.ok((chained.model as unknown as { decodeChain: unknown }).decodeChain, `${label}: the chain was used`);
    a.forEach((row, step) => assert.deepEqual(row, b[step], `${label}, step ${step}`));
  } finally {
    chained.dispose();
    single.dispose();
  }
}

for (const variant of ["auto", "scalar"] as const) {
  test(`chained decode steps give the same logits as the ops one by one, bit for bit (${variant} kernels)`, () => {
    native().setKernelVariant(variant);
    try {
      for (const name of fixtureNames) assertChainMatches(name, { kvCacheTokens: 256 }, name);
    } finally {
      native().setKernelVariant("auto");
    }
  });
}

// Matrices in column panels of 40 inputs (the last one ragged: 64, 96, 128 and 256 are not multiples
// of 40), as bloom-1b7 and up keep their long rows: the chain runs the panels in its own job.
const panels = { linearPanels: { width: 40, above: 40, dtypes: ["f32", "f16", "bf16"] as ("f32" | "f16" | "bf16")[] } };

test("chained decode steps with matrices in column panels give the same logits as the ops one by one, bit for bit", () => {
  for (const name of fixtureNames) {
    assertChainMatches(name, { kvCacheTokens: 256, ...panels }, name, undefined, (chained) =>
      assert.ok((chained.weights.layer(0).dense4hToH.weight as CpuMatrix).panelK, `${name}: the weights are in panels`),
    );
  }
});

test("a linear in column panels runs in the chain's one job (it ran op by op), with linear()'s bits", () => {
  const loaded = loadEngine(fixtureDir("trained-bloom-small"), { kvCacheTokens: 64, ...panels });
  try {
    const backend = loaded.backend as CpuBackend;
    const layer = loaded.weights.layer(1);
    const H = loaded.checkpoint.config.hiddenSize;
    const x = Float32Array.from({ length: 4 * H }, (_, i) => Math.sin(i * 0.37));
    const residual = Float32Array.from({ length: H }, (_, i) => Math.cos(i * 0.11));
    const up = new Float32Array(4 * H);
    // h_to_4h with GELU (bias, no residual), then 4h_to_h with bias and residual: both in panels.
    const ops = [
      { kind: "linear" as const, y: up, x: x.subarray(0, H), weight: layer.denseHTo4h.weight, bias: layer.denseHTo4h.bias, gelu: true },
      { kind: "linear" as const, y: new Float32Array(H), x: up, weight: layer.dense4hToH.weight, bias: layer.dense4hToH.bias, residual },
    ];
    const fused = backend.runChain(backend.chain(ops)!);
    const threads = native().cpuInfo().physicalCores;
    assert.equal(fused, threads > 1 && availableParallelism() >= threads, "one job wherever the pool has several threads and the CPUs for them");
    const up2 = new Float32Array(4 * H), down2 = new Float32Array(H);
    backend.linear(up2, x.subarray(0, H), 1, layer.denseHTo4h.weight, layer.denseHTo4h.bias, { gelu: true });
    backend.linear(down2, up2, 1, layer.dense4hToH.weight, layer.dense4hToH.bias, { residual });
    assert.deepEqual(up, up2);
    assert.deepEqual(ops[1]!.y, down2);
  } finally {
    loaded.dispose();
  }
});

for (const dtype of ["int8", "int8-mixed"] as const) {
  test(`chained decode steps in ${dtype} give the same logits as the ops one by one, bit for bit`, () => {
    for (const name of fixtureNames) assertChainMatches(name, { kvCacheTokens: 256, dtype }, `${name} ${dtype}`);
  });
}

test("int8-mixed with many outlier features (linearInt8's float path) chained matches the ops one by one too", () => {
  assertChainMatches("trained-bloom-small", { kvCacheTokens: 256, dtype: "int8-mixed", int8Threshold: 0.25 }, "threshold 0.25");
});

test("an int8 linear runs in the chain's one job (int8 steps ran op by op), with linearInt8's bits", () => {
  for (const dtype of ["int8", "int8-mixed"] as const) {
    const loaded = loadEngine(fixtureDir("trained-bloom-small"), { kvCacheTokens: 64, dtype });
    try {
      const backend = loaded.backend as CpuBackend;
      const layer = loaded.weights.layer(1);
      const H = loaded.checkpoint.config.hiddenSize;
      const x = Float32Array.from({ length: H }, (_, i) => 3 * Math.sin(i * 0.37));
      const residual = Float32Array.from({ length: H }, (_, i) => Math.cos(i * 0.11));
      const up = new Float32Array(4 * H), down = new Float32Array(H);
      const ops = [
        { kind: "linear" as const, y: up, x, weight: layer.denseHTo4h.weight, bias: layer.denseHTo4h.bias, gelu: true },
        { kind: "linear" as const, y: down, x: up, weight: layer.dense4hToH.weight, bias: layer.dense4hToH.bias, residual },
      ];
      assert.equal(layer.denseHTo4h.weight.dtype, "int8");
      const fused = backend.runChain(backend.chain(ops)!);
      const threads = native().cpuInfo().physicalCores;
      assert.equal(fused, threads > 1 && availableParallelism() >= threads, `${dtype}: one job wherever the pool has several threads and the CPUs for them`);
      const up2 = new Float32Array(4 * H), down2 = new Float32Array(H);
      backend.linear(up2, x, 1, layer.denseHTo4h.weight, layer.denseHTo4h.bias, { gelu: true });
      backend.linear(down2, up2, 1, layer.dense4hToH.weight, layer.dense4hToH.bias, { residual });
      assert.deepEqual(up, up2, dtype);
      assert.deepEqual(down, down2, dtype);
    } finally {
      loaded.dispose();
    }
  }
});

test("chained attention over a long cache (key ranges merged after) matches the ops one by one for every KV cache dtype", () => {
  // tiny-bloom-c: head_dim 16, so attention takes the streaming decode path the chain runs itself.
  // 300 cached tokens: attention splits the keys into ranges whose partial sums are merged (the
  // chain must make the same split and merge); the decode steps cross a cache block boundary.
  const prompt = Array.from({ length: 300 }, (_, i) => 4 + ((i * 37) % 1000));
  for (const kvDtype of ["fp32", "fp16", "bf16"] as const) {
    assertChainMatches("tiny-bloom-c", { kvCacheTokens: 512, kvDtype }, kvDtype, prompt);
  }
});

test("a chain's attention refuses a missing or bad batch before running any op", () => {
  const loaded = loadEngine(fixtureDir("tiny-bloom-a"), { kvCacheTokens: 64 });
  try {
    const backend = loaded.backend as CpuBackend;
    const { engine, model } = loaded;
    const seq = engine.createSequence();
    engine.step([{ sequence: seq, tokens: [5, 6, 7], logits: "last" }]);
    engine.step([{ sequence: seq, tokens: [8], logits: "last" }]); // a decode step builds the chain
    const m = model as unknown as { decodeChain: { chain: OpChain } };
    const { chain } = m.decodeChain;
    const cache = engine.kvCache.layer(0);
    const before = Float32Array.from(cache.k as Float32Array);
    assert.throws(() => backend.runChain(chain), /chain holds attention: give its seqs and blockTable/);
    // A block outside the cache's pool, and a position past the sequence's blocks.
    assert.throws(() => backend.runChain(chain, { seqs: Int32Array.from([0, 1, 3, 0]), blockTable: Int32Array.from([9999]) }), /refers to cache block 9999 outside the pool/);
    assert.throws(() => backend.runChain(chain, { seqs: Int32Array.from([0, 1, 40, 0]), blockTable: Int32Array.from([0]) }), /block table is shorter than its length/);
    assert.throws(() => backend.runChain(chain, { seqs: Int32Array.from([0, 2, 3, 0]), blockTable: Int32Array.from([0]) }), /describes tokens outside the batch/);
    // The op has one row: a sequence with no new token (it would write no output, and the next ops
    // read the last step's), two sequences on that row (they would race), or none at all.
    const block = seq.blocks[0]!;
    assert.throws(() => backend.runChain(chain, { seqs: Int32Array.from([0, 0, 4, 0]), blockTable: Int32Array.from([block]) }), /one sequence decoding one token/);
    assert.throws(() => backend.runChain(chain, { seqs: Int32Array.from([0, 1, 4, 0, 0, 1, 0, 1]), blockTable: Int32Array.from([block, block === 0 ? 1 : 0]) }), /one sequence decoding one token/);
    assert.throws(() => backend.runChain(chain, { seqs: new Int32Array(0), blockTable: Int32Array.from([block]) }), /one sequence decoding one token/);
    assert.deepEqual(cache.k, before, "nothing was written to the cache");
    // Descriptors: a cache of the wrong array type, a cache that is not whole blocks.
    const H = loaded.checkpoint.config.hiddenSize, heads = loaded.checkpoint.config.numHeads;
    const f16 = native().createChain.bind(native());
    const out = new Float32Array(H), qkv = new Float32Array(3 * H), slopes = new Float32Array(heads);
    assert.throws(() => f16([[2, out, qkv, new Float32Array(16), new Float32Array(16), 1, heads, H / heads, 16, slopes]]), /kCache: expected a Uint16Array/);
    assert.throws(() => f16([[2, out, qkv, new Float32Array(H * 16 + 1), new Float32Array(H * 16 + 1), 0, heads, H / heads, 16, slopes]]), /not a whole number of blocks/);
    assert.throws(() => f16([[2, out, new Float32Array(H), new Float32Array(H * 16), new Float32Array(H * 16), 0, heads, H / heads, 16, slopes]]), /out or qkv is shorter/);
  } finally {
    loaded.dispose();
  }
});

test("a chain refuses bad ops clearly, and will not run once its weights are released", () => {
  const loaded = loadEngine(fixtureDir("tiny-bloom-a"), { kvCacheTokens: 64 });
  try {
    const backend = loaded.backend as CpuBackend;
    const layer = loaded.weights.layer(0);
    const H = loaded.checkpoint.config.hiddenSize;
    const x = new Float32Array(H), y = new Float32Array(3 * H);
    const qkv = { kind: "linear" as const, y, x, weight: layer.queryKeyValue.weight, bias: layer.queryKeyValue.bias };
    assert.throws(() => backend.chain([{ ...qkv, y: new Float32Array(3) }]), /op 0: x or y is too short/);
    assert.throws(() => backend.chain([{ ...qkv, y: x, x }]), /op 0: (x or y is too short|y overlaps x)/);
    assert.throws(() => native().createChain(qkv as never), /createChain: expected an array of ops/);
    assert.throws(() => native().createChain([[7, y, x]]), /op 0: unknown kind 7/);
    const chain = backend.chain([qkv])!;
    backend.runChain(chain);
    assert.ok(y.some((v) => v !== 0));
    loaded.dispose();
    assert.throws(() => backend.runChain(chain), /weight region was released/);
  } finally {
    loaded.dispose();
  }
});

test("chains with linear() taking another path at one row (gemvMaxRows 0) still match the ops one by one", () => {
  native().setLinearTuning("gemvMaxRows", 0);
  try {
    assertChainMatches("trained-bloom-small", { kvCacheTokens: 256 }, "trained-bloom-small");
  } finally {
    native().setLinearTuning("gemvMaxRows", 2);
  }
});

test("the native chain functions refuse what would corrupt memory: other objects, moved or detached arrays, sizes that overflow", () => {
  const n = native();
  const ln = (y: Float32Array, x: Float32Array) => [0, y, x, 16, new Float32Array(16).fill(1), new Float32Array(16), 1e-5];
  // Another kind of native object where a chain or a region is expected.
  const region = n.allocate(1 << 16);
  try {
    assert.throws(() => n.runChain(region as never), /runChain: expected a chain/);
    const chain = n.createChain([ln(new Float32Array(16), new Float32Array(16))]);
    assert.throws(() => n.createChain([[1, new Float32Array(4), new Float32Array(4), chain, 0, 0, 4, 4, 0, null, 0, null]]), /weight: expected a native region/);
    assert.throws(() => n.release(chain as never), /release: expected a native region/);
    // A weight whose size overflows 64 bits of bytes is outside its region, not a wrapped small one.
    assert.throws(() => n.createChain([[1, new Float32Array(4), new Float32Array(4), region, 0, 0, 2 ** 31, 2 ** 31, 0, null, 0, null]]), /outside its region/);
    // An array released with its region (detached), transferred, or shrunk after the chain was built.
    const view = new Float32Array(n.view(region, 0, 64));
    const released = n.createChain([ln(view, new Float32Array(16))]);
    n.runChain(released);
    n.release(region);
    assert.throws(() => n.runChain(released), /detached, moved or shrunk/);
    const buffer = new ArrayBuffer(64);
    const moved = n.createChain([ln(new Float32Array(buffer), new Float32Array(16))]);
    structuredClone(buffer, { transfer: [buffer] });
    assert.throws(() => n.runChain(moved), /detached, moved or shrunk/);
    const resizable = new (ArrayBuffer as unknown as new (n: number, o: { maxByteLength: number }) => ArrayBuffer & { resize(n: number): void })(64, { maxByteLength: 128 });
    const shrunk = n.createChain([ln(new Float32Array(resizable), new Float32Array(16))]);
    n.runChain(shrunk);
    resizable.resize(16);
    assert.throws(() => n.runChain(shrunk), /detached, moved or shrunk/);
  } finally {
    n.release(region);
  }
});

test("native ops refuse sizes whose byte count overflows instead of wrapping to a small one", () => {
  const n = native();
  const region = n.allocate(1 << 16);
  try {
    const x = new Float32Array(8), y = new Float32Array(8);
    assert.throws(() => n.linear(y, x, 1, region, 0, 0, 2 ** 31, 2 ** 31, null, 0, null), /size overflows|outside the region/);
    assert.throws(() => n.linear(y, x, 2 ** 62, region, 0, 0, 4, 4, null, 0, null), /size overflows|shorter/);
    assert.throws(() => n.layerNorm(y, x, 2 ** 62, 4, x, x, 1e-5), /size overflows|shorter/);
    assert.throws(() => n.convert(region, 0, 0, region, 0, 0, 2 ** 62), /size overflows|outside the region/);
  } finally {
    n.release(region);
  }
});
