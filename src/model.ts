/**
 * The library API: loadModel(ref, options) -> Model with forward, generate, stream, perplexity.
 * The model runs in an engine worker; this side tokenizes, detokenizes, applies stop strings and
 * shapes results.
 */
import { getMaxListeners, setMaxListeners } from "node:events";
import { BlossomError, describeValue, knownOptions, parameterError } from "./errors.js";
import { EngineClient, type EngineHandle } from "./engine/client.js";
import { defaultKvCacheTokens, kvBytesPerToken, resolveKvDtype } from "./engine/kv-cache.js";
import { ReplicaSet } from "./parallel/replicas.js";
import { native } from "./backend/native.js";
import type { EngineInfo, EngineStats, TokenUpdate, WorkerData } from "./engine/protocol.js";
import { placementModes, type PlacementMode } from "./parallel/planner.js";
import { chooseStrategy, type AutoChoice } from "./parallel/auto.js";
import { quantizedCopy } from "./quant/cache.js";
import { isQuantScheme } from "./quant/scheme.js";
import type { WeightDType } from "./engine/weights.js";
import type { LinearPanels } from "./backend/cpu.js";
import type { KVDType } from "./backend/backend.js";
import { hasLoneSurrogate, resolveGenerationParams, type GenerationParams, type GenerationParamsInput } from "./generate/params.js";
import { IncrementalDecoder, StopStringMatcher, type FinishReason } from "./generate/stopping.js";
import { resolveModel } from "./hub/resolve.js";
import { BloomTokenizer } from "./tokenizer/tokenizer.js";
import { readBloomConfig, type BloomConfig } from "./checkpoint/config.js";

export type ModelDType = WeightDType;

export interface LoadModelOptions {
  /** In-memory weight format: "auto" (as stored), "fp32", "bf16", "fp16", "int8", "int8-mixed" (src/quant/). */
  dtype?: ModelDType;
  /** dtype "int8": inputs per weight scale (default 256, quant/scheme.ts defaultGroupSize; a multiple of 32). */
  int8GroupSize?: number;
  /** dtype "int8-mixed": |activation| from which an input feature is computed in fp32 (default 6). */
  int8Threshold?: number;
  /** Compute threads (default: physical cores). */
  threads?: number;
  /** KV-cache capacity in tokens, across all sequences. */
  kvCacheTokens?: number;
  /**
   * How the KV cache stores keys and values: "fp32" (default), or "fp16" / "bf16", which take half
   * the memory (twice the tokens in the same capacity) and half the bytes per decode step.
   */
  kvDtype?: KVDType;
  /** Most sequences decoded together (default 1024, within what the KV cache holds). */
  maxBatchSize?: number;
  /** Cap on prompt + max_new_tokens over running sequences (default: the KV cache's capacity). */
  maxBatchTotalTokens?: number;
  /**
   * Most prompt tokens one step feeds (default 4096, TGI's max_batch_prefill_tokens): a longer
   * prompt, or several that add up to more, go in over several steps while the sequences already
   * running keep decoding, a token each step. forward, tokenLogprobs and perplexity go in chunks
   * of the same size, a generation step between each two (a session's feed stays one step).
   */
  maxBatchPrefillTokens?: number;
  /** How the model is spread over the machine (see src/parallel/): "single" (default), "pipeline", "tensor", "replicas" or "auto". */
  strategy?: Strategy;
  /** Pipeline: per-device budgets, "0:2GiB,1:2GiB,cpu:4GiB,disk". */
  maxMemory?: string;
  /** Pipeline: how layers are spread, as Accelerate's device_map ("auto" = "balanced"). */
  placement?: PlacementMode;
  /** Pipeline: where offloaded weights converted to another dtype are written. */
  offloadFolder?: string;
  /** Pipeline: read offloaded layers ahead (default true). */
  offloadPrefetch?: boolean;
  /** Pipeline: drop offloaded pages from the page cache after each read (every pass reads the disk). */
  evictPageCache?: boolean;
  /** Replicas: how many engine workers (default 2); threads are shared out among them. */
  replicas?: number;
  /**
   * Advanced: which weight matrices that only linear layers read are copied at load into column
   * panels, a layout the kernels stream faster when rows are long (default: the measured policy,
   * bf16/fp16 matrices with more than 4096 inputs, in panels of 4096; strategy "replicas": null; null: none).
   */
  linearPanels?: LinearPanels | null;
}

