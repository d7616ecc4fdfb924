/**
 * `npm run bench:decode`: greedy decoding of 100 tokens at batch 1 on a bloom-560m-shaped bf16
 * checkpoint (the default model, created once), next to its floor: the bytes one decode step must
 * read (every weight matrix, the LM head included, and the KV cache) over the read bandwidth
 * measured in the same run.
 *
 * Options: --model DIR (another checkpoint), --dtype, --new-tokens N (100), --runs N (3, median
 * reported), --threads N, --json FILE, --row-major (keep every matrix row-major: no column panels
 * for long rows, src/backend/cpu.ts — to measure what they bring), --kv-dtype fp32|fp16|bf16 (the
 * KV cache's format), --prompt-tokens N (a longer prompt, the default one repeated to N tokens: the
 * KV cache's share of the step grows with it).
 */
import { readFileSync, writeFileSync } from "node:fs";
import { native } from "../src/backend/native.js";
import { ensureDefaultModel } from "../src/cli/commands/demo.js";
import { formatBytes } from "../src/engine/memory.js";
import type { WeightDType } from "../src/engine/weights.js";
import type { KVDType } from "../src/backend/backend.js";
import { loadModel } from "../src/index.js";
import { benchArgs, intOption, median, outputOption } from "./stats.js";

const { values: o } = benchArgs("npm run bench:decode --", "decode", {
  options: {
    model: { type: "string" },
    dtype: { type: "string", default: "auto" },
    "new-tokens": { type: "string", default: "100" },
    runs: { type: "string", default: "3" },
    threads: { type: "string" },
    json: { type: "string" },
    "row-major": { type: "boolean", default: false },
    "kv-dtype": { type: "string" },
    "prompt-tokens": { type: "string" },
  },
});
// The first token is the prompt's; decode time is measured between the later ones.
const newTokens = intOption("--new-tokens", o["new-tokens"], 2)!;
const runs = intOption("--runs", o.runs, 1)!;
const promptTokensOption = intOption("--prompt-tokens", o["prompt-tokens"], 1);
const jsonFile = outputOption("--json", o.json);
const log = (line: string) => process.stdout.write(line + "\n");

/** Bytes of file-backed memory this process maps with 2 MiB page-table entries (Linux), if known. */
function filePmdMappedBytes(): number | undefined {
  try {
    let kb = 0;
    for (const m of readFileSync("/proc/self/smaps", "utf8").matchAll(/^FilePmdMapped:\s+(\d+) kB/gm)) kb += Number(m[1]);
    return kb * 1024;
  } catch {
    return undefined;
  }
}

