import { test } from "node:test";
import assert from "node:assert/strict";
import { TokenChooser } from "../src/generate/chooser.js";
import { resolveGenerationParams, type GenerationParamsInput } from "../src/generate/params.js";
import { Rng } from "../src/generate/rng.js";

function chooser(params: GenerationParamsInput, vocabSize: number, eosTokenIds: number[] = []): TokenChooser {
  return new TokenChooser(resolveGenerationParams({ doSample: true, ...params }), { vocabSize, eosTokenIds });
}

function softmax(scores: number[]): number[] {
  const max = Math.max(...scores.filter((v) => v > -Infinity), -Infinity);
  const exps = scores.map((v) => (v === -Infinity ? 0 : Math.exp(v - max)));
  const sum = exps.reduce((a, b) => a + b, 0);
  return exps.map((e) => e / sum);
}

/**
 * The warpers exactly as transformers' logits_process.py writes them (full sorts, masks over the whole
 * vocabulary), in float64. Among equal scores, top-p keeps the lower token id (Blossom's documented choice
 * where torch.sort's order is unspecified). Returns the final probabilities, 0 for removed tokens.
 */
function referenceWarp(
  logits: ArrayLike<number>,
  n: number,
  { temperature = 1, topK = 0, topP = 1, typicalP = 1 }: GenerationParamsInput,
): number[] {
  let scores = Array.from({ length: n }, (_, i) => logits[i]!);
  if (temperature !== 1) scores = scores.map((v) => v / temperature);
  if (topK > 0) {
    const kth = [...scores].sort((a, b) => b - a)[Math.min(topK, n) - 1]!;
    scores = scores.map((v) => (v < kth ? -Infinity : v));
  }
  if (topP < 1) {
    // sorted ascending; equal scores put the higher id first so the lower id sits nearer the kept end
    const order = [...scores.keys()].sort((a, b) => scores[a]! - scores[b]! || b - a);
    const probs = softmax(scores);
    let cumulative = 0;
    const remove = new Set<number>();
    order.forEach((id, position) => {
      cumulative += probs[id]!;
      if (cumulative <= 1 - topP && position < n - 1) remove.add(id);
    });
    scores = scores.map((v, id) => (remove.has(id) ? -Infinity : v));
  }
  if (typicalP < 1) {
    const probs = softmax(scores);
    const logProbs = probs.map(Math.log);
    let entropy = 0;
    for (let id = 0; id < n; id++) if (probs[id]! > 0) entropy -= probs[id]! * logProbs[id]!;
    const shifted = logProbs.map((lp) => Math.abs(-lp - entropy));
    const order = [...scores.keys()].sort((a, b) => shifted[a]! - shifted[b]! || a - b);
    let cumulative = 0;
    let lastIndex = 0;
    for (const id of order) {
      cumulative += probs[id]!;
      if (cumulative < typicalP) lastIndex++;
    }
    lastIndex = Math.min(lastIndex, n - 1);
    const limit = shifted[order[lastIndex]!]!;
    scores = scores.map((v, id) => (shifted[id]! > limit && id !== order[0] ? -Infinity : v));
  }
  return softmax(scores);
}

function assertMatchesReference(
  logits: Float32Array,
  n: number,
  params: GenerationParamsInput,
  label: string,
): void {
  const expected = referenceWarp(logits, n, params);
  const { tokenIds, probs } = chooser(params, n).distribution(logits.slice(), [], 0);
  const expectedIds = expected.flatMap((p, id) => (p > 0 ? [id] : []));
  assert.deepEqual(Array.from(tokenIds), expectedIds, `${label}: kept tokens differ`);
  for (const [i, id] of tokenIds.entries()) {
    const error = Math.abs(probs[i]! - expected[id]!);
    assert.ok(error < 1e-8 * Math.max(1, expected[id]!), `${label}: token ${id} p=${probs[i]} vs ${expected[id]}`);
  }
}

function gaussianLogits(rng: Rng, n: number, scale: number, quantum = 0): Float32Array {
  const logits = new Float32Array(n);
  for (let i = 0; i < n; i++) {
    const u = 1 - rng.nextFloat();
    const value = Math.sqrt(-2 * Math.log(u)) * Math.cos(2 * Math.PI * rng.nextFloat()) * scale;
    logits[i] = quantum > 0 ? Math.round(value / quantum) * quantum : value;
  }
  return logits;
}

