/**
 * Strategy "tensor" under mpirun with 2 and 3 ranks (3 does not divide 4 heads, nor tiny-bloom-b's
 * 1100-token vocabulary: uneven splits are handled): logits within the fixtures' tolerance on
 * single sequences, padded batches and KV-cache decoding, and the golden greedy tokens; only rank 0
 * prints from the CLI.
 */
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";
import { describe, test } from "node:test";
import { native } from "../src/backend/native.js";
import { fixtureDir } from "./helpers/fixtures.js";
import { hasMpirun } from "./helpers/system.js";

const run = promisify(execFile);
const helper = fileURLToPath(new URL("./helpers/tensor-parallel-run.js", import.meta.url));
const cli = fileURLToPath(new URL("../src/cli/main.js", import.meta.url));


// Root may run mpirun in containers and CI; oversubscribe lets 3 ranks share 2 cores.
const mpirun = (np: number, args: string[]) =>
  run("mpirun", ["--allow-run-as-root", "--oversubscribe", "-np", String(np), process.execPath, ...args], {
    timeout: 240_000,
    env: { ...process.env, OMPI_MCA_btl_vader_single_copy_mechanism: "none" },
  });

const ready = hasMpirun() && native().mpiAvailable();
const why = !hasMpirun() ? "mpirun is not installed (npm test installs openmpi-bin through apt)" : "the addon was built without MPI";

describe("tensor parallelism", { skip: ready ? false : why }, () => {
  for (const [np, fixture, layout] of [
    [2, "tiny-bloom-a", ""],
    [3, "tiny-bloom-a", ""],
    [2, "tiny-bloom-b", ""],
    [3, "trained-bloom-small", ""],
    [2, "tiny-bloom-b", "panels"],
  ] as const) {
    test(`${np} ranks on ${fixture}${layout ? " (linear weights in column panels)" : ""}: golden logits, KV decode and greedy tokens`, async () => {
      const { stdout } = await mpirun(np, layout ? [helper, fixture, layout] : [helper, fixture]);
      const lines = stdout.trim().split("\n").filter((l) => l.startsWith("{"));
      assert.equal(lines.length, 1, `only rank 0 reports:\n${stdout}`);
      const r = JSON.parse(lines[0]!) as { ranks: { size: number }; tolerance: number; single: number; padded: number; kvDecode: number; greedy: boolean };
      assert.equal(r.ranks.size, np);
      assert.ok(r.single <= r.tolerance, `single ${r.single}`);
      assert.ok(r.padded <= r.tolerance, `padded ${r.padded}`);
      assert.ok(r.kvDecode <= r.tolerance, `kv decode ${r.kvDecode}`);
      assert.equal(r.greedy, true);
    });
  }

  test("blossom generate --strategy tensor: only rank 0 prints", async () => {
    const { stdout } = await mpirun(2, [cli, "generate", "-m", fixtureDir("trained-bloom-small"), "--strategy", "tensor", "--max-new-tokens", "12", "In the beginning"]);
    assert.equal(stdout.split("in=In the beginning").length - 1, 1, stdout);
    assert.match(stdout, /out=In the beginning of the first month, in the first month/);
  });

  test("ranks agree on the KV cache's size: the smallest rank's", async () => {
    const { stdout } = await mpirun(2, [fileURLToPath(new URL("./helpers/tensor-kv-run.js", import.meta.url))]);
    assert.deepEqual(JSON.parse(stdout.trim()), { capacity: 256, generated: 252 });
  });

  test("more ranks than heads is refused clearly", async () => {
    await assert.rejects(mpirun(5, [helper, "tiny-bloom-a"]), /needs at least 5 attention heads; this model has 4/);
  });
});
