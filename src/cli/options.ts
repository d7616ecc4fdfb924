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

export const dtypeChoices: ModelDType[] = ["auto", "fp32", "bf16", "fp16"];

export interface ModelCliOptions {
  model: string;
  dtype: ModelDType;
  threads?: number;
}

/** --model, --dtype, --threads. */
export function addModelOptions(command: Command, options: { modelRequired?: boolean } = {}): Command {
  const model = new Option("-m, --model <ref>", "checkpoint folder (or Hugging Face id org/name[@revision])");
  if (options.modelRequired ?? true) model.makeOptionMandatory();
  return command
    .addOption(model)
    .addOption(new Option("--dtype <dtype>", "in-memory weight format").choices(dtypeChoices).default("auto"))
    .option("--threads <n>", "compute threads (default: physical cores)", parseInteger("--threads", 1, 1024));
}

export function collect(value: string, previous: string[] = []): string[] {
  return [...previous, value];
}
