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
    process.stderr.write(`blossom: ${err.message}\n`);
  } else {
    process.stderr.write(`blossom: ${err instanceof Error ? (err.stack ?? err.message) : String(err)}\n`);
  }
  process.exitCode = 1;
});
