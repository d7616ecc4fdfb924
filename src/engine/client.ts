/**
 * The main-thread side of an engine worker: starts it, sends requests, routes replies and token
 * streams. Every front end (library, CLI, server, bench) goes through this.
 */
import { getEventListeners, getMaxListeners, setMaxListeners } from "node:events";
import { Worker } from "node:worker_threads";
import { BlossomError } from "../errors.js";
import type { GenerationParams } from "../generate/params.js";
import type { FinishReason } from "../generate/stopping.js";
import type { EngineInfo, EngineStats, LogitsWanted, Request, Response, SerializedError, TokenUpdate, WorkerData } from "./protocol.js";

type Pending = { resolve: (v: unknown) => void; reject: (e: Error) => void };

export interface GenerationHandlers {
  onToken(update: TokenUpdate): void;
  /** Called once when the sequence ends without a final token update (cancelled or failed). */
  onEnded(finish: FinishReason | "cancelled", error?: BlossomError): void;
}

// A distributive Omit, so each request variant keeps its own fields.
type WithoutId<T> = T extends unknown ? Omit<T, "id"> : never;

/**
 * Adds a once-listener for `signal`'s abort. Callers add one per call and remove it when the call
 * settles, so many calls sharing a signal are expected, not a leak: the signal's listener limit is
 * raised instead of Node warning past 10.
 */
export function listenForAbort(signal: AbortSignal, onAbort: () => void): void {
  const listeners = getEventListeners(signal, "abort").length;
  if (listeners >= getMaxListeners(signal)) setMaxListeners(listeners + 10, signal);
  signal.addEventListener("abort", onAbort, { once: true });
}

function abortedError(what: string): BlossomError {
  return new BlossomError("aborted", `${what} was aborted`);
}

function toError(e: SerializedError): BlossomError {
  return new BlossomError(e.code, e.message);
}

/** What front ends need from an engine: one worker (EngineClient) or several (ReplicaSet). */
export interface EngineHandle {
  readonly info: EngineInfo;
  /** With `signal`: an abort rejects at once and drops the work from the engine (queued or between two of its chunks). */
  forward(sequences: number[][], signal?: AbortSignal): Promise<Float32Array[]>;
  score(sequences: { tokens: number[]; from: number }[], signal?: AbortSignal): Promise<Float64Array[]>;
  openSession(): Promise<number>;
  feed(entries: { session: number; tokens: number[]; logits: LogitsWanted }[]): Promise<Float32Array[]>;
  closeSession(session: number): Promise<boolean>;
  stats(): Promise<EngineStats>;
  /**
   * The figures the worker last pushed, without waiting for it: a step computing for seconds cannot
   * delay them (/metrics). Pushed between steps when the queue or batch changes, otherwise at most
   * statsIntervalMs plus one step old while the engine works, current once it is idle; undefined
   * before the first push.
   */
  latestStats(): EngineStats | undefined;
  /** Whether an engine worker still runs (answered at once, even while a step computes). */
  readonly alive: boolean;
  submit(promptIds: number[], params: GenerationParams, eosTokenIds: number[], handlers: GenerationHandlers): Promise<() => void>;
  dispose(): Promise<void>;
}

export class EngineClient implements EngineHandle {
  readonly info: EngineInfo;
  private readonly worker: Worker;
  private nextId = 1;
  private readonly pending = new Map<number, Pending>();
  private readonly generations = new Map<number, GenerationHandlers>();
  private exited = false;
  private exitError: BlossomError | undefined;
  private latest: EngineStats | undefined;

  private constructor(worker: Worker, info: EngineInfo) {
    this.worker = worker;
    this.info = info;
    worker.on("message", (m: Response) => this.onMessage(m));
    worker.on("error", (err) => {
      this.exitError ??= new BlossomError("internal", `the engine worker failed (${err.message}); load the model again`);
      this.fail(this.exitError);
    });
    worker.on("exit", (code) => {
      this.exited = true;
      // Kept for every later call: each is refused with the reason, none waits on a worker that is gone.
      this.exitError ??= new BlossomError("internal", `the engine worker exited (code ${code}); load the model again`);
      this.fail(this.exitError);
    });
  }

  /**
   * A tensor-parallel follower rank: starts the worker, which computes what rank 0 broadcasts, and
   * resolves when it has finished.
   */
  static follow(data: WorkerData): Promise<void> {
    const worker = new Worker(new URL("./worker.js", import.meta.url), { workerData: data });
    return new Promise((resolve, reject) => {
      worker.on("message", (m: Response) => {
        if (m.type === "fatal") reject(toError(m.error));
      });
      worker.on("error", reject);
      worker.on("exit", () => resolve());
    });
  }

  /** Starts a worker and waits until the model is loaded. */
  static start(data: WorkerData): Promise<EngineClient> {
    const worker = new Worker(new URL("./worker.js", import.meta.url), { workerData: data });
    return new Promise((resolve, reject) => {
      const onMessage = (m: Response) => {
        if (m.type === "ready") {
          cleanup();
          resolve(new EngineClient(worker, m.info));
        } else if (m.type === "fatal") {
          cleanup();
          void worker.terminate();
          reject(toError(m.error));
        }
      };
      const onError = (err: Error) => {
        cleanup();
        reject(new BlossomError("internal", `engine worker failed to start: ${err.message}`, { cause: err }));
      };
      const onExit = (code: number) => {
        cleanup();
        reject(new BlossomError("internal", `engine worker exited during load (code ${code})`));
      };
      const cleanup = () => {
        worker.off("message", onMessage);
        worker.off("error", onError);
        worker.off("exit", onExit);
      };
      worker.on("message", onMessage);
      worker.on("error", onError);
      worker.on("exit", onExit);
    });
  }

