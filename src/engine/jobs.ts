/**
 * Work outside the generation batch on fresh sequences — forward (every position's logits) and
 * score (log-probabilities of given tokens) — fed in chunks of at most the prefill budget, so that
 * the worker can run a generation step between chunks: a long text then stalls running streams for
 * one chunk at a time, as a long prompt does (scheduler.ts), not for the whole text. Score keeps
 * only the log-probabilities it needs from each chunk's logits, never a whole text's logits at once.
 * (A session's feed stays one step: it must be all or nothing, and in order with the session's
 * other requests.)
 */
import { BlossomError } from "../errors.js";
import type { Engine, Sequence, StepEntry } from "./engine.js";
import { logSoftmaxAt } from "./logprobs.js";
import type { Request } from "./protocol.js";

export type JobRequest = Extract<Request, { type: "forward" | "score" }>;

export function isJobRequest(request: Request): request is JobRequest {
  return request.type === "forward" || request.type === "score";
}

interface Part {
  sequence: Sequence;
  tokens: number[];
  fed: number;
  /** Blocks the sequence holds once every token is fed. */
  targetBlocks: number;
  /** forward: logits rows kept, chunk by chunk. */
  rows: Float32Array[];
  /** score: log p(tokens[p] | tokens[<p]) for p >= from. */
  from: number;
  scores: Float64Array | undefined;
}

export class ChunkedJob {
  private readonly parts: Part[];

  /** Validates the request (nothing is fed before it is whole and valid) and creates its sequences. */
  constructor(
    private readonly engine: Engine,
    readonly request: JobRequest,
  ) {
    const specs =
      request.type === "forward"
        ? request.sequences.map((tokens) => ({ tokens, from: 0, scores: undefined }))
        : request.sequences.map((s) => ({ tokens: s.tokens, from: s.from, scores: new Float64Array(Math.max(0, s.tokens.length - s.from)) }));
    const vocab = engine.model.config.vocabSize;
    specs.forEach((s, i) => {
      if (s.tokens.length === 0) throw new BlossomError("input", `${request.type}: sequence ${i} is empty: a step needs at least one token`);
      const bad = s.tokens.findIndex((t) => !Number.isInteger(t) || t < 0 || t >= vocab);
      if (bad >= 0) throw new BlossomError("input", `${request.type}: sequence ${i}, token ${bad}: ${s.tokens[bad]} is not a token id of this model (0..${vocab - 1})`);
      if (request.type === "score" && !(Number.isInteger(s.from) && s.from >= 1)) {
        throw new BlossomError("input", `score: sequence ${i}: from must be an integer >= 1 (the first token has no context to be predicted from), got ${s.from}`);
      }
    });
    const kv = engine.kvCache;
    this.parts = specs.map((s) => ({ ...s, sequence: engine.createSequence(), fed: 0, targetBlocks: kv.blocksFor(s.tokens.length), rows: [] }));
  }

  /** Blocks the job will still take from the cache (to be kept from admission meanwhile). */
  remainingBlocks(): number {
    return this.parts.reduce((a, p) => a + Math.max(0, p.targetBlocks - p.sequence.blocks.length), 0);
  }

  /** Every token fed. */
  get done(): boolean {
    return this.parts.every((p) => p.fed === p.tokens.length);
  }

  /** Feeds the next chunk: at most `budget` tokens, the parts in order. */
  advance(budget: number): void {
    const entries: StepEntry[] = [];
    const chunk: { part: Part; start: number; n: number }[] = [];
    for (const part of this.parts) {
      const left = part.tokens.length - part.fed;
      if (left === 0) continue;
      const n = Math.min(left, budget);
      if (n === 0) break;
      budget -= n;
      entries.push({ sequence: part.sequence, tokens: part.tokens.slice(part.fed, part.fed + n), logits: "all" });
      chunk.push({ part, start: part.fed, n });
    }
    const logits = this.engine.step(entries);
    const vocab = this.engine.model.config.vocabSize;
    chunk.forEach(({ part, start, n }, i) => {
      const rows = logits[i]!;
      if (part.scores) {
        // Row r predicts token r + 1.
        for (let r = start; r < start + n; r++) {
          const p = r + 1;
          if (p >= part.from && p < part.tokens.length) part.scores[p - part.from] = logSoftmaxAt(rows.subarray((r - start) * vocab, (r - start + 1) * vocab), part.tokens[p]!);
        }
      } else {
        part.rows.push(rows.slice());
      }
      part.fed += n;
    });
  }

  /** The reply: forward's logits per sequence, score's log-probabilities. */
  result(): Float32Array[] | Float64Array[] {
    if (this.request.type === "score") return this.parts.map((p) => p.scores!);
    return this.parts.map((p) => concat(p.rows));
  }

  release(): void {
    for (const p of this.parts) this.engine.freeSequence(p.sequence);
  }
}

function concat(rows: Float32Array[]): Float32Array {
  if (rows.length === 1) return rows[0]!;
  const out = new Float32Array(rows.reduce((a, r) => a + r.length, 0));
  let at = 0;
  for (const r of rows) {
    out.set(r, at);
    at += r.length;
  }
  return out;
}
