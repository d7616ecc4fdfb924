/** The native batched greedy choice agrees with the TypeScript chooser: ids exactly, logprobs closely. */
import assert from "node:assert/strict";
import { describe, test } from "node:test";
import { native } from "../src/backend/native.js";
import { TokenChooser } from "../src/generate/chooser.js";
import { defaultGenerationParams } from "../src/generate/params.js";

describe("greedyRows", () => {
  for (const variant of ["avx2", "scalar"] as const) {
    test(`${variant}: argmax with lowest-id ties, eos masked during min_new_tokens, log-softmax`, (t) => {
      if (variant === "avx2" && !native().cpuInfo().avx2) return t.skip("no AVX2");
      native().setKernelVariant(variant);
      try {
        const vocab = 5003, rows = 7, stride = 5010;
        let seed = 99;
        const rand = () => ((seed = (seed * 1664525 + 1013904223) >>> 0) / 2 ** 32);
        const logits = new Float32Array(rows * stride).map(() => (rand() - 0.5) * 20);
        // Row 1: a tie for the maximum (the lower id wins). Row 2: eos is the maximum but masked.
        logits[1 * stride + 10] = 50;
        logits[1 * stride + 4000] = 50;
        logits[2 * stride + 2] = 60;
        const maskRows = Uint8Array.from([0, 0, 1, 0, 1, 0, 0]);
        const ids = new Int32Array(rows), logprobs = new Float64Array(rows);
        native().greedyRows(logits, rows, stride, vocab, Int32Array.of(2), maskRows, ids, logprobs);
        for (let r = 0; r < rows; r++) {
          const chooser = new TokenChooser({ ...defaultGenerationParams, minNewTokens: maskRows[r] ? 5 : 0 }, { vocabSize: vocab, eosTokenIds: [2] });
          const expected = chooser.next(logits.slice(r * stride, r * stride + vocab), [1], 0);
          assert.equal(ids[r], expected.tokenId, `row ${r}`);
          assert.ok(Math.abs(logprobs[r]! - expected.logprob) < 1e-5 * Math.max(1, Math.abs(expected.logprob)), `row ${r}: ${logprobs[r]} vs ${expected.logprob}`);
        }
        assert.equal(ids[1], 10);
        assert.notEqual(ids[2], 2);
        // A NaN anywhere: no decision (the scheduler then lets the chooser report the bad logits).
        const bad = Float32Array.from({ length: 40 }, (_, i) => i);
        bad[17] = NaN;
        native().greedyRows(bad, 1, 40, 40, new Int32Array(0), Uint8Array.of(0), ids, logprobs);
        assert.equal(ids[0], -1);
        assert.ok(Number.isNaN(logprobs[0]));
      } finally {
        native().setKernelVariant("auto");
      }
    });

    test(`${variant}: rows longer than a block (16384): ties across blocks, masks, NaN, +inf; any thread count, same bits`, (t) => {
      if (variant === "avx2" && !native().cpuInfo().avx2) return t.skip("no AVX2");
      native().setKernelVariant(variant);
      const threads = native().getThreads();
      try {
        const vocab = 50_000, rows = 6;
        let seed = 7;
        const rand = () => ((seed = (seed * 1664525 + 1013904223) >>> 0) / 2 ** 32);
        const base = new Float32Array(rows * vocab).map(() => (rand() - 0.5) * 30);
        base[0 * vocab + 40_000] = 40; // row 0: the maximum in the third block
        base[1 * vocab + 20_000] = 45; // row 1: a tie across blocks, the lower id wins
        base[1 * vocab + 45_000] = 45;
        base[2 * vocab + 2] = 60; // row 2: eos is the maximum, masked; the first block all -inf otherwise too
        for (let i = 3; i < 16384; i++) base[2 * vocab + i] = -Infinity;
        base[3 * vocab + 49_999] = NaN; // row 3: a NaN in the last block, no decision
        base[4 * vocab + 30_000] = Infinity; // row 4: +inf, no decision
        const maskRows = Uint8Array.from([0, 0, 1, 0, 0, 1]);
        const results: { ids: Int32Array; logprobs: Float64Array }[] = [];
        for (const n of [1, 2, 3]) {
          native().setThreads(n);
          const logits = base.slice();
          const ids = new Int32Array(rows), logprobs = new Float64Array(rows);
          native().greedyRows(logits, rows, vocab, vocab, Int32Array.of(2), maskRows, ids, logprobs);
          results.push({ ids, logprobs });
        }
        for (const r of results.slice(1)) {
          assert.deepEqual(r.ids, results[0]!.ids);
          assert.deepEqual(Array.from(r.logprobs, (x) => (Number.isNaN(x) ? "NaN" : x)), Array.from(results[0]!.logprobs, (x) => (Number.isNaN(x) ? "NaN" : x)));
        }
        const { ids, logprobs } = results[0]!;
        assert.equal(ids[0], 40_000);
        assert.equal(ids[1], 20_000);
        assert.notEqual(ids[2], 2);
        assert.equal(ids[3], -1);
        assert.ok(Number.isNaN(logprobs[3]));
        assert.equal(ids[4], -1);
        for (const r of [0, 1, 2, 5]) {
          const chooser = new TokenChooser({ ...defaultGenerationParams, minNewTokens: maskRows[r] ? 5 : 0 }, { vocabSize: vocab, eosTokenIds: [2] });
          const expected = chooser.next(base.slice(r * vocab, (r + 1) * vocab), [1], 0);
          assert.equal(ids[r], expected.tokenId, `row ${r}`);
          assert.ok(Math.abs(logprobs[r]! - expected.logprob) < 1e-5 * Math.max(1, Math.abs(expected.logprob)), `row ${r}: ${logprobs[r]} vs ${expected.logprob}`);
        }
      } finally {
        native().setThreads(threads);
        native().setKernelVariant("auto");
      }
    });
  }
});
