/**
 * The CLI's answer to bad input: exit code 1 (2 for the benchmark scripts), one line that names the
 * option, file or value, and never a stack trace or a silently dropped setting. Each case runs the
 * real CLI on a fixture (or before any model loads).
 */
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { mkdtempSync, rmSync, writeFileSync, mkdirSync, cpSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, describe, test } from "node:test";
import { fileURLToPath } from "node:url";
import { fixtureDir } from "./helpers/fixtures.js";

const cli = fileURLToPath(new URL("../src/cli/main.js", import.meta.url));
const model = fixtureDir("tiny-bloom-a");

function run(args: string[], cwd?: string) {
  const r = spawnSync(process.execPath, [cli, ...args], { encoding: "utf8", timeout: 60_000, cwd, env: { ...process.env, HF_ENDPOINT: "http://127.0.0.1:9", HF_HUB_OFFLINE: "" } });
  return { status: r.status, stdout: r.stdout, stderr: r.stderr };
}

function refused(args: string[], expected: RegExp, cwd?: string) {
  const r = run(args, cwd);
  assert.equal(r.status, 1, `${args.join(" ")}: exit ${r.status}\n${r.stderr}`);
  assert.match(r.stderr, expected, args.join(" "));
  assert.doesNotMatch(r.stderr, /\n\s+at /, `a stack trace for ${args.join(" ")}:\n${r.stderr}`);
}

