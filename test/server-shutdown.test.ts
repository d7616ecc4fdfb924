/**
 * `blossom serve` as a process: SIGTERM stops admitting (503), lets in-flight requests finish,
 * cancels what is still running at --shutdown-timeout, and exits 0. Also: an unavailable
 * unknown --strategy is refused with a clear message.
 */
import assert from "node:assert/strict";
import { describe, test } from "node:test";
import { Child, serverCli } from "./helpers/child.js";
import { fixtureDir } from "./helpers/fixtures.js";
import { get, post, postStream } from "./helpers/http-client.js";

async function startServe(extra: string[]): Promise<{ child: Child; url: string }> {
  const child = new Child([serverCli, "serve", "--model", fixtureDir("trained-bloom-small"), "--port", "0", "--log-level", "silent", ...extra]);
  const [, url] = await child.waitFor("stderr", /listening on (http:\/\/\S+) /);
  await child.waitFor("stderr", /ready: /);
  return { child, url: url! };
}

const long = { inputs: "In the beginning", parameters: { max_new_tokens: 2000, min_new_tokens: 2000 } };

describe("blossom serve shutdown", () => {
  test("SIGTERM: new requests get 503, in-flight requests finish, exit 0", async () => {
    const { child, url } = await startServe(["--shutdown-timeout", "60"]);
    let hangUp = false;
    let longStarted: () => void = () => undefined;
    const longRunning = new Promise<void>((resolve) => (longStarted = resolve));
    const longStream = postStream(`${url}/generate_stream`, long, () => {
      longStarted();
      return hangUp ? "stop" : undefined;
    });
    let shortStarted: () => void = () => undefined;
    const shortRunning = new Promise<void>((resolve) => (shortStarted = resolve));
    const shortStream = postStream(`${url}/generate_stream`, { inputs: "And the LORD said unto Moses,", parameters: { max_new_tokens: 40, min_new_tokens: 40, details: true } }, (_e, i) => {
      if (i === 0) shortStarted();
    });
    await Promise.all([longRunning, shortRunning]);

    child.kill("SIGTERM");
    await child.waitFor("stderr", /SIGTERM: no new requests/);
    // The long sequence (2000 tokens) keeps the server draining while these are refused.
    const health = await get(`${url}/health`);
    assert.equal(health.status, 503);
    assert.equal(health.body.state, "draining");
    const refused = await post(`${url}/generate`, { inputs: "hi", parameters: { max_new_tokens: 2 } });
    assert.equal(refused.status, 503);
    assert.match(refused.body.error, /shutting down/);

    // The short request in flight completes normally.
    const short = await shortStream;
    assert.equal(short.events.length, 40);
    assert.equal(short.events.at(-1).details.finish_reason, "length");

    // Once the last client is done (here: hangs up), the server exits 0.
    hangUp = true;
    await longStream;
    const exit = await child.waitExit();
    assert.deepEqual(exit, { code: 0, signal: null });
    assert.match(child.stderr, /blossom serve: stopped\n/);
  });

  test("SIGTERM: what is still running at --shutdown-timeout is cancelled with an error event, exit 0", async () => {
    const { child, url } = await startServe(["--shutdown-timeout", "0.2"]);
    let started: () => void = () => undefined;
    const running = new Promise<void>((resolve) => (started = resolve));
    const stream = postStream(`${url}/generate_stream`, long, (_e, i) => {
      if (i === 0) started();
    });
    await running;
    child.kill("SIGTERM");
    const result = await stream;
    const last = result.events.at(-1);
    assert.equal(last.error_type, "unavailable");
    assert.match(last.error, /shutting down/);
    assert.ok(result.events.length < 2000);
    const exit = await child.waitExit();
    assert.deepEqual(exit, { code: 0, signal: null });
    assert.match(child.stderr, /1 sequence\(s\) cancelled at the deadline/);
  });

  test("an unknown --strategy is refused before anything starts", async () => {
    const child = new Child([serverCli, "serve", "--model", fixtureDir("tiny-bloom-a"), "--port", "0", "--strategy", "sharded"]);
    const exit = await child.waitExit();
    assert.equal(exit.code, 1);
    assert.match(child.stderr, /--strategy.*"sharded".*invalid|Allowed choices are single, pipeline, tensor, replicas, auto/);
  });
});
