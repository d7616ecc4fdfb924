/**
 * Choosing one sequence's next token from its logits: the logits processors, then greedy or sampling.
 *
 * The order and the definitions follow Hugging Face transformers, GenerationMixin._get_logits_processor
 * (src/transformers/generation/utils.py) and src/transformers/generation/logits_process.py:
 *   processors, always:        RepetitionPenaltyLogitsProcessor -> NoRepeatNGramLogitsProcessor
 *                              -> MinNewTokensLengthLogitsProcessor
 *   warpers, only when sampling: TemperatureLogitsWarper (temperature != 1) -> TopKLogitsWarper (top_k != 0)
 *                              -> TopPLogitsWarper (top_p < 1) -> TypicalLogitsWarper (typical_p < 1),
 *                              each with min_tokens_to_keep = 1 (no beam search here)
 * then softmax and a draw. Greedy (doSample false, or temperature 0) is argmax of the processed logits, the
 * lowest id among equal maxima like torch.argmax; HF applies no warper then either.
 *
 * Where this differs from running the PyTorch code, and why:
 * - Warpers work on a candidate list (the tokens still finite) instead of masking a vocabulary-sized tensor,
 *   and select with a heap or a quickselect instead of sorting the whole vocabulary. The kept sets are the
 *   ones HF's definitions give in exact arithmetic, computed in float64 rather than float32, so a token
 *   sitting exactly on a cumulative-probability boundary may fall the other way.
 * - Where HF's choice among equal logits depends on torch.sort's unstable order (top-p), ties go to the lower
 *   token id. Top-k and typical keep every token tied with the last one kept, exactly as HF does.
 * - Draws come from our own seeded PRNG (rng.ts), so a seed reproduces Blossom's samples, not torch's.
 *
 * `logprob` is the log-probability of the chosen token under the distribution actually drawn from: after the
 * processors and every warper (renormalised over the kept tokens) when sampling; for greedy, the log-softmax of
 * the processed logits (no temperature). This is what text-generation-inference reports for a token.
 */
import { BlossomError, parameterError } from "../errors.js";
import { argmaxAndExpSum, expNegative } from "./fastexp.js";
import type { GenerationParams } from "./params.js";
import { Rng } from "./rng.js";

export interface ChosenToken {
  tokenId: number;
  logprob: number;
}

export interface TokenChooserOptions {
  /** Logits beyond vocabSize (BLOOM pads its head to a multiple of 128) are never chosen. */
  vocabSize: number;
  eosTokenIds: number[];
}

/** Above this k, top-k selects with a quickselect over every finite token instead of a k-sized heap. */
const heapTopKLimit = 4096;
/** Ranges at most this long are insertion-sorted instead of partitioned further. */
const smallRange = 24;

/**
 * Scratch arrays shared by every chooser in this thread. next() is synchronous, so two calls never use them at
 * once, and one set per worker (not per sequence) keeps a batch of 64 sequences from holding 64 x 3 MB.
 * They grow to the largest vocabulary seen and are then reused: no vocabulary-sized allocation per step.
 */
class Scratch {
  /** Candidate token ids, and for each its unnormalised probability and its selection key. */
  ids = new Int32Array(0);
  weights = new Float64Array(0);
  keys = new Float64Array(0);
  heapValues = new Float64Array(0);
  heapIds = new Int32Array(0);
  /** seen[t] === seenEpoch marks token t as already penalised in this step. */
  seen = new Uint32Array(0);
  seenEpoch = 0;

  reserveCandidates(count: number): void {
    if (this.ids.length >= count) return;
    this.ids = new Int32Array(count);
    this.weights = new Float64Array(count);
    this.keys = new Float64Array(count);
  }

  reserveHeap(size: number): void {
    if (this.heapValues.length >= size) return;
    this.heapValues = new Float64Array(size);
    this.heapIds = new Int32Array(size);
  }

  /** A fresh epoch for marking tokens, with seen[] large enough for the vocabulary. */
  nextSeenEpoch(vocabSize: number): number {
    if (this.seen.length < vocabSize) {
      this.seen = new Uint32Array(vocabSize);
      this.seenEpoch = 0;
    }
    if (this.seenEpoch === 0xffffffff) {
      this.seen.fill(0);
      this.seenEpoch = 0;
    }
    return ++this.seenEpoch;
  }
}

const scratch = new Scratch();

