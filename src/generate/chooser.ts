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
 *   and select with a heap (top-k), a histogram over probability buckets and a quickselect (top-p, typical)
 *   instead of sorting the whole vocabulary. The kept sets are the
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
import { argmaxAndExpSum, expNegative, warmUpFeedback } from "./fastexp.js";
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
/** Above this many candidates, selection by mass starts with a histogram over key buckets. */
const bucketedSelectMin = 4096;
/** Keys are bucketed by floor(key * keyBucketsPerUnit) (1/64 nat for top-p); larger keys share the last one. */
const keyBuckets = 8192;
const keyBucketsPerUnit = 64;

/**
 * Scratch arrays shared by every chooser in this thread. next() is synchronous, so two calls never use them at
 * once, and one set per worker (not per sequence) keeps a batch of 64 sequences from holding 64 x 6 MB.
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

  /** For selection by mass over many candidates: the mass and size of each key bucket, room for one bucket. */
  bucketMass = new Float64Array(keyBuckets);
  bucketSize = new Int32Array(keyBuckets);
  spareIds = new Int32Array(0);
  spareWeights = new Float64Array(0);
  spareKeys = new Float64Array(0);
  /** collectAndWeigh's sum of weights. */
  collectedTotal = 0;
  /** narrowToCutBucket's results: where the cut bucket starts (-1: keep all), and the mass still missing. */
  cutStart = -1;
  cutNeed = 0;

  reserveCandidates(count: number): void {
    if (this.ids.length >= count) return;
    this.ids = new Int32Array(count);
    this.weights = new Float64Array(count);
    this.keys = new Float64Array(count);
  }

  reserveSpare(count: number): void {
    if (this.spareIds.length >= count) return;
    this.spareIds = new Int32Array(count);
    this.spareWeights = new Float64Array(count);
    this.spareKeys = new Float64Array(count);
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
    // A temperature so small that 1/T overflows is the T -> 0 limit of sampling: argmax.
    this.greedy = !params.doSample || params.temperature === 0 || !Number.isFinite(1 / params.temperature);
    this.rng = this.greedy ? undefined : new Rng(params.seed);
    this.seed = this.rng?.seed;
  }

  /**
   * When the next choice is plain argmax (greedy with no repetition penalty and no n-gram ban), the ids
   * to mask first (the eos ids while min_new_tokens is not reached, else none), so a caller may choose
   * for many sequences at once; undefined when next() must run.
   */
  plainGreedyMask(numGenerated: number): readonly number[] | undefined {
    if (!this.greedy || this.params.repetitionPenalty !== 1 || this.params.noRepeatNgramSize !== 0) return undefined;
    return numGenerated < this.params.minNewTokens ? this.eosTokenIds : [];
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
   * exp((logit - maxRaw) / T) in scratch.weights, and returns their sum.
   */
  private warp(logits: Float32Array): { count: number; total: number; maxRaw: number } {
    const n = this.vocabSize;
    const { temperature, topK, topP, typicalP } = this.params;

    // TopKLogitsWarper keeps every token >= the k-th largest score. Dividing by T > 0 keeps the order, so the
    // set can be chosen on the raw logits before the temperature is applied.
    let count: number;
    let total: number;
    let maxRaw: number;
    if (topK > 0 && topK < n) {
      count = topK <= heapTopKLimit ? selectTopKWithHeap(logits, n, topK) : selectTopKBySelection(logits, n, topK);
      if (count === 0) throw noTokenLeftError();
      maxRaw = candidatesMax(logits, count);
      if (maxRaw === Infinity) throw nonFiniteLogitsError();
      total = weighCandidates(logits, count, maxRaw, 1 / temperature);
    } else {
      maxRaw = maxLogit(logits, n);
      if (maxRaw === -Infinity) throw noTokenLeftError();
      count = collectAndWeigh(logits, n, maxRaw, 1 / temperature);
      total = scratch.collectedTotal;
    }

    if (topP < 1) {
      // TopPLogitsWarper: in decreasing probability, keep a token while the mass before it is < top_p.
      count = selectPrefixByMass(count, topP * total, false);
      total = sumWeights(count);
    }

    if (typicalP < 1) {
      // TypicalLogitsWarper: order tokens by |-log p - H| (H the entropy), keep them while the mass before is
      // < typical_p, plus every token tied with the last kept one. It may drop the most likely token.
      setTypicalKeys(count, total);
      count = selectPrefixByMass(count, typicalP * total, true);
      total = sumWeights(count);
    }
    return { count, total, maxRaw };
  }

  private draw(logits: Float32Array, warped: { count: number; total: number; maxRaw: number }): ChosenToken {
    const { count, total, maxRaw } = warped;
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
    // (logit - max) / T rather than logit / T - max / T: finite even where logit / T would overflow.
    const logprob = (logits[tokenId]! - maxRaw) / this.params.temperature - Math.log(total);
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
  return new BlossomError("internal", "logits: contain NaN or +Infinity (the model's output is broken: look for NaN or infinite values in the checkpoint's weights)");
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
 * Computed as torch does on float32 scores: float32 operands (the penalty rounded to float32), the result
 * rounded to float32. A product of two float32 values is exact in a double, and a double quotient rounded to
 * float32 is the correctly rounded float32 quotient, so the stored values are bit-identical.
 */
/** The largest finite float32. */
const maxFloat32 = 3.4028234663852886e38;

export function applyRepetitionPenalty(
  logits: Float32Array,
  vocabSize: number,
  tokens: readonly number[],
  penalty: number,
): void {
  const epoch = scratch.nextSeenEpoch(vocabSize);
  const seen = scratch.seen;
  // In float32 a tiny penalty would round to 0 (score / 0) and a score / penalty overflow: the smallest
  // normal float32 as the penalty and the float32 range for the result keep every score finite.
  const penalty32 = Math.max(Math.fround(penalty), 2 ** -126);
  for (let i = 0; i < tokens.length; i++) {
    const token = tokens[i]!;
    if (!(token >= 0 && token < vocabSize && Number.isInteger(token))) throw tokenOutOfRange(i, token, vocabSize);
    if (seen[token] === epoch) continue;
    seen[token] = epoch;
    const score = logits[token]!;
    logits[token] = Math.max(-maxFloat32, Math.min(maxFloat32, score < 0 ? score * penalty32 : score / penalty32));
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

/** The largest logit; throws on NaN or +Infinity (see argmaxAndExpSum for the plain-sum check). */
function maxLogit(logits: Float32Array, n: number): number {
  let m0 = -Infinity;
  let m1 = -Infinity;
  let plainSum = 0;
  let i = 0;
  for (; i + 2 <= n; i += 2) {
    const v0 = logits[i]!;
    const v1 = logits[i + 1]!;
    m0 = v0 > m0 ? v0 : m0;
    m1 = v1 > m1 ? v1 : m1;
    plainSum += v0 + v1;
  }
  if (i < n) {
    m0 = Math.max(m0, logits[i]!);
    plainSum += logits[i]!;
  }
  if (plainSum !== plainSum || plainSum === Infinity) throw nonFiniteLogitsError();
  return Math.max(m0, m1);
}

/**
 * Every token whose logit is not -Infinity becomes a candidate, weighed as in weighCandidates in the same pass;
 * returns how many, and leaves the sum of their weights in scratch.collectedTotal.
 */
function collectAndWeigh(logits: Float32Array, n: number, maxRaw: number, inverseTemperature: number): number {
  scratch.reserveCandidates(n);
  const { ids, weights, keys } = scratch;
  let count = 0;
  let total = 0;
  for (let id = 0; id < n; id++) {
    const value = logits[id]!;
    if (value > -Infinity) {
      const key = (maxRaw - value) * inverseTemperature;
      const weight = expNegative(key);
      ids[count] = id;
      keys[count] = key;
      weights[count] = weight;
      total += weight;
      count++;
    }
  }
  scratch.collectedTotal = total;
  return count;
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
  for (let id = firstNotBelow(logits, 0, n, root); id < n; id = firstNotBelow(logits, id + 1, n, root)) {
    const value = logits[id]!;
    if (value > root) {
      lastDropped = root;
      siftDown(heapValues, heapIds, k, value, id);
      root = heapValues[0]!;
    } else if (value === root) {
      lastDropped = value;
    } else {
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

/**
 * The first index in [from, n) whose value is not below `bound` (NaN included), or n. Top-k spends nearly all
 * its time here. Written as one loop together with the heap upkeep, the same scan measured 3x slower
 * (540 vs 165 us over 250880 logits), so it is kept a tight loop of its own.
 */
function firstNotBelow(values: Float32Array, from: number, n: number, bound: number): number {
  for (let i = from; i < n; i++) if (!(values[i]! < bound)) return i;
  return n;
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
  let maxRaw = -Infinity;
  for (let i = 0; i < count; i++) maxRaw = Math.max(maxRaw, logits[ids[i]!]!);
  for (let i = 0; i < count; i++) {
    keys[i] = maxRaw - logits[ids[i]!]!;
    weights[i] = 1;
  }
  return selectPrefixByMass(count, k, true);
}

/** The largest logit among the candidates. */
function candidatesMax(logits: Float32Array, count: number): number {
  const ids = scratch.ids;
  let max = -Infinity;
  for (let i = 0; i < count; i++) {
    const value = logits[ids[i]!]!;
    if (value > max) max = value;
  }
  return max;
}

/**
 * Sets each candidate's key to its distance below the best one in nats, (maxRaw - logit) / T, and its weight
 * to exp(-key), the unnormalised probability of the temperature-scaled softmax; returns the sum of the weights.
 * A multiply stands in for HF's division here: weights are only compared and summed, and the chosen token's
 * log-probability is computed from logit / T itself.
 */
function weighCandidates(logits: Float32Array, count: number, maxRaw: number, inverseTemperature: number): number {
  const { ids, weights, keys } = scratch;
  let total = 0;
  for (let i = 0; i < count; i++) {
    const key = (maxRaw - logits[ids[i]!]!) * inverseTemperature;
    const weight = expNegative(key);
    keys[i] = key;
    weights[i] = weight;
    total += weight;
  }
  return total;
}

/**
 * Turns the distance keys of weighCandidates into typical sampling's |-log p - H|: with the distribution
 * renormalised over the candidates, -log p = key + log(total), and H is the mean of that under p.
 */
function setTypicalKeys(count: number, total: number): void {
  const { weights, keys } = scratch;
  const logTotal = Math.log(total);
  let entropy = 0;
  for (let i = 0; i < count; i++) entropy += (weights[i]! / total) * (keys[i]! + logTotal);
  const shift = logTotal - entropy;
  for (let i = 0; i < count; i++) keys[i] = Math.abs(keys[i]! + shift);
}

function sumWeights(count: number): number {
  const weights = scratch.weights;
  let total = 0;
  for (let i = 0; i < count; i++) total += weights[i]!;
  return total;
}

/**
 * Reorders candidates [0, count) so that [0, kept) holds the kept ones, and returns kept. Candidates are
 * ordered by (key ascending, id ascending), keys >= 0; walking that order, a candidate is kept while the weight
 * of the candidates before it is < target, so the first is always kept (HF's min_tokens_to_keep = 1). With
 * includeTies, every candidate whose key equals the last kept one's is kept too.
 *
 * This is what HF gets by sorting the whole vocabulary; here it is expected O(count): a mass histogram over
 * key buckets finds the one bucket the cut falls in, and only that bucket is searched exactly.
 */
function selectPrefixByMass(count: number, target: number, includeTies: boolean): number {
  let start = 0;
  let need = target;
  if (count > bucketedSelectMin) {
    count = narrowToCutBucket(count, target);
    if (scratch.cutStart < 0) return count;
    start = scratch.cutStart;
    need = scratch.cutNeed;
  }
  const kept = selectRange(start, count, need);
  if (!includeTies || kept >= count) return kept;
  const { ids, weights, keys } = scratch;
  let lastKey = -Infinity;
  for (let i = 0; i < kept; i++) if (keys[i]! > lastKey) lastKey = keys[i]!;
  let end = kept;
  for (let i = kept; i < count; i++) if (keys[i] === lastKey) swap(ids, weights, keys, i, end++);
  return end;
}

function keyBucket(key: number): number {
  const scaled = key * keyBucketsPerUnit;
  return scaled < keyBuckets - 1 ? scaled | 0 : keyBuckets - 1;
}

/**
 * The first step of selectPrefixByMass for many candidates. A mass histogram over key buckets finds the bucket
 * where the cumulative mass reaches the target. Every bucket before it is kept whole (each of its candidates has
 * less than the target before it, whatever their order inside the bucket), every bucket after it is dropped.
 * Compacts the candidates to [kept whole | that bucket] and returns their number; sets scratch.cutStart to
 * where that bucket starts and scratch.cutNeed to the mass still missing there, or cutStart to -1 when the
 * target is never reached (rounding) and everything is kept.
 */
function narrowToCutBucket(count: number, target: number): number {
  const { ids, weights, keys, bucketMass, bucketSize } = scratch;
  bucketMass.fill(0);
  bucketSize.fill(0);
  for (let i = 0; i < count; i++) {
    const bucket = keyBucket(keys[i]!);
    bucketMass[bucket] += weights[i]!;
    bucketSize[bucket]++;
  }
  let before = 0;
  let cutBucket = -1;
  for (let bucket = 0; bucket < keyBuckets; bucket++) {
    if (before + bucketMass[bucket]! >= target) {
      cutBucket = bucket;
      break;
    }
    before += bucketMass[bucket]!;
  }
  scratch.cutStart = -1;
  if (cutBucket < 0) return count;

  // One pass: buckets before the cut move to the front in place (never overtaking the read position); the cut
  // bucket's candidates go to the spare arrays and are appended after them.
  scratch.reserveSpare(bucketSize[cutBucket]! + 1);
  const { spareIds, spareWeights, spareKeys } = scratch;
  // Bucket bounds as keys (exact: the scale is a power of two); the last bucket also holds every larger key.
  const lowKey = cutBucket / keyBucketsPerUnit;
  const highKey = cutBucket === keyBuckets - 1 ? Infinity : (cutBucket + 1) / keyBucketsPerUnit;
  let whole = 0;
  let inCut = 0;
  // Branch-free, because which side a candidate falls on is unpredictable: every candidate is written to both
  // places and the counts decide which copies survive (about 10% faster than branching, measured).
  for (let i = 0; i < count; i++) {
    const id = ids[i]!;
    const weight = weights[i]!;
    const key = keys[i]!;
    ids[whole] = id;
    weights[whole] = weight;
    keys[whole] = key;
    spareIds[inCut] = id;
    spareWeights[inCut] = weight;
    spareKeys[inCut] = key;
    const isWhole = +(key < lowKey);
    whole += isWhole;
    inCut += +(key < highKey) - isWhole;
  }
  ids.set(spareIds.subarray(0, inCut), whole);
  weights.set(spareWeights.subarray(0, inCut), whole);
  keys.set(spareKeys.subarray(0, inCut), whole);
  scratch.cutStart = whole;
  scratch.cutNeed = target - before;
  return whole + inCut;
}

/**
 * The cut within [lo, hi), everything before lo being kept already and `need` the mass still missing: a
 * quickselect on mass. Partition around a pivot; if the part before it already weighs >= need the cut lies
 * inside it, otherwise all of it and the pivot are kept and the search goes on after.
 */
function selectRange(lo: number, hi: number, need: number): number {
  const weights = scratch.weights;
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
    if (!(need > 0)) return lo;
  }
  insertionSort(lo, hi);
  let kept = lo;
  while (kept < hi && need > 0) need -= weights[kept++]!;
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

/**
 * Gives every line of the sampling code type feedback before the first real call (see warmUpFeedback in
 * fastexp.ts): without this, V8's first optimised code for warp() deoptimised on every call, and top-p sampling
 * over a 250k vocabulary took 4-8 ms instead of 2.6. Tiny inputs: under 10 ms once per thread, mostly spent
 * in the interpreter.
 */
function warmUpSampling(): void {
  const vocabSize = 48;
  const logits = new Float32Array(vocabSize);
  const fill = () => {
    for (let id = 0; id < vocabSize; id++) logits[id] = ((id * 7) % 11) / 4 - 1; // with ties
    logits[5] = -Infinity;
  };
  const base: GenerationParams = {
    maxNewTokens: 1,
    minNewTokens: 1,
    doSample: true,
    temperature: 0.7,
    topK: 0,
    topP: 1,
    typicalP: 1,
    repetitionPenalty: 1.2,
    noRepeatNgramSize: 2,
    stop: [],
    seed: 0,
  };
  const choosers = [
    { doSample: false },
    { topK: 5 },
    { topK: 40, topP: 0.9 },
    { topP: 0.8 },
    { typicalP: 0.9 },
    { topK: 30, topP: 0.95, typicalP: 0.5 },
  ].map((params) => new TokenChooser({ ...base, ...params }, { vocabSize, eosTokenIds: [2] }));
  const tokens = [1, 2, 3, 1, 2];
  warmUpFeedback(() => {
    for (const chooser of choosers) {
      fill();
      chooser.next(logits, tokens, 0);
    }
    // The paths only large inputs take: top-k by selection, and the bucketed selection by mass.
    fill();
    selectTopKBySelection(logits, vocabSize, 10);
    const count = collectAndWeigh(logits, vocabSize, maxLogit(logits, vocabSize), 1.5);
    const total = scratch.collectedTotal;
    const narrowed = narrowToCutBucket(count, 0.8 * total);
    selectRange(scratch.cutStart, narrowed, scratch.cutNeed);
  });
}

warmUpSampling();
