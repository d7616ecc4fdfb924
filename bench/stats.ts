/** Small helpers shared by the benchmark scripts. */
import { parseArgs, type ParseArgsConfig } from "node:util";
import { checkOutputFile } from "../src/cli/options.js";
import { BlossomError, parameterError } from "../src/errors.js";

/** The median (mean of the middle two for an even count). */
export function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
}

/** A monotonic clock in milliseconds. */
export function nowMs(): number {
  return Number(process.hrtime.bigint()) / 1e6;
}

type BenchArgsConfig = ParseArgsConfig & { options: NonNullable<ParseArgsConfig["options"]> };

/**
 * parseArgs for a benchmark script: `--help` lists its options (with defaults), and a mistyped or
 * unknown option ends the script with one line naming it and the list, not a stack trace.
 */
export function benchArgs<const T extends BenchArgsConfig>(command: string, file: string, config: T): ReturnType<typeof parseArgs<T>> {
  const usage = () => {
    const lines = Object.entries(config.options).map(([option, o]) => {
      const value = o.type === "string" ? " <value>" : "";
      const fallback = o.default !== undefined && o.type === "string" ? `  (default: ${String(o.default)})` : "";
      return `  --${option}${value}${fallback}`;
    });
    return `usage: ${command} [options] (each option is described at the top of bench/${file}.ts)\n${lines.join("\n")}\n`;
  };
  // A bad option value or an unusable model ends the script with one line, like an unknown option.
  if (process.listenerCount("uncaughtException") === 0) {
    process.on("uncaughtException", (err) => {
      if (err instanceof BlossomError) {
        process.stderr.write(`${file}: ${err.message}\n`);
        process.exit(2);
      }
      // Anything else is a bug: its stack, and the usual exit code.
      process.stderr.write(`${err?.stack ?? String(err)}\n`);
      process.exit(1);
    });
  }
  const argv = config.args ?? process.argv.slice(2);
  if (argv.includes("--help") || argv.includes("-h")) {
    process.stdout.write(usage());
    process.exit(0);
  }
  try {
    return parseArgs(config);
  } catch (err) {
    process.stderr.write(`${file}: ${(err as Error).message}\n${usage()}`);
    process.exit(2);
  }
}

/** An integer option's value (`undefined` when not given), refused by name below `min`. */
export function intOption(option: string, value: string | undefined, min: number): number | undefined {
  if (value === undefined) return undefined;
  const n = Number(value);
  if (value.trim() === "" || !Number.isInteger(n) || n < min) throw parameterError(option, `expected an integer >= ${min}, got ${JSON.stringify(value)}`);
  return n;
}

/** A --json (or other output) path checked before a long run rather than after it. */
export function outputOption(option: string, value: string | undefined): string | undefined {
  if (value !== undefined) checkOutputFile(value, option);
  return value;
}