export type Strategy = "single" | "pipeline" | "tensor" | "replicas" | "auto";
export const strategies: readonly Strategy[] = ["single", "pipeline", "tensor", "replicas", "auto"];

/** Ranks in this MPI job when launched by mpirun, else 1. */
export function mpiWorldSize(): number {
  const v = process.env.OMPI_COMM_WORLD_SIZE ?? process.env.PMIX_SIZE ?? process.env.PMI_SIZE;
  return v === undefined ? 1 : Number(v);
}

/** This process's MPI rank when launched by mpirun (Open MPI, MPICH/PMI, PMIx), else 0. */
export function mpiRank(): number {
  const v = process.env.OMPI_COMM_WORLD_RANK ?? process.env.PMIX_RANK ?? process.env.PMI_RANK;
  return v === undefined ? 0 : Number(v);
}

/** Every loadModel option, so that a misspelt one is refused rather than ignored (the type keeps the list complete). */
const loadOptionNames: Record<keyof LoadModelOptions, true> = {
  dtype: true, int8GroupSize: true, int8Threshold: true, threads: true, kvCacheTokens: true, kvDtype: true, maxBatchSize: true,
  maxBatchTotalTokens: true, maxBatchPrefillTokens: true, strategy: true, maxMemory: true, placement: true, offloadFolder: true, offloadPrefetch: true,
  evictPageCache: true, replicas: true, linearPanels: true,
};


/**
 * Checks loadModel's options: an object of known names, the batch and cache sizes positive integers,
 * the pipeline's settings of the right types. (Names whose values only the engine can judge, such as
 * dtype, threads or kvDtype, are checked where they are used.)
 */
export function checkLoadOptions(options: unknown): LoadModelOptions {
  const o = knownOptions(options, loadOptionNames, "loadModel");
  for (const name of ["kvCacheTokens", "maxBatchSize", "maxBatchTotalTokens", "maxBatchPrefillTokens"] as const) {
    const v = o[name];
    if (v !== undefined && (typeof v !== "number" || !Number.isSafeInteger(v) || v < 1)) throw parameterError(name, `expected an integer >= 1 (got ${describeValue(v)})`);
  }
  for (const name of ["offloadPrefetch", "evictPageCache"] as const) {
    const v = o[name];
    if (v !== undefined && typeof v !== "boolean") throw parameterError(name, `expected a boolean (got ${describeValue(v)})`);
  }
  for (const name of ["maxMemory", "offloadFolder"] as const) {
    const v = o[name];
    if (v !== undefined && (typeof v !== "string" || v.length === 0)) throw parameterError(name, `expected a non-empty string (got ${describeValue(v)})`);
  }
  if (o.placement !== undefined && !(placementModes as readonly unknown[]).includes(o.placement)) {
    throw parameterError("placement", `expected one of ${placementModes.join(", ")} (got ${describeValue(o.placement)})`);
  }
  return o as LoadModelOptions;
}

/** Splits loadModel's options into what the engine worker needs. */
export function engineOptionsFrom(options: LoadModelOptions): WorkerData["options"] {
  const { strategy = "single", maxMemory, placement, offloadFolder, offloadPrefetch, evictPageCache, replicas, maxBatchSize: _b, maxBatchTotalTokens: _t, maxBatchPrefillTokens: _p, ...rest } = options;
  if (!strategies.includes(strategy)) {
    throw new BlossomError("parameter", `strategy: expected one of ${strategies.join(", ")}, got ${JSON.stringify(strategy)}`);
  }
  if (replicas !== undefined && strategy !== "replicas") throw new BlossomError("parameter", `replicas: only applies to strategy "replicas"`);
  if (strategy !== "pipeline") {
    for (const [name, value] of Object.entries({ maxMemory, placement, offloadFolder, offloadPrefetch, evictPageCache })) {
      if (value !== undefined) throw new BlossomError("parameter", `${name}: only applies to strategy "pipeline"`);
    }
    return strategy === "tensor" ? { ...rest, tensorParallel: true } : rest;
  }
  if (maxMemory === undefined) throw new BlossomError("parameter", `maxMemory: strategy "pipeline" needs per-device budgets, e.g. "0:2GiB,1:2GiB,cpu:4GiB,disk"`);
  return {
    ...rest,
    pipeline: {
      maxMemory,
      ...(placement !== undefined ? { placement } : {}),
      ...(offloadFolder !== undefined ? { offloadFolder } : {}),
      ...(offloadPrefetch !== undefined ? { prefetch: offloadPrefetch } : {}),
      ...(evictPageCache !== undefined ? { evictPageCache } : {}),
    },
  };
}

