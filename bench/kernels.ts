/**
 * `npm run bench:kernels`: how close the native kernels come to this machine's limits.
 *
 * 1. Probes the machine: streaming read bandwidth (GEMV's limit) and 256-bit FMA peak (GEMM's limit).
 * 2. Times `linear` on the bloom-560m and bloom-7b1 layer shapes for each weight dtype and batch,
 *    printing ms, GB/s (weight bytes read / time), GFLOP/s (2*rows*out*in / time), and the ratios
 *    to the limits; %roof is the roofline time max(bytes / bandwidth, flops / peak) over the time.
 * 3. Times attention over a ~100-token KV cache at batch 1 and 128 and over 2048 tokens at batch 1
 *    (fp32 caches, and fp16 ones at batch 128 and over 2048), and layer_norm, next to the matmuls
 *    of one decoder layer, to show whether they matter; and prefill attention (512 and 2048 new
 *    tokens) against the FMA peak.
 *
 * Honest inputs: weights are random (not zeros) and paged in before timing, and every layer whose
 * weights would fit in 8x the last-level cache is cycled through several copies (the `copies`
 * column) so that each call reads DRAM, as a decode step does.
 *
 * A shared machine moves both the kernels and the limits: memory bandwidth changes with what
 * other tenants stream, and a process on one of our cores halves a 2-thread kernel. So each row
 * is bracketed by a short bandwidth probe (its %BW uses the larger of the two, never flattering
 * the kernel), and a row timed while other processes took more than 10% of the CPU is re-timed
 * (--attempts) and flagged with `!` if it never ran alone.
 *
 * Matrices the engine stores in column panels (src/backend/cpu.ts defaultLinearPanels: bf16/fp16
 * rows longer than 4096) are timed in that layout, their layer marked "pN" (panels of N inputs);
 * --layout both times them row-major as well, --layout rows only row-major.
 *
 * Options: --threads N (default: physical cores), --quick (fewer shapes and iterations),
 * --json FILE (every row as JSON), filters --models a,b --dtypes f32,f16,bf16 --batches 1,8
 * --layers qkv,lm_head, --no-attention, --attempts N (default 2).
 */
import { readFileSync, writeFileSync } from "node:fs";
import { cpus } from "node:os";
import { DTypeCode, Epilogue, native, type NativeRegion, type StorageDType } from "../src/backend/native.js";
import { parameterError } from "../src/errors.js";
import { defaultLinearPanels, linearPanelWidth } from "../src/backend/cpu.js";
import { median, nowMs, benchArgs, outputOption } from "./stats.js";
import { float32ToFloat16 } from "../src/checkpoint/half-float.js";

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
  /** The read bandwidth probed just before and after this row (the larger). */
  bandwidthGBs: number;
  /** The FMA peak probed just before and after this row (the larger). */
  fmaPeakGflops: number;
  bandwidthRatio: number;
  fmaRatio: number;
  rooflineRatio: number;
  bound: "memory" | "compute";
  /** Fraction of the machine's CPU other processes used while this row was timed. */
  otherLoad: number;
  /** > 0: the weights were laid out in column panels of this many inputs. */
  panelK: number;
}

