/**
 * `npm run bench:kernels`: how close the native kernels come to this machine's limits.
 *
 * 1. Probes the machine: streaming read bandwidth (GEMV's limit) and 256-bit FMA peak (GEMM's limit).
 * 2. Times `linear` on the bloom-560m and bloom-7b1 layer shapes for each weight dtype and batch,
 *    printing ms, GB/s (weight bytes read / time), GFLOP/s (2*rows*out*in / time), and the ratio to
 *    the relevant limit: the roofline time max(bytes / bandwidth, flops / peak) over the measured time.
 * 3. Times attention over a ~100-token KV cache and layer_norm at batch 1 and 128, to show they are
 *    small next to the matmuls.
 *
 * Weights are random (not zeros), paged in before timing, and every layer whose weights fit in
 * 8x the last-level cache is cycled through several copies so each call reads DRAM, as a decode
 * step does.
 *
 * Options: --threads N (default: physical cores), --quick (fewer shapes and iterations),
 * --json FILE (all rows as JSON), --models a,b  --dtypes f32,f16,bf16  --batches 1,8  --layers qkv,lm_head
 * (filters), --no-attention.
 */
import { readFileSync, writeFileSync } from "node:fs";
import { cpus } from "node:os";
import { parseArgs } from "node:util";
import { DTypeCode, Epilogue, native, type NativeRegion, type StorageDType } from "../src/backend/native.js";

interface LayerShape {
  model: string;
  layer: string;
  out: number;
  in: number;
  epilogue: number;
  bias: boolean;
}

interface Row {
  model: string;
  layer: string;
  dtype: StorageDType;
  batch: number;
  out: number;
  in: number;
  copies: number;
  ms: number;
  gbPerS: number;
  gflopPerS: number;
  bandwidthRatio: number;
  fmaRatio: number;
  rooflineRatio: number;
  bound: "memory" | "compute";
  /** Fraction of the machine's CPU other processes used while this row was timed. */
  otherLoad: number;
}

const models: Record<string, { hidden: number; heads: number }> = {
  "bloom-560m": { hidden: 1024, heads: 16 },
  "bloom-7b1": { hidden: 4096, heads: 32 },
};
const vocab = 250880;

function layersOf(model: string): LayerShape[] {
  const h = models[model]!.hidden;
  const base = { model, bias: true, epilogue: Epilogue.none };
  return [
    { ...base, layer: "qkv", out: 3 * h, in: h },
    { ...base, layer: "dense", out: h, in: h },
    { ...base, layer: "h_to_4h+gelu", out: 4 * h, in: h, epilogue: Epilogue.gelu },
    { ...base, layer: "4h_to_h", out: h, in: 4 * h },
    { ...base, layer: "lm_head", out: vocab, in: h, bias: false },
  ];
}

const bytesPerElement: Record<StorageDType, number> = { f32: 4, f16: 2, bf16: 2, i8: 1 };

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
}

function nowMs(): number {
  return Number(process.hrtime.bigint()) / 1e6;
}

function randomArray(n: number, seed: number): Float32Array {
  const a = new Float32Array(n);
  let s = seed >>> 0 || 1;
  for (let i = 0; i < n; i++) {
    s ^= s << 13;
    s ^= s >>> 17;
    s ^= s << 5;
    a[i] = ((s >>> 0) / 4294967296) * 2 - 1;
  }
  return a;
}

/**
 * Measures how much CPU other processes took while `f` ran, as a fraction of the whole machine
 * (Linux /proc/stat; 0 elsewhere). The probes and kernels want every core: a busy neighbour makes
 * both the limits and the kernels look slower, so rows measured under load are flagged.
 */
function busySeconds(): number | null {
  try {
    const line = readFileSync("/proc/stat", "utf8").split("\n")[0]!;
    const f = line.trim().split(/\s+/).slice(1).map(Number);
    // user nice system idle iowait irq softirq steal: busy = all but idle and iowait
    return (f[0]! + f[1]! + f[2]! + f[5]! + f[6]! + f[7]!) / 100;
  } catch {
    return null;
  }
}

