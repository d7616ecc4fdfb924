/**
 * Worker thread for `create-random`: turns (tensor, element range) jobs into bytes, so generation
 * runs on every core while the main thread writes. The bytes equal an in-thread
 * {@link randomTensorBytes} call, since each block's generator is seeded from its position alone.
 */
import { parentPort } from "node:worker_threads";
import { randomTensorBytes, type RandomDType, type RandomInit } from "./random-weights.js";

export interface RandomJob {
  id: number;
  dtype: RandomDType;
  seed: number;
  name: string;
  firstElement: number;
  count: number;
  init: RandomInit;
}

export interface RandomJobResult {
  id: number;
  bytes?: Uint8Array;
  error?: string;
}

if (parentPort) {
  const port = parentPort;
  let scratch = new Float32Array(0);
  port.on("message", (job: RandomJob) => {
    try {
      if (scratch.length < job.count) scratch = new Float32Array(job.count);
      const bytes = randomTensorBytes(job.dtype, job.seed, job.name, job.firstElement, job.count, job.init, scratch);
      port.postMessage({ id: job.id, bytes } satisfies RandomJobResult, [bytes.buffer]);
    } catch (err) {
      port.postMessage({ id: job.id, error: err instanceof Error ? err.message : String(err) } satisfies RandomJobResult);
    }
  });
}