interface OtherRow {
  model: string;
  op: string;
  batch: number;
  /** attention: cached tokens per sequence, and the cache's format */
  cached?: number;
  kvDtype?: string;
  /** prefill attention: new tokens of the one sequence, causal GFLOP/s and the FMA peak probed around it */
  tokens?: number;
  gflops?: number;
  fmaPeakGflops?: number;
  ms: number;
  /** attention: keys and values read per second, and the read bandwidth probed around it */
  kvGBs?: number;
  bandwidthGBs?: number;
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

/** CPU seconds all processes have spent busy so far (Linux /proc/stat), or null elsewhere. */
function busySeconds(): number | null {
  try {
    const fields = readFileSync("/proc/stat", "utf8").split("\n")[0]!.trim().split(/\s+/).slice(1).map(Number);
    // user nice system idle iowait irq softirq steal: busy is everything but idle and iowait
    return (fields[0]! + fields[1]! + fields[2]! + fields[5]! + fields[6]! + fields[7]!) / 100;
  } catch {
    return null;
  }
}

/** Runs f and reports the fraction of the machine's CPU that other processes used meanwhile. */
function withLoad<T>(f: () => T): { value: T; others: number } {
  const b0 = busySeconds(), c0 = process.cpuUsage(), t0 = nowMs();
  const value = f();
  const b1 = busySeconds(), c1 = process.cpuUsage(c0), wall = (nowMs() - t0) / 1000;
  if (b0 === null || b1 === null || wall <= 0) return { value, others: 0 };
  const mine = (c1.user + c1.system) / 1e6;
  return { value, others: Math.max(0, (b1 - b0 - mine) / (cpus().length * wall)) };
}

/**
 * A row counts as disturbed when other processes took more than this fraction of the machine's
 * CPU while it ran (on 2 cores: a fifth of one core).
 */
const busyThreshold = 0.1;

/** Runs f up to `attempts` times until other processes stay under busyThreshold; keeps the quietest run. */
/**
 * The median ms of `calls` timed calls of f, after `warm` untimed ones, between two runs of `probe`
 * (the larger kept as the limit of that moment), on the quietest of `attempts`.
 */
function timedBetweenProbes(attempts: number, f: () => void, calls: number, warm: number, probe: () => number) {
  return quietest(attempts, () => {
    for (let i = 0; i < warm; i++) f();
    const before = probe();
    const ts: number[] = [];
    for (let i = 0; i < calls; i++) {
      const t = nowMs();
      f();
      ts.push(nowMs() - t);
    }
    return { ms: median(ts), probe: Math.max(before, probe()) };
  });
}

function quietest<T>(attempts: number, f: () => T): { value: T; others: number } {
  let best: { value: T; others: number } | null = null;
  for (let i = 0; i < attempts && (best === null || best.others > busyThreshold); i++) {
    const r = withLoad(f);
    if (best === null || r.others < best.others) best = r;
  }
  return best!;
}

function pad(s: string | number, n: number, left = true): string {
  const t = String(s);
  return left ? t.padStart(n) : t.padEnd(n);
}

const pct = (r: number) => `${(r * 100).toFixed(0)}%`;
const loadNote = (others: number) => (others > busyThreshold ? `  ! other processes used ${pct(others)} of the CPU` : "");

function main(): void {
  const { values } = benchArgs("npm run bench:kernels --", "kernels", {
    options: {
      threads: { type: "string" },
      quick: { type: "boolean", default: false },
      json: { type: "string" },
      models: { type: "string" },
      dtypes: { type: "string" },
      batches: { type: "string" },
      layers: { type: "string" },
      "no-attention": { type: "boolean", default: false },
      attempts: { type: "string" },
      layout: { type: "string", default: "engine" },
    },
  });
  outputOption("--json", values.json);
  const layout = values.layout!;
  if (!["engine", "rows", "both"].includes(layout)) throw parameterError("--layout", `expected engine, rows or both, got ${layout}`);
  const addon = native();
  const cpu = addon.cpuInfo();
  const threads = values.threads ? Number(values.threads) : cpu.physicalCores;
  if (!Number.isInteger(threads) || threads < 1) throw parameterError("--threads", `expected a positive integer, got ${values.threads}`);
  const attempts = values.attempts ? Number(values.attempts) : 2;
  if (!Number.isInteger(attempts) || attempts < 1) throw parameterError("--attempts", `expected a positive integer, got ${values.attempts}`);
  addon.setThreads(threads);
  addon.setKernelVariant("auto");
  const quick = values.quick ?? false;
  const list = (v: string | undefined, dflt: string[]) => (v ? v.split(",").map((s) => s.trim()) : dflt);
  const modelNames = list(values.models, quick ? ["bloom-560m"] : Object.keys(models));
  const dtypes = list(values.dtypes, quick ? ["bf16"] : ["bf16", "f16", "f32"]) as StorageDType[];
  const batches = list(values.batches, quick ? ["1", "64"] : ["1", "8", "16", "32", "64", "128"]).map(Number);
  const layerFilter = values.layers ? list(values.layers, []) : null;
  for (const m of modelNames) if (!models[m]) throw parameterError("--models", `unknown model ${m}; expected some of ${Object.keys(models).join(", ")}`);
  for (const d of dtypes) if (d !== "f32" && d !== "f16" && d !== "bf16") throw parameterError("--dtypes", `expected f32, f16 or bf16, got ${d}`);
  for (const b of batches) if (!Number.isInteger(b) || b < 1) throw parameterError("--batches", `expected positive integers, got ${b}`);

  console.log(`machine: ${cpu.model} | ${cpu.physicalCores} physical / ${cpu.logicalCores} logical cores | avx2 ${cpu.avx2} fma ${cpu.fma} f16c ${cpu.f16c}`);
  console.log(`threads: ${threads} | kernels: ${addon.getKernelVariant()}`);
  const probeBytes = quick ? 512 * 2 ** 20 : 2 ** 30;
  const rowProbeBytes = 256 * 2 ** 20;
  // Every probe reads this one buffer, kept for the whole run: a fresh GiB allocated and freed per
  // probe stalled the runs measured after it in this project's VM (its balloon reports freed pages
  // to the host; see native/src/probes.h).
  const probeBuffer = addon.allocate(probeBytes);
  const probe = quietest(attempts, () => ({
    bandwidth: addon.probeReadBandwidth(probeBytes, threads, quick ? 3 : 7, probeBuffer),
    fmaPeak: addon.probeFmaPeak(threads, quick ? 3 : 7),
  }));
  let fmaPeak = probe.value.fmaPeak;
  let bandwidth = probe.value.bandwidth;
  console.log(`probed read bandwidth: ${bandwidth.toFixed(1)} GB/s (best streaming AVX2 read of ${probeBytes / 2 ** 20} MiB, with and without prefetch)`);
  console.log(`probed FMA peak:       ${fmaPeak.toFixed(1)} GFLOP/s (independent 256-bit FMA chains in registers)${loadNote(probe.others)}`);
  // Layers smaller than this are cycled through copies, so each call streams from DRAM.
  const minWorkingSet = 256 * 2 ** 20;
  const targetMsPerConfig = quick ? 150 : 400;

  const rows: Row[] = [];
  const header =
    `${pad("model", 11, false)} ${pad("layer", 13, false)} ${pad("dtype", 5, false)} ${pad("batch", 5)} ${pad("out x in", 12)} ` +
    `${pad("copies", 6)} ${pad("ms", 9)} ${pad("GB/s", 6)} ${pad("BWlim", 5)} ${pad("%BW", 5)} ${pad("GFLOP/s", 7)} ${pad("peak", 5)} ${pad("%FMA", 5)} ${pad("%roof", 5)}`;
  console.log(`\nlinear: y = epilogue(x @ W^T + bias). GB/s = weight bytes / time; GFLOP/s = 2 batch out in / time.`);
  console.log(`BWlim and peak: read bandwidth (${rowProbeBytes / 2 ** 20} MiB) and FMA peak probed just before and after the row (the larger);`);
  console.log(`%BW = GB/s / BWlim; %FMA = GFLOP/s / peak; %roof = max(bytes / BWlim, flops / peak) / time;`);
  console.log(`* marks the limit that binds at that batch (the roofline).\n`);
  console.log(header);
  console.log("-".repeat(header.length));

  const runStart = { busy: busySeconds(), cpu: process.cpuUsage(), t: nowMs() };
  for (const model of modelNames) {
    let layers = layersOf(model);
    if (layerFilter) layers = layers.filter((l) => layerFilter.some((f) => l.layer.startsWith(f)));
    if (quick && !layerFilter) layers = layers.filter((l) => l.layer === "qkv" || l.layer === "4h_to_h");
    for (const shape of layers) {
      for (const dtype of dtypes) {
        const weightBytes = shape.out * shape.in * bytesPerElement[dtype];
        const copies = Math.max(1, Math.ceil(minWorkingSet / weightBytes));
        const region: NativeRegion = addon.allocate(weightBytes * copies);
        // Fills (and so pages in) every copy; scale 1/sqrt(in) keeps outputs O(1) like trained weights.
        addon.fillRandom(region, 0, DTypeCode[dtype], shape.out * shape.in * copies, 7, 1 / Math.sqrt(shape.in));
        const bias = shape.bias ? randomArray(shape.out, 3) : null;
        // The same random bytes serve either layout: only the order of reading them changes.
        const enginePanelK = linearPanelWidth(defaultLinearPanels, dtype, shape.in);
        const layouts = enginePanelK === 0 || layout === "rows" ? [0] : layout === "both" ? [0, enginePanelK] : [enginePanelK];
        for (const batch of batches) for (const panelK of layouts) {
          const x = randomArray(batch * shape.in, 11 + batch);
          const y = new Float32Array(batch * shape.out);
          let copy = 0;
          const call = () => {
            addon.linear(y, x, batch, region, copy * weightBytes, DTypeCode[dtype], shape.out, shape.in, bias, shape.epilogue, null, panelK);
            copy = (copy + 1) % copies;
          };
          // Warm-up: up to one pass over the copies (at most ~0.3 s) so pages, caches and the pool are settled.
          const t0 = nowMs();
          call();
          const first = nowMs() - t0;
          const warm = Math.min(copies, Math.max(1, Math.floor(300 / Math.max(first, 1e-3))));
          for (let i = 1; i < warm; i++) call();
          const iterations = Math.max(3, Math.min(quick ? 20 : 200, Math.round(targetMsPerConfig / Math.max(first, 1e-3))));
          const timed = quietest(attempts, () => {
            const fmaBefore = addon.probeFmaPeak(threads, 1);
            const before = addon.probeReadBandwidth(rowProbeBytes, threads, 1, probeBuffer);
            for (let i = 0; i < Math.min(warm, 20); i++) call(); // settle again after the probe
            const ts: number[] = [];
            for (let i = 0; i < iterations; i++) {
              const s = nowMs();
              call();
              ts.push(nowMs() - s);
            }
            const after = addon.probeReadBandwidth(rowProbeBytes, threads, 1, probeBuffer);
            const fmaAfter = addon.probeFmaPeak(threads, 1);
            return { ms: median(ts), probe: Math.max(before, after), fma: Math.max(fmaBefore, fmaAfter) };
          });
          const { ms, probe: rowBandwidth, fma: rowFma } = timed.value;
          fmaPeak = Math.max(fmaPeak, rowFma);
          bandwidth = Math.max(bandwidth, rowBandwidth);
          const flops = 2 * batch * shape.out * shape.in;
          const gbPerS = weightBytes / ms / 1e6;
          const gflopPerS = flops / ms / 1e6;
          const memoryMs = weightBytes / rowBandwidth / 1e6;
          const computeMs = flops / rowFma / 1e6;
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
            bandwidthGBs: rowBandwidth,
            fmaPeakGflops: rowFma,
            bandwidthRatio: gbPerS / rowBandwidth,
            fmaRatio: gflopPerS / rowFma,
            rooflineRatio: Math.max(memoryMs, computeMs) / ms,
            bound: memoryMs >= computeMs ? "memory" : "compute",
            otherLoad: timed.others,
            panelK,
          };
          rows.push(row);
          const mark = (r: number, on: boolean) => pad(`${(r * 100).toFixed(0)}${on ? "*" : " "}`, 5);
          console.log(
            `${pad(model, 11, false)} ${pad(panelK ? `${shape.layer} p${panelK}` : shape.layer, 13, false)} ${pad(dtype, 5, false)} ${pad(batch, 5)} ` +
              `${pad(`${shape.out}x${shape.in}`, 12)} ${pad(copies, 6)} ${pad(ms.toFixed(3), 9)} ${pad(gbPerS.toFixed(1), 6)} ` +
              `${pad(rowBandwidth.toFixed(0), 5)} ${mark(row.bandwidthRatio, row.bound === "memory")} ${pad(gflopPerS.toFixed(1), 7)} ` +
              `${pad(rowFma.toFixed(0), 5)} ${mark(row.fmaRatio, row.bound === "compute")} ${pad((row.rooflineRatio * 100).toFixed(0), 5)}${loadNote(timed.others)}`,
          );
        }
        addon.release(region);
      }
    }
  }
  const busyEnd = busySeconds();
  if (runStart.busy !== null && busyEnd !== null) {
    const c = process.cpuUsage(runStart.cpu);
    const wall = (nowMs() - runStart.t) / 1000;
    const others = Math.max(0, (busyEnd - runStart.busy - (c.user + c.system) / 1e6) / (cpus().length * wall));
    console.log(`\nother processes used ${(others * 100).toFixed(1)}% of the machine's CPU during the linear runs`);
  }
  console.log(
    `best probes of the run: read bandwidth ${bandwidth.toFixed(1)} GB/s, FMA peak ${fmaPeak.toFixed(1)} GFLOP/s ` +
      `(the rows use the limits probed around them: other tenants move both)`,
  );
  // Verdicts and the attention share use the layout the engine computes with (--layout both times both).
  const engineRows = layout === "both" ? rows.filter(engineLayout) : rows;
  summarize(engineRows);