export interface GenerateResult {
  /** Generated text per prompt (without the prompt). */
  texts: string[];
  /** New token ids per prompt. */
  tokenIds: number[][];
  numGeneratedTokens: number[];
  finishReasons: (FinishReason | "cancelled")[];
  /** Seconds from the call to each prompt's first generated token (NaN if none came). */
  timeToFirstToken: number[];
}

export interface StreamEvent {
  /**
   * The token just generated (absent only on a final event after cancellation). Its `text` is the
   * token's own text as text-generation-inference's decode_token gives it: "" for a special token
   * or while a multi-byte character is incomplete, which then comes whole with the token that ends it.
   */
  token?: { id: number; logprob: number; special: boolean; text: string };
  /** New text to show (may be empty while a multi-byte character or a possible stop string is pending). */
  text: string;
  /** Set on the last event. */
  finishReason?: FinishReason | "cancelled";
}

export interface PerplexityResult {
  perplexity: number;
  /** Mean negative log-likelihood per predicted token, in nats. */
  meanNll: number;
  tokens: number;
  predicted: number;
}

export interface ForwardResult {
  /** Logits, row-major [batch, seq, vocab]; positions where attentionMask is 0 are zeros. */
  data: Float32Array;
  dims: [number, number, number];
}

type Prompt = string | number[];

/** Generation parameters validated (the abort signal included), and the signal apart. */
function generationInput(params: unknown): { resolved: GenerationParams; signal: AbortSignal | undefined } {
  const resolved = resolveGenerationParams(params);
  return { resolved, signal: (params as GenerationParamsInput | undefined)?.signal };
}

/** An optional abort signal, checked. */
function checkSignal(signal: unknown, what: string): AbortSignal | undefined {
  if (signal !== undefined && !(signal instanceof AbortSignal)) throw parameterError("signal", `must be an AbortSignal (got ${describeValue(signal)})`);
  // Already aborted: refused before any work, even work that would need no engine step.
  if (signal?.aborted) throw new BlossomError("aborted", `${what} was aborted`);
  return signal;
}

/** A rejection handler: an error caused by `signal`'s abort is reported as `what` aborted (the engine names the request, not the call). */
function abortedAs(signal: AbortSignal | undefined, what: string): (err: unknown) => never {
  return (err) => {
    throw signal?.aborted ? new BlossomError("aborted", `${what} was aborted`) : err;
  };
}

type PerplexityOptions = { context?: number; stride?: number; signal?: AbortSignal };
const perplexityOptionNames: Record<keyof PerplexityOptions, true> = { context: true, stride: true, signal: true };

function checkPerplexityOptions(options: unknown): PerplexityOptions {
  const o = knownOptions(options, perplexityOptionNames, "perplexity");
  if (o.signal !== undefined && !(o.signal instanceof AbortSignal)) throw parameterError("signal", `must be an AbortSignal (got ${describeValue(o.signal)})`);
  return o as PerplexityOptions;
}

function checkTokenIds(ids: unknown, where: string, vocabSize: number): number[] {
  if (!Array.isArray(ids)) throw new BlossomError("input", `${where}: expected an array of token ids`);
  for (const [i, id] of ids.entries()) {
    if (!Number.isInteger(id) || id < 0 || id >= vocabSize) {
      throw new BlossomError("input", `${where}[${i}]: token id ${describeValue(id)} is outside the vocabulary [0, ${vocabSize})`);
    }
  }
  return ids as number[];
}

/** One entry of Model.feed, checked: a session, token ids, which logits. */
function checkFeedEntry(entry: unknown, where: string, vocabSize: number): { session: Session; tokens: number[]; logits: "all" | "last" } {
  if (typeof entry !== "object" || entry === null) throw parameterError(where, `expected { session, tokens, logits? } (got ${describeValue(entry)})`);
  const e = entry as { session?: unknown; tokens?: unknown; logits?: unknown };
  if (!(e.session instanceof Session)) throw parameterError(`${where}.session`, `expected a Session from openSession() (got ${describeValue(e.session)})`);
  return { session: e.session, tokens: checkTokenIds(e.tokens, `${where}.tokens`, vocabSize), logits: checkLogitsWanted(e.logits, `${where}.logits`) };
}

function checkLogitsWanted(value: unknown, where: string): "all" | "last" {
  if (value === undefined) return "all";
  if (value !== "all" && value !== "last") throw parameterError(where, `expected "all" or "last" (got ${describeValue(value)})`);
  return value;
}

