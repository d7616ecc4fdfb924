import type { Command } from "commander";
import { registerBenchCommand } from "./bench.js";
import { registerGenerateCommand } from "./generate.js";
import { registerPerplexityCommand } from "./perplexity.js";
import { registerQuantizeCommand } from "./quantize.js";

/** Each command module adds itself here. */
export function registerCommands(program: Command): void {
  registerGenerateCommand(program);
  registerPerplexityCommand(program);
  registerBenchCommand(program);
  registerQuantizeCommand(program);
}