  const others = values["no-attention"] ? [] : [...benchOthers(quick, attempts, engineRows, probeBuffer), ...benchPrefill(quick, attempts)];

  if (values.json) {
    writeFileSync(
      values.json,
      JSON.stringify({ machine: cpu, threads, bandwidthGBs: bandwidth, fmaPeakGflops: fmaPeak, linear: rows, attentionAndNorm: others }, null, 2),
    );
    console.log(`wrote ${values.json}`);
  }
}

/** Whether a row was timed in the layout the engine computes with (--layout both times the other too). */
const engineLayout = (r: Row) => r.panelK === linearPanelWidth(defaultLinearPanels, r.dtype, r.in);

/**
 * The issue's targets: GEMV (bf16/f16, batch 1) >= 85% of read bandwidth; GEMM (batch >= 64) >= 70%
 * of FMA peak. Rows timed while other processes took the CPU are left out (and counted).
 */
function summarize(rows: Row[]): void {
  const line = (name: string, picked: Row[], ratio: (r: Row) => number, target: number) => {
    const alone = picked.filter((r) => r.otherLoad <= busyThreshold);
    const skipped = picked.length - alone.length;
    if (alone.length === 0) {
      if (picked.length > 0) console.log(`${name}: every row ran under load; no verdict`);
      return;
    }
    const rs = alone.map(ratio);
    const worst = alone[rs.indexOf(Math.min(...rs))]!;
    console.log(
      `${name}: min ${pct(Math.min(...rs))} (${worst.model} ${worst.layer}${worst.panelK ? ` in panels of ${worst.panelK}` : ""} ${worst.dtype} batch ${worst.batch}), median ${pct(median(rs))} ` +
        `over ${rs.length} rows${skipped ? ` (${skipped} run under load left out)` : ""}; target ${pct(target)}: ` +
        `${Math.min(...rs) >= target ? "met" : median(rs) >= target ? "met at the median" : "not met"}`,
    );
  };
  console.log("");
  line("GEMV bf16/f16 batch 1, % of read bandwidth", rows.filter((r) => r.batch === 1 && r.dtype !== "f32"), (r) => r.bandwidthRatio, 0.85);
  line("GEMM batch >= 64, % of FMA peak          ", rows.filter((r) => r.batch >= 64), (r) => r.fmaRatio, 0.7);
}

