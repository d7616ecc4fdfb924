/**
 * Details of the APIs that clients read field by field: OpenAI's logprobs with echo (the prompt's
 * tokens first, as loglikelihood clients such as lm-eval-harness use them), text_offset in code
 * points that lines up with the text, tokens that hold part of a character as `bytes:`, the
 * default max_tokens under --allowed-max-new-tokens, a request that can never be admitted (400,
 * not a 429 that SDKs retry), GET /v1/models/{id}; TGI's details tokens with their own text.
 */
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import { loadModel, type Model } from "../src/index.js";
import { Rng } from "../src/generate/rng.js";
import { TextOffsets } from "../src/server/routes/openai.js";
import { startServer, type BlossomServer } from "../src/server/server.js";
import { fixtureDir } from "./helpers/fixtures.js";
import { get, post, postStream } from "./helpers/http-client.js";

/** The text from code point `offset` on (OpenAI's offsets count characters, as Python does). */
const fromCodePoint = (text: string, offset: number) => Array.from(text).slice(offset).join("");

/** Every listed token that is whole text sits at its offset; a `bytes:` token's offset is a character it is part of. */
function assertOffsetsLineUp(text: string, logprobs: { tokens: string[]; text_offset: number[] }, special: Set<string>) {
  const chars = Array.from(text);
  logprobs.tokens.forEach((token, i) => {
    const at = logprobs.text_offset[i]!;
    assert.ok(at >= 0 && at <= chars.length, `offset ${at} of token ${i} is inside the text`);
    if (i > 0) assert.ok(at >= logprobs.text_offset[i - 1]!, "offsets never go back");
    if (special.has(token)) return;
    if (token.startsWith("bytes:")) assert.ok(chars[at]!.codePointAt(0)! > 0x7f, `token ${i} (${token}) is part of the character at ${at}`);
    else assert.ok(fromCodePoint(text, at).startsWith(token), `token ${i} ${JSON.stringify(token)} at ${at}: ${JSON.stringify(fromCodePoint(text, at).slice(0, 20))}`);
  });
}

