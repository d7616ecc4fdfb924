/**
 * The guide's benchmark: greedy generation of `newTokens` tokens for batches of the guide's input
 * sentences, one warm-up run then `cycles` timed runs per batch size; ms/token = wall time of the
 * cycles (tokenization included) / tokens generated. Each configuration runs in its own process.
 */
import { spawn } from "node:child_process";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";
import cliProgress from "cli-progress";
import { guideInputSentences } from "../cli/commands/generate.js";
import { describeMachine, probeLimits } from "./machine.js";
import { treeRss } from "./rss.js";
import { messagePrefix, type BenchConfig, type BenchReport, type BenchSettings, type CellResult, type ChildJob, type ChildMessage, type ConfigResult } from "./types.js";

export interface BenchOptions {
  configs: BenchConfig[];
  settings: BenchSettings;
  /** Measure read bandwidth and FMA peak (a few seconds). */
  probe: boolean;
  threads?: number;
  /** Show a progress bar (default: when stderr is a TTY). */
  progress?: boolean;
  prompts?: string[];
}

const childScript = fileURLToPath(new URL("./child.js", import.meta.url));

interface ProgressState {
  bar: cliProgress.SingleBar | undefined;
  startedAt: number;
  cellsDone: number;
  cellsTotal: number;
}

/** The command that runs a configuration: node, or mpirun starting one node per rank. */
function childCommand(config: BenchConfig, job: string): [string, string[]] {
  const node = [process.execPath, childScript, job];
  if (config.strategy !== "tensor") return [node[0]!, node.slice(1)];
  return ["mpirun", ["--allow-run-as-root", "--oversubscribe", "-np", String(config.ranks ?? 2), ...node]];
}

function runConfig(config: BenchConfig, settings: BenchSettings, prompts: string[], progress: ProgressState): Promise<ConfigResult> {
  return new Promise((resolve) => {
    const result: ConfigResult = { config, loadSeconds: undefined, rssAfterLoadBytes: undefined, engine: undefined, cells: [] };
    const job: ChildJob = { config, settings, prompts };
    const [command, args] = childCommand(config, Buffer.from(JSON.stringify(job)).toString("base64"));
    const child = spawn(command, args, { stdio: ["ignore", "pipe", "inherit"] });
    // A signal to this process alone (kill PID, a supervisor) reaches the child too, which would
    // otherwise go on computing, orphaned; then this process ends the way the signal asks.
    const forwarded: NodeJS.Signals[] = ["SIGTERM", "SIGINT", "SIGHUP"];
    const forward = (signal: NodeJS.Signals) => {
      child.kill(signal);
      for (const s of forwarded) process.removeListener(s, forward);
      process.kill(process.pid, signal);
    };
    for (const s of forwarded) process.once(s, forward);
    // Peak memory of the whole configuration (every rank), sampled from /proc while a batch size runs.
    let cellPeak: number | undefined;
    const sampler = setInterval(() => {
      if (cellPeak === undefined || child.pid === undefined) return;
      const rss = treeRss(child.pid);
      if (rss !== undefined) cellPeak = Math.max(cellPeak, rss);
    }, 50);
    const update = (batchSize: number | undefined, cycle: string) => {
      progress.bar?.update(progress.cellsDone, { config: config.label, batch: batchSize ?? "-", cycle });
    };
    update(undefined, "loading");
    child.on("error", (err) => (result.error = `cannot start ${command}: ${err.message}`));
    createInterface({ input: child.stdout! }).on("line", (line) => {
      if (!line.startsWith(messagePrefix)) {
        process.stdout.write(line + "\n");
        return;
      }
      const m = JSON.parse(line.slice(messagePrefix.length)) as ChildMessage;
      switch (m.type) {
        case "loaded":
          result.loadSeconds = m.loadSeconds;
          result.rssAfterLoadBytes = m.rssAfterLoadBytes;
          result.engine = m.engine;
          break;
        case "cellStart":
          cellPeak = 0;
          break;
        case "progress":
          update(m.batchSize, `${m.cycle + 1}/${m.cycles}`);
          break;
        case "cell":
          if (m.cell.status === "ok" && cellPeak) m.cell.peakRssBytes = Math.max(m.cell.peakRssBytes, cellPeak);
          cellPeak = undefined;
          result.cells.push(m.cell);
          progress.cellsDone++;
          update(m.cell.batchSize, "done");
          break;
        case "failed":
          result.error = m.error;
          break;
      }
    });
    child.on("close", (code, signal) => {
      for (const s of forwarded) process.removeListener(s, forward);
      clearInterval(sampler);
      // A configuration killed for memory (SIGKILL from the OOM killer) leaves its remaining cells as OOM.
      const missing = settings.batchSizes.filter((bs) => !result.cells.some((c) => c.batchSize === bs));
      if (missing.length && (signal || code !== 0)) {
        const why = signal ? `the process was killed (${signal}), most likely out of memory` : `the process failed: ${result.error ?? `exit code ${code}`}`;
        const oom = signal === "SIGKILL" || /memory|allocat/i.test(result.error ?? "");
        for (const bs of missing) {
          if (oom) result.cells.push({ batchSize: bs, status: "oom", reason: why } satisfies CellResult);
        }
        result.error ??= why;
      }
      progress.cellsDone += missing.length;
      resolve(result);
    });
  });
}

export async function runBenchmark(options: BenchOptions): Promise<BenchReport> {
  const machine = describeMachine(options.threads !== undefined ? { threads: options.threads } : {});
  const prompts = options.prompts ?? guideInputSentences;
  const showProgress = options.progress ?? process.stderr.isTTY === true;
  const progress: ProgressState = { bar: undefined, startedAt: Date.now(), cellsDone: 0, cellsTotal: options.configs.length * options.settings.batchSizes.length };
  if (showProgress) {
    progress.bar = new cliProgress.SingleBar(
      { format: " {bar} {value}/{total} cells | {config} | bs {batch} | cycle {cycle} | ETA {eta_formatted}", etaBuffer: 4, stream: process.stderr, hideCursor: true },
      cliProgress.Presets.shades_classic,
    );
    progress.bar.start(progress.cellsTotal, 0, { config: "", batch: "-", cycle: "" });
  }
  const results: ConfigResult[] = [];
  try {
    for (const config of options.configs) results.push(await runConfig(config, options.settings, prompts, progress));
  } finally {
    progress.bar?.stop();
  }
  // The limits are probed after the cells, not before: the probe's GiB, freed at once, stalled the
  // first cell's decode steps on this project's VM (its balloon reports freed pages to the host; see
  // native/src/probes.h), by 1.4-2.6 ms a token in bench:decode's measurements.
  if (options.probe) Object.assign(machine, probeLimits(machine.threads));
  return { generatedAt: new Date().toISOString(), machine, settings: options.settings, results };
}
