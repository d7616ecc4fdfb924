/**
 * The library API beyond the golden cases: parameter validation, sampling reproducibility, stop
 * strings, eos and min_new_tokens, per-sequence stopping in a batch, abort, input validation.
 */
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import { BlossomError, loadModel, type Model } from "../src/index.js";
import { join } from "node:path";
import { copyCheckpoint, editJson } from "./helpers/checkpoint-edit.js";
import { fixtureDir, Golden } from "./helpers/fixtures.js";

describe("library API on trained-bloom-small", () => {
  let model: Model;
  before(async () => {
    model = await loadModel(fixtureDir("trained-bloom-small"));
  });
  after(async () => {
    await model.dispose();
  });

  test("invalid generation parameters are rejected with the parameter's name", async () => {
    const cases: [Record<string, unknown>, string][] = [
      [{ temperature: -1 }, "temperature"],
      [{ topP: 0 }, "topP"],
      [{ topP: 1.5 }, "topP"],
      [{ topK: -2 }, "topK"],
      [{ topK: 1.5 }, "topK"],
      [{ typicalP: 0 }, "typicalP"],
      [{ repetitionPenalty: 0 }, "repetitionPenalty"],
      [{ noRepeatNgramSize: -1 }, "noRepeatNgramSize"],
      [{ maxNewTokens: 0 }, "maxNewTokens"],
      [{ maxNewTokens: 5, minNewTokens: 6 }, "minNewTokens"],
      [{ seed: -1 }, "seed"],
      [{ stop: [""] }, "stop"],
      [{ temperature: Number.NaN }, "temperature"],
      [{ bogus: 1 }, "bogus"],
    ];
    for (const [params, field] of cases) {
      await assert.rejects(model.generate(["In the beginning"], params), (err: unknown) => {
        assert.ok(err instanceof BlossomError && err.code === "parameter", `${JSON.stringify(params)}: ${String(err)}`);
        assert.ok(err.message.includes(field), `"${err.message}" should name ${field}`);
        return true;
      });
    }
  });

  test("invalid inputs are rejected clearly", async () => {
    await assert.rejects(model.generate([]), /prompts/);
    await assert.rejects(model.generate([[1, 99999]]), /outside the vocabulary/);
    await assert.rejects(model.generate([[]]), /prompt is empty/);
    await assert.rejects(model.forward([[1, 2], [3]]), /padded to one length/);
    await assert.rejects(model.forward([[1, 2]], [[1, 2]]), /attentionMask\[0\]/);
  });

  test("seeded sampling is reproducible; different seeds differ", async () => {
    const params = { maxNewTokens: 24, doSample: true, temperature: 1.0, topK: 50, topP: 0.95, seed: 7 };
    const a = await model.generate(["And it came to pass"], params);
    const b = await model.generate(["And it came to pass"], params);
    const c = await model.generate(["And it came to pass"], { ...params, seed: 8 });
    assert.deepEqual(a.tokenIds, b.tokenIds);
    assert.notDeepEqual(a.tokenIds, c.tokenIds);
  });

  test("stop strings end generation on decoded text and are not included", async () => {
    const greedy = await model.generate(["In the beginning"], { maxNewTokens: 30 });
    // " of the first month, in the first month, ..." -> stop at the first comma.
    const r = await model.generate(["In the beginning"], { maxNewTokens: 30, stop: [","] });
    assert.equal(r.finishReasons[0], "stop_sequence");
    assert.equal(r.texts[0], greedy.texts[0]!.slice(0, greedy.texts[0]!.indexOf(",")));
    // A stop string spanning several tokens.
    const r2 = await model.generate(["In the beginning"], { maxNewTokens: 30, stop: ["first month, in"] });
    assert.equal(r2.texts[0], " of the ");
  });

  test("each sequence of a batch stops on its own", async () => {
    const r = await model.generate(["In the beginning", "And the LORD said unto Moses,", "Blessed are the"], { maxNewTokens: 12, stop: ["LORD"] });
    assert.equal(r.tokenIds.length, 3);
    for (let i = 0; i < 3; i++) {
      assert.ok(r.numGeneratedTokens[i]! <= 12);
      if (r.finishReasons[i] === "length") assert.equal(r.numGeneratedTokens[i], 12);
      else assert.equal(r.finishReasons[i], "stop_sequence");
    }
    assert.ok(r.finishReasons.includes("stop_sequence") && r.finishReasons.includes("length"), JSON.stringify(r.finishReasons));
  });

  test("repetition penalty and no_repeat_ngram_size change greedy output", async () => {
    const plain = await model.generate(["In the beginning"], { maxNewTokens: 30 });
    const ngram = await model.generate(["In the beginning"], { maxNewTokens: 30, noRepeatNgramSize: 3 });
    assert.notDeepEqual(ngram.tokenIds[0], plain.tokenIds[0]);
    const ids = ngram.tokenIds[0]!;
    const seen = new Set<string>();
    const all = [...(await model.tokenizer.encode("In the beginning")), ...ids];
    for (let i = 0; i + 3 <= all.length; i++) {
      const key = all.slice(i, i + 3).join(",");
      assert.ok(!seen.has(key), `3-gram ${key} repeated`);
      seen.add(key);
    }
    const penalised = await model.generate(["In the beginning"], { maxNewTokens: 30, repetitionPenalty: 1.5 });
    assert.notDeepEqual(penalised.tokenIds[0], plain.tokenIds[0]);
  });

  test("an AbortSignal stops generation and returns what was generated", async () => {
    const controller = new AbortController();
    let seen = 0;
    const stream = model.stream("In the beginning", { maxNewTokens: 500, signal: controller.signal });
    let last: string | undefined;
    for await (const e of stream) {
      if (e.token) seen++;
      if (seen === 5) controller.abort();
      last = e.finishReason;
    }
    assert.equal(last, "cancelled");
    assert.ok(seen >= 5 && seen < 500, `saw ${seen} tokens`);
    const stats = await model.stats();
    assert.equal(stats.running, 0);
    assert.equal(stats.kvBlocksFree, stats.kvBlocksTotal);
  });
});

describe("eos and min_new_tokens", () => {
  test("a sequence ends at eos; min_new_tokens suppresses eos until reached", async () => {
    // tiny-bloom-a's first greedy prompt continues 303 303 303 303 1185 ...: declare 1185 the eos token.
    const golden = new Golden("tiny-bloom-a");
    const p = golden.manifest.cases.greedy.prompts[0]!;
    golden.dispose();
    const copy = copyCheckpoint(fixtureDir("tiny-bloom-a"));
    editJson(join(copy.dir, "config.json"), (c) => (c.eos_token_id = p.new_ids[4]));
    const model = await loadModel(copy.dir);
    try {
      const r = await model.generate([p.prompt_ids], { maxNewTokens: 20 });
      assert.deepEqual(r.tokenIds[0], p.new_ids.slice(0, 5));
      assert.equal(r.finishReasons[0], "eos_token");
      const held = await model.generate([p.prompt_ids], { maxNewTokens: 20, minNewTokens: 8 });
      assert.equal(held.numGeneratedTokens[0]! >= 8, true);
      assert.deepEqual(held.tokenIds[0]!.slice(0, 4), p.new_ids.slice(0, 4));
      assert.notEqual(held.tokenIds[0]![4], p.new_ids[4]);
      assert.ok(!held.tokenIds[0]!.slice(0, 8).includes(p.new_ids[4]!));
    } finally {
      await model.dispose();
      copy.cleanup();
    }
  });
});
