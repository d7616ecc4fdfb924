/**
 * Tuning experiments for `linear`'s blocking parameters: A/B(/C...) runs interleaved in one process,
 * so that noise from other load on the machine hits every candidate alike.
 *
 *   node dist/bench/tune-linear.js --out 3072 --in 1024 --dtype bf16 --batch 1 \
 *        --param gemvPrefetch --values 0,512,1024 [--rounds 15] [--threads 2]
 *
 * Prints, per value, the best and the median over rounds of each round's median time, and GB/s, GFLOP/s.
 */
import { DTypeCode, native, type StorageDType } from "../src/backend/native.js";
import { median, benchArgs } from "./stats.js";

const { values } = benchArgs("node dist/bench/tune-linear.js", "tune-linear", {
  options: {
    out: { type: "string", default: "3072" },
    in: { type: "string", default: "1024" },
    dtype: { type: "string", default: "bf16" },
    batch: { type: "string", default: "1" },
    param: { type: "string", default: "" },
    values: { type: "string", default: "0" },
    rounds: { type: "string", default: "15" },
    threads: { type: "string" },
    calls: { type: "string", default: "0" },
    copies: { type: "string" },
  },
});
const addon = native();
if (values.threads) addon.setThreads(Number(values.threads));
const out = Number(values.out), inF = Number(values.in), batch = Number(values.batch);
const dtype = values.dtype as StorageDType;
const bytes = out * inF * (dtype === "f32" ? 4 : 2);
const copies = values.copies ? Number(values.copies) : Math.max(1, Math.ceil((256 * 2 ** 20) / bytes));
const region = addon.allocate(bytes * copies);
addon.fillRandom(region, 0, DTypeCode[dtype], out * inF * copies, 1, 0.05);
const x = new Float32Array(batch * inF).map(() => Math.random() - 0.5);
const y = new Float32Array(batch * out);
const candidates = values.values!.split(",").map(Number);
const flops = 2 * batch * out * inF;
let copy = 0;
const call = () => {
  addon.linear(y, x, batch, region, copy * bytes, DTypeCode[dtype], out, inF, null, 0, null);
  copy = (copy + 1) % copies;
};
call();
const t0 = performance.now();
call();
const once = performance.now() - t0;
const calls = Number(values.calls) || Math.max(3, Math.min(100, Math.round(60 / once)));
const results = new Map<number, number[]>(candidates.map((v) => [v, []]));
for (let round = 0; round < Number(values.rounds); round++) {
  for (const v of candidates) {
    if (values.param && !addon.setLinearTuning(values.param, v)) throw new Error(`unknown tuning ${values.param}=${v}`);
    call();
    const ts: number[] = [];
    for (let i = 0; i < calls; i++) {
      const s = performance.now();
      call();
      ts.push(performance.now() - s);
    }
    results.get(v)!.push(median(ts));
  }
}
console.log(`${out}x${inF} ${dtype} batch ${batch}, ${copies} copies, ${calls} calls per round`);
for (const [v, ms] of results) {
  const best = Math.min(...ms), med = median(ms);
  console.log(
    `${values.param || "-"}=${String(v).padStart(8)}  best ${best.toFixed(3)} ms (${(bytes / best / 1e6).toFixed(1)} GB/s, ${(flops / best / 1e6).toFixed(1)} GFLOP/s)` +
      `  median ${med.toFixed(3)} ms (${(bytes / med / 1e6).toFixed(1)} GB/s, ${(flops / med / 1e6).toFixed(1)} GFLOP/s)`,
  );
}
addon.release(region);
