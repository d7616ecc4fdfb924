/**
 * Generation parameters: the library API's camelCase names, their defaults, and validation.
 * The meaning of each field follows Hugging Face transformers' GenerationConfig (max_new_tokens,
 * min_new_tokens, do_sample, temperature, top_k, top_p, typical_p, repetition_penalty,
 * no_repeat_ngram_size) and text-generation-inference's `stop` and `seed`.
 */
import { z } from "zod";
import { parameterError, describeValue } from "../errors.js";

export interface GenerationParams {
  /** Tokens to generate at most. */
  maxNewTokens: number;
  /** EOS is suppressed until this many tokens have been generated. */
  minNewTokens: number;
  /** Sample from the warped distribution; false picks the most likely token (greedy). */
  doSample: boolean;
  /** Divides the logits before sampling; 0 with doSample means greedy. */
  temperature: number;
  /** Keep only the k most likely tokens (0: off). */
  topK: number;
  /** Keep the smallest set of most likely tokens whose probability reaches topP (1: off). */
  topP: number;
  /** Locally typical sampling mass (1: off). */
  typicalP: number;
  /** CTRL-style penalty on every token already in the sequence, prompt included (1: off). */
  repetitionPenalty: number;
  /** Never repeat an n-gram of this size already in the sequence (0: off). */
  noRepeatNgramSize: number;
  /** Stop when the generated text contains one of these; the stop string itself is not returned. */
  stop: string[];
  /** Seed for sampling; undefined draws one from crypto. */
  seed: number | undefined;
}

/** What the library API accepts: any subset of the parameters, plus an AbortSignal for the call. */
export type GenerationParamsInput = Partial<GenerationParams> & { signal?: AbortSignal };

export const defaultGenerationParams: GenerationParams = Object.freeze({
  maxNewTokens: 20,
  minNewTokens: 0,
  doSample: false,
  temperature: 1,
  topK: 0,
  topP: 1,
  typicalP: 1,
  repetitionPenalty: 1,
  noRepeatNgramSize: 0,
  stop: Object.freeze([]) as unknown as string[],
  seed: undefined,
});

/**
 * Stop strings are matched on every decoded token, and the matcher holds back up to the longest one's
 * length, so both are bounded: 16 strings of up to 256 UTF-16 code units is far more than any real use
 * (OpenAI allows 4 stop strings, text-generation-inference 4 by default).
 */
export const maxStopStrings = 16;
export const maxStopStringLength = 256;

// zod v4's z.number() already rejects NaN and +/-Infinity, and .int() also requires a safe integer.
const integer = z.number().int();
const probability = z.number().gt(0).lte(1);
const loneSurrogate = /[\uD800-\uDBFF](?![\uDC00-\uDFFF])|(?<![\uD800-\uDBFF])[\uDC00-\uDFFF]/;

/** Whether text holds a UTF-16 surrogate without its pair (not a character: UTF-8 cannot encode it). */
export function hasLoneSurrogate(text: string): boolean {
  return loneSurrogate.test(text);
}
const stopString = z
  .string()
  .min(1)
  .max(maxStopStringLength)
  .refine((text) => !loneSurrogate.test(text));

const inputSchema = z.strictObject({
  maxNewTokens: integer.min(1).optional(),
  minNewTokens: integer.min(0).optional(),
  doSample: z.boolean().optional(),
  temperature: z.number().min(0).optional(),
  topK: integer.min(0).optional(),
  topP: probability.optional(),
  typicalP: probability.optional(),
  repetitionPenalty: z.number().gt(0).optional(),
  noRepeatNgramSize: integer.min(0).optional(),
  stop: z.array(stopString).max(maxStopStrings).optional(),
  seed: integer.min(0).optional(),
  signal: z.instanceof(AbortSignal).optional(),
});

/** What each field must be, as error messages say it. */
const expectations: Record<keyof GenerationParams, string> = {
  maxNewTokens: "must be an integer >= 1",
  minNewTokens: "must be an integer >= 0",
  doSample: "must be a boolean",
  temperature: "must be a finite number >= 0",
  topK: "must be an integer >= 0 (0 turns top-k off)",
  topP: "must be a number in (0, 1] (1 turns top-p off)",
  typicalP: "must be a number in (0, 1] (1 turns typical sampling off)",
  repetitionPenalty: "must be a finite number > 0 (1 turns the penalty off)",
  noRepeatNgramSize: "must be an integer >= 0 (0 turns it off)",
  stop: `must be an array of at most ${maxStopStrings} strings`,
  seed: "must be a safe integer >= 0",
};
const stopStringExpectation = `must be a non-empty, well-formed string of at most ${maxStopStringLength} characters`;
type FieldName = keyof GenerationParams;
const fieldNames = Object.keys(expectations) as FieldName[];

/**
 * Validates the library API's parameters and fills in defaults. Throws a BlossomError ("parameter") whose
 * message starts with the camelCase field name, says what was expected and shows what was given, e.g.
 * "temperature: must be a finite number >= 0 (got -1)". A field given as undefined takes its default.
 * `limits.maxNewTokens` caps maxNewTokens (a server's configured maximum). `signal` is accepted and dropped.
 */
export function resolveGenerationParams(input: unknown, limits: { maxNewTokens?: number } = {}): GenerationParams {
  if (input === undefined) input = {};
  if (typeof input !== "object" || input === null || Array.isArray(input)) {
    throw parameterError("generation parameters", `must be an object (got ${describeValue(input)})`);
  }
  const record = input as Record<string, unknown>;
  const parsed = inputSchema.safeParse(record);
  if (!parsed.success) throw issueToError(parsed.error.issues[0]!, record);

  const values = parsed.data;
  const params: GenerationParams = { ...defaultGenerationParams, stop: [] };
  for (const name of fieldNames) {
    const value = values[name];
    if (value !== undefined) (params as unknown as Record<string, unknown>)[name] = value;
  }
  params.stop = [...params.stop];

  const limit = limits.maxNewTokens;
  if (limit !== undefined && params.maxNewTokens > limit) {
    throw parameterError("maxNewTokens", `must be an integer >= 1 and <= ${limit} (got ${params.maxNewTokens})`);
  }
  if (params.minNewTokens > params.maxNewTokens) {
    throw parameterError(
      "minNewTokens",
      `must be an integer >= 0 and <= maxNewTokens (${params.maxNewTokens}) (got ${params.minNewTokens})`,
    );
  }
  return params;
}

function issueToError(issue: z.core.$ZodIssue, input: Record<string, unknown>) {
  if (issue.code === "unrecognized_keys") {
    const known = [...fieldNames, "signal"].join(", ");
    return parameterError(issue.keys[0]!, `is not a generation parameter (expected one of: ${known})`);
  }
  const [field, index] = issue.path;
  if (field === "signal") return parameterError("signal", `must be an AbortSignal (got ${describeValue(input.signal)})`);
  const name = String(field) as FieldName;
  const value = input[name];
  if (name === "stop" && typeof index === "number" && Array.isArray(value)) {
    return parameterError(`stop[${index}]`, `${stopStringExpectation} (got ${describeValue(value[index])})`);
  }
  return parameterError(name, `${expectations[name]} (got ${describeValue(value)})`);
}

