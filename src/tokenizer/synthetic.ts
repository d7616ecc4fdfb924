/**
 * A BLOOM-style byte-level BPE `tokenizer.json` of any vocabulary size, produced by code.
 *
 * Random checkpoints (`blossom create-random`) need a tokenizer whose vocabulary matches the model
 * (250880 entries for the real BLOOM sizes) and whose pipeline is BLOOM's, so that the loader,
 * batching and streaming decode see exactly what they see with a downloaded model. The merges are
 * learned from real text (Debian's license texts when present) so tokenization looks natural;
 * that text supports far fewer merges than 250k, so the rest of the vocabulary is filled with
 * valid, deterministic merges of learned tokens.
 */
import { readdirSync, readFileSync } from "node:fs";
import { open } from "node:fs/promises";
import { join } from "node:path";
import { jsonPieces, stringifyJson } from "../checkpoint/json-text.js";
import { parameterError } from "../errors.js";

/** BLOOM's Split pattern, as written in its tokenizer.json (Oniguruma syntax). */
export const BLOOM_SPLIT_PATTERN = " ?[^(\\s|[.,!?\u2026\u3002\uff0c\u3001\u0964\u06d4\u060c])]+";

/**
 * The same class in JavaScript syntax. Oniguruma reads `[...[...]...]` as a nested class, so the
 * brackets are syntax, not excluded characters; and its `\s` differs from JavaScript's (it has
 * U+0085 and lacks U+FEFF), so the whitespace is spelled out.
 */
const SPLIT_REGEX =
  / ?[^()|\t\n\v\f\r \u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000.,!?\u2026\u3002\uff0c\u3001\u0964\u06d4\u060c]+/gu;

/** A character BLOOM's split pattern counts as part of a word (not whitespace, punctuation or ()|). */
export const BLOOM_WORD_CHAR = /^[^()|\t\n\v\f\r \u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000.,!?\u2026\u3002\uff0c\u3001\u0964\u06d4\u060c]$/u;

export const SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"] as const;

/** Ids 0..3 are the special tokens, 4..259 the 256 bytes in byte order, then one id per merge. */
export const FIRST_MERGE_ID = SPECIAL_TOKENS.length + 256;

/** GPT-2's reversible byte → printable character table, used by every byte-level BPE. */
export function byteToUnicode(): string[] {
  const table: string[] = new Array<string>(256);
  const printable = (b: number) => (b >= 0x21 && b <= 0x7e) || (b >= 0xa1 && b <= 0xac) || (b >= 0xae && b <= 0xff);
  let next = 0;
  for (let b = 0; b < 256; b++) {
    table[b] = printable(b) ? String.fromCharCode(b) : String.fromCharCode(256 + next++);
  }
  return table;
}

/** Splits text the way BLOOM's `Split` pre-tokenizer does in `Isolated` mode: matches and the gaps between them. */
export function splitLikeBloom(text: string): string[] {
  const pieces: string[] = [];
  let last = 0;
  for (const match of text.matchAll(SPLIT_REGEX)) {
    const start = match.index;
    if (start > last) pieces.push(text.slice(last, start));
    pieces.push(match[0]);
    last = start + match[0].length;
  }
  if (last < text.length) pieces.push(text.slice(last));
  return pieces;
}

/** Counts the byte-level form of every pre-tokenized piece of the texts. */
export function countByteLevelWords(texts: Iterable<string>): Map<string, number> {
  const table = byteToUnicode();
  const encoder = new TextEncoder();
  const counts = new Map<string, number>();
  for (const text of texts) {
    for (const piece of splitLikeBloom(text)) {
      let mapped = "";
      for (const byte of encoder.encode(piece)) mapped += table[byte];
      counts.set(mapped, (counts.get(mapped) ?? 0) + 1);
    }
  }
  return counts;
}

interface HeapEntry {
  count: number;
  left: number;
  right: number;
}

/**
 * Learns BPE merges over byte-level words: repeatedly merges the most frequent adjacent pair
 * (ties broken by the pair's text, so the result does not depend on Map iteration order) until
 * `maxMerges` merges exist or no pair occurs `minFrequency` times. Returns merges as [left, right].
 *
 * Pair counts are kept incrementally (only words containing the merged pair are revisited), with a
 * lazy max-heap: a popped entry whose count is stale is pushed back with its current count. Counts
 * of existing pairs only ever fall, so the first fresh entry popped is the true maximum.
 */
