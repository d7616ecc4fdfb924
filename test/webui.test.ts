/**
 * The web UI at / driven in headless Chromium (Debian's `chromium` through playwright-core): type a
 * prompt, watch the text stream in, read tokens/s, stop a long generation (which cancels it on the
 * server), and see a refused request's message. Skips, saying why, only if no Chromium is found;
 * scripts/ensure-system-deps.sh installs it.
 */
import assert from "node:assert/strict";
import { existsSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { chromium, type BrowserContext, type Page } from "playwright-core";
import { loadModel, type Model } from "../src/index.js";
import { startServer, type BlossomServer } from "../src/server/server.js";
import { fixtureDir } from "./helpers/fixtures.js";
import { get, metric, pollUntil, post } from "./helpers/http-client.js";

function findChromium(): string | undefined {
  const candidates = [process.env.BLOSSOM_CHROMIUM, "/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome", "/usr/bin/google-chrome-stable"];
  return candidates.find((c): c is string => !!c && existsSync(c));
}

const executablePath = findChromium();
const skip = executablePath ? false : "Chromium not found (looked for $BLOSSOM_CHROMIUM, /usr/bin/chromium, chromium-browser, google-chrome); run scripts/ensure-system-deps.sh";

describe("web UI in headless Chromium", { skip }, () => {
  let model: Model;
  let server: BlossomServer;
  let context: BrowserContext;
  let page: Page;
  let profile: string;
  let waitText: (selector: string, pattern: RegExp) => Promise<unknown>;

  before(async () => {
    model = await loadModel(fixtureDir("trained-bloom-small"));
    server = await startServer({ model, port: 0, allowedMaxNewTokens: 2048 });
    await server.ready;
    profile = mkdtempSync(join(tmpdir(), "blossom-webui-"));
    context = await chromium.launchPersistentContext(profile, {
      executablePath: executablePath!,
      headless: true,
      args: [
        "--no-sandbox",
        "--headless",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
      ],
    });
    page = context.pages()[0] ?? (await context.newPage());
    // Node's typings have no DOM, so page functions are written as expressions.
    waitText = (selector, pattern) =>
      page.waitForFunction(`(() => { const e = document.querySelector(${JSON.stringify(selector)}); return !!e && ${pattern.toString()}.test(e.textContent ?? ""); })()`);
    await page.goto(`${server.url}/`);
  });

  after(async () => {
    await context?.close();
    await server?.close();
    await model?.dispose();
    if (profile) rmSync(profile, { recursive: true, force: true });
  });

  test("shows the model and its status", async () => {
    await waitText("#status", /^ready$/);
    assert.match((await page.textContent("#model")) ?? "", /trained-bloom-small · bf16 · single/);
  });

  test("a prompt streams its greedy continuation with token count and tokens/s", async () => {
    await page.fill("#prompt", "In the beginning");
    await page.fill("#max_new_tokens", "24");
    await page.click("#generate");
    await waitText("#finish-reason", /^done/);
    const expected = await post(`${server.url}/generate`, { inputs: "In the beginning", parameters: { max_new_tokens: 24 } });
    assert.equal(await page.textContent("#generated"), expected.body.generated_text);
    assert.equal(await page.textContent("#prompt-echo"), "In the beginning");
    assert.equal(await page.textContent("#token-count"), "24");
    assert.equal(await page.textContent("#finish-reason"), "done (length)");
    const rate = Number(await page.textContent("#tokens-per-second"));
    assert.ok(rate > 0, `tokens/s should be a positive number, is ${rate}`);
    assert.equal(await page.isDisabled("#stop"), true);
    assert.equal(await page.isHidden("#cursor"), true);
  });

  test("Stop ends a long generation; the server cancels it and frees its memory", async () => {
    await page.fill("#max_new_tokens", "2000");
    await page.click("#generate");
    // Text arrives while the generation is still running.
    await waitText("#generated", /.{40}/);
    assert.equal(await page.isEnabled("#stop"), true);
    assert.equal(await page.textContent("#finish-reason"), "generating…");
    await page.click("#stop");
    await waitText("#finish-reason", /^stopped$/);
    const shown = Number(await page.textContent("#token-count"));
    assert.ok(shown > 0 && shown < 2000);
    await pollUntil(async () => {
      const text = (await get(`${server.url}/metrics`)).body as string;
      return metric(text, "blossom_sequences_in_flight") === 0 && metric(text, "blossom_kv_cache_blocks_free") === metric(text, "blossom_kv_cache_blocks_total");
    }, "the stopped sequence to be cancelled on the server");
    assert.equal(await page.isEnabled("#generate"), true);
  });

  test("sampling settings are sent, and a refused request shows the server's message", async () => {
    await page.check("#do_sample");
    await page.fill("#seed", "5");
    await page.fill("#max_new_tokens", "8");
    await page.click("#generate");
    await waitText("#finish-reason", /^done/);
    const first = await page.textContent("#generated");
    await page.click("#generate");
    await waitText("#finish-reason", /^done/);
    assert.equal(await page.textContent("#generated"), first, "the same seed gives the same sample");

    await page.fill("#max_new_tokens", "99999");
    await page.click("#generate");
    await waitText("#error", /\S/);
    assert.match((await page.textContent("#error")) ?? "", /parameters\.max_new_tokens: must be <= 2048/);
    assert.equal(await page.textContent("#finish-reason"), "error");
  });

  test("a run that ends on </s> shows the text held back until then (the start of a stop string)", async () => {
    // The random-weight tiny-bloom-a ends sampled runs with </s> now and then; trained-bloom-small never does.
    const tiny = await loadModel(fixtureDir("tiny-bloom-a"));
    const other = await startServer({ model: tiny, port: 0 });
    try {
      await other.ready;
      const parameters = { max_new_tokens: 40, do_sample: true, temperature: 2 };
      let found: { seed: number; text: string } | undefined;
      for (let seed = 0; seed < 400 && !found; seed++) {
        const r = await post(`${other.url}/generate`, { inputs: "The", parameters: { ...parameters, seed, details: true } });
        if (r.body.details.finish_reason === "eos_token" && Array.from(r.body.generated_text as string).length >= 3) found = { seed, text: r.body.generated_text };
      }
      assert.ok(found, "some seed below 400 ends on </s>");
      // A stop string that starts with the text's last characters holds them back until </s> ends the run.
      const stop = Array.from(found.text).slice(-3).join("") + "ZZZ";
      const expected = await post(`${other.url}/generate`, { inputs: "The", parameters: { ...parameters, seed: found.seed, stop: [stop] } });
      assert.equal(expected.body.generated_text, found.text);

      await page.goto(`${other.url}/`);
      await waitText("#status", /^ready$/);
      await page.fill("#prompt", "The");
      await page.fill("#max_new_tokens", "40");
      await page.check("#do_sample");
      await page.fill("#top_k", "0");
      await page.evaluate(`(() => { for (const [id, v] of Object.entries({ temperature: "2", top_p: "1", typical_p: "1" })) { const e = document.getElementById(id); e.value = v; e.dispatchEvent(new Event("input")); } })()`);
      await page.fill("#seed", String(found.seed));
      await page.fill("#stop_sequences", stop);
      await page.click("#generate");
      await waitText("#finish-reason", /^done/);
      assert.equal(await page.textContent("#finish-reason"), "done (eos token)");
      assert.equal(await page.textContent("#generated"), found.text);
    } finally {
      await page.goto(`${server.url}/`);
      await other.close();
      await tiny.dispose();
    }
  });
});
