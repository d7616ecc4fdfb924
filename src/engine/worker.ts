/**
 * The engine worker thread: owns the model, the KV cache and the scheduler; answers the protocol
 * in src/engine/protocol.ts. Heavy compute never runs on the main event loop.
 *
 * Loop: handle one queued request, or run one scheduler step, then yield to the event loop so new
 * messages (submit, cancel) land between steps.
 */
import { writeSync } from "node:fs";
import { parentPort, workerData } from "node:worker_threads";
import { native } from "../backend/native.js";
import { BlossomError } from "../errors.js";
import { TokenChooser } from "../generate/chooser.js";
import { finishReasonAfter } from "../generate/stopping.js";
import type { Sequence } from "./engine.js";
import { kvBytesPerToken } from "./kv-cache.js";
import { loadEngine, type LoadedEngine } from "./load.js";
import { statsIntervalMs, type EngineInfo, type EngineStats, type Request, type Response, type SerializedError, type WorkerData } from "./protocol.js";
import { Scheduler } from "./scheduler.js";
import { ChunkedJob, isJobRequest, type JobRequest } from "./jobs.js";
import { followSteps } from "../parallel/tensor.js";

const port = parentPort!;
const data = workerData as WorkerData;

function send(message: Response, transfer: ArrayBuffer[] = []): void {
  port.postMessage(message, transfer);
}

export function serializeError(err: unknown): SerializedError {
  if (err instanceof BlossomError) return { code: err.code, message: err.message };
  const e = err as Error;
  return { code: "internal", message: e?.stack ?? String(err) };
}

class Worker {
  private readonly queue: Request[] = [];
  /** forward / score requests waiting for KV blocks that running generations hold or have been promised. */
  private readonly deferred: JobRequest[] = [];
  private readonly sessions = new Map<number, Sequence>();
  /**
   * The forwards / scores being fed in chunks, a generation step between chunks; they take turns a
   * chunk at a time, so a short one started beside a long one is not held until the long one ends.
   */
  private readonly actives: ChunkedJob[] = [];
  /** Which of them feeds the next chunk. */
  private nextJob = 0;
  /** While a job runs and prompts wait to be fed, turns alternate between the two. */
  private jobTurn = true;
  private nextSession = 1;
  private readonly scheduler: Scheduler;
  private wake: (() => void) | undefined;
  /** Most prompt tokens one step feeds, for generations and jobs alike. */
  private readonly prefillBudget = data.maxBatchPrefillTokens ?? 4096;
  private disposed = false;
  private jobChunks = 0;

  constructor(private readonly loaded: LoadedEngine) {
    const kv = loaded.engine.kvCache;
    this.scheduler = new Scheduler(
      loaded.engine,
      {
        maxBatchSize: data.maxBatchSize ?? 1024,
        maxBatchTotalTokens: data.maxBatchTotalTokens ?? kv.capacityTokens,
        maxPrefillTokens: this.prefillBudget,
      },
      (logits, rows, stride, vocab, mask, maskRows) => {
        const ids = new Int32Array(rows), logprobs = new Float64Array(rows);
        native().greedyRows(logits, rows, stride, vocab, mask, maskRows, ids, logprobs);
        return { ids, logprobs };
      },
    );
    port.on("message", (m: Request) => {
      if (m.type === "cancel") {
        this.cancel(m.id);
        // What it dropped (a job's blocks, a waiting sequence) changes the figures: pushed at idle too.
        this.worked = true;
      } else this.queue.push(m);
      this.wake?.();
    });
  }

  info(): EngineInfo {
    const { checkpoint, weights, engine, dtype, loadSeconds } = this.loaded;
    const c = checkpoint.config;
    return {
      dir: checkpoint.dir,
      modelType: c.modelType,
      dtype,
      storedDtypes: [...new Set([...checkpoint.tensors.values()].map((t) => t.dtype))],
      threads: native().getThreads(),
      kernels: native().getKernelVariant(),
      vocabSize: c.vocabSize,
      hiddenSize: c.hiddenSize,
      numLayers: c.numLayers,
      numHeads: c.numHeads,
      weightBytes: weights.weightBytes,
      kvCacheTokens: engine.kvCache.capacityTokens,
      kvDtype: engine.kvCache.shape.dtype,
      kvBytesPerToken: kvBytesPerToken(c, engine.kvCache.shape.dtype),
      loadSeconds,
      ...(this.loaded.mappedWeights ? { mappedWeights: this.loaded.mappedWeights } : {}),
      ...(this.loaded.comm ? { tensorParallel: { rank: this.loaded.comm.rank, size: this.loaded.comm.size } } : {}),
    };
  }

