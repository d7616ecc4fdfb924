/**
 * Work outside the generation batch — forward (every position's logits), score (log-probabilities
 * of given tokens) and a session's feed — fed in chunks of at most the prefill budget, so that the
 * worker can run a generation step between chunks: a long text then stalls running streams for one
 * chunk at a time, as a long prompt does (scheduler.ts), not for the whole text. Score keeps only
 * the log-probabilities it needs from each chunk's logits, never a whole text's logits at once.
 */
import { BlossomError } from "../errors.js";
import type { Engine, Sequence, StepEntry } from "./engine.js";
import { logSoftmaxAt } from "./logprobs.js";
import type { LogitsWanted, Request } from "./protocol.js";

export type JobRequest = Extract<Request, { type: "forward" | "score" | "feed" }>;

export function isJobRequest(request: Request): request is JobRequest {
  return request.type === "forward" || request.type === "score" || request.type === "feed";
}

interface Part {
  sequence: Sequence;
  /** Fresh sequences (forward, score) are freed when the job ends; a session's stays open. */
  fresh: boolean;
  tokens: number[];
  logits: LogitsWanted;
  fed: number;
  /** Blocks the sequence holds once every token is fed. */
  targetBlocks: number;
  /** forward / feed: logits rows kept, chunk by chunk. */
  rows: Float32Array[];
  /** score: log p(tokens[p] | tokens[<p]) for p >= from. */
  from: number;
  scores: Float64Array | undefined;
}

export class ChunkedJob {
  private readonly parts: Part[];

  /** Validates the request and creates its fresh sequences (sessions come from `sessions`). */
  constructor(
    private readonly engine: Engine,
    readonly request: JobRequest,
    sessions: ReadonlyMap<number, Sequence>,
  ) {
    const kv = engine.kvCache;
    if (request.type === "feed") {
      const parts = request.entries.map((e) => {
        const sequence = sessions.get(e.session);
        if (!sequence) throw new BlossomError("input", `feed: no open session ${e.session}`);
        return { sequence, fresh: false, tokens: e.tokens, logits: e.logits, from: 0 };
      });
      this.parts = parts.map((p) => ({ ...p, fed: 0, targetBlocks: kv.blocksFor(p.sequence.length + p.tokens.length), rows: [], scores: undefined }));
      return;
    }
    const specs =
      request.type === "forward"
        ? request.sequences.map((tokens) => ({ tokens, from: 0, scores: undefined }))
        : request.sequences.map((s) => {
            if (s.from === 0 && s.tokens.length > 0) throw new BlossomError("input", "score: the first token has no context to be predicted from (from must be >= 1)");
            return { tokens: s.tokens, from: s.from, scores: new Float64Array(Math.max(0, s.tokens.length - s.from)) };
          });
    this.parts = specs.map((s) => ({
      ...s,
      sequence: engine.createSequence(),
      fresh: true,
      logits: "all" as const,
      fed: 0,
      targetBlocks: kv.blocksFor(s.tokens.length),
      rows: [],
    }));
  }

  /** Blocks the job will still take from the cache (to be kept from admission meanwhile). */
  remainingBlocks(): number {
    return this.parts.reduce((a, p) => a + Math.max(0, p.targetBlocks - p.sequence.blocks.length), 0);
  }

  usesSession(sequence: Sequence): boolean {
    return this.parts.some((p) => !p.fresh && p.sequence === sequence);
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
      const last = part.fed + n === part.tokens.length;
      const logits: LogitsWanted = part.logits === "all" ? "all" : part.logits === "last" && last ? "last" : "none";
      entries.push({ sequence: part.sequence, tokens: part.tokens.slice(part.fed, part.fed + n), logits });
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
      } else if (rows.length > 0) {
        part.rows.push(rows.slice());
      }
      part.fed += n;
    });
  }

  /** The reply: forward's and feed's logits per sequence, score's log-probabilities. */
  result(): Float32Array[] | Float64Array[] {
    if (this.request.type === "score") return this.parts.map((p) => p.scores!);
    return this.parts.map((p) => concat(p.rows));
  }

  /** Frees the fresh sequences (a session's stays open with what was fed). */
  release(): void {
    for (const p of this.parts) if (p.fresh) this.engine.freeSequence(p.sequence);
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