export class TokenChooser {
  readonly params: Readonly<GenerationParams>;
  readonly vocabSize: number;
  readonly eosTokenIds: readonly number[];
  /** True when the choice is argmax: doSample false, or temperature 0. */
  readonly greedy: boolean;
  /** The sampling seed actually used (drawn from crypto when params.seed is undefined); undefined for greedy. */
  readonly seed: number | undefined;
  private readonly rng: Rng | undefined;

  constructor(params: GenerationParams, options: TokenChooserOptions) {
    const { vocabSize, eosTokenIds } = options;
    if (!Number.isSafeInteger(vocabSize) || vocabSize < 1) {
      throw parameterError("vocabSize", `must be an integer >= 1 (got ${vocabSize})`);
    }
    for (const id of eosTokenIds) {
      if (!Number.isInteger(id) || id < 0 || id >= vocabSize) {
        throw parameterError("eosTokenIds", `must be token ids in [0, ${vocabSize}) (got ${id})`);
      }
    }
    this.params = Object.freeze({ ...params, stop: [...params.stop] });
    this.vocabSize = vocabSize;
    this.eosTokenIds = Object.freeze([...eosTokenIds]);
    this.greedy = !params.doSample || params.temperature === 0;
    this.rng = this.greedy ? undefined : new Rng(params.seed);
    this.seed = this.rng?.seed;
  }

  /**
   * Picks the next token. `logits` holds the model's float32 scores for the next position (at least vocabSize
   * of them) and is modified in place. `tokens` is the whole sequence so far, prompt included; `numGenerated`
   * is how many of them were generated (the last numGenerated).
   */
  next(logits: Float32Array, tokens: readonly number[], numGenerated: number): ChosenToken {
    this.applyProcessors(logits, tokens, numGenerated);
    if (this.greedy) return chooseGreedy(logits, this.vocabSize);
    const warped = this.warp(logits);
    return this.draw(logits, warped);
  }

  /**
   * The distribution next() would choose from for these logits (processed, and warped when sampling), as
   * token ids in increasing order with their probabilities. For tests and debugging: it allocates and does
   * not advance the random stream. Modifies `logits` in place like next().
   */
  distribution(
    logits: Float32Array,
    tokens: readonly number[],
    numGenerated: number,
  ): { tokenIds: Int32Array; probs: Float64Array } {
    this.applyProcessors(logits, tokens, numGenerated);
    const n = this.vocabSize;
    if (this.greedy) {
      const { max, sum, finite } = argmaxAndExpSum(logits, n);
      checkDenominator(max, finite);
      const ids: number[] = [];
      for (let id = 0; id < n; id++) if (logits[id]! > -Infinity) ids.push(id);
      return {
        tokenIds: Int32Array.from(ids),
        probs: Float64Array.from(ids, (id) => Math.exp(logits[id]! - max) / sum),
      };
    }
    const { count, total } = this.warp(logits);
    const order = Array.from({ length: count }, (_, i) => i).sort((a, b) => scratch.ids[a]! - scratch.ids[b]!);
    return {
      tokenIds: Int32Array.from(order, (i) => scratch.ids[i]!),
      probs: Float64Array.from(order, (i) => scratch.weights[i]! / total),
    };
  }

  private applyProcessors(logits: Float32Array, tokens: readonly number[], numGenerated: number): void {
    const n = this.vocabSize;
    if (logits.length < n) {
      throw new BlossomError("input", `logits: expected at least vocabSize (${n}) values (got ${logits.length})`);
    }
    if (!Number.isInteger(numGenerated) || numGenerated < 0 || numGenerated > tokens.length) {
      throw new BlossomError(
        "input",
        `numGenerated: must be an integer in [0, tokens.length = ${tokens.length}] (got ${numGenerated})`,
      );
    }
    const { repetitionPenalty, noRepeatNgramSize, minNewTokens } = this.params;
    if (repetitionPenalty !== 1) applyRepetitionPenalty(logits, n, tokens, repetitionPenalty);
    if (noRepeatNgramSize > 0) banRepeatedNgrams(logits, n, tokens, noRepeatNgramSize);
    if (numGenerated < minNewTokens) suppressTokens(logits, this.eosTokenIds);
  }

