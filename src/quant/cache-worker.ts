/** Runs quantizeCheckpoint off the main thread (see src/quant/cache.ts). */
import { parentPort, workerData } from "node:worker_threads";
import { quantizeCheckpoint } from "./quantize.js";
import type { QuantScheme } from "./scheme.js";

const { source, out, scheme, groupSize } = workerData as { source: string; out: string; scheme: QuantScheme; groupSize?: number };
try {
  await quantizeCheckpoint(source, out, { scheme, groupSize });
  parentPort!.postMessage({ ok: true });
} catch (err) {
  parentPort!.postMessage({ ok: false, message: (err as Error).message });
}
