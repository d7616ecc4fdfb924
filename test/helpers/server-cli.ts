/**
 * `blossom serve` and `blossom chat` as a process the tests can spawn, signal and pipe into,
 * without depending on how src/cli/commands/index.ts wires commands.
 * Usage: node dist/test/helpers/server-cli.js serve|chat [options]
 */
import { Command } from "commander";
import { BlossomError } from "../../src/errors.js";
import { registerChatCommand } from "../../src/cli/commands/chat.js";
import { registerServeCommand } from "../../src/cli/commands/serve.js";

const program = new Command().name("blossom").exitOverride();
registerServeCommand(program);
registerChatCommand(program);
program.parseAsync(process.argv).catch((err: unknown) => {
  if ((err as { code?: string }).code?.startsWith("commander.")) {
    process.exitCode = (err as { exitCode?: number }).exitCode ?? 1;
    return;
  }
  process.stderr.write(`blossom: ${err instanceof BlossomError ? err.message : ((err as Error).stack ?? String(err))}\n`);
  process.exitCode = 1;
});
