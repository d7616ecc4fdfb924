/**
 * The HTTP server's endpoints over real sockets on 127.0.0.1: every API's shapes, streaming order
 * and completeness (the concatenated stream equals the non-streamed text), stop strings, the
 * original server's endpoints, OpenAI completions, health/info/metrics.
 */
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import { loadModel, type Model } from "../src/index.js";
import { startServer, type BlossomServer } from "../src/server/server.js";
import { fixtureDir } from "./helpers/fixtures.js";
import { get, metric, post, postStream } from "./helpers/http-client.js";

describe("server on trained-bloom-small", () => {
  let model: Model;
  let server: BlossomServer;
  let url: string;
  before(async () => {
    model = await loadModel(fixtureDir("trained-bloom-small"), { maxBatchSize: 16 });
    server = await startServer({ model, port: 0, modelId: "trained-bloom-small", maxBatchSize: 16 });
    await server.ready;
    url = server.url;
  });
  after(async () => {
    await server.close();
    await model.dispose();
  });

  test("health, info and models", async () => {
    const health = await get(`${url}/health`);
    assert.equal(health.status, 200);
    const info = await get(`${url}/info`);
    assert.equal(info.status, 200);
    assert.equal(info.body.model_id, "trained-bloom-small");
    assert.equal(info.body.model_dtype, "bf16");
    assert.equal(info.body.strategy, "single");
    assert.equal(info.body.max_batch_size, 16);
    assert.equal(info.body.max_concurrent_requests, 128);
    assert.equal(info.body.max_input_length, 1024);
    assert.equal(info.body.allowed_max_new_tokens, 2048);
    assert.equal(typeof info.body.version, "string");
    assert.ok(info.body.max_batch_total_tokens > 0);
    const models = await get(`${url}/v1/models`);
    assert.equal(models.body.object, "list");
    assert.deepEqual(
      models.body.data.map((m: { id: string; object: string }) => [m.id, m.object]),
      [["trained-bloom-small", "model"]],
    );
  });

  test("TGI /generate: greedy text, details with tokens and prefill", async () => {
    const r = await post(`${url}/generate`, {
      inputs: "In the beginning",
      parameters: { max_new_tokens: 12, details: true, decoder_input_details: true },
    });
    assert.equal(r.status, 200);
    // The fixture's golden greedy continuation.
    assert.equal(r.body.generated_text, " of the first month, in the first month, in the");
    const d = r.body.details;
    assert.equal(d.finish_reason, "length");
    assert.equal(d.generated_tokens, 12);
    assert.equal(d.seed, null);
    assert.equal(d.tokens.length, 12);
    assert.equal(d.tokens.map((t: { text: string }) => t.text).join(""), r.body.generated_text);
    for (const t of d.tokens) {
      assert.equal(typeof t.id, "number");
      assert.ok(t.logprob <= 0 && Number.isFinite(t.logprob));
      assert.equal(t.special, false);
    }
    const ids = await model.tokenizer.encode("In the beginning");
    assert.deepEqual(
      d.prefill.map((t: { id: number }) => t.id),
      ids,
    );
    assert.equal(d.prefill[0].logprob, null);
    const expected = await model.tokenLogprobs(ids, 1);
    d.prefill.slice(1).forEach((t: { logprob: number }, i: number) => assert.ok(Math.abs(t.logprob - expected[i]!) < 1e-9));
    assert.equal(r.headers.get("x-generated-tokens"), "12");
  });

  test("TGI /generate_stream: one event per token, in order; the last carries generated_text and details; equals /generate", async () => {
    const parameters = { max_new_tokens: 40, details: true };
    const plain = await post(`${url}/generate`, { inputs: "And the LORD said unto Moses,", parameters });
    const stream = await postStream(`${url}/generate_stream`, { inputs: "And the LORD said unto Moses,", parameters });
    assert.equal(stream.status, 200);
    assert.equal(stream.events.length, 40);
    stream.events.forEach((e, i) => {
      assert.equal(e.index, i + 1);
      assert.equal(typeof e.token.id, "number");
      if (i < stream.events.length - 1) {
        assert.equal(e.generated_text, null);
        assert.equal(e.details, null);
      }
    });
    const last = stream.events.at(-1);
    assert.equal(last.generated_text, plain.body.generated_text);
    assert.deepEqual(last.details, { finish_reason: "length", generated_tokens: 40, seed: null, input_length: 7 });
    const concatenated = stream.events.map((e) => e.token.text).join("");
    assert.equal(concatenated, plain.body.generated_text);
    assert.deepEqual(
      stream.events.map((e) => e.token.id),
      plain.body.details.tokens.map((t: { id: number }) => t.id),
    );
  });

  test("stop sequences match decoded text across tokens, are not returned, and end with stop_sequence", async () => {
    const body = { inputs: "In the beginning", parameters: { max_new_tokens: 30, stop: ["first month, in"], details: true } };
    const r = await post(`${url}/generate`, body);
    assert.equal(r.body.generated_text, " of the ");
    assert.equal(r.body.details.finish_reason, "stop_sequence");
    const s = await postStream(`${url}/generate_stream`, body);
    assert.equal(s.events.map((e) => e.token.text).join(""), " of the ");
    assert.equal(s.events.at(-1).details.finish_reason, "stop_sequence");
    assert.equal(s.events.at(-1).generated_text, " of the ");
  });

  test("return_full_text, the compat route and seeded sampling", async () => {
    const full = await post(`${url}/generate`, { inputs: "In the beginning", parameters: { max_new_tokens: 4, return_full_text: true } });
    assert.equal(full.body.generated_text, "In the beginning of the first month");
    assert.equal(full.body.details, undefined);
    // The compat route returns the full text unless told otherwise, as TGI's does for a text-generation model.
    const compat = await post(`${url}/`, { inputs: "In the beginning", parameters: { max_new_tokens: 4 } });
    assert.deepEqual(compat.body, [{ generated_text: "In the beginning of the first month" }]);
    const compatStream = await postStream(`${url}/`, { inputs: "In the beginning", parameters: { max_new_tokens: 4 }, stream: true });
    assert.equal(compatStream.events.at(-1).generated_text, "In the beginning of the first month");
    const sampled = { inputs: "And it came to pass", parameters: { max_new_tokens: 16, do_sample: true, top_k: 50, seed: 7, details: true } };
    const a = await post(`${url}/generate`, sampled);
    const b = await post(`${url}/generate`, sampled);
    assert.equal(a.body.generated_text, b.body.generated_text);
    assert.equal(a.body.details.seed, 7);
    // A sampled request without a seed reports the seed it drew, which reproduces it.
    const c = await post(`${url}/generate`, { ...sampled, parameters: { ...sampled.parameters, seed: undefined } });
    assert.equal(typeof c.body.details.seed, "number");
    const d = await post(`${url}/generate`, { ...sampled, parameters: { ...sampled.parameters, seed: c.body.details.seed } });
    assert.equal(d.body.generated_text, c.body.generated_text);
  });

  test("TGI /tokenize gives ids with character offsets", async () => {
    const r = await post(`${url}/tokenize`, { inputs: "In the beginning" });
    assert.equal(r.status, 200);
    assert.deepEqual(r.body, [
      { id: 1154, text: "In", start: 0, stop: 2 },
      { id: 262, text: " the", start: 2, stop: 6 },
      { id: 2095, text: " beginning", start: 6, stop: 16 },
    ]);
    // Offsets count characters, not UTF-16 units: the emoji is one character.
    const emoji = await post(`${url}/tokenize`, { inputs: "a 😀 b" });
    const last = emoji.body.at(-1);
    assert.deepEqual([last.text, last.start, last.stop], [" b", 3, 5]);
  });

  test("original /generate/, /tokenize/, /forward/ and /query_id/ shapes", async () => {
    const before = await get(`${url}/query_id/`);
    assert.deepEqual(Object.keys(before.body).sort(), ["forward_query_id", "generate_query_id", "tokenize_query_id"]);
    const g = await post(`${url}/generate/`, { text: ["In the beginning", "And the LORD said unto Moses,"], max_new_tokens: 8, do_sample: false });
    assert.equal(g.status, 200);
    assert.deepEqual(g.body.text, ["In the beginning of the first month, in the first", "And the LORD said unto Moses, Behold, I will bring a fire upon"]);
    assert.deepEqual(g.body.num_generated_tokens, [8, 8]);
    assert.equal(g.body.query_id, before.body.generate_query_id);
    assert.match(g.body.total_time_taken, /^\d+\.\d\d secs$/);
    const removed = await post(`${url}/generate/`, { text: ["In the beginning"], max_new_tokens: 8, remove_input_from_output: true, early_stopping: true, length_penalty: 1 });
    assert.deepEqual(removed.body.text, [" of the first month, in the first"]);
    assert.equal(removed.body.query_id, before.body.generate_query_id + 1);
    // min_length counts the prompt, as in transformers: 3 prompt tokens + at least 5 new.
    const minLength = await post(`${url}/generate/`, { text: ["In the beginning"], max_new_tokens: 8, min_length: 8 });
    assert.equal(minLength.status, 200);
    // The earlier server's fields: temperature 0 means greedy; stop_sequences; method.
    const older = await post(`${url}/generate/`, { text: ["In the beginning"], max_new_tokens: 12, do_sample: true, temperature: 0, stop_sequences: ["month"], num_beams: 1, method: "generate", remove_input_from_output: true });
    assert.equal(older.status, 200);
    assert.deepEqual(older.body.text, [" of the first"]);
    assert.equal(older.body.method, "generate");

    const t = await post(`${url}/tokenize/`, { text: ["In the beginning", "He"] });
    assert.deepEqual(t.body.token_ids[0], [1154, 262, 2095]);
    assert.equal(t.body.query_id, before.body.tokenize_query_id);
    assert.match(t.body.total_time_taken, /^\d+\.\d\d msecs$/);
    const padded = await post(`${url}/tokenize/`, { text: ["In the beginning", "In"], padding: true });
    assert.deepEqual(padded.body.attention_mask, [
      [1, 1, 1],
      [0, 0, 1],
    ]);
    assert.equal(padded.body.token_ids[1].length, 3);

    const f = await post(`${url}/forward/`, { conditioning_text: ["In the beginning"], response: [" of the first month"] });
    assert.equal(f.status, 200);
    const ids = await model.tokenizer.encode("In the beginning");
    const responseIds = await model.tokenizer.encode(" of the first month");
    const logprobs = await model.tokenLogprobs([...ids, ...responseIds], ids.length);
    const expected = -logprobs.reduce((a, b) => a + b, 0) / logprobs.length;
    assert.ok(Math.abs(f.body.nll - expected) < 1e-9, `${f.body.nll} vs ${expected}`);
    // The model's own continuation is far likelier than an unrelated one.
    const unlikely = await post(`${url}/forward/`, { conditioning_text: ["In the beginning"], response: [" zebra quantum"] });
    assert.ok(unlikely.body.nll > f.body.nll + 2);
    const afterIds = await get(`${url}/query_id/`);
    assert.equal(afterIds.body.forward_query_id, before.body.forward_query_id + 2);
  });

  test("OpenAI /v1/completions: plain, streamed (ending [DONE]), echo, logprobs, several prompts", async () => {
    const plain = await post(`${url}/v1/completions`, { model: "trained-bloom-small", prompt: "In the beginning", max_tokens: 12, temperature: 0 });
    assert.equal(plain.status, 200);
    assert.equal(plain.body.object, "text_completion");
    assert.match(plain.body.id, /^cmpl-/);
    assert.equal(plain.body.model, "trained-bloom-small");
    assert.deepEqual(plain.body.choices, [{ text: " of the first month, in the first month, in the", index: 0, logprobs: null, finish_reason: "length" }]);
    assert.deepEqual(plain.body.usage, { prompt_tokens: 3, completion_tokens: 12, total_tokens: 15 });

    const stream = await postStream(`${url}/v1/completions`, { prompt: "In the beginning", max_tokens: 12, temperature: 0, stream: true, stream_options: { include_usage: true } });
    assert.equal(stream.events.at(-1), "[DONE]");
    const chunks = stream.events.slice(0, -1);
    const usage = chunks.pop();
    assert.deepEqual(usage.usage, { prompt_tokens: 3, completion_tokens: 12, total_tokens: 15 });
    assert.equal(chunks.map((c) => c.choices[0].text).join(""), plain.body.choices[0].text);
    assert.ok(chunks.slice(0, -1).every((c) => c.choices[0].finish_reason === null));
    assert.equal(chunks.at(-1).choices[0].finish_reason, "length");

    const stopped = await post(`${url}/v1/completions`, { prompt: "In the beginning", max_tokens: 12, temperature: 0, stop: ",", echo: true, logprobs: 0 });
    const choice = stopped.body.choices[0];
    assert.equal(choice.text, "In the beginning of the first month");
    assert.equal(choice.finish_reason, "stop");
    // With echo the prompt's tokens come first (the first without a log-probability), as OpenAI lists them.
    assert.deepEqual(choice.logprobs.tokens, ["In", " the", " beginning", " of", " the", " first", " month", ","]);
    assert.equal(choice.logprobs.token_logprobs.length, 8);
    assert.equal(choice.logprobs.token_logprobs[0], null);
    assert.equal(choice.logprobs.text_offset[3], "In the beginning".length);

    const two = await post(`${url}/v1/completions`, { prompt: ["In the beginning", "And the LORD said unto Moses,"], max_tokens: 8, temperature: 0 });
    assert.deepEqual(
      two.body.choices.map((c: { index: number; text: string }) => [c.index, c.text]),
      [
        [0, " of the first month, in the first"],
        [1, " Behold, I will bring a fire upon"],
      ],
    );
    const streamedTwo = await postStream(`${url}/v1/completions`, { prompt: ["In the beginning", "And the LORD said unto Moses,"], max_tokens: 8, temperature: 0, stream: true });
    for (const index of [0, 1]) {
      const text = streamedTwo.events.filter((e) => e !== "[DONE]" && e.choices[0].index === index).map((e) => e.choices[0].text).join("");
      assert.equal(text, two.body.choices[index].text);
    }
  });

  test("/metrics exports request counts, durations, queue, batch, tokens and latency histograms", async () => {
    // A URL the router cannot decode is answered before the request hooks: counted all the same.
    for (let i = 0; i < 3; i++) assert.equal((await get(`${url}/health%zz`)).status, 400);
    const r = await get(`${url}/metrics`);
    assert.equal(r.status, 200);
    const text = r.body as string;
    for (const name of [
      "blossom_request_count",
      "blossom_request_duration_seconds_bucket",
      "blossom_queue_size",
      "blossom_batch_current_size",
      "blossom_generated_tokens_total",
      "blossom_time_to_first_token_seconds_bucket",
      "blossom_time_per_output_token_seconds_bucket",
      "blossom_kv_cache_blocks_free",
    ]) {
      assert.ok(text.includes(name), `missing ${name}`);
    }
    assert.ok(metric(text, "blossom_generated_tokens_total")! > 100);
    assert.ok(metric(text, "blossom_request_count", 'route="/generate",status="200"')! >= 1);
    assert.equal(metric(text, "blossom_queue_size"), 0);
    assert.equal(metric(text, "blossom_kv_cache_blocks_free"), metric(text, "blossom_kv_cache_blocks_total"));
    assert.ok(metric(text, "blossom_request_count", 'method="GET",route="unmatched",status="400"')! >= 3, "the undecodable URLs' 400s");
    assert.ok(metric(text, "blossom_request_duration_seconds_count", 'route="unmatched"')! >= 3, "and their durations");
    // The process's memory, for watching a long-running server (the weights alone are megabytes here).
    assert.ok(metric(text, "process_resident_memory_bytes")! > 10 * 2 ** 20);
    assert.ok(metric(text, "nodejs_heap_size_used_bytes")! > 0);
  });
});

