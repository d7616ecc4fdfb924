/**
 * The original BLOOM inference server's endpoints (huggingface/transformers-bloom-inference,
 * inference_server/server.py and utils/requests.py), so its clients work unchanged:
 *   POST /generate/  {text: [...], max_new_tokens, min_length, do_sample, ...} -> {text, num_generated_tokens, query_id, total_time_taken}
 *   POST /tokenize/  {text: [...], padding?}  -> {token_ids, query_id, total_time_taken}
 *   POST /forward/   {conditioning_text: [...], response: [...]} -> {nll, query_id, total_time_taken}
 *   GET  /query_id/  -> {generate_query_id, tokenize_query_id, forward_query_id}
 * Differences, on purpose: bad input is a 400 naming the field (the original answered 500 to
 * everything), and max_new_tokens above --allowed-max-new-tokens is refused, not silently cut.
 */
import type { FastifyInstance, FastifyRequest } from "fastify";
import { z } from "zod";
import type { Model } from "../../model.js";
import { maxStopStringLength, maxStopStrings } from "../../generate/params.js";
import { padLeft } from "../../tokenizer/tokenizer.js";
import type { ServerContext } from "../context.js";
import { clientClosed, HttpError, validationError } from "../http-error.js";
import { checkMaxNewTokens, checkStops, checkText, checkTokenCount, defaultMaxNewTokens, preparePrompt, resolveParams } from "../limits.js";
import { CancelReason, scoreFor } from "../service.js";
import { cancelOnDisconnect } from "../sse.js";
import { parseBody } from "../validate.js";

const optional = <T extends z.ZodType>(schema: T) => schema.nullable().optional();
const onlyNull = (what: string) => z.null({ error: `is not supported (${what}); omit it or send null` }).optional();
const texts = z.array(z.string()).min(1);

/** The fields of the original GenerateRequest; those that only steer beam search are accepted and, as in transformers without beams, have no effect. */
const generateSchema = z.strictObject({
  text: texts,
  min_length: optional(z.int().min(0)),
  do_sample: optional(z.boolean()),
  early_stopping: optional(z.boolean()),
  temperature: optional(z.number().min(0)),
  top_k: optional(z.int().min(0)),
  top_p: optional(z.number().gt(0).lte(1)),
  typical_p: optional(z.number().gt(0).lte(1)),
  repetition_penalty: optional(z.number().gt(0)),
  bos_token_id: optional(z.int().min(0)),
  pad_token_id: optional(z.int().min(0)),
  eos_token_id: optional(z.int().min(0)),
  length_penalty: optional(z.number()),
  no_repeat_ngram_size: optional(z.int().min(0)),
  encoder_no_repeat_ngram_size: optional(z.int().min(0)),
  max_time: optional(z.number().gt(0)),
  max_new_tokens: optional(z.int().min(1)),
  decoder_start_token_id: onlyNull("encoder-decoder models only"),
  diversity_penalty: optional(z.number()),
  forced_bos_token_id: onlyNull("forced tokens"),
  forced_eos_token_id: onlyNull("forced tokens"),
  exponential_decay_length_penalty: onlyNull("length penalty schedules"),
  num_return_sequences: optional(z.int().min(1)),
  remove_input_from_output: optional(z.boolean()),
  // Fields of the earlier bloom-inference-server's request.
  num_beams: optional(z.int().min(1)),
  num_beam_groups: optional(z.int().min(1)),
  max_input_length: optional(z.int().min(1)),
  stop_sequences: optional(z.array(z.string())),
  method: optional(z.literal("generate")),
});

const tokenizeSchema = z.strictObject({ text: texts, padding: optional(z.boolean()), method: optional(z.literal("tokenize")) });
const forwardSchema = z.strictObject({ conditioning_text: texts, response: texts });

/** The original defaulted max_new_tokens to the allowed maximum (100 there); here at most 100. */
const originalDefaultMaxNewTokens = 100;

function seconds(started: number): string {
  return `${((performance.now() - started) / 1000).toFixed(2)} secs`;
}

