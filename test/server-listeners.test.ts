/**
 * A request's abort signal: a request of many prompts puts listeners per sequence on it (by design,
 * each removed when its sequence ends), which must not print Node's leak warning on every request;
 * and an abort answers the sequence at once.
 */
import assert from "node:assert/strict";
import { getEventListeners } from "node:events";
import { test } from "node:test";
import { defaultGenerationParams, type GenerationParams } from "../src/generate/params.js";
import { loadModel, type Model } from "../src/index.js";
import { ServerMetrics } from "../src/server/metrics.js";
import { HttpError } from "../src/server/http-error.js";
import { CancelReason, GenerationService } from "../src/server/service.js";
import { startServer } from "../src/server/server.js";
import { fixtureDir } from "./helpers/fixtures.js";
import { post } from "./helpers/http-client.js";

test("a request of 12 prompts prints no MaxListenersExceededWarning", async () => {
  const warnings: string[] = [];
  const onWarning = (w: Error) => warnings.push(`${w.name}: ${w.message}`);
  process.on("warning", onWarning);
  const server = await startServer({ model: fixtureDir("tiny-bloom-a"), port: 0, kvCacheTokens: 1024 });
  try {
    await server.ready;
    const texts = Array.from({ length: 12 }, (_, i) => `prompt ${i}`);
    for (const [path, body] of [
      ["/generate/", { text: texts, max_new_tokens: 2 }],
      ["/v1/completions", { prompt: texts, max_tokens: 2 }],
      ["/v1/completions", { prompt: texts, max_tokens: 2, stream: true }],
    ] as const) {
      const r = await post(`${server.url}${path}`, body);
      assert.equal(r.status, 200, `${path}: ${JSON.stringify(r.body)}`);
    }
    // Warnings are emitted on the next tick.
    await new Promise((resolve) => setImmediate(resolve));
    assert.deepEqual(warnings.filter((w) => w.startsWith("MaxListenersExceededWarning")), []);
  } finally {
    process.off("warning", onWarning);
    await server.close();
  }
});

/**
 * A service over a model whose stream is in a step that does not end (as a long prompt's chunk, for
 * seconds): it delivers nothing until the test calls finish().
 */
function serviceInLongStep(maxConcurrent: number): { service: GenerationService; finish: () => void } {
  let finish!: () => void;
  const stepDone = new Promise<void>((resolve) => (finish = resolve));
  const model = {
    stream: () => ({
      async *[Symbol.asyncIterator]() {
        await stepDone;
        yield { text: "late", finishReason: "cancelled" };
      },
    }),
  } as unknown as Model;
  const service = new GenerationService(new ServerMetrics(() => 0), maxConcurrent);
  service.model = model;
  service.state = "ready";
  return { service, finish };
}

test("a sequence cancelled by a shutdown or its client is answered at once, not at the engine's next step", { timeout: 60_000 }, async () => {
  const { service, finish } = serviceInLongStep(8);
  for (const by of ["shutdown", "client"] as const) {
    const { controller, release } = service.admit(1);
    const run = service.run({ promptIds: [5, 6], params: {} as GenerationParams, signal: controller.signal });
    controller.abort(new CancelReason(by));
    const result = await run;
    assert.equal(result.finishReason, "cancelled");
    assert.equal(result.cancelledBy, by);
    assert.equal(result.text, "");
    release();
  }
  finish();
});

test("a route whose token handler throws cancels its sequence in the engine (not left generating for nobody)", async () => {
  const model = await loadModel(fixtureDir("tiny-bloom-a"), { kvCacheTokens: 4096 });
  try {
    const service = new GenerationService(new ServerMetrics(() => 0), 8);
    service.model = model;
    service.state = "ready";
    const { controller, release } = service.admit(1);
    const params = { ...defaultGenerationParams, maxNewTokens: 3000, minNewTokens: 3000 };
    await assert.rejects(
      service.run({ promptIds: [5, 6, 7], params, signal: controller.signal, onToken: () => { throw new Error("route failed"); } }),
      /route failed/,
    );
    release();
    let stats = await model.stats();
    for (let i = 0; i < 1000 && stats.running > 0; i++) stats = await model.stats();
    assert.equal(stats.running, 0);
    assert.ok(stats.generatedTokens < 3000, `${stats.generatedTokens} tokens generated`);
    assert.equal(stats.kvBlocksFree, stats.kvBlocksTotal);
    assert.equal(getEventListeners(controller.signal, "abort").length, 0);
  } finally {
    await model.dispose();
  }
});

test("a sequence answered as cancelled counts against --max-concurrent-requests until the engine has dropped it", { timeout: 60_000 }, async () => {
  const { service, finish } = serviceInLongStep(1);
  const { controller, release } = service.admit(1);
  const run = service.run({ promptIds: [5, 6], params: {} as GenerationParams, signal: controller.signal });
  controller.abort(new CancelReason("client"));
  assert.equal((await run).cancelledBy, "client");
  release();
  // The engine still holds it (its step has not ended): no room yet.
  assert.throws(() => service.admit(1), (e: unknown) => e instanceof HttpError && /1 sequences are in flight and the limit is 1/.test(e.message));
  finish();
  let admitted: { release: () => void } | undefined;
  for (let i = 0; i < 100 && !admitted; i++) {
    await new Promise((resolve) => setImmediate(resolve));
    try {
      admitted = service.admit(1);
    } catch {
      // not yet
    }
  }
  assert.ok(admitted, "room once the engine dropped the sequence");
  admitted.release();
});