export class Model {
  readonly tokenizer: BloomTokenizer;
  readonly config: BloomConfig;
  readonly info: EngineInfo;
  readonly dir: string;
  private readonly client: EngineHandle;
  private disposed = false;

  private constructor(dir: string, client: EngineHandle, tokenizer: BloomTokenizer, config: BloomConfig) {
    this.dir = dir;
    this.client = client;
    this.tokenizer = tokenizer;
    this.config = config;
    this.info = client.info;
  }

  /** How strategy "auto" decided, when it was asked to. */
  strategyChoice: AutoChoice | undefined;

  /** See loadModel(). */
  static async load(dir: string, input: LoadModelOptions = {}): Promise<Model> {
    let options = checkLoadOptions(input);
    let choice: AutoChoice | undefined;
    if (options.strategy === "auto") {
      choice = chooseStrategy(dir, options.dtype ?? "auto", mpiWorldSize());
      options = {
        ...options,
        strategy: choice.strategy,
        ...(choice.maxMemory !== undefined && options.maxMemory === undefined ? { maxMemory: choice.maxMemory } : {}),
        ...(choice.replicas !== undefined && options.replicas === undefined ? { replicas: choice.replicas } : {}),
      };
    }
    // Replicas share one mapping of the weights and pipeline offload streams them from disk: with an
    // int8 dtype both use a quantized copy made once in the cache, rather than quantizing at load.
    if ((options.strategy === "replicas" || options.strategy === "pipeline") && options.dtype && isQuantScheme(options.dtype) && !readBloomConfig(dir).quantization) {
      dir = await quantizedCopy(dir, options.dtype, options.int8GroupSize);
      const { int8GroupSize: _group, ...rest } = options;
      options = { ...rest, dtype: "auto" };
    }
    const model = await Model.loadResolved(dir, options);
    model.strategyChoice = choice;
    return model;
  }

  private static async loadResolved(dir: string, options: LoadModelOptions): Promise<Model> {
    const config = readBloomConfig(dir);
    const { maxBatchSize, maxBatchTotalTokens, maxBatchPrefillTokens } = options;
    const engineOptions = engineOptionsFrom(options);
    // The worker maps the weights while this thread loads the tokenizer (about a second for BLOOM's).
    const data = {
      dir,
      options: engineOptions,
      ...(maxBatchSize !== undefined ? { maxBatchSize } : {}),
      ...(maxBatchTotalTokens !== undefined ? { maxBatchTotalTokens } : {}),
      ...(maxBatchPrefillTokens !== undefined ? { maxBatchPrefillTokens } : {}),
    };
    if (options.strategy === "tensor" && mpiRank() !== 0) {
      // Only rank 0 talks to the user: the others compute their slice of every step, then exit.
      await EngineClient.follow(data);
      process.exit(0);
    }
    const replicas = options.replicas ?? 2;
    if (options.strategy === "replicas" && data.options.kvCacheTokens === undefined) {
      // The replicas share the machine's memory: each takes its share of the default (and they are equal).
      const perToken = kvBytesPerToken(config, resolveKvDtype(data.options.kvDtype));
      data.options = { ...data.options, kvCacheTokens: defaultKvCacheTokens(perToken, replicas) };
    }
    const starting: Promise<EngineHandle> =
      options.strategy === "replicas"
        ? ReplicaSet.start(data, replicas, options.threads ?? native().cpuInfo().physicalCores)
        : EngineClient.start(data);
    let tokenizer: BloomTokenizer;
    try {
      tokenizer = BloomTokenizer.fromDir(dir);
      if (tokenizer.vocabSize > config.vocabSize) {
        throw new BlossomError("checkpoint", `${tokenizer.file}: the tokenizer has ${tokenizer.vocabSize} tokens but config.json's vocab_size is ${config.vocabSize}`);
      }
    } catch (err) {
      await starting.then((c) => c.dispose(), () => undefined);
      throw err;
    }
    return new Model(dir, await starting, tokenizer, config);
  }

  private get eosTokenIds(): number[] {
    const ids = new Set(this.config.eosTokenIds);
    if (this.tokenizer.eosTokenId !== undefined && ids.size === 0) ids.add(this.tokenizer.eosTokenId);
    return [...ids];
  }

  private checkOpen(): void {
    if (this.disposed) throw new BlossomError("aborted", "the model was disposed");
  }

