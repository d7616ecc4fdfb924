/**
 * Strategy "replicas": several engine workers over one shared mapping of the weights give the
 * same greedy text as one engine, spread a batch over the workers, and map each weight file once.
 */
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { describe, test } from "node:test";
import { loadModel } from "../src/index.js";
import { fixtureDir, Golden, maxAbsDiff } from "./helpers/fixtures.js";

/** How many mappings of `file` this process holds (/proc/self/maps). */
function mappingsOf(file: string): number {
  return readFileSync("/proc/self/maps", "utf8").split("\n").filter((l) => l.endsWith(file)).length;
}

describe("replicas", () => {
  test("three workers: same greedy tokens as one engine, golden logits, one mapping of the weights", async () => {
    const dir = fixtureDir("trained-bloom-small");
    const golden = new Golden("trained-bloom-small");
    const prompts = golden.manifest.cases.greedy.prompts;
    const single = await loadModel(dir);
    const expected = await single.generate(prompts.map((p) => p.prompt_ids), { maxNewTokens: 20 });
    await single.dispose();

    const model = await loadModel(dir, { strategy: "replicas", replicas: 3 });
    try {
      assert.equal(model.info.replicas, 3);
      // Each worker mapped the checkpoint, yet the process holds one mapping of it.
      assert.equal(mappingsOf(join(dir, "model.safetensors")), 1);
      const r = await model.generate([...prompts, ...prompts].map((p) => p.prompt_ids), { maxNewTokens: 20 });
      assert.deepEqual(r.tokenIds, [...expected.tokenIds, ...expected.tokenIds]);
      prompts.forEach((p, i) => assert.deepEqual(r.tokenIds[i], p.new_ids));
      const stats = await model.stats();
      assert.equal(stats.generatedTokens, 20 * 2 * prompts.length);
      assert.equal(stats.running, 0);
      // Forward and sessions go through whichever worker holds them.
      const c = golden.manifest.cases.padded_batch;
      const out = await model.forward(c.input_ids, c.attention_mask);
      const V = model.config.vocabSize, T = c.input_ids[0]!.length;
      const last = (b: number) => (b * T + T - 1) * V;
      const gold = golden.tensor(c.logits).data;
      for (let b = 0; b < 3; b++) assert.ok(maxAbsDiff(out.data, gold, last(b), last(b), V) <= 2e-4);
    } finally {
      await model.dispose();
      golden.dispose();
    }
    assert.equal(mappingsOf(join(dir, "model.safetensors")), 0);
  });
});
