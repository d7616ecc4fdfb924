/**
 * Checks every API shares once a request is well-formed: the prompt (empty, too long, token ids
 * out of range), max_new_tokens against the configured limit and the per-request token budget,
 * and the generation parameters. Each failure names the request's own field.
 */
import { randomInt } from "node:crypto";
import { BLOOM_WORD_CHAR } from "../tokenizer/synthetic.js";
import { hasLoneSurrogate, maxStopStringLength, resolveGenerationParams, type GenerationParams, type GenerationParamsInput } from "../generate/params.js";
import type { Model } from "../model.js";
import { BlossomError } from "../errors.js";
import { HttpError, validationError } from "./http-error.js";
import { scoreFor } from "./service.js";

export interface RequestLimits {
  maxInputLength: number;
  allowedMaxNewTokens: number;
  /** Most prompt + max_new_tokens for one sequence: input + new-token limits, within the batch budget. */
  maxTotalTokens: number;
  /** Most prompt + max_new_tokens over the running batch: --max-batch-total-tokens or the KV cache, whichever is smaller. */
  maxBatchTotalTokens: number;
  maxStopSequences: number;
  maxBatchSize: number;
}

export interface Prompt {
  ids: number[];
  /** The prompt as text (decoded, when it came as token ids). */
  text: string;
}

/** Tokenizes (or checks) one prompt. `field` is how the request names it (e.g. "inputs", "prompt[2]"). */
export async function preparePrompt(
  model: Model,
  input: string | number[],
  field: string,
  limits: RequestLimits,
  truncate?: { tokens: number; field: string },
): Promise<Prompt> {
  if (truncate !== undefined && truncate.tokens > limits.maxInputLength) {
    // As TGI: a prompt longer than that is refused anyway, after tokenizing all of it.
    throw validationError(truncate.field, `must be <= ${limits.maxInputLength} (--max-input-length); got ${truncate.tokens}`);
  }
  let ids: number[];
  let text: string;
  if (typeof input === "string") {
    if (input.length === 0) throw validationError(field, "must not be empty");
    // With truncate a long text is allowed: only its last tokens are kept.
    if (truncate === undefined) await checkText(model, input, field, limits);
    else checkWellFormed(input, field);
    const tail = truncate !== undefined ? await lastTokens(model, input, truncate.tokens) : undefined;
    ids = tail ?? (await model.tokenizer.encode(input));
    text = tail ? model.tokenizer.decode(tail, { skipSpecialTokens: false }) : input;
  } else {
    if (input.length === 0) throw validationError(field, "must not be empty");
    const vocab = model.config.vocabSize;
    input.forEach((id, i) => {
      if (!Number.isInteger(id) || id < 0 || id >= vocab) throw validationError(`${field}[${i}]`, `must be a token id in [0, ${vocab}) (got ${id})`);
    });
    ids = input;
    text = model.tokenizer.decode(ids, { skipSpecialTokens: false });
  }
  if (ids.length === 0) throw validationError(field, "encodes to no tokens");
  if (truncate !== undefined && ids.length > truncate.tokens) {
    ids = ids.slice(ids.length - truncate.tokens);
    text = model.tokenizer.decode(ids, { skipSpecialTokens: false });
  }
  checkTokenCount(ids.length, field, limits);
  return { ids, text };
}

/**
 * The last `count` tokens of a long text without tokenizing all of it (megabytes take seconds and
 * hundreds of MB). The text is cut where a word starts after a space: BLOOM's pre-tokenizer always
 * splits there (` ?word` pieces; whitespace and punctuation runs are pieces of their own), and
 * byte-level BPE merges only within a piece, so the tail's tokens are the whole text's from there
 * on. Two tails cut at different such places must agree on their last `count` tokens (a guard for a
 * tokenizer that splits otherwise). Undefined when the text is short, has no such place near the
 * end, or the tails disagree: the caller then tokenizes it all.
 */
async function lastTokens(model: Model, text: string, count: number): Promise<number[] | undefined> {
  const chars = (count + 64) * 16;
  if (text.length <= 2 * chars) return undefined;
  const wordAfterSpace = (i: number) => text[i] === " " && i + 1 < text.length && BLOOM_WORD_CHAR.test(String.fromCodePoint(text.codePointAt(i + 1)!));
  /** The nearest such cut at or before `from`, looking back at most 4096 characters. */
  const cutBefore = (from: number) => {
    for (let i = from; i > 0 && i > from - 4096; i--) if (wordAfterSpace(i)) return i;
    return undefined;
  };
  const first = cutBefore(text.length - chars);
  const second = first === undefined ? undefined : cutBefore(first - 1);
  if (first === undefined || second === undefined) return undefined;
  const tail = async (start: number) => {
    const ids = await model.tokenizer.encode(text.slice(start));
    return ids.length > count + 8 ? ids.slice(ids.length - count) : undefined;
  };
  const [a, b] = await Promise.all([tail(first), tail(second)]);
  return a && b && a.every((id, i) => id === b[i]) ? a : undefined;
}