  /**
   * Runs the warpers. Leaves the kept tokens in scratch.ids[0..count) with their unnormalised probabilities
   * exp(logit/T - maxScaled) in scratch.weights, and returns their sum.
   */
  private warp(logits: Float32Array): { count: number; total: number; maxScaled: number } {
    const n = this.vocabSize;
    const { temperature, topK, topP, typicalP } = this.params;

    // TopKLogitsWarper keeps every token >= the k-th largest score. Dividing by T > 0 keeps the order, so the
    // set can be chosen on the raw logits before the temperature is applied.
    let count =
      topK > 0 && topK < n
        ? topK <= heapTopKLimit
          ? selectTopKWithHeap(logits, n, topK)
          : selectTopKBySelection(logits, n, topK)
        : collectFinite(logits, n);
    if (count === 0) throw noTokenLeftError();

    const { ids, weights, keys } = scratch;
    let maxRaw = -Infinity;
    for (let i = 0; i < count; i++) {
      const value = logits[ids[i]!]!;
      if (value > maxRaw) maxRaw = value;
    }
    if (maxRaw === Infinity) throw nonFiniteLogitsError();
    const maxScaled = maxRaw / temperature;
    let total = 0;
    for (let i = 0; i < count; i++) {
      const weight = expNegative(maxScaled - logits[ids[i]!]! / temperature);
      weights[i] = weight;
      total += weight;
    }

    if (topP < 1) {
      // TopPLogitsWarper: in decreasing probability, keep a token while the mass before it is < top_p.
      for (let i = 0; i < count; i++) keys[i] = -logits[ids[i]!]!;
      count = selectPrefixByMass(count, topP * total, false);
      total = sumWeights(count);
    }

    if (typicalP < 1) {
      // TypicalLogitsWarper: order tokens by |-log p - H| (H the entropy), keep them while the mass before is
      // < typical_p, plus every token tied with the last kept one. It may drop the most likely token.
      const logTotal = Math.log(total);
      let entropy = 0;
      for (let i = 0; i < count; i++) {
        const logProb = logits[ids[i]!]! / temperature - maxScaled - logTotal;
        keys[i] = logProb; // stashed; turned into the key below once the entropy is known
        entropy -= (weights[i]! / total) * logProb;
      }
      for (let i = 0; i < count; i++) keys[i] = Math.abs(-keys[i]! - entropy);
      count = selectPrefixByMass(count, typicalP * total, true);
      total = sumWeights(count);
    }
    return { count, total, maxScaled };
  }

  private draw(logits: Float32Array, warped: { count: number; total: number; maxScaled: number }): ChosenToken {
    const { count, total, maxScaled } = warped;
    const { ids, weights } = scratch;
    const threshold = this.rng!.nextFloat() * total;
    let chosen = -1;
    let cumulative = 0;
    for (let i = 0; i < count; i++) {
      const weight = weights[i]!;
      cumulative += weight;
      if (cumulative > threshold) {
        chosen = i;
        break;
      }
      if (weight > 0) chosen = i; // if rounding leaves the threshold above the sum, the last possible token
    }
    const tokenId = ids[chosen]!;
    const logprob = logits[tokenId]! / this.params.temperature - maxScaled - Math.log(total);
    return { tokenId, logprob };
  }
}

/** Argmax of the processed logits, with its log-softmax. */
function chooseGreedy(logits: Float32Array, n: number): ChosenToken {
  const { argmax, max, sum, finite } = argmaxAndExpSum(logits, n);
  checkDenominator(max, finite);
  return { tokenId: argmax, logprob: -Math.log(sum) };
}

function checkDenominator(max: number, finite: boolean): void {
  if (!finite) throw nonFiniteLogitsError();
  if (max === -Infinity) throw noTokenLeftError();
}

function nonFiniteLogitsError(): BlossomError {
  return new BlossomError("internal", "logits: contain NaN or +Infinity (the model's output is broken)");
}

function noTokenLeftError(): BlossomError {
  return new BlossomError(
    "input",
    "logits: every token is -Infinity after the processors (repetition penalty, n-gram ban, EOS suppression)",
  );
}

/**
 * RepetitionPenaltyLogitsProcessor (CTRL, https://arxiv.org/abs/1909.05858): every distinct token in the
 * sequence, prompt included, gets score < 0 ? score * penalty : score / penalty, once however often it occurs.
 */
export function applyRepetitionPenalty(
  logits: Float32Array,
  vocabSize: number,
  tokens: readonly number[],
  penalty: number,
): void {
  const epoch = scratch.nextSeenEpoch(vocabSize);
  const seen = scratch.seen;
  for (let i = 0; i < tokens.length; i++) {
    const token = tokens[i]!;
    if (!(token >= 0 && token < vocabSize && Number.isInteger(token))) throw tokenOutOfRange(i, token, vocabSize);
    if (seen[token] === epoch) continue;
    seen[token] = epoch;
    const score = logits[token]!;
    logits[token] = score < 0 ? score * penalty : score / penalty;
  }
}

