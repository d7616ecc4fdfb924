/**
 * Processes (and calls) that write the same output at once: each writes into a partial folder of
 * its own and renames it into place, so none mixes or deletes another's files, and what a run killed
 * mid-write leaves is removed by the next one (an audit found: two quantize runs left a folder
 * without weights while the winner reported success; two create-random runs renamed each other's
 * files; a killed run's partial int8 copy stayed in the cache for good).
 */
import assert from "node:assert/strict";
import { chmodSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, renameSync, rmSync, statSync, symlinkSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { basename, join } from "node:path";
import { after, describe, test } from "node:test";
import { createRandomCheckpoint } from "../src/checkpoint/create-random.js";
import { beginOutput, processAlive } from "../src/folders.js";
import { loadModel } from "../src/index.js";
import { quantizeCheckpoint } from "../src/quant/quantize.js";
import { fixtureDir } from "./helpers/fixtures.js";

describe("writers of the same output", () => {
  const dir = mkdtempSync(join(tmpdir(), "blossom-concurrent-"));
  after(() => rmSync(dir, { recursive: true, force: true }));

  test("two quantize runs into one --out: one complete checkpoint, the other refused, nothing partial left", async () => {
    for (let round = 0; round < 4; round++) {
      const out = join(dir, `q${round}`);
      const results = await Promise.allSettled([0, 1].map(() => quantizeCheckpoint(fixtureDir("trained-bloom-small"), out, { scheme: "int8" })));
      assert.equal(results.filter((r) => r.status === "fulfilled").length, 1, JSON.stringify(results.map((r) => r.status)));
      const refused = results.find((r) => r.status === "rejected") as PromiseRejectedResult;
      assert.match(String(refused.reason.message), /was written by another process|exists and is not an empty folder/);
      const m = await loadModel(out);
      try {
        assert.equal((await m.generate(["In the beginning"], { maxNewTokens: 2 })).numGeneratedTokens[0], 2);
      } finally {
        await m.dispose();
      }
      assert.deepEqual(readdirSync(dir).filter((f) => f.includes(".partial-")), []);
    }
  });

  test("two create-random runs into one folder both succeed, and the folder they leave loads", async () => {
    const out = join(dir, "random");
    await Promise.all([0, 1].map(() => createRandomCheckpoint({ preset: "tiny", dtype: "bf16", out, seed: 3 })));
    const m = await loadModel(out);
    try {
      assert.equal((await m.generate(["hello"], { maxNewTokens: 2 })).numGeneratedTokens[0], 2);
    } finally {
      await m.dispose();
    }
    assert.deepEqual(readdirSync(dir).filter((f) => f.startsWith("random.")), []);
  });

  test("a partial folder a dead process of this host left is removed by the next writer; nothing else is", async () => {
    let dead = 4_000_000;
    while (processAlive(dead)) dead++;
    const out = join(dir, "after-crash");
    // A leftover as this host names them, but for a dead pid.
    const mine = beginOutput(out).work;
    const leftover = mine.replace(`-${process.pid}-`, `-${dead}-`);
    renameSync(mine, leftover);
    // Not ours to remove: a user's folder with a similar name, another host's leftover.
    const usersFolder = `${out}.partial-${dead}-notes`;
    const tag = /\.partial-([0-9a-f]{6})-/.exec(leftover)![1]!;
    const otherHost = leftover.replace(`.partial-${tag}-`, `.partial-${tag === "000000" ? "ffffff" : "000000"}-`);
    mkdirSync(usersFolder);
    mkdirSync(otherHost);
    await quantizeCheckpoint(fixtureDir("trained-bloom-small"), out, { scheme: "int8" });
    assert.deepEqual(readdirSync(dir).filter((f) => f.startsWith("after-crash.")).sort(), [basename(usersFolder), basename(otherHost)].sort());
  });

  test("--out that is a symlink to an empty folder, or the working folder: the files land there", async () => {
    const real = join(dir, "real-out");
    mkdirSync(real);
    const link = join(dir, "link-out");
    symlinkSync(real, link);
    await quantizeCheckpoint(fixtureDir("trained-bloom-small"), link, { scheme: "int8" });
    assert.ok(readdirSync(real).includes("model.safetensors"));
    const here = join(dir, "cwd-out");
    mkdirSync(here);
    const cwd = process.cwd();
    process.chdir(here);
    try {
      await createRandomCheckpoint({ preset: "tiny", dtype: "bf16", out: "." });
    } finally {
      process.chdir(cwd);
    }
    assert.ok(readdirSync(here).includes("model.safetensors"));
  });

  test("an existing empty --out keeps its identity and mode (files are staged inside it); a dangling symlink is refused", async () => {
    const out = join(dir, "kept");
    mkdirSync(out);
    chmodSync(out, 0o2775);
    const before = statSync(out);
    await quantizeCheckpoint(fixtureDir("trained-bloom-small"), out, { scheme: "int8" });
    const after = statSync(out);
    assert.equal(after.ino, before.ino);
    assert.equal(after.mode & 0o7777, 0o2775);
    assert.ok(readdirSync(out).includes("model.safetensors"));
    assert.ok(!readdirSync(out).some((f) => f.includes("partial")));
    const dangling = join(dir, "dangling");
    symlinkSync(join(dir, "nothing-here"), dangling);
    await assert.rejects(createRandomCheckpoint({ preset: "tiny", dtype: "bf16", out: dangling }), /symbolic link to nothing/);
    assert.deepEqual(readdirSync(dir).filter((f) => f.startsWith("dangling.")), []);
  });

  test("a folder filled by something else while create-random runs is left alone, and the run refused", async () => {
    const out = join(dir, "filled-meanwhile");
    let filled = false;
    await assert.rejects(
      createRandomCheckpoint({
        preset: "tiny",
        dtype: "bf16",
        out,
        onProgress: () => {
          if (filled) return;
          filled = true;
          mkdirSync(out);
          writeFileSync(join(out, "config.json"), "theirs");
          writeFileSync(join(out, "model.safetensors.index.json"), "theirs too");
        },
      }),
      /was filled by something other than create-random while this run worked/,
    );
    assert.equal(readFileSync(join(out, "config.json"), "utf8"), "theirs");
    assert.equal(readFileSync(join(out, "model.safetensors.index.json"), "utf8"), "theirs too");
    assert.deepEqual(readdirSync(out).sort(), ["config.json", "model.safetensors.index.json"]);
    assert.deepEqual(readdirSync(dir).filter((f) => f.startsWith("filled-meanwhile.")), []);
  });

  test("replacing an earlier create-random output keeps a user's own files and folders", async () => {
    const out = join(dir, "with-notes");
    await createRandomCheckpoint({ preset: "tiny", dtype: "bf16", out, seed: 1 });
    writeFileSync(join(out, "notes.txt"), "mine");
    mkdirSync(join(out, "mydata"));
    writeFileSync(join(out, "mydata", "x.txt"), "x");
    await Promise.all([2, 3].map((seed) => createRandomCheckpoint({ preset: "tiny", dtype: "bf16", out, seed })));
    assert.equal(readFileSync(join(out, "notes.txt"), "utf8"), "mine");
    assert.equal(readFileSync(join(out, "mydata", "x.txt"), "utf8"), "x");
    const m = await loadModel(out);
    await m.dispose();
  });
});