/**
 * attention (one decode step over a paged KV cache) and layer_norm: at batch 1 and 128 over ~100
 * cached tokens with an fp32 cache, and at batch 1 over 2048 (the long-context case, where a small
 * batch's cache is split among the threads) with an fp32 and an fp16 cache, and at batch 128 with
 * fp16. Decoding reads the cache cold (a whole step of weights streams between one layer's
 * attention calls), so attention cycles through copies of the cache that together exceed the
 * last-level cache, and its KV bytes per second are set against the read bandwidth probed just
 * before and after.
 */
function benchOthers(quick: boolean, attempts: number, linearRows: Row[], probeBuffer: NativeRegion): OtherRow[] {
  const addon = native();
  const out: OtherRow[] = [];
  const blockSize = 16;
  const threads = addon.getThreads();
  const cases: { batch: number; cached: number; kv: "fp32" | "fp16" }[] = [
    { batch: 1, cached: 100, kv: "fp32" },
    { batch: 128, cached: 100, kv: "fp32" },
    { batch: 128, cached: 100, kv: "fp16" },
    { batch: 1, cached: 2048, kv: "fp32" },
    { batch: 1, cached: 2048, kv: "fp16" },
  ];
  console.log(`\nattention (a decode step: 1 new token per sequence over its cached tokens, the cache read cold) and layer_norm,`);
  console.log(`against the bf16 matmuls of one decoder layer (qkv + dense + h_to_4h + 4h_to_h, measured above) at the same batch:\n`);
  console.log(
    `${pad("model", 11, false)} ${pad("batch", 5)} ${pad("cached", 6)} ${pad("KV", 4)} ${pad("attention ms", 12)} ${pad("KV GB/s", 7)} ${pad("BWlim", 5)} ${pad("%BW", 4)} ` +
      `${pad("layer_norm ms", 13)} ${pad("matmuls ms", 10)} ${pad("share", 6)}`,
  );
  for (const model of quick ? ["bloom-560m"] : Object.keys(models)) {
    const { hidden, heads } = models[model]!;
    const headDim = hidden / heads;
    for (const { batch, cached: pastLen, kv } of cases) {
      const blocksPerSeq = Math.ceil((pastLen + 1) / blockSize);
      const numBlocks = blocksPerSeq * batch;
      const entries = numBlocks * heads * blockSize * headDim;
      const entryBytes = kv === "fp32" ? 4 : 2;
      const copies = Math.max(1, Math.ceil((96 * 2 ** 20) / (entries * entryBytes * 2)));
      // fp16 caches hold the rounded values of the same random data.
      const cacheOf = (seed: number) => {
        const x = randomArray(entries, seed);
        return kv === "fp32" ? x : Uint16Array.from(x, float32ToFloat16);
      };
      const caches = Array.from({ length: copies }, (_, c) => [cacheOf(5 + 2 * c), cacheOf(6 + 2 * c)] as const);
      const qkv = randomArray(batch * 3 * hidden, 7);
      const o = new Float32Array(batch * hidden);
      const seqs = new Int32Array(batch * 4);
      const table = new Int32Array(numBlocks);
      for (let i = 0; i < numBlocks; i++) table[i] = i;
      for (let s = 0; s < batch; s++) seqs.set([s, 1, pastLen, s * blocksPerSeq], s * 4);
      const slopes = new Float32Array(heads).map((_, h) => 2 ** ((-8 * (h + 1)) / heads));
      const kvBytes = batch * (pastLen + 1) * hidden * entryBytes * 2;
      let copy = 0;
      const attend = () => {
        const [k, v] = caches[copy]!;
        addon.attention(o, qkv, batch, heads, headDim, k, v, blockSize, seqs, table, slopes, kv === "fp32" ? DTypeCode.f32 : DTypeCode.f16);
        copy = (copy + 1) % copies;
      };
      const time = (f: () => void, calls: number) =>
        timedBetweenProbes(attempts, f, calls, Math.min(calls, copies), () => addon.probeReadBandwidth(256 * 2 ** 20, threads, 1, probeBuffer));
      const att = time(attend, Math.max(quick ? 10 : 30, 2 * copies));
      const xs = randomArray(batch * hidden, 9);
      const ys = new Float32Array(batch * hidden);
      const gamma = randomArray(hidden, 10);
      const beta = randomArray(hidden, 12);
      const ln = time(() => addon.layerNorm(ys, xs, batch, hidden, gamma, beta, 1e-5), quick ? 10 : 30);
      const attMs = att.value.ms, lnMs = ln.value.ms;
      const kvGBs = kvBytes / attMs / 1e6;
      out.push({ model, op: "attention", batch, cached: pastLen, kvDtype: kv, ms: attMs, kvGBs, bandwidthGBs: att.value.probe, otherLoad: att.others });
      out.push({ model, op: "layer_norm", batch, ms: lnMs, otherLoad: ln.others });
      const mm = linearRows.filter((r) => r.model === model && r.batch === batch && r.dtype === "bf16" && r.layer !== "lm_head");
      const matmulMs = mm.length === 4 ? mm.reduce((a, r) => a + r.ms, 0) : NaN;
      const share = (attMs + 2 * lnMs) / (attMs + 2 * lnMs + matmulMs);
      console.log(
        `${pad(model, 11, false)} ${pad(batch, 5)} ${pad(pastLen, 6)} ${pad(kv, 4)} ${pad(attMs.toFixed(3), 12)} ${pad(kvGBs.toFixed(1), 7)} ${pad(att.value.probe.toFixed(0), 5)} ` +
          `${pad(pct(kvGBs / att.value.probe), 4)} ${pad(lnMs.toFixed(3), 13)} ` +
          `${pad(Number.isNaN(matmulMs) ? "-" : matmulMs.toFixed(3), 10)} ${pad(Number.isNaN(share) ? "-" : pct(share), 6)}${loadNote(Math.max(att.others, ln.others))}`,
      );
    }
  }
  console.log(`KV GB/s = keys and values read / time; BWlim: read bandwidth probed just before and after;`);
  console.log(`share = (attention + 2 layer_norms) / (that + the layer's matmuls)`);
  return out;
}

