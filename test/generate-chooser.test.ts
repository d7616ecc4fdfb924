import { test } from "node:test";
import assert from "node:assert/strict";
import { BlossomError } from "../src/errors.js";
import {
  TokenChooser,
  applyRepetitionPenalty,
  banRepeatedNgrams,
  suppressTokens,
} from "../src/generate/chooser.js";
import { resolveGenerationParams, type GenerationParamsInput } from "../src/generate/params.js";

function chooser(params: GenerationParamsInput, vocabSize: number, eosTokenIds: number[] = []): TokenChooser {
  return new TokenChooser(resolveGenerationParams(params), { vocabSize, eosTokenIds });
}

/** log-softmax with Math.exp, the plain way. */
function logSoftmax(values: ArrayLike<number>): number[] {
  let max = -Infinity;
  for (let i = 0; i < values.length; i++) max = Math.max(max, values[i]!);
  let sum = 0;
  for (let i = 0; i < values.length; i++) sum += Math.exp(values[i]! - max);
  return Array.from(values, (v) => v - max - Math.log(sum));
}

test("repetition penalty divides positive and multiplies negative logits of every distinct seen token", () => {
  const logits = Float32Array.of(2, -1, 0.5, -3, 1, 0, 4, -0.25);
  // Token 0 and 1 occur twice: penalised once. Token 7 is from the prompt: penalised too.
  applyRepetitionPenalty(logits, 8, [0, 1, 1, 3, 7, 0], 2);
  assert.deepEqual(Array.from(logits), [1, -2, 0.5, -6, 1, 0, 4, -0.5]);

  const encourage = Float32Array.of(2, -1, 0.5, -3, 1, 0, 4, -0.25);
  applyRepetitionPenalty(encourage, 8, [0, 1, 3, 7, 5], 0.5);
  assert.deepEqual(Array.from(encourage), [4, -0.5, 0.5, -1.5, 1, 0, 4, -0.125]);
});

test("repetition penalty stores float32 results, as torch does on float32 scores", () => {
  const logits = Float32Array.of(1, -1);
  applyRepetitionPenalty(logits, 2, [0, 1], 1.3);
  // torch: float32(1) / float32(1.3) and float32(-1) * float32(1.3), each rounded to float32
  assert.equal(logits[0], Math.fround(1 / Math.fround(1.3)));
  assert.equal(logits[1], Math.fround(-Math.fround(1.3)));
  assert.equal(logits[0], 0.7692307829856873); // float32 bits 0x3F44EC4F
  assert.equal(logits[1], -1.2999999523162842);
});

test("repetition penalty changes the greedy choice", () => {
  const logits = Float32Array.of(3, 2.9, 0, -1);
  assert.equal(chooser({}, 4).next(logits.slice(), [0], 1).tokenId, 0);
  // 3 / 1.1 = 2.727 < 2.9
  assert.equal(chooser({ repetitionPenalty: 1.1 }, 4).next(logits.slice(), [0], 1).tokenId, 1);
  // A penalty applies to prompt tokens too (numGenerated 0).
  assert.equal(chooser({ repetitionPenalty: 1.1 }, 4).next(logits.slice(), [0], 0).tokenId, 1);
});

test("no-repeat n-gram bans the tokens that would complete an n-gram already in the sequence", () => {
  const ones = () => new Float32Array(10).fill(1);
  const banned = (logits: Float32Array) =>
    Array.from(logits.keys()).filter((id) => logits[id] === -Infinity);

  let logits = ones();
  banRepeatedNgrams(logits, 10, [1, 2, 3, 1, 2], 3); // (1,2,3) seen; last two are 1,2
  assert.deepEqual(banned(logits), [3]);

  logits = ones();
  banRepeatedNgrams(logits, 10, [5, 1, 2, 7, 1, 2, 9, 4, 1, 2], 3); // (1,2,7) and (1,2,9)
  assert.deepEqual(banned(logits), [7, 9]);

  logits = ones();
  banRepeatedNgrams(logits, 10, [4, 4], 2); // bigram (4,4) seen, last token 4
  assert.deepEqual(banned(logits), [4]);

  logits = ones();
  banRepeatedNgrams(logits, 10, [8, 3, 8, 6], 1); // size 1: every token already present
  assert.deepEqual(banned(logits), [3, 6, 8]);

  logits = ones();
  banRepeatedNgrams(logits, 10, [1, 2, 3, 4], 3); // prefix (3,4) never seen before
  assert.deepEqual(banned(logits), []);

  logits = ones();
  banRepeatedNgrams(logits, 10, [1, 2], 4); // shorter than an n-gram: nothing to repeat
  assert.deepEqual(banned(logits), []);

  logits = ones();
  banRepeatedNgrams(logits, 10, [2, 2, 2], 3); // (2,2,2) seen and the last two are (2,2)
  assert.deepEqual(banned(logits), [2]);
});

