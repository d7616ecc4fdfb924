/**
 * The one message protocol between front ends (library, CLI, server, bench) and an engine worker.
 * Requests carry an id; the worker answers each with a reply or an error. Generation streams
 * token updates for its id until a finish reason arrives.
 */
import type { ErrorCode } from "../errors.js";
import type { GenerationParams } from "../generate/params.js";
import type { FinishReason } from "../generate/stopping.js";
import type { EngineOptions } from "./load.js";
import type { OffloadStats } from "../parallel/offload.js";
import type { KVDType, MappedWeightsReport } from "../backend/backend.js";

export interface EngineInfo {
  dir: string;
  modelType: string;
  dtype: string;
  storedDtypes: string[];
  threads: number;
  kernels: string;
  vocabSize: number;
  hiddenSize: number;
  numLayers: number;
  numHeads: number;
  weightBytes: number;
  kvCacheTokens: number;
  /** How the KV cache stores keys and values. */
  kvDtype: KVDType;
  kvBytesPerToken: number;
  loadSeconds: number;
  /** Weights used in place from the checkpoint's mapping, and how much of it is mapped 2 MiB at a time (resident loads). */
  mappedWeights?: MappedWeightsReport;
  /** Engine workers serving this model (strategy "replicas"); absent for one. */
  replicas?: number;
  /** Tensor parallelism: this process's rank and the number of ranks. */
  tensorParallel?: { rank: number; size: number };
}

/** How often a busy engine worker pushes its figures (EngineHandle.latestStats). */
export const statsIntervalMs = 100;

export interface EngineStats {
  waiting: number;
  running: number;
  kvBlocksFree: number;
  kvBlocksTotal: number;
  kvBlockSize: number;
  steps: number;
  /** Chunks of forward / score jobs fed (each one engine step beside the generation steps). */
  jobChunks: number;
  generatedTokens: number;
  residentBytes: number;
  /** Present when layers are offloaded to disk (strategy "pipeline"). */
  offload?: OffloadStats;
}

export type LogitsWanted = "last" | "all" | "none";

export type Request =
  /** Logits for every position of each sequence (fresh sequences, freed afterwards). */
  | { type: "forward"; id: number; sequences: number[][] }
  /** log p(tokens[i] | tokens[<i]) for i >= from, per sequence. */
  | { type: "score"; id: number; sequences: { tokens: number[]; from: number }[] }
  | { type: "open"; id: number }
  | { type: "feed"; id: number; entries: { session: number; tokens: number[]; logits: LogitsWanted }[] }
  | { type: "close"; id: number; session: number }
  | { type: "submit"; id: number; promptIds: number[]; params: GenerationParams; eosTokenIds: number[]; logprobs?: boolean }
  | { type: "cancel"; id: number }
  | { type: "stats"; id: number }
  | { type: "dispose"; id: number };

export interface TokenUpdate {
  id: number;
  token: number;
  logprob: number;
  finish?: FinishReason;
}

export type Response =
  | { type: "ready"; info: EngineInfo }
  | { type: "fatal"; error: SerializedError }
  | { type: "reply"; id: number; result: unknown }
  | { type: "error"; id: number; error: SerializedError }
  /** Token updates of one engine step, for every sequence that advanced. */
  | { type: "step"; updates: TokenUpdate[] }
  /** A submitted generation ended without a token (cancelled while waiting, or failed). */
  | { type: "ended"; id: number; finish: FinishReason | "cancelled"; error?: SerializedError }
  /** The engine's figures, pushed when its queue or batch changes, every statsIntervalMs while it works, and when it goes idle. */
  | { type: "stats"; stats: EngineStats };

export interface SerializedError {
  code: ErrorCode;
  message: string;
}

export interface WorkerData {
  dir: string;
  options: Omit<EngineOptions, "backend">;
  maxBatchSize?: number;
  maxBatchTotalTokens?: number;
  maxBatchPrefillTokens?: number;
}
