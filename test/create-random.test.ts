import { test } from "node:test";
import assert from "node:assert/strict";
import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { Tokenizer } from "tokenizers";
import { createRandomCheckpoint, RANDOM_CHECKPOINT_MARKER, randomInitFor } from "../src/checkpoint/create-random.js";
import { bfloat16ToFloat32, float32ToBfloat16, float32ToFloat16 } from "../src/checkpoint/half-float.js";
import { bloomTensorShapes, configJsonText, presetConfig, presetParameterCount, presets } from "../src/checkpoint/presets.js";
import { BlossomError } from "../src/errors.js";

const FIXTURES = process.env.BLOSSOM_FIXTURES ?? fileURLToPath(new URL("../../../shared/fixtures/", import.meta.url));
const haveFixtures = existsSync(join(FIXTURES, "tiny-bloom-a", "model.safetensors"));

interface Header {
  [name: string]: { dtype: string; shape: number[]; data_offsets: [number, number] };
}

function readHeader(path: string): { header: Header; dataStart: number; file: Buffer } {
  const file = readFileSync(path);
  const length = Number(file.readBigUInt64LE(0));
  const header = JSON.parse(file.subarray(8, 8 + length).toString("utf8")) as Header;
  delete (header as Record<string, unknown>).__metadata__;
  return { header, dataStart: 8 + length, file };
}

function tensorValues(path: string, name: string): Float32Array {
  const { header, dataStart, file } = readHeader(path);
  const { dtype, data_offsets: [begin, end] } = header[name];
  const bytes = new Uint8Array(file.subarray(dataStart + begin, dataStart + end));
  if (dtype === "F32") return new Float32Array(bytes.buffer);
  const bits = new Uint16Array(bytes.buffer);
  assert.equal(dtype, "BF16");
  return Float32Array.from(bits, bfloat16ToFloat32);
}

function tempDir(): string {
  return mkdtempSync(join(tmpdir(), "blossom-random-"));
}

test("presets have the published BLOOM dimensions and parameter counts", () => {
  const expected = {
    "bloom-560m": [1024, 24, 16],
    "bloom-1b7": [2048, 24, 16],
    "bloom-3b": [2560, 30, 32],
    "bloom-7b1": [4096, 30, 32],
  } as const;
  for (const [name, [hidden, layers, heads]] of Object.entries(expected)) {
    const config = presetConfig(name);
    assert.equal(config.hidden_size, hidden);
    assert.equal(config.n_layer, layers);
    assert.equal(config.n_head, heads);
    assert.equal(config.vocab_size, 250880);
    assert.equal(config.layer_norm_epsilon, 1e-5);
    assert.deepEqual([config.unk_token_id, config.bos_token_id, config.eos_token_id, config.pad_token_id], [0, 1, 2, 3]);
    assert.equal(config.model_type, "bloom");
    assert.equal(config.apply_residual_connection_post_layernorm, false);
  }
  // The model cards' counts (tied lm_head not counted twice).
  assert.equal(presetParameterCount(presets["bloom-560m"]), 559_214_592);
  assert.equal(presetParameterCount(presets["bloom-7b1"]), 7_069_016_064);
  assert.equal(presetConfig("bloom-560m", "fp16").torch_dtype, "float16");
  assert.throws(() => presetConfig("bloom-176b"), (err: unknown) => err instanceof BlossomError && /preset: unknown preset "bloom-176b"/.test(err.message));
});

test("config.json has the fixtures' keys and formatting", { skip: !haveFixtures && "fixtures not found" }, () => {
  const fixtureText = readFileSync(join(FIXTURES, "tiny-bloom-a", "config.json"), "utf8");
  const fixture = JSON.parse(fixtureText) as Record<string, unknown>;
  const config = presetConfig("tiny", "fp32");
  assert.deepEqual(Object.keys(config).sort(), Object.keys(fixture).sort());
  // tiny has tiny-bloom-a's shape but a smaller vocabulary: with the vocabulary swapped, identical text.
  assert.equal(configJsonText({ ...config, vocab_size: 1536 }), fixtureText);
});

