/**
 * Loading checkpoints: the layouts Hugging Face writes (single file, sharded, F32/F16/BF16,
 * "transformer." prefix, tied or explicit lm_head), in-place memory mapping, and one test per
 * malformed input, each checking that the error names the file and tensor at fault.
 */
import assert from "node:assert/strict";
import { appendFileSync, readFileSync, rmSync, truncateSync, writeFileSync } from "node:fs";
import { basename, join } from "node:path";
import { describe, test } from "node:test";
import { native } from "../src/backend/native.js";
import { openCheckpoint } from "../src/checkpoint/checkpoint.js";
import { readBloomConfig } from "../src/checkpoint/config.js";
import { loadEngine } from "../src/engine/load.js";
import { BlossomError } from "../src/errors.js";
import { bloomTensors } from "../src/models/bloom-weights.js";
import { copyCheckpoint, editHeader, editJson, readParts, writeParts } from "./helpers/checkpoint-edit.js";
import { fixtureDir, Golden, maxAbsDiff } from "./helpers/fixtures.js";

/** Asserts that loading `dir` fails with a BlossomError whose message contains every fragment. */
function assertLoadFails(dir: string, ...fragments: string[]): void {
  assert.throws(
    () => {
      const loaded = loadEngine(dir, { kvCacheTokens: 64 });
      loaded.dispose();
    },
    (err: unknown) => {
      assert.ok(err instanceof BlossomError, `expected a BlossomError, got ${String(err)}`);
      for (const f of fragments) assert.ok(err.message.includes(f), `message "${err.message}" lacks "${f}"`);
      return true;
    },
  );
}

function withCopy(fixture: Parameters<typeof fixtureDir>[0], fn: (dir: string) => void): void {
  const copy = copyCheckpoint(fixtureDir(fixture));
  try {
    fn(copy.dir);
  } finally {
    copy.cleanup();
  }
}

describe("checkpoint layouts", () => {
  test("single file F32, sharded BF16, F16 with transformer. prefix all map and validate", () => {
    for (const [name, dtype, files] of [
      ["tiny-bloom-a", "f32", 1],
      ["tiny-bloom-b", "bf16", 2],
      ["tiny-bloom-c", "f16", 1],
    ] as const) {
      const ck = openCheckpoint(fixtureDir(name));
      try {
        assert.equal(ck.files.length, files);
        const t = bloomTensors(ck);
        assert.equal(t.wordEmbeddings.dtype, dtype);
        assert.equal(t.lmHeadTied, true);
        assert.equal(t.layers.length, ck.config.numLayers);
      } finally {
        ck.dispose();
      }
    }
  });

  test("config aliases: n_embed, num_attention_heads, num_hidden_layers; legacy keys ignored", () => {
    withCopy("tiny-bloom-a", (dir) => {
      editJson(join(dir, "config.json"), (c) => {
        c.n_embed = c.hidden_size;
        delete c.hidden_size;
        c.num_attention_heads = c.n_head;
        delete c.n_head;
        c.num_hidden_layers = c.n_layer;
        delete c.n_layer;
      });
      const config = readBloomConfig(dir);
      assert.equal(config.hiddenSize, 64);
      assert.equal(config.numHeads, 4);
      assert.equal(config.numLayers, 2);
    });
  });

  for (const tie of [true, false]) {
    test(`a stored lm_head.weight: ${tie ? "tied (the default), the embeddings are the head, as transformers ties them" : "tie_word_embeddings false, the stored head is used"}`, () => {
      withCopy("tiny-bloom-a", (dir) => {
        const file = join(dir, "model.safetensors");
        const { header, data } = readParts(file);
        const emb = header["word_embeddings.weight"] as { dtype: string; shape: number[]; data_offsets: [number, number] };
        // A head of the embeddings' rows reversed: whether it is read shows in the logits.
        const rows = emb.shape[0]!, rowBytes = (emb.data_offsets[1] - emb.data_offsets[0]) / rows;
        const reversed = Buffer.concat(Array.from({ length: rows }, (_, r) => data.subarray(emb.data_offsets[0] + (rows - 1 - r) * rowBytes, emb.data_offsets[0] + (rows - r) * rowBytes)));
        header["lm_head.weight"] = { dtype: emb.dtype, shape: emb.shape, data_offsets: [data.length, data.length + reversed.length] };
        writeParts(file, header, Buffer.concat([data, reversed]));
        if (!tie) editJson(join(dir, "config.json"), (c) => void (c.tie_word_embeddings = false));
        const golden = new Golden("tiny-bloom-a");
        const loaded = loadEngine(dir, { kvCacheTokens: 64 });
        try {
          const c = golden.manifest.cases.single;
          const [logits] = loaded.engine.step([{ sequence: loaded.engine.createSequence(), tokens: c.input_ids, logits: "all" }]);
          const expected = golden.tensor(c.logits).data;
          if (tie) assert.ok(maxAbsDiff(logits!, expected) <= 1e-4);
          else {
            // Logit v of the reversed head is the tied model's logit (vocab - 1 - v).
            const V = rows, first = logits!.subarray(0, V), golden0 = expected.subarray(0, V);
            assert.ok(maxAbsDiff(first, golden0.slice().reverse()) <= 1e-4);
          }
          assert.equal(bloomTensors(loaded.checkpoint).lmHeadTied, tie);
        } finally {
          loaded.dispose();
          golden.dispose();
        }
      });
    });
  }

  test("weights are memory-mapped, not copied, and dispose() unmaps them", () => {
    const loaded = loadEngine(fixtureDir("trained-bloom-small"), { kvCacheTokens: 64 });
    // Used in place: the store's matrices point into the file mappings (bf16, as stored).
    assert.equal(loaded.weights.wordEmbeddings.dtype, "bf16");
    assert.equal(loaded.weights.weightBytes < loaded.checkpoint.totalBytes * 1.01, true);
    const region = loaded.checkpoint.files[0]!.region;
    assert.ok(native().regionSize(region) > 0);
    loaded.dispose();
    assert.throws(() => native().regionSize(region), /released/);
  });

  test("--dtype fp32 converts a bf16 checkpoint at load, exactly", () => {
    const golden = new Golden("tiny-bloom-b");
    const loaded = loadEngine(fixtureDir("tiny-bloom-b"), { dtype: "fp32", kvCacheTokens: 64 });
    try {
      assert.equal(loaded.weights.wordEmbeddings.dtype, "f32");
      const c = golden.manifest.cases.single;
      const [logits] = loaded.engine.step([{ sequence: loaded.engine.createSequence(), tokens: c.input_ids, logits: "all" }]);
      assert.ok(maxAbsDiff(logits!, golden.tensor(c.logits).data) <= 1e-4);
    } finally {
      loaded.dispose();
      golden.dispose();
    }
  });
});