  private onMessage(m: Response): void {
    switch (m.type) {
      case "reply": {
        const p = this.pending.get(m.id);
        this.pending.delete(m.id);
        p?.resolve(m.result);
        break;
      }
      case "error": {
        const p = this.pending.get(m.id);
        this.pending.delete(m.id);
        p?.reject(toError(m.error));
        break;
      }
      case "step":
        for (const u of m.updates) {
          const h = this.generations.get(u.id);
          if (!h) continue;
          if (u.finish) this.generations.delete(u.id);
          try {
            h.onToken(u);
          } catch (err) {
            // A handler that fails (the caller's code, or detokenizing) ends its own generation, not the process.
            this.generations.delete(u.id);
            if (!u.finish && !this.exited) this.worker.postMessage({ type: "cancel", id: u.id } satisfies Request);
            h.onEnded("cancelled", err instanceof BlossomError ? err : new BlossomError("internal", `token handler failed: ${(err as Error)?.message ?? String(err)}`, { cause: err }));
          }
        }
        break;
      case "stats":
        this.latest = m.stats;
        break;
      case "ended": {
        const h = this.generations.get(m.id);
        this.generations.delete(m.id);
        h?.onEnded(m.finish, m.error ? toError(m.error) : undefined);
        break;
      }
      default:
        break;
    }
  }

  private fail(err: BlossomError): void {
    for (const p of this.pending.values()) p.reject(err);
    this.pending.clear();
    for (const h of this.generations.values()) h.onEnded("cancelled", err);
    this.generations.clear();
  }

  /** Whether the worker still runs (not disposed, not exited). */
  get alive(): boolean {
    return !this.exited && this.exitError === undefined;
  }

  private gone(): BlossomError {
    return this.exitError ?? new BlossomError("internal", "the engine worker has exited; load the model again");
  }

  private request<T>(message: WithoutId<Request>): Promise<T> {
    if (this.exited) return Promise.reject(this.gone());
    const id = this.nextId++;
    return new Promise<T>((resolve, reject) => {
      this.pending.set(id, { resolve: resolve as (v: unknown) => void, reject });
      this.worker.postMessage({ ...message, id } as Request);
    });
  }

  /**
   * A request the caller may abandon: on abort it is rejected at once and the worker told to drop it
   * (a forward or score over a long text holds the engine's turns and KV blocks for seconds).
   */
  private cancellable<T>(message: WithoutId<Request>, signal: AbortSignal | undefined): Promise<T> {
    if (!signal) return this.request<T>(message);
    if (signal.aborted) return Promise.reject(abortedError(message.type));
    if (this.exited) return Promise.reject(this.gone());
    const id = this.nextId++;
    return new Promise<T>((resolve, reject) => {
      const onAbort = () => {
        if (!this.pending.delete(id)) return;
        if (!this.exited) this.worker.postMessage({ type: "cancel", id } satisfies Request);
        reject(abortedError(message.type));
      };
      const settle = (f: () => void) => {
        signal.removeEventListener("abort", onAbort);
        f();
      };
      this.pending.set(id, { resolve: (v) => settle(() => resolve(v as T)), reject: (e) => settle(() => reject(e)) });
      listenForAbort(signal, onAbort);
      this.worker.postMessage({ ...message, id } as Request);
    });
  }

  /** Logits (tokens x vocab) for every position of each sequence. */
  forward(sequences: number[][], signal?: AbortSignal): Promise<Float32Array[]> {
    return this.cancellable({ type: "forward", sequences }, signal);
  }
  /** log p(tokens[i] | tokens[<i]) for i >= from. */
  score(sequences: { tokens: number[]; from: number }[], signal?: AbortSignal): Promise<Float64Array[]> {
    return this.cancellable({ type: "score", sequences }, signal);
  }
  openSession(): Promise<number> {
    return this.request({ type: "open" });
  }
  feed(entries: { session: number; tokens: number[]; logits: LogitsWanted }[]): Promise<Float32Array[]> {
    return this.request({ type: "feed", entries });
  }
  closeSession(session: number): Promise<boolean> {
    return this.request({ type: "close", session });
  }
  stats(): Promise<EngineStats> {
    return this.request<EngineStats>({ type: "stats" }).then((s) => (this.latest = s));
  }
  latestStats(): EngineStats | undefined {
    return this.latest;
  }

  /** Starts a generation; tokens arrive through `handlers`. Returns a function that cancels it. */
  async submit(promptIds: number[], params: GenerationParams, eosTokenIds: number[], handlers: GenerationHandlers): Promise<() => void> {
    if (this.exited) throw this.gone();
    const id = this.nextId++;
    this.generations.set(id, handlers);
    const reply = new Promise<unknown>((resolve, reject) => this.pending.set(id, { resolve, reject }));
    this.worker.postMessage({ type: "submit", id, promptIds, params, eosTokenIds } satisfies Request);
    try {
      await reply;
    } catch (err) {
      this.generations.delete(id);
      throw err;
    }
    return () => {
      if (this.generations.has(id) && !this.exited) this.worker.postMessage({ type: "cancel", id } satisfies Request);
    };
  }

  async dispose(): Promise<void> {
    if (this.exited) return;
    this.exitError = new BlossomError("aborted", "the model was disposed");
    try {
      await this.request({ type: "dispose" });
    } catch {
      // Already gone.
    }
    await this.worker.terminate();
  }
}
