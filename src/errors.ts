/**
 * Errors Blossom raises on bad input. Every message names the file, tensor, field or parameter
 * at fault and what was expected, so a user can fix it without reading the source.
 */
export type ErrorCode =
  | "checkpoint" // a malformed or inconsistent checkpoint (config.json, safetensors, index)
  | "tokenizer" // tokenizer.json missing or unusable
  | "parameter" // an invalid generation or command parameter
  | "input" // invalid input ids, masks or prompts
  | "hub" // resolving or downloading from the Hugging Face Hub
  | "memory" // a memory budget cannot be met
  | "aborted" // the caller's AbortSignal fired
  | "internal";

export class BlossomError extends Error {
  readonly code: ErrorCode;
  constructor(code: ErrorCode, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = "BlossomError";
    this.code = code;
  }
}

export function checkpointError(file: string, message: string): BlossomError {
  return new BlossomError("checkpoint", `${file}: ${message}`);
}

export function parameterError(name: string, message: string): BlossomError {
  return new BlossomError("parameter", `${name}: ${message}`);
}

/** A value as an error message shows it: numbers as written (NaN, Infinity), strings quoted and cut at 40 characters. */
export function describeValue(value: unknown): string {
  if (typeof value === "number" || typeof value === "boolean" || typeof value === "bigint") return String(value);
  if (value === null || value === undefined) return String(value);
  if (typeof value === "string") return JSON.stringify(value.length > 40 ? `${value.slice(0, 40)}...` : value);
  if (Array.isArray(value)) return `an array of ${value.length}`;
  return typeof value === "object" ? "an object" : typeof value;
}

/**
 * `options` as an object whose every key is one of `names` (a misspelt option is refused, not
 * ignored); undefined is {}. `what` names the options in messages ("loadModel").
 */
export function knownOptions(options: unknown, names: Record<string, true>, what: string): Record<string, unknown> {
  if (options === undefined) return {};
  if (typeof options !== "object" || options === null || Array.isArray(options)) {
    throw parameterError("options", `expected an object of ${what} options (got ${describeValue(options)})`);
  }
  for (const name of Object.keys(options)) {
    if (!(name in names)) throw parameterError(name, `is not a ${what} option (expected one of: ${Object.keys(names).join(", ")})`);
  }
  return options as Record<string, unknown>;
}