  /** Whether work was done since the figures were last pushed, and when they were. */
  private worked = true;
  private statsPushedAt = 0;
  /** Sequences waiting and running at the last push: a change is pushed at once (queue and batch gauges). */
  private pushedCounts = "";

  private counts(): string {
    return `${this.scheduler.waitingCount}/${this.scheduler.runningCount}`;
  }

  /** Sends the figures to the main thread unasked (EngineHandle.latestStats: /metrics must not wait for a step). */
  private pushStats(): void {
    send({ type: "stats", stats: this.stats() });
    this.statsPushedAt = performance.now();
    this.worked = false;
    this.pushedCounts = this.counts();
  }

  stats(): EngineStats {
    const kv = this.loaded.engine.kvCache;
    return {
      waiting: this.scheduler.waitingCount,
      running: this.scheduler.runningCount,
      kvBlocksFree: kv.freeBlockCount,
      kvBlocksTotal: kv.numBlocks,
      kvBlockSize: kv.blockSize,
      steps: this.scheduler.steps,
      jobChunks: this.jobChunks,
      generatedTokens: this.scheduler.generatedTokens,
      residentBytes: native().residentBytes(),
      ...(this.loaded.weights.offloadStats ? { offload: this.loaded.weights.offloadStats() } : {}),
    };
  }

  private cancel(id: number): void {
    const where = this.scheduler.cancel(id);
    if (where === "waiting") send({ type: "ended", id, finish: "cancelled" });
    // A running one retires at the next step and is reported then.
    // A forward or score: dropped wherever it is, queued, waiting for room, or between two chunks
    // (its sequences and their blocks freed; the caller has stopped waiting for it).
    const aborted = (type: string) => send({ type: "error", id, error: serializeError(new BlossomError("aborted", `${type} was aborted`)) });
    const queued = this.queue.findIndex((r) => r.id === id && isJobRequest(r));
    if (queued >= 0) return aborted(this.queue.splice(queued, 1)[0]!.type);
    const deferred = this.deferred.findIndex((r) => r.id === id);
    if (deferred >= 0) {
      const [request] = this.deferred.splice(deferred, 1);
      this.updateHold();
      return aborted(request!.type);
    }
    const active = this.actives.findIndex((j) => j.request.id === id);
    if (active >= 0) {
      const [job] = this.actives.splice(active, 1);
      if (active < this.nextJob) this.nextJob--;
      job!.release();
      this.updateHold();
      aborted(job!.request.type);
    }
  }

  /**
   * Blocks a forward or score (fresh sequences) needs.
   * Such a step runs only on blocks no running generation is owed; otherwise it waits its turn.
   */
  private freshBlocks(request: JobRequest): number {
    const kv = this.loaded.engine.kvCache;
    if (request.type === "forward") return request.sequences.reduce((a, tokens) => a + kv.blocksFor(tokens.length), 0);
    return request.sequences.reduce((a, s) => a + kv.blocksFor(s.tokens.length), 0);
  }

  /** Blocks free and promised to no running generation. */
  private unpromisedBlocks(): number {
    return this.loaded.engine.kvCache.freeBlockCount - this.scheduler.reservedTotal();
  }

  /** Blocks the jobs being fed will still take. */
  private jobsRemainingBlocks(): number {
    return this.actives.reduce((a, j) => a + j.remainingBlocks(), 0);
  }

  /** Blocks a new job may take: free, promised to no running generation, and not still to be taken by a job in progress. */
  private roomForJobs(): number {
    return this.unpromisedBlocks() - this.jobsRemainingBlocks();
  }

  /** Runs the oldest deferred request if it fits now; if nothing will ever free room for it, says so. Returns whether it acted. */
  private runDeferred(): boolean {
    const head = this.deferred[0];
    if (!head) return false;
    const need = this.freshBlocks(head);
    if (need > this.roomForJobs()) {
      // Running generations will free their blocks. (Reached with no job in progress: while there
      // is one, the loop starts a deferred head when it fits and otherwise waits for the jobs.)
      if (this.scheduler.runningCount > 0) return false;
      // Only open sessions hold the rest: waiting would be forever.
      this.deferred.shift();
      const kv = this.loaded.engine.kvCache;
      send({
        type: "error",
        id: head.id,
        error: serializeError(
          new BlossomError("memory", `the KV cache has ${kv.freeBlockCount} free blocks of ${kv.blockSize} tokens and this ${head.type} needs ${need}: open sessions hold the rest (close some)`),
        ),
      });
    } else {
      this.deferred.shift();
      this.startJob(head);
    }
    this.updateHold();
    return true;
  }

