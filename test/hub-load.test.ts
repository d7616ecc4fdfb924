/** loadModel and the CLI by Hub id: download through a fake Hub on 127.0.0.1, then the golden logits. */
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { promisify } from "node:util";
import { fileURLToPath } from "node:url";
import { after, before, describe, test } from "node:test";
import { loadModel } from "../src/index.js";
import { REPO, startHubTest, type HubTestContext } from "./helpers/fake-hub.js";
import { Golden, maxAbsDiff } from "./helpers/fixtures.js";

const run = promisify(execFile);
const cli = fileURLToPath(new URL("../src/cli/main.js", import.meta.url));

describe("models by Hub id", () => {
  let t: HubTestContext;
  let saved: NodeJS.ProcessEnv;
  before(async () => {
    t = await startHubTest();
    saved = { ...process.env };
    process.env.HF_ENDPOINT = t.hub.url;
    process.env.HF_HUB_CACHE = t.cacheDir;
    delete process.env.HF_TOKEN;
    delete process.env.HF_HUB_OFFLINE;
  });
  after(async () => {
    process.env = saved;
    await t.cleanup();
  });

  test("loadModel('org/name') downloads into the HF cache and computes the golden logits", async () => {
    const model = await loadModel(REPO);
    const golden = new Golden("tiny-bloom-b");
    try {
      assert.ok(model.dir.startsWith(t.cacheDir), model.dir);
      const c = golden.manifest.cases.single;
      const out = await model.forward([c.input_ids]);
      assert.ok(maxAbsDiff(out.data, golden.tensor(c.logits).data) <= 1e-4);
    } finally {
      await model.dispose();
      golden.dispose();
    }
  });

  test("blossom generate --model org/name@v1 works from the cache with the Hub offline", async () => {
    const env = { ...process.env, HF_ENDPOINT: t.hub.url, HF_HUB_CACHE: t.cacheDir };
    await run(process.execPath, [cli, "download", `${REPO}@v1`, "-q"], { env });
    const { stdout } = await run(process.execPath, [cli, "generate", "-m", `${REPO}@v1`, "--max-new-tokens", "3", "hello"], {
      env: { ...env, HF_HUB_OFFLINE: "1" },
    });
    assert.match(stdout, /in=hello\nout=hello/);
  });
});
