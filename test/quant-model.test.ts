/**
 * int8 at model level, on the golden fixtures: logits close to the fp32 reference (cosine), the
 * trained model's held-out perplexity within the targets, `blossom quantize` checkpoints that
 * round-trip bit-exactly (files and logits), and malformed quantized checkpoints that fail clearly.
 */
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, symlinkSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { native } from "../src/backend/native.js";
import { openCheckpoint } from "../src/checkpoint/checkpoint.js";
import { loadEngine } from "../src/engine/load.js";
import { loadModel } from "../src/index.js";
import { quantizeCheckpoint } from "../src/quant/quantize.js";
import { scaleTensorName } from "../src/quant/scheme.js";
import { copyCheckpoint, editHeader, editJson } from "./helpers/checkpoint-edit.js";
import { fixtureDir, fixtureNames, Golden, type FixtureName } from "./helpers/fixtures.js";

function cosine(a: Float32Array, b: Float32Array): number {
  let ab = 0, aa = 0, bb = 0;
  for (let i = 0; i < a.length; i++) {
    ab += a[i]! * b[i]!;
    aa += a[i]! * a[i]!;
    bb += b[i]! * b[i]!;
  }
  return ab / Math.sqrt(aa * bb);
}

/** Lowest per-position cosine of a model's `single`-case logits to the golden fp32 logits. */
async function minCosine(name: FixtureName, dir: string, options: Parameters<typeof loadModel>[1]): Promise<number> {
  const golden = new Golden(name);
  const model = await loadModel(dir, options);
  try {
    const c = golden.manifest.cases.single;
    const expected = golden.tensor(c.logits).data;
    const out = await model.forward([c.input_ids]);
    const V = model.config.vocabSize;
    let min = 1;
    for (let t = 0; t < c.input_ids.length; t++) min = Math.min(min, cosine(out.data.subarray(t * V, (t + 1) * V), expected.subarray(t * V, (t + 1) * V)));
    return min;
  } finally {
    await model.dispose();
    golden.dispose();
  }
}

const tmp = mkdtempSync(join(tmpdir(), "blossom-quant-test-"));
after(() => rmSync(tmp, { recursive: true, force: true }));

describe("int8 logits stay close to fp32 on every fixture", () => {
  for (const name of fixtureNames) {
    test(`${name}: int8 cosine >= 0.999, int8-mixed >= 0.998`, async () => {
      const int8 = await minCosine(name, fixtureDir(name), { dtype: "int8" });
      const mixed = await minCosine(name, fixtureDir(name), { dtype: "int8-mixed" });
      assert.ok(int8 >= 0.999, `int8: min cosine ${int8}`);
      // LLM.int8's 8-bit per-token activations cost more on the tiny random models (bench/int8.ts quality).
      assert.ok(mixed >= (name === "trained-bloom-small" ? 0.999 : 0.998), `int8-mixed: min cosine ${mixed}`);
    });
  }
});

describe("trained-bloom-small held-out perplexity", () => {
  const dir = fixtureDir("trained-bloom-small");
  const text = readFileSync(join(dir, "golden/heldout.txt"), "utf8");
  const fp32 = 36.14381824854606; // golden/eval.json
  for (const [dtype, limit] of [["int8", 0.015], ["int8-mixed", 0.01]] as const) {
    test(`${dtype}: within +${limit * 100}% of fp32`, async () => {
      const model = await loadModel(dir, { dtype });
      try {
        const { perplexity } = await model.perplexity(text, { context: 128, stride: 128 });
        assert.ok(perplexity <= fp32 * (1 + limit), `${dtype}: perplexity ${perplexity} vs fp32 ${fp32}`);
        assert.ok(perplexity >= fp32 * (1 - limit), `${dtype}: perplexity ${perplexity} is suspiciously far below fp32 ${fp32}`);
      } finally {
        await model.dispose();
      }
    });
  }
});

