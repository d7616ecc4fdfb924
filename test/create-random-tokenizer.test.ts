import { test } from "node:test";
import assert from "node:assert/strict";
import { existsSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { Tokenizer } from "tokenizers";
import {
  buildSyntheticTokenizer,
  byteToUnicode,
  defaultTrainingTexts,
  FIRST_MERGE_ID,
  splitLikeBloom,
  syntheticTokenizerJson,
  writeSyntheticTokenizer,
} from "../src/tokenizer/synthetic.js";

const FIXTURES = process.env.BLOSSOM_FIXTURES ?? fileURLToPath(new URL("../../../shared/fixtures/", import.meta.url));
const haveFixtures = existsSync(join(FIXTURES, "tiny-bloom-a", "tokenizer.json"));
const haveLicenses = defaultTrainingTexts().source === "/usr/share/common-licenses";

const PARAGRAPH =
  "Blossom (a BLOOM runtime) reads   tensors|weights — fast!\tTabs,\r\nCRLF and\n\nblank lines. " +
  "Unicode: naïve café, Ελληνικά, русский, العربية, हिन्दी, 日本語の文章。中文，标点、符号 " +
  "emoji 🌸🚀 NBSP\u00a0here, ideographic\u3000space, <s>special</s> <pad> <unk> [brackets] {braces} 100% $5.";

interface TokenizerJson {
  added_tokens: Array<{ id: number; content: string; special: boolean }>;
  model: { vocab: Record<string, number>; merges: string[] };
}

function checkMerges(json: TokenizerJson, vocabSize: number): void {
  const { vocab, merges } = json.model;
  assert.equal(Object.keys(vocab).length, vocabSize);
  const ids = new Set(Object.values(vocab));
  assert.equal(ids.size, vocabSize, "ids are unique");
  assert.equal([...ids].reduce((a, b) => Math.max(a, b), 0), vocabSize - 1, "ids are 0..vocabSize-1");
  assert.deepEqual(json.added_tokens.map((t) => [t.id, t.content, t.special]), [[0, "<unk>", true], [1, "<s>", true], [2, "</s>", true], [3, "<pad>", true]]);
  const bytes = byteToUnicode();
  bytes.forEach((symbol, byte) => assert.equal(vocab[symbol], 4 + byte));
  assert.equal(merges.length, vocabSize - FIRST_MERGE_ID);
  merges.forEach((merge, rank) => {
    const parts = merge.split(" ");
    assert.equal(parts.length, 2, `merge ${rank} is "a b"`);
    const [left, right] = parts;
    assert.ok(vocab[left] !== undefined && vocab[right] !== undefined, `merge ${rank} (${merge}): both parts are tokens`);
    assert.equal(vocab[left + right], FIRST_MERGE_ID + rank, `merge ${rank} (${merge}) makes the next token`);
    assert.ok(vocab[left] < FIRST_MERGE_ID + rank && vocab[right] < FIRST_MERGE_ID + rank, `merge ${rank}: parts exist before the merge`);
  });
}

test("the pre-tokenizer split matches the Rust library's on tricky text", { skip: !haveFixtures && "fixtures not found" }, () => {
  const reference = Tokenizer.fromFile(join(FIXTURES, "tiny-bloom-a", "tokenizer.json")).getPreTokenizer()!;
  const table = byteToUnicode();
  const encoder = new TextEncoder();
  const samples = [PARAGRAPH, "", " ", "a\u0085b\ufeffc d", "(((x)))||y", "x  \n\n  y...!?", "end with space "];
  for (const text of samples) {
    const mine = splitLikeBloom(text).map((piece) => [...encoder.encode(piece)].map((b) => table[b]).join(""));
    const theirs = reference.preTokenizeString(text).map(([piece]) => piece);
    assert.deepEqual(mine, theirs, JSON.stringify(text));
  }
});

test("trained on the license texts, the tokenizer equals the golden fixtures' byte for byte", { skip: (!haveFixtures || !haveLicenses) && "fixtures or /usr/share/common-licenses not found" }, async () => {
  for (const [name, vocabSize] of [["tiny-bloom-a", 1536], ["tiny-bloom-b", 1100], ["tiny-bloom-c", 2000]] as const) {
    const expected = readFileSync(join(FIXTURES, name, "tokenizer.json"), "utf8");
    assert.ok(syntheticTokenizerJson({ vocabSize }) === expected, `${name}: tokenizer.json differs`);
  }
  const dir = mkdtempSync(join(tmpdir(), "blossom-tok-"));
  try {
    await writeSyntheticTokenizer(join(dir, "tokenizer.json"), { vocabSize: 1536 });
    assert.ok(readFileSync(join(dir, "tokenizer.json"), "utf8") === readFileSync(join(FIXTURES, "tiny-bloom-a", "tokenizer.json"), "utf8"));
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test("a 250880-entry tokenizer is valid, loads with `tokenizers` and round-trips Unicode text", async () => {
  const text = syntheticTokenizerJson({ vocabSize: 250880 });
  const json = JSON.parse(text) as TokenizerJson;
  checkMerges(json, 250880);
  const tokenizer = Tokenizer.fromString(text);
  assert.equal(tokenizer.getVocabSize(true), 250880);
  const encoding = await tokenizer.encode(PARAGRAPH);
  const ids = encoding.getIds();
  assert.equal(await tokenizer.decode(ids, false), PARAGRAPH);
  assert.ok(ids.every((id) => id >= 0 && id < 250880));
  // BLOOM's post-processor adds nothing; special tokens in the text are single ids.
  assert.equal((await tokenizer.encode("<s>")).getIds().join(), "1");
  assert.deepEqual((await tokenizer.encode("</s><pad><unk>")).getIds(), [2, 3, 0]);
  // Whole characters exist for common scripts, and frequent words are single tokens.
  assert.equal((await tokenizer.encode("日")).getIds().length, 1);
  assert.equal((await tokenizer.encode("é")).getIds().length, 1);
  if (haveLicenses) assert.deepEqual((await tokenizer.encode(" the License")).getTokens(), ["Ġthe", "ĠLicense"]);
});

test("a tiny training text still fills any vocabulary size with valid merges", async () => {
  for (const vocabSize of [FIRST_MERGE_ID, 300, 5000, 40000]) {
    const json = buildSyntheticTokenizer({ vocabSize, texts: ["the cat sat on the mat, the end."] });
    const text = JSON.stringify({ ...json, model: { ...(json.model as object), vocab: Object.fromEntries((json.model as { vocab: Map<string, number> }).vocab) } });
    checkMerges(JSON.parse(text) as TokenizerJson, vocabSize);
    const tokenizer = Tokenizer.fromString(text);
    assert.equal(await tokenizer.decode((await tokenizer.encode(PARAGRAPH)).getIds(), false), PARAGRAPH);
  }
  assert.throws(() => buildSyntheticTokenizer({ vocabSize: 100 }), /vocabSize: must be an integer >= 260/);
});
