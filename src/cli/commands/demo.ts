/**
 * `blossom demo` (what `npm start` runs): creates the built-in default model if it is not cached
 * (a bloom-560m-shaped random checkpoint), prints generations for the guide's eight sentences, then
 * the guide's benchmark table for batch sizes 1, 8, 16, 32 and a chart.
 */
import { createFolder } from "../../folders.js";
import { withFileLock } from "../../hub/lock.js";
import { existsSync, readFileSync } from "node:fs";
import { join } from "node:path";
import type { Command } from "commander";
import { runBenchmark } from "../../bench/bench.js";
import { blossomCacheDir } from "../../cache.js";
import { renderChart } from "../../bench/chart.js";
import { createRandomCheckpoint, RANDOM_CHECKPOINT_MARKER } from "../../checkpoint/create-random.js";
import { availableMemory, formatBytes } from "../../engine/memory.js";
import { loadModel } from "../../model.js";
import { writeFileSync } from "node:fs";
import { parseInteger } from "../options.js";
import { printReport } from "./bench.js";
import { guideInputSentences } from "./generate.js";
import type { MappedWeightsReport } from "../../backend/backend.js";

export const defaultModel = { preset: "bloom-560m", dtype: "bf16" as const, seed: 0 };

/** True when `dir` holds a finished create-random checkpoint (every file its marker lists). */
function isCompleteRandomCheckpoint(dir: string): boolean {
  const marker = join(dir, RANDOM_CHECKPOINT_MARKER);
  if (!existsSync(marker)) return false;
  try {
    const { files } = JSON.parse(readFileSync(marker, "utf8")) as { files: string[] };
    return files.every((f) => existsSync(join(dir, f)));
  } catch {
    return false;
  }
}

/** The default model's folder, created (about 5 s, 1.1 GB) the first time. */
export async function ensureDefaultModel(log: (line: string) => void): Promise<string> {
  const dir = join(blossomCacheDir(), "models", `${defaultModel.preset}-${defaultModel.dtype}-seed${defaultModel.seed}`);
  if (isCompleteRandomCheckpoint(dir)) {
    log(`default model: ${dir} (cached)`);
    return dir;
  }
  // One creator at a time (two `npm start` at once): the second waits, then finds it made.
  // (Its own lock name: create-random takes `${dir}.lock` while it puts the folder in place.)
  return withFileLock(`${dir}.default-model.lock`, "the default model", undefined, async () => {
    if (isCompleteRandomCheckpoint(dir)) {
      log(`default model: ${dir} (made by another process meanwhile)`);
      return dir;
    }
    log(`default model: creating a ${defaultModel.preset}-shaped random checkpoint (${defaultModel.dtype}) in ${dir} ...`);
    const r = await createRandomCheckpoint({ preset: defaultModel.preset, dtype: defaultModel.dtype, out: dir, seed: defaultModel.seed });
    log(`  wrote ${formatBytes(r.bytes)} in ${r.seconds.toFixed(1)} s`);
    return dir;
  });
}

interface DemoOptions {
  model?: string;
  cycles: number;
  newTokens: number;
  threads?: number;
}

export function registerDemoCommand(program: Command): void {
  program
    .command("demo")
    .description("the main job on the built-in default model: generations for the guide's sentences, then the benchmark table")
    .option("-m, --model <ref>", "run on this model instead of the default bloom-560m-shaped random checkpoint")
    .option("--new-tokens <n>", "tokens generated per sentence and per benchmark sequence", parseInteger("--new-tokens", 1), 100)
    .option("--cycles <n>", "timed benchmark runs per batch size", parseInteger("--cycles", 1), 3)
    .option("--threads <n>", "compute threads (default: physical cores)", parseInteger("--threads", 1, 1024))
    .action(async (o: DemoOptions) => {
      const out = (line: string) => process.stdout.write(line + "\n");
      const started = performance.now();
      const dir = o.model ?? (await ensureDefaultModel(out));
      const model = await loadModel(dir, o.threads !== undefined ? { threads: o.threads } : {});
      // The table's row is named by the format the weights are stored (and run) in.
      const formatName: Record<string, string> = { f32: "fp32", f16: "fp16", bf16: "bf16", i8: "int8" };
      const formats = model.info.storedDtypes.map((d) => formatName[d] ?? d).join("/");
      const rowLabel = `blossom ${formats}`;
      const chartTitle = `Blossom on this machine: ms/token by batch size (${o.model ? `${o.model}, ${model.info.numLayers} layers, hidden ${model.info.hiddenSize}` : "bloom-560m shape"}, ${formats})`;
      try {
        const i = model.info;
        out(`loaded in ${i.loadSeconds.toFixed(2)} s: ${i.numLayers} layers, hidden ${i.hiddenSize}, vocab ${i.vocabSize}, ` +
          `${formatBytes(i.weightBytes)} of ${i.storedDtypes.join("/")} weights memory-mapped${hugePages(i.mappedWeights)}; ${i.threads} threads, ${i.kernels} kernels`);
        if (!o.model) out("(the default model has random weights: its text is meaningless, its speed is real)");
        out("");
        out(`Generating ${o.newTokens} tokens for the guide's ${guideInputSentences.length} input sentences (greedy, one batch):`);
        const t0 = performance.now();
        const r = await model.generate(guideInputSentences, { maxNewTokens: o.newTokens });
        const seconds = (performance.now() - t0) / 1000;
        guideInputSentences.forEach((s, k) => out(`${"-".repeat(60)}\nin=${s}\nout=${s}${r.texts[k]}\n`));
        const tokens = r.numGeneratedTokens.reduce((a, b) => a + b, 0);
        out(`generated ${tokens} tokens in ${seconds.toFixed(2)} s: ${((seconds * 1000) / tokens).toFixed(2)} ms/token, ${(tokens / seconds).toFixed(1)} tokens/s`);
      } finally {
        await model.dispose();
      }
      out("");
      const batchSizes = [1, 8, 16, 32];
      out(`Benchmark: the guide's table for batch sizes ${batchSizes.join(", ")} (${o.newTokens} new tokens, ${o.cycles} cycles after a warm-up):`);
      const report = await runBenchmark({
        configs: [{ label: rowLabel, model: dir, dtype: "auto", strategy: "single", threads: o.threads }],
        settings: { batchSizes, newTokens: o.newTokens, cycles: o.cycles, maxMemoryBytes: availableMemory() },
        probe: true,
        ...(o.threads !== undefined ? { threads: o.threads } : {}),
      });
      printReport(report, out);
      const chartDir = join(blossomCacheDir(), "demo");
      createFolder(chartDir);
      const chart = join(chartDir, "bench.svg");
      writeFileSync(chart, renderChart(report.results, batchSizes, chartTitle));
      writeFileSync(join(chartDir, "bench.json"), JSON.stringify(report, null, 2) + "\n");
      out(`chart: ${chart}`);
      out(`JSON:  ${join(chartDir, "bench.json")}`);
      out(`demo finished in ${((performance.now() - started) / 1000).toFixed(0)} s`);
    });
}

/** How much of the weights used in place is mapped 2 MiB at a time, for the load line ("" if not known). */
function hugePages(m: MappedWeightsReport | undefined): string {
  if (!m || m.bytes === 0) return "";
  return ` (${formatBytes(m.hugeBytesAfter)} in 2 MiB pages${m.filesReread > 0 ? ", read again at load to get them" : ""})`;
}
