/**
 * The library API refuses what it cannot honour, by name, before any work starts: loadModel's
 * options (unknown names, sizes, pipeline settings, int8 settings), generation and perplexity
 * options (including a wrong abort signal, which once crashed the process), feed / append entries;
 * and nothing keeps running unseen (a refused prompt cancels its batch, an aborted signal submits
 * nothing).
 */
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import { BlossomError, loadModel, type Model } from "../src/index.js";
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { copyCheckpoint, editJson } from "./helpers/checkpoint-edit.js";
import { fixtureDir } from "./helpers/fixtures.js";

const fixture = fixtureDir("tiny-bloom-a");

function isParameterError(name: string) {
  return (err: unknown) => {
    assert.ok(err instanceof BlossomError, String(err));
    assert.equal(err.code, "parameter", err.message);
    assert.ok(err.message.startsWith(`${name}`), err.message);
    return true;
  };
}

describe("loadModel refuses bad options by name", () => {
  const cases: [string, unknown, string][] = [
    ["a misspelt option", { thread: 2 }, "thread"],
    ["options that are not an object", "fast", "options"],
    ["null options", null, "options"],
    ["maxBatchSize 0 (every generate would wait forever)", { maxBatchSize: 0 }, "maxBatchSize"],
    ["maxBatchSize 1.5", { maxBatchSize: 1.5 }, "maxBatchSize"],
    ["maxBatchTotalTokens -3", { maxBatchTotalTokens: -3 }, "maxBatchTotalTokens"],
    ["kvCacheTokens NaN", { kvCacheTokens: Number.NaN }, "kvCacheTokens"],
    ["kvCacheTokens as a string", { kvCacheTokens: "64" }, "kvCacheTokens"],
    ["an unknown placement", { strategy: "pipeline", maxMemory: "cpu:1GiB", placement: "zzz" }, "placement"],
    ["maxMemory that is not a string", { strategy: "pipeline", maxMemory: 5 }, "maxMemory"],
    ["offloadPrefetch without strategy pipeline", { offloadPrefetch: false }, "offloadPrefetch"],
    ["evictPageCache that is not a boolean", { strategy: "pipeline", maxMemory: "cpu:1GiB", evictPageCache: 1 }, "evictPageCache"],
    ["int8Threshold with dtype int8", { dtype: "int8", int8Threshold: 5 }, "int8Threshold"],
    ["int8Threshold with an unquantized dtype", { dtype: "auto", int8Threshold: 5 }, "int8Threshold"],
    ["a negative int8Threshold", { dtype: "int8-mixed", int8Threshold: -1 }, "int8Threshold"],
    ["int8Threshold NaN", { dtype: "int8-mixed", int8Threshold: Number.NaN }, "int8Threshold"],
  ];
  for (const [what, options, name] of cases) {
    test(what, async () => {
      await assert.rejects(loadModel(fixture, options as never), isParameterError(name));
    });
  }
});

describe("calls on a loaded model", () => {
  let model: Model;
  before(async () => {
    model = await loadModel(fixture, { kvCacheTokens: 256 });
  });
  after(async () => {
    await model.dispose();
  });

  test("a signal that is not an AbortSignal is refused, and the process carries on", async () => {
    await assert.rejects(model.generate(["hello"], { maxNewTokens: 3, signal: "x" as never }), isParameterError("signal"));
    const stream = model.stream("hello", { maxNewTokens: 3, signal: {} as never });
    await assert.rejects(stream.next(), isParameterError("signal"));
    await assert.rejects(model.perplexity("hello world, again", { signal: "x" as never }), isParameterError("signal"));
    const r = await model.generate(["hello"], { maxNewTokens: 3 });
    assert.equal(r.numGeneratedTokens[0], 3);
  });

  test("generation parameters that are not an object are named as such", async () => {
    for (const params of [null, "x", [1]]) {
      await assert.rejects(model.generate(["hello"], params as never), isParameterError("generation parameters"));
    }
  });

  test("an already aborted signal submits nothing: no tokens, finish reason cancelled", async () => {
    const before = (await model.stats()).generatedTokens;
    const r = await model.generate(["hello", "world"], { maxNewTokens: 5, signal: AbortSignal.abort() });
    assert.deepEqual(r.finishReasons, ["cancelled", "cancelled"]);
    assert.deepEqual(r.numGeneratedTokens, [0, 0]);
    const events = [];
    for await (const e of model.stream("hello", { maxNewTokens: 5, signal: AbortSignal.abort() })) events.push(e);
    assert.deepEqual(events, [{ text: "", finishReason: "cancelled" }]);
    assert.equal((await model.stats()).generatedTokens, before);
  });

  test("a batch with an empty prompt is refused before any prompt runs, naming it", async () => {
    const before = (await model.stats()).generatedTokens;
    await assert.rejects(model.generate(["hello", ""], { maxNewTokens: 50 }), (err: unknown) => {
      assert.ok(err instanceof BlossomError && err.code === "input" && err.message.startsWith("prompts[1]:"), String(err));
      return true;
    });
    assert.equal((await model.stats()).generatedTokens, before);
  });

  test("a batch with a prompt the KV cache cannot hold leaves nothing running", async () => {
    await assert.rejects(model.generate(["hello", Array.from({ length: 300 }, () => 5)], { maxNewTokens: 50 }), (err: unknown) => {
      assert.ok(err instanceof BlossomError && err.code === "memory", String(err));
      return true;
    });
    // The first prompt was submitted before the engine refused the second; it is cancelled, not left running.
    for (let i = 0; i < 100 && (await model.stats()).running > 0; i++) await new Promise((r) => setTimeout(r, 10));
    const s = await model.stats();
    assert.equal(s.running + s.waiting, 0);
  });

  test("a token id that is not a number is shown as it is", async () => {
    await assert.rejects(model.generate([[5, Number.NaN]]), (err: unknown) => {
      assert.ok(err instanceof BlossomError && /prompts\[0\]\[1\]: token id NaN is outside the vocabulary/.test(err.message), String(err));
      return true;
    });
  });

  test("perplexity: an unknown option, and a context the KV cache cannot hold, are named", async () => {
    await assert.rejects(model.perplexity("hello world", { contxt: 4 } as never), isParameterError("contxt"));
    const text = Array.from({ length: 400 }, (_, i) => 10 + (i % 50));
    await assert.rejects(model.perplexity(text, { context: 300 }), isParameterError("context"));
    const ok = await model.perplexity(text, { context: 64 });
    assert.ok(Number.isFinite(ok.perplexity) && ok.predicted === 399);
  });

  test("feed: one session twice in a step, a bad logits choice, a non-session, are refused", async () => {
    const s = await model.openSession();
    try {
      await assert.rejects(model.feed([{ session: s, tokens: [5] }, { session: s, tokens: [6] }]), isParameterError("entries[1].session"));
      await assert.rejects(model.feed([{ session: s, tokens: [5], logits: "bad" as never }]), isParameterError("entries[0].logits"));
      await assert.rejects(model.feed([{ session: null as never, tokens: [5] }]), isParameterError("entries[0].session"));
      await assert.rejects(model.feed("x" as never), isParameterError("entries"));
      await assert.rejects(s.append([5], "bad" as never), isParameterError("logits"));
      await assert.rejects(s.append(["x"] as never), (err: unknown) => err instanceof BlossomError && /tokens\[0\]: token id "x"/.test(err.message));
      // Nothing above reached the cache: the session still starts from empty.
      const first = await s.append([5, 6], "last");
      const fresh = await model.openSession();
      try {
        assert.deepEqual(first, await fresh.append([5, 6], "last"));
      } finally {
        await fresh.close();
      }
    } finally {
      await s.close();
    }
  });
});

