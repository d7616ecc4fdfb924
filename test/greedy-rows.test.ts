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
  }
});
