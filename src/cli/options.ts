/** Options shared by commands, and strict parsers that name the option at fault. */
import { InvalidArgumentError, Option, type Command } from "commander";
import type { ModelDType } from "../model.js";

export function parseInteger(name: string, min: number, max = Number.MAX_SAFE_INTEGER) {
  return (value: string): number => {
    const n = Number(value);
    if (!/^-?\d+$/.test(value.trim()) || !Number.isSafeInteger(n) || n < min || n > max) {
      throw new InvalidArgumentError(`${name} must be an integer from ${min}${max < Number.MAX_SAFE_INTEGER ? ` to ${max}` : " up"}, got "${value}"`);
    }
    return n;
  };
}

export function parseNumber(name: string) {
  return (value: string): number => {
    const n = Number(value);
    if (value.trim() === "" || !Number.isFinite(n)) throw new InvalidArgumentError(`${name} must be a number, got "${value}"`);
    return n;
  };
}

export const dtypeChoices: ModelDType[] = ["auto", "fp32", "bf16", "fp16", "int8", "int8-mixed"];

export interface ModelCliOptions {
  model: string;
  dtype: ModelDType;
  threads?: number;
  int8GroupSize?: number;
  int8Threshold?: number;
}

/** --model, --dtype, --threads, and the int8 options. */
export function addModelOptions(command: Command, options: { modelRequired?: boolean } = {}): Command {
  const model = new Option("-m, --model <ref>", "checkpoint folder (or Hugging Face id org/name[@revision])");
  if (options.modelRequired ?? true) model.makeOptionMandatory();
  return command
    .addOption(model)
    .addOption(new Option("--dtype <dtype>", "in-memory weight format (int8: group-wise int8; int8-mixed: LLM.int8 with fp32 outliers)").choices(dtypeChoices).default("auto"))
    .option("--threads <n>", "compute threads (default: physical cores)", parseInteger("--threads", 1, 1024))
    .option("--int8-group-size <n>", "--dtype int8: inputs per weight scale (multiple of 32; default 128)", parseInteger("--int8-group-size", 32))
    .option("--int8-threshold <t>", "--dtype int8-mixed: |activation| from which a feature is computed in fp32 (default 6)", parseNumber("--int8-threshold"));
}

/** The loadModel options the shared model flags stand for. */
export function modelLoadOptions(o: ModelCliOptions): { dtype: ModelDType; threads?: number; int8GroupSize?: number; int8Threshold?: number } {
  return {
    dtype: o.dtype,
    ...(o.threads !== undefined ? { threads: o.threads } : {}),
    ...(o.int8GroupSize !== undefined ? { int8GroupSize: o.int8GroupSize } : {}),
    ...(o.int8Threshold !== undefined ? { int8Threshold: o.int8Threshold } : {}),
  };
}

export function collect(value: string, previous: string[] = []): string[] {
  return [...previous, value];
}
