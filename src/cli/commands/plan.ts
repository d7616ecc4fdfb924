/** `blossom plan`: prints the pipeline placement and the bytes on each device, before loading anything. */
import { InvalidArgumentError, Option, type Command } from "commander";
import { openCheckpoint } from "../../checkpoint/checkpoint.js";
import { formatBytes, processBytesFor } from "../../engine/memory.js";
import { matrixDtype, type WeightDType } from "../../engine/weights.js";
import { bloomTensors } from "../../models/bloom-weights.js";
import { resolveModelDir } from "../../model.js";
import { bloomModules, matrixBytesAs, type MatrixBytes } from "../../parallel/modules.js";
import type { Checkpoint } from "../../checkpoint/checkpoint.js";
import { checkDtypeForQuantized, checkpointQuantSpec, isInt8ExtraTensor } from "../../quant/store.js";
import { isQuantScheme, quantizedMatrixBytes, quantSpec } from "../../quant/scheme.js";
import { orderedDevices, parseMaxMemory, placementModes, planForProcess, type Plan } from "../../parallel/planner.js";
import { dtypeChoices } from "../options.js";

/** "h.0, h.1, h.2, h.5" -> "h.0-h.2, h.5". */
function compact(names: string[]): string {
  const out: string[] = [];
  let run: number[] = [];
  const flush = () => {
    if (run.length === 1) out.push(`h.${run[0]}`);
    else if (run.length > 1) out.push(`h.${run[0]}-h.${run[run.length - 1]}`);
    run = [];
  };
  for (const n of names) {
    const m = /^h\.(\d+)$/.exec(n);
    if (m && (run.length === 0 || Number(m[1]) === run[run.length - 1]! + 1)) run.push(Number(m[1]));
    else {
      flush();
      if (m) run.push(Number(m[1]));
      else out.push(n);
    }
  }
  flush();
  return out.join(", ");
}

export function formatPlan(plan: Plan): string {
  const rows = orderedDevices(plan.budgets).map((d) => {
    const names = [...plan.placement.entries()].filter(([, dev]) => dev === d).map(([n]) => n);
    const budget = plan.budgets.get(d)!;
    return [String(d), budget === Infinity ? "-" : formatBytes(budget), formatBytes(plan.bytesPerDevice.get(d) ?? 0), names.length ? compact(names) : "(nothing)"];
  });
  const header = ["device", "budget", "placed", "modules"];
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i]!.length)));
  const line = (r: string[]) => r.map((c, i) => (i === r.length - 1 ? c : c.padEnd(widths[i]!))).join("  ");
  return [line(header), ...rows.map(line)].join("\n");
}

/**
 * Bytes of each weight matrix as the engine will hold it: converted to the requested dtype, quantized
 * at load (int8 dtypes: values and scales), or as a pre-quantized checkpoint stores it.
 */
function planMatrixBytes(checkpoint: Checkpoint, dtype: WeightDType): MatrixBytes {
  const stored = checkpointQuantSpec(checkpoint);
  if (stored) {
    checkDtypeForQuantized(checkpoint.dir, stored.scheme, dtype, "plan");
    return (v) => (v.dtype === "i8" ? quantizedMatrixBytes(v.shape[0]!, v.shape[1]!, stored.groupSize) : v.byteLength);
  }
  if (isQuantScheme(dtype)) {
    const spec = quantSpec(dtype);
    return (v) => quantizedMatrixBytes(v.shape[0]!, v.shape[1]!, spec.groupSize);
  }
  return matrixBytesAs((v) => matrixDtype(v.dtype, dtype));
}

export function registerPlanCommand(program: Command): void {
  program
    .command("plan")
    .description("print the pipeline placement (--strategy pipeline) and the bytes on each device, without loading the model")
    .requiredOption("-m, --model <ref>", "checkpoint folder (or Hugging Face id)")
    .requiredOption("--max-memory <budgets>", "per-device budgets, e.g. 0:2GiB,1:2GiB,cpu:4GiB,disk")
    .addOption(new Option("--placement <mode>", "how layers are spread (as Accelerate's device_map)").choices([...placementModes]).default("auto"))
    .addOption(new Option("--dtype <dtype>", "in-memory weight format").choices(dtypeChoices).default("auto"))
    .action(async (o: { model: string; maxMemory: string; placement: (typeof placementModes)[number]; dtype: WeightDType }) => {
      const dir = await resolveModelDir(o.model);
      const checkpoint = openCheckpoint(dir);
      try {
        const tensors = bloomTensors(checkpoint, checkpoint.config.quantization ? { isExtraTensor: isInt8ExtraTensor } : {});
        const modules = bloomModules(tensors, planMatrixBytes(checkpoint, o.dtype));
        let budgets;
        try {
          budgets = parseMaxMemory(o.maxMemory);
        } catch (err) {
          throw new InvalidArgumentError((err as Error).message);
        }
        // The placement a pipeline load will make: the cpu budget less what the process holds itself.
        const { plan, budgets: left } = planForProcess(modules, budgets, o.placement, processBytesFor(dir));
        const cpuGiven = budgets.get("cpu"), cpuLeft = left.get("cpu");
        const reserved =
          cpuGiven !== undefined && cpuLeft !== undefined && cpuLeft < cpuGiven
            ? `cpu: ${formatBytes(cpuGiven)} given, ${formatBytes(cpuLeft)} left for weights after this process's own memory${budgets.has("disk") ? " and the read-ahead buffers" : ""}\n`
            : "";
        process.stdout.write(`${dir}: ${formatBytes(plan.totalBytes)} of weights (${o.dtype}), placement ${o.placement}\n${reserved}\n${formatPlan(plan)}\n`);
      } finally {
        checkpoint.dispose();
      }
    });
}
