/** Options shared by commands, and strict parsers that name the option at fault. */
import { accessSync, constants, existsSync, statSync } from "node:fs";
import { dirname, resolve } from "node:path";
import { InvalidArgumentError, Option, type Command } from "commander";
import { BlossomError } from "../errors.js";
import { loadModel, mpiRank, mpiWorldSize, strategies, type LoadModelOptions, type Model, type ModelDType, type Strategy } from "../model.js";
import { placementModes, type PlacementMode } from "../parallel/planner.js";
import { kvDtypes, type KVDType } from "../backend/backend.js";
import { defaultGroupSize } from "../quant/scheme.js";

export function parseInteger(name: string, min: number, max = Number.MAX_SAFE_INTEGER) {
  return (value: string): number => {
    const n = Number(value);
    if (!/^-?\d+$/.test(value.trim()) || !Number.isSafeInteger(n) || n < min || n > max) {
      throw new InvalidArgumentError(`${name} must be an integer from ${min}${max < Number.MAX_SAFE_INTEGER ? ` to ${max}` : " up"}, got "${value}"`);
    }
    return n;
  };
}

export function parseNumber(name: string, min = -Infinity) {
  return (value: string): number => {
    const n = Number(value);
    if (value.trim() === "" || !Number.isFinite(n)) throw new InvalidArgumentError(`${name} must be a number, got "${value}"`);
    if (n < min) throw new InvalidArgumentError(`${name} must be a number >= ${min}, got "${value}"`);
    return n;
  };
}

/** Refuses, before any work, an output file that could not be written: a missing or read-only folder, or a folder in its place. */
export function checkOutputFile(path: string, option: string): void {
  if (path.trim() === "") throw new BlossomError("input", `${option}: expected a file path, got an empty string`);
  const folder = dirname(resolve(path));
  let isFolder = false;
  try {
    isFolder = statSync(folder).isDirectory();
  } catch {
    throw new BlossomError("input", `${option} ${path}: the folder ${folder} does not exist`);
  }
  if (!isFolder) throw new BlossomError("input", `${option} ${path}: ${folder} is not a folder`);
  if (existsSync(path) && statSync(path).isDirectory()) throw new BlossomError("input", `${option} ${path}: is a folder, expected a file`);
  try {
    accessSync(folder, constants.W_OK);
  } catch {
    throw new BlossomError("input", `${option} ${path}: the folder ${folder} is not writable`);
  }
}

export const dtypeChoices: ModelDType[] = ["auto", "fp32", "bf16", "fp16", "int8", "int8-mixed"];

export interface ModelCliOptions {
  model: string;
  dtype: ModelDType;
  threads?: number;
  strategy: Strategy;
  maxMemory?: string;
  placement?: PlacementMode;
  offloadFolder?: string;
  replicas?: number;
  int8GroupSize?: number;
  int8Threshold?: number;
  kvDtype?: KVDType;
}

/** --model, --dtype (and its int8 options), --threads, and the deployment strategy's options. */
export function addModelOptions(command: Command, options: { modelRequired?: boolean } = {}): Command {
  const model = new Option("-m, --model <ref>", "checkpoint folder (or Hugging Face id org/name[@revision])");
  if (options.modelRequired ?? true) model.makeOptionMandatory();
  return command
    .addOption(model)
    .addOption(new Option("--dtype <dtype>", "in-memory weight format (int8: group-wise int8; int8-mixed: LLM.int8 with fp32 outliers)").choices(dtypeChoices).default("auto"))
    .option("--threads <n>", "compute threads (default: physical cores)", parseInteger("--threads", 1, 1024))
    .option("--int8-group-size <n>", `--dtype int8: inputs per weight scale (multiple of 32; default ${defaultGroupSize})`, parseInteger("--int8-group-size", 32))
    .option("--int8-threshold <t>", "--dtype int8-mixed: |activation| from which a feature is computed in fp32 (default 6; 0 turns the decomposition off)", parseNumber("--int8-threshold", 0))
    .addOption(new Option("--kv-dtype <dtype>", "how the KV cache stores keys and values (fp16/bf16: half the memory; default fp32)").choices([...kvDtypes]))
    .addOption(new Option("--strategy <name>", "deployment strategy").choices([...strategies]).default("single"))
    .option("--max-memory <budgets>", "pipeline: per-device budgets, e.g. 0:2GiB,1:2GiB,cpu:4GiB,disk")
    .addOption(new Option("--placement <mode>", "pipeline: how layers are spread (Accelerate's device_map modes; default auto)").choices([...placementModes]))
    .option("--offload-folder <dir>", "pipeline: where offloaded weights converted to --dtype are written")
    .option("--replicas <n>", "replicas: engine workers sharing one copy of the weights (default 2)", parseInteger("--replicas", 1, 64));
}

/** Loads the model the CLI options name, reporting strategy "auto"'s choice on stderr. */
export async function loadModelForCli(o: ModelCliOptions, extra: LoadModelOptions = {}): Promise<Model> {
  const model = await loadModel(o.model, { ...modelOptionsFromCli(o), ...extra });
  const ranks = mpiWorldSize();
  if (ranks > 1 && o.strategy !== "tensor" && o.strategy !== "auto" && mpiRank() === 0) {
    process.stderr.write(`blossom: launched by mpirun with ${ranks} ranks, but --strategy ${o.strategy} runs the whole job on every rank (--strategy tensor splits it)\n`);
  }
  if (o.strategy === "tensor" && (model.info.tensorParallel?.size ?? 1) === 1) {
    process.stderr.write("blossom: --strategy tensor on 1 rank: launch it with mpirun -np N to split every layer over N processes\n");
  }
  const c = model.strategyChoice;
  if (c) process.stderr.write(`strategy auto: ${c.strategy}${c.replicas ? ` (${c.replicas} replicas)` : ""}${c.maxMemory ? ` (--max-memory ${c.maxMemory})` : ""}: ${c.reason}\n`);
  return model;
}

/** loadModel options from the shared CLI options. */
export function modelOptionsFromCli(o: ModelCliOptions): LoadModelOptions {
  return {
    dtype: o.dtype,
    strategy: o.strategy,
    ...(o.threads !== undefined ? { threads: o.threads } : {}),
    ...(o.maxMemory !== undefined ? { maxMemory: o.maxMemory } : {}),
    ...(o.placement !== undefined ? { placement: o.placement } : {}),
    ...(o.offloadFolder !== undefined ? { offloadFolder: o.offloadFolder } : {}),
    ...(o.replicas !== undefined ? { replicas: o.replicas } : {}),
    ...(o.int8GroupSize !== undefined ? { int8GroupSize: o.int8GroupSize } : {}),
    ...(o.int8Threshold !== undefined ? { int8Threshold: o.int8Threshold } : {}),
    ...(o.kvDtype !== undefined ? { kvDtype: o.kvDtype } : {}),
  };
}

export function collect(value: string, previous: string[] = []): string[] {
  return [...previous, value];
}
