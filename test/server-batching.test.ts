/**
 * Many clients at once: continuous batching (a short request sent after a long one finishes
 * first, and greedy results are the same as alone), cancellation on disconnect frees the
 * sequence's KV-cache blocks, 429 over the concurrency limit, admission held back by the batch
 * token budget, and a bounded concurrent load with no 5xx and every response complete.
 * Orderings and counters only: no timing is asserted.
 */
import assert from "node:assert/strict";
import { connect } from "node:net";
import { after, before, describe, test } from "node:test";
import { loadModel, type Model } from "../src/index.js";
import { startServer, type BlossomServer } from "../src/server/server.js";
import { fixtureDir } from "./helpers/fixtures.js";
import { get, metric, pollUntil, post, postStream } from "./helpers/http-client.js";

async function metrics(url: string): Promise<string> {
  return (await get(`${url}/metrics`)).body as string;
}

/** Waits until no sequence is in flight and every KV-cache block is free again. */
async function allFree(url: string): Promise<string> {
  return pollUntil(async () => {
    const text = await metrics(url);
    const free = metric(text, "blossom_kv_cache_blocks_free");
    return metric(text, "blossom_sequences_in_flight") === 0 && free !== undefined && free === metric(text, "blossom_kv_cache_blocks_total") && text;
  }, "every sequence to end and its KV-cache blocks to be freed");
}

const long = { inputs: "In the beginning", parameters: { max_new_tokens: 2000, min_new_tokens: 2000 } };

