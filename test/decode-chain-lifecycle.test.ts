/**
 * The decode chain's lifetime and reach: it holds the workspace and every layer's KV cache, so a
 * disposed model must drop it; a model used with two KV pools rebuilds it for each; a one-token
 * batch the chain cannot run (an idle sequence beside the decoding one) takes the general path.
 */
import assert from "node:assert/strict";
import { test } from "node:test";
import { setFlagsFromString } from "node:v8";
import { runInNewContext } from "node:vm";
import { loadEngine } from "../src/engine/load.js";
import { Engine } from "../src/engine/engine.js";
import { KVCachePool } from "../src/engine/kv-cache.js";
import { fixtureDir } from "./helpers/fixtures.js";

setFlagsFromString("--expose-gc");
const gc = runInNewContext("gc") as () => void;

test("a disposed model's decode chain does not keep the KV cache alive", async () => {
  const loaded = loadEngine(fixtureDir("tiny-bloom-a"), { kvCacheTokens: 64 });
  const { engine } = loaded;
  const seq = engine.createSequence();
  engine.step([{ sequence: seq, tokens: [5, 6, 7], logits: "last" }]);
  engine.step([{ sequence: seq, tokens: [8], logits: "last" }]); // builds the chain
  engine.freeSequence(seq);
  const k = new WeakRef(engine.kvCache.layer(0).k as object);
  loaded.dispose();
  for (let i = 0; i < 5; i++) {
    gc();
    await new Promise((r) => setTimeout(r, 10));
  }
  // loaded (and its model) are still reachable here, as after a worker's dispose
  assert.ok(loaded.model);
  assert.equal(k.deref(), undefined, "the disposed pool's key cache is still reachable (held by model.decodeChain)");
});

test("a model used with two KV pools alternately gives each pool's own logits", () => {
  const a = loadEngine(fixtureDir("tiny-bloom-a"), { kvCacheTokens: 64 });
  const ref = loadEngine(fixtureDir("tiny-bloom-a"), { kvCacheTokens: 64 });
  ref.model.chainDecode = false;
  try {
    const pool2 = new KVCachePool(a.backend, { ...a.engine.kvCache.shape });
    const e2 = new Engine(a.model, pool2);
    const r2 = new Engine(ref.model, new KVCachePool(ref.backend, { ...ref.engine.kvCache.shape }));
    const s1 = a.engine.createSequence(), s2 = e2.createSequence(), t1 = ref.engine.createSequence(), t2 = r2.createSequence();
    a.engine.step([{ sequence: s1, tokens: [5, 6, 7], logits: "last" }]);
    e2.step([{ sequence: s2, tokens: [9, 10], logits: "last" }]);
    ref.engine.step([{ sequence: t1, tokens: [5, 6, 7], logits: "last" }]);
    r2.step([{ sequence: t2, tokens: [9, 10], logits: "last" }]);
    for (let i = 0; i < 6; i++) {
      const x = a.engine.step([{ sequence: s1, tokens: [20 + i], logits: "last" }])[0]!.slice();
      const y = ref.engine.step([{ sequence: t1, tokens: [20 + i], logits: "last" }])[0]!.slice();
      assert.deepEqual(x, y, `pool 1 step ${i}`);
      const u = e2.step([{ sequence: s2, tokens: [40 + i], logits: "last" }])[0]!.slice();
      const v = r2.step([{ sequence: t2, tokens: [40 + i], logits: "last" }])[0]!.slice();
      assert.deepEqual(u, v, `pool 2 step ${i}`);
    }
    pool2.dispose();
  } finally {
    a.dispose();
    ref.dispose();
  }
});

test("forward() of one token with a batch holding an idle sequence (num_new 0) works as unchained", () => {
  const a = loadEngine(fixtureDir("tiny-bloom-a"), { kvCacheTokens: 64 });
  try {
    const { engine, model } = a;
    const seq = engine.createSequence();
    engine.step([{ sequence: seq, tokens: [5, 6, 7], logits: "last" }]);
    engine.kvCache.reserve(seq.blocks, 4);
    const other: number[] = [];
    engine.kvCache.reserve(other, 1);
    const step = {
      tokenIds: Int32Array.from([8]),
      batch: { seqs: Int32Array.from([0, 1, 3, 0, 1, 0, 0, 1]), blockTable: Int32Array.from([...seq.blocks, ...other]) },
      logitRows: Int32Array.from([0]),
    };
    model.chainDecode = false;
    const want = model.forward(step, engine.kvCache).slice();
    model.chainDecode = true;
    const got = model.forward(step, engine.kvCache).slice();
    assert.deepEqual(got, want);
  } finally {
    a.dispose();
  }
});

test("runChain names a sequence with no new token as such", async () => {
  const { native } = await import("../src/backend/native.js");
  const a = native();
  const H = 64, heads = 4;
  const c = a.createChain([[2, new Float32Array(H), new Float32Array(3 * H), new Float32Array(H * 16), new Float32Array(H * 16), 0, heads, H / heads, 16, new Float32Array(heads)]]);
  assert.throws(() => a.runChain(c, Int32Array.from([0, 0, 3, 0]), Int32Array.from([0])), /a sequence with 0 new tokens/);
  assert.throws(() => a.runChain(c, Int32Array.from([0, 1, 3, 0, 0, 1, 3, 0]), Int32Array.from([0])), /got 2 sequences/);
});
