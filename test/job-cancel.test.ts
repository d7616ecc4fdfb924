/**
 * A forward or score the caller abandons (its signal aborted; over HTTP, a client that leaves) is
 * rejected at once and dropped from the engine wherever it is: queued, waiting for room, or between
 * two of its chunks, its sequences' KV blocks freed. A long text fed in chunks would otherwise hold
 * the engine's turns for seconds, for nobody.
 */
import assert from "node:assert/strict";
import { request } from "node:http";
import { test } from "node:test";
import { BlossomError } from "../src/errors.js";
import { loadModel, type Model } from "../src/index.js";
import { startServer } from "../src/server/server.js";
import { fixtureDir } from "./helpers/fixtures.js";

/** Polls stats() (each answer comes between two units of the engine's work) until `check` holds, at most `tries` times. */
async function until(model: Model, check: (s: Awaited<ReturnType<Model["stats"]>>) => boolean, tries = 2000) {
  let s = await model.stats();
  for (let i = 0; i < tries && !check(s); i++) s = await model.stats();
  return s;
}

const isAborted = (err: unknown) => err instanceof BlossomError && err.code === "aborted";

/** `count` rows of `length` token ids, each row different; ids below 5 + `vocab`. */
const rowsOf = (count: number, length: number, vocab: number) => Array.from({ length: count }, (_, r) => Array.from({ length }, (_, i) => 5 + ((i * 7 + r) % vocab)));

/** A forward the test can abort (its rejection is awaited by the test, not left unhandled). */
function abortableForward(model: Model, rows: number[][]) {
  const controller = new AbortController();
  const forward = model.forward(rows, undefined, { signal: controller.signal });
  forward.catch(() => {});
  return { controller, forward };
}

test("an aborted forward is rejected at once and its chunked job dropped from the engine, blocks freed", async () => {
  // 16 prompt tokens a step: 8 rows of 400 tokens take 200 chunks.
  const model = await loadModel(fixtureDir("tiny-bloom-a"), { kvCacheTokens: 8192, maxBatchPrefillTokens: 16 });
  try {
    const { controller, forward } = abortableForward(model, rowsOf(8, 400, 500));
    const started = await until(model, (s) => s.kvBlocksFree < s.kvBlocksTotal);
    assert.ok(started.kvBlocksFree < started.kvBlocksTotal, "the job is being fed");
    controller.abort();
    await assert.rejects(forward, isAborted);
    const after = await model.stats();
    assert.equal(after.kvBlocksFree, after.kvBlocksTotal, "its blocks are freed");
    // No chunk runs after it was dropped.
    const later = await model.stats();
    assert.equal(later.jobChunks, after.jobChunks);
    assert.ok(after.jobChunks < 100, `${after.jobChunks} chunks ran (the whole job takes 200)`);
    // The engine serves the next request normally.
    const [lp] = [await model.tokenLogprobs([5, 6, 7, 8], 1)];
    assert.equal(lp.length, 3);
  } finally {
    await model.dispose();
  }
});

test("a score waiting behind another job is dropped when aborted; the job before it completes", async () => {
  const model = await loadModel(fixtureDir("tiny-bloom-a"), { kvCacheTokens: 8192, maxBatchPrefillTokens: 16 });
  try {
    const ids = Array.from({ length: 300 }, (_, i) => 5 + (i % 400));
    const first = model.tokenLogprobs(ids, 1);
    const controller = new AbortController();
    const second = model.tokenLogprobs(ids, 1, { signal: controller.signal });
    second.catch(() => {});
    await until(model, (s) => s.kvBlocksFree < s.kvBlocksTotal);
    controller.abort();
    await assert.rejects(second, isAborted);
    assert.equal((await first).length, 299);
    const s = await model.stats();
    assert.equal(s.kvBlocksFree, s.kvBlocksTotal);
    // An already-aborted signal is refused before anything is sent.
    await assert.rejects(model.tokenLogprobs(ids, 1, { signal: controller.signal }), isAborted);
    // Even where no engine step would be needed (nothing to score, every row masked).
    await assert.rejects(model.tokenLogprobs(ids, ids.length, { signal: controller.signal }), isAborted);
    await assert.rejects(model.forward([[5, 6]], [[0, 0]], { signal: controller.signal }), isAborted);
    await assert.rejects(model.tokenLogprobs(ids, 1, { signal: "no" as unknown as AbortSignal }), /signal: must be an AbortSignal/);
  } finally {
    await model.dispose();
  }
});

