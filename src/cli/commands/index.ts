import type { Command } from "commander";
import { registerBenchCommand } from "./bench.js";
import { registerHubCommands } from "./hub.js";
import { registerCreateRandomCommand } from "./create-random.js";
import { registerDemoCommand } from "./demo.js";
import { registerPlanCommand } from "./plan.js";
import { registerServeCommand } from "./serve.js";
import { registerChatCommand } from "./chat.js";
import { registerGenerateCommand } from "./generate.js";
import { registerPerplexityCommand } from "./perplexity.js";
import { registerQuantizeCommand } from "./quantize.js";

/** Each command module adds itself here. */
export function registerCommands(program: Command): void {
  registerGenerateCommand(program);
  registerPerplexityCommand(program);
  registerBenchCommand(program);
  registerHubCommands(program);
  registerCreateRandomCommand(program);
  registerDemoCommand(program);
  registerPlanCommand(program);
  registerServeCommand(program);
  registerChatCommand(program);
  registerQuantizeCommand(program);
}