test("top-k, top-p, typical and temperature keep the same tokens as transformers' full-sort definitions", () => {
  const temperatures = [1, 0.3, 0.7, 1.8];
  const topPs = [1, 0.1, 0.5, 0.9, 0.99];
  const typicalPs = [1, 0.2, 0.9, 0.999];
  let cases = 0;
  for (let seed = 1; seed <= 300; seed++) {
    const rng = new Rng(seed);
    const pick = <T>(values: T[]): T => values[Math.floor(rng.nextFloat() * values.length)]!;
    const n = pick([2, 3, 10, 100, 1000, 3000]);
    const logits = gaussianLogits(rng, n, pick([0.5, 2, 6]));
    if (n > 3 && rng.nextFloat() < 0.3) logits[Math.floor(rng.nextFloat() * n)] = -Infinity;
    const topK = pick([0, 1, 2, 5, 50, n - 1, n, n + 7]);
    const params = { temperature: pick(temperatures), topK, topP: pick(topPs), typicalP: pick(typicalPs) };
    assertMatchesReference(logits, n, params, `seed ${seed} n=${n} ${JSON.stringify(params)}`);
    cases++;
  }
  assert.equal(cases, 300);
});

test("each warper alone matches the reference on a 50k vocabulary (bucketed selection paths)", () => {
  const rng = new Rng(2024);
  const n = 50000;
  const logits = gaussianLogits(rng, n, 3);
  assertMatchesReference(logits, n, { topP: 0.9 }, "top-p");
  assertMatchesReference(logits, n, { topP: 0.3, temperature: 0.5 }, "top-p with temperature");
  assertMatchesReference(logits, n, { typicalP: 0.9 }, "typical");
  assertMatchesReference(logits, n, { topK: 40 }, "top-k heap");
  assertMatchesReference(logits, n, { topK: 20000 }, "top-k selection");
  assertMatchesReference(logits, n, {}, "plain softmax");

  for (let seed = 1; seed <= 12; seed++) {
    const rng = new Rng(1000 + seed);
    const pick = <T>(values: T[]): T => values[Math.floor(rng.nextFloat() * values.length)]!;
    const size = pick([5000, 9000]);
    // Sharp and flat distributions, some on a coarse grid (many equal keys within one bucket).
    const values = gaussianLogits(rng, size, pick([0.3, 1, 4, 12]), pick([0, 0, 0.5]));
    const params = {
      temperature: pick([1, 0.6, 1.5]),
      topK: pick([0, 0, 4500]),
      topP: pick([1, 0.5, 0.95]),
      typicalP: pick([1, 0.3, 0.95]),
    };
    assertMatchesReference(values, size, params, `seed ${seed} n=${size} ${JSON.stringify(params)}`);
  }
});

test("top-k keeps every token tied with the k-th largest logit (heap and selection paths)", () => {
  const c = chooser({ topK: 2 }, 5);
  assert.deepEqual(Array.from(c.distribution(Float32Array.of(1, 3, 3, 3, 2), [], 0).tokenIds), [1, 2, 3]);
  assert.deepEqual(Array.from(c.distribution(Float32Array.of(3, 2, 2, 1, 2), [], 0).tokenIds), [0, 1, 2, 4]);
  // A tie evicted from the heap early: 5 enters, then 6 evicts one of the 5s.
  const evicted = chooser({ topK: 2 }, 3).distribution(Float32Array.of(5, 5, 6), [], 0);
  assert.deepEqual(Array.from(evicted.tokenIds), [0, 1, 2]);

  for (let seed = 1; seed <= 20; seed++) {
    const rng = new Rng(seed);
    // Logits on a coarse grid so that many tokens share each value.
    const small = gaussianLogits(rng, 3000, 2, 0.25);
    assertMatchesReference(small, 3000, { topK: 1 + Math.floor(rng.nextFloat() * 100) }, `heap seed ${seed}`);
  }
  const rng = new Rng(77);
  const large = gaussianLogits(rng, 20000, 2, 0.25);
  assertMatchesReference(large, 20000, { topK: 6000 }, "selection");
  assertMatchesReference(large, 20000, { topK: 6000, topP: 0.8, typicalP: 0.9 }, "selection then top-p, typical");
  assertMatchesReference(large, 20000, { typicalP: 0.5 }, "typical with ties");
});

test("top-p keeps the most likely tokens until their mass reaches top_p, ties going to the lower id", () => {
  // probabilities 0.5, 0.25, 0.125, 0.125
  const logits = () => Float32Array.of(Math.log(0.125), Math.log(0.5), Math.log(0.125), Math.log(0.25));
  const kept = (topP: number) => Array.from(chooser({ topP }, 4).distribution(logits(), [], 0).tokenIds);
  assert.deepEqual(kept(0.4), [1]);
  assert.deepEqual(kept(0.5), [1]); // 0.5 already reaches 0.5
  assert.deepEqual(kept(0.6), [1, 3]);
  assert.deepEqual(kept(0.8), [0, 1, 3]); // 0.75 < 0.8: one of the 0.125s, the lower id
  assert.deepEqual(kept(0.9), [0, 1, 2, 3]); // 0.875 < 0.9
  const uniform = chooser({ topP: 0.5 }, 4).distribution(new Float32Array(4), [], 0);
  assert.deepEqual(Array.from(uniform.tokenIds), [0, 1]);
  assert.deepEqual(Array.from(uniform.probs), [0.5, 0.5]);
});