describe("OpenAI and TGI field details", () => {
  let model: Model;
  let server: BlossomServer;
  let url: string;
  const modelId = "org/small";
  before(async () => {
    model = await loadModel(fixtureDir("trained-bloom-small"));
    server = await startServer({ model, port: 0, modelId, allowedMaxNewTokens: 8, maxConcurrentRequests: 1 });
    await server.ready;
    url = server.url;
  });
  after(async () => {
    await server.close();
    await model.dispose();
  });

  test("echo with logprobs lists the prompt's tokens first, the first with null, then the completion's", async () => {
    const prompt = "In the beginning";
    const ids = await model.tokenizer.encode(prompt);
    const expected = await model.tokenLogprobs(ids, 1);
    const r = await post(`${url}/v1/completions`, { prompt, max_tokens: 5, temperature: 0, echo: true, logprobs: 0 });
    assert.equal(r.status, 200, JSON.stringify(r.body));
    const choice = r.body.choices[0];
    const lp = choice.logprobs;
    assert.ok(choice.text.startsWith(prompt));
    assert.equal(lp.tokens.length, ids.length + r.body.usage.completion_tokens);
    assert.deepEqual(lp.tokens.slice(0, ids.length), ids.map((id) => model.tokenizer.decode([id])));
    assert.equal(lp.token_logprobs[0], null);
    for (let i = 1; i < ids.length; i++) assert.ok(Math.abs(lp.token_logprobs[i] - expected[i - 1]!) < 1e-5, `prompt token ${i}`);
    for (const v of lp.token_logprobs.slice(ids.length)) assert.ok(v <= 0);
    assert.equal(lp.text_offset[0], 0);
    assertOffsetsLineUp(choice.text, lp, new Set());

    // The stream's first chunk carries the prompt's part; the tokens' chunks follow on from it.
    const s = await postStream(`${url}/v1/completions`, { prompt, max_tokens: 5, temperature: 0, echo: true, logprobs: 0, stream: true });
    const chunks = s.events.filter((e) => e !== "[DONE]").map((e) => e.choices[0]);
    assert.equal(chunks[0].text, prompt);
    assert.deepEqual(chunks[0].logprobs.tokens, lp.tokens.slice(0, ids.length));
    assert.deepEqual(chunks[0].logprobs.token_logprobs, lp.token_logprobs.slice(0, ids.length));
    const streamed = chunks.flatMap((c) => c.logprobs?.text_offset ?? []);
    assert.deepEqual(streamed, lp.text_offset);
  });

  test("text_offset counts code points and lines up with the text; partial characters are bytes:", async () => {
    // Characters outside the trained model's text come out as several byte tokens each.
    for (const prompt of ["😀 In the beginning", "héllo wörld — ∑"]) {
      const r = await post(`${url}/v1/completions`, { prompt, max_tokens: 8, temperature: 0, echo: true, logprobs: 0 });
      assert.equal(r.status, 200, JSON.stringify(r.body));
      const { text, logprobs } = r.body.choices[0];
      assertOffsetsLineUp(text, logprobs, new Set());
      assert.ok(logprobs.tokens.some((t: string) => /^bytes:(\\x[0-9a-f]{2})+$/.test(t)), `some token of ${JSON.stringify(prompt)} is part of a character: ${JSON.stringify(logprobs.tokens)}`);
      // The completion's offsets start where the echoed prompt ends.
      const promptTokens = (await model.tokenizer.encode(prompt)).length;
      assert.equal(logprobs.text_offset[promptTokens], Array.from(prompt).length);
    }
  });

  test("a special token takes no room in the completion's text", async () => {
    const eos = model.tokenizer.eosTokenId!;
    // min_tokens 0 and a prompt ending the way the fixture's text ends its verses make </s> likely; force it instead with the token ids path.
    const r = await post(`${url}/v1/completions`, { prompt: [eos, ...(await model.tokenizer.encode("And God said"))], max_tokens: 4, temperature: 0, echo: true, logprobs: 0 });
    assert.equal(r.status, 200, JSON.stringify(r.body));
    const { text, logprobs } = r.body.choices[0];
    // The echoed prompt writes </s> (ids are decoded with their special tokens), so it has width there.
    assert.ok(text.startsWith("</s>And God said"));
    assert.equal(logprobs.tokens[0], "</s>");
    assert.equal(logprobs.text_offset[1], 4);
    assertOffsetsLineUp(text, logprobs, new Set(["</s>"]));
  });

  test("offsets stay in line with the text where the bytes are not valid UTF-8 (each bad subpart is one U+FFFD)", async () => {
    // Prompt ids: a lone continuation byte, then "b" and more text.
    const byteToken = (byte: number) => {
      for (let id = 0; id < 1000; id++) {
        const b = model.tokenizer.tokenBytes(id);
        if (b.length === 1 && b[0] === byte) return id;
      }
      throw new Error(`no token for byte ${byte}`);
    };
    const b = await model.tokenizer.encode("beth");
    for (const prompt of [[byteToken(0x80), ...b], [...(await model.tokenizer.encode("a")), byteToken(0x80), ...b], [byteToken(0xe2), byteToken(0x82), ...b]]) {
      const r = await post(`${url}/v1/completions`, { prompt, max_tokens: 4, temperature: 0, echo: true, logprobs: 0 });
      assert.equal(r.status, 200, JSON.stringify(r.body));
      const { text, logprobs } = r.body.choices[0];
      assert.ok(text.includes("\uFFFD"), JSON.stringify(text));
      assertOffsetsLineUp(text, logprobs, new Set());
      assert.ok(fromCodePoint(text, logprobs.text_offset[prompt.length - b.length]).startsWith("beth"));
    }
  });

  test("TextOffsets agrees with UTF-8 decoding on random bytes cut into random tokens", () => {
    const rng = new Rng(11);
    const pool = [0x41, 0x80, 0xbf, 0xc2, 0xc3, 0xa9, 0xe0, 0xa0, 0xe2, 0x82, 0xac, 0xed, 0x9f, 0xf0, 0x90, 0x98, 0xf4, 0x8f, 0xff, 0xc0];
    const characters = (bytes: Uint8Array) => Array.from(new TextDecoder().decode(bytes)).length;
    for (let trial = 0; trial < 2000; trial++) {
      const bytes = Uint8Array.from({ length: 1 + Math.floor(rng.nextFloat() * 12) }, () => pool[Math.floor(rng.nextFloat() * pool.length)]!);
      const offsets = new TextOffsets(0);
      for (let p = 0; p < bytes.length; ) {
        const length = Math.min(bytes.length - p, 1 + Math.floor(rng.nextFloat() * 3));
        // The character holding byte p: the one it continues (the count does not grow with it), or a new one.
        const before = characters(bytes.subarray(0, p)), after = characters(bytes.subarray(0, p + 1));
        assert.equal(offsets.next(bytes.subarray(p, p + length)), after === before ? before - 1 : before, `bytes ${Array.from(bytes, (x) => x.toString(16))}, token at ${p}`);
        p += length;
      }
    }
  });

  test("a special token the completion ends with takes no room in its text", async () => {
    const tiny = await loadModel(fixtureDir("tiny-bloom-a"));
    const other = await startServer({ model: tiny, port: 0 });
    try {
      await other.ready;
      let found = false;
      for (let seed = 0; seed < 400 && !found; seed++) {
        const r = await post(`${other.url}/v1/completions`, { prompt: "The", max_tokens: 40, temperature: 2, seed, logprobs: 0 });
        const { text, logprobs, finish_reason } = r.body.choices[0];
        if (finish_reason !== "stop" || logprobs.tokens.at(-1) !== "</s>") continue;
        found = true;
        assert.equal(logprobs.text_offset.at(-1), Array.from(text as string).length);
        assertOffsetsLineUp(text, logprobs, new Set(["</s>"]));
      }
      assert.ok(found, "some seed below 400 ends on </s>");
    } finally {
      await other.close();
      await tiny.dispose();
    }
  });

  test("without max_tokens the default fits --allowed-max-new-tokens", async () => {
    const r = await post(`${url}/v1/completions`, { prompt: "In the beginning", temperature: 0 });
    assert.equal(r.status, 200, JSON.stringify(r.body));
    assert.ok(r.body.usage.completion_tokens <= 8);
  });

  test("more prompts than --max-concurrent-requests is a 400, not a 429 to retry", async () => {
    const r = await post(`${url}/v1/completions`, { prompt: ["a", "b"], max_tokens: 2 });
    assert.equal(r.status, 400, JSON.stringify(r.body));
    assert.equal(r.body.error.type, "invalid_request_error");
    assert.match(r.body.error.message, /2 prompts in one request exceed --max-concurrent-requests \(1\)/);
    const original = await post(`${url}/generate/`, { text: ["a", "b"], max_new_tokens: 2 });
    assert.equal(original.status, 400, JSON.stringify(original.body));
  });

  test("GET /v1/models/{id} answers for the served id (slashes included) and 404 otherwise", async () => {
    const r = await get(`${url}/v1/models/${modelId}`);
    assert.equal(r.status, 200);
    assert.equal(r.body.id, modelId);
    assert.equal(r.body.object, "model");
    const missing = await get(`${url}/v1/models/gpt-4`);
    assert.equal(missing.status, 404);
    assert.match(missing.body.error.message, /gpt-4.*does not exist/);
  });

  test("clients written for TGI: POST / returns the full text by default, a 'model' field is ignored, and TGI's names work on /v1/completions", async () => {
    const prompt = "In the beginning";
    const compat = await post(`${url}/`, { inputs: prompt, parameters: { max_new_tokens: 4 } });
    assert.equal(compat.status, 200, JSON.stringify(compat.body));
    const plain = await post(`${url}/generate`, { inputs: prompt, parameters: { max_new_tokens: 4 }, model: "bigscience/bloom" });
    assert.equal(plain.status, 200, JSON.stringify(plain.body));
    // TGI's compat route includes the prompt unless told otherwise; /generate does not.
    assert.equal(compat.body[0].generated_text, prompt + plain.body.generated_text);
    const without = await post(`${url}/`, { inputs: prompt, parameters: { max_new_tokens: 4, return_full_text: false } });
    assert.equal(without.body[0].generated_text, plain.body.generated_text);

    // Hugging Face's client (v4) posts TGI parameters to /v1/completions, as TGI's OpenAI route takes them.
    const hf = await post(`${url}/v1/completions`, { prompt, max_tokens: 4, do_sample: false, return_full_text: true, details: true, decoder_input_details: false, watermark: false, top_n_tokens: 0 });
    assert.equal(hf.status, 200, JSON.stringify(hf.body));
    assert.equal(hf.body.choices[0].text, prompt + plain.body.generated_text);
    // truncate keeps the prompt's last tokens: here " In the beginning".
    const truncated = await post(`${url}/v1/completions`, { prompt: "Genesis. " + prompt, max_tokens: 4, temperature: 0, truncate: 3, echo: true });
    const tail = await post(`${url}/v1/completions`, { prompt: " " + prompt, max_tokens: 4, temperature: 0, echo: true });
    assert.equal(truncated.body.choices[0].text, tail.body.choices[0].text);
    assert.ok(truncated.body.choices[0].text.startsWith(" " + prompt));
    const watermark = await post(`${url}/v1/completions`, { prompt, max_tokens: 4, watermark: true });
    assert.equal(watermark.status, 400);
    assert.equal(watermark.body.error.param, "watermark");
    // As TGI: do_sample false is greedy only when no warper asks for sampling.
    const texts = new Set<string>();
    for (const seed of [1, 2, 3, 4]) {
      const r = await post(`${url}/v1/completions`, { prompt, max_tokens: 8, do_sample: false, temperature: 1.5, seed });
      texts.add(r.body.choices[0].text);
    }
    assert.ok(texts.size > 1, "sampled with its temperature");
    const conflict = await post(`${url}/v1/completions`, { prompt, max_tokens: 2, echo: true, return_full_text: false });
    assert.equal(conflict.status, 400);
    assert.equal(conflict.body.error.param, "return_full_text");
    // The full text starts with the inputs as sent, even when truncate kept only their end (as TGI).
    const compatTruncated = await post(`${url}/`, { inputs: "Genesis. " + prompt, parameters: { max_new_tokens: 4, truncate: 3 } });
    assert.ok(compatTruncated.body[0].generated_text.startsWith("Genesis. " + prompt), compatTruncated.body[0].generated_text);
    const tokenize = await post(`${url}/tokenize`, { inputs: prompt, model: "bigscience/bloom" });
    assert.equal(tokenize.status, 200);
    // Anything else unknown is still named.
    const typo = await post(`${url}/v1/completions`, { prompt, max_token: 4 });
    assert.equal(typo.status, 400);
    assert.match(typo.body.error.message, /max_token: unknown field/);
  });

  test("TGI details list each token with its own text, even while a stop string is pending", async () => {
    const r = await post(`${url}/generate`, { inputs: "In the beginning", parameters: { max_new_tokens: 6, details: true, stop: [" first month of"] } });
    assert.equal(r.status, 200, JSON.stringify(r.body));
    const tokens: { id: number; text: string; special: boolean }[] = r.body.details.tokens;
    for (const t of tokens) if (!t.special) assert.equal(t.text, model.tokenizer.decode([t.id]), `token ${t.id}`);
    // Their texts add up to the decoded ids (the stop string did not match, so also to generated_text).
    assert.equal(tokens.map((t) => t.text).join(""), model.tokenizer.decode(tokens.map((t) => t.id)));
    assert.equal(r.body.generated_text, model.tokenizer.decode(tokens.map((t) => t.id)));
  });
});
