/**
 * Chunked prefill: a step feeds at most maxPrefillTokens prompt tokens, so a long prompt goes in over
 * several steps while the sequences already decoding get a token every step (before, the whole
 * prompt went in one step and every running stream stalled for it: seconds on a CPU). Chunking must
 * not change what is generated.
 */
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import { ChunkedJob } from "../src/engine/jobs.js";
import { loadEngine, type LoadedEngine } from "../src/engine/load.js";
import { Scheduler, type GenerationRequest } from "../src/engine/scheduler.js";
import type { TokenUpdate } from "../src/engine/protocol.js";
import { BlossomError, loadModel } from "../src/index.js";
import { resolveServerOptions } from "../src/server/options.js";
import { startServer } from "../src/server/server.js";
import { fixtureDir } from "./helpers/fixtures.js";

/** A greedy request: argmax, log-softmax of the chosen token, ends after maxNewTokens. */
function greedy(id: number, promptIds: number[], maxNewTokens: number): GenerationRequest {
  return {
    id,
    promptIds,
    maxNewTokens,
    finishAfter: (_token, n) => (n >= maxNewTokens ? "length" : undefined),
    chooser: {
      next(logits) {
        let best = 0;
        for (let i = 1; i < logits.length; i++) if (logits[i]! > logits[best]!) best = i;
        let sum = 0;
        for (let i = 0; i < logits.length; i++) sum += Math.exp(logits[i]! - logits[best]!);
        return { tokenId: best, logprob: -Math.log(sum) };
      },
    },
  };
}

const longPrompt = Array.from({ length: 30 }, (_, i) => 5 + ((i * 7) % 90));

describe("chunked prefill", () => {
  let loaded: LoadedEngine;
  before(() => {
    loaded = loadEngine(fixtureDir("tiny-bloom-a"), { kvCacheTokens: 1024 });
  });
  after(() => loaded.dispose());

  /** Runs the scheduler until idle; returns each step's updates. */
  function drain(s: Scheduler, limit = 200): TokenUpdate[][] {
    const steps: TokenUpdate[][] = [];
    while (s.hasWork() && steps.length < limit) steps.push(s.step().updates);
    assert.ok(!s.hasWork(), "the scheduler did not finish");
    return steps;
  }

  function alone(promptIds: number[], maxNewTokens: number, maxPrefillTokens: number): TokenUpdate[] {
    const s = new Scheduler(loaded.engine, { maxBatchSize: 8, maxBatchTotalTokens: 1024, maxPrefillTokens });
    s.submit(greedy(1, promptIds, maxNewTokens));
    return drain(s).flat();
  }

  test("a long prompt goes in over several steps while a running sequence gets a token every step", () => {
    const s = new Scheduler(loaded.engine, { maxBatchSize: 8, maxBatchTotalTokens: 1024, maxPrefillTokens: 8 });
    s.submit(greedy(1, [5, 6, 7], 12));
    const all = s.step().updates; // request 1's prompt and first token
    assert.deepEqual(all.map((u) => u.id), [1]);
    s.submit(greedy(2, longPrompt, 5));
    // 30 prompt tokens at 8 a step: 4 steps; request 1 decodes in each, request 2's first token comes with the 4th.
    for (let k = 1; k <= 4; k++) {
      const updates = s.step().updates;
      assert.deepEqual(updates.map((u) => u.id), k < 4 ? [1] : [1, 2], `step ${k} after the long prompt arrived`);
      all.push(...updates);
    }
    all.push(...drain(s).flat());
    const tokens = (id: number, updates: TokenUpdate[]) => updates.filter((u) => u.id === id).map((u) => u.token);
    // The same tokens as each request alone, its prompt fed whole.
    assert.deepEqual(tokens(1, all), tokens(1, alone([5, 6, 7], 12, 4096)));
    assert.deepEqual(tokens(2, all), tokens(1, alone(longPrompt, 5, 4096)));
    assert.equal(loaded.engine.kvCache.freeBlockCount, loaded.engine.kvCache.numBlocks, "every block is free again");
  });

  test("chunking changes neither the tokens nor, beyond float rounding, their log-probabilities", () => {
    const whole = alone(longPrompt, 8, 4096);
    for (const budget of [1, 7, 16, 29]) {
      const chunked = alone(longPrompt, 8, budget);
      assert.deepEqual(chunked.map((u) => u.token), whole.map((u) => u.token), `budget ${budget}`);
      chunked.forEach((u, i) => assert.ok(Math.abs(u.logprob - whole[i]!.logprob) < 1e-4, `budget ${budget}, token ${i}: ${u.logprob} vs ${whole[i]!.logprob}`));
    }
  });

  test("the budget is shared by prompts in arrival order; a request is admitted only while the step has room", () => {
    const s = new Scheduler(loaded.engine, { maxBatchSize: 8, maxBatchTotalTokens: 1024, maxPrefillTokens: 8 });
    s.submit(greedy(1, [5, 6, 7, 8, 9, 10], 2));
    s.submit(greedy(2, [11, 12, 13, 14, 15, 16], 2));
    s.submit(greedy(3, [17, 18], 2));
    // Step 1: request 1 whole (6), request 2's first 2 tokens; request 3 waits (no room left).
    assert.deepEqual(s.step().updates.map((u) => u.id), [1]);
    assert.equal(s.waitingCount, 1);
    // Step 2: request 1 decodes, request 2's last 4 tokens, request 3 whole (2).
    assert.deepEqual(s.step().updates.map((u) => u.id), [1, 2, 3]);
    drain(s);
  });

  test("a prompt cancelled while it is being fed frees its blocks", () => {
    const s = new Scheduler(loaded.engine, { maxBatchSize: 8, maxBatchTotalTokens: 1024, maxPrefillTokens: 8 });
    s.submit(greedy(1, longPrompt, 4));
    assert.deepEqual(s.step().updates, []);
    assert.equal(s.cancel(1), "running");
    assert.deepEqual(s.step().retiredCancelled, [1]);
    assert.ok(!s.hasWork());
    assert.equal(loaded.engine.kvCache.freeBlockCount, loaded.engine.kvCache.numBlocks);
  });
});