function withLoad<T>(f: () => T): { value: T; others: number } {
  const b0 = busySeconds(), c0 = process.cpuUsage(), t0 = nowMs();
  const value = f();
  const b1 = busySeconds(), c1 = process.cpuUsage(c0), wall = (nowMs() - t0) / 1000;
  if (b0 === null || b1 === null || wall <= 0) return { value, others: 0 };
  const mine = (c1.user + c1.system) / 1e6;
  return { value, others: Math.max(0, (b1 - b0 - mine) / (cpus().length * wall)) };
}

function pad(s: string | number, n: number, left = true): string {
  const t = String(s);
  return left ? t.padStart(n) : t.padEnd(n);
}

function main(): void {
  const { values } = parseArgs({
    options: {
      threads: { type: "string" },
      quick: { type: "boolean", default: false },
      json: { type: "string" },
      models: { type: "string" },
      dtypes: { type: "string" },
      batches: { type: "string" },
      layers: { type: "string" },
      "no-attention": { type: "boolean", default: false },
    },
  });
  const addon = native();
  const cpu = addon.cpuInfo();
  const threads = values.threads ? Number(values.threads) : cpu.physicalCores;
  if (!Number.isInteger(threads) || threads < 1) throw new Error(`--threads: expected a positive integer, got ${values.threads}`);
  addon.setThreads(threads);
  addon.setKernelVariant("auto");
  const quick = values.quick ?? false;
  const list = (v: string | undefined, dflt: string[]) => (v ? v.split(",").map((s) => s.trim()) : dflt);
  const modelNames = list(values.models, quick ? ["bloom-560m"] : Object.keys(models));
  const dtypes = list(values.dtypes, quick ? ["bf16"] : ["bf16", "f16", "f32"]) as StorageDType[];
  const batches = list(values.batches, quick ? ["1", "64"] : ["1", "8", "32", "64", "128"]).map(Number);
  const layerFilter = values.layers ? list(values.layers, []) : null;

  console.log(`machine: ${cpu.model} | ${cpu.physicalCores} physical / ${cpu.logicalCores} logical cores | avx2 ${cpu.avx2} fma ${cpu.fma} f16c ${cpu.f16c}`);
  console.log(`threads: ${threads} | kernels: ${addon.getKernelVariant()}`);
  const probeBytes = quick ? 512 * 2 ** 20 : 2 ** 30;
  const probe = withLoad(() => ({
    bandwidth: addon.probeReadBandwidth(probeBytes, threads, quick ? 3 : 7),
    fmaPeak: addon.probeFmaPeak(threads, quick ? 3 : 7),
  }));
  const { bandwidth, fmaPeak } = probe.value;
  const runLoad = { busy0: busySeconds(), cpu0: process.cpuUsage(), t0: nowMs() };
  if (probe.others > 0.05) console.log(`! other processes used ${(probe.others * 100).toFixed(0)}% of the CPU while probing: the limits below are low`);
  console.log(`probed read bandwidth: ${bandwidth.toFixed(1)} GB/s (best of streaming AVX2 reads over ${probeBytes / 2 ** 20} MiB)`);
  console.log(`probed FMA peak:       ${fmaPeak.toFixed(1)} GFLOP/s (256-bit FMA chains in registers)`);
  // Layers smaller than this are cycled through copies, so each call streams from DRAM.
  const minWorkingSet = 256 * 2 ** 20;
  const targetMsPerConfig = quick ? 150 : 400;

  const rows: Row[] = [];
  const header =
    `${pad("model", 11, false)} ${pad("layer", 13, false)} ${pad("dtype", 5, false)} ${pad("batch", 5)} ${pad("out x in", 13)} ` +
    `${pad("copies", 6)} ${pad("ms", 9)} ${pad("GB/s", 7)} ${pad("%BW", 5)} ${pad("GFLOP/s", 8)} ${pad("%FMA", 5)} ${pad("%roof", 6)}`;
  console.log(`\nlinear: y = epilogue(x @ W^T + bias); %BW = GB/s / probed bandwidth, %FMA = GFLOP/s / probed peak,`);
  console.log(`%roof = max(bytes/bandwidth, flops/peak) / time (the relevant limit)\n`);
  console.log(header);
  console.log("-".repeat(header.length));

  for (const model of modelNames) {
    if (!models[model]) throw new Error(`--models: unknown model ${model}; expected one of ${Object.keys(models).join(", ")}`);
    let layers = layersOf(model);
    if (layerFilter) layers = layers.filter((l) => layerFilter.some((f) => l.layer.startsWith(f)));
    if (quick && !layerFilter) layers = layers.filter((l) => l.layer === "qkv" || l.layer === "4h_to_h");
    for (const shape of layers) {
      for (const dtype of dtypes) {
        if (!(dtype in DTypeCode) || dtype === "i8") throw new Error(`--dtypes: expected f32, f16 or bf16, got ${dtype}`);
        const weightBytes = shape.out * shape.in * bytesPerElement[dtype];
        const copies = Math.max(1, Math.ceil(minWorkingSet / weightBytes));
        const region: NativeRegion = addon.allocate(weightBytes * copies);
        // Fills (and so pages in) every copy; scale 1/sqrt(in) keeps outputs O(1) like trained weights.
        addon.fillRandom(region, 0, DTypeCode[dtype], shape.out * shape.in * copies, 7, 1 / Math.sqrt(shape.in));
        const bias = shape.bias ? randomArray(shape.out, 3) : null;
        for (const batch of batches) {
          const x = randomArray(batch * shape.in, 11 + batch);
          const y = new Float32Array(batch * shape.out);
          let copy = 0;
          const call = () => {
            addon.linear(y, x, batch, region, copy * weightBytes, DTypeCode[dtype], shape.out, shape.in, bias, shape.epilogue, null);
            copy = (copy + 1) % copies;
          };
          // Warm-up: one pass over all copies (at most ~0.3 s) so pages, caches and the pool are settled.
          const t0 = nowMs();
          call();
          const first = nowMs() - t0;
          const warm = Math.min(copies, Math.max(1, Math.floor(300 / Math.max(first, 1e-3))));
          for (let i = 1; i < warm; i++) call();
          const iterations = Math.max(3, Math.min(quick ? 20 : 200, Math.round(targetMsPerConfig / Math.max(first, 1e-3))));
          const { value: times, others } = withLoad(() => {
            const ts: number[] = [];
            for (let i = 0; i < iterations; i++) {
              const s = nowMs();
              call();
              ts.push(nowMs() - s);
            }
            return ts;
          });
          const ms = median(times);
          const flops = 2 * batch * shape.out * shape.in;
          const gbPerS = weightBytes / ms / 1e6;
          const gflopPerS = flops / ms / 1e6;
          const memoryMs = weightBytes / bandwidth / 1e6;
          const computeMs = flops / fmaPeak / 1e6;
          const row: Row = {
            model,
            layer: shape.layer,
            dtype,
            batch,
            out: shape.out,
            in: shape.in,
            copies,
            ms,
            gbPerS,
            gflopPerS,
            bandwidthRatio: gbPerS / bandwidth,
            fmaRatio: gflopPerS / fmaPeak,
            rooflineRatio: Math.max(memoryMs, computeMs) / ms,
            bound: memoryMs >= computeMs ? "memory" : "compute",
            otherLoad: others,
          };
          rows.push(row);
          const mark = (r: number, on: boolean) => pad(`${(r * 100).toFixed(0)}${on ? "*" : " "}`, 5);
          console.log(
            `${pad(model, 11, false)} ${pad(shape.layer, 13, false)} ${pad(dtype, 5, false)} ${pad(batch, 5)} ` +
              `${pad(`${shape.out}x${shape.in}`, 13)} ${pad(copies, 6)} ${pad(ms.toFixed(3), 9)} ${pad(gbPerS.toFixed(1), 7)} ` +
              `${mark(row.bandwidthRatio, row.bound === "memory")} ${pad(gflopPerS.toFixed(1), 8)} ${mark(row.fmaRatio, row.bound === "compute")} ` +
              `${pad((row.rooflineRatio * 100).toFixed(0), 6)}${others > 0.05 ? `  ! other processes used ${(others * 100).toFixed(0)}% of the CPU` : ""}`,
          );
        }
        addon.release(region);
      }
    }
  }
  console.log(`\n* marks the limit that binds at that batch (roofline).`);
  const busy1 = busySeconds();
  if (runLoad.busy0 !== null && busy1 !== null) {
    const c = process.cpuUsage(runLoad.cpu0);
    const wall = (nowMs() - runLoad.t0) / 1000;
    const others = Math.max(0, (busy1 - runLoad.busy0 - (c.user + c.system) / 1e6) / (cpus().length * wall));
    console.log(`other processes used ${(others * 100).toFixed(1)}% of the machine's CPU during the linear runs${others > 0.05 ? " (results are pessimistic)" : ""}`);
  }

  const others = values["no-attention"] ? [] : benchOthers(quick);

  if (values.json) {
    writeFileSync(
      values.json,
      JSON.stringify({ machine: cpu, threads, bandwidthGBs: bandwidth, fmaPeakGflops: fmaPeak, linear: rows, attentionAndNorm: others }, null, 2),
    );
    console.log(`wrote ${values.json}`);
  }
}