export function learnMerges(
  wordCounts: Map<string, number>,
  options: { maxMerges: number; minFrequency?: number },
): Array<[string, string]> {
  const minFrequency = options.minFrequency ?? 2;
  const symbols: string[] = [];
  const symbolIds = new Map<string, number>();
  const symbolId = (s: string): number => {
    let id = symbolIds.get(s);
    if (id === undefined) {
      id = symbols.length;
      symbols.push(s);
      symbolIds.set(s, id);
    }
    return id;
  };
  // Sorted so that symbol ids, and everything after, are independent of the input's order.
  const sortedWords = [...wordCounts.entries()].sort((a, b) => (a[0] < b[0] ? -1 : a[0] > b[0] ? 1 : 0));
  const words: number[][] = [];
  const frequencies: number[] = [];
  for (const [word, count] of sortedWords) {
    const chars = Array.from(word);
    if (chars.length < 2) continue;
    words.push(chars.map(symbolId));
    frequencies.push(count);
  }

  const SHIFT = 2 ** 21; // ids stay far below 2^21; left * SHIFT + right stays exact in a double
  const pairCounts = new Map<number, number>();
  const pairWords = new Map<number, Set<number>>();
  const addPair = (left: number, right: number, delta: number, word: number) => {
    const key = left * SHIFT + right;
    pairCounts.set(key, (pairCounts.get(key) ?? 0) + delta);
    if (delta > 0) {
      let set = pairWords.get(key);
      if (!set) pairWords.set(key, (set = new Set()));
      set.add(word);
    }
  };
  for (let w = 0; w < words.length; w++) {
    const word = words[w];
    for (let i = 0; i + 1 < word.length; i++) addPair(word[i], word[i + 1], frequencies[w], w);
  }

  const before = (a: HeapEntry, b: HeapEntry): boolean => {
    if (a.count !== b.count) return a.count > b.count;
    const al = symbols[a.left];
    const bl = symbols[b.left];
    if (al !== bl) return al < bl;
    return symbols[a.right] < symbols[b.right];
  };
  const heap: HeapEntry[] = [];
  const push = (entry: HeapEntry) => {
    heap.push(entry);
    let i = heap.length - 1;
    while (i > 0) {
      const parent = (i - 1) >> 1;
      if (!before(heap[i], heap[parent])) break;
      [heap[i], heap[parent]] = [heap[parent], heap[i]];
      i = parent;
    }
  };
  const pop = (): HeapEntry | undefined => {
    if (heap.length === 0) return undefined;
    const top = heap[0];
    const last = heap.pop()!;
    if (heap.length > 0) {
      heap[0] = last;
      let i = 0;
      for (;;) {
        const l = 2 * i + 1;
        const r = l + 1;
        let best = i;
        if (l < heap.length && before(heap[l], heap[best])) best = l;
        if (r < heap.length && before(heap[r], heap[best])) best = r;
        if (best === i) break;
        [heap[i], heap[best]] = [heap[best], heap[i]];
        i = best;
      }
    }
    return top;
  };
  for (const [key, count] of pairCounts) {
    push({ count, left: Math.floor(key / SHIFT), right: key % SHIFT });
  }

  const merges: Array<[string, string]> = [];
  while (merges.length < options.maxMerges) {
    const top = pop();
    if (!top) break;
    const key = top.left * SHIFT + top.right;
    const current = pairCounts.get(key) ?? 0;
    if (current !== top.count) {
      if (current > 0) push({ count: current, left: top.left, right: top.right });
      continue;
    }
    if (current < minFrequency) break;
    const { left, right } = top;
    merges.push([symbols[left], symbols[right]]);
    const merged = symbolId(symbols[left] + symbols[right]);
    const touched = new Set<number>();
    for (const w of pairWords.get(key) ?? []) {
      const word = words[w];
      const frequency = frequencies[w];
      // Left-to-right, non-overlapping, as the tokenizer applies a merge at encode time.
      const out: number[] = [];
      let changed = false;
      for (let i = 0; i < word.length; i++) {
        if (i + 1 < word.length && word[i] === left && word[i + 1] === right) {
          out.push(merged);
          i++;
          changed = true;
        } else {
          out.push(word[i]);
        }
      }
      if (!changed) continue;
      for (let i = 0; i + 1 < word.length; i++) addPair(word[i], word[i + 1], -frequency, w);
      for (let i = 0; i + 1 < out.length; i++) {
        addPair(out[i], out[i + 1], frequency, w);
        if (out[i] === merged || out[i + 1] === merged) touched.add(out[i] * SHIFT + out[i + 1]);
      }
      words[w] = out;
    }
    pairCounts.delete(key);
    pairWords.delete(key);
    for (const newKey of touched) {
      const count = pairCounts.get(newKey) ?? 0;
      if (count > 0) push({ count, left: Math.floor(newKey / SHIFT), right: newKey % SHIFT });
    }
  }
  return merges;
}