/**
 * NoRepeatNGramLogitsProcessor: if the last size-1 tokens, followed by token t, would repeat an n-gram that
 * already occurs anywhere in the sequence (prompt included), t is banned. O(length x size) per step, which
 * for a few thousand tokens is microseconds and needs no state carried between steps.
 */
export function banRepeatedNgrams(
  logits: Float32Array,
  vocabSize: number,
  tokens: readonly number[],
  size: number,
): void {
  const length = tokens.length;
  if (size < 1 || length + 1 < size) return;
  const prefixStart = length - (size - 1);
  for (let start = 0; start + size <= length; start++) {
    let matches = true;
    for (let offset = 0; offset < size - 1; offset++) {
      if (tokens[start + offset] !== tokens[prefixStart + offset]) {
        matches = false;
        break;
      }
    }
    if (!matches) continue;
    const banned = tokens[start + size - 1]!;
    if (!(banned >= 0 && banned < vocabSize && Number.isInteger(banned))) {
      throw tokenOutOfRange(start + size - 1, banned, vocabSize);
    }
    logits[banned] = -Infinity;
  }
}

/** MinNewTokensLengthLogitsProcessor's effect: these tokens (the EOS ids) become impossible. */
export function suppressTokens(logits: Float32Array, tokenIds: readonly number[]): void {
  for (const id of tokenIds) logits[id] = -Infinity;
}

function tokenOutOfRange(index: number, token: number, vocabSize: number): BlossomError {
  return new BlossomError("input", `tokens[${index}]: must be a token id in [0, ${vocabSize}) (got ${token})`);
}

/** Every token whose logit is not -Infinity becomes a candidate. */
function collectFinite(logits: Float32Array, n: number): number {
  scratch.reserveCandidates(n);
  const ids = scratch.ids;
  let count = 0;
  let sawNaN = false;
  for (let id = 0; id < n; id++) {
    const value = logits[id]!;
    if (value > -Infinity) ids[count++] = id;
    else if (value !== value) sawNaN = true;
  }
  if (sawNaN) throw nonFiniteLogitsError();
  return count;
}

/**
 * Top-k for small k in one pass: a min-heap of the k largest logits seen so far; most logits lose a single
 * compare against its root. Ties matter because HF keeps every token >= the k-th largest value: whenever a
 * value equal to the root is turned away or evicted we remember it, and if it equals the final k-th value
 * a second pass collects all the tied tokens.
 */
function selectTopKWithHeap(logits: Float32Array, n: number, k: number): number {
  scratch.reserveHeap(k);
  const heapValues = scratch.heapValues;
  const heapIds = scratch.heapIds;
  heapValues.fill(-Infinity, 0, k);
  heapIds.fill(-1, 0, k);
  let root = -Infinity;
  let lastDropped = NaN;
  let sawNaN = false;
  for (let id = 0; id < n; id++) {
    const value = logits[id]!;
    if (value > root) {
      lastDropped = root;
      siftDown(heapValues, heapIds, k, value, id);
      root = heapValues[0]!;
    } else if (value === root) {
      lastDropped = value;
    } else if (value !== value) {
      sawNaN = true;
    }
  }
  if (sawNaN) throw nonFiniteLogitsError();

  let count = 0;
  if (root > -Infinity && lastDropped === root) {
    scratch.reserveCandidates(n);
    const ids = scratch.ids;
    for (let id = 0; id < n; id++) if (logits[id]! >= root) ids[count++] = id;
    return count;
  }
  scratch.reserveCandidates(k);
  const ids = scratch.ids;
  for (let i = 0; i < k; i++) if (heapValues[i]! > -Infinity) ids[count++] = heapIds[i]!;
  return count;
}

/** Replaces the root of a min-heap of `size` entries with (value, id) and restores the heap order. */
function siftDown(values: Float64Array, ids: Int32Array, size: number, value: number, id: number): void {
  let at = 0;
  for (;;) {
    const left = 2 * at + 1;
    if (left >= size) break;
    const right = left + 1;
    const child = right < size && values[right]! < values[left]! ? right : left;
    if (!(values[child]! < value)) break;
    values[at] = values[child]!;
    ids[at] = ids[child]!;
    at = child;
  }
  values[at] = value;
  ids[at] = id;
}

