/**
 * `npm run bench:int8 -- quality`: how much int8 changes the models' outputs, on the golden fixtures
 * (../shared/fixtures, fp32 PyTorch reference outputs).
 *
 * Per fixture and variant (int8 at several group sizes, int8-mixed):
 *   cosine   cosine similarity of next-token logits to the fp32 golden logits, over every position of
 *            the `single` case, the teacher-forced greedy steps and the KV-decode steps (min and mean);
 *   greedy   generating from each golden greedy prompt, how many first tokens agree with the golden
 *            tokens (the fixtures' 20, or eval.json's 30 for trained-bloom-small);
 * and on trained-bloom-small's held-out text: perplexity (windows of 128+1, as eval.json), and,
 * against Blossom's own fp32 run, mean KL(fp32 || int8) per token and top-1 agreement.
 *
 * Options: --groups 32,64,128,256 (int8 group sizes), --thresholds 6 (int8-mixed), --fixtures DIR, --json FILE.
 */
import { readFileSync, writeFileSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { SafetensorsFile } from "../src/checkpoint/safetensors.js";
import { readTensorAsF32 } from "../src/backend/reference.js";
import { loadModel, type LoadModelOptions, type Model } from "../src/index.js";
import { benchArgs, outputOption } from "./stats.js";

const fixtureNames = ["tiny-bloom-a", "tiny-bloom-b", "tiny-bloom-c", "trained-bloom-small"];

interface Variant {
  name: string;
  options: LoadModelOptions;
}

interface FixtureResult {
  fixture: string;
  variant: string;
  cosineMin: number;
  cosineMean: number;
  rows: number;
  greedyPrompts: number;
  greedyAgree10: number;
  greedyPrefix: number[];
  perplexity?: number;
  perplexityChange?: number;
  klMean?: number;
  top1Agreement?: number;
}

function cosine(a: Float32Array, b: Float32Array): number {
  let ab = 0, aa = 0, bb = 0;
  for (let i = 0; i < a.length; i++) {
    ab += a[i]! * b[i]!;
    aa += a[i]! * a[i]!;
    bb += b[i]! * b[i]!;
  }
  return ab / Math.sqrt(aa * bb);
}

function logSoftmax(row: Float32Array): Float64Array {
  let max = -Infinity;
  for (const v of row) max = Math.max(max, v);
  let sum = 0;
  for (const v of row) sum += Math.exp(v - max);
  const lse = max + Math.log(sum);
  return Float64Array.from(row, (v) => v - lse);
}

function argmax(row: ArrayLike<number>): number {
  let best = 0;
  for (let i = 1; i < row.length; i++) if (row[i]! > row[best]!) best = i;
  return best;
}

interface GoldenPrompt {
  prompt_ids: number[];
  new_ids: number[];
  step_logits?: string;
}

/** Logits rows of `model` for `ids`, one per position. */
async function logitsOf(model: Model, ids: number[]): Promise<Float32Array[]> {
  const out = await model.forward([ids]);
  const V = out.dims[2];
  return ids.map((_, t) => out.data.subarray(t * V, (t + 1) * V));
}

async function evaluate(dir: string, variant: Variant, fp32: Model | undefined): Promise<FixtureResult> {
  const manifest = JSON.parse(readFileSync(join(dir, "golden/manifest.json"), "utf8"));
  const tensors = SafetensorsFile.open(join(dir, "golden/tensors.safetensors"));
  const golden = (name: string) => readTensorAsF32(tensors.tensor(name));
  const model = await loadModel(dir, variant.options);
  try {
    const V = model.config.vocabSize;
    const cosines: number[] = [];
    // single: every position.
    const single = manifest.cases.single;
    const singleLogits = golden(single.logits);
    (await logitsOf(model, single.input_ids)).forEach((row, t) => cosines.push(cosine(row, singleLogits.subarray(t * V, (t + 1) * V))));
    // KV decode: prompt then teacher-forced steps = full-sequence logits at the same positions.
    const kv = manifest.cases.kv_decode;
    const kvSteps = golden(kv.step_logits);
    const kvRows = await logitsOf(model, [...kv.prompt_ids, ...kv.step_ids]);
    kv.step_ids.forEach((_: number, k: number) => cosines.push(cosine(kvRows[kv.prompt_ids.length + k]!, kvSteps.subarray(k * V, (k + 1) * V))));
    // Greedy: teacher-forced step logits, and free-running agreement.
    const prompts: GoldenPrompt[] = manifest.cases.greedy.prompts;
    for (const p of prompts) {
      const steps = golden(p.step_logits!);
      const rows = await logitsOf(model, [...p.prompt_ids, ...p.new_ids.slice(0, -1)]);
      p.new_ids.forEach((_, k) => cosines.push(cosine(rows[p.prompt_ids.length - 1 + k]!, steps.subarray(k * V, (k + 1) * V))));
    }
    let greedySet = prompts;
    const evalFile = join(dir, "golden/eval.json");
    let evalJson: { greedy: { prompts: GoldenPrompt[] }; heldout: { perplexity: number } } | undefined;
    try {
      evalJson = JSON.parse(readFileSync(evalFile, "utf8"));
      greedySet = [...prompts, ...evalJson!.greedy.prompts];
    } catch {
      // Only trained-bloom-small has eval.json.
    }
    const prefix: number[] = [];
    for (const p of greedySet) {
      const n = p.new_ids.length;
      const r = await model.generate([p.prompt_ids], { maxNewTokens: n, minNewTokens: n });
      const got = r.tokenIds[0]!;
      let k = 0;
      while (k < n && got[k] === p.new_ids[k]) k++;
      prefix.push(k);
    }
    const result: FixtureResult = {
      fixture: dir.split("/").at(-1)!,
      variant: variant.name,
      cosineMin: Math.min(...cosines),
      cosineMean: cosines.reduce((a, b) => a + b, 0) / cosines.length,
      rows: cosines.length,
      greedyPrompts: prefix.length,
      greedyAgree10: prefix.filter((k) => k >= 10).length,
      greedyPrefix: prefix,
    };
    if (evalJson) {
      const text = readFileSync(join(dir, "golden/heldout.txt"), "utf8");
      const ppl = await model.perplexity(text, { context: 128, stride: 128 });
      result.perplexity = ppl.perplexity;
      result.perplexityChange = ppl.perplexity / evalJson.heldout.perplexity - 1;
      if (fp32) {
        // KL(fp32 || variant) and top-1 agreement over the held-out windows.
        const ids = await model.tokenizer.encode(text);
        let kl = 0, agree = 0, count = 0;
        for (let start = 0; start + 1 < ids.length; start += 128) {
          const window = ids.slice(start, start + 129);
          const [a, b] = await Promise.all([logitsOf(fp32, window), logitsOf(model, window)]);
          for (let t = 0; t < window.length - 1; t++) {
            const p = logSoftmax(a[t]!), q = logSoftmax(b[t]!);
            let d = 0;
            for (let i = 0; i < p.length; i++) d += Math.exp(p[i]!) * (p[i]! - q[i]!);
            kl += d;
            if (argmax(a[t]!) === argmax(b[t]!)) agree++;
            count++;
          }
        }
        result.klMean = kl / count;
        result.top1Agreement = agree / count;
      }
    }
    return result;
  } finally {
    await model.dispose();
    tensors.dispose();
  }
}

export async function runQuality(argv: string[]): Promise<void> {
  const { values } = benchArgs("npm run bench:int8 -- quality", "int8-quality", {
    args: argv,
    options: {
      groups: { type: "string", default: "32,64,128,256" },
      thresholds: { type: "string", default: "6" },
      // Beside the repository (dist/bench/ is two levels down), wherever the script is run from.
      fixtures: { type: "string", default: process.env.BLOSSOM_FIXTURES ?? resolve(dirname(fileURLToPath(import.meta.url)), "../../../shared/fixtures") },
      json: { type: "string" },
    },
  });
  outputOption("--json", values.json);
  const list = (v: string) => v.split(",").map((s) => s.trim()).filter(Boolean);
  const variants: Variant[] = [
    { name: "fp32 (as stored)", options: { dtype: "auto" } },
    ...list(values.groups!).map((g) => ({ name: `int8 g${g}`, options: { dtype: "int8" as const, int8GroupSize: Number(g) } })),
    ...list(values.thresholds!).map((t) => ({ name: `int8-mixed t${t}`, options: { dtype: "int8-mixed" as const, int8Threshold: Number(t) } })),
  ];
  const results: FixtureResult[] = [];
  // Wide enough for the trained fixture's 9 prompts' greedy prefix lengths (up to 30 tokens each).
  const prefixWidth = 26;
  console.log(`${"fixture".padEnd(20)} ${"variant".padEnd(18)} ${"cos min".padStart(9)} ${"cos mean".padStart(9)} ${"greedy>=10".padStart(10)}  ${"prefix lengths".padEnd(prefixWidth)} ${"ppl (change)".padEnd(18)} KL/token   top-1`);
  for (const name of fixtureNames) {
    const dir = join(values.fixtures!, name);
    const fp32 = name === "trained-bloom-small" ? await loadModel(dir, { dtype: "auto" }) : undefined;
    try {
      for (const v of variants) {
        const r = await evaluate(dir, v, v.options.dtype === "auto" ? undefined : fp32);
        results.push(r);
        const ppl = r.perplexity !== undefined ? `${r.perplexity.toFixed(3)} (${(r.perplexityChange! * 100).toFixed(2)}%)` : "";
        const kl = r.klMean !== undefined ? `${r.klMean.toExponential(2)}   ${(r.top1Agreement! * 100).toFixed(1)}%` : "";
        console.log(
          `${name.padEnd(20)} ${v.name.padEnd(18)} ${r.cosineMin.toFixed(6).padStart(9)} ${r.cosineMean.toFixed(6).padStart(9)} ${`${r.greedyAgree10}/${r.greedyPrompts}`.padStart(10)}  ${r.greedyPrefix.join(",").padEnd(prefixWidth)} ${ppl.padEnd(18)} ${kl}`.trimEnd(),
        );
      }
    } finally {
      await fp32?.dispose();
    }
  }
  if (values.json) writeFileSync(values.json, JSON.stringify(results, null, 2));
}
