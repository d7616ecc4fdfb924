/**
 * Data-parallel streams (DeepSpeed-ZeRO inference's way of using several devices): N engine
 * workers, each decoding its own batch stream with its own threads and KV cache, over one shared
 * memory mapping of the weights (the addon maps each file once per process, so resident memory
 * does not grow N-fold). Requests go to the replica with the fewest running generations.
 */
import { setMaxListeners } from "node:events";
import { BlossomError } from "../errors.js";
import { EngineClient, listenForAbort, type EngineHandle, type GenerationHandlers } from "../engine/client.js";
import type { EngineInfo, EngineStats, LogitsWanted, WorkerData } from "../engine/protocol.js";
import type { GenerationParams } from "../generate/params.js";
import type { MappedWeightsReport } from "../backend/backend.js";

export class ReplicaSet implements EngineHandle {
  readonly info: EngineInfo;
  private readonly active: number[];
  private nextForward = 0;
  private nextSession = 1;
  private readonly sessions = new Map<number, { replica: number; local: number }>();

  get alive(): boolean {
    return this.clients.some((c) => c.alive);
  }

  private constructor(private readonly clients: EngineClient[]) {
    this.active = clients.map(() => 0);
    const first = clients[0]!.info;
    this.info = { ...first, replicas: clients.length, threads: clients.reduce((a, c) => a + c.info.threads, 0), kvCacheTokens: clients.reduce((a, c) => a + c.info.kvCacheTokens, 0) };
    // The workers share one mapping and settle it one at a time: whichever came first found it as it
    // was and may have read it again; the last found it as it is.
    const mapped = clients.map((c) => c.info.mappedWeights);
    if (mapped.every((m) => m !== undefined)) {
      const all = mapped as MappedWeightsReport[];
      this.info.mappedWeights = {
        ...all[0]!,
        hugeBytesBefore: Math.min(...all.map((m) => m.hugeBytesBefore)),
        hugeBytesAfter: Math.max(...all.map((m) => m.hugeBytesAfter)),
        filesReread: Math.max(...all.map((m) => m.filesReread)),
      };
    }
  }

  /** Starts `replicas` workers; each gets threads/replicas compute threads (at least 1). */
  static async start(data: WorkerData, replicas: number, totalThreads: number): Promise<ReplicaSet> {
    if (!Number.isInteger(replicas) || replicas < 1 || replicas > 64) {
      throw new BlossomError("parameter", `replicas: expected an integer from 1 to 64, got ${replicas}`);
    }
    const threads = Math.max(1, Math.floor(totalThreads / replicas));
    // Column panels (src/backend/cpu.ts) are a private copy per engine: replicas keep long rows in
    // the shared mapping unless asked otherwise, so memory stays one copy of the weights.
    const linearPanels = data.options.linearPanels === undefined ? null : data.options.linearPanels;
    const started = await Promise.allSettled(
      Array.from({ length: replicas }, () => EngineClient.start({ ...data, options: { ...data.options, threads, linearPanels } })),
    );
    const clients = started.flatMap((r) => (r.status === "fulfilled" ? [r.value] : []));
    const failed = started.find((r) => r.status === "rejected");
    if (failed) {
      await Promise.all(clients.map((c) => c.dispose()));
      throw (failed as PromiseRejectedResult).reason;
    }
    return new ReplicaSet(clients);
  }

  /** The live replica with the fewest sequences (replica 0 if none lives: its calls say why). */
  private leastLoaded(): number {
    let best = -1;
    for (let i = 0; i < this.active.length; i++) {
      if (this.clients[i]!.alive && (best < 0 || this.active[i]! < this.active[best]!)) best = i;
    }
    return Math.max(best, 0);
  }

  /** Replicas whose worker still runs: a replica that died takes no new work while the others go on. */
  private live(): EngineClient[] {
    const alive = this.clients.filter((c) => c.alive);
    return alive.length > 0 ? alive : this.clients.slice(0, 1);
  }

