/**
 * Continuous batching. Waiting requests are admitted into the running batch at token boundaries,
 * finished sequences retire at once, and every step is one forward pass over a ragged batch that
 * mixes new prompts (prefill) with one token of each running sequence (decode). A short request
 * never waits for a long one to finish.
 *
 * Prefill is chunked: a step feeds at most maxPrefillTokens prompt tokens (TGI's
 * max_batch_prefill_tokens), a longer prompt going in over several steps, so the sequences already
 * decoding keep receiving a token every step instead of stalling for the whole prompt (on a CPU a
 * 2,000-token prompt of bloom-560m takes seconds). Prompts are fed in arrival order.
 *
 * Memory: a request is admitted only when the KV cache can hold its prompt plus its
 * max_new_tokens, counting what running sequences may still grow into, so a running sequence
 * never meets a full cache.
 */
import { BlossomError } from "../errors.js";
import type { FinishReason } from "../generate/stopping.js";
import type { Engine, Sequence, StepEntry } from "./engine.js";
import type { TokenUpdate } from "./protocol.js";

/** Chooses the next token from logits (src/generate/chooser.ts implements it). */
export interface NextTokenChooser {
  next(logits: Float32Array, tokens: readonly number[], numGenerated: number): { tokenId: number; logprob: number };
  /** Ids to mask when the choice is plain argmax (so it can be batched); undefined otherwise. */
  plainGreedyMask?(numGenerated: number): readonly number[] | undefined;
}

/** Chooses argmax for many rows of one logits buffer at once (the native greedyRows kernel). */
export type BatchedGreedy = (logits: Float32Array, rows: number, stride: number, vocab: number, mask: Int32Array, maskRows: Uint8Array) => { ids: Int32Array; logprobs: Float64Array };

export interface GenerationRequest {
  id: number;
  promptIds: number[];
  maxNewTokens: number;
  /** Decides when a token ends the sequence (eos, length). */
  finishAfter(tokenId: number, numGenerated: number): FinishReason | undefined;
  chooser: NextTokenChooser;
}

interface Running {
  request: GenerationRequest;
  sequence: Sequence;
  tokens: number[]; // prompt + generated
  generated: number;
  /** Prompt tokens already fed (a long prompt is fed over several steps). */
  fed: number;
  /** Blocks this sequence may still need to reach prompt + maxNewTokens. */
  reservedBlocks: number;
  cancelled: boolean;
}

export interface SchedulerOptions {
  maxBatchSize: number;
  /** Cap on prompt + max_new_tokens summed over running sequences (TGI's max_batch_total_tokens). */
  maxBatchTotalTokens: number;
  /** Most prompt tokens one step feeds; a longer prompt is fed in chunks over several steps. */
  maxPrefillTokens: number;
}

export class Scheduler {
  private readonly waiting: GenerationRequest[] = [];
  private readonly running: Running[] = [];
  steps = 0;
  generatedTokens = 0;
  /**
   * Free blocks kept back from admission for work outside the batch (a forward or score waiting
   * for room), so a stream of new requests cannot keep it waiting forever.
   */
  holdBlocks = 0;

  constructor(
    private readonly engine: Engine,
    private readonly options: SchedulerOptions,
    private readonly batchedGreedy?: BatchedGreedy,
  ) {}

  /**
   * Tokens for rows that are plain greedy, chosen together (rows of `logits` are consecutive views of
   * one buffer); undefined entries are left to each chooser.
   */
  private chooseBatched(batch: Running[], logits: Float32Array[]): ({ tokenId: number; logprob: number } | undefined)[] {
    const out: ({ tokenId: number; logprob: number } | undefined)[] = new Array(batch.length).fill(undefined);
    if (!this.batchedGreedy || batch.length === 0) return out;
    const masks = batch.map((r) => r.request.chooser.plainGreedyMask?.(r.generated));
    if (masks.some((m) => m === undefined)) return out;
    const vocab = this.engine.model.config.vocabSize;
    const first = logits[0]!;
    const contiguous = logits.every((l, i) => l.buffer === first.buffer && l.byteOffset === first.byteOffset + i * vocab * 4 && l.length === vocab);
    if (!contiguous) return out;
    const eos = new Set<number>();
    masks.forEach((m) => m!.forEach((id) => eos.add(id)));
    const maskRows = Uint8Array.from(masks, (m) => (m!.length > 0 ? 1 : 0));
    const all = new Float32Array(first.buffer, first.byteOffset, batch.length * vocab);
    const { ids, logprobs } = this.batchedGreedy(all, batch.length, vocab, vocab, Int32Array.from(eos), maskRows);
    for (let i = 0; i < batch.length; i++) {
      // A row the kernel could not decide (no finite maximum: NaN or masked everything) goes to its chooser, which reports it.
      if (ids[i]! >= 0 && Number.isFinite(logprobs[i]!)) out[i] = { tokenId: ids[i]!, logprob: logprobs[i]! };
    }
    return out;
  }

