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
import type { EngineInfo, EngineStats, Request, Response, SerializedError, WorkerData } from "./protocol.js";
import { Scheduler } from "./scheduler.js";
import { logSoftmaxAt } from "./logprobs.js";
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
  private readonly deferred: Request[] = [];
  private readonly sessions = new Map<number, Sequence>();
  private nextSession = 1;
  private readonly scheduler: Scheduler;
  private wake: (() => void) | undefined;
  private disposed = false;

  constructor(private readonly loaded: LoadedEngine) {
    const kv = loaded.engine.kvCache;
    this.scheduler = new Scheduler(
      loaded.engine,
      {
        maxBatchSize: data.maxBatchSize ?? 1024,
        maxBatchTotalTokens: data.maxBatchTotalTokens ?? kv.capacityTokens,
        maxPrefillTokens: data.maxBatchPrefillTokens ?? 4096,
      },
      (logits, rows, stride, vocab, mask, maskRows) => {
        const ids = new Int32Array(rows), logprobs = new Float64Array(rows);
        native().greedyRows(logits, rows, stride, vocab, mask, maskRows, ids, logprobs);
        return { ids, logprobs };
      },
    );
    port.on("message", (m: Request) => {
      if (m.type === "cancel") this.cancel(m.id);
      else this.queue.push(m);
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
      ...(this.loaded.comm ? { tensorParallel: { rank: this.loaded.comm.rank, size: this.loaded.comm.size } } : {}),
    };
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
      generatedTokens: this.scheduler.generatedTokens,
      residentBytes: native().residentBytes(),
      ...(this.loaded.weights.offloadStats ? { offload: this.loaded.weights.offloadStats() } : {}),
    };
  }

  private cancel(id: number): void {
    const where = this.scheduler.cancel(id);
    if (where === "waiting") send({ type: "ended", id, finish: "cancelled" });
    // A running one retires at the next step and is reported then.
  }

  /**
   * Blocks a one-off step over fresh sequences (forward, score) needs, or undefined for other requests.
   * Such a step runs only on blocks no running generation is owed; otherwise it waits its turn.
   */
  private freshBlocks(request: Request): number | undefined {
    const kv = this.loaded.engine.kvCache;
    if (request.type === "forward") return request.sequences.reduce((a, tokens) => a + kv.blocksFor(tokens.length), 0);
    if (request.type === "score") return request.sequences.reduce((a, s) => a + kv.blocksFor(s.tokens.length), 0);
    return undefined;
  }

  /** Blocks free and promised to no running generation. */
  private unpromisedBlocks(): number {
    return this.loaded.engine.kvCache.freeBlockCount - this.scheduler.reservedTotal();
  }

  /** Runs the oldest deferred request if it fits now; if nothing will ever free room for it, says so. Returns whether it acted. */
  private runDeferred(): boolean {
    const head = this.deferred[0];
    if (!head) return false;
    const need = this.freshBlocks(head)!;
    if (need > this.unpromisedBlocks()) {
      if (this.scheduler.runningCount > 0) return false; // running generations will free their blocks
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
      this.handle(head);
    }
    this.scheduler.holdBlocks = this.deferred.length > 0 ? this.freshBlocks(this.deferred[0]!)! : 0;
    return true;
  }

  async run(): Promise<void> {
    while (!this.disposed) {
      const request = this.queue.shift();
      if (request) {
        const need = this.freshBlocks(request);
        // One that could never fit is refused at once by the engine (the cache's capacity), not queued.
        if (need !== undefined && need <= this.loaded.engine.kvCache.numBlocks && (this.deferred.length > 0 || need > this.unpromisedBlocks())) {
          // Wait for room, in order; admission keeps the head's blocks back meanwhile.
          this.deferred.push(request);
          this.scheduler.holdBlocks = this.freshBlocks(this.deferred[0]!)!;
        } else {
          this.handle(request);
        }
      } else if (this.runDeferred()) {
        // ran (or refused) a request that was waiting for room
      } else if (this.scheduler.hasWork()) {
        this.generationStep();
      } else {
        await new Promise<void>((resolve) => (this.wake = resolve));
        this.wake = undefined;
        continue;
      }
      // Let messages in between units of work.
      await new Promise<void>((resolve) => setImmediate(resolve));
    }
  }

  private generationStep(): void {
    try {
      const { updates, retiredCancelled, failed } = this.scheduler.step();
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

  private handle(request: Request): void {
    try {
      const result = this.execute(request);
      if (result instanceof Promise) throw new Error("unexpected async result");
      const transfer = collectTransfers(result);
      send({ type: "reply", id: request.id, result }, transfer);
    } catch (err) {
      send({ type: "error", id: request.id, error: serializeError(err) });
    }
  }

  private execute(request: Request): unknown {
    const { engine } = this.loaded;
    switch (request.type) {
      case "forward": {
        // One step over fresh sequences; every position's logits, copied out of the reused buffer.
        const seqs = request.sequences.map(() => engine.createSequence());
        try {
          const logits = engine.step(request.sequences.map((tokens, i) => ({ sequence: seqs[i]!, tokens, logits: "all" as const })));
          return logits.map((l) => l.slice());
        } finally {
          seqs.forEach((s) => engine.freeSequence(s));
        }
      }
      case "score": {
        const vocab = this.loaded.model.config.vocabSize;
        const seqs = request.sequences.map(() => engine.createSequence());
        try {
          const logits = engine.step(request.sequences.map((s, i) => ({ sequence: seqs[i]!, tokens: s.tokens, logits: "all" as const })));
          return request.sequences.map((s, i) => {
            const out = new Float64Array(Math.max(0, s.tokens.length - s.from));
            for (let p = s.from; p < s.tokens.length; p++) {
              if (p === 0) throw new BlossomError("input", "score: the first token has no context to be predicted from (from must be >= 1)");
              out[p - s.from] = logSoftmaxAt(logits[i]!.subarray((p - 1) * vocab, p * vocab), s.tokens[p]!);
            }
            return out;
          });
        } finally {
          seqs.forEach((s) => engine.freeSequence(s));
        }
      }
      case "open": {
        const id = this.nextSession++;
        this.sessions.set(id, engine.createSequence());
        return id;
      }
      case "feed": {
        const entries = request.entries.map((e) => {
          const sequence = this.sessions.get(e.session);
          if (!sequence) throw new BlossomError("input", `feed: no open session ${e.session}`);
          return { sequence, tokens: e.tokens, logits: e.logits };
        });
        // A session keeps what it takes: never the blocks running generations were promised.
        const need = engine.blocksNeeded(entries);
        const promised = this.scheduler.reservedTotal();
        if (need <= engine.kvCache.freeBlockCount && need > engine.kvCache.freeBlockCount - promised) {
          throw new BlossomError(
            "memory",
            `feed: needs ${need} blocks of ${engine.kvCache.blockSize} tokens; ${engine.kvCache.freeBlockCount} are free but ${promised} of them are promised to running generations (retry when they finish, or close sessions)`,
          );
        }
        return engine.step(entries).map((l) => l.slice());
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
        for (const r of this.deferred.splice(0)) send({ type: "error", id: r.id, error: serializeError(new BlossomError("aborted", "the model was disposed")) });
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
