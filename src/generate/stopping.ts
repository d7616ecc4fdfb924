/**
 * Deciding when a sequence stops, and turning its tokens into text as they arrive.
 */
import type { GenerationParams } from "./params.js";

/** Why a sequence stopped, with text-generation-inference's names. */
export type FinishReason = "length" | "eos_token" | "stop_sequence";

/**
 * The stop reason after a token has been appended, or undefined to go on. `numGenerated` counts the new token.
 * Like text-generation-inference's StoppingCriteria, the length limit is checked before EOS, so a last token
 * that is also EOS reports "length". An EOS among the first minNewTokens generated tokens does not stop (the
 * chooser suppresses EOS there anyway; this covers tokens chosen some other way).
 */
export function finishReasonAfter(
  tokenId: number,
  numGenerated: number,
  params: GenerationParams,
  eosTokenIds: readonly number[],
): FinishReason | undefined {
  if (numGenerated >= params.maxNewTokens) return "length";
  if (numGenerated > params.minNewTokens && eosTokenIds.includes(tokenId)) return "eos_token";
  return undefined;
}

const replacementCharacter = "\uFFFD";

/**
 * Streaming detokenization, the way text-generation-inference's decode_token does it: decode a short window of
 * recent tokens and emit only what it adds to the text of the window's already-emitted part. A byte-level BPE
 * token may hold part of a multi-byte UTF-8 character, which decodes to U+FFFD until the rest arrives, so text
 * ending in U+FFFD is held back. All pushes plus flush() concatenate to decode(all ids) for tokenizers whose
 * decoding of a sequence is the concatenation of its parts' decodings once characters are complete (BLOOM's
 * byte-level BPE is one).
 *
 * `decode` is synchronous and skips special tokens.
 */
export class IncrementalDecoder {
  private readonly decode: (ids: number[]) => string;
  /** Tokens from prefixOffset on; older ones are dropped because they are never decoded again. */
  private window: number[] = [];
  /** window[0..readOffset) have been emitted; their text is prefixText. */
  private readOffset = 0;
  private prefixText = "";

  /**
   * `context`: optionally the last few prompt ids (text-generation-inference uses 5), decoded as left context
   * but never emitted, so the first generated tokens come out as they would after the prompt. That matters for
   * decoders that treat the start of a sequence specially (SentencePiece's leading space); BLOOM's byte-level
   * BPE does not need it. With context, the emitted text is decode(context + ids) minus decode(context).
   */
  constructor(decode: (ids: number[]) => string, context: readonly number[] = []) {
    this.decode = decode;
    if (context.length > 0) {
      this.window = [...context];
      this.readOffset = context.length;
      this.prefixText = decode(this.window);
    }
  }

  /** Adds one token; returns the text that is now certain (possibly ""). */
  push(tokenId: number): string {
    this.window.push(tokenId);
    const text = this.decode(this.window);
    if (text.length > this.prefixText.length && !text.endsWith(replacementCharacter)) {
      const emitted = text.slice(this.prefixText.length);
      // The new window starts at the old read offset: the tokens just emitted stay as left context.
      this.window = this.window.slice(this.readOffset);
      this.readOffset = this.window.length;
      this.prefixText = this.readOffset > 0 ? this.decode(this.window) : "";
      return emitted;
    }
    return "";
  }

  /** Whatever is still held back (e.g. an incomplete character at the very end). */
  flush(): string {
    const text = this.window.length > 0 ? this.decode(this.window) : "";
    const rest = text.length > this.prefixText.length ? text.slice(this.prefixText.length) : "";
    this.window = [];
    this.readOffset = 0;
    this.prefixText = "";
    return rest;
  }
}

/**
 * Finds stop strings in streamed text that may split them anywhere. It holds back the longest tail that could
 * still begin a stop string and emits the rest; on a match it emits the text before the stop string and stops.
 * When several stop strings match, the one that was completed first in the stream wins (the earliest end; at
 * equal ends, the earliest start), so the outcome does not depend on how the text was split into pushes.
 */
export class StopStringMatcher {
  private readonly stops: readonly string[];
  private readonly longest: number;
  private pending = "";
  private stopped = false;

  constructor(stops: readonly string[]) {
    this.stops = stops.filter((stop) => stop.length > 0);
    this.longest = this.stops.reduce((max, stop) => Math.max(max, stop.length), 0);
  }

  push(text: string): { emit: string; stopped: boolean } {
    if (this.stopped) return { emit: "", stopped: true };
    if (this.stops.length === 0) return { emit: text, stopped: false };
    const buffer = this.pending + text;

    let matchStart = -1;
    let matchEnd = Infinity;
    // A match must end inside the new text: one inside pending alone would have been found before.
    const searchFrom = Math.max(0, this.pending.length - this.longest + 1);
    for (const stop of this.stops) {
      const at = buffer.indexOf(stop, Math.max(0, searchFrom));
      if (at < 0) continue;
      const end = at + stop.length;
      if (end < matchEnd || (end === matchEnd && at < matchStart)) {
        matchStart = at;
        matchEnd = end;
      }
    }
    if (matchStart >= 0) {
      this.stopped = true;
      this.pending = "";
      return { emit: buffer.slice(0, matchStart), stopped: true };
    }

    const held = this.longestPossibleStart(buffer);
    this.pending = buffer.slice(buffer.length - held);
    return { emit: buffer.slice(0, buffer.length - held), stopped: false };
  }

  /** The held-back text, once no more is coming. Empty after a stop. */
  flush(): string {
    const rest = this.stopped ? "" : this.pending;
    this.pending = "";
    return rest;
  }

  /** Length of the longest suffix of text that is a proper prefix of some stop string. */
  private longestPossibleStart(text: string): number {
    for (let length = Math.min(this.longest - 1, text.length); length > 0; length--) {
      const tail = text.slice(text.length - length);
      for (const stop of this.stops) if (stop.length > length && stop.startsWith(tail)) return length;
    }
    return 0;
  }
}
