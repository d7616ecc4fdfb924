/** `blossom create-random`: write a random BLOOM checkpoint with real dimensions, for benchmarks and sizing. */
import { Option, type Command } from "commander";
import cliProgress from "cli-progress";
import { createRandomCheckpoint } from "../../checkpoint/create-random.js";
import { getPreset, presetParameterCount, presets, type CheckpointDType } from "../../checkpoint/presets.js";
import { parameterError } from "../../errors.js";

function formatBytes(bytes: number): string {
  if (bytes >= 1e9) return `${(bytes / 1e9).toFixed(2)} GB`;
  if (bytes >= 1e6) return `${(bytes / 1e6).toFixed(1)} MB`;
  return `${(bytes / 1e3).toFixed(1)} kB`;
}

function formatCount(n: number): string {
  return n >= 1e9 ? `${(n / 1e9).toFixed(2)}B` : n >= 1e6 ? `${(n / 1e6).toFixed(0)}M` : `${(n / 1e3).toFixed(0)}k`;
}

function parseSeed(value: string): number {
  const seed = Number(value);
  if (!/^\d+$/.test(value) || !Number.isSafeInteger(seed) || seed > 0xffffffff) {
    throw parameterError("--seed", `expected an integer from 0 to 4294967295, got ${JSON.stringify(value)}`);
  }
  return seed;
}

export function registerCreateRandomCommand(program: Command): void {
  program
    .command("create-random")
    .description("write a BLOOM checkpoint with the real dimensions and random weights (Hugging Face layout)")
    .addOption(new Option("--preset <name>", "model size").choices(Object.keys(presets)).makeOptionMandatory())
    .addOption(new Option("--dtype <dtype>", "storage dtype").choices(["bf16", "fp16", "fp32"]).default("bf16"))
    .requiredOption("--out <dir>", "output directory (new, empty, or an earlier create-random output)")
    .option("--seed <n>", "random seed; the same seed writes byte-identical files", parseSeed, 0)
    .addHelpText(
      "after",
      "\nPresets:\n" +
        Object.values(presets)
          .map((p) => `  ${p.name.padEnd(11)} hidden ${p.hiddenSize}, ${p.numLayers} layers, ${p.numHeads} heads, vocab ${p.vocabSize}` + (p.hubModel ? ` (${p.hubModel})` : ""))
          .join("\n"),
    )
    .action(async (options: { preset: string; dtype: CheckpointDType; out: string; seed: number }) => {
      const preset = getPreset(options.preset);
      const parameters = presetParameterCount(preset);
      const bar = process.stderr.isTTY
        ? new cliProgress.SingleBar(
            {
              format: "writing weights [{bar}] {percentage}% | {done} of {size} | ETA {eta_formatted}",
              stream: process.stderr,
              hideCursor: true,
              clearOnComplete: true,
            },
            cliProgress.Presets.shades_classic,
          )
        : undefined;
      let started = false;
      try {
        const result = await createRandomCheckpoint({
          preset: preset.name,
          dtype: options.dtype,
          out: options.out,
          seed: options.seed,
          onProgress: (done, total) => {
            if (!bar) return;
            if (!started) {
              bar.start(total, 0, { done: formatBytes(0), size: formatBytes(total) });
              started = true;
            }
            bar.update(done, { done: formatBytes(done) });
          },
        });
        bar?.stop();
        process.stdout.write(
          `wrote ${preset.name} (${formatCount(parameters)} parameters, ${options.dtype}, seed ${options.seed}) to ${result.dir}: ` +
            `${formatBytes(result.bytes)} in ${result.seconds.toFixed(1)} s\n`,
        );
      } catch (err) {
        bar?.stop();
        throw err;
      }
    });
}