test("tiny checkpoint: Hugging Face layout, fixture naming and shapes, loadable tokenizer", { skip: !haveFixtures && "fixtures not found" }, async () => {
  const dir = tempDir();
  try {
    const result = await createRandomCheckpoint({ preset: "tiny", dtype: "fp32", out: join(dir, "out"), seed: 3 });
    assert.equal(result.dir, join(dir, "out"));
    const files = readdirSync(result.dir).sort();
    assert.deepEqual(files, [RANDOM_CHECKPOINT_MARKER, "config.json", "generation_config.json", "model.safetensors", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"].sort());
    assert.equal(result.bytes, files.filter((f) => f !== RANDOM_CHECKPOINT_MARKER).reduce((s, f) => s + readFileSync(join(result.dir, f)).length, 0));
    for (const file of ["generation_config.json", "tokenizer_config.json", "special_tokens_map.json"]) {
      assert.equal(readFileSync(join(result.dir, file), "utf8"), readFileSync(join(FIXTURES, "tiny-bloom-a", file), "utf8"), file);
    }

    // Same dims as tiny-bloom-a except the vocabulary: same names, same header order, same shapes.
    const mine = readHeader(join(result.dir, "model.safetensors")).header;
    const fixture = readHeader(join(FIXTURES, "tiny-bloom-a", "model.safetensors")).header;
    assert.deepEqual(Object.keys(mine), Object.keys(fixture));
    for (const [name, info] of Object.entries(fixture)) {
      const shape = name === "word_embeddings.weight" ? [1024, 64] : info.shape;
      assert.deepEqual(mine[name].shape, shape, name);
      assert.equal(mine[name].dtype, "F32");
    }
    assert.equal(mine["lm_head.weight"], undefined, "lm_head is tied, not stored");
    assert.deepEqual(Object.keys(mine).sort(), bloomTensorShapes(presets.tiny).map((t) => t.name).sort());

    const config = JSON.parse(readFileSync(join(result.dir, "config.json"), "utf8")) as Record<string, unknown>;
    assert.equal(config.vocab_size, 1024);
    assert.equal(config.torch_dtype, "float32");

    const tokenizer = Tokenizer.fromFile(join(result.dir, "tokenizer.json"));
    assert.equal(tokenizer.getVocabSize(true), config.vocab_size);
    const text = "Random weights, real shapes: naïve café — 日本語 🌸\n\nDone.";
    const ids = (await tokenizer.encode(text)).getIds();
    assert.ok(ids.every((id) => id < 1024));
    assert.equal(await tokenizer.decode(ids, false), text);

    // Init: weights ~N(0, 0.02), biases small but non-zero, layer-norm gains around 1.
    const path = join(result.dir, "model.safetensors");
    const stats = (values: Float32Array) => {
      const mean = values.reduce((s, x) => s + x, 0) / values.length;
      const std = Math.sqrt(values.reduce((s, x) => s + (x - mean) ** 2, 0) / values.length);
      return { mean, std };
    };
    const embeddings = stats(tensorValues(path, "word_embeddings.weight"));
    assert.ok(Math.abs(embeddings.mean) < 1e-3 && Math.abs(embeddings.std - 0.02) < 1e-3, JSON.stringify(embeddings));
    const gain = stats(tensorValues(path, "h.1.post_attention_layernorm.weight"));
    assert.ok(Math.abs(gain.mean - 1) < 0.01 && gain.std > 0.01 && gain.std < 0.03, JSON.stringify(gain));
    const bias = tensorValues(path, "h.0.self_attention.query_key_value.bias");
    assert.ok(bias.every((x) => x !== 0 && Math.abs(x) < 0.2));
    assert.deepEqual(randomInitFor("ln_f.weight"), { mean: 1, std: 0.02 });
    assert.deepEqual(randomInitFor("ln_f.bias"), { mean: 0, std: 0.02 });
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test("a seed makes the output byte-identical, with or without worker threads; dtypes agree", async () => {
  const dir = tempDir();
  try {
    const a = await createRandomCheckpoint({ preset: "tiny", dtype: "bf16", out: join(dir, "a"), seed: 11, threads: 0 });
    const b = await createRandomCheckpoint({ preset: "tiny", dtype: "bf16", out: join(dir, "b"), seed: 11, threads: 2 });
    const c = await createRandomCheckpoint({ preset: "tiny", dtype: "bf16", out: join(dir, "c"), seed: 12 });
    for (const file of readdirSync(a.dir)) {
      assert.ok(readFileSync(join(a.dir, file)).equals(readFileSync(join(b.dir, file))), `${file} differs between runs`);
    }
    assert.ok(!readFileSync(join(a.dir, "model.safetensors")).equals(readFileSync(join(c.dir, "model.safetensors"))), "another seed, other weights");

    const f32 = await createRandomCheckpoint({ preset: "tiny", dtype: "fp32", out: join(dir, "f32"), seed: 11 });
    const f16 = await createRandomCheckpoint({ preset: "tiny", dtype: "fp16", out: join(dir, "f16"), seed: 11 });
    const name = "h.1.mlp.dense_4h_to_h.weight";
    const full = tensorValues(join(f32.dir, "model.safetensors"), name);
    const bf16Bits = (() => {
      const { header, dataStart, file } = readHeader(join(a.dir, "model.safetensors"));
      const [begin, end] = header[name].data_offsets;
      return new Uint16Array(new Uint8Array(file.subarray(dataStart + begin, dataStart + end)).buffer);
    })();
    const f16Header = readHeader(join(f16.dir, "model.safetensors"));
    assert.equal(f16Header.header[name].dtype, "F16");
    const [begin, end] = f16Header.header[name].data_offsets;
    const f16Bits = new Uint16Array(new Uint8Array(f16Header.file.subarray(f16Header.dataStart + begin, f16Header.dataStart + end)).buffer);
    for (let i = 0; i < full.length; i++) {
      assert.equal(bf16Bits[i], float32ToBfloat16(full[i]));
      assert.equal(f16Bits[i], float32ToFloat16(full[i]));
    }
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test("sharded output has an index; rerunning into an earlier output replaces it, foreign directories are refused", async () => {
  const dir = tempDir();
  try {
    const out = join(dir, "model");
    const progress: Array<[number, number]> = [];
    await createRandomCheckpoint({ preset: "tiny", dtype: "fp32", out, seed: 1, maxShardBytes: 200_000, onProgress: (d, t) => progress.push([d, t]) });
    const index = JSON.parse(readFileSync(join(out, "model.safetensors.index.json"), "utf8")) as { metadata: { total_size: number }; weight_map: Record<string, string> };
    const shardFiles = [...new Set(Object.values(index.weight_map))].sort();
    assert.ok(shardFiles.length >= 3);
    assert.deepEqual(shardFiles, shardFiles.map((_, i) => `model-0000${i + 1}-of-0000${shardFiles.length}.safetensors`));
    assert.deepEqual(Object.keys(index.weight_map), Object.keys(index.weight_map).sort());
    let total = 0;
    for (const file of shardFiles) {
      const { header } = readHeader(join(out, file));
      for (const [name, info] of Object.entries(header)) {
        assert.equal(index.weight_map[name], file);
        total += info.data_offsets[1] - info.data_offsets[0];
      }
    }
    assert.equal(index.metadata.total_size, total);
    assert.equal(presetParameterCount(presets.tiny) * 4, total);
    assert.deepEqual(progress.at(-1), [total, total]);

    // A user's own file in the earlier output survives; stale shards and the index do not.
    writeFileSync(join(out, "notes.txt"), "mine");
    await createRandomCheckpoint({ preset: "tiny", dtype: "bf16", out, seed: 1 });
    assert.deepEqual(readdirSync(out).filter((f) => f.includes("safetensors")), ["model.safetensors"]);
    assert.equal(readFileSync(join(out, "notes.txt"), "utf8"), "mine");

    const foreign = join(dir, "foreign");
    mkdirSync(foreign);
    writeFileSync(join(foreign, "data.bin"), "x");
    await assert.rejects(
      createRandomCheckpoint({ preset: "tiny", dtype: "bf16", out: foreign }),
      (err: unknown) => err instanceof BlossomError && err.code === "parameter" && err.message.includes("is not empty and is not a create-random output"),
    );
    assert.deepEqual(readdirSync(foreign), ["data.bin"]);
    await assert.rejects(createRandomCheckpoint({ preset: "tiny", dtype: "int4" as "bf16", out: join(dir, "x") }), /dtype: expected bf16, fp16 or fp32/);
    await assert.rejects(createRandomCheckpoint({ preset: "tiny", dtype: "bf16", out: join(dir, "x"), seed: -1 }), /seed: must be an integer/);
    await assert.rejects(createRandomCheckpoint({ preset: "nope", dtype: "bf16", out: join(dir, "x") }), /preset: unknown preset "nope"/);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test("the create-random command writes a checkpoint and rejects bad options", async () => {
  const { Command } = await import("commander");
  const { registerCreateRandomCommand } = await import("../src/cli/commands/create-random.js");
  const dir = tempDir();
  const written: string[] = [];
  const originalWrite = process.stdout.write;
  const run = async (...args: string[]) => {
    const program = new Command().exitOverride().configureOutput({ writeErr: () => undefined, writeOut: () => undefined });
    registerCreateRandomCommand(program);
    await program.parseAsync(["node", "blossom", "create-random", ...args]);
  };
  try {
    process.stdout.write = ((chunk: string) => written.push(String(chunk)) > 0) as typeof process.stdout.write;
    await run("--preset", "tiny", "--dtype", "fp16", "--out", join(dir, "cli"), "--seed", "4");
    process.stdout.write = originalWrite;
    assert.match(written.join(""), /^wrote tiny \(166k parameters, fp16, seed 4\) to .*cli: .* in \d+\.\d s\n$/);
    assert.equal(JSON.parse(readFileSync(join(dir, "cli", "config.json"), "utf8")).torch_dtype, "float16");
    await assert.rejects(run("--preset", "bloom-9000", "--out", join(dir, "x")), /Allowed choices are tiny, bloom-560m/);
    await assert.rejects(run("--preset", "tiny", "--out", join(dir, "x"), "--seed", "1.5"), /--seed: expected an integer/);
    await assert.rejects(run("--preset", "tiny"), /required option '--out <dir>' not specified/);
  } finally {
    process.stdout.write = originalWrite;
    rmSync(dir, { recursive: true, force: true });
  }
});

test("an AbortSignal stops the run without leaving partial weight files", async () => {
  const dir = tempDir();
  try {
    const out = join(dir, "aborted");
    const controller = new AbortController();
    await assert.rejects(
      createRandomCheckpoint({ preset: "tiny", dtype: "fp32", out, threads: 2, signal: controller.signal, onProgress: () => controller.abort() }),
      (err: unknown) => err instanceof BlossomError && err.code === "aborted",
    );
    // Nothing is left: the run wrote into a partial folder of its own, removed when it stopped.
    assert.deepEqual(readdirSync(dir), []);
    await createRandomCheckpoint({ preset: "tiny", dtype: "fp32", out });
    assert.ok(readdirSync(out).includes("model.safetensors"));
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});
