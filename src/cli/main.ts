#!/usr/bin/env node
/** `blossom <command>`: one entry point; each command lives in src/cli/commands/<name>.ts. */
import { Command } from "commander";
import { packageVersion } from "../version.js";
import { registerCommands } from "./commands/index.js";
import { cliErrorMessage } from "./errors.js";

const program = new Command();
program
  .name("blossom")
  .description("Fast inference of BLOOM-family language models on Node.js")
  .version(packageVersion())
  .showHelpAfterError();
registerCommands(program);

program.parseAsync(process.argv).catch((err: unknown) => {
  process.stderr.write(`blossom: ${cliErrorMessage(err)}\n`);
  process.exitCode = 1;
});
