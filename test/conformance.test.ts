/**
 * Conformance against the golden fixtures (../shared/fixtures, computed by an independent float32
 * PyTorch implementation): full-sequence logits, left-padded batches, masks with holes, KV-cache
 * decoding (single and batched), greedy generation from ids and from text, and the trained
 * model's perplexity — each within the tolerances of the fixtures' README. Runs with the default
 * thread count, with one thread, and with every linear weight in column panels (the layout the CPU
 * backend gives long rows; here panels of 40 inputs, the last one ragged, on every matrix).
 */
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { loadModel, type LoadModelOptions, type Model } from "../src/index.js";
import { fixtureDir, fixtureNames, Golden, logitTolerance, maxAbsDiff, type FixtureName } from "./helpers/fixtures.js";

function argmax(row: Float32Array): number {
  let best = 0;
  for (let i = 1; i < row.length; i++) if (row[i]! > row[best]!) best = i;
  return best;
}

const runs: Array<{ label: string; options: LoadModelOptions }> = [
  { label: "", options: {} },
  { label: " (threads 1)", options: { threads: 1 } },
  { label: " (linear weights in column panels)", options: { linearPanels: { width: 40, above: 40, dtypes: ["f32", "f16", "bf16"] } } },
];

for (const { label, options } of runs) {
  for (const name of fixtureNames) {
    describe(`${name}${label}`, () => {
      let model: Model;
      let golden: Golden;
      const tol = logitTolerance(name as FixtureName);
      before(async () => {
        golden = new Golden(name);
        model = await loadModel(fixtureDir(name), options);
      });
      after(async () => {
        await model.dispose();
        golden.dispose();
      });

      test("single sequence: logits for every position", async () => {
        const c = golden.manifest.cases.single;
        const expected = golden.tensor(c.logits);
        const out = await model.forward([c.input_ids]);
        assert.deepEqual(out.dims, [1, c.input_ids.length, model.config.vocabSize]);
        const diff = maxAbsDiff(out.data, expected.data);
        assert.ok(diff <= tol, `max |diff| ${diff} > ${tol}`);
        const V = model.config.vocabSize;
        const am = c.input_ids.map((_, t) => argmax(out.data.subarray(t * V, (t + 1) * V)));
        assert.deepEqual(am, c.argmax);
      });

      test("left-padded batch: real positions match", async () => {
        const c = golden.manifest.cases.padded_batch;
        const expected = golden.tensor(c.logits);
        const out = await model.forward(c.input_ids, c.attention_mask);
        const V = model.config.vocabSize, T = c.input_ids[0]!.length;
        let diff = 0;
        c.attention_mask.forEach((row, b) =>
          row.forEach((m, t) => {
            if (m === 1) diff = Math.max(diff, maxAbsDiff(out.data, expected.data, (b * T + t) * V, (b * T + t) * V, V));
          }),
        );
        assert.ok(diff <= tol, `max |diff| ${diff} > ${tol}`);
        // Each padded row equals the row's own unpadded run.
        const alone = await model.forward([c.sequences[1]!]);
        const pad = T - c.sequences[1]!.length;
        const rowDiff = maxAbsDiff(out.data, alone.data, (1 * T + pad) * V, 0, c.sequences[1]!.length * V);
        assert.ok(rowDiff <= 1e-4, `padded vs unpadded ${rowDiff}`);
      });

      test("attention mask with holes: masked tokens are skipped", async (t) => {
        const c = golden.manifest.cases.mask_with_holes;
        if (!c) return t.skip("this fixture has no mask_with_holes case");
        const expected = golden.tensor(c.logits);
        const out = await model.forward(c.input_ids, c.attention_mask);
        const V = model.config.vocabSize;
        let diff = 0;
        c.attention_mask[0]!.forEach((m, t) => {
          if (m === 1) diff = Math.max(diff, maxAbsDiff(out.data, expected.data, t * V, t * V, V));
        });
        assert.ok(diff <= tol, `max |diff| ${diff} > ${tol}`);
      });

      test("KV-cache decode: prompt, then one token at a time", async () => {
        const c = golden.manifest.cases.kv_decode;
        const V = model.config.vocabSize;
        const session = await model.openSession();
        try {
          const prompt = await session.append(c.prompt_ids);
          const pd = maxAbsDiff(prompt, golden.tensor(c.prompt_logits).data);
          assert.ok(pd <= tol, `prompt logits ${pd}`);
          const steps = golden.tensor(c.step_logits).data;
          let sd = 0;
          for (const [k, id] of c.step_ids.entries()) {
            const l = await session.append([id], "last");
            assert.equal(l.length, V);
            sd = Math.max(sd, maxAbsDiff(l, steps, 0, k * V, V));
          }
          assert.ok(sd <= tol, `step logits ${sd}`);
        } finally {
          await session.close();
        }
      });

      test("batched KV-cache decode: ragged prompts, then steps for every row", async () => {
        const c = golden.manifest.cases.batch_kv_decode;
        const V = model.config.vocabSize, T = c.input_ids[0]!.length;
        const sessions = await Promise.all(c.sequences.map(() => model.openSession()));
        try {
          const prompt = await model.feed(c.sequences.map((tokens, b) => ({ session: sessions[b]!, tokens })));
          const expectedPrompt = golden.tensor(c.prompt_logits).data;
          let pd = 0;
          c.sequences.forEach((seq, b) => {
            const pad = T - seq.length;
            pd = Math.max(pd, maxAbsDiff(prompt[b]!, expectedPrompt, 0, (b * T + pad) * V, seq.length * V));
          });
          assert.ok(pd <= tol, `prompt logits ${pd}`);
          const expectedSteps = golden.tensor(c.step_logits).data;
          const numSteps = c.step_ids[0]!.length;
          let sd = 0;
          for (let k = 0; k < numSteps; k++) {
            const out = await model.feed(c.step_ids.map((ids, b) => ({ session: sessions[b]!, tokens: [ids[k]!], logits: "last" as const })));
            out.forEach((l, b) => (sd = Math.max(sd, maxAbsDiff(l, expectedSteps, 0, (b * numSteps + k) * V, V))));
          }
          assert.ok(sd <= tol, `step logits ${sd}`);
        } finally {
          await Promise.all(sessions.map((s) => s.close()));
        }
      });

      test("greedy generation from ids, batched: exact tokens and text", async () => {
        const g = golden.manifest.cases.greedy;
        const r = await model.generate(
          g.prompts.map((p) => p.prompt_ids),
          { maxNewTokens: g.max_new_tokens },
        );
        g.prompts.forEach((p, i) => {
          assert.deepEqual(r.tokenIds[i], p.new_ids, `prompt ${i}`);
          assert.equal(r.texts[i], p.new_text, `prompt ${i}`);
          assert.equal(r.finishReasons[i], "length");
        });
      });

      test("greedy generation from text, one at a time: same tokens", async () => {
        const g = golden.manifest.cases.greedy;
        for (const p of g.prompts.filter((x) => x.prompt_text !== null)) {
          assert.deepEqual(await model.tokenizer.encode(p.prompt_text!), p.prompt_ids);
          const r = await model.generate([p.prompt_text!], { maxNewTokens: g.max_new_tokens });
          assert.deepEqual(r.tokenIds[0], p.new_ids);
          assert.equal(r.texts[0], p.new_text);
        }
      });

      test("streaming yields the same tokens and text as generate, U+FFFD cases included", async () => {
        for (const p of golden.manifest.cases.greedy.prompts) {
          let text = "";
          const ids: number[] = [];
          for await (const e of model.stream(p.prompt_ids, { maxNewTokens: 20 })) {
            text += e.text;
            if (e.token) ids.push(e.token.id);
          }
          assert.deepEqual(ids, p.new_ids);
          assert.equal(text, p.new_text);
        }
      });

      if (name === "trained-bloom-small") {
        const evalJson = JSON.parse(readFileSync(join(fixtureDir(name), "golden/eval.json"), "utf8")) as {
          heldout: { perplexity: number; tokens: number; predictions: number };
          greedy: { max_new_tokens: number; prompts: { prompt_text: string; prompt_ids: number[]; new_ids: number[]; new_text: string }[] };
        };

        test("held-out perplexity reproduces the reference's 36.14", async () => {
          const text = readFileSync(join(fixtureDir(name), "golden/heldout.txt"), "utf8");
          const r = await model.perplexity(text, { context: 128, stride: 128 });
          assert.equal(r.tokens, evalJson.heldout.tokens);
          assert.equal(r.predicted, evalJson.heldout.predictions);
          assert.ok(Math.abs(r.perplexity - evalJson.heldout.perplexity) < 1e-3, `perplexity ${r.perplexity} vs ${evalJson.heldout.perplexity}`);
        });

        test("greedy continuations of KJV prompts (30 tokens)", async () => {
          const prompts = evalJson.greedy.prompts;
          const r = await model.generate(prompts.map((g) => g.prompt_text), { maxNewTokens: evalJson.greedy.max_new_tokens });
          prompts.forEach((g, i) => {
            assert.deepEqual(r.tokenIds[i], g.new_ids, g.prompt_text);
            assert.equal(r.texts[i], g.new_text);
          });
        });
      }
    });
  }
}
