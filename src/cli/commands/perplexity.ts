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
      let bytes: Buffer;
      try {
        bytes = readFileSync(o.file);
      } catch (err) {
        throw new BlossomError("input", `--file ${o.file}: cannot read (${(err as NodeJS.ErrnoException).code ?? String(err)})`);
      }
      let text: string;
      try {
        // Strictly: replacing bad bytes with U+FFFD would score a text other than the file's.
        // A UTF-8 BOM stays in the text (U+FEFF), as Python's open(encoding="utf-8") keeps it.
        text = new TextDecoder("utf-8", { fatal: true, ignoreBOM: true }).decode(bytes);
      } catch {
        const at = firstInvalidUtf8(bytes);
        throw new BlossomError("input", `--file ${o.file}: not valid UTF-8 (first bad byte at offset ${at}: 0x${bytes[at]?.toString(16).padStart(2, "0")})`);
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

/** The offset of the first byte where `bytes` stops being valid UTF-8. */
function firstInvalidUtf8(bytes: Uint8Array): number {
  // Up to the first bad sequence the lossy decoding is exact, so its UTF-8 length is that offset;
  // a U+FFFD that the file itself holds (EF BF BD) is skipped.
  const text = new TextDecoder("utf-8", { ignoreBOM: true }).decode(bytes);
  for (let from = 0; ; ) {
    const k = text.indexOf("\uFFFD", from);
    if (k < 0) return bytes.length;
    const at = Buffer.byteLength(text.slice(0, k));
    if (!(bytes[at] === 0xef && bytes[at + 1] === 0xbf && bytes[at + 2] === 0xbd)) return at;
    from = k + 1;
  }
}
