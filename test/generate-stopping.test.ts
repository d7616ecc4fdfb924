import { existsSync } from "node:fs";
import { test } from "node:test";
import { fileURLToPath } from "node:url";
import assert from "node:assert/strict";
import { Tokenizer } from "tokenizers";
import { resolveGenerationParams } from "../src/generate/params.js";
import { Rng } from "../src/generate/rng.js";
import { IncrementalDecoder, StopStringMatcher, finishReasonAfter } from "../src/generate/stopping.js";

// dist/test/ -> the repository root -> ../shared, where the golden fixtures live beside every checkout.
const fixtureTokenizer = fileURLToPath(
  new URL("../../../shared/fixtures/tiny-bloom-a/tokenizer.json", import.meta.url),
);

/**
 * A byte-level "tokenizer" whose tokens are arbitrary byte strings, so one token can end in the middle of a
 * character and the next start there. Ids 0..3 are special and decode to nothing. Decoding is lossy UTF-8
 * like the real ByteLevel decoder, so a split character decodes to U+FFFD.
 */
class ByteTokens {
  private readonly pieces: Uint8Array[] = [0, 1, 2, 3].map(() => new Uint8Array(0));
  private readonly ids = new Map<string, number>();
  private readonly utf8 = new TextDecoder("utf-8", { fatal: false });

  /** Encodes text as tokens of 1..maxBytes bytes each, cut with no regard for character boundaries. */
  encode(text: string, rng: Rng, maxBytes: number): number[] {
    const bytes = new TextEncoder().encode(text);
    const ids: number[] = [];
    for (let at = 0; at < bytes.length; ) {
      const piece = bytes.slice(at, at + 1 + Math.floor(rng.nextFloat() * maxBytes));
      const key = piece.join(",");
      let id = this.ids.get(key);
      if (id === undefined) {
        id = this.pieces.push(piece) - 1;
        this.ids.set(key, id);
      }
      ids.push(id);
      at += piece.length;
    }
    return ids;
  }

  readonly decode = (ids: number[]): string => {
    const bytes = ids.flatMap((id) => Array.from(this.pieces[id]!));
    return this.utf8.decode(Uint8Array.from(bytes));
  };
}

const multilingual = "Hi 😀! 世界 café — naïve 👍🏽 𝄞 done";

test("incremental decoding never emits a split character and concatenates to the full text", () => {
  const tokens = new ByteTokens();
  for (let seed = 1; seed <= 200; seed++) {
    const rng = new Rng(seed);
    const ids = tokens.encode(multilingual, rng, 1 + (seed % 6));
    if (rng.nextFloat() < 0.5) ids.splice(Math.floor(rng.nextFloat() * ids.length), 0, 2); // a special token
    const decoder = new IncrementalDecoder(tokens.decode);
    const pieces = ids.map((id) => decoder.push(id));
    pieces.push(decoder.flush());
    for (const piece of pieces) assert.ok(!piece.includes("\uFFFD"), `seed ${seed}: emitted ${JSON.stringify(piece)}`);
    assert.equal(pieces.join(""), multilingual);
  }
});

test("incremental decoding emits a character as soon as its last byte arrives", () => {
  const tokens = new ByteTokens();
  const decoder = new IncrementalDecoder(tokens.decode);
  const ids = tokens.encode("a😀b", new Rng(0), 1); // one byte per token: 61 f0 9f 98 80 62
  assert.deepEqual(
    ids.map((id) => decoder.push(id)),
    ["a", "", "", "", "😀", "b"],
  );
  assert.equal(decoder.flush(), "");
});

test("incremental decoding with prompt context emits only the generated text", () => {
  const tokens = new ByteTokens();
  const rng = new Rng(3);
  const prompt = tokens.encode("Prompt: 日本", rng, 4);
  const generated = tokens.encode("語 and 😀!", rng, 3);
  const decoder = new IncrementalDecoder(tokens.decode, prompt.slice(-5));
  const pieces = generated.map((id) => decoder.push(id));
  pieces.push(decoder.flush());
  for (const piece of pieces) assert.ok(!piece.includes("\uFFFD"), JSON.stringify(piece));
  assert.equal(pieces.join(""), "語 and 😀!");
});

test("incremental decoding hands over an unfinished character at flush", () => {
  const tokens = new ByteTokens();
  const decoder = new IncrementalDecoder(tokens.decode);
  const ids = tokens.encode("ok世", new Rng(0), 1).slice(0, 4); // "ok" and 2 of the 3 bytes of 世
  assert.equal(ids.map((id) => decoder.push(id)).join(""), "ok");
  assert.equal(decoder.flush(), "\uFFFD"); // what a full decode gives for the cut character
  assert.equal(tokens.decode(ids), "ok\uFFFD");
  assert.equal(decoder.flush(), "");
});

const noFixture = existsSync(fixtureTokenizer) ? false : `no fixture at ${fixtureTokenizer}`;

