/** `blossom perplexity`: token-level perplexity of a text file under the model. */
import { readFileSync } from "node:fs";
import type { Command } from "commander";
import { BlossomError } from "../../errors.js";
import { addModelOptions, loadModelForCli, parseInteger, type ModelCliOptions } from "../options.js";

interface PerplexityCliOptions extends ModelCliOptions {
  file: string;
  context: number;
  stride?: number;
  json?: boolean;
}

export function registerPerplexityCommand(program: Command): void {
  const command = program.command("perplexity").description("token-level perplexity of a text file (sliding windows, no BOS)");
  addModelOptions(command)
    .requiredOption("-f, --file <path>", "text file to score")
    .option("--context <n>", "tokens of context per window (each window scores up to context+1 tokens)", parseInteger("--context", 1), 1024)
    .option("--stride <n>", "tokens between window starts (default: --context)", parseInteger("--stride", 1))
    .option("--json", "print the result as JSON")
    .action(async (o: PerplexityCliOptions) => {
      let text: string;
      try {
        text = readFileSync(o.file, "utf8");
      } catch (err) {
        throw new BlossomError("input", `--file ${o.file}: cannot read (${(err as NodeJS.ErrnoException).code ?? String(err)})`);
      }
      const model = await loadModelForCli(o);
      try {
        const started = performance.now();
        const r = await model.perplexity(text, { context: o.context, stride: o.stride ?? o.context }).catch((err: unknown) => {
          // "needs at least 2 tokens": say which file was too short.
          if (err instanceof BlossomError && err.code === "input") throw new BlossomError("input", `--file ${o.file}: ${err.message}`, { cause: err });
          throw err;
        });
        const seconds = (performance.now() - started) / 1000;
        if (o.json) process.stdout.write(JSON.stringify({ ...r, context: o.context, stride: o.stride ?? o.context, seconds }) + "\n");
        else {
          process.stdout.write(`perplexity: ${r.perplexity.toFixed(2)}\n`);
          process.stdout.write(
            `mean NLL ${r.meanNll.toFixed(4)} nats over ${r.predicted} predicted tokens (${r.tokens} tokens, context ${o.context}, stride ${o.stride ?? o.context}) in ${seconds.toFixed(2)} s\n`,
          );
        }
      } finally {
        await model.dispose();
      }
    });
}
