import { test } from "node:test";
import assert from "node:assert/strict";
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import type { FileHandle } from "node:fs/promises";
import { HugePageWriter } from "../src/checkpoint/huge-page-writer.js";
import { bloomTensorShapes } from "../src/checkpoint/presets.js";
import {
  planSafetensors,
  planShards,
  SafetensorsWriter,
  writeSafetensors,
  writeShardedCheckpoint,
  type SafetensorsDType,
  type TensorSource,
} from "../src/checkpoint/safetensors-writer.js";
import { BlossomError } from "../src/errors.js";

const FIXTURES = process.env.BLOSSOM_FIXTURES ?? fileURLToPath(new URL("../../../shared/fixtures/", import.meta.url));
const haveFixtures = existsSync(join(FIXTURES, "tiny-bloom-a", "model.safetensors"));

interface ParsedTensor {
  dtype: string;
  shape: number[];
  begin: number;
  end: number;
  bytes: Uint8Array;
}

/** A deliberately independent reader: checks the format rules, returns tensors in file order. */
function parseSafetensors(file: Uint8Array): { metadata?: Record<string, string>; tensors: Map<string, ParsedTensor>; headerText: string } {
  assert.ok(file.length >= 8, "file shorter than its length prefix");
  const headerLength = Number(new DataView(file.buffer, file.byteOffset).getBigUint64(0, true));
  assert.equal(headerLength % 8, 0, "header length is a multiple of 8");
  const headerText = new TextDecoder().decode(file.subarray(8, 8 + headerLength));
  assert.match(headerText, /^\{.*\} *$/s, "header is JSON padded with spaces");
  const header = JSON.parse(headerText) as Record<string, unknown>;
  const dataStart = 8 + headerLength;
  const sizes: Record<string, number> = { F64: 8, F32: 4, F16: 2, BF16: 2, I8: 1, U8: 1, I32: 4, I64: 8, I16: 2, BOOL: 1 };
  const tensors = new Map<string, ParsedTensor>();
  let expectedBegin = 0;
  let metadata: Record<string, string> | undefined;
  for (const [name, value] of Object.entries(header)) {
    if (name === "__metadata__") {
      metadata = value as Record<string, string>;
      continue;
    }
    const info = value as { dtype: string; shape: number[]; data_offsets: [number, number] };
    const [begin, end] = info.data_offsets;
    assert.equal(begin, expectedBegin, `${name} starts where the previous tensor ends`);
    assert.equal(end - begin, info.shape.reduce((a, b) => a * b, 1) * sizes[info.dtype], `${name} byte length matches dtype and shape`);
    assert.equal((dataStart + begin) % 8, 0, `${name} is 8-byte aligned in the file`);
    tensors.set(name, { dtype: info.dtype, shape: info.shape, begin, end, bytes: file.subarray(dataStart + begin, dataStart + end) });
    expectedBegin = end;
  }
  assert.equal(dataStart + expectedBegin, file.length, "the last tensor ends at the end of the file");
  return { metadata, tensors, headerText };
}

function sourcesFrom(parsed: Map<string, ParsedTensor>, order: string[], chunkBytes = 4099): TensorSource[] {
  return order.map((name) => {
    const t = parsed.get(name)!;
    return {
      name,
      dtype: t.dtype as SafetensorsDType,
      shape: t.shape,
      *data() {
        for (let i = 0; i < t.bytes.length; i += chunkBytes) yield t.bytes.subarray(i, i + chunkBytes);
      },
    };
  });
}

function tempDir(): string {
  return mkdtempSync(join(tmpdir(), "blossom-st-"));
}

test("empty files match the reference implementation's bytes", () => {
  // From the reference's own tests: "{}" padded to 8; with metadata {"framework":"pt"} 40 bytes.
  assert.deepEqual([...planSafetensors([]).header], [8, 0, 0, 0, 0, 0, 0, 0, 123, 125, 32, 32, 32, 32, 32, 32]);
  const withMetadata = planSafetensors([], { metadata: { framework: "pt" } }).header;
  assert.equal(new TextDecoder().decode(withMetadata.subarray(8)), '{"__metadata__":{"framework":"pt"}}     ');
  assert.equal(withMetadata[0], 40);
});

test("layout sorts by dtype width then name, header in data order, tensors 8-byte aligned", () => {
  const layout = planSafetensors(
    [
      { name: "b.int8", dtype: "I8", shape: [3] },
      { name: "z.f16", dtype: "F16", shape: [3] },
      { name: "a.bf16", dtype: "BF16", shape: [1] },
      { name: "y.f32", dtype: "F32", shape: [2, 2] },
      { name: "x.f32", dtype: "F32", shape: [1] },
    ],
    { metadata: { format: "pt" } },
  );
  assert.deepEqual(layout.order.map((t) => t.name), ["x.f32", "y.f32", "a.bf16", "z.f16", "b.int8"]);
  const text = new TextDecoder().decode(layout.header.subarray(8)).trimEnd();
  assert.equal(
    text,
    '{"__metadata__":{"format":"pt"},"x.f32":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},' +
      '"y.f32":{"dtype":"F32","shape":[2,2],"data_offsets":[4,20]},"a.bf16":{"dtype":"BF16","shape":[1],"data_offsets":[20,22]},' +
      '"z.f16":{"dtype":"F16","shape":[3],"data_offsets":[22,28]},"b.int8":{"dtype":"I8","shape":[3],"data_offsets":[28,31]}}',
  );
  assert.equal(layout.header.length % 8, 0);
  assert.equal(layout.fileSize, layout.header.length + 31);
  const given = planSafetensors([{ name: "b", dtype: "F32", shape: [1] }, { name: "a", dtype: "F32", shape: [1] }], { order: "given" });
  assert.deepEqual(given.order.map((t) => t.name), ["b", "a"]);
});

