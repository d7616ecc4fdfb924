/**
 * `npm run bench:int8 [-- kernels | model | quality]`: int8 against bf16.
 *
 *   kernels (default)  this file: the linear layers on the bloom-560m shapes, in the same run.
 *   model              bench/int8-model.ts: a bloom-560m-shaped model end to end (ms/token, peak RSS).
 *   quality            bench/int8-quality.ts: logits, greedy tokens and perplexity on the fixtures.
 *
 * For each layer shape (qkv, dense, h_to_4h+gelu, 4h_to_h, lm_head) and batch size, times bf16
 * `linear` and `linearInt8` for every requested group size and activation mode, interleaved
 * (bf16, int8 variants, bf16, ...) and repeated, reporting medians, so noise from other processes
 * hits every variant alike. Weights are random (bf16 uniform, scale 1/sqrt(in)); the int8 copies
 * are quantized from them with the addon's own quantizer. Layers smaller than 256 MiB are cycled
 * through copies so each call streams from DRAM as a decode step does.
 *
 * Then sums one decode step of a bloom-560m-shaped model (24 layers x 4 linears + the LM head,
 * matmuls only) per variant and batch: the ratio int8 / bf16 is what the model-level target is about.
 *
 * Variants are activation mode : group size. exact = fp32 activations, weights dequantized in registers;
 * grouped = the int8 scheme (16-bit activations per group, vpmaddwd); mixed = int8-mixed (LLM.int8:
 * 8-bit per-token activations, vpmaddubsw, fp32 outliers), normally with one scale per row.
 *
 * Options: --threads N, --variants exact:128,grouped:64,grouped:128,mixed:row  --batches 1,8,32,128
 * --layers qkv,lm_head  --reps N  --json FILE  --threshold T (mixed; default 6).
 */
import { writeFileSync } from "node:fs";
import { ActivationMode, DTypeCode, Epilogue, native, type NativeRegion } from "../src/backend/native.js";
import { runModel } from "./int8-model.js";
import { runQuality } from "./int8-quality.js";
import { median, nowMs, benchArgs, outputOption } from "./stats.js";

interface Shape {
  layer: string;
  out: number;
  in: number;
  epilogue: number;
  bias: boolean;
}

const hidden = 1024, vocab = 250880, numLayers = 24;
const shapes: Shape[] = [
  { layer: "qkv", out: 3 * hidden, in: hidden, epilogue: Epilogue.none, bias: true },
  { layer: "dense", out: hidden, in: hidden, epilogue: Epilogue.none, bias: true },
  { layer: "h_to_4h+gelu", out: 4 * hidden, in: hidden, epilogue: Epilogue.gelu, bias: true },
  { layer: "4h_to_h", out: hidden, in: 4 * hidden, epilogue: Epilogue.none, bias: true },
  { layer: "lm_head", out: vocab, in: hidden, epilogue: Epilogue.none, bias: false },
];

/** Activations like a layer-norm output: mostly N(0,1)-ish, with a few large features (outliers). */
function activations(n: number, cols: number, seed: number): Float32Array {
  const a = new Float32Array(n);
  let s = seed >>> 0 || 1;
  for (let i = 0; i < n; i++) {
    s ^= s << 13;
    s ^= s >>> 17;
    s ^= s << 5;
    a[i] = ((s >>> 0) / 4294967296) * 4 - 2;
    if (i % cols === 7 || i % cols === 300) a[i]! *= 8; // two outlier features reaching ~16
  }
  return a;
}

interface Variant {
  name: string;
  group: number | "row";
  mode: keyof typeof ActivationMode;
}

interface Row {
  layer: string;
  batch: number;
  variant: string;
  ms: number;
  gbPerS: number;
  ratioToBf16: number;
}

function pad(s: string | number, n: number, left = true): string {
  const t = String(s);
  return left ? t.padStart(n) : t.padEnd(n);
}

