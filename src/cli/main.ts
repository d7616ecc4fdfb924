#!/usr/bin/env node
/** `blossom <command>`: one entry point; each command lives in src/cli/commands/<name>.ts. */
import { Command } from "commander";
import { BlossomError } from "../errors.js";
import { packageVersion } from "../version.js";
import { registerCommands } from "./commands/index.js";

const program = new Command();
program
  .name("blossom")
  .description("Fast inference of BLOOM-family language models on Node.js")
  .version(packageVersion())
  .showHelpAfterError();
registerCommands(program);

program.parseAsync(process.argv).catch((err: unknown) => {
  if (err instanceof BlossomError) {
    // Library parameter names (maxNewTokens) become the options a CLI user typed (--max-new-tokens).
    const message =
      err.code === "parameter" ? err.message.replace(/^([a-z][A-Za-z0-9]*):/, (_, name: string) => `--${name.replace(/[A-Z]/g, (c) => "-" + c.toLowerCase())}:`) : err.message;
    process.stderr.write(`blossom: ${message}\n`);
  } else {
    process.stderr.write(`blossom: ${err instanceof Error ? (err.stack ?? err.message) : String(err)}\n`);
  }
  process.exitCode = 1;
});
