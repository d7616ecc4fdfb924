/**
 * Pipeline placement with offload: layers on "cpu" and "disk" give exactly the logits of the
 * fully resident model (same kernels, same bytes), with and without conversion to another dtype,
 * and with and without read-ahead; resident layers may be in column panels beside row-major disk
 * layers; the offload figures are reported; bad budgets fail clearly.
 */
import assert from "node:assert/strict";
import { mkdtempSync, readdirSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { describe, test } from "node:test";
import { loadEngine, type EngineOptions } from "../src/engine/load.js";
import { BlossomError, loadModel } from "../src/index.js";
import { fixtureDir, Golden, maxAbsDiff } from "./helpers/fixtures.js";

const dir = fixtureDir("trained-bloom-small");

/** Prompt logits, then 6 greedy steps with the KV cache. */
function run(options: EngineOptions): { logits: Float32Array; tokens: number[]; loaded: ReturnType<typeof loadEngine> } {
  const loaded = loadEngine(dir, { kvCacheTokens: 256, ...options });
  const seq = loaded.engine.createSequence();
  const prompt = [300, 262, 345, 392, 325, 694, 48];
  const [l] = loaded.engine.step([{ sequence: seq, tokens: prompt, logits: "all" }]);
  const logits = l!.slice();
  const tokens = [...prompt];
  for (let k = 0; k < 6; k++) {
    const [next] = loaded.engine.step([{ sequence: seq, tokens: [tokens[tokens.length - 1]!], logits: "last" }]);
    let best = 0;
    for (let i = 1; i < next!.length; i++) if (next![i]! > next![best]!) best = i;
    tokens.push(best);
  }
  return { logits, tokens, loaded };
}

describe("pipeline offload", () => {
  const resident = run({});
  resident.loaded.dispose();

  for (const [label, maxMemory] of [
    ["everything on disk", "cpu:1MB,disk"],
    ["some layers resident, the rest on disk", "0:6MB,cpu:1MB,disk"],
    ["two compute devices (pinned thread pools), cpu and disk", "0:5MB,1:3MB,cpu:1MB,disk"],
  ] as const) {
    test(`${label}: identical logits and tokens, with and without read-ahead`, () => {
      for (const prefetch of [true, false]) {
        const r = run({ pipeline: { maxMemory, placement: "sequential", prefetch, evictPageCache: true } });
        try {
          assert.equal(maxAbsDiff(r.logits, resident.logits), 0);
          assert.deepEqual(r.tokens, resident.tokens);
          const stats = r.loaded.weights.offloadStats!();
          assert.ok(stats.diskLayers >= 1);
          // 7 forward steps, each reading every disk layer once (plus reads queued ahead).
          assert.ok(stats.reads >= 7 * stats.diskLayers, JSON.stringify(stats));
          assert.ok(stats.bytesRead > 0 && stats.readSeconds > 0);
          assert.ok(stats.stagingBytes > 0);
        } finally {
          r.loaded.dispose();
        }
      }
    });
  }

  test("resident layers in column panels beside offloaded row-major ones: the resident model's logits and tokens", () => {
    const r = run({
      linearPanels: { width: 100, above: 100, dtypes: ["f32", "f16", "bf16"] },
      pipeline: { maxMemory: "0:6MB,cpu:1MB,disk", placement: "sequential", prefetch: true, evictPageCache: true },
    });
    try {
      const w = r.loaded.weights;
      const panelled = Array.from({ length: w.numLayers }, (_, i) => {
        const k = (w.layer(i).dense4hToH.weight as { panelK?: number }).panelK ?? 0;
        w.releaseLayer(i);
        return k;
      });
      assert.ok(panelled.some((k) => k === 100), `no resident layer in panels: ${panelled}`);
      assert.ok(panelled.some((k) => k === 0), `no offloaded layer row-major: ${panelled}`);
      // Same weights, other summation order in the panelled layers: fp32 rounding only.
      assert.ok(maxAbsDiff(r.logits, resident.logits) <= 1e-4, `max |diff| ${maxAbsDiff(r.logits, resident.logits)}`);
      assert.deepEqual(r.tokens, resident.tokens);
    } finally {
      r.loaded.dispose();
    }
  });

  test("offloading as another dtype writes converted weights to the offload folder", () => {
    const folder = mkdtempSync(join(tmpdir(), "blossom-offload-"));
    try {
      const fp32 = run({ dtype: "fp32" });
      fp32.loaded.dispose();
      const r = run({ dtype: "fp32", pipeline: { maxMemory: "cpu:1MB,disk", placement: "sequential", offloadFolder: folder } });
      try {
        assert.equal(maxAbsDiff(r.logits, fp32.logits), 0);
        assert.deepEqual(r.tokens, fp32.tokens);
        const files = readdirSync(folder);
        // Named by dtype and source, so processes sharing the folder with other models or dtypes never read each other's files.
        assert.ok(files.some((f) => /^word_embeddings\.f32\.[0-9a-f]{12}\.bin$/.test(f)) && files.some((f) => /^h\.3\.dense4hToH\.f32\.[0-9a-f]{12}\.bin$/.test(f)), files.join(", "));
        // Another dtype in the same folder writes files of its own.
        const r16 = run({ dtype: "fp16", pipeline: { maxMemory: "cpu:1MB,disk", placement: "sequential", offloadFolder: folder } });
        try {
          const fp16 = run({ dtype: "fp16" });
          assert.equal(maxAbsDiff(r16.logits, fp16.logits), 0);
          fp16.loaded.dispose();
          assert.ok(readdirSync(folder).some((f) => /^h\.3\.dense4hToH\.f16\.[0-9a-f]{12}\.bin$/.test(f)));
          // And the fp32 model, whose files were written first and are read lazily, still reads its own.
          const again = run({ dtype: "fp32", pipeline: { maxMemory: "cpu:1MB,disk", placement: "sequential", offloadFolder: folder } });
          assert.equal(maxAbsDiff(again.logits, fp32.logits), 0);
          again.loaded.dispose();
        } finally {
          r16.loaded.dispose();
        }
      } finally {
        r.loaded.dispose();
      }
      assert.throws(
        () => loadEngine(dir, { dtype: "fp32", pipeline: { maxMemory: "cpu:1MB,disk", placement: "sequential" } }),
        (err: unknown) => err instanceof BlossomError && /needs --offload-folder/.test(err.message),
      );
    } finally {
      rmSync(folder, { recursive: true, force: true });
    }
  });

  test("budgets that cannot hold the model without disk fail naming the module", () => {
    assert.throws(
      () => loadEngine(dir, { pipeline: { maxMemory: "0:3MB,cpu:1MB", placement: "sequential" } }),
      (err: unknown) => err instanceof BlossomError && err.code === "memory" && /cannot place word_embeddings \(2\.0 MiB\)/.test(err.message),
    );
  });

  test("through loadModel: golden logits and greedy text with strategy pipeline, offload figures in stats()", async () => {
    const golden = new Golden("trained-bloom-small");
    const model = await loadModel(dir, { strategy: "pipeline", maxMemory: "0:5MB,cpu:1MB,disk", placement: "balanced" });
    try {
      const c = golden.manifest.cases.single;
      const out = await model.forward([c.input_ids]);
      assert.ok(maxAbsDiff(out.data, golden.tensor(c.logits).data) <= 2e-4);
      const g = golden.manifest.cases.greedy.prompts[0]!;
      const r = await model.generate([g.prompt_ids], { maxNewTokens: 20 });
      assert.deepEqual(r.tokenIds[0], g.new_ids);
      const stats = await model.stats();
      assert.ok(stats.offload && stats.offload.reads > 0, JSON.stringify(stats));
    } finally {
      await model.dispose();
      golden.dispose();
    }
    await assert.rejects(loadModel(dir, { strategy: "pipeline" }), /maxMemory: strategy "pipeline" needs per-device budgets/);
    await assert.rejects(loadModel(dir, { maxMemory: "cpu:1GB" }), /only applies to strategy "pipeline"/);
  });
});