test("a client that leaves POST /forward/ stops the scoring of the text in progress, not only of the texts after it", { timeout: 120_000 }, async () => {
  const model = await loadModel(fixtureDir("tiny-bloom-a"), { kvCacheTokens: 8192, maxBatchPrefillTokens: 16 });
  const server = await startServer({ model, port: 0 });
  try {
    await server.ready;
    // Two texts of ~1000 tokens (within --max-input-length 1024): ~60 chunks each, scored one after the other.
    const conditioning = "w1 w2 w3 w4 w5", response = Array.from({ length: 340 }, (_, i) => `w${i % 50}`).join(" ");
    const words = (await model.tokenizer.encode(conditioning + response)).length;
    assert.ok(words > 800 && words <= 1024, `${words} tokens`);
    const body = JSON.stringify({ conditioning_text: [conditioning, conditioning], response: [response, response] });
    const req = request(`${server.url}/forward/`, { method: "POST", headers: { "content-type": "application/json", "content-length": Buffer.byteLength(body) } });
    req.on("error", () => {});
    req.end(body);
    const before = await model.stats();
    const started = await until(model, (s) => s.kvBlocksFree < s.kvBlocksTotal);
    assert.ok(started.kvBlocksFree < started.kvBlocksTotal, "the first text is being scored");
    req.destroy();
    const freed = await until(model, (s) => s.kvBlocksFree === s.kvBlocksTotal);
    assert.equal(freed.kvBlocksFree, freed.kvBlocksTotal);
    const chunksPerText = Math.ceil(words / 16);
    assert.ok(freed.jobChunks - before.jobChunks < chunksPerText / 2, `${freed.jobChunks - before.jobChunks} chunks ran (one text takes ${chunksPerText})`);
  } finally {
    await server.close();
    await model.dispose();
  }
});

test("after an aborted job, the figures the engine pushes show its blocks freed once it is idle (no stats() asked)", { timeout: 120_000 }, async () => {
  // Chunks long enough (2048 tokens of a 4-layer model) that the engine pushes its figures after each one.
  const model = await loadModel(fixtureDir("trained-bloom-small"), { kvCacheTokens: 16384, maxBatchPrefillTokens: 2048 });
  try {
    const { controller, forward } = abortableForward(model, rowsOf(8, 1000, 1000));
    const pushed = () => model.latestStats();
    for (let i = 0; i < 4000 && !(pushed() && pushed()!.kvBlocksFree < pushed()!.kvBlocksTotal); i++) await new Promise((r) => setTimeout(r, 5));
    assert.ok(pushed()!.kvBlocksFree < pushed()!.kvBlocksTotal, "the job is being fed");
    controller.abort();
    await assert.rejects(forward, isAborted);
    for (let i = 0; i < 1000 && pushed()!.kvBlocksFree < pushed()!.kvBlocksTotal; i++) await new Promise((r) => setTimeout(r, 5));
    assert.equal(pushed()!.kvBlocksFree, pushed()!.kvBlocksTotal, "the idle engine's figures show the blocks back");
  } finally {
    await model.dispose();
  }
});

test("replicas: a part of a spread forward that fails cancels the other replicas' parts", { timeout: 120_000 }, async () => {
  const model = await loadModel(fixtureDir("tiny-bloom-a"), { strategy: "replicas", replicas: 2, kvCacheTokens: 2048, maxBatchPrefillTokens: 16 });
  try {
    // A session holds most of one replica's cache: that replica refuses its part at once.
    const session = await model.openSession();
    await session.append(Array.from({ length: 1900 }, (_, i) => 5 + (i % 500)), "last");
    const rows = [0, 1].map((r) => Array.from({ length: 1000 }, (_, i) => 5 + r + (i % 500)));
    await assert.rejects(model.forward(rows), (e: unknown) => e instanceof BlossomError && e.code === "memory");
    // The other part is dropped: its blocks come back long before its 57 chunks could have run.
    const idle = await until(model, (s) => s.kvBlocksTotal - s.kvBlocksFree === Math.ceil(1900 / 16));
    assert.equal(idle.kvBlocksTotal - idle.kvBlocksFree, Math.ceil(1900 / 16), "only the session's blocks are held");
    assert.ok(idle.jobChunks < 30, `${idle.jobChunks} chunks ran for a result nobody reads (the part takes 63)`);
    await session.close();
  } finally {
    await model.dispose();
  }
});