/** Top-k for large k: the first k finite tokens in decreasing logit order, plus ties with the k-th. */
function selectTopKBySelection(logits: Float32Array, n: number, k: number): number {
  const count = collectFinite(logits, n);
  if (count <= k) return count;
  const { ids, weights, keys } = scratch;
  for (let i = 0; i < count; i++) {
    keys[i] = -logits[ids[i]!]!;
    weights[i] = 1;
  }
  return selectPrefixByMass(count, k, true);
}

function sumWeights(count: number): number {
  const weights = scratch.weights;
  let total = 0;
  for (let i = 0; i < count; i++) total += weights[i]!;
  return total;
}

/**
 * Reorders candidates [0, count) so that [0, kept) holds the kept ones, and returns kept. Candidates are
 * ordered by (key ascending, id ascending); walking that order, a candidate is kept while the weight of the
 * candidates before it is < target, so the first is always kept (HF's min_tokens_to_keep = 1). With
 * includeTies, every candidate whose key equals the last kept one's is kept too.
 *
 * A quickselect on mass: partition around a pivot; if the part before it already weighs >= what is still
 * needed the cut lies inside it, otherwise all of it and the pivot are kept and the search goes on after.
 * Expected O(count), where sorting would be O(count log count) over up to the whole vocabulary.
 */
function selectPrefixByMass(count: number, target: number, includeTies: boolean): number {
  const { ids, weights, keys } = scratch;
  let lo = 0;
  let hi = count;
  let need = target;
  let kept = -1;
  while (hi - lo > smallRange) {
    const pivot = partition(lo, hi);
    let massBefore = 0;
    for (let i = lo; i < pivot; i++) massBefore += weights[i]!;
    if (massBefore >= need) {
      hi = pivot;
      continue;
    }
    need -= massBefore + weights[pivot]!;
    lo = pivot + 1;
    if (!(need > 0)) {
      kept = lo;
      break;
    }
  }
  if (kept < 0) {
    insertionSort(lo, hi);
    kept = lo;
    while (kept < hi && need > 0) need -= weights[kept++]!;
  }
  if (includeTies && kept < count) {
    let lastKey = -Infinity;
    for (let i = 0; i < kept; i++) if (keys[i]! > lastKey) lastKey = keys[i]!;
    for (let i = kept; i < count; i++) if (keys[i] === lastKey) swap(ids, weights, keys, i, kept++);
  }
  return kept;
}

/** Lomuto partition of [lo, hi) around a median-of-three pivot; returns the pivot's final position. */
function partition(lo: number, hi: number): number {
  const { ids, weights, keys } = scratch;
  const mid = lo + ((hi - lo) >> 1);
  const last = hi - 1;
  // Order lo, mid, last so the median lands at mid, then park it at the end.
  if (precedes(keys, ids, mid, lo)) swap(ids, weights, keys, mid, lo);
  if (precedes(keys, ids, last, lo)) swap(ids, weights, keys, last, lo);
  if (precedes(keys, ids, last, mid)) swap(ids, weights, keys, last, mid);
  swap(ids, weights, keys, mid, last);
  const pivotKey = keys[last]!;
  const pivotId = ids[last]!;
  let store = lo;
  for (let i = lo; i < last; i++) {
    const key = keys[i]!;
    if (key < pivotKey || (key === pivotKey && ids[i]! < pivotId)) {
      if (i !== store) swap(ids, weights, keys, i, store);
      store++;
    }
  }
  swap(ids, weights, keys, store, last);
  return store;
}

function insertionSort(lo: number, hi: number): void {
  const { ids, weights, keys } = scratch;
  for (let i = lo + 1; i < hi; i++) {
    const key = keys[i]!;
    const id = ids[i]!;
    const weight = weights[i]!;
    let j = i - 1;
    while (j >= lo && (keys[j]! > key || (keys[j] === key && ids[j]! > id))) {
      keys[j + 1] = keys[j]!;
      ids[j + 1] = ids[j]!;
      weights[j + 1] = weights[j]!;
      j--;
    }
    keys[j + 1] = key;
    ids[j + 1] = id;
    weights[j + 1] = weight;
  }
}

function precedes(keys: Float64Array, ids: Int32Array, a: number, b: number): boolean {
  return keys[a]! < keys[b]! || (keys[a] === keys[b] && ids[a]! < ids[b]!);
}

function swap(ids: Int32Array, weights: Float64Array, keys: Float64Array, a: number, b: number): void {
  const id = ids[a]!;
  ids[a] = ids[b]!;
  ids[b] = id;
  const weight = weights[a]!;
  weights[a] = weights[b]!;
  weights[b] = weight;
  const key = keys[a]!;
  keys[a] = keys[b]!;
  keys[b] = key;
}