export function registerOriginalRoutes(app: FastifyInstance, context: ServerContext): void {
  const config = { family: "original" as const };
  const queryIds = { generate: 0, tokenize: 0, forward: 0 };
  // Every request gets its query id on arrival, as in the original, so even an unparsable body's error carries one.
  const countAs = (kind: keyof typeof queryIds) => ({
    config,
    onRequest: async (req: FastifyRequest) => {
      req.queryId = queryIds[kind]++;
    },
  });

  app.get("/query_id/", { config }, async () => ({
    generate_query_id: queryIds.generate,
    tokenize_query_id: queryIds.tokenize,
    forward_query_id: queryIds.forward,
  }));

  app.post("/generate/", countAs("generate"), async (req, reply) => {
    const started = performance.now();
    const body = parseBody(generateSchema, req.body);
    const model = context.service.readyModel();
    const limits = context.limits(model);
    if (body.text.length > limits.maxBatchSize) throw validationError("text", `must have at most ${limits.maxBatchSize} prompts (max batch size); got ${body.text.length}`);
    if (body.num_return_sequences != null && body.num_return_sequences !== 1) throw validationError("num_return_sequences", `only 1 is supported (got ${body.num_return_sequences})`);
    if (body.encoder_no_repeat_ngram_size) throw validationError("encoder_no_repeat_ngram_size", "only applies to encoder-decoder models; send 0");
    const eos = model.tokenizer.eosTokenId;
    if (body.eos_token_id != null && body.eos_token_id !== eos) throw validationError("eos_token_id", `only the model's own (${eos}) is supported (got ${body.eos_token_id})`);

    if (body.num_beams != null && body.num_beams > 1) throw validationError("num_beams", `beam search is not supported; send 1 (got ${body.num_beams})`);
    if (body.num_beam_groups != null && body.num_beam_groups > 1) throw validationError("num_beam_groups", `beam search is not supported; send 1 (got ${body.num_beam_groups})`);
    // The earlier server's stop_sequences: each, stripped, also matched after a space.
    checkStops("stop_sequences", body.stop_sequences ?? [], limits);
    (body.stop_sequences ?? []).forEach((s, i) => {
      if (s.trim() === "") throw validationError(`stop_sequences[${i}]`, "must not be only whitespace (stop sequences are matched stripped)");
    });
    // The spaced form only decides whether the space before a stop is cut too; at the longest
    // allowed length it would be one character too long, and the stripped form still stops there.
    // (and only while the doubled list stays within the library's stop-string limit: the client's
    // count is what --max-stop-sequences checks).
    const spaced = 2 * (body.stop_sequences ?? []).length <= maxStopStrings;
    const stop = (body.stop_sequences ?? []).flatMap((s) => (spaced && s.trim().length < maxStopStringLength ? [s.trim(), ` ${s.trim()}`] : [s.trim()]));
    if (body.pad_token_id != null && body.pad_token_id >= model.config.vocabSize) {
      throw validationError("pad_token_id", `must be a token id in [0, ${model.config.vocabSize}) (got ${body.pad_token_id})`);
    }
    const inputLimits = body.max_input_length != null ? { ...limits, maxInputLength: Math.min(limits.maxInputLength, body.max_input_length) } : limits;
    const prompts = await Promise.all(body.text.map((t, i) => preparePrompt(model, t, `text[${i}]`, inputLimits)));
    // The original took temperature 0 for greedy.
    const doSample = (body.do_sample ?? false) && body.temperature !== 0;
    const params = prompts.map((p, i) => {
      const maxNewTokens = body.max_new_tokens ?? defaultMaxNewTokens(limits, p.ids.length, originalDefaultMaxNewTokens);
      checkMaxNewTokens("max_new_tokens", maxNewTokens, p.ids.length, limits, `text[${i}]`);
      // transformers' min_length counts the prompt too.
      const minNewTokens = Math.min(maxNewTokens, Math.max(0, (body.min_length ?? 0) - p.ids.length));
      return resolveParams(
        {
          maxNewTokens,
          minNewTokens,
          doSample,
          ...(doSample
            ? {
                temperature: body.temperature ?? 1,
                topK: body.top_k ?? 50,
                topP: body.top_p ?? 1,
                typicalP: body.typical_p ?? 1,
              }
            : {}),
          repetitionPenalty: body.repetition_penalty ?? 1,
          noRepeatNgramSize: body.no_repeat_ngram_size ?? 0,
          stop,
        },
        { temperature: "temperature", topK: "top_k", topP: "top_p", typicalP: "typical_p", repetitionPenalty: "repetition_penalty", noRepeatNgramSize: "no_repeat_ngram_size" },
      );
    });

    const { controller, release } = context.service.admit(prompts.length);
    cancelOnDisconnect(reply, controller);
    // max_time, as in transformers: stop generating after this many seconds and return what there is.
    // Timers hold at most 2^31 - 1 ms (24.8 days; more fires at once): a longer max_time is no deadline.
    const deadline = body.max_time != null && body.max_time * 1000 <= 2 ** 31 - 1 ? setTimeout(() => controller.abort(new CancelReason("deadline")), body.max_time * 1000) : undefined;
    try {
      const results = await Promise.all(prompts.map((p, i) => context.service.run({ promptIds: p.ids, params: params[i]!, signal: controller.signal })));
      if (results.some((r) => r.cancelledBy === "client")) throw clientClosed();
      if (results.some((r) => r.cancelledBy === "shutdown")) throw new HttpError("unavailable", "the server is shutting down; the generation was cancelled");
      const removeInput = body.remove_input_from_output ?? false;
      return {
        // The original decoded prompt + output with special tokens skipped; r.text is the output's text, stop string cut.
        text: results.map((r, i) => (removeInput ? r.text : model.tokenizer.decode(prompts[i]!.ids) + r.text)),
        num_generated_tokens: results.map((r) => r.tokens.length),
        is_encoder_decoder: false,
        method: "generate",
        query_id: req.queryId,
        total_time_taken: seconds(started),
      };
    } finally {
      clearTimeout(deadline);
      controller.abort();
      release();
    }
  });

  app.post("/tokenize/", countAs("tokenize"), async (req) => {
    const started = performance.now();
    const body = parseBody(tokenizeSchema, req.body);
    const model = context.service.readyModel();
    const limits = context.limits(model);
    await Promise.all(body.text.map((t, i) => checkText(model, t, `text[${i}]`, limits)));
    const ids = await Promise.all(body.text.map((t) => model.tokenizer.encode(t)));
    ids.forEach((row, i) => checkTokenCount(row.length, `text[${i}]`, limits));
    const padded = body.padding ? padLeft(ids, model.tokenizer.padTokenId ?? 0) : undefined;
    return {
      token_ids: padded ? padded.inputIds : ids,
      ...(padded ? { attention_mask: padded.attentionMask } : {}),
      is_encoder_decoder: false,
      method: "tokenize",
      query_id: req.queryId,
      total_time_taken: `${(performance.now() - started).toFixed(2)} msecs`,
    };
  });

  app.post("/forward/", countAs("forward"), async (req, reply) => {
    const started = performance.now();
    const body = parseBody(forwardSchema, req.body);
    const model = context.service.readyModel();
    const limits = context.limits(model);
    if (body.conditioning_text.length !== body.response.length) {
      throw validationError("response", `must have as many entries as conditioning_text (${body.conditioning_text.length}); got ${body.response.length}`);
    }
    if (body.response.length > limits.maxBatchSize) throw validationError("response", `must have at most ${limits.maxBatchSize} entries (max batch size); got ${body.response.length}`);
    // The cheap length check every route makes before tokenizing (megabytes take seconds).
    await Promise.all([
      ...body.conditioning_text.map((t, i) => checkText(model, t, `conditioning_text[${i}]`, limits)),
      ...body.response.map((t, i) => checkText(model, t, `response[${i}]`, limits)),
    ]);
    // Scored sequences count against --max-concurrent-requests like generated ones, and a client
    // that leaves stops the scoring of its remaining texts.
    const { controller, release } = context.service.admit(body.response.length);
    cancelOnDisconnect(reply, controller);
    try {
      const nll = await conditionalNll(model, body.conditioning_text, body.response, limits.maxInputLength, controller.signal);
      return { nll, is_encoder_decoder: false, query_id: req.queryId, total_time_taken: seconds(started) };
    } finally {
      controller.abort();
      release();
    }
  });
}

