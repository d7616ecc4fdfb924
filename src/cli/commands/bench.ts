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
import { parseMaxMemory } from "../../parallel/planner.js";
import { readBloomConfig } from "../../checkpoint/config.js";
import { checkOutputFile, dtypeChoices, parseInteger } from "../options.js";
import { kvDtypes } from "../../backend/backend.js";

export const strategyChoices = ["single", "pipeline", "tensor", "replicas", "auto"];

function parseList(name: string, allowed?: readonly string[]) {
  return (value: string): string[] => {
    const items = value.split(",").map((s) => s.trim());
    if (items.every((s) => s === "")) throw new InvalidArgumentError(`${name} needs at least one value`);
    if (items.includes("")) throw new InvalidArgumentError(`${name}: "${value}" has an empty item (values are separated by single commas)`);
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
  kvDtype: string[];
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
  replicas: number;
  ranks: number;
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
        const streams = c.sequences !== c.batchSize ? ` (${c.sequences} sequences over all streams)` : "";
        out(
          `  bs ${String(c.batchSize).padStart(4)}${streams}: ${c.msPerToken.toFixed(2)} ms/token, ${c.tokensPerSecond.toFixed(1)} tokens/s, ` +
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
    .option("--kv-dtype <list>", `comma-separated KV-cache formats (${kvDtypes.join(", ")})`, parseList("--kv-dtype", kvDtypes), ["fp32"])
    .option("--strategy <list>", `comma-separated deployment strategies (${strategyChoices.join(", ")})`, parseList("--strategy", strategyChoices), ["single"])
    .option("--batch-sizes <list>", "comma-separated batch sizes", parseBatchSizes, [1, 8, 16, 32, 64, 128, 256, 512])
    .option("--new-tokens <n>", "tokens generated per sequence", parseInteger("--new-tokens", 1), 100)
    .option("--cycles <n>", "timed runs per batch size (after one warm-up)", parseInteger("--cycles", 1), 5)
    .option("--max-memory <size>", "memory budget, e.g. 16GiB (default: available RAM), or per-device budgets for pipeline rows, e.g. 0:4GiB,cpu:8GiB,disk")
    .option("--threads <n>", "compute threads (default: physical cores)", parseInteger("--threads", 1, 1024))
    .option("--replicas <n>", "replicas: engine workers, each decoding a batch of the column's size", parseInteger("--replicas", 1, 64), 2)
    .option("--ranks <n>", "tensor: MPI ranks launched with mpirun", parseInteger("--ranks", 1, 64), 2)
    .option("--json <file>", "write every figure and the machine description as JSON")
    .option("--chart <file>", "write an SVG chart of ms/token against batch size")
    .option("--no-probe", "skip measuring read bandwidth and FMA peak")
    .option("--no-progress", "no progress bar even on a terminal")
    .action(async (o: BenchCliOptions) => {
      if (o.json) checkOutputFile(o.json, "--json");
      if (o.chart) checkOutputFile(o.chart, "--chart");
      const dir = await resolveModelDir(o.model);
      // --max-memory is the memory budget ("16GiB"); or per-device budgets for pipeline rows
      // ("0:4GiB,cpu:8GiB,disk"), the budget then being the memory available.
      let maxMemoryBytes = availableMemory();
      let deviceMemory: string | undefined;
      if (o.maxMemory !== undefined && o.maxMemory.includes(":")) {
        parseMaxMemory(o.maxMemory);
        deviceMemory = o.maxMemory;
      } else if (o.maxMemory !== undefined) {
        maxMemoryBytes = parseSize(o.maxMemory, "--max-memory");
      }
      // "auto" runs what the checkpoint stores: its quantization scheme, else its torch_dtype.
      const storedConfig = readBloomConfig(dir);
      const stored = storedConfig.quantization?.scheme ?? (storedConfig.torchDtype ? { float32: "fp32", float16: "fp16", bfloat16: "bf16" }[storedConfig.torchDtype] : undefined);
      const dtypeLabel = (d: string) => (d === "auto" && stored ? stored : d);
      const configs: BenchConfig[] = [];
      for (const strategy of o.strategy) {
        const name = strategy === "single" ? "" : strategy === "tensor" ? `tensor x${o.ranks} ` : strategy === "replicas" ? `replicas x${o.replicas} ` : `${strategy} `;
        for (const dtype of o.dtype) {
          for (const kvDtype of o.kvDtype) {
            const label = `blossom ${name}${dtypeLabel(dtype)}${kvDtype === "fp32" ? "" : ` kv ${kvDtype}`}`;
            // A list naming one configuration twice (bf16,bf16; or auto and the stored format) measures it once.
            if (configs.some((c) => c.label === label)) continue;
            configs.push({
              label,
              model: dir,
              dtype,
              ...(kvDtype === "fp32" ? {} : { kvDtype }),
              strategy,
              threads: o.threads,
              ...(strategy === "pipeline" ? { deviceMemory: deviceMemory ?? `cpu:${maxMemoryBytes}B,disk` } : {}),
              ...(strategy === "replicas" ? { replicas: o.replicas } : {}),
              ...(strategy === "tensor" ? { ranks: o.ranks } : {}),
            });
          }
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
      // OOM is a result; a cell that could not be measured at all ("error") is a failure.
      if (report.results.some((r) => report.settings.batchSizes.some((bs) => !r.cells.some((c) => c.batchSize === bs)))) process.exitCode = 1;
    });
}
