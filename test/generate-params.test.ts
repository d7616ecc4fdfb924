import { test } from "node:test";
import assert from "node:assert/strict";
import { BlossomError } from "../src/errors.js";
import {
  defaultGenerationParams,
  maxStopStringLength,
  maxStopStrings,
  resolveGenerationParams,
} from "../src/generate/params.js";

/** Asserts that resolving `input` fails with a parameter error for `field` whose message contains `parts`. */
function rejects(input: unknown, field: string, parts: string[], limits?: { maxNewTokens?: number }): void {
  assert.throws(
    () => resolveGenerationParams(input, limits),
    (error: unknown) => {
      assert.ok(error instanceof BlossomError, `expected a BlossomError, got ${String(error)}`);
      assert.equal(error.code, "parameter");
      assert.ok(error.message.startsWith(`${field}: `), `message should name ${field}: ${error.message}`);
      for (const part of parts) assert.ok(error.message.includes(part), `"${error.message}" lacks "${part}"`);
      return true;
    },
  );
}

test("defaults match transformers' off values", () => {
  assert.deepEqual(resolveGenerationParams({}), {
    maxNewTokens: 20,
    minNewTokens: 0,
    doSample: false,
    temperature: 1,
    topK: 0,
    topP: 1,
    typicalP: 1,
    repetitionPenalty: 1,
    noRepeatNgramSize: 0,
    stop: [],
    seed: undefined,
  });
  assert.deepEqual(resolveGenerationParams(undefined), resolveGenerationParams({}));
  assert.deepEqual(resolveGenerationParams({}), { ...defaultGenerationParams, stop: [] });
});

test("given values are kept, undefined ones take defaults, signal is dropped", () => {
  const controller = new AbortController();
  const params = resolveGenerationParams({
    maxNewTokens: 64,
    minNewTokens: 8,
    doSample: true,
    temperature: 0.7,
    topK: 50,
    topP: 0.9,
    typicalP: 0.95,
    repetitionPenalty: 1.2,
    noRepeatNgramSize: 3,
    stop: ["\n\n", "User:"],
    seed: 42,
    signal: controller.signal,
  });
  assert.deepEqual(params, {
    maxNewTokens: 64,
    minNewTokens: 8,
    doSample: true,
    temperature: 0.7,
    topK: 50,
    topP: 0.9,
    typicalP: 0.95,
    repetitionPenalty: 1.2,
    noRepeatNgramSize: 3,
    stop: ["\n\n", "User:"],
    seed: 42,
  });
  assert.equal(resolveGenerationParams({ temperature: undefined }).temperature, 1);
  assert.equal(resolveGenerationParams({ seed: 0 }).seed, 0);
  assert.equal(resolveGenerationParams({ seed: Number.MAX_SAFE_INTEGER }).seed, Number.MAX_SAFE_INTEGER);
  assert.equal(resolveGenerationParams({ temperature: 0, doSample: true }).temperature, 0);
  assert.equal(resolveGenerationParams({ topP: 1, typicalP: 1 }).topP, 1);
});

test("the result does not share the stop array with the input or the defaults", () => {
  const stop = ["a"];
  const params = resolveGenerationParams({ stop });
  params.stop.push("b");
  assert.deepEqual(stop, ["a"]);
  resolveGenerationParams({}).stop.push("c");
  assert.deepEqual(defaultGenerationParams.stop, []);
});

test("unknown keys are rejected by name", () => {
  rejects({ max_new_tokens: 5 }, "max_new_tokens", ["is not a generation parameter", "maxNewTokens"]);
  rejects({ temperature: 1, topk: 5 }, "topk", ["is not a generation parameter"]);
});

test("parameters must be an object", () => {
  rejects(null, "generation parameters", ["must be an object", "(got null)"]);
  rejects([1], "generation parameters", ["must be an object"]);
  rejects(5, "generation parameters", ["must be an object", "(got 5)"]);
});

test("signal must be an AbortSignal", () => {
  rejects({ signal: "stop" }, "signal", ["must be an AbortSignal", '(got "stop")']);
});

test("maxNewTokens: integer >= 1", () => {
  rejects({ maxNewTokens: 0 }, "maxNewTokens", ["must be an integer >= 1", "(got 0)"]);
  rejects({ maxNewTokens: 2.5 }, "maxNewTokens", ["must be an integer >= 1", "(got 2.5)"]);
  rejects({ maxNewTokens: "10" }, "maxNewTokens", ['(got "10")']);
  rejects({ maxNewTokens: NaN }, "maxNewTokens", ["(got NaN)"]);
  rejects({ maxNewTokens: Infinity }, "maxNewTokens", ["(got Infinity)"]);
});

