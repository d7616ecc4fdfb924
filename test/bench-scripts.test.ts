/**
 * The benchmark scripts' command lines: `--help` lists every option, and a mistyped option ends the
 * script at once with one line naming it and the usage (exit code 2), never a stack trace. Nothing
 * is measured: parsing comes before any model, probe or child process.
 */
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { describe, test } from "node:test";
import { fileURLToPath } from "node:url";
import { fixtureDir } from "./helpers/fixtures.js";

const script = (name: string) => fileURLToPath(new URL(`../bench/${name}.js`, import.meta.url));

const scripts: { file: string; args: string[]; option: string }[] = [
  { file: "kernels", args: [], option: "--batches <value>" },
  { file: "decode", args: [], option: "--kv-dtype <value>" },
  { file: "serve", args: [], option: "--clients <value>  (default: 16)" },
  { file: "offload", args: [], option: "--budget <value>" },
  { file: "int8", args: [], option: "--variants <value>" },
  { file: "int8", args: ["model"], option: "--no-memory" },
  { file: "int8", args: ["quality"], option: "--thresholds <value>  (default: 6)" },
  { file: "tune-linear", args: [], option: "--param <value>" },
];

describe("benchmark scripts' options", () => {
  for (const { file, args, option } of scripts) {
    const name = [file, ...args].join(" ");
    test(`${name}: --help lists the options`, () => {
      const r = spawnSync(process.execPath, [script(file), ...args, "--help"], { encoding: "utf8", timeout: 60_000 });
      assert.equal(r.status, 0, r.stderr);
      assert.match(r.stdout, /^usage: /);
      assert.ok(r.stdout.includes(option), r.stdout);
    });
    test(`${name}: an unknown option is named, with the usage, exit code 2`, () => {
      const r = spawnSync(process.execPath, [script(file), ...args, "--no-such-option"], { encoding: "utf8", timeout: 60_000 });
      assert.equal(r.status, 2, r.stderr);
      assert.match(r.stderr, /Unknown option '--no-such-option'/);
      assert.ok(r.stderr.includes(option), r.stderr);
      assert.doesNotMatch(r.stderr, /\n\s+at /, "no stack trace");
      assert.equal(r.stdout, "");
    });
  }
  test("a bad option value is one line naming the option, exit code 2, before any model loads", () => {
    const tiny = fixtureDir("tiny-bloom-a");
    const cases: [string, string[], RegExp][] = [
      ["decode", ["--model", tiny, "--runs", "0"], /^decode: --runs: expected an integer >= 1, got "0"$/],
      ["decode", ["--model", tiny, "--new-tokens", "1"], /^decode: --new-tokens: expected an integer >= 2, got "1"$/],
      ["decode", ["--model", tiny, "--threads", "x"], /^decode: --threads: expected an integer >= 1/],
      ["decode", ["--model", tiny, "--json", "/nonexistent-folder/x.json"], /^decode: --json \/nonexistent-folder\/x\.json: the folder \/nonexistent-folder does not exist$/],
      ["decode", ["--model", tiny, "--dtype", "fp8", "--runs", "1", "--new-tokens", "2"], /^decode: dtype: expected one of/],
      ["offload", ["--model", tiny, "--budget", "lots"], /^offload: --budget: "lots" is not a device/],
      ["offload", ["--model", tiny, "--new-tokens", "1"], /^offload: --new-tokens: expected an integer >= 2/],
      ["kernels", ["--quick", "--layout", "diagonal"], /^kernels: --layout: expected engine, rows or both, got diagonal$/],
      ["kernels", ["--quick", "--json", "/nonexistent-folder/k.json"], /^kernels: --json .*does not exist$/],
      ["int8", ["sideways"], /^int8: unknown part "sideways"/],
      ["int8", ["quality", "--json", "/nonexistent-folder/q.json"], /^int8-quality: --json .*does not exist$/],
    ];
    for (const [file, args, expected] of cases) {
      const r = spawnSync(process.execPath, [script(file), ...args], { encoding: "utf8", timeout: 60_000 });
      const name = [file, ...args].join(" ");
      assert.equal(r.status, 2, `${name}: exit ${r.status}\n${r.stderr}`);
      assert.match(r.stderr.trim(), expected, name);
      assert.doesNotMatch(r.stderr, /\n\s+at /, `no stack trace: ${name}`);
    }
  });

  test("a string option without its value is named", () => {
    const r = spawnSync(process.execPath, [script("decode"), "--runs"], { encoding: "utf8", timeout: 60_000 });
    assert.equal(r.status, 2);
    assert.match(r.stderr, /^decode: Option '--runs <value>' argument missing/);
  });
});