export function checkTokenCount(tokens: number, field: string, limits: RequestLimits): void {
  if (tokens > limits.maxInputLength) throw validationError(field, `must have at most ${limits.maxInputLength} tokens (--max-input-length); got ${tokens}`);
}

/** The checks a text passes before it is tokenized: well-formed, and not too long for --max-input-length tokens. */
export async function checkText(model: Model, text: string, field: string, limits: RequestLimits): Promise<void> {
  checkWellFormed(text, field);
  await checkTextLength(model, text, field, limits);
}

/** Refuses text with a lone UTF-16 surrogate, which the tokenizer would silently read as U+FFFD. */
export function checkWellFormed(text: string, field: string): void {
  if (hasLoneSurrogate(text)) throw validationError(field, "must be well-formed text (it holds a lone UTF-16 surrogate, which is not a character)");
}

/**
 * Refuses a long text by tokenizing only its start (tokenizing megabytes takes seconds): if the first
 * 16 characters a token allowed already give more tokens than --max-input-length (one spare for a
 * token the cut may split), the whole text does too.
 */
export async function checkTextLength(model: Model, text: string, field: string, limits: RequestLimits): Promise<void> {
  const probe = limits.maxInputLength * 16;
  if (text.length <= probe) return;
  const tokens = (await model.tokenizer.encode(text.slice(0, probe))).length;
  if (tokens > limits.maxInputLength + 1) {
    throw validationError(field, `must have at most ${limits.maxInputLength} tokens (--max-input-length); its first ${probe} characters alone are ${tokens}`);
  }
}

/** The max_new_tokens a request gets when it does not say. */
export function defaultMaxNewTokens(limits: RequestLimits, promptLength: number, preferred: number): number {
  return Math.max(1, Math.min(preferred, limits.allowedMaxNewTokens, limits.maxTotalTokens - promptLength));
}

export function checkMaxNewTokens(field: string, maxNewTokens: number, promptLength: number, limits: RequestLimits, promptField: string): void {
  if (maxNewTokens > limits.allowedMaxNewTokens) {
    throw validationError(field, `must be <= ${limits.allowedMaxNewTokens} (--allowed-max-new-tokens); got ${maxNewTokens}`);
  }
  if (promptLength + maxNewTokens > limits.maxTotalTokens) {
    throw validationError(
      field,
      `${promptField} (${promptLength} tokens) + ${field} (${maxNewTokens}) = ${promptLength + maxNewTokens} must be <= ${limits.maxTotalTokens}, the most tokens one sequence may hold (--max-input-length + --allowed-max-new-tokens, within --max-batch-total-tokens and the KV cache)`,
    );
  }
}

export function checkStops(field: string, stops: string[], limits: RequestLimits): void {
  if (stops.length > limits.maxStopSequences) {
    throw validationError(field, `must have at most ${limits.maxStopSequences} stop sequences (got ${stops.length})`);
  }
  stops.forEach((s, i) => {
    if (s.length === 0) throw validationError(`${field}[${i}]`, "must not be empty");
    if (s.length > maxStopStringLength) throw validationError(`${field}[${i}]`, `must have at most ${maxStopStringLength} characters (got ${s.length})`);
    checkWellFormed(s, `${field}[${i}]`);
  });
}

/** A seed for a sampled request that gave none, so it can be reported back (as TGI does). */
export function drawSeed(): number {
  return randomInt(0, 2 ** 47);
}

/**
 * Validates the library parameters; a failure (which the API schemas should already have caught)
 * becomes a validation error naming `names[field]` when the API has its own name for the field.
 */
export function resolveParams(input: GenerationParamsInput, names: Partial<Record<keyof GenerationParams, string>> = {}): GenerationParams {
  try {
    return resolveGenerationParams(input);
  } catch (err) {
    if (err instanceof BlossomError) {
      const [camel, ...rest] = err.message.split(":");
      const field = names[camel as keyof GenerationParams] ?? camel!;
      // Other parameters the message refers to ("<= maxNewTokens (16)") by this API's names too.
      let text = rest.join(":");
      for (const [name, apiName] of Object.entries(names)) text = text.replace(new RegExp(`\\b${name}\\b`, "g"), apiName);
      throw new HttpError("validation", `${field}:${text}`, field);
    }
    throw err;
  }
}

/** Whether TGI-style parameters ask for sampling by a warper (TGI samples then, whatever do_sample says). */
export function asksForSampling(p: { temperature?: number | null; top_k?: number | null; top_p?: number | null; typical_p?: number | null }): boolean {
  return (p.temperature != null && p.temperature !== 1) || p.top_k != null || (p.top_p != null && p.top_p < 1) || (p.typical_p != null && p.typical_p < 1);
}

/** log p of each prompt token given the ones before it; null for the first, which has no context (as TGI and OpenAI report it). */
export async function promptLogprobs(model: Model, ids: number[], signal: AbortSignal): Promise<(number | null)[]> {
  const logprobs = await scoreFor(signal, (s) => model.tokenLogprobs(ids, 1, { signal: s }));
  return ids.map((_, i) => (i === 0 ? null : logprobs[i - 1]!));
}
