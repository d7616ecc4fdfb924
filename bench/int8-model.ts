/**
 * `npm run bench:int8 -- model`: a bloom-560m-shaped model end to end, bf16 against int8 and int8-mixed.
 *
 * Writes (once) a random bf16 checkpoint with bloom-560m's shapes (24 layers, hidden 1024, 16 heads,
 * vocab 250880, tied head: 1.1 GB) and its `blossom quantize --dtype int8` copy, then:
 *   speed   all variants loaded in one process; for each batch size, decode steps timed per variant,
 *           interleaved and repeated (medians), so other load on the machine hits every variant alike.
 *           ms/token = step time / batch (the guide's throughput figure).
 *   memory  each variant in its own process: resident bytes before loading, after loading, and the
 *           peak while decoding (sampled every 10 ms), with the engine's own weight-bytes count.
 *
 * Options: --dir DIR (default: $TMPDIR/blossom-bloom-560m-random), --batches 1,8,32,128,
 * --reps 3, --threads N, --variants bf16,int8,int8-mixed,int8-prequantized, --no-memory, --no-speed,
 * --json FILE.
 */
import { fork } from "node:child_process";
import { existsSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { native } from "../src/backend/native.js";
import { loadEngine, type EngineOptions, type LoadedEngine } from "../src/engine/load.js";
import { quantizeCheckpoint } from "../src/quant/quantize.js";
import { createRandomCheckpoint } from "../src/checkpoint/create-random.js";
import { median, benchArgs, outputOption } from "./stats.js";

interface Variant {
  name: string;
  dir: string;
  options: EngineOptions;
}

function variantsFor(dir: string, names: string[]): Variant[] {
  const all: Variant[] = [
    { name: "bf16", dir, options: { dtype: "auto" } },
    { name: "int8", dir, options: { dtype: "int8" } },
    { name: "int8-mixed", dir, options: { dtype: "int8-mixed" } },
    { name: "int8-prequantized", dir: `${dir}-int8`, options: { dtype: "auto" } },
  ];
  return names.map((n) => {
    const v = all.find((a) => a.name === n);
    if (!v) throw new Error(`--variants: unknown ${n}; expected ${all.map((a) => a.name).join(", ")}`);
    return v;
  });
}

const promptTokens = 4;
function decodeSteps(batch: number): number {
  return batch <= 1 ? 24 : batch <= 8 ? 12 : batch <= 32 ? 6 : 3;
}

/** ms per decode step of `batch` sequences (after a prompt of promptTokens each). */
function timeDecode(loaded: LoadedEngine, batch: number, steps: number, seed: number): number {
  const { engine } = loaded;
  const sequences = Array.from({ length: batch }, () => engine.createSequence());
  const vocab = loaded.model.config.vocabSize;
  let token = (seed * 7919) % Math.min(1000, vocab);
  const next = () => (token = (token * 48271 + 11) % vocab);
  try {
    engine.step(sequences.map((sequence) => ({ sequence, tokens: Array.from({ length: promptTokens }, next), logits: "last" as const })));
    const started = performance.now();
    for (let s = 0; s < steps; s++) engine.step(sequences.map((sequence) => ({ sequence, tokens: [next()], logits: "last" as const })));
    return (performance.now() - started) / steps;
  } finally {
    for (const s of sequences) engine.freeSequence(s);
  }
}

interface MemoryReport {
  variant: string;
  weightBytes: number;
  rssBeforeLoad: number;
  rssAfterLoad: number;
  peakRss: number;
  loadSeconds: number;
}

/** Child: load one variant, decode a little at batch 1, report resident memory. */
async function memoryChild(variant: Variant, threads: number | undefined): Promise<MemoryReport> {
  const addon = native();
  const rssBeforeLoad = addon.residentBytes();
  let peak = rssBeforeLoad;
  const sampler = setInterval(() => (peak = Math.max(peak, addon.residentBytes())), 10);
  const loaded = loadEngine(variant.dir, { ...variant.options, kvCacheTokens: 4096, ...(threads ? { threads } : {}) });
  const rssAfterLoad = addon.residentBytes();
  // Decode in slices so the sampler runs between steps.
  for (let i = 0; i < 4; i++) {
    timeDecode(loaded, 1, 4, i);
    await new Promise((r) => setTimeout(r, 15));
  }
  clearInterval(sampler);
  peak = Math.max(peak, addon.residentBytes());
  const report = { variant: variant.name, weightBytes: loaded.weights.weightBytes, rssBeforeLoad, rssAfterLoad, peakRss: peak, loadSeconds: loaded.loadSeconds };
  loaded.dispose();
  return report;
}

function runChild(variant: Variant, threads: number | undefined): Promise<MemoryReport> {
  return new Promise((resolvePromise, reject) => {
    const child = fork(fileURLToPath(import.meta.url), ["--child", JSON.stringify({ variant, threads })], { stdio: "inherit" });
    child.once("message", (m) => resolvePromise(m as MemoryReport));
    child.once("exit", (code) => (code === 0 ? undefined : reject(new Error(`memory child for ${variant.name} exited with ${code}`))));
  });
}

const mib = (b: number) => `${(b / 2 ** 20).toFixed(0)} MiB`;

export async function runModel(argv: string[]): Promise<void> {
  const { values } = benchArgs("npm run bench:int8 -- model", "int8-model", {
    args: argv,
    options: {
      dir: { type: "string", default: join(tmpdir(), "blossom-bloom-560m-random") },
      batches: { type: "string", default: "1,8,32,128" },
      reps: { type: "string", default: "3" },
      threads: { type: "string" },
      variants: { type: "string", default: "bf16,int8,int8-mixed,int8-prequantized" },
      "no-memory": { type: "boolean", default: false },
      "no-speed": { type: "boolean", default: false },
      json: { type: "string" },
    },
  });
  outputOption("--json", values.json);
  const dir = values.dir!;
  const threads = values.threads ? Number(values.threads) : undefined;
  if (!existsSync(join(dir, "model.safetensors"))) {
    console.log(`writing a random bloom-560m-shaped bf16 checkpoint to ${dir} ...`);
    await createRandomCheckpoint({ preset: "bloom-560m", dtype: "bf16", out: dir });
  }
  const variants = variantsFor(dir, values.variants!.split(","));
  if (variants.some((v) => v.name === "int8-prequantized") && !existsSync(join(`${dir}-int8`, "config.json"))) {
    console.log(`writing its pre-quantized int8 copy to ${dir}-int8 ...`);
    await quantizeCheckpoint(dir, `${dir}-int8`, { scheme: "int8", threads });
  }
  const addon = native();
  const cpu = addon.cpuInfo();
  console.log(`machine: ${cpu.model}, ${cpu.physicalCores} cores; threads ${threads ?? cpu.physicalCores}`);
  const report: { memory: MemoryReport[]; speed: { batch: number; variant: string; msPerStep: number; msPerToken: number; ratio: number }[] } = { memory: [], speed: [] };

  if (!values["no-memory"]) {
    console.log(`\nmemory (each variant in its own process; peak while decoding at batch 1):\n`);
    console.log(`${"variant".padEnd(18)} ${"weights".padStart(9)} ${"x bf16".padStart(7)} ${"RSS loaded".padStart(11)} ${"peak RSS".padStart(9)} ${"peak-start".padStart(11)} ${"x bf16".padStart(7)} ${"load s".padStart(7)}`);
    for (const v of variants) report.memory.push(await runChild(v, threads));
    const base = report.memory.find((m) => m.variant === "bf16") ?? report.memory[0]!;
    for (const m of report.memory) {
      const grown = m.peakRss - m.rssBeforeLoad, baseGrown = base.peakRss - base.rssBeforeLoad;
      console.log(
        `${m.variant.padEnd(18)} ${mib(m.weightBytes).padStart(9)} ${(m.weightBytes / base.weightBytes).toFixed(3).padStart(7)} ${mib(m.rssAfterLoad).padStart(11)} ${mib(m.peakRss).padStart(9)} ${mib(grown).padStart(11)} ${(grown / baseGrown).toFixed(3).padStart(7)} ${m.loadSeconds.toFixed(2).padStart(7)}`,
      );
    }
  }

  if (!values["no-speed"]) {
    const batches = values.batches!.split(",").map(Number);
    const reps = Number(values.reps);
    const maxBatch = Math.max(...batches);
    const loaded = variants.map((v) => loadEngine(v.dir, { ...v.options, kvCacheTokens: Math.max(4096, maxBatch * 32), ...(threads ? { threads } : {}) }));
    try {
      console.log(`\nspeed (decode steps after a ${promptTokens}-token prompt per sequence; medians of ${reps} interleaved repetitions):\n`);
      console.log(`${"batch".padStart(5)} ${variants.map((v) => `${v.name} ms/token (x bf16)`.padStart(32)).join(" ")}`);
      for (const batch of batches) {
        const steps = decodeSteps(batch);
        const samples = variants.map(() => [] as number[]);
        for (let r = 0; r < reps; r++) loaded.forEach((l, i) => samples[i]!.push(timeDecode(l, batch, steps, r)));
        const ms = samples.map(median);
        const base = ms[variants.findIndex((v) => v.name === "bf16")] ?? ms[0]!;
        variants.forEach((v, i) => report.speed.push({ batch, variant: v.name, msPerStep: ms[i]!, msPerToken: ms[i]! / batch, ratio: ms[i]! / base }));
        console.log(`${String(batch).padStart(5)} ${ms.map((m) => `${(m / batch).toFixed(2)} (${(m / base).toFixed(2)})`.padStart(32)).join(" ")}`);
      }
    } finally {
      for (const l of loaded) l.dispose();
    }
  }
  if (values.json) writeFileSync(values.json, JSON.stringify(report, null, 2));
}

// Memory child: `node dist/bench/int8-model.js --child '{"variant": ..., "threads": ...}'`.
if (process.argv[2] === "--child") {
  const { variant, threads } = JSON.parse(process.argv[3]!) as { variant: Variant; threads?: number };
  memoryChild(variant, threads).then(
    (r) => {
      process.send!(r);
      process.exit(0);
    },
    (err: unknown) => {
      console.error(err);
      process.exit(1);
    },
  );
}