test("maxBatchPrefillTokens: through loadModel the same text; refused by name when not a positive integer", async () => {
  const model = await loadModel(fixtureDir("tiny-bloom-a"), { kvCacheTokens: 512, maxBatchPrefillTokens: 3 });
  const reference = await loadModel(fixtureDir("tiny-bloom-a"), { kvCacheTokens: 512 });
  try {
    const a = await model.generate([longPrompt, [5, 6]], { maxNewTokens: 6 });
    const b = await reference.generate([longPrompt, [5, 6]], { maxNewTokens: 6 });
    assert.deepEqual(a.tokenIds, b.tokenIds);
  } finally {
    await model.dispose();
    await reference.dispose();
  }
  await assert.rejects(loadModel(fixtureDir("tiny-bloom-a"), { maxBatchPrefillTokens: 0 }), (e: unknown) => e instanceof BlossomError && /maxBatchPrefillTokens/.test(e.message));
  assert.throws(() => resolveServerOptions({ model: "m", maxBatchPrefillTokens: 0 }), /maxBatchPrefillTokens: must be an integer >= 1/);
  assert.equal(resolveServerOptions({ model: "m" }).maxBatchPrefillTokens, 512);
});

describe("forward and score are fed in chunks too", () => {
  const text = Array.from({ length: 300 }, (_, i) => 5 + ((i * 13) % 900));

  test("the same logits and log-probabilities at any budget (a session's feed, one step, agrees too)", async () => {
    const chunked = await loadModel(fixtureDir("tiny-bloom-b"), { kvCacheTokens: 1024, maxBatchPrefillTokens: 7 });
    const whole = await loadModel(fixtureDir("tiny-bloom-b"), { kvCacheTokens: 1024 });
    try {
      const close = (a: ArrayLike<number>, b: ArrayLike<number>, what: string) => {
        assert.equal(a.length, b.length, what);
        for (let i = 0; i < a.length; i++) assert.ok(Math.abs(a[i]! - b[i]!) < 1e-4, `${what} [${i}]: ${a[i]} vs ${b[i]}`);
      };
      close(await chunked.tokenLogprobs(text, 3), await whole.tokenLogprobs(text, 3), "tokenLogprobs");
      const batch = [text.slice(0, 40), text.slice(40, 80)];
      close((await chunked.forward(batch)).data, (await whole.forward(batch)).data, "forward");
      for (const logits of ["all", "last"] as const) {
        const [sa, sb] = [await chunked.openSession(), await whole.openSession()];
        const [a] = await chunked.feed([{ session: sa, tokens: text.slice(0, 30), logits }]);
        const [b] = await whole.feed([{ session: sb, tokens: text.slice(0, 30), logits }]);
        close(a!, b!, `feed, logits ${logits}`);
        // The session holds all 30 tokens: the next token's logits agree too.
        close(await sa.append([7], "last"), await sb.append([7], "last"), `append after a feed (${logits})`);
        await sa.close();
        await sb.close();
      }
    } finally {
      await chunked.dispose();
      await whole.dispose();
    }
  });

  test("a running stream gets a token between the chunks of a long score", async () => {
    const budget = 8;
    const model = await loadModel(fixtureDir("tiny-bloom-a"), { kvCacheTokens: 2048, maxBatchPrefillTokens: budget });
    try {
      let tokens = 0;
      const stream = (async () => {
        for await (const e of model.stream([5, 6, 7], { maxNewTokens: 600, minNewTokens: 600 })) if (e.token) tokens++;
      })();
      while (tokens < 2) await new Promise((resolve) => setImmediate(resolve));
      const before = tokens;
      await model.tokenLogprobs(text, 1);
      await new Promise((resolve) => setImmediate(resolve));
      // 300 tokens at 8 a step: 38 chunks, each followed by a generation step (fed whole, at most a couple).
      assert.ok(tokens - before >= Math.ceil(text.length / budget) - 2, `the stream made ${tokens - before} tokens during the score`);
      await stream;
    } finally {
      await model.dispose();
    }
  });
});