  /**
   * Blocks admission keeps back: what the chunked job still has to take, and the deferred head's
   * need (so a stream of new requests cannot keep it waiting forever).
   */
  private updateHold(): void {
    const head = this.deferred[0];
    this.scheduler.holdBlocks = this.jobsRemainingBlocks() + (head ? this.freshBlocks(head) : 0);
  }

  /** Starts a forward / score (checked whole before anything is fed); its chunks run from the loop. */
  private startJob(request: JobRequest): void {
    try {
      this.actives.push(new ChunkedJob(this.loaded.engine, request));
      this.updateHold();
    } catch (err) {
      send({ type: "error", id: request.id, error: serializeError(err) });
    }
  }

  /** Feeds the next job's next chunk (they take turns); replies when it is done or fails. */
  private advanceJob(): void {
    if (this.nextJob >= this.actives.length) this.nextJob = 0;
    const index = this.nextJob;
    const job = this.actives[index]!;
    this.nextJob = index + 1;
    try {
      this.jobChunks++;
      job.advance(this.prefillBudget);
      if (!job.done) return this.updateHold();
      const result = job.result();
      send({ type: "reply", id: job.request.id, result }, collectTransfers(result));
    } catch (err) {
      send({ type: "error", id: job.request.id, error: serializeError(err) });
    }
    job.release();
    this.actives.splice(index, 1);
    this.nextJob = index;
    this.updateHold();
  }

  async run(): Promise<void> {
    while (!this.disposed) {
      const request = this.queue.shift();
      if (request) {
        const need = isJobRequest(request) ? this.freshBlocks(request) : 0;
        if (!isJobRequest(request)) {
          this.handle(request);
        } else if (need > this.loaded.engine.kvCache.numBlocks) {
          // One that could never fit is refused at once, not queued.
          const kv = this.loaded.engine.kvCache;
          send({ type: "error", id: request.id, error: serializeError(new BlossomError("memory", `this ${request.type} needs ${need} blocks of ${kv.blockSize} tokens; the KV cache has ${kv.numBlocks} (capacity ${kv.capacityTokens} tokens)`)) });
        } else if (this.deferred.length > 0 || need > this.roomForJobs()) {
          // Wait for room and for the job before it, in order; admission keeps the head's blocks back meanwhile.
          this.deferred.push(request);
          this.updateHold();
        } else {
          this.startJob(request);
        }
      } else if (this.actives.length > 0 && this.deferred.length > 0 && this.freshBlocks(this.deferred[0]!) <= this.roomForJobs()) {
        // A deferred one that fits now joins those in progress (it need not wait for them to end).
        this.startJob(this.deferred.shift()!);
        this.updateHold();
      } else if (this.actives.length > 0 && (this.jobTurn || !this.scheduler.prefilling())) {
        // A chunk of the job, then the running generations' decode step: neither waits for the
        // other's end. Prompts waiting to be fed take the next turn, so no turn feeds more than
        // one budget of prompt tokens.
        this.jobTurn = false;
        this.advanceJob();
        if (this.scheduler.hasWork()) this.generationStep(0);
      } else if (this.actives.length > 0) {
        this.jobTurn = true;
        this.generationStep();
      } else if (this.runDeferred()) {
        // ran (or refused) a request that was waiting for room
      } else if (this.scheduler.hasWork()) {
        this.generationStep();
      } else {
        // Idle: the figures as they stay until the next request.
        if (this.worked) this.pushStats();
        await new Promise<void>((resolve) => (this.wake = resolve));
        this.wake = undefined;
        continue;
      }
      this.worked = true;
      // Every 100 ms, and when the queue or batch changed (at most every 5 ms: with many short
      // requests the counts change at every submit).
      const since = performance.now() - this.statsPushedAt;
      if (since >= statsIntervalMs || (since >= 5 && this.counts() !== this.pushedCounts)) this.pushStats();
      // Let messages in between units of work.
      await new Promise<void>((resolve) => setImmediate(resolve));
    }
  }

  /** One scheduler step; `prefillBudget` caps the prompt tokens it feeds (default: the scheduler's). */
  private generationStep(prefillBudget?: number): void {
    try {
      const { updates, retiredCancelled, failed } = this.scheduler.step(prefillBudget);
      if (updates.length) send({ type: "step", updates });
      for (const id of retiredCancelled) send({ type: "ended", id, finish: "cancelled" });
      for (const { id, error } of failed) send({ type: "ended", id, finish: "cancelled", error: serializeError(error) });
    } catch (err) {
      // Followers may be inside a collective this rank abandoned: end the job rather than hang.
      if (this.loaded.comm && !(err instanceof BlossomError && err.code !== "internal")) abortJob(err);
      // A failed step fails every sequence in it; the worker keeps serving.
      const error = serializeError(err);
      for (const id of this.scheduler.clear()) send({ type: "ended", id, finish: "cancelled", error });
    }
  }

