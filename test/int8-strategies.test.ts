/**
 * int8 under every strategy: replicas and pipeline offload use a quantized copy made once in the
 * cache (replicas then map it once; offload streams its int8 layers from disk); tensor parallelism
 * quantizes each rank's slice at load. All give the greedy tokens of int8 in one process, except
 * int8-mixed under tensor parallelism: its one scale per weight row is then taken over each rank's
 * columns, so late tokens may differ (int8's groups align with the slices and it stays identical).
 */
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { mkdtempSync, readdirSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { promisify } from "node:util";
import { fileURLToPath } from "node:url";
import { after, before, describe, test } from "node:test";
import { native } from "../src/backend/native.js";
import { loadModel, type LoadModelOptions } from "../src/index.js";
import { fixtureDir } from "./helpers/fixtures.js";
import { hasMpirun } from "./helpers/system.js";

const run = promisify(execFile);
const cli = fileURLToPath(new URL("../src/cli/main.js", import.meta.url));
const dir = fixtureDir("trained-bloom-small");
const prompts = ["In the beginning", "And the LORD said unto Moses,", "Blessed are the"];

async function greedy(options: LoadModelOptions): Promise<{ texts: string[]; tokenIds: number[][] }> {
  const model = await loadModel(dir, options);
  try {
    return await model.generate(prompts, { maxNewTokens: 16 });
  } finally {
    await model.dispose();
  }
}

for (const dtype of ["int8", "int8-mixed"] as const) {
  describe(`${dtype} with every strategy`, () => {
    let cache: string;
    let saved: string | undefined;
    let expected: string[];
    let expectedIds: number[][];
    before(async () => {
      cache = mkdtempSync(join(tmpdir(), "blossom-cache-"));
      saved = process.env.BLOSSOM_CACHE;
      process.env.BLOSSOM_CACHE = cache;
      ({ texts: expected, tokenIds: expectedIds } = await greedy({ dtype }));
    });
    after(() => {
      if (saved === undefined) delete process.env.BLOSSOM_CACHE;
      else process.env.BLOSSOM_CACHE = saved;
      rmSync(cache, { recursive: true, force: true });
    });

    test("replicas: one quantized copy in the cache, mapped once by both workers", async () => {
      const model = await loadModel(dir, { dtype, strategy: "replicas", replicas: 2 });
      try {
        const copies = readdirSync(join(cache, "quantized"));
        assert.equal(copies.length, 1);
        assert.match(copies[0]!, new RegExp(`^trained-bloom-small-${dtype}-g[^-]+-[0-9a-f]{16}$`));
        const file = join(cache, "quantized", copies[0]!, "model.safetensors");
        assert.equal(readFileSync("/proc/self/maps", "utf8").split("\n").filter((l) => l.endsWith(file)).length, 1);
        assert.deepEqual((await model.generate(prompts, { maxNewTokens: 16 })).texts, expected);
      } finally {
        await model.dispose();
      }
    });

    test("pipeline: int8 layers offloaded to disk, read back with their scales", async () => {
      const model = await loadModel(dir, { dtype, strategy: "pipeline", maxMemory: "0:2MB,cpu:1MB,disk", placement: "sequential" });
      try {
        assert.deepEqual((await model.generate(prompts, { maxNewTokens: 16 })).texts, expected);
        const stats = await model.stats();
        assert.ok(stats.offload!.diskLayers >= 3, JSON.stringify(stats.offload));
      } finally {
        await model.dispose();
      }
    });

    test("tensor: each rank quantizes its slices", { skip: hasMpirun() && native().mpiAvailable() ? false : "no MPI" }, async () => {
      const { stdout } = await run(
        "mpirun",
        ["--allow-run-as-root", "--oversubscribe", "-np", "2", process.execPath, cli, "generate", "-m", dir, "--strategy", "tensor", "--dtype", dtype, "--max-new-tokens", "16", "--json", ...prompts],
        { timeout: 240_000 },
      );
      const results = stdout.trim().split("\n").filter((l) => l.startsWith("{")).map((l) => JSON.parse(l) as { text: string; tokenIds: number[] });
      if (dtype === "int8") assert.deepEqual(results.map((r) => r.text), expected);
      else results.forEach((r, i) => assert.deepEqual(r.tokenIds.slice(0, 10), expectedIds[i]!.slice(0, 10), prompts[i]));
    });
  });
}
