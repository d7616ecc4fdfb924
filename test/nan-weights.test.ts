/**
 * A checkpoint holding a NaN is reported, never turned into a plausible answer: generation and
 * perplexity refuse NaN output in every dtype (int8's activation quantizer once clamped a NaN into
 * an ordinary level, so int8 generated text from a broken model), and quantizing a matrix with a
 * NaN names the tensor.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { after, describe, test } from "node:test";
import { BlossomError, loadModel } from "../src/index.js";
import { quantizeCheckpoint } from "../src/quant/quantize.js";
import { copyCheckpoint, readParts, writeParts } from "./helpers/checkpoint-edit.js";
import { fixtureDir } from "./helpers/fixtures.js";

/** A copy of tiny-bloom-a (float32) with one NaN in `tensor`. */
function withNaN(tensor: string) {
  const copy = copyCheckpoint(fixtureDir("tiny-bloom-a"));
  const file = join(copy.dir, "model.safetensors");
  const { header, data } = readParts(file);
  const entry = header[tensor] as { data_offsets: [number, number] };
  data.writeFloatLE(Number.NaN, entry.data_offsets[0] + 4);
  writeParts(file, header, data);
  return copy;
}

describe("a NaN in the weights", () => {
  const inNorm = withNaN("h.0.input_layernorm.weight");
  const inMatrix = withNaN("h.1.mlp.dense_h_to_4h.weight");
  after(() => {
    inNorm.cleanup();
    inMatrix.cleanup();
  });

  for (const dtype of ["auto", "int8", "int8-mixed"] as const) {
    test(`${dtype}: generate and perplexity refuse the NaN output`, async () => {
      const model = await loadModel(inNorm.dir, { dtype });
      try {
        await assert.rejects(model.generate(["hello"], { maxNewTokens: 3 }), (err: unknown) => err instanceof BlossomError && /logits: contain NaN/.test(err.message));
        await assert.rejects(model.perplexity([5, 6, 7, 8]), (err: unknown) => err instanceof BlossomError && /perplexity: the model gave a NaN log-probability/.test(err.message));
      } finally {
        await model.dispose();
      }
    });
  }

  test("int8 quantization of a matrix with a NaN names the tensor, at load and in blossom quantize", async () => {
    const named = (err: unknown) =>
      err instanceof BlossomError && err.code === "checkpoint" && /tensor "h\.1\.mlp\.dense_h_to_4h\.weight" holds NaN or infinite values \(row 0\)/.test(err.message);
    await assert.rejects(loadModel(inMatrix.dir, { dtype: "int8" }), named);
    await assert.rejects(quantizeCheckpoint(inMatrix.dir, join(inMatrix.dir, "q"), { scheme: "int8-mixed" }), named);
  });
});
