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
