/**
 * The benchmark end to end on a fixture model: the table's shape, the JSON record's fields, the
 * SVG chart, and OOM cells (not a crash) when the memory budget cannot be met.
 */
import assert from "node:assert/strict";
import { execFile, spawn } from "node:child_process";
import { copyFileSync, existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { promisify } from "node:util";
import { after, describe, test } from "node:test";
import { fileURLToPath } from "node:url";
import type { BenchReport } from "../src/bench/types.js";
import { quantizeCheckpoint } from "../src/quant/quantize.js";
import { fixtureDir } from "./helpers/fixtures.js";
import { hasMpirun } from "./helpers/system.js";

const run = promisify(execFile);

const cli = fileURLToPath(new URL("../src/cli/main.js", import.meta.url));

describe("blossom bench", () => {
  const dir = mkdtempSync(join(tmpdir(), "blossom-bench-"));
  after(() => rmSync(dir, { recursive: true, force: true }));

  test("with the probe, the machine's limits are measured (after the cells) and reported", async () => {
    const json = join(dir, "probed.json");
    const { stdout } = await run(process.execPath, [
      cli, "bench", "-m", fixtureDir("tiny-bloom-a"), "--batch-sizes", "1", "--new-tokens", "2", "--cycles", "1", "--no-progress", "--json", json,
    ]);
    const report = JSON.parse(readFileSync(json, "utf8")) as BenchReport;
    assert.ok(report.machine.readBandwidthGBs! > 0 && report.machine.fmaPeakGflops! > 0, JSON.stringify(report.machine));
    assert.match(stdout, /^measured limits: read bandwidth [\d.]+ GB\/s, FMA peak [\d.]+ GFLOP\/s$/m);
  });

  test("table, JSON and chart for two dtypes and three batch sizes", async () => {
    const json = join(dir, "bench.json");
    const chart = join(dir, "bench.svg");
    const { stdout } = await run(process.execPath, [
      cli, "bench", "-m", fixtureDir("tiny-bloom-b"), "--dtype", "auto,fp32", "--batch-sizes", "1,2,4",
      "--new-tokens", "4", "--cycles", "1", "--no-probe", "--json", json, "--chart", chart,
    ]);
    const lines = stdout.split("\n");
    const header = lines.find((l) => l.startsWith("| project \\ bs"));
    assert.ok(header, stdout);
    assert.deepEqual(header.split("|").slice(2, -1).map((s) => s.trim()), ["1", "2", "4"]);
    for (const label of ["blossom bf16", "blossom fp32"]) {
      const row = lines.find((l) => l.startsWith(`| ${label}`));
      assert.ok(row, `row ${label} missing:\n${stdout}`);
      const cells = row.split("|").slice(2, -1).map((s) => s.trim());
      assert.equal(cells.length, 3);
      for (const c of cells) assert.ok(Number(c) > 0, `cell "${c}" should be a positive ms/token`);
    }
    const report = JSON.parse(readFileSync(json, "utf8")) as BenchReport;
    assert.equal(report.results.length, 2);
    assert.ok(report.machine.cpuModel.length > 0);
    assert.ok(report.machine.physicalCores >= 1);
    assert.equal(report.settings.newTokens, 4);
    for (const r of report.results) {
      assert.ok(r.loadSeconds! > 0);
      assert.ok(r.engine!.weightBytes > 0);
      for (const c of r.cells) {
        assert.equal(c.status, "ok");
        if (c.status !== "ok") continue;
        assert.equal(c.newTokensGenerated, c.batchSize * 4);
        assert.ok(c.msPerToken > 0 && c.tokensPerSecond > 0 && c.latencyPerBatchMs > 0 && c.timeToFirstTokenMs > 0);
        assert.ok(Math.abs(c.tokensPerSecond * c.msPerToken - 1000) < 1e-6 * 1000);
        assert.ok(c.peakRssBytes > 10 * 2 ** 20);
        assert.ok(c.predicted.total > c.predicted.weights);
      }
    }
    const svg = readFileSync(chart, "utf8");
    assert.match(svg, /^<svg /);
    assert.match(svg, /blossom fp32/);
    assert.equal((svg.match(/<polyline /g) ?? []).length, 2);
  });

  test("an impossible --max-memory gives OOM cells, not a crash", async () => {
    const json = join(dir, "oom.json");
    const { stdout } = await run(process.execPath, [
      cli, "bench", "-m", fixtureDir("tiny-bloom-a"), "--batch-sizes", "1,8", "--new-tokens", "2", "--cycles", "1",
      "--max-memory", "1MiB", "--no-probe", "--json", json,
    ]);
    const row = stdout.split("\n").find((l) => l.startsWith("| blossom fp32"));
    assert.ok(row, stdout);
    assert.deepEqual(row.split("|").slice(2, -1).map((s) => s.trim()), ["oom", "oom"]);
    const report = JSON.parse(readFileSync(json, "utf8")) as BenchReport;
    for (const c of report.results[0]!.cells) {
      assert.equal(c.status, "oom");
      // The parts named add up to the prediction (the runtime's share was left out of the text).
      if (c.status === "oom") assert.match(c.reason, /\(weights .*, KV cache .*, activations .*, runtime .*\) > budget 1\.0 MiB/);
    }
  });

  test("a budget between two batch sizes: the small one runs, the large one is OOM", async () => {
    // trained-bloom-small: 8 MiB of weights, 8 KiB of KV cache per token; 512 x 105 tokens ~ 420 MiB.
    const { stdout } = await run(process.execPath, [
      cli, "bench", "-m", fixtureDir("trained-bloom-small"), "--batch-sizes", "1,512", "--new-tokens", "2", "--cycles", "1",
      "--max-memory", "200MiB", "--no-probe",
    ]);
    const row = stdout.split("\n").find((l) => l.startsWith("| blossom bf16"))!;
    const cells = row.split("|").slice(2, -1).map((s) => s.trim());
    assert.ok(Number(cells[0]) > 0, row);
    assert.equal(cells[1], "oom");
  });

  test("an allocation that fails at run time is an OOM cell, and the next batch size still runs", async () => {
    // A 32-token KV cache cannot hold one sequence of its prompt + 40 new tokens: the engine refuses
    // the request when it is submitted, the cell says OOM, and the benchmark goes on.
    const { stdout } = await run(
      process.execPath,
      [cli, "bench", "-m", fixtureDir("tiny-bloom-a"), "--batch-sizes", "1,2", "--new-tokens", "40", "--cycles", "1", "--no-probe"],
      { env: { ...process.env, BLOSSOM_BENCH_KV_TOKENS: "32" } },
    );
    const row = stdout.split("\n").find((l) => l.startsWith("| blossom fp32"))!;
    assert.deepEqual(row.split("|").slice(2, -1).map((s) => s.trim()), ["oom", "oom"]);
    assert.match(stdout, /allocation failed at run time: .*KV-cache capacity/);
  });

  test("one row per strategy: pipeline with disk offload, replicas, tensor under mpirun", async () => {
    const json = join(dir, "strategies.json");
    const strategies = ["single", "pipeline", "replicas", ...(hasMpirun() ? ["tensor"] : [])];
    const { stdout } = await run(process.execPath, [
      cli, "bench", "-m", fixtureDir("trained-bloom-small"), "--strategy", strategies.join(","), "--batch-sizes", "2",
      "--new-tokens", "3", "--cycles", "1", "--no-probe", "--max-memory", "0:4MB,cpu:2MB,disk", "--json", json,
    ]);
    const report = JSON.parse(readFileSync(json, "utf8")) as BenchReport;
    assert.deepEqual(report.results.map((r) => r.config.strategy), strategies);
    for (const r of report.results) {
      const cell = r.cells[0]!;
      assert.equal(cell.status, "ok", `${r.config.label}: ${JSON.stringify(cell)}\n${stdout}`);
      if (cell.status !== "ok") continue;
      // Replicas decode a batch per stream: twice the sequences and tokens.
      const streams = r.config.strategy === "replicas" ? 2 : 1;
      assert.equal(cell.sequences, 2 * streams);
      assert.equal(cell.newTokensGenerated, 3 * 2 * streams);
    }
    const pipeline = report.results.find((r) => r.config.strategy === "pipeline")!;
    assert.ok(pipeline.engine!.weightBytes < report.results[0]!.engine!.weightBytes, "offloaded layers are not resident");
    const tensor = report.results.find((r) => r.config.strategy === "tensor");
    if (tensor) assert.deepEqual(tensor.engine!.tensorParallel, { rank: 0, size: 2 });
    assert.equal(report.results.find((r) => r.config.strategy === "replicas")!.engine!.replicas, 2);
  });

  test("a configuration named twice is measured once; a row that cannot run at all makes the exit code 1", async () => {
    const { stdout } = await run(process.execPath, [
      cli, "bench", "-m", fixtureDir("tiny-bloom-a"), "--dtype", "auto,fp32,fp32", "--batch-sizes", "1", "--new-tokens", "2", "--cycles", "1", "--no-probe",
    ]);
    assert.equal(stdout.split("\n").filter((l) => l.startsWith("| blossom fp32")).length, 1, stdout);

    // A folder without tokenizer.json: its cells say "error", and the run is a failure, not a result.
    const broken = join(dir, "no-tokenizer");
    mkdirSync(broken);
    for (const f of ["config.json", "model.safetensors"]) copyFileSync(join(fixtureDir("tiny-bloom-a"), f), join(broken, f));
    const failed = await run(process.execPath, [cli, "bench", "-m", broken, "--batch-sizes", "1,2", "--new-tokens", "2", "--cycles", "1", "--no-probe"]).then(
      () => undefined,
      (err: { code: number; stdout: string }) => err,
    );
    assert.ok(failed, "exit code 1");
    assert.equal(failed.code, 1);
    assert.match(failed.stdout, /\| blossom fp32 \|\s+error \|\s+error \|/);
  });

  test("a pre-quantized checkpoint's auto row is named by its scheme", async () => {
    const quantized = join(dir, "tiny-int8");
    await quantizeCheckpoint(fixtureDir("tiny-bloom-a"), quantized, { scheme: "int8" });
    const { stdout } = await run(process.execPath, [cli, "bench", "-m", quantized, "--dtype", "auto,int8", "--batch-sizes", "1", "--new-tokens", "2", "--cycles", "1", "--no-probe"]);
    // auto is int8 here: one row, named so (it was "blossom fp32", from torch_dtype).
    assert.deepEqual(stdout.split("\n").filter((l) => l.startsWith("| blossom")).map((l) => l.split("|")[1]!.trim()), ["blossom int8"]);
  });

  test("a signal to the bench process alone (kill PID) ends its child too", async () => {
    const child = spawn(process.execPath, [
      cli, "bench", "-m", fixtureDir("trained-bloom-small"), "--batch-sizes", "1,64", "--new-tokens", "2000", "--cycles", "50", "--no-probe", "--no-progress",
    ], { stdio: "ignore" });
    const exited = new Promise<NodeJS.Signals | null>((resolve) => child.on("exit", (_code, signal) => resolve(signal)));
    // Wait (bounded) for the measuring child process to be running.
    const childrenOf = (pid: number) => {
      try {
        return readFileSync(`/proc/${pid}/task/${pid}/children`, "utf8").trim().split(/\s+/).filter(Boolean).map(Number);
      } catch {
        return [];
      }
    };
    let grandchild: number | undefined;
    for (let i = 0; i < 400 && grandchild === undefined; i++) {
      grandchild = childrenOf(child.pid!)[0];
      if (grandchild === undefined) await new Promise((r) => setTimeout(r, 25));
    }
    assert.ok(grandchild, "the bench started its child");
    child.kill("SIGTERM");
    assert.equal(await exited, "SIGTERM");
    let alive = true;
    for (let i = 0; i < 400 && alive; i++) {
      alive = existsSync(`/proc/${grandchild}`) && !/^State:\s+Z/m.test(readFileSync(`/proc/${grandchild}/status`, "utf8"));
      if (alive) await new Promise((r) => setTimeout(r, 25));
    }
    assert.equal(alive, false, `child ${grandchild} ended with the bench`);
  });

  test("bad options are refused with the option's name", async () => {
    await assert.rejects(run(process.execPath, [cli, "bench", "-m", fixtureDir("tiny-bloom-a"), "--batch-sizes", "1,x"]), /--batch-sizes/);
    await assert.rejects(run(process.execPath, [cli, "bench", "-m", fixtureDir("tiny-bloom-a"), "--dtype", "fp8"]), /--dtype/);
    await assert.rejects(run(process.execPath, [cli, "bench", "-m", fixtureDir("tiny-bloom-a"), "--max-memory", "lots"]), /--max-memory/);
  });
});
