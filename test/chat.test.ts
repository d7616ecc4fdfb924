/**
 * `blossom chat` as a process with piped stdin: prompts stream their continuation, settings change
 * while it runs (/set, /greedy, /kwargs, /show), bad settings are refused by name, and SIGINT
 * during a generation stops that generation only.
 */
import assert from "node:assert/strict";
import { describe, test } from "node:test";
import { Child, serverCli } from "./helpers/child.js";
import { fixtureDir } from "./helpers/fixtures.js";

describe("blossom chat", () => {
  test("prompts, settings, Ctrl-C stops the generation and not the program, /quit", async () => {
    const chat = new Child([serverCli, "chat", "--model", fixtureDir("trained-bloom-small"), "--max-new-tokens", "12"]);
    try {
      await chat.waitFor("stdout", /max_new_tokens=12 .*do_sample=false/);

      let from = chat.stdout.length;
      chat.write("In the beginning\n");
      await chat.waitFor("stdout", /\[12 tokens.*length\]\n/, from);
      assert.ok(chat.stdout.slice(from).includes(" of the first month, in the first month, in the"));

      from = chat.stdout.length;
      chat.write("/set max_new_tokens 2000\n/set min_new_tokens 2000\n/set top_p 2\n/set constructor 1\n/set bogus 1\n");
      await chat.waitFor("stdout", /error: bogus: not a setting/, from);
      // Names that every object inherits are not settings either.
      assert.match(chat.stdout.slice(from), /error: constructor: not a setting/);
      const replies = chat.stdout.slice(from);
      assert.match(replies, /max_new_tokens = 2000/);
      assert.match(replies, /min_new_tokens = 2000/);
      assert.match(replies, /error: top_p: must be a number in \(0, 1\]/);

      // A long generation, stopped by SIGINT once text is flowing.
      from = chat.stdout.length;
      chat.write("And it came to pass\n");
      await chat.waitFor("stdout", /\S+ \S+ \S+ \S+ \S+/, from);
      chat.kill("SIGINT");
      const [, stoppedAfter] = await chat.waitFor("stdout", /\[stopped after (\d+) tokens\]/, from);
      assert.ok(Number(stoppedAfter) > 0 && Number(stoppedAfter) < 2000);

      // Still running: settings and prompts work after the interruption.
      from = chat.stdout.length;
      chat.write('/kwargs {"max_new_tokens": 6, "min_new_tokens": 0}\n/sample\n/set temperature 0.7\n/greedy\n/show\n');
      await chat.waitFor("stdout", /max_new_tokens=6 .*do_sample=false.*temperature=0.7/, from);
      from = chat.stdout.length;
      chat.write("In the beginning\n");
      await chat.waitFor("stdout", /\[6 tokens.*length\]\n/, from);
      assert.ok(chat.stdout.slice(from).includes(" of the first month, in"));

      chat.write("/quit\n");
      const exit = await chat.waitExit();
      assert.deepEqual(exit, { code: 0, signal: null });
    } finally {
      if (chat.process.exitCode === null) chat.kill("SIGKILL");
    }
  });

  test("the end of input ends the session after the last prompt", async () => {
    const chat = new Child([serverCli, "chat", "--model", fixtureDir("tiny-bloom-a"), "--max-new-tokens", "4"]);
    chat.write("/help\nthe license\n");
    chat.process.stdin.end();
    const exit = await chat.waitExit();
    assert.equal(exit.code, 0);
    assert.match(chat.stdout, /\/set NAME VALUE/);
    assert.match(chat.stdout, /\[4 tokens/);
  });
});