test("startServer: maxBatchPrefillTokens from modelOptions is used (the server's default applies only when neither sets it)", async () => {
  const prompt = Array.from({ length: 90 }, (_, i) => 5 + (i % 90));
  for (const [options, steps] of [[{ modelOptions: { maxBatchPrefillTokens: 3 } }, 30], [{ maxBatchPrefillTokens: 45, modelOptions: { maxBatchPrefillTokens: 3 } }, 2], [{}, 1]] as const) {
    const server = await startServer({ model: fixtureDir("tiny-bloom-a"), host: "127.0.0.1", port: 0, logger: false, kvCacheTokens: 1024, ...options });
    try {
      const model = await server.ready;
      await model.generate([prompt], { maxNewTokens: 1 });
      assert.equal((await model.stats()).steps, steps, JSON.stringify(options));
    } finally {
      await server.shutdown(0);
    }
  }
});

describe("chunked jobs keep the engine's promises", () => {
  const text = Array.from({ length: 160 }, (_, i) => 5 + ((i * 13) % 900));

  test("a bad forward or score is refused whole, by name, before anything is fed", () => {
    const loaded = loadEngine(fixtureDir("tiny-bloom-a"), { kvCacheTokens: 256 });
    try {
      const refuse = (request: ConstructorParameters<typeof ChunkedJob>[1], pattern: RegExp) =>
        assert.throws(() => new ChunkedJob(loaded.engine, request), (e: unknown) => e instanceof BlossomError && e.code === "input" && pattern.test(e.message));
      refuse({ type: "forward", id: 1, sequences: [[5, 6], []] }, /forward: sequence 1 is empty/);
      refuse({ type: "score", id: 1, sequences: [{ tokens: [], from: 1 }] }, /score: sequence 0 is empty/);
      refuse({ type: "score", id: 1, sequences: [{ tokens: [5, 6, 7], from: 0 }] }, /from must be an integer >= 1/);
      refuse({ type: "score", id: 1, sequences: [{ tokens: [5, 6, 7], from: -1 }] }, /from must be an integer >= 1.*got -1/);
      refuse({ type: "forward", id: 1, sequences: [[5, 6, 99999]] }, /sequence 0, token 2: 99999 is not a token id/);
      assert.equal(loaded.engine.kvCache.freeBlockCount, loaded.engine.kvCache.numBlocks, "nothing was fed, no block taken");
    } finally {
      loaded.dispose();
    }
  });

  test("a session's feed may not take the blocks a score in progress will still need; it keeps its order with close", async () => {
    // 16 blocks of 16 tokens; the score (160 tokens, 10 blocks) goes in 8 tokens a step.
    const model = await loadModel(fixtureDir("tiny-bloom-a"), { kvCacheTokens: 256, maxBatchPrefillTokens: 8 });
    try {
      const alone = await model.tokenLogprobs(text, 1);
      const session = await model.openSession();
      const scored = model.tokenLogprobs(text, 1);
      await new Promise((resolve) => setImmediate(resolve));
      // 11 blocks: free, but not once the score's are counted.
      const fed = session.append(text.slice(0, 170), "last");
      const closed = session.close();
      await assert.rejects(fed, (e: unknown) => e instanceof BlossomError && e.code === "memory" && /promised to running generations and \d+ to a score in progress/.test(e.message));
      await closed;
      assert.deepEqual(await scored, alone);
      // A feed and a close sent together run in order.
      const other = await model.openSession();
      const [logits] = await Promise.all([other.append([5, 6, 7], "last"), other.close()]);
      assert.equal(logits!.length, model.config.vocabSize);
      assert.equal((await model.stats()).kvBlocksFree, 16);
    } finally {
      await model.dispose();
    }
  });
});

test("generation is not starved by a stream of forward / score requests (each one is a turn, a generation step follows)", async () => {
  const model = await loadModel(fixtureDir("tiny-bloom-a"), { kvCacheTokens: 1024 });
  try {
    const order: string[] = [];
    const text = Array.from({ length: 200 }, (_, i) => 5 + ((i * 11) % 900));
    const scorers = Array.from({ length: 4 }, async (_, k) => {
      for (let i = 0; i < 40; i++) await model.tokenLogprobs(text, 1);
      order.push(`scorer ${k}`);
    });
    // Let the scorers fill the worker's queue first.
    await new Promise((resolve) => setTimeout(resolve, 20));
    const stream = (async () => {
      let tokens = 0;
      for await (const e of model.stream([5, 6, 7], { maxNewTokens: 20, minNewTokens: 20 })) if (e.token) tokens++;
      order.push(`stream (${tokens} tokens)`);
    })();
    await Promise.all([...scorers, stream]);
    // 160 scores at one generation step each: the 20-token stream ends long before the last scorer.
    assert.equal(order[0], "stream (20 tokens)", order.join(", "));
  } finally {
    await model.dispose();
  }
});