describe("malformed checkpoints fail with errors naming the file and tensor", () => {
  test("header length past the end of the file", () =>
    withCopy("tiny-bloom-a", (dir) => {
      const file = join(dir, "model.safetensors");
      const buf = readFileSync(file);
      buf.writeBigUInt64LE(BigInt(buf.length * 2), 0);
      writeFileSync(file, buf);
      assertLoadFails(dir, "model.safetensors", "header length", "past the end of the file");
    }));

  test("a file shorter than the 8-byte length prefix", () =>
    withCopy("tiny-bloom-a", (dir) => {
      truncateSync(join(dir, "model.safetensors"), 5);
      assertLoadFails(dir, "model.safetensors", "8-byte header length");
    }));

  test("header that is not JSON", () =>
    withCopy("tiny-bloom-a", (dir) => {
      const file = join(dir, "model.safetensors");
      const { data } = readParts(file);
      writeParts(file, '{"word_embeddings.weight": {"dtype": "F32", ', data);
      assertLoadFails(dir, "model.safetensors", "not valid JSON");
    }));

  test("data offsets past the data section", () =>
    withCopy("tiny-bloom-a", (dir) => {
      editHeader(join(dir, "model.safetensors"), (h) => {
        const t = h["ln_f.bias"] as { data_offsets: [number, number] };
        t.data_offsets = [t.data_offsets[0] + 10_000_000, t.data_offsets[1] + 10_000_000];
      });
      assertLoadFails(dir, "model.safetensors", 'tensor "ln_f.bias"', "run past the data section");
    }));

  test("data offsets that disagree with dtype and shape", () =>
    withCopy("tiny-bloom-a", (dir) => {
      editHeader(join(dir, "model.safetensors"), (h) => {
        const t = h["ln_f.bias"] as { data_offsets: [number, number] };
        t.data_offsets = [t.data_offsets[0], t.data_offsets[1] - 4];
      });
      assertLoadFails(dir, "model.safetensors", 'tensor "ln_f.bias"', "needs 256");
    }));

  test("overlapping tensors", () =>
    withCopy("tiny-bloom-a", (dir) => {
      editHeader(join(dir, "model.safetensors"), (h) => {
        const a = h["ln_f.bias"] as { data_offsets: [number, number] };
        const b = h["ln_f.weight"] as { data_offsets: [number, number] };
        b.data_offsets = [a.data_offsets[0] + 4, a.data_offsets[1] + 4];
      });
      assertLoadFails(dir, "model.safetensors", "overlaps", "ln_f");
    }));

  test("unsupported dtype", () =>
    withCopy("tiny-bloom-a", (dir) => {
      editHeader(join(dir, "model.safetensors"), (h) => {
        (h["ln_f.bias"] as { dtype: string }).dtype = "F64";
      });
      assertLoadFails(dir, "model.safetensors", 'tensor "ln_f.bias"', '"F64" is not supported');
    }));

  test("a shape that disagrees with config.json", () =>
    withCopy("tiny-bloom-a", (dir) => {
      editHeader(join(dir, "model.safetensors"), (h) => {
        const t = h["h.1.mlp.dense_h_to_4h.weight"] as { shape: number[] };
        t.shape = [t.shape[1]!, t.shape[0]!]; // same byte count, transposed
      });
      assertLoadFails(dir, "model.safetensors", 'tensor "h.1.mlp.dense_h_to_4h.weight"', "has shape [64, 256]", "implies [256, 64]");
    }));

  test("config.json whose hidden_size disagrees with the weights", () =>
    withCopy("tiny-bloom-a", (dir) => {
      editJson(join(dir, "config.json"), (c) => (c.hidden_size = 128));
      assertLoadFails(dir, "model.safetensors", "has shape", "hidden_size 128");
    }));

  test("a dtype that disagrees with config.json's torch_dtype", () =>
    withCopy("tiny-bloom-b", (dir) => {
      editJson(join(dir, "config.json"), (c) => (c.torch_dtype = "float16"));
      assertLoadFails(dir, "safetensors", "is bf16 but config.json says torch_dtype float16");
    }));

  test("a tensor name listed twice (JSON keeps the last) leaves bytes no tensor covers", () =>
    withCopy("tiny-bloom-a", (dir) => {
      const file = join(dir, "model.safetensors");
      const { header, data } = readParts(file);
      const bias = header["ln_f.bias"] as { dtype: string; shape: number[]; data_offsets: [number, number] };
      const fives = Buffer.alloc(bias.data_offsets[1] - bias.data_offsets[0]);
      for (let i = 0; i < fives.length; i += 4) fives.writeFloatLE(5, i);
      // The header text with a second "ln_f.bias" entry, pointing at appended bytes: JSON.parse keeps it.
      const second = JSON.stringify({ ...bias, data_offsets: [data.length, data.length + fives.length] });
      const text = JSON.stringify(header).replace(/\}$/, `,"ln_f.bias":${second}}`);
      writeParts(file, text, Buffer.concat([data, fives]));
      assertLoadFails(dir, file, `bytes ${bias.data_offsets[0]}-${bias.data_offsets[1]} belong to no tensor`);
    }));

  test("trailing bytes after the last tensor", () =>
    withCopy("tiny-bloom-a", (dir) => {
      const file = join(dir, "model.safetensors");
      const { header, data } = readParts(file);
      writeParts(file, header, Buffer.concat([data, Buffer.alloc(1000)]));
      assertLoadFails(dir, file, `bytes ${data.length}-${data.length + 1000} belong to no tensor`);
    }));

  test("an n_layer far beyond the stored tensors fails at once, before listing that many layers", () =>
    withCopy("tiny-bloom-a", (dir) => {
      editJson(join(dir, "config.json"), (c) => void (c.n_layer = 1e9));
      assertLoadFails(dir, join(dir, "config.json"), "n_layer 1000000000 needs 12 tensors a layer");
    }));

  test("model.safetensors beside an index is the one read (as transformers chooses)", () =>
    withCopy("tiny-bloom-a", (dir) => {
      writeFileSync(join(dir, "model.safetensors.index.json"), JSON.stringify({ metadata: {}, weight_map: { "ln_f.bias": "model-00001-of-00009.safetensors" } }));
      const loaded = loadEngine(dir, { kvCacheTokens: 64 });
      try {
        assert.deepEqual(loaded.checkpoint.files.map((f) => basename(f.file)), ["model.safetensors"]);
      } finally {
        loaded.dispose();
      }
    }));

  test("a weight_map naming '.' as a shard", () =>
    withCopy("tiny-bloom-b", (dir) => {
      editJson(join(dir, "model.safetensors.index.json"), (j) => void ((j.weight_map as Record<string, string>)["ln_f.bias"] = "."));
      assertLoadFails(dir, "model.safetensors.index.json", 'weight_map["ln_f.bias"] must be a file name');
    }));

  test("a missing tensor", () =>
    withCopy("tiny-bloom-a", (dir) => {
      editHeader(join(dir, "model.safetensors"), (h) => {
        delete h["h.1.self_attention.dense.bias"];
      });
      assertLoadFails(dir, dir, 'missing tensor "h.1.self_attention.dense.bias"', "expected shape [64]");
    }));

  test("an unexpected tensor", () =>
    withCopy("tiny-bloom-a", (dir) => {
      const file = join(dir, "model.safetensors");
      const { header, data } = readParts(file);
      header["h.0.self_attention.rotary_emb.inv_freq"] = { dtype: "F32", shape: [8], data_offsets: [data.length, data.length + 32] };
      writeParts(file, header, Buffer.concat([data, Buffer.alloc(32)]));
      assertLoadFails(dir, "model.safetensors", 'unexpected tensor "h.0.self_attention.rotary_emb.inv_freq"');
    }));

  test("an extra layer beyond n_layer is reported as unexpected", () =>
    withCopy("tiny-bloom-a", (dir) => {
      const file = join(dir, "model.safetensors");
      const { header, data } = readParts(file);
      header["h.2.input_layernorm.bias"] = { dtype: "F32", shape: [64], data_offsets: [data.length, data.length + 256] };
      writeParts(file, header, Buffer.concat([data, Buffer.alloc(256)]));
      assertLoadFails(dir, "model.safetensors", 'unexpected tensor "h.2.input_layernorm.bias"', "n_layer 2");
    }));

  test("a missing shard", () =>
    withCopy("tiny-bloom-b", (dir) => {
      rmSync(join(dir, "model-00002-of-00002.safetensors"));
      assertLoadFails(dir, "model.safetensors.index.json", 'shard "model-00002-of-00002.safetensors"', "missing");
    }));

  test("an index that places a tensor in the wrong shard", () =>
    withCopy("tiny-bloom-b", (dir) => {
      editJson(join(dir, "model.safetensors.index.json"), (j) => {
        const map = j.weight_map as Record<string, string>;
        map["h.0.input_layernorm.bias"] = "model-00002-of-00002.safetensors";
      });
      assertLoadFails(dir, 'tensor "h.0.input_layernorm.bias"', "model-00002-of-00002.safetensors");
    }));

  test("an index that lists a tensor no shard holds", () =>
    withCopy("tiny-bloom-b", (dir) => {
      editJson(join(dir, "model.safetensors.index.json"), (j) => {
        (j.weight_map as Record<string, string>)["h.9.mlp.dense_4h_to_h.bias"] = "model-00001-of-00002.safetensors";
      });
      assertLoadFails(dir, 'tensor "h.9.mlp.dense_4h_to_h.bias"', "missing from this shard");
    }));

  test("an index that is not JSON", () =>
    withCopy("tiny-bloom-b", (dir) => {
      appendFileSync(join(dir, "model.safetensors.index.json"), "}}}");
      assertLoadFails(dir, "model.safetensors.index.json", "invalid JSON");
    }));

  test("no weights at all, with a .bin beside", () =>
    withCopy("tiny-bloom-a", (dir) => {
      rmSync(join(dir, "model.safetensors"));
      writeFileSync(join(dir, "pytorch_model.bin"), "not really");
      assertLoadFails(dir, "no model.safetensors", "pytorch_model.bin", "safetensors only");
    }));

  test("config.json: invalid JSON, missing field, wrong model_type, heads not dividing hidden", () => {
    withCopy("tiny-bloom-a", (dir) => {
      writeFileSync(join(dir, "config.json"), "{ nope");
      assertLoadFails(dir, "config.json", "invalid JSON");
      writeFileSync(join(dir, "config.json"), JSON.stringify({ model_type: "bloom", vocab_size: 1536, n_layer: 2, n_head: 4 }));
      assertLoadFails(dir, "config.json", '"hidden_size"');
      writeFileSync(join(dir, "config.json"), JSON.stringify({ model_type: "gpt2", vocab_size: 1536, hidden_size: 64, n_layer: 2, n_head: 4 }));
      assertLoadFails(dir, "config.json", '"model_type"', '"gpt2"');
      writeFileSync(join(dir, "config.json"), JSON.stringify({ model_type: "bloom", vocab_size: 1536, hidden_size: 64, n_layer: 2, n_head: 6 }));
      assertLoadFails(dir, "config.json", "divisible");
      writeFileSync(join(dir, "config.json"), JSON.stringify({ model_type: "bloom", vocab_size: -3, hidden_size: 64, n_layer: 2, n_head: 4 }));
      assertLoadFails(dir, "config.json", '"vocab_size"');
      rmSync(join(dir, "config.json"));
      assertLoadFails(dir, "config.json", "cannot read");
    });
  });

  test("a missing folder", () => assertLoadFails("/nonexistent/blossom-model", "/nonexistent/blossom-model", "no such folder"));
});