  private checkIds(ids: unknown, where: string): number[] {
    return checkTokenIds(ids, where, this.config.vocabSize);
  }

  /**
   * Logits for every position. With an attention mask (1 = real token, 0 = padding or a hole),
   * each row is computed on its real tokens only, which is what Hugging Face's BLOOM computes
   * (ALiBi positions = cumsum(mask) - 1); masked positions get zeros.
   */
  async forward(inputIds: number[][], attentionMask?: number[][], options: { signal?: AbortSignal } = {}): Promise<ForwardResult> {
    this.checkOpen();
    if (!Array.isArray(inputIds) || inputIds.length === 0) throw new BlossomError("input", "inputIds: expected a non-empty array of rows");
    const width = inputIds[0]?.length ?? 0;
    const rows = inputIds.map((row, b) => {
      const ids = this.checkIds(row, `inputIds[${b}]`);
      if (ids.length !== width) throw new BlossomError("input", `inputIds[${b}]: has ${ids.length} tokens, row 0 has ${width}; rows must be padded to one length`);
      return ids;
    });
    if (width === 0) throw new BlossomError("input", "inputIds: rows are empty");
    if (attentionMask !== undefined) {
      if (!Array.isArray(attentionMask) || attentionMask.length !== rows.length) {
        throw new BlossomError("input", `attentionMask: expected ${rows.length} rows like inputIds`);
      }
      attentionMask.forEach((m, b) => {
        if (!Array.isArray(m) || m.length !== width || m.some((v) => v !== 0 && v !== 1)) {
          throw new BlossomError("input", `attentionMask[${b}]: expected ${width} values, each 0 or 1`);
        }
      });
    }
    const keep = rows.map((row, b) => row.map((_, t) => (attentionMask ? attentionMask[b]![t] === 1 : true)));
    const compact = rows.map((row, b) => row.filter((_, t) => keep[b]![t]));
    const nonEmpty = compact.map((c, b) => [c, b] as const).filter(([c]) => c.length > 0);
    const signal = checkSignal(options?.signal, "forward");
    const logits = nonEmpty.length ? await this.client.forward(nonEmpty.map(([c]) => c), signal) : [];
    const V = this.config.vocabSize;
    const data = new Float32Array(rows.length * width * V);
    nonEmpty.forEach(([, b], i) => {
      const l = logits[i]!;
      let k = 0;
      for (let t = 0; t < width; t++) {
        if (!keep[b]![t]) continue;
        data.set(l.subarray(k * V, (k + 1) * V), (b * width + t) * V);
        k++;
      }
    });
    return { data, dims: [rows.length, width, V] };
  }

  private async promptIds(prompt: Prompt, index: number): Promise<number[]> {
    if (typeof prompt === "string" && hasLoneSurrogate(prompt)) {
      throw new BlossomError("input", `prompts[${index}]: must be well-formed text (it holds a lone UTF-16 surrogate, which is not a character)`);
    }
    const ids = typeof prompt === "string" ? await this.tokenizer.encode(prompt) : this.checkIds(prompt, `prompts[${index}]`);
    if (typeof prompt === "string") {
      const bad = ids.find((id) => id >= this.config.vocabSize);
      if (bad !== undefined) throw new BlossomError("checkpoint", `${this.tokenizer.file}: encodes prompts[${index}] to token id ${bad}, outside config.json's vocab_size ${this.config.vocabSize}`);
    }
    if (ids.length === 0) throw new BlossomError("input", `prompts[${index}]: the prompt is empty: BLOOM needs at least one token to condition on`);
    return ids;
  }

  /**
   * Generates a continuation for each prompt; prompts run together as one batch and each stops on
   * its own (eos, stop string, max_new_tokens). On abort, returns what was generated so far.
   */
  async generate(prompts: Prompt[], params: GenerationParamsInput = {}): Promise<GenerateResult> {
    this.checkOpen();
    if (!Array.isArray(prompts) || prompts.length === 0) throw new BlossomError("input", "prompts: expected a non-empty array of strings or token-id arrays");
    const { resolved, signal } = generationInput(params);
    const started = performance.now();
    // Every prompt is checked before any is submitted; if one is refused later anyway (the engine's
    // capacity), the others are cancelled rather than left running unseen.
    const ids = await Promise.all(prompts.map((p, i) => this.promptIds(p, i)));
    // Each prompt's run listens to the signal until it ends: more than Node's default 10 is expected here.
    if (signal && ids.length > 1) setMaxListeners(Math.max(getMaxListeners(signal), ids.length + 10), signal);
    const runs = ids.map((promptIds) => this.run(promptIds, resolved, signal));
    const results = await Promise.all(runs.map((r) => r.done)).catch((err: unknown) => {
      for (const r of runs) r.cancel();
      throw err;
    });
    return {
      texts: results.map((r) => r.text),
      tokenIds: results.map((r) => r.tokenIds),
      numGeneratedTokens: results.map((r) => r.tokenIds.length),
      finishReasons: results.map((r) => r.finishReason),
      timeToFirstToken: runs.map((r) => (r.firstTokenAt === undefined ? NaN : (r.firstTokenAt - started) / 1000)),
    };
  }

