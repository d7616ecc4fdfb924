/**
 * Pipeline placement, as Hugging Face Accelerate computes a device_map: whole modules (the
 * embeddings, each BLOOM block, the final norm, the head) go to devices in order under per-device
 * memory budgets, and what fits nowhere goes to "cpu" (resident, computed on the main device) and
 * then "disk" (memory-mapped, read ahead of use and dropped after).
 *
 * Placement modes follow accelerate.utils.modeling:
 *   sequential      fill device 0, then 1, ..., then cpu, then disk (infer_auto_device_map as is);
 *   balanced        cap every device but the last at total/num_devices + a buffer, then fill
 *                   (get_balanced_memory); transformers' device_map="auto" is this too;
 *   balanced_low_0  the same over devices 1..n-1, device 0 keeping only what does not fit there
 *                   (room for generate()'s work on the first device).
 * As in infer_auto_device_map, the main devices (the first numbered device, and cpu) keep room for
 * the largest layer still to place, into which offloaded weights are brought to compute (a tied head
 * needs no room of its own); the fill only moves forward through the devices.
 */
import { BlossomError } from "../errors.js";
import { formatBytes, parseSize } from "../engine/memory.js";

export type DeviceId = number | "cpu" | "disk";
export type PlacementMode = "auto" | "balanced" | "balanced_low_0" | "sequential";
export const placementModes: readonly PlacementMode[] = ["auto", "balanced", "balanced_low_0", "sequential"];

export interface PlannedModule {
  name: string;
  bytes: number;
  /** Tied to another module's weights (placed with it, costs nothing more). */
  tiedTo?: string;
}

export interface Plan {
  mode: PlacementMode;
  /** Module name -> device. */
  placement: Map<string, DeviceId>;
  /** Bytes placed on each device, in device order. */
  bytesPerDevice: Map<DeviceId, number>;
  /** The budgets the fill used (after balancing). */
  budgets: Map<DeviceId, number>;
  totalBytes: number;
}

/**
 * Parses "0:2GiB,1:2GiB,cpu:4GiB,disk" (disk needs no size). Numbered devices must be listed in
 * increasing order; cpu and disk may appear once each.
 */
export function parseMaxMemory(text: string): Map<DeviceId, number> {
  const budgets = new Map<DeviceId, number>();
  const parts = text.split(",").map((p) => p.trim());
  if (parts.includes("") && parts.some((p) => p !== "")) throw new BlossomError("parameter", `--max-memory: "${text}" has an empty item (devices are separated by single commas)`);
  for (const part of parts.filter(Boolean)) {
    const fields = part.split(":").map((s) => s.trim());
    if (fields.length > 2) throw new BlossomError("parameter", `--max-memory: "${part}" has more than one ":" (expected device:size, e.g. cpu:4GiB)`);
    const [rawKey, rawSize] = fields as [string, string | undefined];
    const key: DeviceId = /^\d{1,4}$/.test(rawKey) ? Number(rawKey) : (rawKey as DeviceId);
    if (key !== "cpu" && key !== "disk" && typeof key !== "number") {
      throw new BlossomError("parameter", `--max-memory: "${rawKey}" is not a device (expected 0, 1, ... (up to 9999), cpu or disk)`);
    }
    if (budgets.has(key)) throw new BlossomError("parameter", `--max-memory: device ${key} is listed twice`);
    if (key === "disk") {
      // Offloaded weights stay in the checkpoint (or the offload folder): there is nothing to cap.
      if (rawSize !== undefined) throw new BlossomError("parameter", `--max-memory: disk takes no size (got "${part}"); write "disk"`);
      budgets.set("disk", Infinity);
      continue;
    }
    if (rawSize === undefined) throw new BlossomError("parameter", `--max-memory: device ${key} needs a size, e.g. ${key}:2GiB`);
    budgets.set(key, parseSize(rawSize, `--max-memory ${key}`));
  }
  if (budgets.size === 0) throw new BlossomError("parameter", "--max-memory: no devices given (e.g. 0:2GiB,1:2GiB,cpu:4GiB)");
  return budgets;
}

/** Devices in Accelerate's order: numbered ascending, then cpu, then disk. */
export function orderedDevices(budgets: Map<DeviceId, number>): DeviceId[] {
  const numbered = [...budgets.keys()].filter((d): d is number => typeof d === "number").sort((a, b) => a - b);
  return [...numbered, ...(["cpu", "disk"] as const).filter((d) => budgets.has(d))];
}

/** get_balanced_memory: caps every numbered device but the last near an even share. */
export function balancedBudgets(modules: PlannedModule[], budgets: Map<DeviceId, number>, lowZero: boolean): Map<DeviceId, number> {
  const out = new Map(budgets);
  const gpus = [...budgets.entries()].filter(([d, m]) => typeof d === "number" && m > 0).map(([d]) => d as number).sort((a, b) => a - b);
  if (gpus.length === 0) return out;
  if (gpus.length === 1) lowZero = false; // no low_zero on a single device
  const total = modules.reduce((a, m) => a + m.bytes, 0);
  let perDevice = Math.floor(total / (lowZero ? gpus.length - 1 : gpus.length));
  // Buffer: 1.25 x the biggest no-split block (Accelerate takes the larger of that and the mean
  // leaf-module size, which for BLOOM is always the block), so the even share does not push the
  // last block of each device onto the next.
  const largestBlock = Math.max(0, ...modules.filter((m) => /^h\.\d+$/.test(m.name)).map((m) => m.bytes));
  perDevice += Math.floor(1.25 * largestBlock);
  for (const d of gpus.slice(0, -1)) out.set(d, Math.min(lowZero && d === gpus[0] ? budgets.get(gpus[0])! : perDevice, budgets.get(d)!));
  if (lowZero) {
    const rest = gpus.slice(1).reduce((a, d) => a + out.get(d)!, 0);
    out.set(gpus[0]!, Math.min(Math.max(0, total - rest), budgets.get(gpus[0]!)!));
  }
  return out;
}

