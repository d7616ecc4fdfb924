/**
 * OpenAI-compatible completions (https://platform.openai.com/docs/api-reference/completions):
 *   POST /v1/completions   {model, prompt, max_tokens, temperature, top_p, stop, stream, seed, echo, logprobs, ...}
 *   GET  /v1/models, /v1/models/{id}
 * Streaming sends text_completion chunks as server-sent events and ends with `data: [DONE]`.
 * Like vLLM, it also takes top_k, repetition_penalty, typical_p, min_tokens and
 * no_repeat_ngram_size. One model is served, so `model` is not checked against it (as
 * text-generation-inference's OpenAI routes do; vLLM answers 404): clients written for another
 * model name work unchanged. GET /v1/models/{id} does check it.
 */
import { randomBytes } from "node:crypto";
import type { FastifyInstance, FastifyReply } from "fastify";
import { z } from "zod";
import type { GenerationParams } from "../../generate/params.js";
import type { FinishReason } from "../../generate/stopping.js";
import type { Model } from "../../model.js";
import type { ServerContext } from "../context.js";
import { clientClosed, errorBody, HttpError, validationError } from "../http-error.js";
import { asksForSampling, checkMaxNewTokens, checkStops, defaultMaxNewTokens, preparePrompt, promptLogprobs, resolveParams, type Prompt } from "../limits.js";
import { fromLibraryError, type SequenceResult } from "../service.js";
import { cancelOnDisconnect, SseStream } from "../sse.js";
import { parseBody } from "../validate.js";

const optional = <T extends z.ZodType>(schema: T) => schema.nullable().optional();
const tokenIds = z.array(z.int().min(0));

const completionSchema = z.strictObject({
  model: optional(z.string()),
  prompt: z.union([z.string(), z.array(z.string()), tokenIds, z.array(tokenIds)], {
    error: "must be a string, an array of strings, an array of token ids, or an array of such arrays",
  }),
  max_tokens: optional(z.int().min(1)),
  temperature: optional(z.number().min(0).max(2)),
  top_p: optional(z.number().gt(0).lte(1)),
  n: optional(z.int().min(1)),
  best_of: optional(z.int().min(1)),
  stream: optional(z.boolean()),
  stream_options: optional(z.strictObject({ include_usage: z.boolean().optional() })),
  stop: optional(z.union([z.string(), z.array(z.string())], { error: "must be a string or an array of strings" })),
  seed: optional(z.int().min(0)),
  echo: optional(z.boolean()),
  logprobs: optional(z.int().min(0).max(5)),
  presence_penalty: optional(z.number().min(-2).max(2)),
  frequency_penalty: optional(z.number().min(-2).max(2)),
  logit_bias: optional(z.record(z.string(), z.number())),
  suffix: optional(z.string()),
  user: optional(z.string()),
  // Extensions, as vLLM offers them.
  top_k: optional(z.int().min(0)),
  typical_p: optional(z.number().gt(0).lte(1)),
  repetition_penalty: optional(z.number().gt(0)),
  min_tokens: optional(z.int().min(0)),
  no_repeat_ngram_size: optional(z.int().min(0)),
  // text-generation-inference's parameter names, which Hugging Face's own client (v4) sends here as
  // TGI's OpenAI route takes them: do_sample false is greedy, return_full_text is echo, truncate
  // keeps a prompt's last tokens, details have no place in a completion (ignored).
  do_sample: optional(z.boolean()),
  return_full_text: optional(z.boolean()),
  truncate: optional(z.int().min(1)),
  details: optional(z.boolean()),
  decoder_input_details: optional(z.boolean()),
  watermark: optional(z.boolean()),
  top_n_tokens: optional(z.int().min(0)),
});
type CompletionRequest = z.output<typeof completionSchema>;

