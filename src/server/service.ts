/**
 * The server's side of generation: admission (the concurrency limit, loading and draining), one
 * sequence's run over the model's token stream with its metrics, and cancellation on client
 * disconnect or shutdown. Batching itself is the engine's (continuous, at token boundaries); this
 * only decides whether a request may enter the engine's queue at all.
 */
import { setMaxListeners } from "node:events";
import { BlossomError } from "../errors.js";
import type { GenerationParams } from "../generate/params.js";
import type { FinishReason } from "../generate/stopping.js";
import type { Model } from "../model.js";
import { clientClosed, HttpError } from "./http-error.js";
import type { ServerMetrics } from "./metrics.js";

export type ServiceState = "loading" | "ready" | "draining" | "closed" | "failed";

export interface GeneratedToken {
  id: number;
  logprob: number;
  special: boolean;
  /** The text this token added to the output (may be "" while a character or a possible stop string is pending). */
  text: string;
  /** The token's own text ("" for a special token or an incomplete character; see StreamEvent.token). */
  tokenText: string;
}

export interface SequenceResult {
  text: string;
  tokens: GeneratedToken[];
  finishReason: FinishReason | "cancelled";
  /** Why a cancelled sequence was cancelled. */
  cancelledBy?: "client" | "shutdown" | "deadline";
}

export interface SequenceRequest {
  promptIds: number[];
  params: GenerationParams;
  signal: AbortSignal;
  /** Called for each token as it arrives, with the finish reason on the last one. */
  onToken?: (token: GeneratedToken, finishReason: FinishReason | "cancelled" | undefined) => void;
}

/** Why a request's AbortController was aborted; the reason travels as the signal's reason. */
export class CancelReason {
  constructor(readonly by: "client" | "shutdown" | "deadline") {}
}

/**
 * The answer to a request whose scoring (forward, prompt log-probabilities) was cut short by its
 * signal: 503 at shutdown, 499 for a client that left.
 */
export function scoringCancelled(signal: AbortSignal): HttpError {
  const reason: unknown = signal.reason;
  if (reason instanceof CancelReason && reason.by === "shutdown") return new HttpError("unavailable", "the server is shutting down; the scoring was cancelled");
  return clientClosed();
}

/** Runs `scoring` with the request's signal: an abort that cut it short gives scoringCancelled's answer. */
export async function scoreFor<T>(signal: AbortSignal, scoring: (signal: AbortSignal) => Promise<T>): Promise<T> {
  if (signal.aborted) throw scoringCancelled(signal);
  try {
    return await scoring(signal);
  } catch (err) {
    throw signal.aborted ? scoringCancelled(signal) : err;
  }
}

export class GenerationService {
  state: ServiceState = "loading";
  model: Model | undefined;
  loadError: Error | undefined;
  private inFlight = 0;
  /**
   * Sequences answered as cancelled that the engine has not dropped yet (it does so at its next step
   * boundary): they still count against --max-concurrent-requests.
   */
  private lingering = 0;
  private readonly controllers = new Set<AbortController>();
  private idleWaiters: (() => void)[] = [];

  constructor(
    private readonly metrics: ServerMetrics,
    private readonly maxConcurrent: number,
  ) {}

  /** Sequences admitted and not yet ended in the engine (what --max-concurrent-requests counts). */
  get sequencesInFlight(): number {
    return this.inFlight + this.lingering;
  }

  /** The model, or 503 while loading / after a failed load / while shutting down. */
  readyModel(): Model {
    if (this.state === "ready" && this.model) return this.model;
    throw this.unavailable();
  }

  private unavailable(): HttpError {
    switch (this.state) {
      case "loading":
        return new HttpError("unavailable", "the model is still loading; retry when GET /health answers 200");
      case "failed":
        return new HttpError("unavailable", `the model failed to load: ${this.loadError?.message ?? "unknown error"}`);
      default:
        return new HttpError("unavailable", "the server is shutting down and accepts no new requests");
    }
  }

  /**
   * Reserves room for `count` sequences, or throws 429 (over the limit) / 503 (not ready). The
   * returned controller aborts them; release() must be called once they have ended.
   */
  admit(count: number): { controller: AbortController; release: () => void } {
    this.readyModel();
    if (count > this.maxConcurrent) {
      // Never admissible, so not a "retry later" (clients retry a 429 by themselves).
      throw new HttpError("validation", `${count} prompts in one request exceed --max-concurrent-requests (${this.maxConcurrent}); send at most ${this.maxConcurrent}`);
    }
    if (this.sequencesInFlight + count > this.maxConcurrent) {
      this.metrics.overloaded.inc();
      throw new HttpError(
        "overloaded",
        `Model is overloaded: ${this.sequencesInFlight} sequences are in flight and the limit is ${this.maxConcurrent} (--max-concurrent-requests); retry later`,
      );
    }
    this.inFlight += count;
    const controller = new AbortController();
    // Each of the request's sequences listens on its signal twice (its run here and the model's
    // stream), the route on top: no leak warning for a request of more than a few prompts.
    setMaxListeners(2 * count + 10, controller.signal);
    this.controllers.add(controller);
    let released = false;
    return {
      controller,
      release: () => {
        if (released) return;
        released = true;
        this.inFlight -= count;
        this.controllers.delete(controller);
        if (this.inFlight === 0) {
          const waiters = this.idleWaiters;
          this.idleWaiters = [];
          waiters.forEach((w) => w());
        }
      },
    };
  }