export function planPlacement(modules: PlannedModule[], maxMemory: Map<DeviceId, number>, mode: PlacementMode): Plan {
  const budgets = mode === "sequential" ? new Map(maxMemory) : balancedBudgets(modules, maxMemory, mode === "balanced_low_0");
  const devices = orderedDevices(budgets);
  const numbered = devices.filter((d) => typeof d === "number");
  const mainDevices = new Set<DeviceId>(numbered.length ? [numbered[0]!, "cpu"] : ["cpu"]);
  const placement = new Map<string, DeviceId>();
  const used = new Map<DeviceId, number>(devices.map((d) => [d, 0]));
  const bytesPerDevice = new Map<DeviceId, number>(devices.map((d) => [d, 0]));
  const tiedTo = new Map(modules.filter((m) => m.tiedTo !== undefined).map((m) => [m.tiedTo!, m.name]));
  let current = 0;
  for (const [index, module] of modules.entries()) {
    if (placement.has(module.name)) continue; // a tied module, placed with its target
    // Room kept on main devices: the largest layer still to place, which offloaded weights are brought
    // into to compute (a tied head counts until its embeddings are placed).
    const reserve = Math.max(0, ...modules.slice(index + 1).filter((m) => !placement.has(m.name) && m.tiedTo === undefined).map((m) => m.bytes));
    for (;;) {
      const device = devices[current];
      if (device === undefined) {
        const tried = devices.map((d) => `${d}: ${formatBytes(budgets.get(d)!)}`).join(", ");
        throw new BlossomError(
          "memory",
          `cannot place ${module.name} (${formatBytes(module.bytes)}): the budgets (${tried}) are full; raise --max-memory or add "disk" to it to offload the rest`,
        );
      }
      const kept = mainDevices.has(device) ? reserve : 0;
      if (device === "disk" || used.get(device)! + module.bytes <= budgets.get(device)! - kept) {
        placement.set(module.name, device);
        used.set(device, used.get(device)! + module.bytes);
        bytesPerDevice.set(device, bytesPerDevice.get(device)! + module.bytes);
        const tied = tiedTo.get(module.name);
        if (tied !== undefined) placement.set(tied, device);
        break;
      }
      current++;
    }
  }
  return { mode, placement, bytesPerDevice, budgets, totalBytes: modules.reduce((a, m) => a + m.bytes, 0) };
}

/** Bytes of the LM-head chunks an offloaded head streams through (two in flight). */
export const streamedHeadBytes = 2 * 32 * 2 ** 20;

/**
 * On the CPU backend the "cpu" budget is the whole process's memory: what the process already holds
 * (runtime, tokenizer) and the offload staging buffers come out of it before layers are placed, so
 * a budget of cpu:X keeps the process within X. Numbered devices' budgets are for weights, as in
 * Accelerate.
 */
export function reserveProcessMemory(budgets: Map<DeviceId, number>, modules: PlannedModule[], processBytes: number): Map<DeviceId, number> {
  const out = new Map(budgets);
  const key: DeviceId | undefined = out.has("cpu") ? "cpu" : undefined;
  if (key === undefined) return out;
  const largestBlock = Math.max(0, ...modules.filter((m) => /^h\.\d+$/.test(m.name)).map((m) => m.bytes));
  const reserved = processBytes + (out.has("disk") ? 2 * largestBlock + streamedHeadBytes : 0);
  out.set(key, Math.max(0, out.get(key)! - reserved));
  return out;
}

/**
 * The placement a pipeline load makes: the cpu budget less what the process itself holds
 * (processBytesFor: estimated from the checkpoint's files, so `plan` — a lighter process than a
 * loading one — reserves the same) and, with disk, the read-ahead buffers; then planPlacement.
 * `blossom plan` calls it too, so it shows the placement a load will use. A module that cannot be
 * placed says how much of the cpu budget went.
 */
export function planForProcess(modules: PlannedModule[], given: Map<DeviceId, number>, mode: PlacementMode, processBytes: number): { plan: Plan; budgets: Map<DeviceId, number> } {
  const budgets = reserveProcessMemory(given, modules, processBytes);
  try {
    return { plan: planPlacement(modules, budgets, mode), budgets };
  } catch (err) {
    // "cpu: 0 B" would read as a parsing error: say what took the budget.
    const cpuGiven = given.get("cpu"), cpuLeft = budgets.get("cpu");
    if (err instanceof BlossomError && cpuGiven !== undefined && cpuLeft !== undefined && cpuLeft < cpuGiven) {
      throw new BlossomError(err.code, `${err.message} (cpu: ${formatBytes(cpuGiven)} given, less ${formatBytes(cpuGiven - cpuLeft)} for this process's own memory${given.has("disk") ? " and the read-ahead buffers" : ""})`, { cause: err });
    }
    throw err;
  }
}