/**
 * The mean negative log-likelihood of the response tokens given their conditioning text, over all
 * response tokens of the batch: transformers' causal-LM loss with the conditioning labels set to
 * -100, which is what the original /forward/ returned.
 */
async function conditionalNll(model: Model, conditioning: string[], responses: string[], maxInputLength: number, signal: AbortSignal): Promise<number> {
  let total = 0;
  let count = 0;
  const rows = await Promise.all(
    conditioning.map(async (c, i) => {
      const conditioningIds = await model.tokenizer.encode(c);
      const responseIds = await model.tokenizer.encode(responses[i]!);
      if (responseIds.length === 0) throw validationError(`response[${i}]`, "must not be empty");
      const ids = [...conditioningIds, ...responseIds];
      if (ids.length > maxInputLength) {
        throw validationError(`response[${i}]`, `conditioning_text[${i}] + response[${i}] must have at most ${maxInputLength} tokens (--max-input-length); got ${ids.length}`);
      }
      // The first token has nothing to be predicted from; the loss starts at the second.
      return { ids, from: Math.max(1, conditioningIds.length) };
    }),
  );
  for (const row of rows) {
    // A client that leaves (or a shutdown) stops the scoring, the text in progress included.
    const logprobs = await scoreFor(signal, (s) => model.tokenLogprobs(row.ids, row.from, { signal: s }));
    for (const lp of logprobs) total -= lp;
    count += logprobs.length;
  }
  if (count === 0) throw validationError("response", "has no token that can be scored (a single-token response needs conditioning text)");
  return total / count;
}
