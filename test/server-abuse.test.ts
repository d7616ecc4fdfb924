/**
 * Hostile or careless clients within the documented limits (a security audit's findings): a body
 * that never finishes arriving is timed out; /forward/ counts against --max-concurrent-requests and
 * stops scoring for a client that left; megabyte texts are refused or truncated without tokenizing
 * all of them; max_time beyond a timer's range is no deadline (it cut generation after 1 ms);
 * stop_sequences of the longest allowed length pass; logit_bias with a "__proto__" key is refused
 * like any other.
 */
import assert from "node:assert/strict";
import { connect } from "node:net";
import { after, before, describe, test } from "node:test";
import { loadModel, type Model } from "../src/index.js";
import { startServer, type BlossomServer } from "../src/server/server.js";
import { fixtureDir } from "./helpers/fixtures.js";
import { get, metric, post } from "./helpers/http-client.js";

describe("abuse within the limits", () => {
  let model: Model;
  let server: BlossomServer;
  let url: string;
  before(async () => {
    model = await loadModel(fixtureDir("trained-bloom-small"));
    server = await startServer({ model, port: 0, maxConcurrentRequests: 4, maxInputLength: 64, allowedMaxNewTokens: 2048, maxStopSequences: 16 });
    await server.ready;
    url = server.url;
  });
  after(async () => {
    await server.close();
    await model.dispose();
  });

  test("a request must arrive whole within a minute (a trickled body held its connection forever)", () => {
    // Node answers 408 at its next connection check after the deadline; the setting is what matters here.
    assert.equal(server.app.server.requestTimeout, 60_000);
  });

  test("/forward/ counts its texts against --max-concurrent-requests", async () => {
    const r = await post(`${url}/forward/`, { conditioning_text: ["a", "b", "c", "d", "e"], response: [" x", " y", " z", " w", " v"] });
    assert.equal(r.status, 400, JSON.stringify(r.body));
    assert.match(r.body.message, /5 prompts in one request exceed --max-concurrent-requests \(4\)/);
    const ok = await post(`${url}/forward/`, { conditioning_text: ["In the beginning"], response: [" of the first month"] });
    assert.equal(ok.status, 200, JSON.stringify(ok.body));
  });

  test("/forward/ refuses a megabyte text from its start, like every route", async () => {
    const huge = "a".repeat(2 ** 20);
    for (const body of [
      { conditioning_text: [huge], response: [" b"] },
      { conditioning_text: ["a"], response: [huge] },
    ]) {
      const r = await post(`${url}/forward/`, body);
      assert.equal(r.status, 400, JSON.stringify(r.body).slice(0, 300));
      assert.match(r.body.message, /must have at most 64 tokens \(--max-input-length\); its first 1024 characters alone are/);
    }
  });

  test("truncate keeps the last tokens of a megabyte text without tokenizing all of it, and the same ones", async () => {
    const sentence = "And the LORD spake unto Moses, saying, Speak unto the children of Israel. ";
    const long = sentence.repeat(Math.ceil(2 ** 20 / sentence.length));
    const r = await post(`${url}/generate`, { inputs: long, parameters: { max_new_tokens: 3, truncate: 32, details: true, decoder_input_details: true } });
    assert.equal(r.status, 200, JSON.stringify(r.body).slice(0, 300));
    const all = await model.tokenizer.encode(long);
    assert.deepEqual(
      r.body.details.prefill.map((t: { id: number }) => t.id),
      all.slice(all.length - 32),
    );
  });

  test("truncate of a long text with no place to cut (no spaces) is still exact", async () => {
    const long = "ab".repeat(40_000);
    const r = await post(`${url}/generate`, { inputs: long, parameters: { max_new_tokens: 1, truncate: 32, decoder_input_details: true, details: true } });
    assert.equal(r.status, 200, JSON.stringify(r.body).slice(0, 300));
    const all = await model.tokenizer.encode(long);
    assert.deepEqual(r.body.details.prefill.map((t: { id: number }) => t.id), all.slice(all.length - 32));
  });

  test("max_time beyond a timer's range is no deadline (it cut the generation after about 1 ms)", async () => {
    for (const maxTime of [2147483.6475, 2147484, 1e300]) {
      const r = await post(`${url}/generate/`, { text: ["In the beginning"], max_new_tokens: 300, min_length: 400, max_time: maxTime });
      assert.equal(r.status, 200, JSON.stringify(r.body));
      assert.deepEqual(r.body.num_generated_tokens, [300]);
    }
  });

  test("stop_sequences of the longest allowed length pass, and as many as --max-stop-sequences allows", async () => {
    const r = await post(`${url}/generate/`, { text: ["hi"], max_new_tokens: 4, stop_sequences: ["a".repeat(256)] });
    assert.equal(r.status, 200, JSON.stringify(r.body));
    // Each is also matched after a space: 9 of them made 18 stop strings, over the library's 16.
    const nine = await post(`${url}/generate/`, { text: ["hi"], max_new_tokens: 4, stop_sequences: Array.from({ length: 9 }, (_, i) => `stop${i}`) });
    assert.equal(nine.status, 200, JSON.stringify(nine.body));
  });

  test('logit_bias with a "__proto__" key is refused like any other', async () => {
    for (const bias of ['{"__proto__": 5}', '{"__proto__": {"x": 1}}', '{"constructor": 5}']) {
      const r = await post(`${url}/v1/completions`, `{"prompt": "x", "max_tokens": 2, "logit_bias": ${bias}}`);
      assert.equal(r.status, 400, `${bias}: ${JSON.stringify(r.body)}`);
      assert.match(r.body.error.message, /logit_bias: is not supported/);
    }
    // Nothing leaked into later requests.
    const ok = await post(`${url}/v1/completions`, { prompt: "x", max_tokens: 2 });
    assert.equal(ok.status, 200);
  });

  test("a route used with the wrong method answers 405 with Allow (it was a 404 'no route')", async () => {
    for (const [method, path, allow] of [
      ["GET", "/generate", "POST"],
      ["PUT", "/v1/completions", "POST"],
      ["POST", "/health", "GET, HEAD"],
    ] as const) {
      const r = await fetch(`${url}${path}`, { method });
      assert.equal(r.status, 405, `${method} ${path}`);
      assert.equal(r.headers.get("allow"), allow);
      assert.match(await r.text(), /method not allowed/);
    }
    assert.equal((await fetch(`${url}/nothing-here`)).status, 404);
    // Routes with a parameter or a wildcard, and paths that look like route patterns (they made a 500).
    for (const [method, path, status] of [
      ["POST", "/v1/models/foo", 405],
      ["POST", "/v1/models/bigscience/bloom", 405],
      ["POST", "/ui/app.js", 405],
      ["DELETE", "/:x(", 404],
      ["GET", "/**", 404],
    ] as const) {
      const r = await fetch(`${url}${path}`, { method });
      assert.equal(r.status, status, `${method} ${path}: ${await r.text()}`);
    }
  });

  test("truncate above --max-input-length is refused by name before tokenizing (TGI does the same)", async () => {
    const long = "In the beginning ".repeat(50_000);
    const tgi = await post(`${url}/generate`, { inputs: long, parameters: { max_new_tokens: 1, truncate: 1_000_000_000 } });
    assert.equal(tgi.status, 422, JSON.stringify(tgi.body).slice(0, 200));
    assert.match(tgi.body.error, /^parameters\.truncate: must be <= 64 \(--max-input-length\)/);
    const openai = await post(`${url}/v1/completions`, { prompt: long, max_tokens: 1, truncate: 65 });
    assert.equal(openai.status, 400);
    assert.equal(openai.body.error.param, "truncate");
  });

  test("a compressed body is refused (it was read as if it were the JSON)", async () => {
    const r = await post(`${url}/generate`, { inputs: "hi" }, { "content-encoding": "gzip" });
    assert.equal(r.status, 415, JSON.stringify(r.body));
    assert.match(r.body.error, /Content-Encoding gzip is not supported/);
  });

  test("a /forward/ client that leaves stops its scoring", async () => {
    const { port } = new URL(url);
    const before = metric((await get(`${url}/metrics`)).body as string, "blossom_sequences_in_flight");
    const json = JSON.stringify({ conditioning_text: ["In the beginning", "And God said", "Let there be", "And it was so"], response: [" of", " Let", " light", " and"] });
    await new Promise<void>((resolve, reject) => {
      const socket = connect(Number(port), "127.0.0.1", () => {
        socket.write(`POST /forward/ HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: ${Buffer.byteLength(json)}\r\n\r\n${json}`, () => {
          socket.destroy();
          resolve();
        });
      });
      socket.on("error", reject);
    });
    // Whatever point it reached, the request releases its slots (bounded wait).
    let inFlight: number | undefined;
    for (let i = 0; i < 200; i++) {
      inFlight = metric((await get(`${url}/metrics`)).body as string, "blossom_sequences_in_flight");
      if (inFlight === before) break;
      await new Promise((r) => setTimeout(r, 25));
    }
    assert.equal(inFlight, before);
  });
});

