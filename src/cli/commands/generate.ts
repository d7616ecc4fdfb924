/** `blossom generate`: prints continuations of prompts, like the guide's bloom-*-inference.py scripts. */
import { BlossomError } from "../../errors.js";
import { Option, type Command } from "commander";
import type { GenerateResult } from "../../model.js";
import type { GenerationParamsInput } from "../../generate/params.js";
import { addModelOptions, collect, loadModelForCli, parseInteger, parseNumber, type ModelCliOptions } from "../options.js";

/** The input sentences of the guide's scripts (bloom-inference-scripts/bloom-ds-inference.py). */
export const guideInputSentences = [
  "DeepSpeed is a machine learning framework",
  "He is working on",
  "He has a",
  "He got all",
  "Everyone wants to",
  "The new movie that got Oscar this year",
  "In the far far distance from our galaxy,",
  "Peace is the only way",
];

interface GenerateCliOptions extends ModelCliOptions {
  maxNewTokens: number;
  minNewTokens?: number;
  greedy?: boolean;
  sample?: boolean;
  temperature?: number;
  topK?: number;
  topP?: number;
  typicalP?: number;
  repetitionPenalty?: number;
  noRepeatNgramSize?: number;
  stop?: string[];
  seed?: number;
  batchSize?: number;
  stream?: boolean;
  json?: boolean;
}

export function generationParamsFromCli(o: GenerateCliOptions): GenerationParamsInput {
  const sampling = o.temperature !== undefined || o.topK !== undefined || o.topP !== undefined || o.typicalP !== undefined;
  if (o.greedy && (o.sample || sampling)) {
    throw new BlossomError("parameter", "greedy: cannot be combined with --sample or a sampling option (--temperature, --top-k, --top-p, --typical-p)");
  }
  const params: GenerationParamsInput = { maxNewTokens: o.maxNewTokens, doSample: !o.greedy && (o.sample === true || sampling) };
  if (o.minNewTokens !== undefined) params.minNewTokens = o.minNewTokens;
  if (o.temperature !== undefined) params.temperature = o.temperature;
  if (o.topK !== undefined) params.topK = o.topK;
  if (o.topP !== undefined) params.topP = o.topP;
  if (o.typicalP !== undefined) params.typicalP = o.typicalP;
  if (o.repetitionPenalty !== undefined) params.repetitionPenalty = o.repetitionPenalty;
  if (o.noRepeatNgramSize !== undefined) params.noRepeatNgramSize = o.noRepeatNgramSize;
  if (o.stop !== undefined) params.stop = o.stop;
  if (o.seed !== undefined) params.seed = o.seed;
  return params;
}

/**
 * --no-repeat-ngram-size N (transformers' name). Commander reads every --no-* flag as the negation
 * of a boolean --repeat-ngram-size, which left noRepeatNgramSize unset whatever N was given.
 */
function noRepeatNgramSize(): Option {
  const option = new Option("--no-repeat-ngram-size <n>", "never repeat an n-gram of this size").argParser(parseInteger("--no-repeat-ngram-size", 0));
  option.negate = false;
  return option;
}

/** The sampling options, shared by generate, chat and bench. */
export function addGenerationOptions(command: Command): Command {
  return command
    .option("--max-new-tokens <n>", "tokens to generate per prompt", parseInteger("--max-new-tokens", 1), 100)
    .option("--min-new-tokens <n>", "do not stop on eos before this many tokens", parseInteger("--min-new-tokens", 0))
    .option("--greedy", "argmax decoding (the default unless a sampling option is given)")
    .option("--sample", "sample (with temperature 1 unless given)")
    .option("--temperature <t>", "sampling temperature (>= 0, 0 = greedy; implies --sample)", parseNumber("--temperature"))
    .option("--top-k <k>", "keep the k most likely tokens (implies --sample)", parseInteger("--top-k", 0))
    .option("--top-p <p>", "nucleus sampling: keep the smallest set with probability >= p (implies --sample)", parseNumber("--top-p"))
    .option("--typical-p <p>", "typical sampling mass (implies --sample)", parseNumber("--typical-p"))
    .option("--repetition-penalty <r>", "penalise tokens already present (1 = off)", parseNumber("--repetition-penalty"))
    .addOption(noRepeatNgramSize())
    .option("--stop <text>", "stop when this text is generated (repeatable)", collect)
    .option("--seed <n>", "random seed for reproducible sampling", parseInteger("--seed", 0));
}

export function registerGenerateCommand(program: Command): void {
  const command = program
    .command("generate")
    .description("generate continuations of prompts (default: the guide's 8 input sentences)")
    .argument("[prompts...]", "prompts to continue");
  addModelOptions(command);
  addGenerationOptions(command)
    .option("--batch-size <n>", "prompts decoded together (default: all)", parseInteger("--batch-size", 1))
    .option("--stream", "print tokens as they are generated (one prompt at a time)")
    .option("--json", "print one JSON object per prompt")
    .action(async (prompts: string[], o: GenerateCliOptions) => {
      const inputs = prompts.length ? prompts : guideInputSentences;
      if (o.stream && o.json) throw new BlossomError("parameter", "stream: cannot be combined with --json (one prints text as it comes, the other one object per prompt at the end)");
      if (o.stream && o.batchSize !== undefined) throw new BlossomError("parameter", "stream: cannot be combined with --batch-size (--stream decodes one prompt at a time)");
      const empty = inputs.findIndex((p) => p === "");
      if (empty >= 0) throw new BlossomError("input", `prompt ${empty + 1}: is empty; BLOOM needs at least one token to condition on`);
      const params = generationParamsFromCli(o);
      const model = await loadModelForCli(o, o.batchSize !== undefined ? { maxBatchSize: o.batchSize } : {});
      try {
        const started = performance.now();
        let tokens = 0;
        if (o.stream) {
          for (const prompt of inputs) {
            process.stdout.write(`${"-".repeat(60)}\nin=${prompt}\nout=${prompt}`);
            for await (const e of model.stream(prompt, params)) {
              process.stdout.write(e.text);
              if (e.token) tokens++;
            }
            process.stdout.write("\n\n");
          }
        } else {
          const result: GenerateResult = await model.generate(inputs, params);
          inputs.forEach((prompt, i) => {
            tokens += result.numGeneratedTokens[i]!;
            if (o.json) {
              process.stdout.write(
                JSON.stringify({ prompt, text: result.texts[i], tokenIds: result.tokenIds[i], finishReason: result.finishReasons[i] }) + "\n",
              );
            } else {
              process.stdout.write(`${"-".repeat(60)}\nin=${prompt}\nout=${prompt}${result.texts[i]}\n\n`);
            }
          });
        }
        const seconds = (performance.now() - started) / 1000;
        process.stderr.write(
          `generated ${tokens} tokens for ${inputs.length} prompt(s) in ${seconds.toFixed(2)} s ` +
            `(${((seconds * 1000) / Math.max(1, tokens)).toFixed(2)} ms/token, ${(tokens / seconds).toFixed(1)} tokens/s; load ${model.info.loadSeconds.toFixed(2)} s)\n`,
        );
      } finally {
        await model.dispose();
      }
    });
}
