/**
 * Strategy "replicas": several engine workers over one shared mapping of the weights give the
 * same greedy text as one engine, spread a batch over the workers, and map each weight file once.
 */
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { describe, test } from "node:test";
import { defaultKvCacheTokens } from "../src/engine/kv-cache.js";
import { loadModel } from "../src/index.js";
import { startServer } from "../src/server/server.js";
import { fixtureDir, Golden, maxAbsDiff } from "./helpers/fixtures.js";
import { get, post } from "./helpers/http-client.js";

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

  test("server: one sequence must fit one replica's cache (the limits say so); the default cache is shared out", async () => {
    const server = await startServer({ model: fixtureDir("tiny-bloom-a"), port: 0, strategy: "replicas", kvCacheTokens: 256, modelOptions: { replicas: 2 } });
    try {
      await server.ready;
      const info = (await get(`${server.url}/info`)).body;
      assert.equal(info.kv_cache_tokens, 512, "two caches of 256");
      assert.equal(info.max_total_tokens, 256, "a sequence lives in one of them");
      const refused = await post(`${server.url}/generate`, { inputs: [5, 6, 7].map(String).join(" "), parameters: { max_new_tokens: 300 } });
      assert.equal(refused.status, 422, JSON.stringify(refused.body));
      assert.match(refused.body.error, /must be <= 256/);
      const ok = await post(`${server.url}/generate`, { inputs: "5 6 7", parameters: { max_new_tokens: 200 } });
      assert.equal(ok.status, 200, JSON.stringify(ok.body));
    } finally {
      await server.close();
    }
    // Without --kv-cache-tokens, each of n replicas takes 1/n of the one-engine default (a quarter of
    // free memory); each replica got it, and they are equal.
    const bloom560mPerToken = 24 * 2 * 1024 * 4;
    const free = 16 * 2 ** 30;
    assert.equal(defaultKvCacheTokens(bloom560mPerToken, 1, free), 21845);
    assert.equal(defaultKvCacheTokens(bloom560mPerToken, 3, free), 7281);
    assert.equal(defaultKvCacheTokens(bloom560mPerToken, 8, free), 4096, "at least 4096");
    const model = await loadModel(fixtureDir("tiny-bloom-a"), { strategy: "replicas", replicas: 3 });
    try {
      const stats = await model.stats();
      assert.equal(stats.kvBlocksTotal * stats.kvBlockSize, model.info.kvCacheTokens);
      assert.equal(model.info.kvCacheTokens % (3 * 16), 0, "three equal caches of whole blocks");
    } finally {
      await model.dispose();
    }
  });
});
