/**
 * The guide's benchmark: greedy generation of `newTokens` tokens for batches of the guide's input
 * sentences, one warm-up run then `cycles` timed runs per batch size; ms/token = wall time of the
 * cycles (tokenization included) / tokens generated. Each configuration runs in its own process.
 */
import { fork } from "node:child_process";
import { fileURLToPath } from "node:url";
import cliProgress from "cli-progress";
import { guideInputSentences } from "../cli/commands/generate.js";
import { describeMachine } from "./machine.js";
import type { BenchConfig, BenchReport, BenchSettings, CellResult, ChildJob, ChildMessage, ConfigResult } from "./types.js";

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

function runConfig(config: BenchConfig, settings: BenchSettings, prompts: string[], progress: ProgressState): Promise<ConfigResult> {
  return new Promise((resolve) => {
    const result: ConfigResult = { config, loadSeconds: undefined, rssAfterLoadBytes: undefined, engine: undefined, cells: [] };
    const child = fork(childScript, [], { stdio: ["ignore", "inherit", "inherit", "ipc"] });
    const update = (batchSize: number | undefined, cycle: string) => {
      progress.bar?.update(progress.cellsDone, { config: config.label, batch: batchSize ?? "-", cycle });
    };
    update(undefined, "loading");
    child.on("message", (m: ChildMessage) => {
      switch (m.type) {
        case "loaded":
          result.loadSeconds = m.loadSeconds;
          result.rssAfterLoadBytes = m.rssAfterLoadBytes;
          result.engine = m.engine;
          break;
        case "progress":
          update(m.batchSize, `${m.cycle + 1}/${m.cycles}`);
          break;
        case "cell":
          result.cells.push(m.cell);
          progress.cellsDone++;
          update(m.cell.batchSize, "done");
          break;
        case "failed":
          result.error = m.error;
          break;
      }
    });
    child.on("exit", (code, signal) => {
      // A child killed for memory (SIGKILL from the OOM killer) leaves its remaining cells as OOM.
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
    const job: ChildJob = { config, settings, prompts };
    child.send(job);
  });
}

export async function runBenchmark(options: BenchOptions): Promise<BenchReport> {
  const machine = describeMachine({ probe: options.probe, ...(options.threads !== undefined ? { threads: options.threads } : {}) });
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
  return { generatedAt: new Date().toISOString(), machine, settings: options.settings, results };
}