describe("continuous batching and cancellation on trained-bloom-small", () => {
  let model: Model;
  let server: BlossomServer;
  let url: string;
  before(async () => {
    model = await loadModel(fixtureDir("trained-bloom-small"));
    server = await startServer({ model, port: 0 });
    await server.ready;
    url = server.url;
  });
  after(async () => {
    await server.close();
    await model.dispose();
  });

  test("a short request sent after a long one finishes first, with the same tokens as alone", async () => {
    const shortBody = { inputs: "And the LORD said unto Moses,", parameters: { max_new_tokens: 16, details: true } };
    const shortAlone = await post(`${url}/generate`, shortBody);
    const longAlone = await post(`${url}/generate`, { inputs: long.inputs, parameters: { max_new_tokens: 48, details: true } });

    const order: string[] = [];
    let short: Promise<void> | undefined;
    let shortResult: { body: { generated_text: string; details: { tokens: { id: number }[] } } } | undefined;
    let eventsWhenShortDone = -1;
    const longStream = await postStream(`${url}/generate_stream`, long, (event, i) => {
      if (i === 0) {
        // The long sequence is decoding; the short one joins the running batch.
        short = post(`${url}/generate`, shortBody).then((r) => {
          shortResult = r;
          order.push("short");
        });
      }
      if (shortResult && eventsWhenShortDone < 0) eventsWhenShortDone = i;
      // Keep reading until well after the short request is done, then hang up.
      if (eventsWhenShortDone >= 0 && i >= Math.max(eventsWhenShortDone + 5, 60)) return "stop";
      if (event.generated_text !== null) order.push("long");
      return undefined;
    });
    await short;
    assert.deepEqual(order, ["short"], "the short request finished while the long one was still generating");
    assert.ok(longStream.events.length < 2000 && longStream.events.every((e) => e.generated_text === null));
    assert.equal(shortResult!.body.generated_text, shortAlone.body.generated_text);
    assert.deepEqual(
      shortResult!.body.details.tokens.map((t) => t.id),
      shortAlone.body.details.tokens.map((t: { id: number }) => t.id),
    );
    // The long sequence, batched with the short one, made the same tokens as alone too.
    assert.deepEqual(
      longStream.events.slice(0, 48).map((e) => e.token.id),
      longAlone.body.details.tokens.map((t: { id: number }) => t.id),
    );
    await allFree(url);
  });

  test("a client that disconnects has its sequence cancelled and its KV-cache blocks freed", async () => {
    const cancelledBefore = metric(await metrics(url), "blossom_sequences_finished_total", 'reason="cancelled"') ?? 0;
    // Streaming: hang up after a few tokens.
    const stream = await postStream(`${url}/generate_stream`, long, (_e, i) => (i === 4 ? "stop" : undefined));
    assert.equal(stream.events.length, 5);
    await allFree(url);

    // Not streaming: hang up while the answer is being generated.
    const controller = new AbortController();
    const pending = fetch(`${url}/generate`, { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(long), signal: controller.signal }).catch(
      (err: Error) => err.name,
    );
    await pollUntil(async () => metric(await metrics(url), "blossom_batch_current_size") === 1, "the long request to be running");
    controller.abort();
    assert.equal(await pending, "AbortError");
    const text = await allFree(url);
    assert.equal(metric(text, "blossom_sequences_finished_total", 'reason="cancelled"'), cancelledBefore + 2);
    assert.equal(metric(text, "blossom_batch_current_size"), 0);
  });

  test("a client gone before its request is admitted (while its prompt is tokenized) has nothing generated for it", async () => {
    // A long prompt keeps the route in its tokenizing step while the socket closes; each request is
    // sent whole over a raw socket that is destroyed at once.
    const prompt = "And the LORD spake unto Moses, saying, ".repeat(24);
    const requests: [string, unknown][] = [
      ["/generate_stream", { inputs: prompt, parameters: { max_new_tokens: 2000, min_new_tokens: 2000 } }],
      ["/generate", { inputs: prompt, parameters: { max_new_tokens: 2000, min_new_tokens: 2000 } }],
      ["/v1/completions", { prompt, max_tokens: 2000, min_tokens: 2000, stream: true }],
      ["/v1/completions", { prompt, max_tokens: 2000, min_tokens: 2000 }],
      ["/generate/", { text: [prompt], max_new_tokens: 2000, min_length: 2000 }],
    ];
    const { port } = new URL(url);
    const before = metric(await metrics(url), "blossom_generated_tokens_total") ?? 0;
    for (let round = 0; round < 3; round++) {
      for (const [path, body] of requests) {
        const json = JSON.stringify(body);
        await new Promise<void>((resolve, reject) => {
          const socket = connect(Number(port), "127.0.0.1", () => {
            socket.write(`POST ${path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: ${Buffer.byteLength(json)}\r\n\r\n${json}`, () => {
              socket.destroy();
              resolve();
            });
          });
          socket.on("error", reject);
        });
      }
    }
    const text = await allFree(url);
    const generated = (metric(text, "blossom_generated_tokens_total") ?? 0) - before;
    // Each of the 15 requests makes at most the few tokens of a step or two before its close is seen.
    assert.ok(generated < 2000, `${generated} tokens were generated for clients that had gone`);
  });

  test("over --max-concurrent-requests a request gets 429 in each API's shape; capacity returns after cancellation", async () => {
    const limited = await startServer({ model, port: 0, maxConcurrentRequests: 2 });
    await limited.ready;
    const base = limited.url;
    try {
      const stop = [false, false];
      const started = [false, false];
      const streams = [0, 1].map((k) =>
        postStream(`${base}/generate_stream`, long, () => {
          started[k] = true;
          return stop[k] ? "stop" : undefined;
        }),
      );
      await pollUntil(async () => started[0] && started[1], "both long requests to stream");

      const tgi = await post(`${base}/generate`, { inputs: "hi", parameters: { max_new_tokens: 2 } });
      assert.equal(tgi.status, 429);
      assert.equal(tgi.body.error_type, "overloaded");
      assert.match(tgi.body.error, /overloaded.*--max-concurrent-requests/);
      const tgiStream = await postStream(`${base}/generate_stream`, { inputs: "hi" });
      assert.equal(tgiStream.status, 429);
      const openai = await post(`${base}/v1/completions`, { prompt: "hi", max_tokens: 2 });
      assert.equal(openai.status, 429);
      assert.equal(openai.body.error.code, "overloaded");
      const original = await post(`${base}/generate/`, { text: ["hi"], max_new_tokens: 2 });
      assert.equal(original.status, 429);
      assert.equal(original.body.error, "Overloaded");
      assert.equal(typeof original.body.query_id, "number");
      assert.ok(metric(await metrics(base), "blossom_requests_rejected_overloaded_total")! >= 4);

      stop[0] = true;
      await streams[0];
      await pollUntil(async () => metric(await metrics(base), "blossom_sequences_in_flight") === 1, "the cancelled sequence to be released");
      const ok = await post(`${base}/generate`, { inputs: "hi", parameters: { max_new_tokens: 2 } });
      assert.equal(ok.status, 200);
      stop[1] = true;
      await streams[1];
      await allFree(base);
    } finally {
      await limited.close();
    }
  });
});

describe("admission within --max-batch-total-tokens", () => {
  test("a request that does not fit the batch budget waits until it does; one that never fits is refused", async () => {
    const budget = 300;
    const model = await loadModel(fixtureDir("trained-bloom-small"), { maxBatchTotalTokens: budget });
    const server = await startServer({ model, port: 0, maxBatchTotalTokens: budget });
    try {
      await server.ready;
      const url = server.url;
      const refused = await post(`${url}/generate`, { inputs: "In the beginning", parameters: { max_new_tokens: 298 } });
      assert.equal(refused.status, 422);
      assert.match(refused.body.error, /parameters\.max_new_tokens: inputs \(3 tokens\) \+ parameters\.max_new_tokens \(298\) = 301 must be <= 300/);

      const order: string[] = [];
      let waiting: Promise<unknown> | undefined;
      const first = postStream(`${url}/generate_stream`, { inputs: "In the beginning", parameters: { max_new_tokens: 250, min_new_tokens: 250 } }, (event, i) => {
        if (i === 0) {
          // 3 + 250 are reserved; 7 + 100 more would exceed 300, so this one queues.
          waiting = post(`${url}/generate`, { inputs: "And the LORD said unto Moses,", parameters: { max_new_tokens: 100 } }).then((r) => {
            order.push("second");
            return r;
          });
        }
        if (event.generated_text !== null) order.push("first");
        return undefined;
      });
      const queued = await pollUntil(async () => {
        const text = await metrics(url);
        // (The engine's gauges are what it last pushed: a push may also catch the first request
        // submitted and not yet admitted, queue 1 and batch 0.)
        return metric(text, "blossom_queue_size") === 1 && metric(text, "blossom_batch_current_size") === 1 && text;
      }, "the second request to wait in the queue while the first runs");
      assert.equal(metric(queued, "blossom_batch_current_size"), 1);
      const stream = await first;
      const second = (await waiting) as { status: number; body: { generated_text: string } };
      assert.equal(stream.events.length, 250);
      assert.equal(second.status, 200);
      assert.deepEqual(order, ["first", "second"]);
      await allFree(url);
    } finally {
      await server.close();
      await model.dispose();
    }
  });
});