/**
 * The default training text: Debian's license texts (the same corpus the golden fixtures' tokenizers
 * were trained on), read in sorted order, skipping symlinks so no text counts twice. Where that
 * directory is missing (macOS, Alpine, Windows), a short built-in text keeps the result deterministic.
 */
export function defaultTrainingTexts(dir = "/usr/share/common-licenses"): { texts: string[]; source: string } {
  try {
    const names = readdirSync(dir, { withFileTypes: true })
      .filter((entry) => entry.isFile())
      .map((entry) => entry.name)
      .sort();
    const texts = names.map((name) => readFileSync(join(dir, name), "utf8"));
    if (texts.length > 0 && texts.some((t) => t.length > 0)) return { texts, source: dir };
  } catch {
    // fall through to the built-in text
  }
  return { texts: [FALLBACK_TEXT], source: "built-in text" };
}

const FALLBACK_TEXT = `Blossom runs BLOOM language models on Node.js. A model is a stack of transformer blocks:
each block normalizes its input, lets every token attend to the tokens before it, and passes the
result through a small feed-forward network. The attention uses linear biases instead of position
embeddings, so the model can read sequences longer than the ones it was trained on.

The tokenizer turns text into numbers. It first splits the text into words and punctuation, then
maps every byte to a printable character, and finally merges frequent pairs of characters into
larger pieces. Common words become a single token; rare words, names and numbers are spelled out in
smaller pieces. Because every byte has a token, any text can be encoded, including accents (café,
naïve), other scripts (日本語, русский, العربية, हिन्दी) and emoji.

To size hardware without downloading a model, create a random checkpoint with the real dimensions,
then measure how fast it loads, how much memory it takes and how many tokens per second it produces.
The weights are random, so the text it writes is nonsense, but the work done is exactly the same.
`;

export interface SyntheticTokenizerOptions {
  vocabSize: number;
  /** Training texts; defaults to {@link defaultTrainingTexts}. */
  texts?: string[];
}

/** The tokenizer.json object (BLOOM's pipeline) with exactly `vocabSize` entries; `model.vocab` is a Map in id order. */
export function buildSyntheticTokenizer(options: SyntheticTokenizerOptions): Record<string, unknown> {
  const { vocabSize } = options;
  if (!Number.isInteger(vocabSize) || vocabSize < FIRST_MERGE_ID) {
    throw parameterError("vocabSize", `must be an integer >= ${FIRST_MERGE_ID} (4 special tokens + 256 bytes), got ${vocabSize}`);
  }
  const vocab = new Map<string, number>();
  SPECIAL_TOKENS.forEach((token, id) => vocab.set(token, id));
  for (const ch of byteToUnicode()) vocab.set(ch, vocab.size);
  const merges: string[] = [];
  const addMerge = (left: string, right: string): boolean => {
    const token = left + right;
    if (vocab.has(token)) return false;
    vocab.set(token, vocab.size);
    merges.push(`${left} ${right}`);
    return true;
  };

  const texts = options.texts ?? defaultTrainingTexts().texts;
  const wanted = vocabSize - FIRST_MERGE_ID;
  for (const [left, right] of learnMerges(countByteLevelWords(texts), { maxMerges: wanted })) {
    // A learned merge can rebuild a token already reached by another split; only new tokens count.
    addMerge(left, right);
    if (vocab.size === vocabSize) break;
  }
  if (vocab.size < vocabSize) fillVocabulary(vocab, vocabSize, addMerge);

  return {
    version: "1.0",
    truncation: null,
    padding: null,
    added_tokens: SPECIAL_TOKENS.map((content, id) => ({
      id,
      special: true,
      content,
      single_word: false,
      lstrip: false,
      rstrip: false,
      normalized: false,
    })),
    normalizer: null,
    pre_tokenizer: {
      type: "Sequence",
      pretokenizers: [
        { type: "Split", pattern: { Regex: BLOOM_SPLIT_PATTERN }, behavior: "Isolated", invert: false },
        { type: "ByteLevel", add_prefix_space: false, trim_offsets: true, use_regex: false },
      ],
    },
    post_processor: { type: "ByteLevel", add_prefix_space: true, trim_offsets: false, use_regex: false },
    decoder: { type: "ByteLevel", add_prefix_space: true, trim_offsets: true, use_regex: false },
    model: {
      type: "BPE",
      dropout: null,
      unk_token: null,
      continuing_subword_prefix: null,
      end_of_word_suffix: null,
      fuse_unk: false,
      // A Map, not an object: JavaScript objects put integer-like keys ("0", "10") first.
      vocab,
      merges,
    },
  };
}