/** The TGI names folded into their OpenAI meanings (see completionSchema). */
function withTgiNames(body: CompletionRequest): CompletionRequest {
  if (body.watermark) throw validationError("watermark", "is not supported");
  if (body.top_n_tokens) throw validationError("top_n_tokens", `is not supported; logprobs: 0 gives the chosen tokens' log-probabilities (got ${body.top_n_tokens})`);
  if (body.return_full_text != null && body.echo != null && body.return_full_text !== body.echo) {
    throw validationError("return_full_text", `says ${body.return_full_text} but echo says ${body.echo}; send one of them`);
  }
  // As TGI: do_sample false is greedy unless a warper asks for sampling (then it samples anyway).
  return {
    ...body,
    ...(body.return_full_text ? { echo: true } : {}),
    ...(body.do_sample === false && !asksForSampling(body) ? { temperature: 0 } : {}),
  };
}

/** OpenAI's default max_tokens for completions. */
const openaiDefaultMaxTokens = 16;

function openaiFinishReason(reason: FinishReason): "stop" | "length" {
  return reason === "length" ? "length" : "stop";
}

function promptList(prompt: CompletionRequest["prompt"]): (string | number[])[] {
  if (typeof prompt === "string") return [prompt];
  if (prompt.length === 0) throw validationError("prompt", "must not be empty");
  if (typeof prompt[0] === "number") return [prompt as number[]];
  return prompt as (string | number[])[];
}

function buildParams(body: CompletionRequest, maxNewTokens: number, stop: string[]): GenerationParams {
  const temperature = body.temperature ?? 1;
  // OpenAI samples unless temperature is 0.
  const doSample = temperature > 0;
  return resolveParams(
    {
      maxNewTokens,
      doSample,
      stop,
      ...(doSample ? { temperature } : {}),
      ...(body.top_p != null ? { topP: body.top_p } : {}),
      ...(body.top_k != null ? { topK: body.top_k } : {}),
      ...(body.typical_p != null ? { typicalP: body.typical_p } : {}),
      ...(body.repetition_penalty != null ? { repetitionPenalty: body.repetition_penalty } : {}),
      ...(body.min_tokens != null ? { minNewTokens: body.min_tokens } : {}),
      ...(body.no_repeat_ngram_size != null ? { noRepeatNgramSize: body.no_repeat_ngram_size } : {}),
      ...(body.seed != null ? { seed: body.seed } : {}),
    },
    {
      maxNewTokens: "max_tokens",
      minNewTokens: "min_tokens",
      temperature: "temperature",
      topP: "top_p",
      topK: "top_k",
      typicalP: "typical_p",
      repetitionPenalty: "repetition_penalty",
      noRepeatNgramSize: "no_repeat_ngram_size",
      seed: "seed",
      stop: "stop",
    },
  );
}

interface Prepared {
  prompts: Prompt[];
  params: GenerationParams[];
}

async function prepare(context: ServerContext, model: Model, body: CompletionRequest): Promise<Prepared> {
  const limits = context.limits(model);
  if (body.n != null && body.n !== 1) throw validationError("n", `only 1 completion per prompt is supported (got ${body.n})`);
  if (body.best_of != null && body.best_of !== 1) throw validationError("best_of", `only 1 is supported (got ${body.best_of})`);
  if (body.suffix != null) throw validationError("suffix", "is not supported (insertion); add it to the prompt instead");
  if (body.stream_options != null && body.stream !== true) throw validationError("stream_options", "only applies with stream: true");
  if (body.logprobs != null && body.logprobs > 0) {
    throw validationError("logprobs", `only 0 (the chosen tokens' log-probabilities, without alternatives) is supported (got ${body.logprobs})`);
  }
  if (body.presence_penalty) throw validationError("presence_penalty", `is not supported; use repetition_penalty (got ${body.presence_penalty})`);
  if (body.frequency_penalty) throw validationError("frequency_penalty", `is not supported; use repetition_penalty (got ${body.frequency_penalty})`);
  if (body.logit_bias && Object.keys(body.logit_bias).length > 0) throw validationError("logit_bias", "is not supported");
  if (body.min_tokens != null && body.max_tokens != null && body.min_tokens > body.max_tokens) {
    throw validationError("min_tokens", `must be <= max_tokens (${body.max_tokens}) (got ${body.min_tokens})`);
  }
  const stop = body.stop == null ? [] : typeof body.stop === "string" ? [body.stop] : body.stop;
  checkStops("stop", stop, limits);
  const inputs = promptList(body.prompt);
  if (inputs.length > limits.maxBatchSize) throw validationError("prompt", `must have at most ${limits.maxBatchSize} prompts (--max-batch-size); got ${inputs.length}`);
  const field = (i: number) => (inputs.length === 1 && (typeof body.prompt === "string" || typeof body.prompt[0] === "number") ? "prompt" : `prompt[${i}]`);
  const truncate = body.truncate != null ? { tokens: body.truncate, field: "truncate" } : undefined;
  const prompts = await Promise.all(inputs.map((input, i) => preparePrompt(model, input, field(i), limits, truncate)));
  const params = prompts.map((p, i) => {
    const maxNewTokens = body.max_tokens ?? defaultMaxNewTokens(limits, p.ids.length, openaiDefaultMaxTokens);
    checkMaxNewTokens("max_tokens", maxNewTokens, p.ids.length, limits, field(i));
    return buildParams(body, maxNewTokens, stop);
  });
  return { prompts, params };
}

