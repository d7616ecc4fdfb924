/**
 * Bad input never hurts anyone else: malformed JSON, wrong types, unknown fields, empty and
 * too-long inputs, max_new_tokens over the limit, out-of-range sampling values — each a 4xx whose
 * message names the field, in each API's own error shape — while a request in flight runs on
 * undisturbed. An internal error is a 500 with an id, and the server keeps serving.
 */
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import { loadModel, type Model } from "../src/index.js";
import { startServer, type BlossomServer } from "../src/server/server.js";
import { fixtureDir } from "./helpers/fixtures.js";
import { get, post, postStream } from "./helpers/http-client.js";

describe("request validation", () => {
  let model: Model;
  let server: BlossomServer;
  let url: string;
  before(async () => {
    model = await loadModel(fixtureDir("trained-bloom-small"));
    server = await startServer({ model, port: 0, maxInputLength: 16, allowedMaxNewTokens: 64, maxStopSequences: 2, maxBatchSize: 4 });
    await server.ready;
    url = server.url;
  });
  after(async () => {
    await server.close();
    await model.dispose();
  });

  const long = "In the beginning God created the heaven and the earth. And the earth was without form, and void.";

  /** [path, body, expected status, text the message must contain (the field)] */
  const tgiCases: [string, unknown, number, string][] = [
    ["/generate", "{not json", 400, "not valid JSON"],
    ["/generate", "", 400, "body: empty"],
    ["/generate", "[1, 2]", 422, "body: must be an object"],
    ["/generate", {}, 422, "inputs: is required"],
    ["/generate", { inputs: 42 }, 422, "inputs: must be a string (got 42)"],
    ["/generate", { inputs: "" }, 422, "inputs: must not be empty"],
    ["/generate", { inputs: long }, 422, "inputs: must have at most 16 tokens"],
    ["/generate", { inputs: "hi", extra: 1 }, 422, "extra: unknown field"],
    ["/generate", { inputs: "hi", parameters: { foo: 1 } }, 422, "parameters.foo: unknown field"],
    ["/generate", { inputs: "hi", parameters: "fast" }, 422, "parameters: must be an object"],
    ["/generate", { inputs: "hi", parameters: { max_new_tokens: 65 } }, 422, "parameters.max_new_tokens: must be <= 64"],
    ["/generate", { inputs: "hi", parameters: { max_new_tokens: 0 } }, 422, "parameters.max_new_tokens: must be >= 1"],
    ["/generate", { inputs: "hi", parameters: { max_new_tokens: 2.5 } }, 422, "parameters.max_new_tokens: must be an integer"],
    ["/generate", { inputs: "hi", parameters: { max_new_tokens: "10" } }, 422, "parameters.max_new_tokens: must be an integer"],
    ["/generate", { inputs: "hi", parameters: { temperature: 0 } }, 422, "parameters.temperature: must be > 0"],
    ["/generate", { inputs: "hi", parameters: { temperature: -1 } }, 422, "parameters.temperature"],
    ["/generate", { inputs: "hi", parameters: { top_p: 1.5 } }, 422, "parameters.top_p: must be <= 1"],
    ["/generate", { inputs: "hi", parameters: { top_p: 0 } }, 422, "parameters.top_p: must be > 0"],
    ["/generate", { inputs: "hi", parameters: { top_k: 0 } }, 422, "parameters.top_k: must be >= 1"],
    ["/generate", { inputs: "hi", parameters: { typical_p: 2 } }, 422, "parameters.typical_p"],
    ["/generate", { inputs: "hi", parameters: { repetition_penalty: 0 } }, 422, "parameters.repetition_penalty: must be > 0"],
    ["/generate", { inputs: "hi", parameters: { seed: -3 } }, 422, "parameters.seed"],
    ["/generate", { inputs: "hi", parameters: { do_sample: "yes" } }, 422, "parameters.do_sample: must be a boolean"],
    ["/generate", { inputs: "hi", parameters: { stop: ["a", "b", "c"] } }, 422, "parameters.stop: must have at most 2"],
    ["/generate", { inputs: "hi", parameters: { stop: [""] } }, 422, "parameters.stop[0]: must not be empty"],
    ["/generate", { inputs: "hi", parameters: { stop: [1] } }, 422, "parameters.stop[0]: must be a string"],
    ["/generate", { inputs: "hi", parameters: { best_of: 2 } }, 422, "parameters.best_of"],
    ["/generate", { inputs: "hi", parameters: { grammar: { type: "json", value: {} } } }, 422, "parameters.grammar: is not supported"],
    ["/generate", { inputs: "hi", parameters: { min_new_tokens: 9, max_new_tokens: 4 } }, 422, "parameters.min_new_tokens"],
    ["/generate_stream", { inputs: "" }, 422, "inputs: must not be empty"],
    ["/generate_stream", { inputs: "hi", parameters: { temperature: "hot" } }, 422, "parameters.temperature: must be a number"],
    ["/generate_stream", { inputs: "hi", parameters: { decoder_input_details: true } }, 422, "parameters.decoder_input_details"],
    ["/tokenize", { inputs: "" }, 422, "inputs: must not be empty"],
    ["/tokenize", { inputs: long }, 422, "inputs: must have at most 16 tokens (--max-input-length); got"],
    ["/tokenize", { inputs: "a b ".repeat(50_000) }, 422, "inputs: must have at most 16 tokens (--max-input-length); its first 256 characters alone are"],
    ["/tokenize", { text: "hi" }, 422, "text: unknown field"],
  ];

  test("TGI routes: 400/422 with {error, error_type} naming the field", async () => {
    for (const [path, body, status, text] of tgiCases) {
      const r = await post(`${url}${path}`, body);
      const what = `${path} ${JSON.stringify(body)}`;
      assert.equal(r.status, status, `${what}: ${JSON.stringify(r.body)}`);
      assert.equal(r.body.error_type, "validation", what);
      assert.ok(r.body.error.includes(text), `${what}: "${r.body.error}" should contain "${text}"`);
    }
  });

  test("OpenAI route: 400 with {error: {message, type, param}}", async () => {
    const cases: [unknown, string][] = [
      ["{\"prompt\": ", "body"],
      [{ max_tokens: 3 }, "prompt"],
      [{ prompt: 5 }, "prompt"],
      [{ prompt: "" }, "prompt"],
      [{ prompt: [] }, "prompt"],
      [{ prompt: [[1, 99999]] }, "prompt[0][1]"],
      [{ prompt: "hi", max_tokens: 1000 }, "max_tokens"],
      [{ prompt: "hi", temperature: 3 }, "temperature"],
      [{ prompt: "hi", top_p: 0 }, "top_p"],
      [{ prompt: "hi", n: 2 }, "n"],
      [{ prompt: "hi", logprobs: 3 }, "logprobs"],
      [{ prompt: "hi", suffix: "x" }, "suffix"],
      [{ prompt: "hi", presence_penalty: 1 }, "presence_penalty"],
      [{ prompt: "hi", stop: 7 }, "stop"],
      [{ prompt: "hi", stream: "yes" }, "stream"],
      [{ prompt: "hi", functions: [] }, "functions"],
      [{ prompt: ["a", "b", "c", "d", "e"] }, "prompt"],
      [{ prompt: "hi", stream_options: { include_usage: true } }, "stream_options"],
      [{ prompt: "\ud800abc" }, "prompt"],
      [{ prompt: "hi", stop: ["x".repeat(300)] }, "stop[0]"],
      [{ prompt: "hi", logit_bias: [] }, "logit_bias"],
    ];
    for (const [body, param] of cases) {
      const r = await post(`${url}/v1/completions`, body);
      const what = JSON.stringify(body);
      assert.equal(r.status, 400, `${what}: ${JSON.stringify(r.body)}`);
      assert.equal(r.body.error.type, "invalid_request_error", what);
      assert.ok(r.body.error.message.includes(param), `${what}: "${r.body.error.message}" should name ${param}`);
      if (typeof body !== "string") assert.equal(r.body.error.param, param, what);
    }
  });

  test("original routes: 400 with {error, message, query_id}", async () => {
    const cases: [string, unknown, string][] = [
      ["/generate/", "nope", "body"],
      ["/generate/", {}, "text: is required"],
      ["/generate/", { text: "hi" }, "text: must be an array"],
      ["/generate/", { text: [] }, "text: must not be empty"],
      ["/generate/", { text: ["hi", 3] }, "text[1]: must be a string"],
      ["/generate/", { text: [""] }, "text[0]: must not be empty"],
      ["/generate/", { text: [long] }, "text[0]: must have at most 16 tokens"],
      ["/generate/", { text: ["hi"], max_new_tokens: 100 }, "max_new_tokens: must be <= 64"],
      ["/generate/", { text: ["hi"], top_p: 7 }, "top_p"],
      ["/generate/", { text: ["hi"], num_beams: 4 }, "num_beams: beam search is not supported"],
      ["/generate/", { text: ["hi"], beam_width: 4 }, "beam_width: unknown field"],
      ["/generate/", { text: ["hi"], method: "tokenize" }, "method"],
      ["/generate/", { text: ["a", "b", "c", "d", "e"] }, "text: must have at most 4"],
      ["/tokenize/", { text: [1] }, "text[0]: must be a string"],
      ["/forward/", { conditioning_text: ["a"], response: ["b", "c"] }, "response: must have as many"],
      ["/forward/", { conditioning_text: ["a"] }, "response: is required"],
      ["/generate/", { text: ["hi"], stop_sequences: [" "] }, "stop_sequences[0]: must not be only whitespace"],
      ["/generate/", { text: ["hi"], stop_sequences: ["a", "x".repeat(300)] }, "stop_sequences[1]: must have at most 256 characters"],
      ["/generate/", { text: ["hi"], pad_token_id: 99999999 }, "pad_token_id: must be a token id"],
      ["/tokenize/", { text: ["ok", "\udc00"] }, "text[1]: must be well-formed text"],
    ];
    for (const [path, body, text] of cases) {
      const before = (await get(`${url}/query_id/`)).body;
      const r = await post(`${url}${path}`, body);
      const what = `${path} ${JSON.stringify(body)}`;
      assert.equal(r.status, 400, `${what}: ${JSON.stringify(r.body)}`);
      assert.ok(["ValidationError", "BadRequest"].includes(r.body.error), what);
      assert.ok(r.body.message.includes(text), `${what}: "${r.body.message}" should contain "${text}"`);
      const key = `${path.slice(1, -1)}_query_id`;
      assert.equal(r.body.query_id, before[key], what);
    }
  });

  test("wrong media type, unknown routes and methods", async () => {
    const form = await fetch(`${url}/generate`, { method: "POST", headers: { "content-type": "application/x-www-form-urlencoded" }, body: "inputs=hi" });
    assert.equal(form.status, 415);
    assert.match(((await form.json()) as { error: string }).error, /unsupported media type/);
    const plain = await fetch(`${url}/generate`, { method: "POST", headers: { "content-type": "text/plain" }, body: '{"inputs":"hi"}' });
    assert.equal(plain.status, 415);
    const latin1 = await fetch(`${url}/generate`, { method: "POST", headers: { "content-type": "application/json; charset=latin1" }, body: '{"inputs":"hi"}' });
    assert.equal(latin1.status, 415);
    assert.match(((await latin1.json()) as { error: string }).error, /charset latin1 is not supported/);
    const bytes = Buffer.concat([Buffer.from('{"inputs":"caf'), Buffer.from([0xe9, 0x20, 0xff]), Buffer.from('"}')]);
    const invalid = await fetch(`${url}/generate`, { method: "POST", headers: { "content-type": "application/json" }, body: bytes });
    assert.equal(invalid.status, 400);
    assert.match(((await invalid.json()) as { error: string }).error, /body: not valid UTF-8/);
    const badUrl = await get(`${url}/v1/models%`);
    assert.equal(badUrl.status, 400);
    assert.match(badUrl.body.error.message, /^url: .* is not a valid url component/);
    const minTokens = await post(`${url}/v1/completions`, { prompt: "hi", min_tokens: 40 });
    assert.equal(minTokens.status, 400);
    assert.match(minTokens.body.error.message, /^min_tokens: must be an integer >= 0 and <= max_tokens \(\d+\)/);
    const missing = await post(`${url}/v1/chat/completions`, { messages: [] });
    assert.equal(missing.status, 404);
    assert.match(missing.body.error.message, /no route POST \/v1\/chat\/completions/);
    // A route that exists under another method: 405 with Allow.
    const wrongMethod = await get(`${url}/generate`);
    assert.equal(wrongMethod.status, 405);
    assert.equal(wrongMethod.headers.get("allow"), "POST");
  });

  test("extreme but valid sampling values answer 200 on every API (a temperature of 5e-324 once crashed the process)", async () => {
    const cases: [string, unknown][] = [
      ["/generate", { inputs: "hi", parameters: { max_new_tokens: 4, do_sample: true, temperature: 5e-324 } }],
      ["/v1/completions", { prompt: "hi", max_tokens: 4, temperature: 5e-324 }],
      ["/generate/", { text: ["hi"], max_new_tokens: 4, do_sample: true, temperature: 1e-310 }],
      ["/generate", { inputs: "hi", parameters: { max_new_tokens: 4, repetition_penalty: 1e-300 } }],
    ];
    for (const [path, body] of cases) {
      const r = await post(`${url}${path}`, body);
      assert.equal(r.status, 200, `${path} ${JSON.stringify(body)}: ${JSON.stringify(r.body)}`);
    }
    assert.equal((await get(`${url}/health`)).status, 200);
  });

  test("bad requests do not disturb a request in flight", async () => {
    const body = { inputs: "And the LORD said unto Moses,", parameters: { max_new_tokens: 48 } };
    const alone = await postStream(`${url}/generate_stream`, body);
    let burst: Promise<unknown> | undefined;
    const together = await postStream(`${url}/generate_stream`, body, (_e, i) => {
      // Once the stream is under way, throw every bad request at the server at once.
      if (i === 2) burst = Promise.all(tgiCases.map(([path, b]) => post(`${url}${path}`, b)));
    });
    await burst;
    assert.equal(together.events.length, 48);
    assert.equal(together.events.at(-1).generated_text, alone.events.at(-1).generated_text);
    assert.equal((await get(`${url}/health`)).status, 200);
  });
});