test("maxNewTokens: at most the configured limit", () => {
  rejects({ maxNewTokens: 101 }, "maxNewTokens", ["<= 100", "(got 101)"], { maxNewTokens: 100 });
  assert.equal(resolveGenerationParams({ maxNewTokens: 100 }, { maxNewTokens: 100 }).maxNewTokens, 100);
  // The default (20) is checked against the limit too.
  rejects({}, "maxNewTokens", ["<= 10", "(got 20)"], { maxNewTokens: 10 });
});

test("minNewTokens: integer >= 0", () => {
  rejects({ minNewTokens: -1 }, "minNewTokens", ["must be an integer >= 0", "(got -1)"]);
  rejects({ minNewTokens: 0.5 }, "minNewTokens", ["(got 0.5)"]);
});

test("minNewTokens: at most maxNewTokens", () => {
  rejects({ minNewTokens: 11, maxNewTokens: 10 }, "minNewTokens", ["<= maxNewTokens (10)", "(got 11)"]);
  assert.equal(resolveGenerationParams({ minNewTokens: 10, maxNewTokens: 10 }).minNewTokens, 10);
});

test("doSample: boolean", () => {
  rejects({ doSample: 1 }, "doSample", ["must be a boolean", "(got 1)"]);
  rejects({ doSample: "true" }, "doSample", ['(got "true")']);
});

test("temperature: finite number >= 0", () => {
  rejects({ temperature: -1 }, "temperature", [">= 0", "(got -1)"]);
  rejects({ temperature: Infinity }, "temperature", ["finite", "(got Infinity)"]);
  rejects({ temperature: NaN }, "temperature", ["(got NaN)"]);
  rejects({ temperature: null }, "temperature", ["(got null)"]);
});

test("topK: integer >= 0", () => {
  rejects({ topK: -1 }, "topK", ["must be an integer >= 0", "(got -1)"]);
  rejects({ topK: 1.5 }, "topK", ["(got 1.5)"]);
  rejects({ topK: 2 ** 60 }, "topK", ["must be an integer"]);
});

test("topP: in (0, 1]", () => {
  rejects({ topP: 0 }, "topP", ["in (0, 1]", "(got 0)"]);
  rejects({ topP: 1.01 }, "topP", ["in (0, 1]", "(got 1.01)"]);
  rejects({ topP: -0.5 }, "topP", ["(got -0.5)"]);
  rejects({ topP: NaN }, "topP", ["(got NaN)"]);
});

test("typicalP: in (0, 1]", () => {
  rejects({ typicalP: 0 }, "typicalP", ["in (0, 1]", "(got 0)"]);
  rejects({ typicalP: 2 }, "typicalP", ["in (0, 1]", "(got 2)"]);
});

test("repetitionPenalty: finite number > 0", () => {
  rejects({ repetitionPenalty: 0 }, "repetitionPenalty", ["> 0", "(got 0)"]);
  rejects({ repetitionPenalty: -1.2 }, "repetitionPenalty", ["(got -1.2)"]);
  rejects({ repetitionPenalty: Infinity }, "repetitionPenalty", ["finite", "(got Infinity)"]);
});

test("noRepeatNgramSize: integer >= 0", () => {
  rejects({ noRepeatNgramSize: -2 }, "noRepeatNgramSize", ["must be an integer >= 0", "(got -2)"]);
  rejects({ noRepeatNgramSize: 2.5 }, "noRepeatNgramSize", ["(got 2.5)"]);
});

test("stop: an array of at most 16 non-empty, well-formed strings of at most 256 characters", () => {
  rejects({ stop: "###" }, "stop", ["must be an array", '(got "###")']);
  rejects({ stop: Array.from({ length: maxStopStrings + 1 }, (_, i) => `s${i}`) }, "stop", [
    `at most ${maxStopStrings}`,
    "(got an array of 17)",
  ]);
  rejects({ stop: ["ok", ""] }, "stop[1]", ["non-empty", '(got "")']);
  rejects({ stop: [7] }, "stop[0]", ["(got 7)"]);
  rejects({ stop: ["x".repeat(maxStopStringLength + 1)] }, "stop[0]", [`at most ${maxStopStringLength}`]);
  rejects({ stop: ["a\uD83D"] }, "stop[0]", ["well-formed"]);
  assert.deepEqual(resolveGenerationParams({ stop: ["😀", "x".repeat(maxStopStringLength)] }).stop.length, 2);
});

test("seed: safe integer >= 0", () => {
  rejects({ seed: -1 }, "seed", ["must be a safe integer >= 0", "(got -1)"]);
  rejects({ seed: 1.5 }, "seed", ["(got 1.5)"]);
  rejects({ seed: 2 ** 53 }, "seed", ["(got 9007199254740992)"]);
  rejects({ seed: "42" }, "seed", ['(got "42")']);
});
