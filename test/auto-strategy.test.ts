/** Strategy "auto": what it picks for each situation, and that the pick it loads works. */
import assert from "node:assert/strict";
import { describe, test } from "node:test";
import { loadModel } from "../src/index.js";
import { chooseStrategy } from "../src/parallel/auto.js";
import { fixtureDir } from "./helpers/fixtures.js";

const dir = fixtureDir("trained-bloom-small"); // 8.1 MiB of bf16 weights (16.1 MiB as fp32)

describe("strategy auto", () => {
  test("picks by launch, model size, memory and NUMA nodes", () => {
    assert.equal(chooseStrategy(dir, "auto", 3).strategy, "tensor");
    const roomy = chooseStrategy(dir, "auto", 1, { availableBytes: 1 << 30, numaNodes: 1 });
    assert.equal(roomy.strategy, "single");
    assert.match(roomy.reason, /fit in available memory/);
    const tight = chooseStrategy(dir, "fp32", 1, { availableBytes: 12 * 2 ** 20, numaNodes: 1 });
    assert.equal(tight.strategy, "pipeline");
    assert.equal(tight.maxMemory, `cpu:${Math.floor(0.75 * 12 * 2 ** 20)}B,disk`);
    assert.match(tight.reason, /exceed 90 % of available memory/);
    const numa = chooseStrategy(dir, "auto", 1, { availableBytes: 1 << 30, numaNodes: 2 });
    assert.deepEqual([numa.strategy, numa.replicas], ["replicas", 2]);
  });

  test("loadModel({ strategy: 'auto' }) reports its choice and generates", async () => {
    const model = await loadModel(dir, { strategy: "auto" });
    try {
      assert.ok(model.strategyChoice);
      const r = await model.generate(["In the beginning"], { maxNewTokens: 6 });
      assert.equal(r.texts[0], " of the first month, in");
    } finally {
      await model.dispose();
    }
  });
});