describe("internal errors", () => {
  test("an internal error is a 500 with an id; the server keeps serving", async () => {
    const model = await loadModel(fixtureDir("tiny-bloom-a"));
    // A model whose tokenizer fails on offsets only: /tokenize hits a bug, /generate does not.
    const tokenizer = Object.create(model.tokenizer, {
      encodeWithOffsets: {
        value: () => {
          throw new TypeError("simulated bug");
        },
      },
    });
    const broken = Object.create(model, { tokenizer: { value: tokenizer } }) as Model;
    const stderr = process.stderr.write.bind(process.stderr);
    const logged: string[] = [];
    process.stderr.write = ((chunk: string) => (logged.push(String(chunk)), true)) as typeof process.stderr.write;
    const server = await startServer({ model: broken, port: 0 });
    try {
      await server.ready;
      const r = await post(`${server.url}/tokenize`, { inputs: "hello" });
      assert.equal(r.status, 500);
      assert.equal(r.body.error_type, "internal");
      assert.match(r.body.error_id, /^[0-9a-f]{12}$/);
      assert.ok(r.body.error.includes(r.body.error_id));
      assert.ok(logged.some((l) => l.includes(r.body.error_id) && l.includes("simulated bug")), "the error is logged with its id");
      const ok = await post(`${server.url}/generate`, { inputs: "hello", parameters: { max_new_tokens: 3 } });
      assert.equal(ok.status, 200);
      assert.equal((await get(`${server.url}/health`)).status, 200);
    } finally {
      process.stderr.write = stderr;
      await server.close();
      await model.dispose();
    }
  });
});