describe("CLI errors name what is wrong", () => {
  const dir = mkdtempSync(join(tmpdir(), "blossom-cli-errors-"));
  after(() => rmSync(dir, { recursive: true, force: true }));
  const aFile = join(dir, "a-file");
  writeFileSync(aFile, "x");

  test("--no-repeat-ngram-size reaches the library (commander read it as the negation of a boolean)", async () => {
    const trained = fixtureDir("trained-bloom-small");
    const r = run(["generate", "-m", trained, "--max-new-tokens", "20", "--no-repeat-ngram-size", "2", "--json", "In the beginning"]);
    assert.equal(r.status, 0, r.stderr);
    const ids: number[] = JSON.parse(r.stdout).tokenIds;
    const { loadModel } = await import("../src/index.js");
    const m = await loadModel(trained);
    try {
      const prompt = await m.tokenizer.encode("In the beginning");
      const expected = await m.generate(["In the beginning"], { maxNewTokens: 20, noRepeatNgramSize: 2 });
      assert.deepEqual(ids, expected.tokenIds[0]);
      const all = [...prompt, ...ids];
      const bigrams = all.slice(1).map((id, i) => `${all[i]},${id}`);
      assert.equal(new Set(bigrams).size, bigrams.length, "no bigram repeats");
    } finally {
      await m.dispose();
    }
    refused(["generate", "-m", trained, "--no-repeat-ngram-size", "x", "hi"], /--no-repeat-ngram-size must be an integer/);
  });

  test("perplexity of a file that is not UTF-8 is refused with the first bad byte (it scored a text with U+FFFD instead)", () => {
    const bad = join(dir, "latin1.txt");
    writeFileSync(bad, Buffer.concat([Buffer.from("ok \uFFFD fine "), Buffer.from([0xff, 0xfe, 0x80]), Buffer.from("abc the LORD")]));
    refused(["perplexity", "-m", fixtureDir("trained-bloom-small"), "--file", bad], /--file .*latin1\.txt: not valid UTF-8 \(first bad byte at offset 12: 0xff\)/);
  });

  test("perplexity keeps a UTF-8 BOM as U+FEFF (as Python's utf-8 does) and counts a bad byte's offset from the file's start", async () => {
    const trained = fixtureDir("trained-bloom-small");
    const withBom = join(dir, "bom.txt");
    writeFileSync(withBom, Buffer.concat([Buffer.from([0xef, 0xbb, 0xbf]), Buffer.from("In the beginning God created the heaven and the earth.")]));
    const r = run(["perplexity", "-m", trained, "--file", withBom, "--json"]);
    assert.equal(r.status, 0, r.stderr);
    const { loadModel } = await import("../src/index.js");
    const m = await loadModel(trained);
    try {
      const expected = await m.perplexity("\uFEFFIn the beginning God created the heaven and the earth.");
      assert.equal(JSON.parse(r.stdout).tokens, expected.tokens);
    } finally {
      await m.dispose();
    }
    const bad = join(dir, "bom-bad.txt");
    writeFileSync(bad, Buffer.concat([Buffer.from([0xef, 0xbb, 0xbf]), Buffer.from("abc "), Buffer.from([0xff]), Buffer.from(" def")]));
    refused(["perplexity", "-m", trained, "--file", bad], /not valid UTF-8 \(first bad byte at offset 7: 0xff\)/);
  });

  test("conflicting generate options", () => {
    refused(["generate", "-m", model, "--greedy", "--temperature", "0.5", "hi"], /^blossom: --greedy: cannot be combined with --sample or a sampling option/);
    refused(["generate", "-m", model, "--greedy", "--sample", "hi"], /^blossom: --greedy: cannot be combined/);
    refused(["generate", "-m", model, "--stream", "--json", "hi"], /^blossom: --stream: cannot be combined with --json/);
    refused(["generate", "-m", model, "--stream", "--batch-size", "2", "hi"], /^blossom: --stream: cannot be combined with --batch-size/);
  });

  test("an empty prompt is refused before anything is printed", () => {
    const r = run(["generate", "-m", model, "--stream", "hi", ""]);
    assert.equal(r.status, 1);
    assert.equal(r.stdout, "");
    assert.match(r.stderr, /^blossom: prompt 2: is empty/);
  });

  test("generation parameters are named as flags, also inside the message", () => {
    refused(["generate", "-m", model, "--min-new-tokens", "200", "--max-new-tokens", "3", "hi"], /^blossom: --min-new-tokens: must be an integer >= 0 and <= --max-new-tokens \(3\)/);
  });

  test("lists with an empty item", () => {
    refused(["plan", "-m", model, "--max-memory", "0:1GiB,,cpu:1GiB"], /--max-memory: "0:1GiB,,cpu:1GiB" has an empty item/);
    refused(["plan", "-m", model, "--max-memory", "0:1GiB:2"], /--max-memory: "0:1GiB:2" has more than one ":"/);
    const r = run(["bench", "-m", model, "--batch-sizes", "1,,2"]);
    assert.notEqual(r.status, 0);
    assert.match(r.stderr, /--batch-sizes: "1,,2" has an empty item/);
  });

  test("plan: a bad budget is one line; int8 dtypes are sized", () => {
    refused(["plan", "-m", model, "--max-memory", "0:abc"], /^blossom: --max-memory 0: expected a size/);
    const r = run(["plan", "-m", model, "--max-memory", "cpu:1GiB,disk", "--dtype", "int8"]);
    assert.equal(r.status, 0, r.stderr);
    assert.match(r.stdout, /of weights \(int8\)/);
  });

  test("output and model paths", () => {
    refused(["bench", "-m", model, "--json", join(dir, "missing", "x.json")], /^blossom: --json .*: the folder .* does not exist/);
    refused(["bench", "-m", model, "--chart", dir], /^blossom: --chart .*: is a folder, expected a file/);
    refused(["generate", "-m", aFile, "hi"], /^blossom: model '.*a-file': is a file; expected a checkpoint folder/);
    refused(["cache", "ls", "--cache-dir", aFile], /^blossom: --cache-dir: .* is a file, expected the cache folder/);
    refused(["quantize", "-m", model, "--dtype", "int8", "-o", ""], /^blossom: --out: expected a folder path/);
    const r = run(["perplexity", "-m", model, "-f", join(dir, "empty.txt")]);
    assert.match(r.stderr, /--file .*empty\.txt: cannot read/);
    writeFileSync(join(dir, "empty.txt"), "");
    refused(["perplexity", "-m", model, "-f", join(dir, "empty.txt")], /^blossom: --file .*empty\.txt: perplexity needs at least 2 tokens/);
  });

  test("a mistyped folder under an existing one says so, not only that the Hub is unreachable", () => {
    mkdirSync(join(dir, "runs"), { recursive: true });
    refused(["generate", "-m", "runs/bloom-typo", "hi"], /^blossom: model 'runs\/bloom-typo': no such folder in runs, and as a Hub id:/, dir);
  });

  test("offload folder: a file, or the checkpoint's own folder", () => {
    const copy = join(dir, "copy");
    cpSync(fixtureDir("tiny-bloom-b"), copy, { recursive: true });
    const pipeline = ["--strategy", "pipeline", "--max-memory", "cpu:10KiB,disk", "--dtype", "fp32", "--max-new-tokens", "2", "hi"];
    refused(["generate", "-m", copy, ...pipeline, "--offload-folder", aFile], /^blossom: --offload-folder: cannot use .* as a folder/);
    refused(["generate", "-m", copy, ...pipeline, "--offload-folder", copy], /^blossom: --offload-folder: .* is the checkpoint's own folder/);
  });

  test("a checkpoint whose model.safetensors is a folder", () => {
    const copy = join(dir, "folder-weights");
    cpSync(model, copy, { recursive: true });
    rmSync(join(copy, "model.safetensors"));
    mkdirSync(join(copy, "model.safetensors"));
    refused(["generate", "-m", copy, "hi"], /model\.safetensors: is not a regular file/);
  });

  test("serve: a busy port is named", async () => {
    const busy = createServer();
    await new Promise<void>((resolve) => busy.listen(0, "127.0.0.1", resolve));
    const port = (busy.address() as { port: number }).port;
    try {
      refused(["serve", "-m", model, "--port", String(port)], new RegExp(`^blossom: --port: ${port} is already in use on 127\\.0\\.0\\.1`));
    } finally {
      busy.close();
    }
    refused(["serve", "-m", model, "--port", "0", "--max-batch-total-tokens", "1"], /^blossom: --max-batch-total-tokens: must be at least 2/);
  });

  test("numbers that make no sense are refused as typed", () => {
    const r = run(["serve", "-m", model, "--shutdown-timeout", "-5"]);
    assert.notEqual(r.status, 0);
    assert.match(r.stderr, /--shutdown-timeout must be a number >= 0, got "-5"/);
    const q = run(["quantize", "-m", model, "--dtype", "int8", "-o", join(dir, "q"), "--max-shard-size", "0"]);
    assert.notEqual(q.status, 0);
    assert.match(q.stderr, /--max-shard-size must be a positive size, got "0"/);
  });
});