function completionId(): string {
  return `cmpl-${randomBytes(12).toString("hex")}`;
}

interface LogprobsState {
  tokens: string[];
  token_logprobs: (number | null)[];
  top_logprobs: null;
  text_offset: number[];
}

const utf8 = new TextDecoder("utf-8", { fatal: true });

/** A token as OpenAI lists it: its text, or `bytes:\xNN…` when it holds part of a UTF-8 character. */
function tokenString(bytes: Uint8Array): string {
  try {
    return utf8.decode(bytes);
  } catch {
    return `bytes:${Array.from(bytes, (b) => `\\x${b.toString(16).padStart(2, "0")}`).join("")}`;
  }
}

/**
 * Code-point offsets of tokens in a text, from the tokens' bytes: a token starts at the character
 * that holds its first byte (OpenAI's text_offset: `text[text_offset[i]:]` starts at token i). The
 * bytes go through UTF-8 decoding as the tokenizer's lossy decode does it (WHATWG / Rust's
 * from_utf8_lossy: each maximal invalid subpart is one U+FFFD), so offsets stay in line with the
 * text even where the bytes are not valid UTF-8.
 */
export class TextOffsets {
  /** Characters finished so far (a pending multi-byte sequence becomes character `count`). */
  private count = 0;
  private needed = 0;
  private seen = 0;
  private lower = 0x80;
  private upper = 0xbf;

  constructor(private readonly base: number) {}

  /** The offset of a token made of `bytes` (a token with none sits where the next character will). */
  next(bytes: Uint8Array): number {
    if (bytes.length === 0) return this.base + this.count;
    const first = this.byte(bytes[0]!);
    for (let i = 1; i < bytes.length; i++) this.byte(bytes[i]!);
    return this.base + first;
  }

  /** Feeds one byte; returns the index of the character it belongs to. */
  private byte(b: number): number {
    if (this.needed > 0) {
      if (b < this.lower || b > this.upper) {
        // The pending sequence is cut short: it is one U+FFFD, and this byte starts afresh.
        this.count++;
        this.reset();
        return this.byte(b);
      }
      this.lower = 0x80;
      this.upper = 0xbf;
      if (++this.seen === this.needed) {
        this.reset();
        return this.count++;
      }
      return this.count;
    }
    if (b <= 0x7f) return this.count++;
    if (b >= 0xc2 && b <= 0xdf) this.needed = 1;
    else if (b >= 0xe0 && b <= 0xef) {
      this.needed = 2;
      if (b === 0xe0) this.lower = 0xa0;
      if (b === 0xed) this.upper = 0x9f;
    } else if (b >= 0xf0 && b <= 0xf4) {
      this.needed = 3;
      if (b === 0xf0) this.lower = 0x90;
      if (b === 0xf4) this.upper = 0x8f;
    } else {
      return this.count++; // a byte that never starts a character: one U+FFFD
    }
    return this.count;
  }

