/** `blossom quantize`: writes a pre-quantized int8 checkpoint that every command loads directly. */
import { InvalidArgumentError, Option, type Command } from "commander";
import { formatBytes, parseSize } from "../../engine/memory.js";
import { resolveModelDir } from "../../model.js";
import { quantizeCheckpoint } from "../../quant/quantize.js";
import { defaultGroupSize, quantSchemes, type QuantScheme } from "../../quant/scheme.js";
import { parseInteger } from "../options.js";

interface QuantizeCliOptions {
  model: string;
  dtype: QuantScheme;
  out: string;
  int8GroupSize?: number;
  maxShardSize?: number;
  threads?: number;
}

export function registerQuantizeCommand(program: Command): void {
  program
    .command("quantize")
    .description("write a pre-quantized int8 checkpoint (safetensors with int8 weights and fp16 scales) that loads without re-quantizing")
    .addOption(new Option("-m, --model <ref>", "checkpoint folder (or Hugging Face id org/name[@revision]) in fp32, fp16 or bf16").makeOptionMandatory())
    .addOption(new Option("--dtype <scheme>", "int8: group-wise weights; int8-mixed: LLM.int8 (per-row weights, fp32 outlier features)").choices([...quantSchemes]).makeOptionMandatory())
    .requiredOption("-o, --out <dir>", "new folder for the quantized checkpoint")
    .option("--int8-group-size <n>", `--dtype int8: inputs per weight scale (multiple of 32; default ${defaultGroupSize})`, parseInteger("--int8-group-size", 32))
    .option("--max-shard-size <size>", "largest safetensors file, e.g. 5GB (default)", (v: string) => {
      let bytes: number;
      try {
        bytes = parseSize(v, "--max-shard-size");
      } catch (err) {
        throw new InvalidArgumentError((err as Error).message);
      }
      if (!(bytes > 0)) throw new InvalidArgumentError(`--max-shard-size must be a positive size, got "${v}"`);
      return bytes;
    })
    .option("--threads <n>", "compute threads (default: physical cores)", parseInteger("--threads", 1, 1024))
    .action(async (o: QuantizeCliOptions) => {
      if (o.out.trim() === "") throw new InvalidArgumentError("--out: expected a folder path, got an empty string");
      const dir = await resolveModelDir(o.model);
      let last = 0;
      const result = await quantizeCheckpoint(dir, o.out, {
        scheme: o.dtype,
        groupSize: o.int8GroupSize,
        maxShardBytes: o.maxShardSize,
        threads: o.threads,
        onProgress: (done, total) => {
          const now = performance.now();
          if (process.stderr.isTTY && (now - last > 200 || done === total)) {
            last = now;
            process.stderr.write(`\rquantizing: ${done}/${total} tensors`);
            if (done === total) process.stderr.write("\n");
          }
        },
      });
      process.stdout.write(
        `wrote ${o.out}: ${result.quantizedTensors} int8 matrices, ${formatBytes(result.bytes)} of tensors ` +
          `(${((result.bytes / result.sourceBytes) * 100).toFixed(1)}% of the source's ${formatBytes(result.sourceBytes)}) in ${result.seconds.toFixed(1)} s\n`,
      );
    });
}