/**
 * Prefill attention: one sequence of N new tokens over an empty cache (every query attends to the
 * keys up to its own position), per layer. GFLOP/s counts the causal work only, 2 * N(N+1)/2 *
 * head_dim multiply-adds for scores and as many for values per head, against the FMA peak probed
 * just before and after.
 */
function benchPrefill(quick: boolean, attempts: number): OtherRow[] {
  const addon = native();
  const out: OtherRow[] = [];
  const blockSize = 16;
  const threads = addon.getThreads();
  console.log(`\nprefill attention (one sequence of N new tokens, fp32 cache), per layer:\n`);
  console.log(`${pad("model", 11, false)} ${pad("tokens", 6)} ${pad("attention ms", 12)} ${pad("GFLOP/s", 7)} ${pad("peak", 5)} ${pad("%FMA", 4)}`);
  for (const model of quick ? ["bloom-560m"] : Object.keys(models)) {
    const { hidden, heads } = models[model]!;
    const headDim = hidden / heads;
    for (const n of [512, 2048]) {
      const numBlocks = Math.ceil(n / blockSize);
      const k = new Float32Array(numBlocks * heads * blockSize * headDim);
      const v = new Float32Array(k.length);
      const qkv = randomArray(n * 3 * hidden, 13);
      const o = new Float32Array(n * hidden);
      const seqs = Int32Array.from([0, n, 0, 0]);
      const table = Int32Array.from({ length: numBlocks }, (_, i) => i);
      const slopes = new Float32Array(heads).map((_, h) => 2 ** ((-8 * (h + 1)) / heads));
      const flops = 2 * 2 * heads * ((n * (n + 1)) / 2) * headDim;
      const attend = () => addon.attention(o, qkv, n, heads, headDim, k, v, blockSize, seqs, table, slopes);
      const r = timedBetweenProbes(attempts, attend, quick ? 3 : 5, 1, () => addon.probeFmaPeak(threads, 1));
      const gflops = flops / r.value.ms / 1e6;
      out.push({ model, op: "prefill_attention", batch: 1, tokens: n, ms: r.value.ms, gflops, fmaPeakGflops: r.value.probe, otherLoad: r.others });
      console.log(
        `${pad(model, 11, false)} ${pad(n, 6)} ${pad(r.value.ms.toFixed(2), 12)} ${pad(gflops.toFixed(1), 7)} ${pad(r.value.probe.toFixed(0), 5)} ${pad(pct(gflops / r.value.probe), 4)}${loadNote(r.others)}`,
      );
    }
  }
  console.log(`GFLOP/s: the causal work (scores and values, keys up to each query's position) / time`);
  return out;
}

main();