  /** Runs one sequence to its end; token events go to onToken as they arrive. */
  async run(request: SequenceRequest): Promise<SequenceResult> {
    const model = this.readyModel();
    const { promptIds, params, signal, onToken } = request;
    this.metrics.promptTokens.inc({}, promptIds.length);
    const started = performance.now();
    let last = started;
    const tokens: GeneratedToken[] = [];
    let text = "";
    let finishReason: FinishReason | "cancelled" = "cancelled";
    // Cancelled by the client or a shutdown, the answer goes out at once: the engine ends the
    // sequence at its next step boundary, which can be seconds away while a long prompt's chunk
    // computes (a shutdown's 503 waited for it). What the stream still delivers is dropped. (A
    // deadline's answer is the text so far, held-back text included: it waits for the end.)
    const stream = model.stream(promptIds, { ...params, signal })[Symbol.asyncIterator]();
    const lingering = { begin: () => this.lingering++, end: () => this.lingering-- };
    let onAbort: (() => void) | undefined;
    const aborted = new Promise<"aborted">((resolve) => {
      onAbort = () => {
        const reason: unknown = signal.reason;
        if (!(reason instanceof CancelReason && reason.by === "deadline")) resolve("aborted");
      };
      if (signal.aborted) onAbort();
      else signal.addEventListener("abort", onAbort, { once: true });
    });
    const events = (async function* () {
      let ended = false;
      try {
        for (;;) {
          const next = await Promise.race([stream.next(), aborted]);
          if (next === "aborted") {
            // Let the run end by itself (it was cancelled); nothing waits for it.
            ended = true;
            lingering.begin();
            void (async () => {
              try {
                while (!(await stream.next()).done);
              } catch {
                // it ended with an error nobody is waiting for
              } finally {
                lingering.end();
              }
            })();
            return;
          }
          if (next.done) {
            ended = true;
            return;
          }
          yield next.value;
        }
      } finally {
        // The loop below stopped early (its own code threw): closing the stream cancels the sequence.
        if (!ended) void stream.return?.(undefined).catch(() => undefined);
      }
    })();
    try {
      for await (const event of events) {
        text += event.text;
        if (event.token) {
          const now = performance.now();
          if (tokens.length === 0) this.metrics.timeToFirstToken.observe((now - started) / 1000);
          else this.metrics.timePerToken.observe((now - last) / 1000);
          last = now;
          this.metrics.generatedTokens.inc();
          const { text: tokenText, ...rest } = event.token;
          const token: GeneratedToken = { ...rest, text: event.text, tokenText };
          tokens.push(token);
          onToken?.(token, event.finishReason);
        } else if (event.text && tokens.length > 0) {
          // Text released at the end without a token (a cancelled run's held-back tail).
          tokens[tokens.length - 1]!.text += event.text;
        }
        if (event.finishReason) finishReason = event.finishReason;
      }
    } catch (err) {
      signal.removeEventListener("abort", onAbort!);
      // The engine failed this sequence (its worker died, or its token choice failed): a 5xx-class
      // answer that says so; the client's own mistakes keep their 4xx.
      if (err instanceof BlossomError && err.code === "internal") {
        this.metrics.finished.inc({ reason: "error" });
        throw new HttpError("generation", `the engine failed while generating this sequence: ${err.message}`);
      }
      throw err;
    }
    signal.removeEventListener("abort", onAbort!);
    this.metrics.finished.inc({ reason: finishReason });
    const result: SequenceResult = { text, tokens, finishReason };
    if (finishReason === "cancelled") {
      const reason: unknown = signal.reason;
      if (reason instanceof CancelReason) result.cancelledBy = reason.by;
      else if (!signal.aborted) {
        // The engine ended the sequence without being asked to: a failed step.
        throw new HttpError("generation", "the engine failed while generating this sequence (see the server log); other requests were not affected");
      }
    }
    return result;
  }

  /** Stops admitting; resolves when every sequence has ended or `timeoutMs` has passed, then cancels the rest. */
  async drain(timeoutMs: number): Promise<{ cancelled: number }> {
    if (this.state === "ready" || this.state === "loading") this.state = "draining";
    if (this.inFlight === 0) return { cancelled: 0 };
    let timer: NodeJS.Timeout | undefined;
    const idle = new Promise<void>((resolve) => this.idleWaiters.push(resolve));
    const timedOut = await Promise.race([
      idle.then(() => false),
      new Promise<boolean>((resolve) => (timer = setTimeout(() => resolve(true), timeoutMs))),
    ]);
    clearTimeout(timer);
    if (!timedOut) return { cancelled: 0 };
    const cancelled = this.inFlight;
    for (const c of this.controllers) c.abort(new CancelReason("shutdown"));
    // Cancelled sequences end at the engine's next step; give their responses a moment to go out.
    let graceTimer: NodeJS.Timeout | undefined;
    await Promise.race([
      this.inFlight === 0 ? Promise.resolve() : new Promise<void>((resolve) => this.idleWaiters.push(resolve)),
      new Promise<void>((resolve) => (graceTimer = setTimeout(resolve, 5000))),
    ]);
    clearTimeout(graceTimer);
    return { cancelled };
  }
}

/** Maps a library error to what the client did wrong, or to an internal error. */
export function fromLibraryError(err: unknown): HttpError | undefined {
  if (err instanceof HttpError) return err;
  if (err instanceof BlossomError) {
    if (err.code === "parameter" || err.code === "input" || err.code === "memory") return new HttpError("validation", err.message);
    if (err.code === "aborted") return new HttpError("unavailable", err.message);
  }
  return undefined;
}
