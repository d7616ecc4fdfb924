/**
 * text-generation-inference's API, so its clients (the `text_generation` Python client,
 * huggingface_hub's InferenceClient, LangChain...) work unchanged:
 *   POST /generate          {inputs, parameters} -> {generated_text, details?}
 *   POST /generate_stream   the same, as server-sent events: one per token, the last with generated_text and details
 *   POST /                  {inputs, parameters, stream} -> [{generated_text}] or the event stream
 *   POST /tokenize          {inputs} -> [{id, text, start, stop}] (start/stop in characters)
 * Shapes follow router/src/lib.rs and server.rs of huggingface/text-generation-inference.
 */
import type { FastifyInstance, FastifyReply } from "fastify";
import { z } from "zod";
import type { FinishReason } from "../../generate/stopping.js";
import type { GenerationParams } from "../../generate/params.js";
import type { Model } from "../../model.js";
import type { ServerContext } from "../context.js";
import { clientClosed, errorBody, HttpError, validationError } from "../http-error.js";
import { asksForSampling, checkMaxNewTokens, checkStops, checkText, checkTokenCount, defaultMaxNewTokens, drawSeed, preparePrompt, promptLogprobs, resolveParams, type Prompt } from "../limits.js";
import { cancelOnDisconnect, SseStream } from "../sse.js";
import { fromLibraryError, type GeneratedToken, type SequenceResult } from "../service.js";
import { parseBody } from "../validate.js";

const optional = <T extends z.ZodType>(schema: T) => schema.nullable().optional();
const unsupported = (what: string) => ({ error: `is not supported (${what}); omit it or send null` });

export const tgiParametersSchema = z.strictObject({
  best_of: optional(z.int().min(1)),
  decoder_input_details: z.boolean().optional(),
  details: z.boolean().optional(),
  do_sample: z.boolean().optional(),
  frequency_penalty: optional(z.number().min(-2).max(2)),
  grammar: z.null(unsupported("grammar-constrained decoding")).optional(),
  adapter_id: z.null(unsupported("adapters")).optional(),
  max_new_tokens: optional(z.int().min(1)),
  repetition_penalty: optional(z.number().gt(0)),
  return_full_text: optional(z.boolean()),
  seed: optional(z.int().min(0)),
  stop: z.array(z.string()).optional(),
  temperature: optional(z.number().gt(0)),
  top_k: optional(z.int().min(1)),
  top_n_tokens: optional(z.int().min(0)),
  top_p: optional(z.number().gt(0).lte(1)),
  truncate: optional(z.int().min(1)),
  typical_p: optional(z.number().gt(0).lte(1)),
  watermark: z.boolean().optional(),
  // Blossom's additions, with transformers' names.
  min_new_tokens: optional(z.int().min(0)),
  no_repeat_ngram_size: optional(z.int().min(0)),
});
export type TgiParameters = z.output<typeof tgiParametersSchema>;

// `model` is accepted and ignored, as TGI does (one model is served; older Hugging Face clients send it).
const generateSchema = z.strictObject({ inputs: z.string(), parameters: tgiParametersSchema.optional(), model: optional(z.string()) });
const compatSchema = z.strictObject({ inputs: z.string(), parameters: tgiParametersSchema.optional(), stream: z.boolean().optional(), model: optional(z.string()) });
const tokenizeSchema = z.strictObject({ inputs: z.string(), parameters: tgiParametersSchema.optional(), model: optional(z.string()) });

interface TgiRequest {
  prompt: Prompt;
  params: GenerationParams;
  /** The seed reported in details: the one used when sampling, null for greedy. */
  seed: number | null;
  details: boolean;
  decoderInputDetails: boolean;
  /** What return_full_text puts before the output: the inputs as sent (as TGI does), even when truncated. */
  fullTextPrefix: string;
}

/** TGI defaults max_new_tokens to 100 when a request gives none. */
const tgiDefaultMaxNewTokens = 100;