test("rejects bad descriptors with messages naming the tensor", () => {
  assert.throws(() => planSafetensors([{ name: "w", dtype: "F33" as SafetensorsDType, shape: [1] }]), /tensor w: unknown dtype "F33"/);
  assert.throws(() => planSafetensors([{ name: "w", dtype: "F32", shape: [-1] }]), /tensor w: shape must be/);
  assert.throws(() => planSafetensors([{ name: "w", dtype: "F32", shape: [1] }, { name: "w", dtype: "F32", shape: [1] }]), /tensor w is listed twice/);
  assert.throws(() => planSafetensors([{ name: "__metadata__", dtype: "F32", shape: [1] }]), /invalid tensor name/);
  assert.throws(() => planSafetensors([], { metadata: { format: 1 as unknown as string } }), /__metadata__.format must be a string/);
});

test("writer checks byte counts, accepts tensors in any order, and leaves no partial file on failure", async () => {
  const dir = tempDir();
  try {
    const specs = [
      { name: "a", dtype: "F32" as const, shape: [2] },
      { name: "b", dtype: "F16" as const, shape: [3] },
    ];
    const path = join(dir, "x.safetensors");
    const writer = await SafetensorsWriter.create(path, specs, { metadata: { format: "pt" } });
    await writer.write("b", new Uint8Array([1, 2, 3, 4]));
    await assert.rejects(writer.write("b", new Uint8Array(3)), (err: unknown) => err instanceof BlossomError && /tensor b: got 7 bytes, its dtype and shape hold 6/.test(err.message));
    await writer.write("b", new Uint8Array([5, 6]));
    await assert.rejects(writer.write("c", new Uint8Array(1)), /tensor c is not in this file's header/);
    await assert.rejects(writer.close(), /tensor a: got 0 bytes, its dtype and shape need 8/);
    await writer.write("a", new Uint8Array([9, 9, 9, 9]));
    await writer.write("a", new Uint8Array([8, 8, 8, 8]));
    await writer.close();
    const parsed = parseSafetensors(readFileSync(path));
    assert.deepEqual(parsed.metadata, { format: "pt" });
    assert.deepEqual([...parsed.tensors.get("a")!.bytes], [9, 9, 9, 9, 8, 8, 8, 8]);
    assert.deepEqual([...parsed.tensors.get("b")!.bytes], [1, 2, 3, 4, 5, 6]);
    assert.deepEqual(readdirSync(dir), ["x.safetensors"]);

    const failing: TensorSource[] = [{ name: "a", dtype: "F32", shape: [4], data: () => [new Uint8Array(8)] }];
    await assert.rejects(writeSafetensors(join(dir, "y.safetensors"), failing), /tensor a: got 8 bytes, its dtype and shape need 16/);
    assert.deepEqual(readdirSync(dir), ["x.safetensors"], "neither y.safetensors nor its partial file remains");
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test("shard planning follows save_pretrained: greedy in given order, oversized tensors alone", () => {
  const t = (name: string, n: number) => ({ name, dtype: "U8" as const, shape: [n] });
  const plan = planShards([t("a", 4), t("b", 4), t("c", 3), t("d", 20), t("e", 1)], { maxShardBytes: 10 });
  assert.deepEqual(plan.shards.map((s) => s.map((x) => x.name)), [["a", "b"], ["c"], ["d"], ["e"]]);
  assert.deepEqual(plan.files, [1, 2, 3, 4].map((i) => `model-0000${i}-of-00004.safetensors`));
  assert.equal(plan.totalSize, 32);
  assert.deepEqual(planShards([t("a", 4)], { maxShardBytes: 10 }).files, ["model.safetensors"]);
});

for (const name of ["tiny-bloom-a", "tiny-bloom-c", "trained-bloom-small"]) {
  test(`rewriting ${name}'s tensors reproduces its model.safetensors byte for byte`, { skip: !haveFixtures && "fixtures not found" }, async () => {
    const original = readFileSync(join(FIXTURES, name, "model.safetensors"));
    const parsed = parseSafetensors(original);
    const dir = tempDir();
    try {
      // Reversed, to show the file order comes from the writer, not from the caller.
      const names = [...parsed.tensors.keys()].reverse();
      await writeSafetensors(join(dir, "model.safetensors"), sourcesFrom(parsed.tensors, names), { metadata: parsed.metadata });
      assert.ok(Buffer.compare(readFileSync(join(dir, "model.safetensors")), original) === 0);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
}

test("sharded writing reproduces tiny-bloom-b's two shards and index byte for byte", { skip: !haveFixtures && "fixtures not found" }, async () => {
  const fixture = join(FIXTURES, "tiny-bloom-b");
  const index = JSON.parse(readFileSync(join(fixture, "model.safetensors.index.json"), "utf8")) as { weight_map: Record<string, string> };
  const shardFiles = [...new Set(Object.values(index.weight_map))].sort();
  const tensors = new Map<string, ParsedTensor>();
  for (const file of shardFiles) for (const [k, v] of parseSafetensors(readFileSync(join(fixture, file))).tensors) tensors.set(k, v);
  const stateDictOrder = bloomTensorShapes({ name: "b", hiddenSize: 96, numLayers: 3, numHeads: 8, vocabSize: 1100 }).map((t) => t.name);
  assert.deepEqual([...stateDictOrder].sort(), [...tensors.keys()].sort());
  // Any limit from shard 1's size up to (excluding) that plus the next tensor gives this split.
  const firstShardBytes = [...tensors.entries()].filter(([k]) => index.weight_map[k] === shardFiles[0]).reduce((s, [, t]) => s + t.bytes.length, 0);
  const dir = tempDir();
  try {
    const progress: number[] = [];
    const result = await writeShardedCheckpoint(dir, sourcesFrom(tensors, stateDictOrder, 4096), {
      maxShardBytes: firstShardBytes,
      onProgress: (done, total) => progress.push(done / total),
    });
    assert.deepEqual(result.files, shardFiles);
    assert.equal(result.indexFile, "model.safetensors.index.json");
    assert.equal(progress.at(-1), 1);
    for (const file of [...shardFiles, "model.safetensors.index.json"]) {
      assert.ok(Buffer.compare(readFileSync(join(dir, file)), readFileSync(join(fixture, file))) === 0, `${file} differs`);
    }
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test("one shard is model.safetensors with no index; async chunk sources work", async () => {
  const dir = tempDir();
  try {
    const values = new Float32Array([1.5, -2, 3.25, 0]);
    const result = await writeShardedCheckpoint(dir, [
      {
        name: "w",
        dtype: "F32",
        shape: [2, 2],
        async *data() {
          yield new Uint8Array(values.buffer, 0, 6);
          yield new Uint8Array(values.buffer, 6, 10);
        },
      },
    ]);
    assert.deepEqual(result.files, ["model.safetensors"]);
    assert.equal(result.indexFile, undefined);
    assert.deepEqual(readdirSync(dir), ["model.safetensors"]);
    const parsed = parseSafetensors(readFileSync(join(dir, "model.safetensors")));
    assert.deepEqual(parsed.metadata, { format: "pt" });
    const w = parsed.tensors.get("w")!;
    assert.deepEqual([...new Float32Array(new Uint8Array(w.bytes).buffer)], [1.5, -2, 3.25, 0]);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test("HugePageWriter fills every aligned 2 MiB range of the file with one write, bytes unchanged", async () => {
  const MiB = 1024 * 1024;
  const file = new Uint8Array(9 * MiB);
  const writes: { position: number; length: number }[] = [];
  const handle = {
    async write(buffer: Uint8Array, offset: number, length: number, position: number) {
      file.set(buffer.subarray(offset, offset + length), position);
      writes.push({ position, length });
      return { bytesWritten: length, buffer };
    },
  } as unknown as FileHandle;
  const expected = new Uint8Array(file.length);
  const out = new HugePageWriter(handle, 0);
  // A header, then pieces of odd sizes, then a jump (a tensor written out of order), then a large piece.
  const pieces: [number, number][] = [[0, 123], [123, 65_536], [65_659, 3 * MiB + 7], [6 * MiB + 5, 100], [3 * MiB + 65_666, 1_500_000]];
  let seed = 1;
  for (const [position, length] of pieces) {
    const data = Uint8Array.from({ length }, () => (seed = (seed * 48271) % 2147483647) & 255);
    expected.set(data, position);
    await out.write(data, position);
  }
  await out.flush();
  assert.deepEqual(file, expected);
  // A write ends on a 2 MiB boundary unless the run of sequential bytes it belongs to ends there.
  writes.forEach((w, i) => {
    const end = w.position + w.length;
    const runEnds = i === writes.length - 1 || writes[i + 1]!.position !== end;
    assert.ok(w.length <= 4 * MiB, `write of ${w.length} bytes`);
    assert.ok(runEnds || end % (2 * MiB) === 0, `write ${i} ends at ${end}, inside a 2 MiB page, mid-run`);
  });
  assert.deepEqual(writes.slice(0, 2), [{ position: 0, length: 2 * MiB }, { position: 2 * MiB, length: 65_659 + 3 * MiB + 7 - 2 * MiB }]);
});