describe("blossom quantize round trip", () => {
  // tiny-bloom-b: bf16, sharded; tiny-bloom-c: fp16, "transformer." prefix; trained: bf16, one file.
  for (const [name, scheme, groupSize] of [
    ["tiny-bloom-b", "int8", 32],
    ["tiny-bloom-c", "int8", undefined],
    ["trained-bloom-small", "int8", undefined],
    ["trained-bloom-small", "int8-mixed", undefined],
  ] as const) {
    test(`${name} ${scheme}${groupSize ? ` group ${groupSize}` : ""}: files and logits bit-exact`, async () => {
      const source = fixtureDir(name);
      const out = join(tmp, `${name}-${scheme}-${groupSize ?? "default"}`);
      const result = await quantizeCheckpoint(source, out, { scheme, groupSize, maxShardBytes: name === "tiny-bloom-b" ? 200_000 : undefined });
      assert.ok(result.quantizedTensors > 0);
      const config = JSON.parse(readFileSync(join(out, "config.json"), "utf8"));
      assert.equal(config.quantization_config.quant_method, "blossom-int8");
      assert.equal(config.quantization_config.scheme, scheme);
      for (const f of ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]) assert.ok(existsSync(join(out, f)), `${f} copied`);
      if (name === "tiny-bloom-b") assert.ok(existsSync(join(out, "model.safetensors.index.json")), "sharded");

      // The stored int8 tensors are exactly what quantize-at-load builds, and everything else is a copy.
      const src = openCheckpoint(source), dst = openCheckpoint(out);
      const atLoad = loadEngine(source, { dtype: scheme, ...(groupSize ? { int8GroupSize: groupSize } : {}) });
      try {
        const bytes = (v: { region: Parameters<ReturnType<typeof native>["view"]>[0]; byteOffset: number; byteLength: number }) =>
          new Uint8Array(native().view(v.region, v.byteOffset, v.byteLength));
        for (const [tensorName, view] of src.tensors) {
          const stored = dst.tensors.get(tensorName)!;
          assert.ok(stored, `${tensorName} present`);
          if (stored.dtype !== "i8") {
            assert.deepEqual(bytes(stored), bytes(view), `${tensorName} copied unchanged`);
            continue;
          }
          assert.ok(dst.tensors.has(scaleTensorName(tensorName)), `${tensorName} has scales`);
        }
        const embedding = atLoad.weights.wordEmbeddings as unknown as { region: never; byteOffset: number; scalesRegion: never; scalesOffset: number; outFeatures: number; inFeatures: number };
        const storedName = [...dst.tensors.keys()].find((k) => k.endsWith("word_embeddings.weight"))!;
        const q = dst.tensors.get(storedName)!, s = dst.tensors.get(scaleTensorName(storedName))!;
        assert.deepEqual(bytes(q), new Uint8Array(native().view(embedding.region, embedding.byteOffset, q.byteLength)), "int8 values");
        assert.deepEqual(bytes(s), new Uint8Array(native().view(embedding.scalesRegion, embedding.scalesOffset, s.byteLength)), "fp16 scales");
      } finally {
        atLoad.dispose();
        src.dispose();
        dst.dispose();
      }

      // Same logits whether quantized at load or loaded pre-quantized (with "auto" or the scheme's name).
      const golden = new Golden(name);
      const ids = golden.manifest.cases.single.input_ids;
      golden.dispose();
      const logits = async (dir: string, dtype: "auto" | typeof scheme) => {
        const m = await loadModel(dir, { dtype, ...(dir === source && groupSize ? { int8GroupSize: groupSize } : {}) });
        try {
          assert.equal(m.info.dtype, scheme);
          return (await m.forward([ids])).data;
        } finally {
          await m.dispose();
        }
      };
      const reference = await logits(source, scheme);
      assert.deepEqual(await logits(out, "auto"), reference);
      assert.deepEqual(await logits(out, scheme), reference);
    });
  }

  test("a pre-quantized checkpoint is mapped, not copied: its weight bytes are the file's", () => {
    const out = join(tmp, "trained-bloom-small-int8-default");
    const loaded = loadEngine(out, {});
    try {
      const ck = openCheckpoint(out);
      let stored = 0;
      for (const v of ck.tensors.values()) stored += v.shape.length === 2 ? v.byteLength : v.shape.reduce((a, b) => a * b, 1) * 4;
      ck.dispose();
      assert.equal(loaded.weights.weightBytes, stored);
    } finally {
      loaded.dispose();
    }
  });

  test("the CLI writes a checkpoint that generate loads", async () => {
    const out = join(tmp, "cli-int8");
    const cli = join(process.cwd(), "dist/src/cli/main.js");
    const q = spawnSync(process.execPath, [cli, "quantize", "--model", fixtureDir("trained-bloom-small"), "--dtype", "int8", "--out", out], { encoding: "utf8" });
    assert.equal(q.status, 0, q.stderr);
    assert.match(q.stdout, /int8 matrices/);
    const g = spawnSync(process.execPath, [cli, "generate", "--model", out, "--max-new-tokens", "5", "The city of"], { encoding: "utf8" });
    assert.equal(g.status, 0, g.stderr);
    // The same greedy text as quantizing at load in this process (and, for this prompt, as fp32).
    const m = await loadModel(fixtureDir("trained-bloom-small"), { dtype: "int8" });
    try {
      const [text] = (await m.generate(["The city of"], { maxNewTokens: 5 })).texts;
      assert.equal(text, " the city, and the");
      assert.ok(g.stdout.includes(`out=The city of${text}\n`), g.stdout);
    } finally {
      await m.dispose();
    }
  });
});

