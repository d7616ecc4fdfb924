/**
 * `create-random`: a BLOOM checkpoint with real dimensions and random weights, in exact Hugging Face
 * layout (config.json, generation_config.json, tokenizer files, model.safetensors or shards plus
 * index). Benchmarks, the demo and hardware sizing use it instead of a multi-gigabyte download.
 *
 * Weights are generated in chunks on worker threads and streamed to disk in file order, so memory
 * stays at a few chunks whatever the model size. A seed fixes every byte of the output.
 */
import { availableParallelism } from "node:os";
import { readdir, rm, stat, writeFile } from "node:fs/promises";
import { join, resolve } from "node:path";
import { Worker } from "node:worker_threads";
import { BlossomError, parameterError } from "../errors.js";
import { beginOutput, isInsidePartial, type OutputFolder } from "../folders.js";
import { writeSyntheticTokenizer } from "../tokenizer/synthetic.js";
import { bloomTensorShapes, configJsonText, getPreset, presetConfig, type CheckpointDType } from "./presets.js";
import { RANDOM_BLOCK_ELEMENTS, randomTensorBytes, type RandomDType, type RandomInit } from "./random-weights.js";
import type { RandomJob, RandomJobResult } from "./random-worker.js";
import {
  DEFAULT_MAX_SHARD_BYTES,
  planSafetensors,
  planShards,
  tensorElementCount,
  writeShardedCheckpoint,
  type TensorSource,
  type TensorSpec,
} from "./safetensors-writer.js";

export interface CreateRandomOptions {
  preset: string;
  dtype: CheckpointDType;
  out: string;
  /** Fixes every byte of the output; default 0. */
  seed?: number;
  onProgress?: (doneBytes: number, totalBytes: number) => void;
  /** Worker threads generating weights; default: one per core (max 4), none for small models. */
  threads?: number;
  /** Shard size limit; default 2 GiB. */
  maxShardBytes?: number;
  signal?: AbortSignal;
}

export interface CreateRandomResult {
  dir: string;
  /** Bytes of every file written (weights, headers, JSON). */
  bytes: number;
  seconds: number;
}

/** Marks a directory as create-random output, listing its files so a rerun can replace exactly them. */
export const RANDOM_CHECKPOINT_MARKER = ".blossom-random.json";

const SAFETENSORS_DTYPES: Record<CheckpointDType, RandomDType> = { bf16: "BF16", fp16: "F16", fp32: "F32" };

/** Values per generation job: a multiple of the generator's block, a few MB of output. */
const CHUNK_ELEMENTS = 16 * RANDOM_BLOCK_ELEMENTS;

/** Below this many parameters, starting workers costs more than it saves. */
const WORKER_THRESHOLD = 8 * CHUNK_ELEMENTS;

/**
 * BLOOM's init (initializer_range 0.02) so activations stay in range over many layers: weights and
 * biases N(0, 0.02); layer-norm gains 1 + N(0, 0.02). Biases and gains are not the usual 0 and 1,
 * so a loader that drops a bias or a gain gives visibly different logits.
 */
export function randomInitFor(name: string): RandomInit {
  const isNormGain = /(^|\.)(word_embeddings_layernorm|input_layernorm|post_attention_layernorm|ln_f)\.weight$/.test(name);
  return isNormGain ? { mean: 1, std: 0.02 } : { mean: 0, std: 0.02 };
}

const SMALL_FILES = {
  "generation_config.json": `{\n  "_from_model_config": true,\n  "bos_token_id": 1,\n  "eos_token_id": 2,\n  "pad_token_id": 3\n}\n`,
  "tokenizer_config.json": `{\n  "add_prefix_space": false,\n  "bos_token": "<s>",\n  "eos_token": "</s>",\n  "pad_token": "<pad>",\n  "unk_token": "<unk>",\n  "padding_side": "left",\n  "clean_up_tokenization_spaces": false,\n  "tokenizer_class": "BloomTokenizerFast"\n}\n`,
  "special_tokens_map.json": `{\n  "bos_token": "<s>",\n  "eos_token": "</s>",\n  "unk_token": "<unk>",\n  "pad_token": "<pad>"\n}\n`,
};