describe("one sequence's failure stays its own", () => {
  let model: Model;
  before(async () => {
    model = await loadModel(fixture);
  });
  after(async () => {
    await model.dispose();
  });

  test("a sequence whose settings leave no token fails alone; the batch beside it finishes", async () => {
    // tiny-bloom-a's vocabulary is 1536 ids: a prompt of all of them with no_repeat_ngram_size 1 bans every token.
    const everything = Array.from({ length: 1536 }, (_, i) => i);
    const doomed = model.generate([everything], { maxNewTokens: 4, noRepeatNgramSize: 1 });
    const fine = model.generate(["hello", "world"], { maxNewTokens: 12, minNewTokens: 12 });
    await assert.rejects(doomed, (err: unknown) => err instanceof BlossomError && /every token is -Infinity after the processors/.test(err.message));
    const r = await fine;
    assert.deepEqual(r.numGeneratedTokens, [12, 12]);
  });

  test("extreme sampling settings stay finite: a temperature whose inverse overflows is argmax, a tiny repetition penalty is clamped", async () => {
    const greedy = await model.generate(["hello"], { maxNewTokens: 6, minNewTokens: 6 });
    const cold = await model.generate(["hello"], { maxNewTokens: 6, minNewTokens: 6, doSample: true, temperature: 5e-324, seed: 1 });
    assert.deepEqual(cold.tokenIds, greedy.tokenIds);
    const penalised = await model.generate(["hello"], { maxNewTokens: 6, minNewTokens: 6, repetitionPenalty: 1e-300 });
    assert.equal(penalised.numGeneratedTokens[0], 6);
    for await (const e of model.stream("hello", { maxNewTokens: 3, doSample: true, temperature: 1e-308, seed: 2 })) {
      if (e.token) assert.ok(Number.isFinite(e.token.logprob), `logprob ${e.token.logprob}`);
    }
  });
});

describe("tokenizer files that do not fit the model", () => {
  test("a tokenizer_config.json that is not an object is named", async () => {
    const copy = copyCheckpoint(fixture);
    try {
      writeFileSync(join(copy.dir, "tokenizer_config.json"), "null");
      await assert.rejects(loadModel(copy.dir), (err: unknown) => err instanceof BlossomError && /tokenizer_config\.json: expected a JSON object/.test(err.message));
    } finally {
      copy.cleanup();
    }
  });

  test("a tokenizer whose ids run past vocab_size is named when it encodes such an id", async () => {
    const copy = copyCheckpoint(fixture);
    try {
      editJson(join(copy.dir, "tokenizer.json"), (t) => {
        const vocab = (t.model as { vocab: Record<string, number> }).vocab;
        for (const k of Object.keys(vocab)) if (vocab[k]! >= 4) vocab[k] = vocab[k]! + 10_000;
      });
      // Its token count still fits vocab_size, so it loads; the ids it produces are caught by name.
      const model = await loadModel(copy.dir);
      try {
        await assert.rejects(model.generate(["hello"], { maxNewTokens: 2 }), (err: unknown) => err instanceof BlossomError && /tokenizer\.json: encodes prompts\[0\] to token id \d+, outside config\.json's vocab_size 1536/.test(err.message));
      } finally {
        await model.dispose();
      }
    } finally {
      copy.cleanup();
    }
  });
});
