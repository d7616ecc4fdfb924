/** `blossom bench`: the guide's benchmark table, with JSON and an SVG chart. */
import { writeFileSync } from "node:fs";
import { basename } from "node:path";
import { InvalidArgumentError, type Command } from "commander";
import { runBenchmark } from "../../bench/bench.js";
import { renderChart } from "../../bench/chart.js";
import { formatTable } from "../../bench/table.js";
import type { BenchConfig, BenchReport } from "../../bench/types.js";
import { availableMemory, formatBytes, parseSize } from "../../engine/memory.js";
import { resolveModelDir } from "../../model.js";
import { dtypeChoices, parseInteger } from "../options.js";

export const strategyChoices = ["single"];

function parseList(name: string, allowed?: readonly string[]) {
  return (value: string): string[] => {
    const items = value.split(",").map((s) => s.trim()).filter(Boolean);
    if (items.length === 0) throw new InvalidArgumentError(`${name} needs at least one value`);
    for (const item of items) {
      if (allowed && !allowed.includes(item)) throw new InvalidArgumentError(`${name}: "${item}" is not one of ${allowed.join(", ")}`);
    }
    return items;
  };
}

function parseBatchSizes(value: string): number[] {
  const sizes = parseList("--batch-sizes")(value).map((v) => parseInteger("--batch-sizes", 1, 65536)(v));
  return [...new Set(sizes)].sort((a, b) => a - b);
}

export interface BenchCliOptions {
  model: string;
  dtype: string[];
  strategy: string[];
  batchSizes: number[];
  newTokens: number;
  cycles: number;
  maxMemory?: string;
  threads?: number;
  json?: string;
  chart?: string;
  probe: boolean;
  progress?: boolean;
}

/** Prints the report: machine line, the table, and per-configuration details. */
export function printReport(report: BenchReport, out: (line: string) => void): void {
  const m = report.machine;
  out(`machine: ${m.cpuModel}, ${m.physicalCores} cores (${m.threads} threads used), ${m.simd.join("/")}, ${formatBytes(m.memoryTotalBytes)} RAM`);
  if (m.readBandwidthGBs !== undefined) out(`measured limits: read bandwidth ${m.readBandwidthGBs.toFixed(1)} GB/s, FMA peak ${m.fmaPeakGflops!.toFixed(1)} GFLOP/s`);
  out(`greedy, ${report.settings.newTokens} new tokens, ${report.settings.cycles} cycles after 1 warm-up, memory budget ${formatBytes(report.settings.maxMemoryBytes)}; ms/token (lower is better):`);
  out("");
  out(formatTable(report.results, report.settings.batchSizes));
  out("");
  for (const r of report.results) {
    const load = r.loadSeconds !== undefined ? `start-to-ready ${r.loadSeconds.toFixed(2)} s` : "did not load";
    const weights = r.engine ? `, weights ${formatBytes(r.engine.weightBytes)}` : "";
    out(`${r.config.label}: ${load}${weights}${r.error ? ` — ${r.error}` : ""}`);
    for (const c of r.cells) {
      if (c.status === "ok") {
        out(
          `  bs ${String(c.batchSize).padStart(4)}: ${c.msPerToken.toFixed(2)} ms/token, ${c.tokensPerSecond.toFixed(1)} tokens/s, ` +
            `${(c.latencyPerBatchMs / 1000).toFixed(2)} s/batch, first token ${c.timeToFirstTokenMs.toFixed(0)} ms, peak RSS ${formatBytes(c.peakRssBytes)}`,
        );
      } else out(`  bs ${String(c.batchSize).padStart(4)}: OOM — ${c.reason}`);
    }
  }
}

export function registerBenchCommand(program: Command): void {
  program
    .command("bench")
    .description("the BLOOM inference guide's benchmark: ms/token by batch size, load time, OOM where memory runs out")
    .requiredOption("-m, --model <ref>", "checkpoint folder (or Hugging Face id)")
    .option("--dtype <list>", `comma-separated in-memory weight formats (${dtypeChoices.join(", ")})`, parseList("--dtype", dtypeChoices), ["auto"])
    .option("--strategy <list>", `comma-separated deployment strategies (${strategyChoices.join(", ")})`, parseList("--strategy", strategyChoices), ["single"])
    .option("--batch-sizes <list>", "comma-separated batch sizes", parseBatchSizes, [1, 8, 16, 32, 64, 128, 256, 512])
    .option("--new-tokens <n>", "tokens generated per sequence", parseInteger("--new-tokens", 1), 100)
    .option("--cycles <n>", "timed runs per batch size (after one warm-up)", parseInteger("--cycles", 1), 5)
    .option("--max-memory <size>", "memory budget, e.g. 16GiB (default: available RAM)")
    .option("--threads <n>", "compute threads (default: physical cores)", parseInteger("--threads", 1, 1024))
    .option("--json <file>", "write every figure and the machine description as JSON")
    .option("--chart <file>", "write an SVG chart of ms/token against batch size")
    .option("--no-probe", "skip measuring read bandwidth and FMA peak")
    .option("--no-progress", "no progress bar even on a terminal")
    .action(async (o: BenchCliOptions) => {
      const dir = await resolveModelDir(o.model);
      const maxMemoryBytes = o.maxMemory !== undefined ? parseSize(o.maxMemory, "--max-memory") : availableMemory();
      const configs: BenchConfig[] = [];
      for (const strategy of o.strategy) {
        for (const dtype of o.dtype) {
          configs.push({ label: `blossom ${strategy === "single" ? "" : strategy + " "}${dtype}`, model: dir, dtype, strategy, threads: o.threads });
        }
      }
      const report = await runBenchmark({
        configs,
        settings: { batchSizes: o.batchSizes, newTokens: o.newTokens, cycles: o.cycles, maxMemoryBytes },
        probe: o.probe,
        ...(o.threads !== undefined ? { threads: o.threads } : {}),
        ...(o.progress === false ? { progress: false } : {}),
      });
      printReport(report, (line) => process.stdout.write(line + "\n"));
      if (o.json) {
        writeFileSync(o.json, JSON.stringify(report, null, 2) + "\n");
        process.stdout.write(`\nJSON: ${o.json}\n`);
      }
      if (o.chart) {
        writeFileSync(o.chart, renderChart(report.results, report.settings.batchSizes, `Blossom: ms/token by batch size — ${basename(dir)}`));
        process.stdout.write(`chart: ${o.chart}\n`);
      }
    });
}
