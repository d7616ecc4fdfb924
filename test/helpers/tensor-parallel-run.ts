/**
 * Run under mpirun by test/tensor-parallel.test.ts: loads a fixture with strategy "tensor" and, on
 * rank 0, prints one JSON line with the largest logit differences against the golden tensors and
 * whether greedy generation reproduced the golden tokens. With a third argument "panels", every
 * linear weight (each rank's shards included) is stored in column panels of 40 inputs.
 */
import { loadModel } from "../../src/index.js";
import { Golden, logitTolerance, maxAbsDiff, type FixtureName, fixtureDir } from "./fixtures.js";

const name = process.argv[2] as FixtureName;
const golden = new Golden(name);
const panels = process.argv[3] === "panels" ? { linearPanels: { width: 40, above: 40, dtypes: ["f32", "f16", "bf16"] as const } } : {};
const model = await loadModel(fixtureDir(name), { strategy: "tensor", ...panels });
const V = model.config.vocabSize;
const c = golden.manifest.cases;

const single = maxAbsDiff((await model.forward([c.single.input_ids])).data, golden.tensor(c.single.logits).data);

const padded = await model.forward(c.padded_batch.input_ids, c.padded_batch.attention_mask);
const T = c.padded_batch.input_ids[0]!.length;
const paddedGold = golden.tensor(c.padded_batch.logits).data;
let paddedDiff = 0;
c.padded_batch.attention_mask.forEach((row, b) =>
  row.forEach((m, t) => {
    if (m === 1) paddedDiff = Math.max(paddedDiff, maxAbsDiff(padded.data, paddedGold, (b * T + t) * V, (b * T + t) * V, V));
  }),
);

const session = await model.openSession();
let kvDiff = maxAbsDiff(await session.append(c.kv_decode.prompt_ids), golden.tensor(c.kv_decode.prompt_logits).data);
const steps = golden.tensor(c.kv_decode.step_logits).data;
for (const [k, id] of c.kv_decode.step_ids.entries()) kvDiff = Math.max(kvDiff, maxAbsDiff(await session.append([id], "last"), steps, 0, k * V, V));
await session.close();

const g = c.greedy.prompts;
const r = await model.generate(g.map((p) => p.prompt_ids), { maxNewTokens: c.greedy.max_new_tokens });
const greedy = g.every((p, i) => JSON.stringify(p.new_ids) === JSON.stringify(r.tokenIds[i]) && p.new_text === r.texts[i]);

process.stdout.write(JSON.stringify({ ranks: model.info.tensorParallel, tolerance: logitTolerance(name), single, padded: paddedDiff, kvDecode: kvDiff, greedy }) + "\n");
await model.dispose();
golden.dispose();
