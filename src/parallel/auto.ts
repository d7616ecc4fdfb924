/**
 * Strategy "auto": picks a deployment from the model's size, the memory available and how the
 * process was launched, and says why.
 *   - launched by mpirun with several ranks          -> tensor (the ranks are there to share the work)
 *   - weights larger than ~90 % of available memory  -> pipeline, resident up to the budget, the rest
 *                                                       offloaded to disk
 *   - several NUMA nodes                             -> replicas, one per node (each streams from its
 *                                                       own memory)
 *   - otherwise                                      -> single: one engine on every core (on one memory
 *                                                       channel, splitting cores gains nothing)
 */
import { existsSync, readdirSync } from "node:fs";
import { openCheckpoint } from "../checkpoint/checkpoint.js";
import { availableMemory, formatBytes } from "../engine/memory.js";
import { matrixDtype, type WeightDType } from "../engine/weights.js";
import { isQuantScheme, quantizedMatrixBytes, quantSpec } from "../quant/scheme.js";

export interface AutoChoice {
  strategy: "single" | "pipeline" | "tensor" | "replicas";
  reason: string;
  maxMemory?: string;
  replicas?: number;
}

export function numaNodes(): number {
  const dir = "/sys/devices/system/node";
  if (!existsSync(dir)) return 1;
  return Math.max(1, readdirSync(dir).filter((n) => /^node\d+$/.test(n)).length);
}

export function chooseStrategy(
  dir: string,
  dtype: WeightDType,
  worldSize: number,
  machine: { availableBytes: number; numaNodes: number } = { availableBytes: availableMemory(), numaNodes: numaNodes() },
): AutoChoice {
  if (worldSize > 1) return { strategy: "tensor", reason: `launched by mpirun with ${worldSize} ranks: each holds 1/${worldSize} of every layer` };
  const checkpoint = openCheckpoint(dir);
  let weights = 0;
  try {
    const int8 = isQuantScheme(dtype) ? quantSpec(dtype) : undefined;
    for (const t of checkpoint.tensors.values()) {
      const numel = t.shape.reduce((a, b) => a * b, 1);
      if (t.shape.length !== 2) weights += numel * 4;
      else if (int8) weights += quantizedMatrixBytes(t.shape[0]!, t.shape[1]!, int8.groupSize);
      else weights += numel * { f32: 4, f16: 2, bf16: 2, i8: 1 }[matrixDtype(t.dtype, dtype)];
    }
  } finally {
    checkpoint.dispose();
  }
  const available = machine.availableBytes;
  if (weights > 0.9 * available) {
    // Keep a quarter of what is available for the KV cache, activations and the runtime.
    const budget = Math.floor(0.75 * available);
    return {
      strategy: "pipeline",
      maxMemory: `cpu:${budget}B,disk`,
      reason: `weights (${formatBytes(weights)}) exceed 90 % of available memory (${formatBytes(available)}): layers up to ${formatBytes(budget)} stay resident, the rest are read from disk ahead of use`,
    };
  }
  const nodes = machine.numaNodes;
  if (nodes > 1) return { strategy: "replicas", replicas: nodes, reason: `${nodes} NUMA nodes: one replica per node, each streaming weights from its own memory` };
  return {
    strategy: "single",
    reason: `weights (${formatBytes(weights)}) fit in available memory (${formatBytes(available)}) and there is one NUMA node: one engine on every core is fastest (decoding is bound by one memory system's bandwidth)`,
  };
}