const realTokenizerTest = "incremental decoding with the fixture's byte-level BPE tokenizer matches a full decode";
test(realTokenizerTest, { skip: noFixture }, async () => {
  const tokenizer = Tokenizer.fromFile(fixtureTokenizer);
  const byteLevel = tokenizer.getDecoder()!;
  const decode = (ids: number[]) =>
    byteLevel.decode(ids.filter((id) => id > 3).map((id) => tokenizer.idToToken(id)!));
  const texts = [
    multilingual,
    "The quick brown fox jumps over the lazy dog.\n\nNew paragraph:  two  spaces",
    "日本語のテキストと한국어 텍스트, emoji 🧑‍🚀 and 🇫🇷.",
  ];
  for (const text of texts) {
    const ids = (await tokenizer.encode(text)).getIds();
    assert.equal(decode(ids), text, "the fixture tokenizer round-trips");
    if (/[^\x00-\x7f]/.test(text)) {
      assert.ok(ids.some((id) => decode([id]).includes("\uFFFD")), "some token holds a partial character");
    }
    const withSpecial = [1, ...ids.slice(0, 5), 2, ...ids.slice(5)]; // <s> and </s> decode to nothing
    const decoder = new IncrementalDecoder(decode);
    const pieces = withSpecial.map((id) => decoder.push(id));
    pieces.push(decoder.flush());
    for (const piece of pieces) assert.ok(!piece.includes("\uFFFD"), JSON.stringify(piece));
    assert.equal(pieces.join(""), text);
  }
});

/** Pushes the pieces through a matcher and returns everything it emitted, and whether it stopped. */
function runMatcher(stops: string[], pieces: string[]): { text: string; stopped: boolean; emits: string[] } {
  const matcher = new StopStringMatcher(stops);
  const emits: string[] = [];
  let stopped = false;
  for (const piece of pieces) {
    const result = matcher.push(piece);
    emits.push(result.emit);
    if (result.stopped) {
      stopped = true;
      break;
    }
  }
  if (!stopped) emits.push(matcher.flush());
  return { text: emits.join(""), stopped, emits };
}

test("a stop string split across pushes stops the text just before it", () => {
  const { text, stopped, emits } = runMatcher(["###"], ["Hello #", "#", "# and more"]);
  assert.equal(stopped, true);
  assert.equal(text, "Hello ");
  assert.deepEqual(emits, ["Hello ", "", ""]); // "#" and "##" were held back
});

test("held-back text is released when it stops looking like a stop string", () => {
  assert.deepEqual(runMatcher(["User:"], ["Hi Us", "ually", " ok"]), {
    text: "Hi Usually ok",
    stopped: false,
    emits: ["Hi ", "Usually", " ok", ""],
  });
  // Text that ends inside a possible stop string is returned by flush().
  assert.deepEqual(runMatcher(["\n\nUser:"], ["answer\n", "\nUs"]), {
    text: "answer\n\nUs",
    stopped: false,
    emits: ["answer", "", "\n\nUs"],
  });
});

test("after a stop nothing more is emitted", () => {
  const matcher = new StopStringMatcher(["END"]);
  assert.deepEqual(matcher.push("abcEN"), { emit: "abc", stopped: false });
  assert.deepEqual(matcher.push("Dxyz"), { emit: "", stopped: true });
  assert.deepEqual(matcher.push("more"), { emit: "", stopped: true });
  assert.equal(matcher.flush(), "");
});

test("with several stop strings the first completed one wins, however the text is split", () => {
  const stops = ["abcd", "bc", "\n\n", "😀x"];
  const cases: Array<[string, string]> = [
    ["xxabcdyy", "xxa"], // "bc" completes before "abcd"
    ["one\n\ntwo", "one"],
    ["emoji 😀 😀x tail", "emoji 😀 "],
    ["nothing here", "nothing here"],
    ["ab\nc", "ab\nc"],
  ];
  for (const [input, expected] of cases) {
    for (let seed = 1; seed <= 30; seed++) {
      const rng = new Rng(seed);
      const pieces: string[] = [];
      for (let at = 0; at < input.length; ) {
        let size = 1 + Math.floor(rng.nextFloat() * 4);
        // Keep surrogate pairs whole: a detokenizer never splits a character.
        if (/[\uD800-\uDBFF]/.test(input[at + size - 1] ?? "")) size++;
        pieces.push(input.slice(at, at + size));
        at += size;
      }
      const result = runMatcher(stops, pieces);
      assert.equal(result.text, expected, `${JSON.stringify(input)} split as ${JSON.stringify(pieces)}`);
      assert.equal(result.stopped, expected !== input);
    }
  }
});

test("no stop strings: text passes straight through", () => {
  assert.deepEqual(runMatcher([], ["a", "b"]), { text: "ab", stopped: false, emits: ["a", "b", ""] });
});

test("finishReasonAfter: length first (like text-generation-inference), then EOS once minNewTokens allow it", () => {
  const params = resolveGenerationParams({ maxNewTokens: 5, minNewTokens: 2 });
  const eos = [2, 7];
  assert.equal(finishReasonAfter(9, 1, params, eos), undefined);
  assert.equal(finishReasonAfter(2, 1, params, eos), undefined); // EOS as the 1st token: minNewTokens 2 not met
  assert.equal(finishReasonAfter(2, 2, params, eos), undefined); // EOS as the 2nd token: still not met
  assert.equal(finishReasonAfter(7, 3, params, eos), "eos_token"); // after 2 real tokens, EOS ends it
  assert.equal(finishReasonAfter(9, 4, params, eos), undefined);
  assert.equal(finishReasonAfter(9, 5, params, eos), "length");
  assert.equal(finishReasonAfter(2, 5, params, eos), "length");
  const noMin = resolveGenerationParams({ maxNewTokens: 1 });
  assert.equal(finishReasonAfter(2, 1, noMin, eos), "length");
  assert.equal(finishReasonAfter(2, 1, resolveGenerationParams({}), eos), "eos_token");
  assert.equal(finishReasonAfter(2, 1, resolveGenerationParams({}), []), undefined);
});
