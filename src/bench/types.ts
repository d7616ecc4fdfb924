/** What the benchmark measures, per configuration and batch size (the JSON record's shape). */
import type { EngineInfo } from "../engine/protocol.js";
import type { BatchMemory } from "../engine/memory.js";
import type { MachineDescription } from "./machine.js";

export interface BenchConfig {
  /** Row label, e.g. "blossom bf16". */
  label: string;
  model: string;
  dtype: string;
  /** How the KV cache stores keys and values (fp32 when absent). */
  kvDtype?: string;
  /** single | pipeline | tensor | replicas | auto */
  strategy: string;
  threads: number | undefined;
  /** Pipeline: per-device budgets ("cpu:8GiB,disk"). */
  deviceMemory?: string;
  /** Replicas: engine workers (each decodes a batch of the column's size). */
  replicas?: number;
  /** Tensor: MPI ranks (launched with mpirun). */
  ranks?: number;
}

export interface BenchSettings {
  batchSizes: number[];
  newTokens: number;
  cycles: number;
  maxMemoryBytes: number;
}

export type CellResult =
  | {
      batchSize: number;
      status: "ok";
      /** Wall time of the cycles (tokenization included) / new tokens generated, as the guide reports. */
      msPerToken: number;
      tokensPerSecond: number;
      /** Mean wall time of one cycle: the latency a batch of requests sees. */
      latencyPerBatchMs: number;
      /** Mean time from the call to the first generated token. */
      timeToFirstTokenMs: number;
      newTokensGenerated: number;
      /** Sequences per cycle: the batch size times the number of streams (replicas). */
      sequences: number;
      promptTokens: number;
      /** Peak resident memory of the configuration's processes (all ranks) during this batch size. */
      peakRssBytes: number;
      predicted: BatchMemory;
    }
  | { batchSize: number; status: "oom"; reason: string; predicted?: BatchMemory };

export interface ConfigResult {
  config: BenchConfig;
  /** Start to ready to generate: worker start, mapping, conversion. */
  loadSeconds: number | undefined;
  rssAfterLoadBytes: number | undefined;
  engine: EngineInfo | undefined;
  cells: CellResult[];
  error?: string;
}

export interface BenchReport {
  generatedAt: string;
  machine: MachineDescription;
  settings: BenchSettings;
  results: ConfigResult[];
}

/** Messages from a bench child process to the parent. */
export type ChildMessage =
  | { type: "loaded"; loadSeconds: number; rssAfterLoadBytes: number; engine: EngineInfo }
  | { type: "progress"; batchSize: number; cycle: number; cycles: number; elapsedMs: number }
  | { type: "cellStart"; batchSize: number }
  | { type: "cell"; cell: CellResult }
  | { type: "failed"; error: string };

/** What the parent asks a child to run. */
export interface ChildJob {
  config: BenchConfig;
  settings: BenchSettings;
  prompts: string[];
}

/** Child processes report on stdout, one "BLOSSOM-BENCH <json>" line per message. */
export const messagePrefix = "BLOSSOM-BENCH ";
