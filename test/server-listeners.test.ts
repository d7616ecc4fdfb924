/**
 * A request of many prompts puts one abort listener per sequence on its signal: that is by design
 * (each is removed when its sequence ends), so it must not print Node's leak warning on every request.
 */
import assert from "node:assert/strict";
import { test } from "node:test";
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
