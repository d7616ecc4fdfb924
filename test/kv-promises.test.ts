/**
 * Blocks promised to running generations stay theirs. Admission reserves a request's prompt +
 * max_new_tokens, so a running sequence never meets a full cache; work outside the batch must keep
 * that promise too: a session's feed is refused rather than taking promised blocks (which failed
 * the running generation and every queued one), and a forward or score waits for room instead of
 * failing with "KV cache is full" (a 4xx from the server's /forward/ under load).
 */
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import { BlossomError, loadModel, type Model } from "../src/index.js";
import { fixtureDir } from "./helpers/fixtures.js";

describe("KV blocks promised to running generations", () => {
  let model: Model;
  before(async () => {
    // 64 blocks of 16 tokens.
    model = await loadModel(fixtureDir("tiny-bloom-a"), { kvCacheTokens: 1024 });
  });
  after(async () => {
    await model.dispose();
  });

  /** Starts a generation owed 57 of the 64 blocks (4 + 900 tokens); resolves once it has made `after` tokens. */
  async function startLong(after = 1): Promise<{ done: Promise<number> }> {
    let started!: () => void;
    const running = new Promise<void>((resolve) => (started = resolve));
    const done = (async () => {
      let tokens = 0;
      for await (const e of model.stream([5, 6, 7, 8], { maxNewTokens: 900, minNewTokens: 900 })) {
        if (e.token && ++tokens === after) started();
      }
      return tokens;
    })();
    await running;
    return { done };
  }

  test("a session's feed may not take them: refused by name, and the generation runs to its end", async () => {
    const long = await startLong();
    const session = await model.openSession();
    try {
      // 160 tokens = 10 blocks; more than 7 are free but all but 7 are promised.
      await assert.rejects(session.append(Array.from({ length: 160 }, (_, i) => 10 + (i % 1000))), (err: unknown) => {
        assert.ok(err instanceof BlossomError && err.code === "memory", String(err));
        assert.match(err.message, /feed: needs 10 blocks of 16 tokens; \d+ are free but \d+ of them are promised to running generations/);
        return true;
      });
      // A feed that fits beside the promise goes through.
      await session.append([10, 11, 12]);
      assert.equal(await long.done, 900);
    } finally {
      await session.close();
    }
    const s = await model.stats();
    assert.equal(s.kvBlocksFree, s.kvBlocksTotal);
  });

  test("a forward that needs them waits for the generation to finish, then gives the same logits as alone", async () => {
    const tokens = Array.from({ length: 200 }, (_, i) => 10 + (i % 1000)); // 13 blocks
    const alone = await model.forward([tokens]);
    // Late in the run the generation holds most blocks: fewer than 13 are free at all.
    const long = await startLong(850);
    let forwardDone = false;
    const underLoad = model.forward([tokens]).then((r) => {
      forwardDone = true;
      return r;
    });
    const generated = await long.done;
    assert.equal(generated, 900, "the generation was not starved of its blocks");
    const r = await underLoad;
    assert.ok(forwardDone);
    assert.deepEqual(r.dims, alone.dims);
    assert.deepEqual(Array.from(r.data), Array.from(alone.data));
    // Scoring waits the same way.
    const long2 = await startLong(850);
    const scored = model.tokenLogprobs(tokens, 1);
    assert.equal(await long2.done, 900);
    assert.equal((await scored).length, tokens.length - 1);
  });

  test("a forward that could never fit is refused at once with the cache's capacity, even behind a waiting one", async () => {
    const long = await startLong(850);
    const waiting = model.forward([Array.from({ length: 200 }, (_, i) => 10 + (i % 1000))]);
    await assert.rejects(model.forward([Array.from({ length: 1100 }, (_, i) => 10 + (i % 1000))]), (err: unknown) => {
      assert.ok(err instanceof BlossomError && err.code === "memory", String(err));
      assert.match(err.message, /capacity 1024 tokens/);
      return true;
    });
    assert.equal(await long.done, 900);
    await waiting;
  });

  test("a forward that open sessions leave no room for is refused, not left waiting", async () => {
    const session = await model.openSession();
    try {
      await session.append(Array.from({ length: 1000 }, (_, i) => 10 + (i % 1000))); // 63 of the 64 blocks
      await assert.rejects(model.forward([Array.from({ length: 40 }, (_, i) => 10 + i)]), (err: unknown) => {
        assert.ok(err instanceof BlossomError && err.code === "memory", String(err));
        return true;
      });
    } finally {
      await session.close();
    }
  });

  test("a request over the batch's token budget names maxBatchTotalTokens, not the cache", async () => {
    const capped = await loadModel(fixtureDir("tiny-bloom-a"), { kvCacheTokens: 2048, maxBatchTotalTokens: 100 });
    try {
      await assert.rejects(capped.generate([[5, 6]], { maxNewTokens: 99 }), /= 101 tokens exceeds the batch's token budget of 100 \(maxBatchTotalTokens, --max-batch-total-tokens\)/);
    } finally {
      await capped.dispose();
    }
  });
});
