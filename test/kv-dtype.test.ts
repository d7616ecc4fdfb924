/**
 * The 16-bit KV cache (option kvDtype "fp16" / "bf16"): keys and values are rounded to 16 bits as
 * they are appended, so logits move by that rounding and no more. Against the golden fixtures'
 * fp32 logits, measured at the time of writing (max |diff| over the `single` and `kv_decode`
 * cases): fp16 0.8e-3 .. 2.4e-3, bf16 5.9e-3 .. 1.9e-2 (logits up to |13|); both reproduce every
 * golden greedy generation exactly. The bounds below are about twice those. Also: the native
 * kernels and the TypeScript reference backend agree on a 16-bit cache, the pool takes half the
 * bytes per token, and a bad kvDtype is refused by name.
 */
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { describe, test } from "node:test";
import type { KVDType } from "../src/backend/backend.js";
import { ReferenceBackend } from "../src/backend/reference.js";
import { loadEngine } from "../src/engine/load.js";
import { loadModel } from "../src/index.js";
import { fixtureDir, fixtureNames, Golden, maxAbsDiff } from "./helpers/fixtures.js";

const bound: Record<Exclude<KVDType, "fp32">, number> = { fp16: 5e-3, bf16: 4e-2 };

for (const kvDtype of ["fp16", "bf16"] as const) {
  describe(`KV cache in ${kvDtype}`, () => {
    for (const name of fixtureNames) {
      test(`${name}: logits within ${bound[kvDtype]} of the fp32 golden ones, greedy generations exact`, async () => {
        const golden = new Golden(name);
        const model = await loadModel(fixtureDir(name), { kvDtype, kvCacheTokens: 1024 });
        try {
          assert.equal(model.info.kvDtype, kvDtype);
          const single = golden.manifest.cases.single;
          const out = await model.forward([single.input_ids]);
          const d1 = maxAbsDiff(out.data, golden.tensor(single.logits).data);
          assert.ok(d1 <= bound[kvDtype], `single: max |diff| ${d1}`);

          const c = golden.manifest.cases.kv_decode;
          const V = model.config.vocabSize;
          const session = await model.openSession();
          try {
            let diff = maxAbsDiff(await session.append(c.prompt_ids), golden.tensor(c.prompt_logits).data);
            const steps = golden.tensor(c.step_logits).data;
            for (const [k, id] of c.step_ids.entries()) diff = Math.max(diff, maxAbsDiff(await session.append([id], "last"), steps, 0, k * V, V));
            assert.ok(diff <= bound[kvDtype], `kv_decode: max |diff| ${diff}`);
          } finally {
            await session.close();
          }

          const g = golden.manifest.cases.greedy;
          const r = await model.generate(
            g.prompts.map((p) => p.prompt_ids),
            { maxNewTokens: g.max_new_tokens },
          );
          g.prompts.forEach((p, i) => assert.deepEqual(r.tokenIds[i], p.new_ids, `greedy prompt ${i}`));
        } finally {
          await model.dispose();
          golden.dispose();
        }
      });
    }
  });
}

test("trained-bloom-small: held-out perplexity with a 16-bit KV cache stays within 0.05 % of the reference's", async () => {
  const dir = fixtureDir("trained-bloom-small");
  const reference = (JSON.parse(readFileSync(join(dir, "golden/eval.json"), "utf8")) as { heldout: { perplexity: number } }).heldout.perplexity;
  const text = readFileSync(join(dir, "golden/heldout.txt"), "utf8");
  for (const kvDtype of ["fp16", "bf16"] as const) {
    const model = await loadModel(dir, { kvDtype, kvCacheTokens: 16384 });
    try {
      const { perplexity } = await model.perplexity(text, { context: 128, stride: 128 });
      assert.ok(Math.abs(perplexity / reference - 1) <= 5e-4, `${kvDtype}: perplexity ${perplexity} vs ${reference}`);
    } finally {
      await model.dispose();
    }
  }
});

test("native kernels and the TypeScript reference backend agree on a 16-bit cache", () => {
  const golden = new Golden("tiny-bloom-b");
  try {
    const c = golden.manifest.cases.kv_decode;
    for (const kvDtype of ["fp16", "bf16"] as const) {
      const logitsOf = (reference: boolean) => {
        const loaded = loadEngine(fixtureDir("tiny-bloom-b"), { kvDtype, kvCacheTokens: 256, ...(reference ? { backend: new ReferenceBackend() } : {}) });
        try {
          const seq = loaded.engine.createSequence();
          const rows = [loaded.engine.step([{ sequence: seq, tokens: c.prompt_ids, logits: "all" }])[0]!.slice()];
          for (const id of c.step_ids) rows.push(loaded.engine.step([{ sequence: seq, tokens: [id], logits: "last" }])[0]!.slice());
          return rows;
        } finally {
          loaded.dispose();
        }
      };
      const native = logitsOf(false), reference = logitsOf(true);
      // Both round the same keys and values to 16 bits; the keys and values themselves differ by
      // fp32 rounding (different summation orders), which can move an entry by one 16-bit step.
      const worst = Math.max(...native.map((row, i) => maxAbsDiff(row, reference[i]!)));
      assert.ok(worst <= bound[kvDtype] / 4, `${kvDtype}: native vs reference max |diff| ${worst}`);
    }
  } finally {
    golden.dispose();
  }
});

test("a 16-bit cache takes half the bytes per token, so the default pool holds twice the tokens", async () => {
  const dir = fixtureDir("tiny-bloom-a");
  const wide = await loadModel(dir, { kvCacheTokens: 512 });
  const narrow = await loadModel(dir, { kvCacheTokens: 512, kvDtype: "bf16" });
  try {
    assert.equal(wide.info.kvDtype, "fp32");
    assert.equal(narrow.info.kvBytesPerToken * 2, wide.info.kvBytesPerToken);
    const stats = await narrow.stats();
    assert.equal(stats.kvBlocksTotal * stats.kvBlockSize, 512);
  } finally {
    await wide.dispose();
    await narrow.dispose();
  }
});

test("a kvDtype that is not fp32, fp16 or bf16 is refused by name", async () => {
  await assert.rejects(loadModel(fixtureDir("tiny-bloom-a"), { kvDtype: "int8" as KVDType }), /kvDtype: expected one of fp32, fp16, bf16, got "int8"/);
  assert.throws(() => loadEngine(fixtureDir("tiny-bloom-a"), { kvDtype: "f16" as KVDType }), /kvDtype: expected one of fp32, fp16, bf16, got "f16"/);
});