  /** Streams one prompt's continuation token by token. Breaking out of the loop cancels it. */
  async *stream(prompt: Prompt, params: GenerationParamsInput = {}): AsyncGenerator<StreamEvent, void, undefined> {
    this.checkOpen();
    const { resolved, signal } = generationInput(params);
    const run = this.run(await this.promptIds(prompt, 0), resolved, signal);
    try {
      for (;;) {
        const event = await run.nextEvent();
        if (!event) return;
        yield event;
        if (event.finishReason) return;
      }
    } finally {
      run.cancel();
      await run.done.catch(() => undefined);
    }
  }

  private run(promptIds: number[], params: GenerationParams, signal: AbortSignal | undefined): GenerationRun {
    return new GenerationRun(this.client, this.tokenizer, promptIds, params, this.eosTokenIds, signal);
  }

  /**
   * Token-level perplexity of `text`: exp of the mean next-token NLL over sliding windows of up to
   * `context`+1 tokens starting every `stride` tokens (each token but the first predicted once,
   * from at most `context` previous tokens; no BOS added).
   */
  async perplexity(text: string | number[], input: PerplexityOptions = {}): Promise<PerplexityResult> {
    this.checkOpen();
    const options = checkPerplexityOptions(input);
    const context = options.context ?? 1024;
    const stride = options.stride ?? context;
    if (!Number.isInteger(context) || context < 1) throw new BlossomError("parameter", `context: expected an integer >= 1, got ${describeValue(context)}`);
    if (!Number.isInteger(stride) || stride < 1 || stride > context) {
      throw new BlossomError("parameter", `stride: expected an integer from 1 to context (${context}), got ${describeValue(stride)}`);
    }
    const ids = typeof text === "string" ? await this.tokenizer.encode(text) : this.checkIds(text, "text");
    if (ids.length < 2) throw new BlossomError("input", `perplexity needs at least 2 tokens, the text has ${ids.length}`);
    // Windows start every `stride` tokens and hold up to context+1 tokens; each predicts the tokens
    // no earlier window predicted (as the Hugging Face perplexity guide and the fixtures do).
    const windows: { tokens: number[]; from: number }[] = [];
    let predictedUpTo = 1; // token 0 is never predicted
    for (let begin = 0; predictedUpTo < ids.length; begin += stride) {
      const end = Math.min(ids.length, begin + context + 1);
      windows.push({ tokens: ids.slice(begin, end), from: predictedUpTo - begin });
      predictedUpTo = end;
    }
    // Up to 8 windows a step, as many as one engine's KV cache holds at once.
    const { kvBlockSize } = this.client.latestStats() ?? (await this.client.stats());
    const engineBlocks = Math.floor(this.kvCacheTokensPerEngine / kvBlockSize);
    const longest = Math.max(...windows.map((w) => w.tokens.length));
    const perBatch = Math.min(8, Math.floor(engineBlocks / Math.ceil(longest / kvBlockSize)));
    if (perBatch < 1) {
      throw parameterError("context", `a window of ${longest} tokens (context + 1) does not fit the KV cache of ${engineBlocks * kvBlockSize} tokens: lower context or raise kvCacheTokens`);
    }
    let nll = 0, predicted = 0;
    for (let i = 0; i < windows.length; i += perBatch) {
      if (options.signal?.aborted) throw new BlossomError("aborted", "perplexity was aborted");
      const scores = await this.client.score(windows.slice(i, i + perBatch), options.signal).catch(abortedAs(options.signal, "perplexity"));
      for (const s of scores) for (const lp of s) {
        if (!Number.isFinite(lp)) {
          throw new BlossomError("internal", `perplexity: the model gave a ${Number.isNaN(lp) ? "NaN" : "non-finite"} log-probability at predicted token ${predicted} (its output is broken: look for NaN or infinite values in the checkpoint's weights)`);
        }
        nll -= lp;
        predicted++;
      }
    }
    const meanNll = nll / predicted;
    return { perplexity: Math.exp(meanNll), meanNll, tokens: ids.length, predicted };
  }