  private reset(): void {
    this.needed = 0;
    this.seen = 0;
    this.lower = 0x80;
    this.upper = 0xbf;
  }
}

function codePoints(text: string): number {
  let n = 0;
  for (const _ of text) n++;
  return n;
}

interface LoggedToken {
  id: number;
  logprob: number | null;
  special: boolean;
}

/**
 * OpenAI's logprobs of `tokens`, with offsets into the choice's text from `offsets`. `inText`:
 * whether special tokens are written in the text (the echoed prompt) or left out (the completion).
 */
function logprobsOf(model: Model, tokens: readonly LoggedToken[], offsets: TextOffsets, inText: "special" | "skip-special", into?: LogprobsState): LogprobsState {
  const out: LogprobsState = into ?? { tokens: [], token_logprobs: [], top_logprobs: null, text_offset: [] };
  for (const t of tokens) {
    const bytes = model.tokenizer.tokenBytes(t.id);
    // Each token is listed (a stop string's last token included), special ones by their own text.
    out.tokens.push(tokenString(bytes));
    out.token_logprobs.push(t.logprob);
    out.text_offset.push(offsets.next(t.special && inText === "skip-special" ? new Uint8Array(0) : bytes));
  }
  return out;
}

/** The echoed prompt's tokens with their log-probabilities (none for the first, as OpenAI gives). */
async function echoedTokens(model: Model, ids: number[], signal: AbortSignal): Promise<LoggedToken[]> {
  const logprobs = await promptLogprobs(model, ids, signal);
  return ids.map((id, i) => ({ id, logprob: logprobs[i] ?? null, special: model.tokenizer.specialTokenIds.has(id) }));
}

function endedReason(result: SequenceResult): FinishReason {
  if (result.finishReason !== "cancelled") return result.finishReason;
  if (result.cancelledBy === "client") throw clientClosed();
  if (result.cancelledBy === "shutdown") throw new HttpError("unavailable", "the server is shutting down; this completion was cancelled before it finished");
  throw new HttpError("generation", "the completion was cancelled before it finished");
}

async function complete(context: ServerContext, reply: FastifyReply, body: CompletionRequest) {
  const model = context.service.readyModel();
  const { prompts, params } = await prepare(context, model, body);
  const { controller, release } = context.service.admit(prompts.length);
  cancelOnDisconnect(reply, controller);
  try {
    const results = await Promise.all(prompts.map((p, i) => context.service.run({ promptIds: p.ids, params: params[i]!, signal: controller.signal })));
    const choices = [];
    for (const [i, r] of results.entries()) {
      const finish = endedReason(r);
      const echo = body.echo ? prompts[i]!.text : "";
      let logprobs: LogprobsState | null = null;
      if (body.logprobs != null) {
        // With echo the prompt's tokens come first, as OpenAI lists them (loglikelihood clients read these).
        const echoed = body.echo ? logprobsOf(model, await echoedTokens(model, prompts[i]!.ids, controller.signal), new TextOffsets(0), "special") : undefined;
        logprobs = logprobsOf(model, r.tokens, new TextOffsets(codePoints(echo)), "skip-special", echoed);
      }
      choices.push({ text: echo + r.text, index: i, logprobs, finish_reason: openaiFinishReason(finish) });
    }
    const promptTokens = prompts.reduce((a, p) => a + p.ids.length, 0);
    const completionTokens = results.reduce((a, r) => a + r.tokens.length, 0);
    return {
      id: completionId(),
      object: "text_completion",
      created: Math.floor(Date.now() / 1000),
      model: context.modelId,
      system_fingerprint: null,
      choices,
      usage: { prompt_tokens: promptTokens, completion_tokens: completionTokens, total_tokens: promptTokens + completionTokens },
    };
  } finally {
    // If one prompt failed, its siblings are cancelled rather than left running for nobody.
    controller.abort();
    release();
  }
}