  private handle(request: Exclude<Request, JobRequest>): void {
    try {
      const result = this.execute(request);
      if (result instanceof Promise) throw new Error("unexpected async result");
      const transfer = collectTransfers(result);
      send({ type: "reply", id: request.id, result }, transfer);
    } catch (err) {
      send({ type: "error", id: request.id, error: serializeError(err) });
    }
  }

  private execute(request: Exclude<Request, JobRequest>): unknown {
    const { engine } = this.loaded;
    switch (request.type) {
      case "feed": {
        const entries = request.entries.map((e) => {
          const sequence = this.sessions.get(e.session);
          if (!sequence) throw new BlossomError("input", `feed: no open session ${e.session}`);
          return { sequence, tokens: e.tokens, logits: e.logits };
        });
        // A session keeps what it takes: never the blocks running generations were promised, nor
        // those the forward or score being fed in chunks will still take.
        const need = engine.blocksNeeded(entries);
        const running = this.scheduler.reservedTotal(), job = this.jobsRemainingBlocks();
        const free = engine.kvCache.freeBlockCount;
        if (need <= free && need > free - running - job) {
          const owed = job > 0 ? `${running} of them are promised to running generations and ${job} to ${this.actives.length === 1 ? `a ${this.actives[0]!.request.type}` : `${this.actives.length} forwards / scores`} in progress` : `${running} of them are promised to running generations`;
          throw new BlossomError("memory", `feed: needs ${need} blocks of ${engine.kvCache.blockSize} tokens; ${free} are free but ${owed} (retry when they finish, or close sessions)`);
        }
        return engine.step(entries).map((l) => l.slice());
      }
      case "open": {
        const id = this.nextSession++;
        this.sessions.set(id, engine.createSequence());
        return id;
      }
      case "close": {
        const s = this.sessions.get(request.session);
        if (s) engine.freeSequence(s);
        this.sessions.delete(request.session);
        return true;
      }
      case "submit": {
        const { params, eosTokenIds } = request;
        this.scheduler.submit({
          id: request.id,
          promptIds: request.promptIds,
          maxNewTokens: params.maxNewTokens,
          chooser: new TokenChooser(params, { vocabSize: this.loaded.model.config.vocabSize, eosTokenIds }),
          finishAfter: (tokenId, numGenerated) => finishReasonAfter(tokenId, numGenerated, params, eosTokenIds),
        });
        return true;
      }
      case "stats":
        return this.stats();
      case "dispose": {
        this.disposed = true;
        for (const id of this.scheduler.clear()) send({ type: "ended", id, finish: "cancelled" });
        for (const r of [...this.actives.splice(0).map((j) => j.request), ...this.deferred.splice(0)]) {
          send({ type: "error", id: r.id, error: serializeError(new BlossomError("aborted", "the model was disposed")) });
        }
        for (const s of this.sessions.values()) engine.freeSequence(s);
        this.loaded.comm?.broadcastExit();
        this.loaded.dispose();
        if (this.loaded.comm) native().mpiFinalize();
        return true;
      }
      case "cancel":
        return true;
    }
  }
}

function collectTransfers(result: unknown): ArrayBuffer[] {
  const out: ArrayBuffer[] = [];
  const visit = (v: unknown) => {
    if (ArrayBuffer.isView(v) && v.buffer instanceof ArrayBuffer && v.byteOffset === 0 && v.byteLength === v.buffer.byteLength) out.push(v.buffer);
    else if (Array.isArray(v)) v.forEach(visit);
  };
  visit(result);
  return out;
}

try {
  const loaded = loadEngine(data.dir, data.options);
  const worker = new Worker(loaded);
  send({ type: "ready", info: worker.info() });
  const comm = loaded.comm;
  if (comm && comm.rank !== 0) {
    // A tensor-parallel follower: compute what rank 0 broadcasts until it says stop.
    followSteps(loaded.model, loaded.engine.kvCache, comm);
    loaded.dispose();
    native().mpiFinalize();
  } else {
    await worker.run();
  }
  port.close();
} catch (err) {
  send({ type: "fatal", error: serializeError(err) });
  if (data.options.tensorParallel) abortJob(err);
}

/** A tensor-parallel rank that fails ends the whole job: the other ranks would wait for it forever. */
function abortJob(err: unknown): never {
  writeSync(2, `blossom (tensor-parallel rank ${process.env.OMPI_COMM_WORLD_RANK ?? "?"}): ${err instanceof Error ? err.message : String(err)}\n`);
  native().mpiAbort(1);
  throw new Error("unreachable: MPI_Abort returned");
}
