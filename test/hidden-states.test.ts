/**
 * Layer-by-layer comparison with the golden hidden states, on every backend and kernel variant:
 * the native AVX2 kernels, the native scalar reference kernels, and the pure-TypeScript reference
 * backend. When logits drift, this names the first layer that diverges.
 */
import assert from "node:assert/strict";
import { describe, test } from "node:test";
import { native } from "../src/backend/native.js";
import { ReferenceBackend } from "../src/backend/reference.js";
import { loadEngine } from "../src/engine/load.js";
import { fixtureDir, fixtureNames, Golden, logitTolerance, maxAbsDiff } from "./helpers/fixtures.js";

const variants = [
  { label: "native avx2", kernels: "avx2" as const, reference: false },
  { label: "native scalar", kernels: "scalar" as const, reference: false },
  { label: "TypeScript reference", kernels: "auto" as const, reference: true },
];

for (const name of fixtureNames) {
  describe(`${name} hidden states`, () => {
    for (const v of variants) {
      test(v.label, (t) => {
        if (v.kernels === "avx2" && !native().cpuInfo().avx2) return t.skip("CPU without AVX2");
        native().setKernelVariant(v.kernels);
        const golden = new Golden(name);
        const loaded = loadEngine(fixtureDir(name), { kvCacheTokens: 256, ...(v.reference ? { backend: new ReferenceBackend() } : {}) });
        try {
          const c = golden.manifest.cases.single;
          const H = loaded.model.config.hiddenSize, T = c.input_ids.length;
          const hidden = golden.tensor(`single.hidden_states`).data; // [n_layer+2, T, H]
          const seen = new Map<number, Float32Array>();
          loaded.model.onIntermediate = (stage, layer, values) => {
            if (stage === "word_embeddings_layernorm") seen.set(0, values.slice());
            if (stage === "block_out") seen.set(layer + 1, values.slice());
            if (stage === "ln_f") seen.set(loaded.model.config.numLayers + 1, values.slice());
          };
          const seq = loaded.engine.createSequence();
          const [logits] = loaded.engine.step([{ sequence: seq, tokens: c.input_ids, logits: "all" }]);
          for (let k = 0; k < loaded.model.config.numLayers + 2; k++) {
            const got = seen.get(k)!;
            const expected = hidden.subarray(k * T * H, (k + 1) * T * H);
            let worst = 0;
            for (let i = 0; i < got.length; i++) {
              const excess = Math.abs(got[i]! - expected[i]!) - (5e-4 + 5e-5 * Math.abs(expected[i]!));
              worst = Math.max(worst, excess);
            }
            const stage = k === 0 ? "embedding layernorm" : k <= loaded.model.config.numLayers ? `block ${k - 1}` : "ln_f";
            assert.ok(worst <= 0, `${stage} is the first to diverge (by ${worst} beyond atol 5e-4 + rtol 5e-5)`);
          }
          const diff = maxAbsDiff(logits!, golden.tensor(c.logits).data);
          assert.ok(diff <= logitTolerance(name), `logits max |diff| ${diff}`);
        } finally {
          loaded.dispose();
          golden.dispose();
          native().setKernelVariant("auto");
        }
      });
    }
  });
}
