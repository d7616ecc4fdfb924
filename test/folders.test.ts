/** createFolder: mkdir -p that fails with the reason where Node's recursive mkdir loops forever (under /proc). */
import assert from "node:assert/strict";
import { existsSync, mkdtempSync, rmSync, statSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { describe, test } from "node:test";
import { createFolder } from "../src/folders.js";

describe("createFolder", () => {
  test("creates missing parents, accepts an existing folder, refuses a file", () => {
    const dir = mkdtempSync(join(tmpdir(), "blossom-folders-"));
    try {
      createFolder(join(dir, "a", "b", "c"));
      assert.ok(statSync(join(dir, "a", "b", "c")).isDirectory());
      createFolder(join(dir, "a"));
      writeFileSync(join(dir, "file"), "");
      assert.throws(() => createFolder(join(dir, "file")), { code: "ENOTDIR" });
      assert.throws(() => createFolder(join(dir, "file", "sub")), { code: "ENOTDIR" });
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  test("under /proc it fails at once instead of looping", (t) => {
    if (!existsSync("/proc/self")) return t.skip("no /proc on this system");
    assert.throws(() => createFolder("/proc/blossom-no-such/x"), (err: NodeJS.ErrnoException) => typeof err.code === "string");
  });
});
