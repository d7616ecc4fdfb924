/** The tokenizer: golden cases, left padding, synchronous decode, streaming decode. */
import assert from "node:assert/strict";
import { describe, test } from "node:test";
import { IncrementalDecoder } from "../src/generate/stopping.js";
import { BloomTokenizer, padLeft } from "../src/tokenizer/tokenizer.js";
import { fixtureDir, fixtureNames, Golden } from "./helpers/fixtures.js";

for (const name of fixtureNames) {
  describe(`${name} tokenizer`, () => {
    const tokenizer = BloomTokenizer.fromDir(fixtureDir(name));
    const golden = new Golden(name);

    test("golden cases: ids and decoded text exactly (regex, whitespace, CJK, emoji, inline specials)", async () => {
      for (const c of golden.manifest.tokenizer_cases) {
        assert.deepEqual(await tokenizer.encode(c.text), c.ids, JSON.stringify(c.text));
        assert.equal(tokenizer.decode(c.ids), c.decoded, JSON.stringify(c.text));
      }
    });

    test("special tokens: ids, and decode skips them unless asked", () => {
      assert.equal(tokenizer.padTokenId, 3);
      assert.equal(tokenizer.eosTokenId, 2);
      assert.equal(tokenizer.bosTokenId, 1);
      assert.deepEqual([...tokenizer.specialTokenIds].sort(), [0, 1, 2, 3]);
      const ids = [1, 100, 2, 101, 3];
      assert.equal(tokenizer.decode(ids), tokenizer.decode([100, 101]));
      assert.ok(tokenizer.decode(ids, { skipSpecialTokens: false }).startsWith("<s>"));
    });

    test("synchronous decode equals the library's decode on random id sequences", async () => {
      let seed = 12345;
      const rand = () => ((seed = (seed * 1103515245 + 12345) >>> 0) / 2 ** 32);
      for (let n = 0; n < 200; n++) {
        const ids = Array.from({ length: 1 + Math.floor(rand() * 12) }, () => Math.floor(rand() * tokenizer.vocabSize));
        assert.equal(tokenizer.decode(ids), await tokenizer.decodeAsync(ids), JSON.stringify(ids));
      }
    });

    test("batch encoding pads on the left with a 0/1 attention mask", async () => {
      const texts = ["Hello, world!", "Hi", "A somewhat longer sentence here."];
      const batch = await tokenizer.encodeBatch(texts);
      const lengths = await Promise.all(texts.map(async (t) => (await tokenizer.encode(t)).length));
      const width = Math.max(...lengths);
      batch.inputIds.forEach((row, i) => {
        assert.equal(row.length, width);
        const pad = width - lengths[i]!;
        assert.deepEqual(row.slice(0, pad), new Array(pad).fill(3));
        assert.deepEqual(batch.attentionMask[i], [...new Array(pad).fill(0), ...new Array(lengths[i]).fill(1)]);
      });
      assert.deepEqual(padLeft([[5], []], 3), { inputIds: [[5], [3]], attentionMask: [[1], [0]] });
    });

    test("streaming decode: multi-byte characters split across tokens never print garbage", async () => {
      const text = "naïve café — 日本語のテキスト 🙂🚀 and ünïcödé, ok.";
      const ids = await tokenizer.encode(text);
      const decoder = new IncrementalDecoder((x) => tokenizer.decode(x));
      let out = "";
      for (const id of ids) {
        const piece = decoder.push(id);
        assert.ok(!piece.includes("\uFFFD"), `piece ${JSON.stringify(piece)} holds a replacement character`);
        out += piece;
      }
      out += decoder.flush();
      assert.equal(out, text);
    });
  });
}