export async function createRandomCheckpoint(options: CreateRandomOptions): Promise<CreateRandomResult> {
  const started = performance.now();
  const preset = getPreset(options.preset);
  const dtype = options.dtype;
  if (!Object.hasOwn(SAFETENSORS_DTYPES, dtype)) throw parameterError("dtype", `expected bf16, fp16 or fp32, got ${JSON.stringify(dtype)}`);
  const seed = options.seed ?? 0;
  if (!Number.isSafeInteger(seed) || seed < 0 || seed > 0xffffffff) {
    throw parameterError("seed", `must be an integer from 0 to 4294967295, got ${seed}`);
  }
  if (typeof options.out !== "string" || options.out.length === 0) throw parameterError("out", "an output directory is required");
  if (options.threads !== undefined && !(Number.isInteger(options.threads) && options.threads >= 0)) {
    throw parameterError("threads", `must be a non-negative integer, got ${options.threads}`);
  }
  const dir = resolve(options.out);

  const storageDType = SAFETENSORS_DTYPES[dtype];
  const specs: TensorSpec[] = bloomTensorShapes(preset).map(({ name, shape }) => ({ name, dtype: storageDType, shape }));
  const maxShardBytes = options.maxShardBytes ?? DEFAULT_MAX_SHARD_BYTES;
  const plan = planShards(specs, { maxShardBytes });
  const indexFile = plan.files.length > 1 ? ["model.safetensors.index.json"] : [];
  const files = ["config.json", ...plan.files, ...indexFile, "tokenizer.json", ...Object.keys(SMALL_FILES)];

  await checkOutputDirectory(dir);
  // Everything is written into a folder of this process's own, then put in place: an interrupted
  // run leaves `dir` as it was (its partial folder is removed by the next run into the same --out),
  // and two processes creating the same checkpoint never write into each other's files.
  const output = beginOutput(dir);
  try {
    await writeInto(output.work);
  } catch (err) {
    output.abort();
    throw err;
  }
  let bytes = 0;
  try {
    for (const file of files) bytes += (await stat(join(output.work, file))).size;
    await putInPlace(output, files);
  } catch (err) {
    output.abort();
    throw err;
  }
  return { dir, bytes, seconds: (performance.now() - started) / 1000 };

  async function writeInto(dir: string): Promise<void> {
    // The marker lets a later create-random replace this folder (and nothing else).
    await writeFile(
      join(dir, RANDOM_CHECKPOINT_MARKER),
      JSON.stringify({ generator: "blossom create-random", preset: preset.name, dtype, seed, files }, null, 2) + "\n",
    );

    const totalElements = specs.reduce((sum, spec) => sum + tensorElementCount(spec.shape), 0);
    const threads = options.threads ?? (totalElements < WORKER_THRESHOLD ? 0 : Math.min(4, availableParallelism()));
    // Tensors are requested in file order: shard by shard, each sorted as the writer lays it out.
    const writeOrder = plan.shards.flatMap((shard) => planSafetensors(shard).order);
    const generator = new ChunkScheduler(writeOrder, storageDType, seed, threads, options.signal);
    try {
      const sources: TensorSource[] = specs.map((spec) => ({ ...spec, data: () => generator.chunks(spec.name) }));
      await writeShardedCheckpoint(dir, sources, { maxShardBytes, onProgress: options.onProgress, signal: options.signal });
    } finally {
      await generator.close();
    }

    await writeFile(join(dir, "config.json"), configJsonText(presetConfig(preset.name, dtype)));
    await writeSyntheticTokenizer(join(dir, "tokenizer.json"), { vocabSize: preset.vocabSize });
    for (const [name, text] of Object.entries(SMALL_FILES)) await writeFile(join(dir, name), text);
  }
}

/** Empty, new, or an earlier create-random output (replaced at the end): fine. Anything else: refused. */
async function checkOutputDirectory(dir: string): Promise<void> {
  let entries: string[];
  try {
    const info = await stat(dir);
    if (!info.isDirectory()) throw parameterError("out", `${dir} exists and is not a directory`);
    entries = await readdir(dir);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== "ENOENT") throw err;
    return;
  }
  if (entries.some((name) => !isInsidePartial(name)) && !entries.includes(RANDOM_CHECKPOINT_MARKER)) {
    throw parameterError(
      "out",
      `${dir} is not empty and is not a create-random output (it has no ${RANDOM_CHECKPOINT_MARKER}); choose a new or empty directory`,
    );
  }
}

/**
 * Puts the finished files at the target: all at once into a missing or empty one; over an earlier
 * create-random output file by file (each rename replaces one file whole), then that output's stale
 * files (shards of another layout) removed — a user's own files are never moved or touched.
 */
async function putInPlace(output: OutputFolder, files: string[]): Promise<void> {
  const ours = /^(config\.json|generation_config\.json|tokenizer\.json|tokenizer_config\.json|special_tokens_map\.json|model(-\d{5}-of-\d{5})?\.safetensors(\.partial)?|model\.safetensors\.index\.json)$/;
  const fresh = new Set([...files, RANDOM_CHECKPOINT_MARKER]);
  const placed = await output.place({
    // Only over an earlier create-random output (checked again under the lock: something else may
    // have filled the folder while this run worked).
    accept: (others) => others.includes(RANDOM_CHECKPOINT_MARKER),
    merge: async (target) => {
      for (const entry of await readdir(target)) {
        if (ours.test(entry) && !fresh.has(entry)) await rm(join(target, entry), { force: true });
      }
    },
  });
  if (!placed) {
    throw parameterError("out", `${output.target} was filled by something other than create-random while this run worked; choose a new or empty directory`);
  }
}

interface ChunkJob {
  name: string;
  firstElement: number;
  count: number;
}