async function prepare(context: ServerContext, model: Model, inputs: string, p: TgiParameters = {}): Promise<TgiRequest> {
  const limits = context.limits(model);
  if (p.best_of != null && p.best_of > 1) throw validationError("parameters.best_of", `only 1 is supported (got ${p.best_of})`);
  if (p.frequency_penalty != null && p.frequency_penalty !== 0) throw validationError("parameters.frequency_penalty", `is not supported; use repetition_penalty (got ${p.frequency_penalty})`);
  if (p.watermark) throw validationError("parameters.watermark", "is not supported (got true)");
  if (p.top_n_tokens != null && p.top_n_tokens > 0) throw validationError("parameters.top_n_tokens", `is not supported (got ${p.top_n_tokens})`);
  const stop = p.stop ?? [];
  checkStops("parameters.stop", stop, limits);
  const prompt = await preparePrompt(model, inputs, "inputs", limits, p.truncate != null ? { tokens: p.truncate, field: "parameters.truncate" } : undefined);
  const maxNewTokens = p.max_new_tokens ?? defaultMaxNewTokens(limits, prompt.ids.length, tgiDefaultMaxNewTokens);
  checkMaxNewTokens("parameters.max_new_tokens", maxNewTokens, prompt.ids.length, limits, "inputs");
  if (p.min_new_tokens != null && p.min_new_tokens > maxNewTokens) {
    throw validationError("parameters.min_new_tokens", `must be <= max_new_tokens (${maxNewTokens}) (got ${p.min_new_tokens})`);
  }
  // As TGI's NextTokenChooser: any warper turns sampling on.
  const doSample = (p.do_sample ?? false) || asksForSampling(p);
  const seed = doSample ? (p.seed ?? drawSeed()) : null;
  const params = resolveParams(
    {
      maxNewTokens,
      doSample,
      stop,
      ...(p.min_new_tokens != null ? { minNewTokens: p.min_new_tokens } : {}),
      ...(p.temperature != null ? { temperature: p.temperature } : {}),
      ...(p.top_k != null ? { topK: p.top_k } : {}),
      ...(p.top_p != null ? { topP: p.top_p } : {}),
      ...(p.typical_p != null ? { typicalP: p.typical_p } : {}),
      ...(p.repetition_penalty != null ? { repetitionPenalty: p.repetition_penalty } : {}),
      ...(p.no_repeat_ngram_size != null ? { noRepeatNgramSize: p.no_repeat_ngram_size } : {}),
      ...(seed !== null ? { seed } : {}),
    },
    {
      maxNewTokens: "parameters.max_new_tokens",
      minNewTokens: "parameters.min_new_tokens",
      temperature: "parameters.temperature",
      topK: "parameters.top_k",
      topP: "parameters.top_p",
      typicalP: "parameters.typical_p",
      repetitionPenalty: "parameters.repetition_penalty",
      noRepeatNgramSize: "parameters.no_repeat_ngram_size",
      stop: "parameters.stop",
      seed: "parameters.seed",
    },
  );
  return {
    prompt,
    params,
    seed,
    details: p.details ?? false,
    decoderInputDetails: p.decoder_input_details ?? false,
    fullTextPrefix: p.return_full_text ? inputs : "",
  };
}

/**
 * A token as TGI reports it. In `details` its text is the token's own (TGI's decode_token: a
 * character split across tokens comes whole with its last token); in a stream event it is what
 * the token released to the output, so the events' texts add up to generated_text, with stop
 * strings cut. Special tokens show their own text (clients skip them by the flag).
 */
function tgiToken(model: Model, t: GeneratedToken, text: "own" | "released") {
  return { id: t.id, text: t.special ? (model.tokenizer.idToToken(t.id) ?? "") : text === "own" ? t.tokenText : t.text, logprob: t.logprob, special: t.special };
}

async function prefillDetails(model: Model, ids: number[], signal: AbortSignal) {
  const logprobs = await promptLogprobs(model, ids, signal);
  // TGI reports the first prompt token with a NaN logprob, which JSON carries as null.
  return ids.map((id, i) => ({ id, text: model.tokenizer.decode([id], { skipSpecialTokens: false }), logprob: logprobs[i] ?? null }));
}

function finishReasonOf(result: SequenceResult): FinishReason {
  if (result.finishReason === "cancelled") {
    throw result.cancelledBy === "shutdown"
      ? new HttpError("unavailable", "the server is shutting down; this generation was cancelled before it finished")
      : new HttpError("generation", "the generation was cancelled before it finished");
  }
  return result.finishReason;
}