function runKernels(argv: string[]): void {
  const { values } = benchArgs("npm run bench:int8 -- [kernels]", "int8", {
    args: argv,
    options: {
      threads: { type: "string" },
      variants: { type: "string", default: "exact:128,grouped:64,grouped:128,mixed:row" },
      batches: { type: "string", default: "1,8,32,128" },
      layers: { type: "string" },
      reps: { type: "string", default: "7" },
      threshold: { type: "string", default: "6" },
      json: { type: "string" },
    },
  });
  outputOption("--json", values.json);
  const addon = native();
  const cpu = addon.cpuInfo();
  const threads = values.threads ? Number(values.threads) : cpu.physicalCores;
  addon.setThreads(threads);
  addon.setKernelVariant("auto");
  const list = (v: string) => v.split(",").map((s) => s.trim()).filter(Boolean);
  const variants: Variant[] = list(values.variants!).map((v) => {
    const [mode, g] = v.split(":") as [keyof typeof ActivationMode, string | undefined];
    if (!(mode in ActivationMode) || !g) throw new Error(`--variants: expected mode:group (exact|grouped|mixed : N|row), got ${v}`);
    const group = g === "row" ? "row" : Number(g);
    return { name: `${mode} ${group === "row" ? "per-row" : `g${group}`}`, group, mode };
  });
  const groups = [...new Set(variants.map((v) => v.group))];
  const batches = list(values.batches!).map(Number);
  const reps = Number(values.reps);
  const threshold = Number(values.threshold);
  const layers = values.layers ? shapes.filter((s) => list(values.layers!).some((l) => s.layer.startsWith(l))) : shapes;

  console.log(`machine: ${cpu.model} | ${cpu.physicalCores} cores | threads ${threads} | kernels ${addon.getKernelVariant()}`);
  const bandwidth = addon.probeReadBandwidth(2 ** 30, threads, 5);
  console.log(`probed read bandwidth: ${bandwidth.toFixed(1)} GB/s`);
  console.log(`medians of ${reps} interleaved repetitions; GB/s = weight bytes (int8: q + fp16 scales) / time\n`);
  const header = `${pad("layer", 13, false)} ${pad("batch", 5)} ${pad("variant", 24, false)} ${pad("ms", 9)} ${pad("GB/s", 6)} ${pad("x bf16", 7)}`;
  console.log(header);
  console.log("-".repeat(header.length));

  const rows: Row[] = [];
  const minWorkingSet = 256 * 2 ** 20;
  for (const shape of layers) {
    const n = shape.out * shape.in;
    const bf16Bytes = n * 2;
    const copies = Math.max(1, Math.ceil(minWorkingSet / bf16Bytes));
    const bf16 = addon.allocate(bf16Bytes * copies);
    addon.fillRandom(bf16, 0, DTypeCode.bf16, n * copies, 7, 1 / Math.sqrt(shape.in));
    // One int8 matrix (q + scales) per copy and group size, quantized from the bf16 copies.
    const quantized = new Map<number | "row", { q: NativeRegion; s: NativeRegion; group: number; bytes: number; copies: number }>();
    for (const g of groups) {
      const group = g === "row" ? shape.in : g;
      const numGroups = Math.ceil(shape.in / group);
      const sBytes = shape.out * numGroups * 2;
      const qc = Math.max(1, Math.ceil(minWorkingSet / (n + sBytes)));
      const q = addon.allocate(n * qc);
      const s = addon.allocate(sBytes * qc);
      for (let c = 0; c < qc; c++) addon.quantizeWeights(q, c * n, s, c * sBytes, bf16, (c % copies) * bf16Bytes, DTypeCode.bf16, shape.out, shape.in, group);
      quantized.set(g, { q, s, group, bytes: n + sBytes, copies: qc });
    }
    const bias = shape.bias ? activations(shape.out, shape.out, 3) : null;
    for (const batch of batches) {
      const x = activations(batch * shape.in, shape.in, 11 + batch);
      const y = new Float32Array(batch * shape.out);
      const calls: { name: string; bytes: number; call: () => void }[] = [];
      let bc = 0;
      calls.push({
        name: "bf16",
        bytes: bf16Bytes,
        call: () => {
          addon.linear(y, x, batch, bf16, bc * bf16Bytes, DTypeCode.bf16, shape.out, shape.in, bias, shape.epilogue, null);
          bc = (bc + 1) % copies;
        },
      });
      for (const v of variants) {
        const m = quantized.get(v.group)!;
        const sBytes = m.bytes - n;
        let c = 0;
        calls.push({
          name: v.name,
          bytes: m.bytes,
          call: () => {
            addon.linearInt8(y, x, batch, m.q, c * n, m.s, c * sBytes, shape.out, shape.in, m.group, bias, shape.epilogue, null, ActivationMode[v.mode], threshold);
            c = (c + 1) % m.copies;
          },
        });
      }
      // Calibrate a burst length from bf16 (~60 ms per burst), warm every variant up once.
      const t0 = nowMs();
      calls[0]!.call();
      const first = Math.max(nowMs() - t0, 1e-3);
      const burst = Math.max(1, Math.min(200, Math.round(60 / first)));
      for (const c of calls) for (let i = 0; i < Math.min(burst, 3); i++) c.call();
      const samples = calls.map(() => [] as number[]);
      for (let r = 0; r < reps; r++) {
        calls.forEach((c, i) => {
          const s = nowMs();
          for (let k = 0; k < burst; k++) c.call();
          samples[i]!.push((nowMs() - s) / burst);
        });
      }
      const bf16Ms = median(samples[0]!);
      calls.forEach((c, i) => {
        const ms = median(samples[i]!);
        const row: Row = { layer: shape.layer, batch, variant: c.name, ms, gbPerS: c.bytes / ms / 1e6, ratioToBf16: ms / bf16Ms };
        rows.push(row);
        console.log(
          `${pad(shape.layer, 13, false)} ${pad(batch, 5)} ${pad(c.name, 24, false)} ${pad(ms.toFixed(3), 9)} ${pad(row.gbPerS.toFixed(1), 6)} ${pad(row.ratioToBf16.toFixed(2), 7)}`,
        );
      });
    }
    addon.release(bf16);
    for (const m of quantized.values()) {
      addon.release(m.q);
      addon.release(m.s);
    }
  }

  // One decode step of the bloom-560m shape: numLayers x the four block linears + the LM head.
  if (layers.length === shapes.length) {
    console.log(`\nbloom-560m-shaped step (matmuls only: ${numLayers} x [qkv, dense, h_to_4h, 4h_to_h] + lm_head), ms and ratio to bf16:\n`);
    const names = ["bf16", ...variants.map((v) => v.name)];
    console.log(`${pad("variant", 24, false)} ${batches.map((b) => pad(`batch ${b}`, 16)).join(" ")}`);
    for (const name of names) {
      const cells = batches.map((batch) => {
        const ms = (l: string, v: string) => rows.find((r) => r.layer === l && r.batch === batch && r.variant === v)!.ms;
        const total = (v: string) => numLayers * (ms("qkv", v) + ms("dense", v) + ms("h_to_4h+gelu", v) + ms("4h_to_h", v)) + ms("lm_head", v);
        const t = total(name);
        return pad(`${t.toFixed(2)} (${(t / total("bf16")).toFixed(2)})`, 16);
      });
      console.log(`${pad(name, 24, false)} ${cells.join(" ")}`);
    }
  }
  if (values.json) {
    writeFileSync(values.json, JSON.stringify({ machine: cpu, threads, bandwidthGBs: bandwidth, rows }, null, 2));
    console.log(`wrote ${values.json}`);
  }
}

const [command = "kernels", ...rest] = process.argv.slice(2);
if (command === "quality") await runQuality(rest);
else if (command === "model") await runModel(rest);
else if (command === "kernels") runKernels(rest);
else if (command.startsWith("-")) runKernels(process.argv.slice(2));
else {
  process.stderr.write(`int8: unknown part "${command}" (expected kernels, model or quality; --help lists each part's options)\n`);
  process.exit(2);
}