  /**
   * log p(ids[i] | ids[<i]) for every i from `from` (>= 1) on, teacher-forced in one step: the
   * prompt details of text-generation-inference and the conditional likelihood of the original
   * server's /forward/.
   */
  async tokenLogprobs(ids: number[], from = 1, options: { signal?: AbortSignal } = {}): Promise<number[]> {
    this.checkOpen();
    const signal = checkSignal(options?.signal, "tokenLogprobs");
    const tokens = this.checkIds(ids, "ids");
    if (!Number.isInteger(from) || from < 1 || from > tokens.length) {
      throw new BlossomError("parameter", `from: expected an integer from 1 to ids.length (${tokens.length}), got ${from}`);
    }
    if (from === tokens.length) return [];
    const [scores] = await this.client.score([{ tokens, from }], signal).catch(abortedAs(signal, "tokenLogprobs"));
    return Array.from(scores!);
  }

  /** Teacher-forced decoding with the KV cache: open a session, feed tokens, read logits. */
  async openSession(): Promise<Session> {
    this.checkOpen();
    return new Session(this.client, await this.client.openSession(), this.config.vocabSize);
  }

  /** Feeds several sessions in one batched step; returns each one's logits. */
  async feed(entries: { session: Session; tokens: number[]; logits?: "all" | "last" }[]): Promise<Float32Array[]> {
    this.checkOpen();
    if (!Array.isArray(entries)) throw parameterError("entries", `expected an array of { session, tokens, logits? } (got ${describeValue(entries)})`);
    const checked = entries.map((e, i) => checkFeedEntry(e, `entries[${i}]`, this.config.vocabSize));
    const seen = new Set<Session>();
    checked.forEach((e, i) => {
      // One step appends each sequence's tokens once; a session twice would write one cache position twice.
      if (seen.has(e.session)) throw parameterError(`entries[${i}].session`, "appears twice in one feed: give its tokens in one entry");
      seen.add(e.session);
    });
    return this.client.feed(checked.map((e) => ({ session: e.session.id, tokens: e.tokens, logits: e.logits })));
  }

  stats(): Promise<EngineStats> {
    return this.client.stats();
  }

  /**
   * The engine's figures as it last reported them, at once: while it works they are pushed when its
   * queue or batch changes and every 100 ms (between steps: a step computing for seconds delays them,
   * never the caller), and when it goes idle. Undefined before the first report.
   */
  latestStats(): EngineStats | undefined {
    return this.client.latestStats();
  }

  /** KV-cache capacity of one engine (a replica's with strategy replicas): the most one sequence can hold. */
  get kvCacheTokensPerEngine(): number {
    return Math.floor(this.info.kvCacheTokens / (this.info.replicas ?? 1));
  }

  /** Whether the engine worker (a replica's, at least) still runs: false once it has died or the model was disposed. */
  get alive(): boolean {
    return !this.disposed && this.client.alive;
  }

  async dispose(): Promise<void> {
    if (this.disposed) return;
    this.disposed = true;
    await this.client.dispose();
  }
}

export class Session {
  constructor(
    private readonly client: EngineHandle,
    readonly id: number,
    readonly vocabSize: number,
  ) {}
  /** Appends tokens to the cached sequence; returns logits (tokens x vocab, or 1 x vocab for "last"). */
  async append(tokens: number[], logits: "all" | "last" = "all"): Promise<Float32Array> {
    const ids = checkTokenIds(tokens, "tokens", this.vocabSize);
    const [l] = await this.client.feed([{ session: this.id, tokens: ids, logits: checkLogitsWanted(logits, "logits") }]);
    return l!;
  }
  async close(): Promise<void> {
    await this.client.closeSession(this.id);
  }
}

/** One sequence's generation as seen from the main thread: tokens in, text out. */
class GenerationRun {
  readonly done: Promise<{ text: string; tokenIds: number[]; finishReason: FinishReason | "cancelled" }>;
  private readonly tokenIds: number[] = [];
  private text = "";
  private readonly decoder: IncrementalDecoder;
  private readonly stops: StopStringMatcher;
  private readonly events: StreamEvent[] = [];
  private waiter: (() => void) | undefined;
  private finished = false;
  private cancelFn: (() => void) | undefined;
  private cancelRequested = false;
  /** performance.now() when the first token arrived. */
  firstTokenAt: number | undefined;