describe("server lifecycle", () => {
  test("/health is 503 while the model loads, then 200; generation is 503 meanwhile", async () => {
    let resolveModel!: (m: Model) => void;
    const loading = new Promise<Model>((resolve) => (resolveModel = resolve));
    const server = await startServer({ model: loading, port: 0, modelId: "tiny" });
    const model = await loadModel(fixtureDir("tiny-bloom-a"));
    try {
      const health = await get(`${server.url}/health`);
      assert.equal(health.status, 503);
      assert.equal(health.body.error_type, "healthcheck");
      const gen = await post(`${server.url}/generate`, { inputs: "hello", parameters: { max_new_tokens: 2 } });
      assert.equal(gen.status, 503);
      assert.match(gen.body.error, /loading/);
      resolveModel(model);
      await server.ready;
      assert.equal((await get(`${server.url}/health`)).status, 200);
      assert.equal((await post(`${server.url}/generate`, { inputs: "hello", parameters: { max_new_tokens: 2 } })).status, 200);
    } finally {
      await server.close();
      await model.dispose();
    }
  });

  test("a server given a model reference loads it (any strategy), refuses an unknown strategy, and disposes what it loaded", async () => {
    await assert.rejects(startServer({ model: fixtureDir("tiny-bloom-a"), port: 0, strategy: "bogus" }), /strategy: must be one of/);
    const replicas = await startServer({ model: fixtureDir("tiny-bloom-a"), port: 0, strategy: "replicas", modelOptions: { replicas: 2 } });
    const served = await replicas.ready;
    assert.equal(served.info.replicas, 2);
    assert.equal((await get(`${replicas.url}/info`)).body.strategy, "replicas");
    await replicas.close();
    const server = await startServer({ model: fixtureDir("tiny-bloom-a"), port: 0 });
    const model = await server.ready;
    assert.equal((await get(`${server.url}/info`)).body.model_id, "tiny-bloom-a");
    await server.close();
    await assert.rejects(model.generate(["x"]), /disposed/);
  });
});