  get waitingCount(): number {
    return this.waiting.length;
  }
  get runningCount(): number {
    return this.running.length;
  }
  hasWork(): boolean {
    return this.waiting.length > 0 || this.running.length > 0;
  }

  /** Rejects at once what could never be admitted; otherwise queues. */
  submit(request: GenerationRequest): void {
    if (request.promptIds.length === 0) throw new BlossomError("input", "the prompt is empty: BLOOM needs at least one token to condition on");
    const need = request.promptIds.length + request.maxNewTokens;
    const kv = this.engine.kvCache;
    const what = `prompt (${request.promptIds.length} tokens) + max_new_tokens (${request.maxNewTokens}) = ${need} tokens`;
    if (kv.blocksFor(need) > kv.numBlocks) throw new BlossomError("memory", `${what} exceeds the KV-cache capacity of ${kv.capacityTokens} tokens`);
    if (need > this.options.maxBatchTotalTokens) {
      throw new BlossomError("memory", `${what} exceeds the batch's token budget of ${this.options.maxBatchTotalTokens} (maxBatchTotalTokens, --max-batch-total-tokens)`);
    }
    this.waiting.push(request);
  }

  /** Cancels a waiting or running request. Returns true if it was waiting (so no update will follow). */
  cancel(id: number): "waiting" | "running" | undefined {
    const w = this.waiting.findIndex((r) => r.id === id);
    if (w >= 0) {
      this.waiting.splice(w, 1);
      return "waiting";
    }
    const r = this.running.find((x) => x.request.id === id);
    if (r) {
      r.cancelled = true;
      return "running";
    }
    return undefined;
  }

  /** Blocks running sequences may still grow into: not free for anything else. */
  reservedTotal(): number {
    return this.running.reduce((a, r) => a + r.reservedBlocks, 0);
  }

  private totalTokens(): number {
    return this.running.reduce((a, r) => a + r.request.promptIds.length + r.request.maxNewTokens, 0);
  }

  /**
   * Admits waiting requests that fit, in arrival order (no overtaking, so none starves), while this
   * step has prompt tokens to spare (`budget`): each admitted request is fed from this step on.
   */
  private admit(budget: number): Running[] {
    const admitted: Running[] = [];
    const kv = this.engine.kvCache;
    let reserved = this.reservedTotal() + this.holdBlocks;
    let totalTokens = this.totalTokens();
    while (budget > 0 && this.waiting.length > 0 && this.running.length + admitted.length < this.options.maxBatchSize) {
      const req = this.waiting[0]!;
      const need = req.promptIds.length + req.maxNewTokens;
      const blocks = kv.blocksFor(need);
      if (reserved + blocks > kv.freeBlockCount) break;
      if (totalTokens + need > this.options.maxBatchTotalTokens) break;
      this.waiting.shift();
      reserved += blocks;
      totalTokens += need;
      budget -= Math.min(budget, req.promptIds.length);
      admitted.push({ request: req, sequence: this.engine.createSequence(), tokens: [...req.promptIds], generated: 0, fed: 0, reservedBlocks: blocks, cancelled: false });
    }
    return admitted;
  }

  /** Whether prompts wait to be fed (queued, or admitted and partly fed). */
  prefilling(): boolean {
    return this.waiting.length > 0 || this.running.some((r) => r.fed < r.request.promptIds.length);
  }