interface OtherRow {
  model: string;
  op: string;
  batch: number;
  ms: number;
}

/** attention over a ~100-token paged KV cache and layer_norm, at batch 1 and 128 (one decode step each). */
function benchOthers(quick: boolean): OtherRow[] {
  const addon = native();
  const out: OtherRow[] = [];
  const pastLen = 100;
  const blockSize = 16;
  console.log(`\nattention (one decode step: 1 new token per sequence over ${pastLen} cached) and layer_norm:\n`);
  console.log(`${pad("model", 11, false)} ${pad("op", 10, false)} ${pad("batch", 5)} ${pad("ms", 9)}`);
  for (const model of quick ? ["bloom-560m"] : Object.keys(models)) {
    const { hidden, heads } = models[model]!;
    const headDim = hidden / heads;
    for (const batch of [1, 128]) {
      const blocksPerSeq = Math.ceil((pastLen + 1) / blockSize);
      const numBlocks = blocksPerSeq * batch;
      const kCache = randomArray(numBlocks * heads * blockSize * headDim, 5);
      const vCache = randomArray(numBlocks * heads * blockSize * headDim, 6);
      const qkv = randomArray(batch * 3 * hidden, 7);
      const o = new Float32Array(batch * hidden);
      const seqs = new Int32Array(batch * 4);
      const table = new Int32Array(numBlocks);
      for (let i = 0; i < numBlocks; i++) table[i] = i;
      for (let s = 0; s < batch; s++) seqs.set([s, 1, pastLen, s * blocksPerSeq], s * 4);
      const slopes = new Float32Array(heads).map((_, h) => 2 ** (-8 * (h + 1) / heads));
      const time = (f: () => void) => {
        f();
        const ts: number[] = [];
        for (let i = 0; i < (quick ? 10 : 30); i++) {
          const s = nowMs();
          f();
          ts.push(nowMs() - s);
        }
        return median(ts);
      };
      const attMs = time(() => addon.attention(o, qkv, batch, heads, headDim, kCache, vCache, blockSize, seqs, table, slopes));
      const xs = randomArray(batch * hidden, 9);
      const ys = new Float32Array(batch * hidden);
      const gamma = randomArray(hidden, 10);
      const beta = randomArray(hidden, 12);
      const lnMs = time(() => addon.layerNorm(ys, xs, batch, hidden, gamma, beta, 1e-5));
      for (const [op, ms] of [
        ["attention", attMs],
        ["layer_norm", lnMs],
      ] as const) {
        out.push({ model, op, batch, ms });
        console.log(`${pad(model, 11, false)} ${pad(op, 10, false)} ${pad(batch, 5)} ${pad(ms.toFixed(3), 9)}`);
      }
    }
  }
  return out;
}

main();