test("forward / score requests in progress take turns a chunk at a time: a short score sent after a long forward ends first", async () => {
  const model = await loadModel(fixtureDir("tiny-bloom-a"), { kvCacheTokens: 8192, maxBatchPrefillTokens: 16 });
  try {
    const order: string[] = [];
    const long = model.forward(rowsOf(8, 400, 500)).then(() => order.push("long forward (200 chunks)"));
    await until(model, (s) => s.kvBlocksFree < s.kvBlocksTotal); // the forward is being fed
    const ids = Array.from({ length: 20 }, (_, i) => 5 + i);
    const alone = await model.tokenLogprobs(ids, 1).then((lp) => (order.push("short score (2 chunks)"), lp));
    await long;
    assert.deepEqual(order, ["short score (2 chunks)", "long forward (200 chunks)"]);
    // Its numbers are those it gets alone.
    assert.deepEqual(alone, await model.tokenLogprobs(ids, 1));
    const s = await model.stats();
    assert.equal(s.kvBlocksFree, s.kvBlocksTotal);
  } finally {
    await model.dispose();
  }
});

test("jobs deferred for room start together once they fit: a short score deferred behind a long forward still ends first", async () => {
  // 128 blocks of 16; a generation reserves 94 of them, so the forward (63 blocks) and the score after it wait.
  const model = await loadModel(fixtureDir("tiny-bloom-a"), { kvCacheTokens: 2048, maxBatchPrefillTokens: 16 });
  try {
    const order: string[] = [];
    const tokens = (n: number, r: number) => Array.from({ length: n }, (_, i) => 5 + ((i * 7 + r) % 500));
    const controller = new AbortController();
    let long: Promise<unknown> | undefined, short: Promise<unknown> | undefined;
    let n = 0;
    try {
      for await (const _ of model.stream(tokens(16, 0), { maxNewTokens: 1480, signal: controller.signal })) {
        if (++n === 1) {
          long = model.forward([tokens(1000, 1)]).then(() => order.push("long forward"));
          short = model.tokenLogprobs(tokens(20, 2), 1).then(() => order.push("short score"));
        }
        if (n === 20) {
          const s = await model.stats();
          assert.equal(s.jobChunks, 0, "both jobs wait for the generation's blocks");
          controller.abort();
        }
      }
    } catch {
      // the generation, aborted
    }
    await Promise.all([long, short]);
    assert.deepEqual(order, ["short score", "long forward"]);
  } finally {
    await model.dispose();
  }
});

for (const [label, options] of [["one engine", {}], ["replicas", { strategy: "replicas" as const, replicas: 2 }]] as const) {
  test(`many calls sharing one abort signal print no MaxListenersExceededWarning (${label})`, async () => {
    const warnings: string[] = [];
    const onWarning = (w: Error) => warnings.push(w.name);
    process.on("warning", onWarning);
    const model = await loadModel(fixtureDir("tiny-bloom-a"), { ...options, kvCacheTokens: 4096 });
    try {
      const controller = new AbortController();
      const results = await Promise.all(Array.from({ length: 30 }, (_, i) => model.tokenLogprobs([5, 6 + i, 7, 8], 1, { signal: controller.signal })));
      assert.equal(results.length, 30);
      await new Promise((resolve) => setImmediate(resolve));
      assert.deepEqual(warnings.filter((w) => w === "MaxListenersExceededWarning"), []);
    } finally {
      process.off("warning", onWarning);
      await model.dispose();
    }
  });
}