  /**
   * Spreads the sequences over the replicas, runs them concurrently, and returns results in order.
   * The parts share one signal, the caller's joined: a part that fails (or the caller's abort) cancels
   * the others, whose results nobody would read.
   */
  private async spread<I, O>(items: I[], signal: AbortSignal | undefined, run: (client: EngineClient, part: I[], signal: AbortSignal) => Promise<O[]>): Promise<O[]> {
    const clients = this.live();
    const parts = clients.map(() => [] as { index: number; item: I }[]);
    items.forEach((item, index) => parts[(this.nextForward + index) % clients.length]!.push({ index, item }));
    this.nextForward = (this.nextForward + items.length) % clients.length;
    const together = new AbortController();
    const onAbort = () => together.abort(signal?.reason);
    if (signal?.aborted) onAbort();
    else if (signal) listenForAbort(signal, onAbort);
    setMaxListeners(clients.length + 10, together.signal);
    let results: O[][];
    try {
      results = await Promise.all(
        parts.map((p, r) =>
          p.length
            ? run(clients[r]!, p.map((x) => x.item), together.signal).catch((err: unknown) => {
                together.abort(err);
                throw err;
              })
            : Promise.resolve([]),
        ),
      );
    } finally {
      signal?.removeEventListener("abort", onAbort);
    }
    const out = new Array<O>(items.length);
    parts.forEach((p, r) => p.forEach((x, k) => (out[x.index] = results[r]![k]!)));
    return out;
  }

  forward(sequences: number[][], signal?: AbortSignal): Promise<Float32Array[]> {
    return this.spread(sequences, signal, (c, part, s) => c.forward(part, s));
  }

  score(sequences: { tokens: number[]; from: number }[], signal?: AbortSignal): Promise<Float64Array[]> {
    return this.spread(sequences, signal, (c, part, s) => c.score(part, s));
  }

  async openSession(): Promise<number> {
    const replica = this.leastLoaded();
    const local = await this.clients[replica]!.openSession();
    const id = this.nextSession++;
    this.sessions.set(id, { replica, local });
    return id;
  }

  async feed(entries: { session: number; tokens: number[]; logits: LogitsWanted }[]): Promise<Float32Array[]> {
    const located = entries.map((e) => {
      const s = this.sessions.get(e.session);
      if (!s) throw new BlossomError("input", `feed: no open session ${e.session}`);
      return { ...e, ...s };
    });
    const out = new Array<Float32Array>(entries.length);
    await Promise.all(
      this.clients.map(async (client, r) => {
        const mine = located.map((e, i) => ({ e, i })).filter((x) => x.e.replica === r);
        if (mine.length === 0) return;
        const logits = await client.feed(mine.map(({ e }) => ({ session: e.local, tokens: e.tokens, logits: e.logits })));
        mine.forEach(({ i }, k) => (out[i] = logits[k]!));
      }),
    );
    return out;
  }

  async closeSession(session: number): Promise<boolean> {
    const s = this.sessions.get(session);
    if (!s) return false;
    this.sessions.delete(session);
    return this.clients[s.replica]!.closeSession(s.local);
  }

  /** The live replicas' figures (a dead replica's worker cannot answer; the others go on). */
  async stats(): Promise<EngineStats> {
    return combineStats(await Promise.all(this.live().map((c) => c.stats())));
  }

  /** The live replicas' last pushed figures, summed; undefined until each has pushed. */
  latestStats(): EngineStats | undefined {
    const all = this.live().map((c) => c.latestStats());
    return all.length > 0 && all.every((s) => s !== undefined) ? combineStats(all as EngineStats[]) : undefined;
  }

  async submit(promptIds: number[], params: GenerationParams, eosTokenIds: number[], handlers: GenerationHandlers): Promise<() => void> {
    const r = this.leastLoaded();
    this.active[r]!++;
    let done = false;
    const finish = () => {
      if (!done) {
        done = true;
        this.active[r]!--;
      }
    };
    try {
      return await this.clients[r]!.submit(promptIds, params, eosTokenIds, {
        onToken: (u) => {
          if (u.finish) finish();
          handlers.onToken(u);
        },
        onEnded: (reason, error) => {
          finish();
          handlers.onEnded(reason, error);
        },
      });
    } catch (err) {
      finish();
      throw err;
    }
  }

  async dispose(): Promise<void> {
    await Promise.all(this.clients.map((c) => c.dispose()));
  }
}

/** Replicas' figures as one engine's: counts summed; the process's resident set once. */
function combineStats(all: EngineStats[]): EngineStats {
  const sum = (k: keyof Omit<EngineStats, "offload" | "kvBlockSize" | "residentBytes">) => all.reduce((a, s) => a + s[k], 0);
  return {
    waiting: sum("waiting"),
    running: sum("running"),
    kvBlocksFree: sum("kvBlocksFree"),
    kvBlocksTotal: sum("kvBlocksTotal"),
    kvBlockSize: all[0]!.kvBlockSize,
    steps: sum("steps"),
    jobChunks: sum("jobChunks"),
    generatedTokens: sum("generatedTokens"),
    residentBytes: all[0]!.residentBytes, // one process: every replica reports the same figure
  };
}