describe("bounded concurrent load on tiny-bloom-a", () => {
  test("32 clients x 3 requests over every API: no 5xx, every response complete and as alone", async () => {
    const model = await loadModel(fixtureDir("tiny-bloom-a"));
    const server = await startServer({ model, port: 0 });
    try {
      await server.ready;
      const url = server.url;
      const prompts = ["the license", "you may not", "copyright holders", "permission is hereby granted"];
      type Kind = "generate" | "stream" | "completions" | "completions-stream" | "original";
      const kinds: Kind[] = ["generate", "stream", "completions", "completions-stream", "original"];
      /** The generated text of one request of a kind, checked for completeness. */
      const run = async (kind: Kind, prompt: string, maxNewTokens: number): Promise<{ status: number; text: string }> => {
        switch (kind) {
          case "generate": {
            const r = await post(`${url}/generate`, { inputs: prompt, parameters: { max_new_tokens: maxNewTokens, details: true } });
            if (r.status === 200) assert.equal(r.body.details.generated_tokens, r.body.details.tokens.length);
            return { status: r.status, text: r.body.generated_text };
          }
          case "stream": {
            const r = await postStream(`${url}/generate_stream`, { inputs: prompt, parameters: { max_new_tokens: maxNewTokens } });
            const last = r.events.at(-1);
            assert.ok(last && typeof last.generated_text === "string", "the stream ends with generated_text");
            assert.equal(r.events.map((e) => e.token.text).join(""), last.generated_text);
            return { status: r.status, text: last.generated_text };
          }
          case "completions": {
            const r = await post(`${url}/v1/completions`, { prompt, max_tokens: maxNewTokens, temperature: 0 });
            return { status: r.status, text: r.body.choices[0].text };
          }
          case "completions-stream": {
            const r = await postStream(`${url}/v1/completions`, { prompt, max_tokens: maxNewTokens, temperature: 0, stream: true });
            assert.equal(r.events.at(-1), "[DONE]");
            return { status: r.status, text: r.events.slice(0, -1).map((e) => e.choices[0].text).join("") };
          }
          case "original": {
            const r = await post(`${url}/generate/`, { text: [prompt], max_new_tokens: maxNewTokens, remove_input_from_output: true });
            return { status: r.status, text: r.body.text[0] };
          }
        }
      };
      const jobs = (client: number) =>
        [0, 1, 2].map((k) => ({ kind: kinds[(client + k) % kinds.length]!, prompt: prompts[(client * 3 + k) % prompts.length]!, maxNewTokens: 8 + 4 * ((client + k) % 4) }));

      // Every distinct request alone first, through /generate, as the reference.
      const reference = new Map<string, string>();
      for (let client = 0; client < 32; client++) {
        for (const job of jobs(client)) {
          const key = `${job.prompt}|${job.maxNewTokens}`;
          if (!reference.has(key)) reference.set(key, (await run("generate", job.prompt, job.maxNewTokens)).text);
        }
      }

      const results = await Promise.all(
        Array.from({ length: 32 }, async (_, client) => {
          const out = [];
          for (const job of jobs(client)) out.push({ job, result: await run(job.kind, job.prompt, job.maxNewTokens) });
          return out;
        }),
      );
      const flat = results.flat();
      assert.equal(flat.length, 96);
      for (const { job, result } of flat) {
        assert.equal(result.status, 200, `${job.kind} ${job.prompt}`);
        assert.equal(result.text, reference.get(`${job.prompt}|${job.maxNewTokens}`), `${job.kind} "${job.prompt}" ${job.maxNewTokens}`);
      }
      const text = await allFree(url);
      const fiveHundreds = text.split("\n").filter((l) => l.startsWith("blossom_request_count{") && /status="5\d\d"/.test(l));
      assert.deepEqual(fiveHundreds, []);
    } finally {
      await server.close();
      await model.dispose();
    }
  });
});
