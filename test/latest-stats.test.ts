/**
 * The engine pushes its figures to the main thread while it works and when it goes idle
 * (Model.latestStats), so /metrics answers at once even while a step computes for seconds (a long
 * prompt's chunk on a CPU) instead of waiting for the worker to reach the end of it.
 */
import assert from "node:assert/strict";
import { test } from "node:test";
import { loadModel, type Model } from "../src/index.js";
import { startServer } from "../src/server/server.js";
import { fixtureDir } from "./helpers/fixtures.js";

/** Waits (a bounded number of event-loop turns) until `check` holds; returns whether it did. */
async function eventually(check: () => boolean): Promise<boolean> {
  for (let i = 0; i < 2000 && !check(); i++) await new Promise((resolve) => setTimeout(resolve, 5));
  return check();
}

test("the engine reports its figures unasked: after a generation, latestStats() has them without a stats() call", async () => {
  const model = await loadModel(fixtureDir("tiny-bloom-a"), { kvCacheTokens: 1024 });
  try {
    await model.generate(["Hello"], { maxNewTokens: 5, minNewTokens: 5 });
    assert.ok(await eventually(() => model.latestStats()?.generatedTokens === 5), `latest: ${JSON.stringify(model.latestStats())}`);
    const latest = model.latestStats()!;
    assert.equal(latest.running, 0);
    assert.equal(latest.waiting, 0);
    assert.equal(latest.kvBlocksFree, latest.kvBlocksTotal);
    // Idle: what stats() answers is what was pushed.
    const asked = await model.stats();
    assert.deepEqual({ ...asked, residentBytes: 0 }, { ...latest, residentBytes: 0 });
  } finally {
    await model.dispose();
  }
});

test("/metrics answers from the pushed figures while the engine cannot answer (a step in progress)", { timeout: 60_000 }, async () => {
  const model = await loadModel(fixtureDir("tiny-bloom-a"), { kvCacheTokens: 1024 });
  // The same model, whose worker never answers a request: as while it computes a step for seconds.
  const busy = Object.create(model) as Model;
  Object.defineProperty(busy, "stats", { value: () => new Promise(() => {}) });
  const server = await startServer({ model: busy, port: 0 });
  try {
    await server.ready;
    assert.ok(await eventually(() => model.latestStats() !== undefined));
    const response = await fetch(`${server.url}/metrics`, { signal: AbortSignal.timeout(20_000) });
    assert.equal(response.status, 200);
    const text = await response.text();
    const total = model.latestStats()!.kvBlocksTotal;
    assert.match(text, new RegExp(`^blossom_kv_cache_blocks_total ${total}$`, "m"));
    assert.match(text, new RegExp(`^blossom_kv_cache_blocks_free ${total}$`, "m"));
    assert.match(text, /^blossom_queue_size 0$/m);
  } finally {
    await server.close();
    await model.dispose();
  }
});
