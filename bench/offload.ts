/**
 * `npm run bench:offload`: strategy pipeline with disk offload on a model about twice the memory
 * budget. Runs, each in a process of its own: fully resident; offloaded with the page cache warm;
 * offloaded with every read going to the disk (pages evicted after use), with and without read-ahead.
 * Prints ms/token, peak RSS against the budget, and how much of the read time the read-ahead hid.
 *
 * Options: --model DIR (default: the default bloom-560m-shaped model), --budget cpu:520MiB,disk,
 * --new-tokens N (20).
 */
import { execFileSync } from "node:child_process";
import { fileURLToPath } from "node:url";
import { native } from "../src/backend/native.js";
import { ensureDefaultModel } from "../src/cli/commands/demo.js";
import { loadModel, type LoadModelOptions } from "../src/index.js";
import { parseMaxMemory } from "../src/parallel/planner.js";
import { BlossomError, parameterError } from "../src/errors.js";
import { benchArgs, intOption } from "./stats.js";

const { values: o, positionals } = benchArgs("npm run bench:offload --", "offload", {
  options: {
    model: { type: "string" },
    budget: { type: "string", default: "cpu:520MiB,disk" },
    "new-tokens": { type: "string", default: "20" },
    run: { type: "string" },
  },
  allowPositionals: true,
});
void positionals;
// The first token is the prompt's; decode time is measured between the later ones.
const newTokens = intOption("--new-tokens", o["new-tokens"], 2)!;
try {
  parseMaxMemory(o.budget!);
} catch (err) {
  throw err instanceof BlossomError ? parameterError("--budget", err.message.replace(/^--max-memory:? ?/, "")) : err;
}

interface RunResult {
  label: string;
  msPerToken: number;
  peakRssBytes: number;
  tokens: number[];
  offload?: { readSeconds: number; waitSeconds: number; bytesRead: number; diskLayers: number };
}

async function runOne(dir: string, label: string, options: LoadModelOptions): Promise<RunResult> {
  let peak = 0;
  const sampler = setInterval(() => (peak = Math.max(peak, native().residentBytes())), 5);
  const model = await loadModel(dir, options);
  try {
    const prompt = "DeepSpeed is a machine learning framework";
    await model.generate([prompt], { maxNewTokens: 3 });
    const before = (await model.stats()).offload;
    const t0 = performance.now();
    const r = await model.generate([prompt], { maxNewTokens: newTokens, minNewTokens: newTokens });
    const ms = (performance.now() - t0 - r.timeToFirstToken[0]! * 1000) / (newTokens - 1);
    const after = (await model.stats()).offload;
    peak = Math.max(peak, native().residentBytes());
    return {
      label,
      msPerToken: ms,
      peakRssBytes: peak,
      tokens: r.tokenIds[0]!,
      ...(after && before
        ? { offload: { readSeconds: after.readSeconds - before.readSeconds, waitSeconds: after.waitSeconds - before.waitSeconds, bytesRead: after.bytesRead - before.bytesRead, diskLayers: after.diskLayers } }
        : {}),
    };
  } finally {
    clearInterval(sampler);
    await model.dispose();
  }
}

const runs: [string, LoadModelOptions][] = [
  ["resident", {}],
  ["offload, page cache warm", { strategy: "pipeline", maxMemory: o.budget!, placement: "sequential" }],
  ["offload, from disk, read-ahead", { strategy: "pipeline", maxMemory: o.budget!, placement: "sequential", evictPageCache: true }],
  ["offload, from disk, no read-ahead", { strategy: "pipeline", maxMemory: o.budget!, placement: "sequential", evictPageCache: true, offloadPrefetch: false }],
];

if (o.run !== undefined) {
  // Child: one configuration, result on stdout.
  const [label, options] = runs[Number(o.run)]!;
  process.stdout.write(JSON.stringify(await runOne(o.model!, label, options)) + "\n");
} else {
  const log = (line: string) => process.stdout.write(line + "\n");
  const dir = o.model ?? (await ensureDefaultModel(log));
  const script = fileURLToPath(import.meta.url);
  const results: RunResult[] = runs.map(([label], i) => {
    let out: string;
    try {
      out = execFileSync(process.execPath, [script, "--run", String(i), "--model", dir, "--budget", o.budget!, "--new-tokens", String(newTokens)], { encoding: "utf8" });
    } catch {
      // The child has said why on stderr (it inherits ours).
      throw new BlossomError("internal", `the run "${label}" failed (its error is above)`);
    }
    return JSON.parse(out.trim().split("\n").pop()!) as RunResult;
  });
  const budget = /cpu:([^,]+)/.exec(o.budget!)?.[1];
  log(`model ${dir}, budget ${o.budget}, ${newTokens} greedy tokens at batch 1`);
  for (const r of results) {
    const io = r.offload
      ? `; ${r.offload.diskLayers} layers on disk, ${(r.offload.bytesRead / 1e9).toFixed(2)} GB read in ${r.offload.readSeconds.toFixed(2)} s, waited ${r.offload.waitSeconds.toFixed(2)} s` +
        ` (read-ahead hid ${r.offload.readSeconds > 0 ? Math.max(0, (100 * (1 - r.offload.waitSeconds / r.offload.readSeconds))).toFixed(0) : "-"} %)`
      : "";
    log(`  ${r.label.padEnd(34)} ${r.msPerToken.toFixed(1).padStart(7)} ms/token, peak RSS ${(r.peakRssBytes / 2 ** 20).toFixed(0)} MiB${io}`);
  }
  const same = results.every((r) => r.tokens.join() === results[0]!.tokens.join());
  log(`same greedy tokens in every run: ${same}${budget ? `; budget ${budget}` : ""}`);
}
