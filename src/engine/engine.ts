/**
 * The engine: sequences, each with its own KV-cache blocks and length, and forward steps over a
 * ragged batch of them. A step may mix a new sequence's whole prompt with one token of each
 * running sequence; that is what lets the scheduler admit and retire sequences at any token
 * boundary (continuous batching).
 */
import { BlossomError } from "../errors.js";
import type { BloomModel, ForwardStep } from "../models/bloom.js";
import type { KVCachePool } from "./kv-cache.js";

export class Sequence {
  /** Cache blocks holding this sequence's keys and values. */
  readonly blocks: number[] = [];
  /** Tokens whose keys and values are in the cache. */
  length = 0;
  constructor(readonly id: number) {}
}

export interface StepEntry {
  sequence: Sequence;
  tokens: ArrayLike<number>;
  /** Which of the new positions need next-token logits. */
  logits: "last" | "all" | "none";
}

export class Engine {
  private nextId = 1;
  private readonly live = new Set<Sequence>();

  constructor(
    readonly model: BloomModel,
    readonly kvCache: KVCachePool,
    /** Called with each step before it is computed (tensor parallelism: rank 0 broadcasts it). */
    private readonly beforeForward?: (step: ForwardStep) => void,
  ) {}

  createSequence(): Sequence {
    const s = new Sequence(this.nextId++);
    this.live.add(s);
    return s;
  }

  freeSequence(sequence: Sequence): void {
    this.kvCache.release(sequence.blocks);
    sequence.length = 0;
    this.live.delete(sequence);
  }

  get liveSequences(): number {
    return this.live.size;
  }

  /** Cache blocks a step would need beyond what its sequences hold. */
  blocksNeeded(entries: readonly StepEntry[]): number {
    let n = 0;
    for (const e of entries) n += Math.max(0, this.kvCache.blocksFor(e.sequence.length + e.tokens.length) - e.sequence.blocks.length);
    return n;
  }

  /**
   * Feeds each entry's new tokens; returns, per entry, its logits (rows x vocab): one row for
   * "last", one per new token for "all", none for "none". Rows are views valid until the next step.
   */
  step(entries: readonly StepEntry[]): Float32Array[] {
    const vocab = this.model.config.vocabSize;
    let total = 0;
    for (const e of entries) {
      if (!this.live.has(e.sequence)) throw new BlossomError("internal", `sequence ${e.sequence.id} was freed`);
      if (e.tokens.length === 0) throw new BlossomError("input", `sequence ${e.sequence.id}: a step needs at least one new token`);
      total += e.tokens.length;
    }
    if (this.blocksNeeded(entries) > this.kvCache.freeBlockCount) {
      throw new BlossomError(
        "memory",
        `the KV cache is full: this step needs ${this.blocksNeeded(entries)} more blocks of ${this.kvCache.blockSize} tokens, ${this.kvCache.freeBlockCount} are free (capacity ${this.kvCache.capacityTokens} tokens)`,
      );
    }
    for (const e of entries) this.kvCache.reserve(e.sequence.blocks, e.sequence.length + e.tokens.length);

    const tokenIds = new Int32Array(total);
    const seqs = new Int32Array(4 * entries.length);
    let tableLength = 0;
    for (const e of entries) tableLength += e.sequence.blocks.length;
    const blockTable = new Int32Array(tableLength);
    const logitRows: number[] = [];
    let row = 0, table = 0;
    entries.forEach((e, s) => {
      for (let i = 0; i < e.tokens.length; i++) {
        const id = e.tokens[i]!;
        if (!Number.isInteger(id) || id < 0 || id >= vocab) {
          throw new BlossomError("input", `token id ${id} is outside the vocabulary [0, ${vocab})`);
        }
        tokenIds[row + i] = id;
      }
      seqs.set([row, e.tokens.length, e.sequence.length, table], 4 * s);
      blockTable.set(e.sequence.blocks, table);
      if (e.logits === "last") logitRows.push(row + e.tokens.length - 1);
      else if (e.logits === "all") for (let i = 0; i < e.tokens.length; i++) logitRows.push(row + i);
      row += e.tokens.length;
      table += e.sequence.blocks.length;
    });

    const step: ForwardStep = { tokenIds, batch: { seqs, blockTable }, logitRows: Int32Array.from(logitRows) };
    this.beforeForward?.(step);
    const logits = this.model.forward(step, this.kvCache);
    for (const e of entries) e.sequence.length += e.tokens.length;

    const out: Float32Array[] = [];
    let r = 0;
    for (const e of entries) {
      const n = e.logits === "last" ? 1 : e.logits === "all" ? e.tokens.length : 0;
      out.push(logits.subarray(r * vocab, (r + n) * vocab));
      r += n;
    }
    return out;
  }
}