async function generate(context: ServerContext, reply: FastifyReply, inputs: string, p: TgiParameters | undefined) {
  const model = context.service.readyModel();
  const request = await prepare(context, model, inputs, p);
  const started = performance.now();
  const { controller, release } = context.service.admit(1);
  cancelOnDisconnect(reply, controller);
  try {
    const prefill = request.decoderInputDetails ? await prefillDetails(model, request.prompt.ids, controller.signal) : [];
    const result = await context.service.run({ promptIds: request.prompt.ids, params: request.params, signal: controller.signal });
    if (result.cancelledBy === "client") throw clientClosed();
    const finishReason = finishReasonOf(result);
    reply.header("x-compute-type", "cpu");
    reply.header("x-prompt-tokens", String(request.prompt.ids.length));
    reply.header("x-generated-tokens", String(result.tokens.length));
    reply.header("x-total-time", String(Math.round(performance.now() - started)));
    return {
      generated_text: request.fullTextPrefix + result.text,
      ...(request.details || request.decoderInputDetails
        ? {
            details: {
              finish_reason: finishReason,
              generated_tokens: result.tokens.length,
              seed: request.seed,
              prefill,
              tokens: result.tokens.map((t) => tgiToken(model, t, "own")),
            },
          }
        : {}),
    };
  } finally {
    release();
  }
}

async function generateStream(context: ServerContext, reply: FastifyReply, inputs: string, p: TgiParameters | undefined): Promise<void> {
  const model = context.service.readyModel();
  if (p?.decoder_input_details) throw validationError("parameters.decoder_input_details", "true is not supported when streaming tokens");
  const request = await prepare(context, model, inputs, p);
  const { controller, release } = context.service.admit(1);
  cancelOnDisconnect(reply, controller);
  const sse = new SseStream(reply, "data:", { "x-compute-type": "cpu", "x-prompt-tokens": String(request.prompt.ids.length) });
  let index = 0;
  let generated = "";
  try {
    const result = await context.service.run({
      promptIds: request.prompt.ids,
      params: request.params,
      signal: controller.signal,
      onToken: (token, finish) => {
        index++;
        generated += token.text;
        const last = finish !== undefined && finish !== "cancelled";
        sse.send({
          index,
          token: tgiToken(model, token, "released"),
          generated_text: last ? request.fullTextPrefix + generated : null,
          details: last && request.details ? { finish_reason: finish, generated_tokens: index, seed: request.seed, input_length: request.prompt.ids.length } : null,
        });
      },
    });
    if (result.finishReason === "cancelled" && result.cancelledBy !== "client") {
      const err =
        result.cancelledBy === "shutdown"
          ? new HttpError("unavailable", "the server is shutting down; this generation was cancelled before it finished")
          : new HttpError("generation", "the generation was cancelled before it finished");
      sse.send(errorBody(err, "tgi"));
    }
  } catch (err) {
    // Headers are gone: errors now travel as an event, as TGI sends them.
    const known = fromLibraryError(err);
    sse.send(errorBody(known ?? new HttpError("generation", "generation failed (see the server log)"), "tgi"));
    if (!known) reply.log.error({ err }, "generation failed while streaming");
  } finally {
    release();
    sse.end();
  }
}

export function registerTgiRoutes(app: FastifyInstance, context: ServerContext): void {
  const config = { family: "tgi" as const };

  app.post("/generate", { config }, async (req, reply) => {
    const body = parseBody(generateSchema, req.body);
    return generate(context, reply, body.inputs, body.parameters);
  });

  app.post("/generate_stream", { config }, async (req, reply) => {
    const body = parseBody(generateSchema, req.body);
    await generateStream(context, reply, body.inputs, body.parameters);
  });

  // TGI's compatibility route (the Inference API's shape): a list with one result, or a stream.
  app.post("/", { config }, async (req, reply) => {
    const body = parseBody(compatSchema, req.body);
    // TGI's compat route returns the full text unless told otherwise, for a text-generation model
    // (what /info reports): Hugging Face's clients post here and expect the prompt included.
    if (body.parameters?.return_full_text == null) body.parameters = { ...body.parameters, return_full_text: true };
    if (body.stream) return generateStream(context, reply, body.inputs, body.parameters);
    return [await generate(context, reply, body.inputs, body.parameters)];
  });

  app.post("/tokenize", { config }, async (req) => {
    const body = parseBody(tokenizeSchema, req.body);
    const model = context.service.readyModel();
    if (body.inputs.length === 0) throw validationError("inputs", "must not be empty");
    const limits = context.limits(model);
    await checkText(model, body.inputs, "inputs", limits);
    const { ids, offsets } = await model.tokenizer.encodeWithOffsets(body.inputs);
    checkTokenCount(ids.length, "inputs", limits);
    // Offsets count characters (code points), as TGI's do; slice by code point, not UTF-16 unit.
    const chars = Array.from(body.inputs);
    return ids.map((id, i) => {
      const [start, stop] = offsets[i]!;
      return { id, text: chars.slice(start, stop).join(""), start, stop };
    });
  });
}