describe("--max-connections", () => {
  let server: BlossomServer;
  let port: number;
  before(async () => {
    server = await startServer({ model: fixtureDir("tiny-bloom-a"), port: 0, maxConnections: 2 });
    await server.ready;
    port = server.port;
  });
  after(async () => {
    await server.close();
  });

  /** A raw keep-alive connection that sends GETs one at a time and returns each answer's status and body. */
  async function open(): Promise<{ get(path: string): Promise<{ status: number; body: string }>; closed: Promise<string>; end(): void }> {
    const socket = connect(port, "127.0.0.1");
    await new Promise<void>((resolve, reject) => socket.once("connect", resolve).once("error", reject));
    let buffer = "";
    let waiting: (() => void) | undefined;
    const closed = new Promise<string>((resolve) => {
      socket.on("data", (d) => {
        buffer += d.toString("latin1");
        waiting?.();
      });
      socket.on("error", () => undefined); // a reset is a close here
      socket.on("close", () => {
        resolve(buffer);
        waiting?.();
      });
    });
    return {
      closed,
      end: () => socket.destroy(),
      async get(path) {
        buffer = "";
        socket.write(`GET ${path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n`);
        for (;;) {
          const head = buffer.indexOf("\r\n\r\n");
          const length = /content-length: (\d+)/i.exec(buffer.slice(0, head));
          if (head >= 0 && length && buffer.length >= head + 4 + Number(length[1])) {
            return { status: Number(buffer.slice(9, 12)), body: buffer.slice(head + 4, head + 4 + Number(length[1])) };
          }
          if (socket.destroyed) throw new Error(`connection closed mid-answer: ${JSON.stringify(buffer)}`);
          await new Promise<void>((resolve) => (waiting = resolve));
        }
      },
    };
  }

  test("a connection beyond the limit is closed unanswered and counted; the open ones keep working, and a freed slot is taken again", { timeout: 60_000 }, async () => {
    const a = await open();
    const b = await open();
    // Both answered: the server has accepted both.
    assert.equal((await a.get("/health")).status, 200);
    assert.equal((await b.get("/health")).status, 200);
    const c = await open();
    await assert.rejects(c.get("/health"), /connection closed mid-answer: ""/, "the third connection is closed before any answer");
    assert.equal(await c.closed, "");
    const metrics = (await a.get("/metrics")).body;
    assert.equal(metric(metrics, "blossom_connections_dropped_total"), 1);
    assert.equal(metric(metrics, "blossom_connections_open"), 2);
    b.end();
    // The server sees b's close (bounded wait), then a new connection is served.
    let openNow: number | undefined;
    for (let i = 0; i < 400 && openNow !== 1; i++) {
      openNow = metric((await a.get("/metrics")).body, "blossom_connections_open");
      if (openNow !== 1) await new Promise((r) => setTimeout(r, 10));
    }
    assert.equal(openNow, 1);
    const d = await open();
    assert.equal((await d.get("/info")).status, 200);
    a.end();
    d.end();
  });

  test("--max-connections must be a positive integer", async () => {
    await assert.rejects(startServer({ model: fixtureDir("tiny-bloom-a"), port: 0, maxConnections: 0 }), /maxConnections: must be an integer >= 1 \(got 0\)/);
  });
});
