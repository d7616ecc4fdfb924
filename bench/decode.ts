/**
 * `npm run bench:decode`: greedy decoding of 100 tokens at batch 1 on a bloom-560m-shaped bf16
 * checkpoint (the default model, created once), next to its floor: the bytes one decode step must
 * read (every weight matrix, the LM head included, and the KV cache) over the read bandwidth
 * measured in the same run.
 *
 * Options: --model DIR (another checkpoint), --dtype, --new-tokens N (100), --runs N (3, median
 * reported), --threads N, --json FILE.
 */
import { writeFileSync } from "node:fs";
import { parseArgs } from "node:util";
import { native } from "../src/backend/native.js";
import { ensureDefaultModel } from "../src/cli/commands/demo.js";
import { formatBytes } from "../src/engine/memory.js";
import type { WeightDType } from "../src/engine/weights.js";
import { loadModel } from "../src/index.js";

const { values: o } = parseArgs({
  options: {
    model: { type: "string" },
    dtype: { type: "string", default: "auto" },
    "new-tokens": { type: "string", default: "100" },
    runs: { type: "string", default: "3" },
    threads: { type: "string" },
    json: { type: "string" },
  },
});
const newTokens = Number(o["new-tokens"]);
const runs = Number(o.runs);
const log = (line: string) => process.stdout.write(line + "\n");

const dir = o.model ?? (await ensureDefaultModel(log));
const threads = o.threads ? Number(o.threads) : native().cpuInfo().physicalCores;
const model = await loadModel(dir, { dtype: o.dtype as WeightDType, threads });
try {
  const info = model.info;
  const prompt = "DeepSpeed is a machine learning framework";
  const promptTokens = (await model.tokenizer.encode(prompt)).length;
  // Bytes a decode step reads: every weight matrix once (the tied head is the embedding, read once
  // as the head; the lookup touches one row), plus the KV cache of the tokens so far.
  const weightBytes = info.weightBytes;
  const meanKvTokens = promptTokens + newTokens / 2;
  const kvBytes = meanKvTokens * info.kvBytesPerToken;
  const stepBytes = weightBytes + kvBytes;

  await model.generate([prompt], { maxNewTokens: 8, minNewTokens: 8 }); // warm-up: pages the weights in
  const bandwidth = native().probeReadBandwidth(1 << 30, threads, 5);
  const times: number[] = [];
  for (let r = 0; r < runs; r++) {
    const t0 = performance.now();
    const g = await model.generate([prompt], { maxNewTokens: newTokens, minNewTokens: newTokens });
    const ms = performance.now() - t0;
    // Decode time per token: the first token (prefill of the prompt) is excluded.
    times.push((ms - g.timeToFirstToken[0]! * 1000) / (newTokens - 1));
  }
  const bandwidthAfter = native().probeReadBandwidth(1 << 30, threads, 5);
  const bw = Math.max(bandwidth, bandwidthAfter);
  times.sort((a, b) => a - b);
  const median = times[Math.floor(times.length / 2)]!;
  const floorMs = (stepBytes / (bw * 1e9)) * 1000;
  log(`model: ${dir} (${info.numLayers} layers, hidden ${info.hiddenSize}, vocab ${info.vocabSize}), ${info.storedDtypes.join("/")} as ${info.dtype}, ${info.threads} threads, ${info.kernels} kernels`);
  log(`bytes read per decode step: ${formatBytes(stepBytes)} (weights ${formatBytes(weightBytes)}, KV cache ${formatBytes(kvBytes)} at ${meanKvTokens} tokens)`);
  log(`measured read bandwidth: ${bw.toFixed(1)} GB/s (before ${bandwidth.toFixed(1)}, after ${bandwidthAfter.toFixed(1)}) -> floor ${floorMs.toFixed(2)} ms/token`);
  log(`greedy decode, batch 1, ${newTokens} tokens, ${runs} runs: ${times.map((t) => t.toFixed(2)).join(", ")} ms/token`);
  log(`median ${median.toFixed(2)} ms/token = ${(median / floorMs).toFixed(3)} x the bandwidth floor (${((stepBytes / (median / 1000)) / 1e9).toFixed(1)} GB/s effective)`);
  if (o.json) {
    writeFileSync(o.json, JSON.stringify({ dir, info, stepBytes, weightBytes, kvBytes, bandwidthGBs: bw, floorMs, msPerToken: median, runs: times, ratio: median / floorMs }, null, 2) + "\n");
  }
} finally {
  await model.dispose();
}