describe("malformed quantized checkpoints fail clearly", () => {
  let good: string;
  before(async () => {
    good = join(tmp, "malformed-source");
    await quantizeCheckpoint(fixtureDir("tiny-bloom-a"), good, { scheme: "int8" });
  });
  const broken = (edit: (dir: string) => void) => {
    const copy = copyCheckpoint(good);
    edit(copy.dir);
    return copy;
  };
  const cases: [string, (dir: string) => void, RegExp, Record<string, unknown>?][] = [
    [
      "missing scales",
      (dir) => editHeader(join(dir, "model.safetensors"), (h) => void delete h["h.0.mlp.dense_h_to_4h.weight_scale"]),
      /int8 tensor "h\.0\.mlp\.dense_h_to_4h\.weight" has no scales: missing tensor "h\.0\.mlp\.dense_h_to_4h\.weight_scale" \(F16, shape \[256, 1\]\)/,
    ],
    [
      "a group size that does not match the scales",
      (dir) => editJson(join(dir, "config.json"), (c) => void ((c.quantization_config as Record<string, unknown>).group_size = 32)),
      /tensor "h\.0\.mlp\.dense_4h_to_h\.weight_scale" has shape \[64, 1\] but config\.json's quantization_config \(group_size 32\) implies \[64, 8\] for "h\.0\.mlp\.dense_4h_to_h\.weight" \[64, 256\]/,
    ],
    [
      "scales of the wrong dtype",
      (dir) =>
        editHeader(join(dir, "model.safetensors"), (h) => void ((h["h.1.self_attention.dense.weight_scale"] as { dtype: string }).dtype = "BF16")),
      /tensor "h\.1\.self_attention\.dense\.weight_scale" must be F16, got bf16/,
    ],
    [
      "a scale tensor without its weight",
      (dir) =>
        editHeader(join(dir, "model.safetensors"), (h) => {
          h["ln_f.bias_scale"] = h["ln_f.bias"]!;
          delete h["ln_f.bias"];
        }),
      /scale tensor "ln_f\.bias_scale" has no weight "ln_f\.bias" beside it/,
    ],
    [
      "an unknown quant_method",
      (dir) => editJson(join(dir, "config.json"), (c) => void ((c.quantization_config as Record<string, unknown>).quant_method = "bitsandbytes")),
      /quant_method is "bitsandbytes"; Blossom reads checkpoints written by `blossom quantize`/,
    ],
    [
      "an unknown scheme",
      (dir) => editJson(join(dir, "config.json"), (c) => void ((c.quantization_config as Record<string, unknown>).scheme = "int4")),
      /quantization_config\.scheme: expected "int8" or "int8-mixed", got "int4"/,
    ],
    [
      "int8 tensors without quantization_config",
      (dir) => editJson(join(dir, "config.json"), (c) => void delete c.quantization_config),
      /tensor "h\.0\.mlp\.dense_4h_to_h\.weight" is int8 but config\.json has no quantization_config/,
    ],
    [
      "a group size that is not a multiple of 32",
      (dir) => editJson(join(dir, "config.json"), (c) => void ((c.quantization_config as Record<string, unknown>).group_size = 257)),
      /quantization_config\.group_size: expected a multiple of 32 \(as `blossom quantize` writes\), got 257/,
    ],
    [
      // 288 gives the same scale shapes as 256 for rows of 256 inputs; the files record what they were written with.
      "a group size other than the one the weight files were written with",
      (dir) => editJson(join(dir, "config.json"), (c) => void ((c.quantization_config as Record<string, unknown>).group_size = 288)),
      /quantization_config\.group_size is 288, but .*model\.safetensors was quantized with group size 256/,
    ],
    [
      "a threshold that is not a number >= 0",
      (dir) => editJson(join(dir, "config.json"), (c) => void ((c.quantization_config as Record<string, unknown>).threshold = "abc")),
      /config\.json.*quantization_config\.threshold: expected a number >= 0, got "abc"/,
    ],
    ["a dtype other than the checkpoint's scheme", () => {}, /is quantized \(int8\); load it with dtype "auto" or "int8", not "bf16"/, { dtype: "bf16" }],
    ["a group size other than the checkpoint's", () => {}, /was quantized with group size 256; it cannot be loaded with 64/, { int8GroupSize: 64 }],
  ];
  for (const [what, edit, message, options] of cases) {
    test(what, () => {
      const copy = broken(edit);
      try {
        assert.throws(() => loadEngine(copy.dir, options ?? {}), (err: Error) => {
          assert.match(err.message, message);
          return true;
        });
      } finally {
        copy.cleanup();
      }
    });
  }

  test("an int8-mixed checkpoint given a group size says it takes none", async () => {
    const mixed = join(tmp, "mixed-for-group");
    await quantizeCheckpoint(fixtureDir("tiny-bloom-a"), mixed, { scheme: "int8-mixed" });
    assert.throws(() => loadEngine(mixed, { int8GroupSize: 256 }), /is quantized as int8-mixed \(one scale per row\), which takes no group size/);
  });

  test("a source whose files are symlinks (a Hub snapshot) gets its tokenizer and side files copied; create-random's marker is not", async () => {
    const snapshot = join(tmp, "snapshot-links");
    mkdirSync(snapshot);
    for (const f of readdirSync(fixtureDir("trained-bloom-small"))) {
      if (f !== "golden") symlinkSync(join(fixtureDir("trained-bloom-small"), f), join(snapshot, f));
    }
    writeFileSync(join(snapshot, ".blossom-random.json"), "{}");
    const out = join(tmp, "snapshot-links-int8");
    await quantizeCheckpoint(snapshot, out, { scheme: "int8" });
    const copied = readdirSync(out).sort();
    for (const f of ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"]) assert.ok(copied.includes(f), `${f} in ${copied}`);
    assert.ok(!copied.includes(".blossom-random.json"));
    const m = await loadModel(out);
    try {
      assert.equal((await m.generate(["In the beginning"], { maxNewTokens: 3 })).numGeneratedTokens[0], 3);
    } finally {
      await m.dispose();
    }
  });

  test("quantizing a quantized checkpoint, or into a folder that is not empty, is refused", async () => {
    await assert.rejects(quantizeCheckpoint(good, join(tmp, "twice"), { scheme: "int8" }), /already quantized \(int8\)/);
    await assert.rejects(quantizeCheckpoint(fixtureDir("tiny-bloom-a"), good, { scheme: "int8" }), /exists and is not an empty folder/);
    await assert.rejects(quantizeCheckpoint(fixtureDir("tiny-bloom-a"), join(tmp, "g48"), { scheme: "int8", groupSize: 48 }), /multiple of 32/);
  });
});