test("no-repeat n-gram steers greedy decoding away from a loop", () => {
  // The model always prefers token 1 after anything; with size 2 the bigram (1,1) may not repeat.
  const logits = () => Float32Array.of(0, 5, 4, 3);
  const c = chooser({ noRepeatNgramSize: 2 }, 4);
  assert.equal(c.next(logits(), [0, 1], 1).tokenId, 1); // (1,1) not seen yet
  assert.equal(c.next(logits(), [0, 1, 1], 2).tokenId, 2); // (1,1) seen: 1 banned
  assert.equal(c.next(logits(), [0, 1, 1, 2, 1], 4).tokenId, 3); // (1,1) and (1,2) seen: 1 and 2 banned
});

test("min new tokens suppresses every EOS id until enough tokens were generated", () => {
  const logits = () => Float32Array.of(0, 1, 9, 2, 8, 3);
  const c = chooser({ minNewTokens: 2 }, 6, [2, 4]);
  assert.equal(c.next(logits(), [0, 1], 0).tokenId, 5);
  assert.equal(c.next(logits(), [0, 1, 5], 1).tokenId, 5);
  assert.equal(c.next(logits(), [0, 1, 5, 5], 2).tokenId, 2);

  const suppressed = Float32Array.of(1, 2, 3);
  suppressTokens(suppressed, [0, 2]);
  assert.deepEqual(Array.from(suppressed), [-Infinity, 2, -Infinity]);

  // The log-probability is under the processed logits: EOS gets none of the mass.
  const { logprob } = c.next(logits(), [0, 1], 0);
  assert.ok(Math.abs(logprob - logSoftmax([0, 1, -Infinity, 2, -Infinity, 3])[5]!) < 1e-8);
});

test("processors run in transformers' order: penalty, n-gram ban, EOS suppression, then temperature", () => {
  const params = { repetitionPenalty: 2, noRepeatNgramSize: 2, minNewTokens: 5, doSample: true, temperature: 0.5 };
  const c = chooser(params, 6, [5]);
  const logits = Float32Array.of(1, -1, 2, 0.5, 3, 4);
  // tokens: 3 and 2 seen -> penalised; bigram (2,3) seen and the last token is 2 -> 3 banned; EOS 5 suppressed.
  const { tokenIds, probs } = c.distribution(logits, [2, 3, 1, 2], 1);
  const processed = [1, -2, 1, -Infinity, 3, -Infinity].map((v) => v / 0.5);
  const expected = logSoftmax(processed).map(Math.exp);
  assert.deepEqual(Array.from(tokenIds), [0, 1, 2, 4]);
  for (const [i, id] of tokenIds.entries()) assert.ok(Math.abs(probs[i]! - expected[id]!) < 1e-9);
});

test("greedy picks the lowest id among equal maxima, like torch.argmax", () => {
  assert.equal(chooser({}, 4).next(Float32Array.of(1, 3, 3, 2), [], 0).tokenId, 1);
  // Maxima in different unrolled lanes and in the tail.
  const at = (n: number, maxima: number[]) => {
    const logits = new Float32Array(n);
    for (const id of maxima) logits[id] = 7;
    return chooser({}, n).next(logits, [], 0).tokenId;
  };
  assert.equal(at(13, [9, 5]), 5);
  assert.equal(at(13, [7, 2]), 2);
  assert.equal(at(13, [6, 1]), 1);
  assert.equal(at(13, [12, 3]), 3);
  assert.equal(at(13, [12]), 12);
  assert.equal(at(1, [0]), 0);

  let state = 7;
  const random = () => ((state = (Math.imul(state, 1664525) + 1013904223) >>> 0) / 2 ** 32);
  for (let trial = 0; trial < 500; trial++) {
    const n = 1 + Math.floor(random() * 40);
    const logits = Float32Array.from({ length: n }, () => Math.floor(random() * 4));
    const expected = logits.indexOf(Math.max(...logits));
    assert.equal(chooser({}, n).next(logits, [], 0).tokenId, expected);
  }
});

