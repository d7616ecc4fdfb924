/**
 * A small seeded PRNG for sampling: xoshiro128** (Blackman & Vigna, https://prng.di.unimi.it/)
 * with its state filled by splitmix32. Fast in JavaScript (32-bit integer ops only), 2^128 - 1
 * period, and reproducible: the same seed gives the same stream on every platform.
 * It is not cryptographic; only the seed of an unseeded generator comes from crypto.
 */
import { webcrypto } from "node:crypto";

const TWO_POW_32 = 4294967296;

export class Rng {
  /** The seed this generator started from; with no seed given, the one drawn from crypto. */
  readonly seed: number;
  private s0 = 0;
  private s1 = 0;
  private s2 = 0;
  private s3 = 0;

  /** `seed` must be a safe integer >= 0; undefined draws one from crypto. */
  constructor(seed?: number) {
    if (seed === undefined) seed = randomSeed();
    if (!Number.isSafeInteger(seed) || seed < 0) {
      throw new RangeError(`Rng seed must be a safe integer >= 0 (got ${seed})`);
    }
    this.seed = seed;
    const low = seed % TWO_POW_32;
    const high = Math.floor(seed / TWO_POW_32);
    // Every state word depends on both halves of the seed: xoshiro128**'s first output is a function
    // of s1 alone, so an s1 made from the high word only gave every seed below 2^32 the same first
    // draw. x mixes the halves; splitmix32's output is a bijection of its counter, so s0 tells x
    // apart, and s1 then gives back the high word: distinct seeds never share a starting state.
    const x = (low ^ splitmix32(high ^ 0x5bd1e995)()) >>> 0;
    const stream = splitmix32(x);
    this.s0 = stream();
    this.s1 = stream() ^ splitmix32(high ^ 0x27d4eb2f)();
    this.s2 = stream();
    this.s3 = stream();
    if ((this.s0 | this.s1 | this.s2 | this.s3) === 0) this.s3 = 1; // the all-zero state is a fixed point
    // A few steps so that every word has passed through xoshiro's own mixing before the first draw.
    for (let i = 0; i < 8; i++) this.nextUint32();
  }

  /** The next 32 random bits, as an unsigned integer. */
  nextUint32(): number {
    const s1 = this.s1;
    const result = Math.imul(rotl(Math.imul(s1, 5), 7), 9);
    const t = s1 << 9;
    this.s2 ^= this.s0;
    this.s3 ^= s1;
    this.s1 ^= this.s2;
    this.s0 ^= this.s3;
    this.s2 ^= t;
    this.s3 = rotl(this.s3, 11);
    return result >>> 0;
  }

  /**
   * A uniform double in [0, 1) with 53 random bits. 32 bits would leave a resolution of 2^-32, too coarse to
   * give a token of probability 1e-10 its fair chance over a 250k vocabulary.
   */
  nextFloat(): number {
    const high = this.nextUint32() >>> 5; // 27 bits
    const low = this.nextUint32() >>> 6; // 26 bits
    return (high * 67108864 + low) / 9007199254740992;
  }
}

/** A seed from the operating system's CSPRNG, as a safe integer (53 bits). */
export function randomSeed(): number {
  const words = webcrypto.getRandomValues(new Uint32Array(2));
  return (words[0] & 0x1fffff) * TWO_POW_32 + words[1];
}

function rotl(x: number, k: number): number {
  return (x << k) | (x >>> (32 - k));
}

function splitmix32(state: number): () => number {
  let counter = state | 0;
  return () => {
    counter = (counter + 0x9e3779b9) | 0;
    let z = counter;
    z = Math.imul(z ^ (z >>> 16), 0x85ebca6b);
    z = Math.imul(z ^ (z >>> 13), 0xc2b2ae35);
    return (z ^ (z >>> 16)) | 0;
  };
}