test("typical sampling keeps tokens whose surprise is closest to the entropy, and can drop the mode", () => {
  // p = [0.7, 0.1, 0.1, 0.1]: H = 0.940; -log p = 0.357 (|.|=0.583), 2.303 (|.|=1.363 each)
  const logits = Float32Array.from([0.7, 0.1, 0.1, 0.1], Math.log);
  const keep = (typicalP: number) => chooser({ typicalP }, 4).distribution(logits.slice(), [], 0);
  assert.deepEqual(Array.from(keep(0.5).tokenIds), [0]);
  // 0.7 < 0.75: the next key is shared by three tokens, and typical keeps every tie
  assert.deepEqual(Array.from(keep(0.75).tokenIds), [0, 1, 2, 3]);

  // p = [0.4, 0.06 x 10]: H = 2.055; the mode's surprise 0.916 is 1.139 from H, the others' 2.813 only 0.758.
  // So the ten unlikely tokens come first (all tied), and 0.24 < 0.25 reaches into their tie: the mode goes.
  const flat = Float32Array.from([0.4, ...new Array(10).fill(0.06)], Math.log);
  const withoutMode = chooser({ typicalP: 0.25 }, 11).distribution(flat.slice(), [], 0);
  assert.deepEqual(Array.from(withoutMode.tokenIds), [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
  for (const p of withoutMode.probs) assert.ok(Math.abs(p - 0.1) < 1e-9);
  assertMatchesReference(flat, 11, { typicalP: 0.25 }, "typical drops the mode");
});

test("a seed reproduces the samples; different seeds give different ones", () => {
  const rng = new Rng(5);
  const logits = gaussianLogits(rng, 1000, 1);
  const run = (seed: number | undefined) => {
    const c = chooser({ seed, topK: 100, topP: 0.95, temperature: 1.3 }, 1000);
    return Array.from({ length: 200 }, () => c.next(logits.slice(), [], 0).tokenId);
  };
  assert.deepEqual(run(42), run(42));
  assert.notDeepEqual(run(42), run(43));
  const unseeded = chooser({}, 1000);
  assert.ok(Number.isSafeInteger(unseeded.seed) && unseeded.seed! >= 0);
  assert.notDeepEqual(run(undefined), run(undefined)); // 200 draws from 100 tokens: equal only by chance
});

/** Pearson's chi-square statistic of `counts` against `probs` over `draws` draws. */
function chiSquare(counts: number[], probs: number[], draws: number): number {
  let statistic = 0;
  for (let i = 0; i < probs.length; i++) {
    const expected = probs[i]! * draws;
    statistic += (counts[i]! - expected) ** 2 / expected;
  }
  return statistic;
}

test("the first draw is uniform across seeds, and so is the first sampled token (seeds 0, 1, 2, ... as users pick them)", () => {
  // Every seed below 2^32 once drew the same first float (0.8583): the first sampled token of a
  // seeded request was the one at that point of the cumulative distribution, whatever the seed.
  const seeds = 20000;
  const buckets = new Array<number>(16).fill(0);
  for (let seed = 0; seed < seeds; seed++) buckets[Math.floor(new Rng(seed).nextFloat() * 16)]!++;
  // 15 degrees of freedom: P(chi2 > 37.70) = 0.001.
  assert.ok(chiSquare(buckets, new Array<number>(16).fill(1 / 16), seeds) < 37.7, `first draws by bucket: ${buckets}`);
  const logits = Float32Array.of(2, 1.5, 1, 0.5, 0, -0.5, -1, -2, -3, 1.2);
  const probs = softmax(Array.from(logits));
  const counts = new Array<number>(10).fill(0);
  for (let seed = 0; seed < seeds; seed++) counts[chooser({ seed }, 10).next(logits.slice(), [], 0).tokenId]!++;
  // 9 degrees of freedom: P(chi2 > 27.88) = 0.001.
  assert.ok(chiSquare(counts, probs, seeds) < 27.88, `first tokens over seeds: ${counts}`);
});

test("sampled frequencies match the softmax probabilities (chi-square, fixed seed)", () => {
  const logits = Float32Array.of(2, 1.5, 1, 0.5, 0, -0.5, -1, -2, -3, 1.2);
  const probs = softmax(Array.from(logits));
  const c = chooser({ seed: 1234 }, 10);
  const draws = 100000;
  const counts = new Array<number>(10).fill(0);
  let logprobError = 0;
  for (let i = 0; i < draws; i++) {
    const { tokenId, logprob } = c.next(logits.slice(), [], 0);
    counts[tokenId]!++;
    logprobError = Math.max(logprobError, Math.abs(logprob - Math.log(probs[tokenId]!)));
  }
  // 9 degrees of freedom: P(chi2 > 27.88) = 0.001.
  const statistic = chiSquare(counts, probs, draws);
  assert.ok(statistic < 27.88, `chi-square ${statistic.toFixed(2)} with counts ${counts}`);
  assert.ok(logprobError < 1e-8, `logprob error ${logprobError}`);
});

test("sampled frequencies match the warped distribution (temperature, top-k, top-p)", () => {
  const logits = Float32Array.of(2, 1.5, 1, 0.5, 0, -0.5, -1, -2, -3, 1.2);
  const params = { seed: 99, temperature: 0.7, topK: 6, topP: 0.9 };
  const { tokenIds, probs } = chooser(params, 10).distribution(logits.slice(), [], 0);
  // /0.7, keep the 6 best (ids 0, 1, 9, 2, 3, 4) with probabilities 0.450, 0.220, 0.144, 0.108, 0.053, 0.026;
  // top-p 0.9 keeps id 2 (mass before it 0.814) and drops id 3 (0.921).
  assert.deepEqual(Array.from(tokenIds), [0, 1, 2, 9]);
  const expected = referenceWarp(logits, 10, params);
  const c = chooser(params, 10);
  const draws = 100000;
  const counts = new Array<number>(10).fill(0);
  for (let i = 0; i < draws; i++) {
    const { tokenId, logprob } = c.next(logits.slice(), [], 0);
    counts[tokenId]!++;
    assert.ok(Math.abs(logprob - Math.log(expected[tokenId]!)) < 1e-8);
  }
  const keptCounts = Array.from(tokenIds, (id) => counts[id]!);
  assert.equal(keptCounts.reduce((a, b) => a + b, 0), draws, "never samples a removed token");
  // 3 degrees of freedom: P(chi2 > 16.27) = 0.001.
  const statistic = chiSquare(keptCounts, Array.from(probs), draws);
  assert.ok(statistic < 16.27, `chi-square ${statistic.toFixed(2)} with counts ${keptCounts}`);
});

test("Rng is xoshiro128**: the reference output sequence from state (1, 2, 3, 4)", () => {
  const rng = new Rng(0);
  Object.assign(rng as unknown as Record<string, number>, { s0: 1, s1: 2, s2: 3, s3: 4 });
  assert.deepEqual(
    Array.from({ length: 6 }, () => rng.nextUint32()),
    [11520, 0, 5927040, 70819200, 2031721883, 1637235492],
  );
});

test("Rng: a seed reproduces its stream, every seed bit matters, floats are uniform in [0, 1)", () => {
  const a = new Rng(42);
  const b = new Rng(42);
  assert.deepEqual(
    Array.from({ length: 8 }, () => a.nextFloat()),
    Array.from({ length: 8 }, () => b.nextFloat()),
  );
  // Pinned so that a change to the seeding (and so to every seeded sample) is noticed.
  const pinned = new Rng(1);
  assert.deepEqual([pinned.nextUint32(), pinned.nextUint32(), pinned.nextUint32()], [2210449789, 1722947504, 1041739008]);

  const seeds = [0, 1, 2, 2 ** 31, 2 ** 32, 2 ** 32 + 1, 2 ** 52, Number.MAX_SAFE_INTEGER];
  assert.equal(new Set(seeds.map((seed) => new Rng(seed).nextFloat())).size, seeds.length);
  assert.throws(() => new Rng(-1), RangeError);
  assert.throws(() => new Rng(1.5), RangeError);
  assert.ok(Number.isSafeInteger(new Rng().seed));

  const rng = new Rng(7);
  let sum = 0;
  let sumSquares = 0;
  const buckets = new Array<number>(16).fill(0);
  const draws = 200000;
  for (let i = 0; i < draws; i++) {
    const x = rng.nextFloat();
    assert.ok(x >= 0 && x < 1);
    sum += x;
    sumSquares += x * x;
    buckets[Math.floor(x * 16)]!++;
  }
  assert.ok(Math.abs(sum / draws - 0.5) < 0.003);
  assert.ok(Math.abs(sumSquares / draws - 1 / 3) < 0.003);
  // 15 degrees of freedom: P(chi2 > 37.70) = 0.001.
  assert.ok(chiSquare(buckets, new Array<number>(16).fill(1 / 16), draws) < 37.7);
});