test("greedy ignores the padded logits beyond vocabSize", () => {
  const logits = Float32Array.of(1, 2, 3, 100, 100);
  assert.equal(chooser({}, 3).next(logits, [], 0).tokenId, 2);
});

test("greedy log-probability is the log-softmax of the processed logits", () => {
  let state = 99;
  const random = () => ((state = (Math.imul(state, 1664525) + 1013904223) >>> 0) / 2 ** 32);
  for (const n of [2, 7, 1000, 50257]) {
    const logits = Float32Array.from({ length: n }, () => (random() - 0.5) * 30);
    logits[n >> 1] = -Infinity; // a banned token takes no mass
    const expected = logSoftmax(logits);
    const { tokenId, logprob } = chooser({}, n).next(logits.slice(), [], 0);
    assert.ok(Math.abs(logprob - expected[tokenId]!) < 1e-8, `n=${n}: ${logprob} vs ${expected[tokenId]}`);
  }
  // temperature 0 with doSample is greedy, and greedy ignores the temperature for the log-probability.
  const logits = Float32Array.of(0.5, 2, 1);
  const { tokenId, logprob } = chooser({ doSample: true, temperature: 0, topK: 1 }, 3).next(logits.slice(), [], 0);
  assert.equal(tokenId, 1);
  assert.ok(Math.abs(logprob - logSoftmax(logits)[1]!) < 1e-9);
});

test("greedy is the default and uses no random numbers", () => {
  const c = chooser({}, 3);
  assert.equal(c.greedy, true);
  assert.equal(c.seed, undefined);
  assert.equal(chooser({ doSample: true, temperature: 0 }, 3).greedy, true);
  assert.equal(chooser({ doSample: true }, 3).greedy, false);
});

function throwsBlossom(fn: () => unknown, code: string, fragment: string): void {
  assert.throws(fn, (error: unknown) => {
    assert.ok(error instanceof BlossomError, String(error));
    assert.equal(error.code, code);
    assert.ok(error.message.includes(fragment), error.message);
    return true;
  });
}

test("broken logits and impossible states raise errors that say what is wrong", () => {
  for (const params of [{}, { doSample: true, seed: 1 }, { doSample: true, seed: 1, topK: 2 }]) {
    throwsBlossom(() => chooser(params, 3).next(Float32Array.of(1, NaN, 2), [], 0), "internal", "NaN");
    throwsBlossom(() => chooser(params, 3).next(Float32Array.of(1, Infinity, 2), [], 0), "internal", "Infinity");
    throwsBlossom(
      () => chooser(params, 3).next(Float32Array.of(-Infinity, -Infinity, -Infinity), [], 0),
      "input",
      "every token is -Infinity",
    );
    throwsBlossom(() => chooser(params, 3).next(Float32Array.of(1, 2), [], 0), "input", "at least vocabSize (3)");
  }
  throwsBlossom(
    () => chooser({ noRepeatNgramSize: 1, minNewTokens: 1 }, 2, [1]).next(Float32Array.of(1, 2), [0], 0),
    "input",
    "every token is -Infinity",
  );
  throwsBlossom(
    () => chooser({ repetitionPenalty: 1.2 }, 3).next(Float32Array.of(1, 2, 3), [0, 5], 1),
    "input",
    "tokens[1]: must be a token id in [0, 3) (got 5)",
  );
  throwsBlossom(() => chooser({}, 3).next(Float32Array.of(1, 2, 3), [0], 2), "input", "numGenerated");
  throwsBlossom(() => chooser({}, 0), "parameter", "vocabSize");
  throwsBlossom(() => chooser({}, 3, [3]), "parameter", "eosTokenIds");
});
