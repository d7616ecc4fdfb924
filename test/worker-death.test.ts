/**
 * When an engine worker dies (a native crash in a future bug, an operator's kill, here its Worker
 * terminated from outside), no caller waits forever: a generation in flight rejects after the
 * tokens it streamed, every later call is refused at once with the reason (not "disposed"), the
 * server answers each request with an error instead of holding it open, and a replica set goes on
 * with the replicas that live.
 */
import assert from "node:assert/strict";
import type { Worker } from "node:worker_threads";
import { describe, test } from "node:test";
import { BlossomError, loadModel, type Model } from "../src/index.js";
import { startServer } from "../src/server/server.js";
import { fixtureDir } from "./helpers/fixtures.js";
import { get, post } from "./helpers/http-client.js";

/** The Worker behind a model's engine (replica `replica` of a replica set). */
function workerOf(model: Model, replica?: number): Worker {
  const client = (model as unknown as { client: { worker?: Worker; clients?: { worker: Worker }[] } }).client;
  return replica === undefined ? client.worker! : client.clients![replica]!.worker;
}

const exited = (err: unknown) => {
  assert.ok(err instanceof BlossomError, String(err));
  assert.match(err.message, /the engine worker exited \(code \d+\); load the model again/);
  return true;
};

describe("an engine worker that dies", () => {
  test("library: the run in flight rejects after its tokens; later calls are refused at once with the reason", async () => {
    const model = await loadModel(fixtureDir("tiny-bloom-a"));
    try {
      const events: unknown[] = [];
      const streamed = (async () => {
        for await (const e of model.stream("hello", { maxNewTokens: 100000, minNewTokens: 100000 })) {
          events.push(e);
          if (events.length === 5) void workerOf(model).terminate();
        }
      })();
      await assert.rejects(streamed, exited);
      assert.ok(events.length >= 5, "the tokens streamed before the failure were delivered");
      await assert.rejects(model.generate(["hello"], { maxNewTokens: 3 }), exited);
      await assert.rejects(model.forward([[5, 6]]), exited);
      await assert.rejects(model.stats(), exited);
    } finally {
      await model.dispose();
    }
  });

  test("replicas: a dead replica takes no new work; the others carry on", async () => {
    const model = await loadModel(fixtureDir("tiny-bloom-a"), { strategy: "replicas", replicas: 2 });
    try {
      await workerOf(model, 0).terminate();
      assert.equal(model.alive, true, "one replica still runs");
      // Let the exit event arrive.
      for (let i = 0; i < 100 && (model as unknown as { client: { clients: { alive: boolean }[] } }).client.clients[0]!.alive; i++) await new Promise((r) => setTimeout(r, 10));
      for (let round = 0; round < 3; round++) {
        const r = await model.generate(["hello", "world"], { maxNewTokens: 6, minNewTokens: 6 });
        assert.deepEqual(r.numGeneratedTokens, [6, 6]);
        assert.deepEqual(r.finishReasons, ["length", "length"]);
      }
      const logits = await model.forward([[5, 6], [7, 8]]);
      assert.deepEqual(logits.dims.slice(0, 2), [2, 2]);
      // Figures and perplexity come from the live replica.
      const stats = await model.stats();
      assert.equal(stats.running, 0);
      assert.ok((await model.perplexity("hello world, hello world")).perplexity > 0);
    } finally {
      await model.dispose();
    }
  });

  test("server: requests get an error answer at once, not an open connection", async () => {
    const model = await loadModel(fixtureDir("tiny-bloom-a"));
    const server = await startServer({ model, port: 0 });
    try {
      await server.ready;
      assert.equal((await get(`${server.url}/health`)).status, 200);
      await workerOf(model).terminate();
      // /health answers on the main thread (a long step must not fail it): a dead worker is a 503.
      const health = await get(`${server.url}/health`);
      assert.equal(health.status, 503);
      assert.match(JSON.stringify(health.body), /the engine worker has stopped/);
      assert.equal(model.alive, false);
      for (const [path, body] of [
        ["/generate", { inputs: "hello", parameters: { max_new_tokens: 3 } }],
        ["/v1/completions", { prompt: "hello", max_tokens: 3 }],
        ["/generate/", { text: ["hello"], max_new_tokens: 3 }],
      ] as const) {
        const r = await post(`${server.url}${path}`, body);
        // TGI answers a generation error 424; the other APIs 5xx.
        assert.ok(r.status === 424 || r.status >= 500, `${path}: ${r.status} ${JSON.stringify(r.body)}`);
        assert.match(JSON.stringify(r.body), /the engine worker exited/, path);
      }
    } finally {
      await server.close();
      await model.dispose();
    }
  });
});