/**
 * Generates chunks in the order the writer will ask for them, keeping a window of jobs in flight
 * across tensor boundaries so workers never idle while the main thread writes. If a tensor is
 * requested out of the planned order, the window is dropped and restarts there (still correct).
 */
class ChunkScheduler {
  private readonly jobs: ChunkJob[] = [];
  private readonly firstJob = new Map<string, number>();
  private readonly inits = new Map<string, RandomInit>();
  private readonly pool: WorkerPool | undefined;
  private readonly window: number;
  private cursor = 0; // next job to issue
  private head = 0; // next job to hand out
  private inFlight: Array<Promise<Uint8Array>> = [];

  constructor(
    order: readonly TensorSpec[],
    private readonly dtype: RandomDType,
    private readonly seed: number,
    threads: number,
    private readonly signal?: AbortSignal,
  ) {
    for (const spec of order) {
      const elements = tensorElementCount(spec.shape);
      this.firstJob.set(spec.name, this.jobs.length);
      this.inits.set(spec.name, randomInitFor(spec.name));
      for (let first = 0; first < elements; first += CHUNK_ELEMENTS) {
        this.jobs.push({ name: spec.name, firstElement: first, count: Math.min(CHUNK_ELEMENTS, elements - first) });
      }
    }
    this.pool = threads > 0 ? new WorkerPool(threads) : undefined;
    this.window = threads > 0 ? 3 * threads : 1;
  }

  async *chunks(name: string): AsyncGenerator<Uint8Array> {
    const start = this.firstJob.get(name);
    if (start === undefined) throw new BlossomError("internal", `no random tensor named ${name}`);
    if (this.head !== start) {
      // Out of plan: drop the window (results are discarded, not reordered) and restart here.
      this.inFlight = [];
      this.head = this.cursor = start;
    }
    while (this.head < this.jobs.length && this.jobs[this.head].name === name) {
      if (this.signal?.aborted) throw new BlossomError("aborted", "create-random was aborted", { cause: this.signal.reason });
      this.fill();
      const bytes = await this.inFlight.shift()!;
      this.head++;
      yield bytes;
    }
  }

  private fill(): void {
    while (this.cursor < this.jobs.length && this.inFlight.length < this.window) {
      const job = this.jobs[this.cursor++];
      const init = this.inits.get(job.name)!;
      const bytes = this.pool
        ? this.pool.run({ id: 0, dtype: this.dtype, seed: this.seed, name: job.name, firstElement: job.firstElement, count: job.count, init })
        : Promise.resolve(randomTensorBytes(this.dtype, this.seed, job.name, job.firstElement, job.count, init));
      // Marked handled now: if the write fails, chunks still in flight must not crash the process
      // as unhandled rejections. Awaiting `bytes` later still throws.
      bytes.catch(() => undefined);
      this.inFlight.push(bytes);
    }
  }

  async close(): Promise<void> {
    this.inFlight = [];
    await this.pool?.close();
  }
}

class WorkerPool {
  private readonly workers: Worker[] = [];
  private readonly busy: number[] = [];
  private readonly pending = new Map<number, { worker: number; resolve: (bytes: Uint8Array) => void; reject: (err: Error) => void }>();
  private nextId = 1;

  constructor(threads: number) {
    for (let i = 0; i < threads; i++) {
      const worker = new Worker(new URL("./random-worker.js", import.meta.url));
      worker.on("message", (result: RandomJobResult) => this.settle(result));
      worker.on("error", (err) => this.failAll(err));
      // A worker that dies without an error event must not leave its jobs pending forever.
      worker.on("exit", (code) => this.failAll(new Error(`worker exited with code ${code}`)));
      this.workers.push(worker);
      this.busy.push(0);
    }
  }

  run(job: RandomJob): Promise<Uint8Array> {
    let chosen = 0;
    for (let i = 1; i < this.workers.length; i++) if (this.busy[i] < this.busy[chosen]) chosen = i;
    const id = this.nextId++;
    this.busy[chosen]++;
    return new Promise((resolvePromise, reject) => {
      this.pending.set(id, { worker: chosen, resolve: resolvePromise, reject });
      this.workers[chosen].postMessage({ ...job, id } satisfies RandomJob);
    });
  }

  private settle(result: RandomJobResult): void {
    const entry = this.pending.get(result.id);
    if (!entry) return;
    this.pending.delete(result.id);
    this.busy[entry.worker]--;
    if (result.bytes) entry.resolve(result.bytes);
    else entry.reject(new BlossomError("internal", `random weight worker failed: ${result.error ?? "no result"}`));
  }

  private failAll(err: Error): void {
    for (const [id, entry] of this.pending) {
      this.pending.delete(id);
      entry.reject(new BlossomError("internal", `random weight worker failed: ${err.message}`, { cause: err }));
    }
  }

  async close(): Promise<void> {
    await Promise.all(this.workers.map((worker) => worker.terminate()));
  }
}