async function completeStream(context: ServerContext, reply: FastifyReply, body: CompletionRequest): Promise<void> {
  const model = context.service.readyModel();
  const { prompts, params } = await prepare(context, model, body);
  const { controller, release } = context.service.admit(prompts.length);
  cancelOnDisconnect(reply, controller);
  const id = completionId();
  const created = Math.floor(Date.now() / 1000);
  const chunk = (choices: unknown[], extra: Record<string, unknown> = {}) => ({
    id,
    object: "text_completion",
    created,
    model: context.modelId,
    system_fingerprint: null,
    choices,
    ...extra,
  });
  const sse = new SseStream(reply, "data: ");
  const offsets = prompts.map((p) => new TextOffsets(body.echo ? codePoints(p.text) : 0));
  try {
    if (body.echo) {
      for (const [index, p] of prompts.entries()) {
        const logprobs = body.logprobs != null ? logprobsOf(model, await echoedTokens(model, p.ids, controller.signal), new TextOffsets(0), "special") : null;
        sse.send(chunk([{ text: p.text, index, logprobs, finish_reason: null }]));
      }
    }
    const results = await Promise.all(
      prompts.map((p, index) =>
        context.service.run({
          promptIds: p.ids,
          params: params[index]!,
          signal: controller.signal,
          onToken: (token, finish) => {
            const logprobs = body.logprobs != null ? logprobsOf(model, [token], offsets[index]!, "skip-special") : null;
            const finishReason = finish === undefined || finish === "cancelled" ? null : openaiFinishReason(finish);
            sse.send(chunk([{ text: token.text, index, logprobs, finish_reason: finishReason }]));
          },
        }),
      ),
    );
    const cancelled = results.find((r) => r.finishReason === "cancelled" && r.cancelledBy !== "client");
    if (cancelled) {
      const err =
        cancelled.cancelledBy === "shutdown"
          ? new HttpError("unavailable", "the server is shutting down; this completion was cancelled before it finished")
          : new HttpError("generation", "the completion was cancelled before it finished");
      sse.send(errorBody(err, "openai"));
    } else if (body.stream_options?.include_usage) {
      const promptTokens = prompts.reduce((a, p) => a + p.ids.length, 0);
      const completionTokens = results.reduce((a, r) => a + r.tokens.length, 0);
      sse.send(chunk([], { usage: { prompt_tokens: promptTokens, completion_tokens: completionTokens, total_tokens: promptTokens + completionTokens } }));
    }
    sse.send("[DONE]");
  } catch (err) {
    const known = fromLibraryError(err);
    sse.send(errorBody(known ?? new HttpError("generation", "generation failed (see the server log)"), "openai"));
    if (!known) reply.log.error({ err }, "completion failed while streaming");
  } finally {
    controller.abort();
    release();
    sse.end();
  }
}

export function registerOpenAiRoutes(app: FastifyInstance, context: ServerContext): void {
  const config = { family: "openai" as const };

  app.post("/v1/completions", { config }, async (req, reply) => {
    // zod's record drops a "__proto__" key, which JSON.parse keeps as an own property: look at the raw body.
    const rawBias = (req.body as { logit_bias?: unknown } | null)?.logit_bias;
    if (rawBias !== null && typeof rawBias === "object" && Object.keys(rawBias).length > 0) throw validationError("logit_bias", "is not supported");
    const body = withTgiNames(parseBody(completionSchema, req.body));
    if (body.stream) return completeStream(context, reply, body);
    return complete(context, reply, body);
  });

  const created = Math.floor(Date.now() / 1000);
  const modelObject = () => {
    const model = context.service.model;
    return { id: context.modelId, object: "model", created, owned_by: "blossom", max_model_len: model ? context.limits(model).maxTotalTokens : null };
  };
  app.get("/v1/models", { config }, async () => ({ object: "list", data: [modelObject()] }));
  // The SDKs' models.retrieve(id); an id may hold "/" (org/name), which the SDKs send unescaped.
  app.get<{ Params: { "*": string } }>("/v1/models/*", { config }, async (req) => {
    const id = req.params["*"];
    if (id !== context.modelId) throw new HttpError("not_found", `The model \`${id}\` does not exist; this server serves \`${context.modelId}\``);
    return modelObject();
  });
}
