/** What `blossom serve` (and startServer) can be told, with defaults and validation. */
import { basename, resolve } from "node:path";
import { BlossomError, parameterError } from "../errors.js";
import { strategies, type LoadModelOptions, type Model, type ModelDType, type Strategy } from "../model.js";

/** Ways to place a model on the machine (src/parallel/): every one can serve. */
export const strategyChoices = strategies;
export const availableStrategies: readonly Strategy[] = strategies;

/** Unset options take serverDefaults' values (below). */
export interface ServerOptions {
  /**
   * A checkpoint folder (or Hub id) to load, or a model loaded by the caller (or being loaded):
   * the server then does not dispose it.
   */
  model: string | Model | Promise<Model>;
  /** The name clients see in /info, /v1/models and responses (default: the checkpoint folder's name; "model" when `model` is a Promise). */
  modelId?: string;
  host?: string;
  /** 0 picks a free port. */
  port?: number;
  dtype?: ModelDType;
  threads?: number;
  kvCacheTokens?: number;
  strategy?: string;
  /** Further loadModel options (a strategy's settings: maxMemory, placement, offloadFolder, replicas). */
  modelOptions?: LoadModelOptions;
  /** Most sequences the engine decodes together; also the most prompts one /generate/ or /v1/completions call may send. */
  maxBatchSize?: number;
  /** Most prompt tokens per sequence. */
  maxInputLength?: number;
  /** Most new tokens a request may ask for. */
  allowedMaxNewTokens?: number;
  /** Sequences accepted at once (queued or running); beyond it, 429. */
  maxConcurrentRequests?: number;
  /** Cap on prompt + max_new_tokens summed over the running batch (the KV-cache budget). */
  maxBatchTotalTokens?: number;
  /**
   * Most prompt tokens one engine step feeds (default 512): a longer prompt goes in over several
   * steps while running sequences keep decoding. Applies when the server loads the model itself.
   */
  maxBatchPrefillTokens?: number;
  /** Most stop sequences per request. */
  maxStopSequences?: number;
  /**
   * Most client connections open at once (default 1024). A connection beyond it is closed as it is
   * accepted (Node's server.maxConnections), before anything is read from it, and counted in
   * blossom_connections_dropped_total: each open connection holds a file descriptor and buffers.
   */
  maxConnections?: number;
  /** On SIGTERM (or shutdown()), in-flight requests get this long to finish before they are cancelled. */
  shutdownTimeoutMs?: number;
  /** Log requests and errors (pino, as fastify does): false (the default here; `blossom serve` logs at info), true (info) or a level. */
  logger?: boolean | "fatal" | "error" | "warn" | "info" | "debug" | "trace";
}

export interface ResolvedServerOptions {
  host: string;
  port: number;
  strategy: Strategy;
  maxBatchSize: number;
  maxInputLength: number;
  allowedMaxNewTokens: number;
  maxConcurrentRequests: number;
  maxBatchTotalTokens: number | undefined;
  maxBatchPrefillTokens: number;
  maxStopSequences: number;
  maxConnections: number;
  shutdownTimeoutMs: number;
}

export const serverDefaults = {
  host: "127.0.0.1",
  port: 5000,
  strategy: "single" as Strategy,
  maxBatchSize: 64,
  maxInputLength: 1024,
  allowedMaxNewTokens: 2048,
  maxConcurrentRequests: 128,
  maxStopSequences: 4,
  maxConnections: 1024,
  // A step's prompt tokens take this long before running sequences get their next token: on a
  // 2-core CPU about 2.5 s for bloom-560m at 512 (llama.cpp's default micro-batch), 20 s at TGI's 4096.
  maxBatchPrefillTokens: 512,
  shutdownTimeoutMs: 30_000,
};

function positiveInteger(name: string, value: number | undefined, fallback: number): number {
  if (value === undefined) return fallback;
  if (!Number.isSafeInteger(value) || value < 1) throw parameterError(name, `must be an integer >= 1 (got ${value})`);
  return value;
}

export function checkStrategy(strategy: string | undefined): Strategy {
  const s = strategy ?? serverDefaults.strategy;
  if (!(strategyChoices as readonly string[]).includes(s)) {
    throw parameterError("strategy", `must be one of ${strategyChoices.join(", ")} (got ${JSON.stringify(s)})`);
  }
  if (!availableStrategies.includes(s as Strategy)) {
    throw new BlossomError("parameter", `strategy: "${s}" is not available yet; this build serves with: ${availableStrategies.join(", ")}`);
  }
  return s as Strategy;
}

export function resolveServerOptions(o: ServerOptions): ResolvedServerOptions {
  const port = o.port ?? serverDefaults.port;
  if (!Number.isInteger(port) || port < 0 || port > 65535) throw parameterError("port", `must be an integer from 0 to 65535 (got ${port})`);
  const shutdownTimeoutMs = o.shutdownTimeoutMs ?? serverDefaults.shutdownTimeoutMs;
  if (!Number.isFinite(shutdownTimeoutMs) || shutdownTimeoutMs < 0) throw parameterError("shutdownTimeoutMs", `must be a number >= 0 (got ${shutdownTimeoutMs})`);
  const maxInputLength = positiveInteger("maxInputLength", o.maxInputLength, serverDefaults.maxInputLength);
  const maxBatchTotalTokens = o.maxBatchTotalTokens === undefined ? undefined : positiveInteger("maxBatchTotalTokens", o.maxBatchTotalTokens, 0);
  if (maxBatchTotalTokens !== undefined && maxBatchTotalTokens < 2) {
    // Every request needs at least one prompt token and one new token within the batch budget.
    throw parameterError("maxBatchTotalTokens", `must be at least 2 (a prompt token and a new token), got ${maxBatchTotalTokens}`);
  }
  return {
    host: o.host ?? serverDefaults.host,
    port,
    strategy: checkStrategy(o.strategy),
    maxBatchSize: positiveInteger("maxBatchSize", o.maxBatchSize, serverDefaults.maxBatchSize),
    maxInputLength,
    allowedMaxNewTokens: positiveInteger("allowedMaxNewTokens", o.allowedMaxNewTokens, serverDefaults.allowedMaxNewTokens),
    maxConcurrentRequests: positiveInteger("maxConcurrentRequests", o.maxConcurrentRequests, serverDefaults.maxConcurrentRequests),
    maxBatchTotalTokens,
    maxBatchPrefillTokens: positiveInteger("maxBatchPrefillTokens", o.maxBatchPrefillTokens, serverDefaults.maxBatchPrefillTokens),
    maxStopSequences: positiveInteger("maxStopSequences", o.maxStopSequences, serverDefaults.maxStopSequences),
    maxConnections: positiveInteger("maxConnections", o.maxConnections, serverDefaults.maxConnections),
    shutdownTimeoutMs,
  };
}

export function defaultModelId(model: string | Model | Promise<Model>): string {
  if (model instanceof Promise) return "model";
  return basename(resolve(typeof model === "string" ? model : model.dir));
}