  constructor(
    client: EngineHandle,
    tokenizer: BloomTokenizer,
    promptIds: number[],
    params: GenerationParams,
    eosTokenIds: number[],
    signal: AbortSignal | undefined,
  ) {
    this.decoder = new IncrementalDecoder((ids) => tokenizer.decode(ids));
    this.stops = new StopStringMatcher(params.stop);
    this.done = new Promise((resolve, reject) => {
      const onAbort = () => this.cancel();
      const end = (reason: FinishReason | "cancelled", event: StreamEvent | undefined) => {
        this.finished = true;
        signal?.removeEventListener("abort", onAbort);
        if (event) this.events.push(event);
        this.wakeUp();
        resolve({ text: this.text, tokenIds: this.tokenIds, finishReason: reason });
      };
      /** Text still held back (partial characters, possible stop-string prefixes), released at the end. */
      const tail = () => {
        const { emit } = this.stops.push(this.decoder.flush());
        return emit + this.stops.flush();
      };
      const onToken = (u: TokenUpdate) => {
        if (this.finished) return;
        this.firstTokenAt ??= performance.now();
        this.tokenIds.push(u.token);
        const own = this.decoder.push(u.token);
        const { emit, stopped } = this.stops.push(own);
        let text = emit;
        const token = { id: u.token, logprob: u.logprob, special: tokenizer.specialTokenIds.has(u.token), text: own };
        const reason: FinishReason | undefined = stopped ? "stop_sequence" : u.finish;
        if (reason && !stopped) text += tail();
        this.text += text;
        if (stopped) this.cancel();
        if (reason) end(reason, { token, text, finishReason: reason });
        else {
          this.events.push({ token, text });
          this.wakeUp();
        }
      };
      const onEnded = (reason: FinishReason | "cancelled", error?: BlossomError) => {
        if (this.finished) return;
        if (error) {
          // The engine failed (its worker died, or this sequence's token choice failed): the caller
          // gets the tokens streamed so far, then the error, never a run that looks cancelled by it.
          const text = this.tokenIds.length > 0 ? tail() : "";
          if (text) this.events.push({ text });
          this.finished = true;
          signal?.removeEventListener("abort", onAbort);
          reject(error);
          this.wakeUp();
          return;
        }
        const text = tail();
        this.text += text;
        end(reason, { text, finishReason: reason });
      };
      if (signal?.aborted) {
        // Aborted before it began: nothing is submitted.
        end("cancelled", { text: "", finishReason: "cancelled" });
        return;
      }
      client.submit(promptIds, params, eosTokenIds, { onToken, onEnded }).then(
        (cancel) => {
          this.cancelFn = cancel;
          if (this.cancelRequested) cancel();
        },
        (err: unknown) => {
          this.finished = true;
          reject(err);
          this.wakeUp();
        },
      );
      signal?.addEventListener("abort", onAbort, { once: true });
    });
  }

  private wakeUp(): void {
    const w = this.waiter;
    this.waiter = undefined;
    w?.();
  }

  /** The next stream event; undefined once the run has ended and every event was delivered. */
  async nextEvent(): Promise<StreamEvent | undefined> {
    for (;;) {
      const e = this.events.shift();
      if (e) return e;
      if (this.finished) {
        await this.done;
        return undefined;
      }
      await new Promise<void>((resolve) => (this.waiter = resolve));
    }
  }

  cancel(): void {
    if (this.cancelRequested) return;
    this.cancelRequested = true;
    this.cancelFn?.();
  }
}

/** Resolves a model reference (a folder, or a Hub id org/name[@revision]) to a local folder, downloading if needed. */
export async function resolveModelDir(ref: string, options: { signal?: AbortSignal; progress?: boolean } = {}): Promise<string> {
  if (typeof ref !== "string" || ref.length === 0) throw new BlossomError("input", "model: expected a folder or a Hub id org/name[@revision]");
  return (await resolveModel(ref, options)).dir;
}

/**
 * Loads a BLOOM checkpoint from a folder or the Hugging Face Hub (org/name[@revision], into the
 * standard HF cache) and starts its engine worker.
 */
export async function loadModel(ref: string, options: LoadModelOptions = {}): Promise<Model> {
  return Model.load(await resolveModelDir(ref, { progress: process.stderr.isTTY === true }), options);
}