  /**
   * One forward step over the running batch plus newly admitted requests. Returns the token
   * updates, and the ids of cancelled sequences that were retired.
   */
  step(prefillBudget = this.options.maxPrefillTokens): { updates: TokenUpdate[]; retiredCancelled: number[]; failed: { id: number; error: unknown }[] } {
    const retiredCancelled: number[] = [];
    const failed: { id: number; error: unknown }[] = [];
    for (let i = this.running.length - 1; i >= 0; i--) {
      const r = this.running[i]!;
      if (r.cancelled) {
        this.retire(i);
        retiredCancelled.push(r.request.id);
      }
    }
    // Every decoding sequence takes its last token; prompts are fed in arrival order within the
    // budget, the running ones first, then those admitted with what is left.
    let budget = prefillBudget;
    const fed: { running: Running; tokens: number }[] = [];
    const entries: StepEntry[] = [];
    const batch: Running[] = []; // the sequences that choose a token this step
    const add = (r: Running) => {
      const left = r.request.promptIds.length - r.fed;
      if (left === 0) {
        entries.push({ sequence: r.sequence, tokens: [r.tokens[r.tokens.length - 1]!], logits: "last" });
        batch.push(r);
        return;
      }
      const n = Math.min(left, budget);
      if (n === 0) return;
      budget -= n;
      const last = n === left;
      entries.push({ sequence: r.sequence, tokens: r.request.promptIds.slice(r.fed, r.fed + n), logits: last ? "last" : "none" });
      fed.push({ running: r, tokens: n });
      if (last) batch.push(r);
    };
    this.running.forEach(add);
    const admitted = this.admit(budget);
    admitted.forEach(add);
    if (entries.length === 0) return { updates: [], retiredCancelled, failed };
    let stepLogits: Float32Array[];
    try {
      stepLogits = this.engine.step(entries);
    } catch (err) {
      for (const r of admitted) this.engine.freeSequence(r.sequence);
      this.waiting.unshift(...admitted.map((r) => r.request));
      throw err;
    }
    for (const f of fed) f.running.fed += f.tokens;
    this.running.push(...admitted);
    this.steps++;
    const logits = stepLogits.filter((_, i) => entries[i]!.logits === "last");
    const updates: TokenUpdate[] = [];
    const finished = new Set<Running>();
    for (const f of fed) {
      const r = f.running;
      if (r.fed < r.request.promptIds.length) r.reservedBlocks = this.reservedFor(r);
    }
    const batched = this.chooseBatched(batch, logits);
    for (let i = 0; i < batch.length; i++) {
      const r = batch[i]!;
      let chosen: { tokenId: number; logprob: number };
      try {
        chosen = batched[i] ?? r.request.chooser.next(logits[i]!, r.tokens, r.generated);
      } catch (error) {
        // This sequence's choice failed (its logits or its own settings): it ends with the error; the
        // rest of the batch goes on.
        failed.push({ id: r.request.id, error });
        finished.add(r);
        continue;
      }
      const { tokenId, logprob } = chosen;
      r.tokens.push(tokenId);
      r.generated++;
      this.generatedTokens++;
      r.reservedBlocks = this.reservedFor(r);
      const finish = r.request.finishAfter(tokenId, r.generated);
      if (finish) finished.add(r);
      updates.push(finish ? { id: r.request.id, token: tokenId, logprob, finish } : { id: r.request.id, token: tokenId, logprob });
    }
    for (let i = this.running.length - 1; i >= 0; i--) if (finished.has(this.running[i]!)) this.retire(i);
    return { updates, retiredCancelled, failed };
  }

  /** Blocks r may still need to reach prompt + maxNewTokens. */
  private reservedFor(r: Running): number {
    return Math.max(0, this.engine.kvCache.blocksFor(r.request.promptIds.length + r.request.maxNewTokens) - r.sequence.blocks.length);
  }

  private retire(index: number): void {
    const [r] = this.running.splice(index, 1);
    this.engine.freeSequence(r!.sequence);
  }

  /** Drops everything (dispose); returns the ids that were waiting or running. */
  clear(): number[] {
    const ids = [...this.waiting.map((r) => r.id), ...this.running.map((r) => r.request.id)];
    this.waiting.length = 0;
    for (let i = this.running.length - 1; i >= 0; i--) this.retire(i);
    return ids;
  }
}
