/**
 * Weights used in place from a checkpoint's mapping are settled at load (CpuBackend.settleMappedWeights,
 * native/src/memory.cc settle_file_pages): resident, and where the page cache held them in pieces
 * smaller than 2 MiB (as it holds a file just written), dropped and read again through the mapping so
 * that they are mapped 2 MiB at a time. Decoding streams every weight once per token; see README, decode.
 */
import assert from "node:assert/strict";
import { closeSync, mkdirSync, mkdtempSync, openSync, readdirSync, readFileSync, readlinkSync, rmSync, statfsSync, writeSync } from "node:fs";
import { release, tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";
import { CpuBackend } from "../src/backend/cpu.js";
import { native } from "../src/backend/native.js";
import { SafetensorsFile } from "../src/checkpoint/safetensors.js";
import { loadEngine } from "../src/engine/load.js";
import { writeParts } from "./helpers/checkpoint-edit.js";
import { fixtureDir } from "./helpers/fixtures.js";

const MiB = 2 ** 20;

/** How many of this process's file descriptors refer to `path`. */
function openFilesOf(path: string): number {
  return readdirSync("/proc/self/fd").filter((fd) => {
    try {
      return readlinkSync(`/proc/self/fd/${fd}`) === path;
    } catch {
      return false;
    }
  }).length;
}

/**
 * Whether a file in `dir` can be mapped 2 MiB at a time after a re-read: transparent huge pages for
 * madvise'd mappings, the PAGEMAP_SCAN ioctl (Linux 6.7) that tells which pieces are, and a
 * filesystem whose page cache holds 2 MiB folios (ext4 from 6.16, xfs). Elsewhere nothing is re-read.
 */
function hugeFoliosPossible(dir: string): boolean {
  if (process.platform !== "linux" || process.env.BLOSSOM_FILE_HUGEPAGES === "0") return false;
  try {
    if (readFileSync("/sys/kernel/mm/transparent_hugepage/enabled", "utf8").includes("[never]")) return false;
  } catch {
    return false;
  }
  const [major = 0, minor = 0] = release().split(".").map((n) => parseInt(n, 10));
  const atLeast = (a: number, b: number) => major > a || (major === a && minor >= b);
  const type = statfsSync(dir).type;
  if (type === 0xef53) return atLeast(6, 16); // ext4
  if (type === 0x58465342) return atLeast(6, 7); // xfs
  return false;
}

/**
 * Writes a safetensors file holding one bf16 matrix of `rows` x 1024 with a known pattern, 64 KiB per
 * write as a download or a copy writes it (one large write can leave the page cache holding it in
 * 2 MiB folios already); returns its path.
 */
function writeMatrixFile(dir: string, name: string, rows: number): string {
  const data = Buffer.alloc(rows * 1024 * 2);
  for (let i = 0; i < data.length / 2; i++) data.writeUInt16LE(0x3f80 + (i % 97), 2 * i); // bf16 1.0 .. 1.75
  const staged = join(dir, `${name}.whole`);
  writeParts(staged, { "w.weight": { dtype: "BF16", shape: [rows, 1024], data_offsets: [0, data.length] } }, data);
  const bytes = readFileSync(staged);
  rmSync(staged);
  const file = join(dir, name);
  const fd = openSync(file, "w");
  try {
    for (let at = 0; at < bytes.length; at += 64 * 1024) writeSync(fd, bytes, at, Math.min(64 * 1024, bytes.length - at));
  } finally {
    closeSync(fd);
  }
  return file;
}

for (const where of ["a short path", "a path longer than a line buffer, of segments like an address range"]) {
test(`a just-written checkpoint's in-place weights are read again into 2 MiB pages at load, once, with their bytes intact (${where})`, () => {
  const dir = mkdtempSync(join(tmpdir(), "blossom-settle-"));
  try {
    // /proc/self/smaps lists the mapping's path on its header line: a long one, "ab-cd" like an
    // address range, must not be taken for another mapping's header.
    const folder = where === "a short path" ? dir : join(dir, ...Array.from({ length: 6 }, () => "ab-cd-".repeat(16)));
    mkdirSync(folder, { recursive: true });
    // 12 MiB of weights, just written: the page cache holds them as the writes left them.
    const path = writeMatrixFile(folder, "model.safetensors", 6144);
    const expected = readFileSync(path);
    const file = SafetensorsFile.open(path);
    try {
      const view = file.tensor("w.weight");
      const backend = new CpuBackend();
      const matrix = backend.matrix(view, "bf16", { use: "linear" });
      const first = backend.settleMappedWeights();
      assert.equal(first.bytes, view.byteLength);
      // The 2 MiB pieces of the file the tensor touches (the last, partial one excepted).
      assert.equal(first.eligibleBytes, Math.floor(expected.length / (2 * MiB)) * 2 * MiB);
      if (hugeFoliosPossible(folder)) {
        assert.equal(first.hugeBytesBefore, 0, "a file just written is not mapped 2 MiB at a time");
        assert.equal(first.filesReread, 1);
        assert.equal(first.hugeBytesAfter, first.eligibleBytes);
      } else {
        // Nothing to gain here: at most the probe piece was read again, and nothing is mapped 2 MiB at a time.
        assert.equal(first.filesReread, 0);
        assert.equal(first.hugeBytesAfter, 0);
      }
      // What the mapping reads now is the file's content.
      const mapped = Buffer.from(native().view(view.region, 0, expected.length));
      assert.ok(mapped.equals(expected), "the mapping reads the file's bytes after the re-read");
      // And the matrix computes with it: y = W x for x = e_0 picks column 0 of every row.
      const x = new Float32Array(1024);
      x[0] = 1;
      const y = new Float32Array(6144);
      backend.linear(y, x, 1, matrix, null);
      for (let r = 0; r < 6144; r += 1531) assert.equal(y[r], 1 + ((r * 1024) % 97) / 128);
      // Settled: a second load finds it so and reads nothing again.
      backend.matrix(view, "bf16", { use: "linear" });
      const second = backend.settleMappedWeights();
      assert.equal(second.filesReread, 0);
      assert.equal(second.hugeBytesBefore, first.hugeBytesAfter);
      // Only matrices handed out since the last call are settled.
      assert.deepEqual(backend.settleMappedWeights(), { bytes: 0, eligibleBytes: 0, hugeBytesBefore: 0, hugeBytesAfter: 0, filesReread: 0 });
      // The re-read pieces were mapped again from the same open file: still one mapping of it.
      assert.equal(readFileSync("/proc/self/maps", "utf8").split("\n").filter((l) => l.endsWith(path)).length, 1);
    } finally {
      file.dispose();
    }
    // Unmapped, and the file it kept open for that is closed.
    assert.equal(readFileSync("/proc/self/maps", "utf8").split("\n").filter((l) => l.endsWith(path)).length, 0);
    assert.equal(openFilesOf(path), 0);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});
}

test("matrices converted at load are not settled; a resident load reports what it uses in place", () => {
  const dir = mkdtempSync(join(tmpdir(), "blossom-settle-"));
  try {
    const path = writeMatrixFile(dir, "m.safetensors", 2048);
    const file = SafetensorsFile.open(path);
    try {
      const backend = new CpuBackend();
      backend.matrix(file.tensor("w.weight"), "f32", { use: "linear" }); // a converted copy
      assert.deepEqual(backend.settleMappedWeights(), { bytes: 0, eligibleBytes: 0, hugeBytesBefore: 0, hugeBytesAfter: 0, filesReread: 0 });
    } finally {
      file.dispose();
    }
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
  // A fixture's weights are used in place (bf16 as stored): all of them are reported.
  const loaded = loadEngine(fixtureDir("trained-bloom-small"), { kvCacheTokens: 64 });
  try {
    assert.ok(loaded.mappedWeights);
    const w = loaded.weights;
    let matrixBytes = w.wordEmbeddings.bytes + (w.lmHead === w.wordEmbeddings ? 0 : w.lmHead.bytes);
    for (let i = 0; i < w.numLayers; i++) {
      const l = w.layer(i);
      matrixBytes += l.queryKeyValue.weight.bytes + l.dense.weight.bytes + l.denseHTo4h.weight.bytes + l.dense4hToH.weight.bytes;
    }
    assert.equal(loaded.mappedWeights.bytes, matrixBytes);
  } finally {
    loaded.dispose();
  }
  const converted = loadEngine(fixtureDir("trained-bloom-small"), { kvCacheTokens: 64, dtype: "fp32" });
  try {
    assert.equal(converted.mappedWeights?.bytes, 0);
  } finally {
    converted.dispose();
  }
});

test("pieces to read again in several runs (some already in 2 MiB pages) are settled in one load", () => {
  const dir = mkdtempSync(join(tmpdir(), "blossom-settle-"));
  try {
    // Three 6 MiB matrices; the middle one settled first, so the others are two runs apart.
    const rows = 3072, bytes = rows * 1024 * 2;
    const data = Buffer.alloc(3 * bytes);
    for (let i = 0; i < data.length / 2; i++) data.writeUInt16LE(0x3f80 + (i % 89), 2 * i);
    const header = Object.fromEntries(["a", "b", "c"].map((n, k) => [`${n}.weight`, { dtype: "BF16", shape: [rows, 1024], data_offsets: [k * bytes, (k + 1) * bytes] as [number, number] }]));
    const staged = join(dir, "staged.safetensors");
    writeParts(staged, header, data);
    const whole = readFileSync(staged);
    rmSync(staged);
    const path = join(dir, "model.safetensors");
    const fd = openSync(path, "w");
    for (let at = 0; at < whole.length; at += 64 * 1024) writeSync(fd, whole, at, Math.min(64 * 1024, whole.length - at));
    closeSync(fd);
    const file = SafetensorsFile.open(path);
    try {
      const middle = new CpuBackend();
      middle.matrix(file.tensor("b.weight"), "bf16", { use: "linear" });
      middle.settleMappedWeights();
      const all = new CpuBackend();
      for (const n of ["a", "b", "c"]) all.matrix(file.tensor(`${n}.weight`), "bf16", { use: "linear" });
      const first = all.settleMappedWeights();
      if (hugeFoliosPossible(dir)) {
        assert.equal(first.filesReread, 1);
        assert.equal(first.hugeBytesAfter, first.eligibleBytes, "all of it mapped 2 MiB at a time after one load");
      }
      for (const n of ["a", "b", "c"]) all.matrix(file.tensor(`${n}.weight`), "bf16", { use: "linear" });
      assert.equal(all.settleMappedWeights().filesReread, 0);
      assert.ok(Buffer.from(native().view(file.tensor("a.weight").region, 0, whole.length)).equals(whole));
    } finally {
      file.dispose();
    }
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});
