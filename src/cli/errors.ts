/** How the CLI words an error: library parameter names become the options a user typed. */
import { CommanderError } from "commander";
import { BlossomError } from "../errors.js";

/** The flag a library parameter is set by: maxNewTokens -> --max-new-tokens. */
export function flagName(parameter: string): string {
  return `--${parameter.replace(/[A-Z]/g, (c) => "-" + c.toLowerCase())}`;
}

/**
 * One line for the user: a BlossomError's message (a parameter's name as its flag); a command-line
 * or system error's message (a missing file, a busy port) without a stack; anything else is a bug
 * and keeps its stack for the report.
 */
export function cliErrorMessage(err: unknown): string {
  if (err instanceof BlossomError) {
    if (err.code !== "parameter") return err.message;
    // The parameter the message is about (also "stop[0]"), and generation parameters it refers to ("<= maxNewTokens (3)").
    return err.message
      .replace(/^([a-z][A-Za-z0-9]*)((?:\[\d+\])?):/, (_, name: string, index: string) => `${flagName(name)}${index}:`)
      .replace(/\b(maxNewTokens|minNewTokens|topK|topP|typicalP|repetitionPenalty|noRepeatNgramSize)\b/g, (name: string) => flagName(name));
  }
  if (err instanceof CommanderError) return err.message.replace(/^error: /, "");
  const e = err as NodeJS.ErrnoException | undefined;
  if (e instanceof Error && typeof e.code === "string" && typeof e.syscall === "string") return e.message;
  return err instanceof Error ? (err.stack ?? err.message) : String(err);
}