const dir = o.model ?? (await ensureDefaultModel(log));
const threads = intOption("--threads", o.threads, 1) ?? native().cpuInfo().physicalCores;
const model = await loadModel(dir, {
  dtype: o.dtype as WeightDType,
  threads,
  ...(o["row-major"] ? { linearPanels: null } : {}),
  ...(o["kv-dtype"] ? { kvDtype: o["kv-dtype"] as KVDType } : {}),
});
try {
  const info = model.info;
  const sentence = "DeepSpeed is a machine learning framework";
  let prompt: string | number[] = sentence;
  if (promptTokensOption !== undefined) {
    const ids = await model.tokenizer.encode(sentence + ". ");
    prompt = Array.from({ length: promptTokensOption }, (_, i) => ids[i % ids.length]!);
  }
  const promptTokens = typeof prompt === "string" ? (await model.tokenizer.encode(prompt)).length : prompt.length;
  // Bytes a decode step reads: every weight matrix once (the tied head is the embedding, read once
  // as the head; the lookup touches one row), plus the KV cache of the tokens so far.
  const weightBytes = info.weightBytes;
  const meanKvTokens = promptTokens + newTokens / 2;
  const kvBytes = meanKvTokens * info.kvBytesPerToken;
  const stepBytes = weightBytes + kvBytes;

  // Warm-up: one run as long as the measured ones, so that the weights are paged in and the KV-cache
  // blocks the runs reuse have been touched once (the first touch of fresh memory is the VM's cost,
  // not decoding's: on the development machine a step that first touches a 2 MiB page of a layer's
  // cache took ~5 ms longer per page, three such pages in some steps of the first 100 tokens).
  await model.generate([prompt], { maxNewTokens: newTokens, minNewTokens: newTokens });
  // The machine's bandwidth moves with other tenants' load (here between ~45 and ~95 GB/s), so each
  // run is bracketed by its own probes and compared with the floor of that moment: the higher of the
  // two probes, the stricter floor. The median of the per-run ratios is the figure.
  // One probe buffer for the whole run: allocating and freeing a GiB per probe stalled the decode
  // steps measured after it in this project's VM (its balloon reports freed pages to the host, see
  // native/src/probes.h): 1.4-2.6 ms more per token on average, against 0-0.9 with the buffer kept.
  const probeBuffer = native().allocate(1 << 30);
  const probe = () => native().probeReadBandwidth(1 << 30, threads, 3, probeBuffer);
  const runsMeasured: { msPerToken: number; medianStepMs: number; probesGBs: [number, number]; bandwidthGBs: number; floorMs: number; ratio: number; medianStepRatio: number }[] = [];
  let before = probe();
  for (let r = 0; r < runs; r++) {
    // Token arrival times, streamed: the mean over the run (what a user waits) and the median step
    // (the typical step, robust to the other tenants' bursts that stall a few steps of a run).
    const arrivals: number[] = [];
    for await (const _ of model.stream(prompt, { maxNewTokens: newTokens, minNewTokens: newTokens })) arrivals.push(performance.now());
    const after = probe();
    // Decode time per token: the first token (prefill of the prompt) is excluded.
    const msPerToken = (arrivals.at(-1)! - arrivals[0]!) / (arrivals.length - 1);
    const medianStepMs = median(arrivals.slice(1).map((t, i) => t - arrivals[i]!));
    const bandwidthGBs = Math.max(before, after);
    const floorMs = (stepBytes / (bandwidthGBs * 1e9)) * 1000;
    runsMeasured.push({ msPerToken, medianStepMs, probesGBs: [before, after], bandwidthGBs, floorMs, ratio: msPerToken / floorMs, medianStepRatio: medianStepMs / floorMs });
    before = after;
  }
  native().release(probeBuffer);
  const msPerToken = median(runsMeasured.map((r) => r.msPerToken));
  const ratio = median(runsMeasured.map((r) => r.ratio));
  const stepRatio = median(runsMeasured.map((r) => r.medianStepRatio));
  const hugeBytes = filePmdMappedBytes();
  log(`model: ${dir} (${info.numLayers} layers, hidden ${info.hiddenSize}, vocab ${info.vocabSize}), ${info.storedDtypes.join("/")} as ${info.dtype}, ${info.threads} threads, ${info.kernels} kernels${o["row-major"] ? ", every matrix row-major" : ""}, KV cache ${info.kvDtype}`);
  log(`prompt: ${promptTokens} tokens`);
  log(`bytes read per decode step: ${formatBytes(stepBytes)} (weights ${formatBytes(weightBytes)}, KV cache ${formatBytes(kvBytes)} at ${meanKvTokens} tokens)`);
  if (hugeBytes !== undefined) log(`checkpoint pages mapped 2 MiB at a time: ${formatBytes(hugeBytes)}`);
  log(`greedy decode, batch 1, ${newTokens} tokens, ${runs} runs, each between two bandwidth probes:`);
  for (const r of runsMeasured) {
    log(
      `  ${r.msPerToken.toFixed(2)} ms/token at ${r.bandwidthGBs.toFixed(1)} GB/s (probes ${r.probesGBs.map((p) => p.toFixed(1)).join(" / ")}; floor ${r.floorMs.toFixed(2)} ms) = ${r.ratio.toFixed(3)} x floor;` +
        ` median step ${r.medianStepMs.toFixed(2)} ms = ${r.medianStepRatio.toFixed(3)} x`,
    );
  }
  log(`median ${msPerToken.toFixed(2)} ms/token; median ratio ${ratio.toFixed(3)} x the bandwidth floor (median step: ${stepRatio.toFixed(3)} x)`);
  if (jsonFile) {
    writeFileSync(jsonFile, JSON.stringify({ dir, info, stepBytes, weightBytes, kvBytes, hugePageBytes: hugeBytes, msPerToken, ratio, medianStepRatio: stepRatio, runs: runsMeasured }, null, 2) + "\n");
  }
} finally {
  await model.dispose();
}