/**
 * Code point ranges that get whole-character tokens when the text leaves room: accented Latin,
 * Greek, Cyrillic, Hebrew, Arabic, Devanagari, punctuation, currency, CJK punctuation, kana, CJK
 * ideographs and Hangul. BLOOM's real vocabulary is multilingual; this keeps such text from
 * always falling apart into single bytes.
 */
const CHARACTER_RANGES: Array<[number, number]> = [
  [0x00a0, 0x024f],
  [0x0370, 0x03ff],
  [0x0400, 0x04ff],
  [0x0590, 0x05ff],
  [0x0600, 0x06ff],
  [0x0900, 0x097f],
  [0x2010, 0x205e],
  [0x20a0, 0x20bf],
  [0x3000, 0x303f],
  [0x3040, 0x30ff],
  [0x4e00, 0x9fff],
  [0xac00, 0xd7a3],
];

/**
 * Fills the vocabulary past what the text supports. Every added merge joins two tokens already in
 * the vocabulary, so the file stays a valid BPE model; these merges rank after the learned ones,
 * so they only change how text the learned merges leave split is tokenized.
 *
 * 1. Whole characters of {@link CHARACTER_RANGES} (UTF-8 byte symbols merged left to right).
 * 2. Word-like tokens: a word start (a token beginning with the space symbol) followed by a
 *    continuation, walking both lists in vocabulary order along anti-diagonals so frequent pieces
 *    combine first. When every pair is taken, the new word starts become the next starts.
 */
function fillVocabulary(
  vocab: Map<string, number>,
  vocabSize: number,
  addMerge: (left: string, right: string) => boolean,
): void {
  const byteSymbols = byteToUnicode();
  const encoder = new TextEncoder();
  const learned = [...vocab.keys()].slice(SPECIAL_TOKENS.length);
  for (const [first, last] of CHARACTER_RANGES) {
    for (let codePoint = first; codePoint <= last; codePoint++) {
      const bytes = encoder.encode(String.fromCodePoint(codePoint));
      let token = byteSymbols[bytes[0]];
      for (let i = 1; i < bytes.length; i++) {
        const next = byteSymbols[bytes[i]];
        addMerge(token, next);
        token += next;
        if (vocab.size === vocabSize) return;
      }
    }
  }

  const space = byteSymbols[0x20];
  const continuations = learned.filter((token) => !token.startsWith(space));
  let starts = learned.filter((token) => token.startsWith(space) && token.length > 1);
  if (starts.length === 0) starts = [space];
  for (;;) {
    const added: string[] = [];
    const lastDiagonal = starts.length + continuations.length - 2;
    for (let diagonal = 0; diagonal <= lastDiagonal; diagonal++) {
      const lastStart = Math.min(diagonal, starts.length - 1);
      for (let i = Math.max(0, diagonal - (continuations.length - 1)); i <= lastStart; i++) {
        if (addMerge(starts[i], continuations[diagonal - i])) {
          added.push(starts[i] + continuations[diagonal - i]);
          if (vocab.size === vocabSize) return;
        }
      }
    }
    // Every start+continuation exists (only with a tiny training text): extend the new words. If
    // none were new, the longest word start plus any continuation is longer than every token.
    if (added.length > 0) {
      starts = added;
    } else {
      const longest = [...vocab.keys()].filter((token) => token.startsWith(space)).reduce((a, b) => (b.length > a.length ? b : a), space);
      starts = [longest];
    }
  }
}

/** tokenizer.json text, formatted as Hugging Face saves it (2-space indent, trailing newline). */
export function syntheticTokenizerJson(options: SyntheticTokenizerOptions): string {
  return stringifyJson(buildSyntheticTokenizer(options)) + "\n";
}

/** Writes {@link syntheticTokenizerJson}'s text to `path` in pieces, never holding the whole text. */
export async function writeSyntheticTokenizer(path: string, options: SyntheticTokenizerOptions): Promise<void> {
  const handle = await open(path, "w");
  try {
    let pending = "";
    for (const piece of jsonPieces(buildSyntheticTokenizer(options))) {
      pending += piece;
      if (pending.length >= 1 << 20) {
        await handle.writeFile(pending);
        pending = "";
      }
    }
    await handle.writeFile(pending + "\n");
  } finally {
    await handle.close();
  }
}
