/**
 * `blossom chat`: the original server's interactive CLI (transformers-bloom-inference's
 * inference_server/cli.py) with streaming: type a prompt, watch the continuation appear, change
 * the generation settings between prompts. Ctrl-C stops the current generation, not the program.
 *
 * Commands (everything else is a prompt):
 *   /set NAME VALUE   one setting, e.g. /set temperature 0.7, /set max_new_tokens 50, /set stop ["\n"]
 *   /kwargs JSON      several at once with transformers' names, like cli.py's "Generate kwargs:"
 *   /greedy /sample   argmax decoding, or sampling
 *   /show /reset /help /quit
 */
import { createInterface, type Interface } from "node:readline";
import type { Command } from "commander";
import { BlossomError } from "../../errors.js";
import { defaultGenerationParams, resolveGenerationParams, type GenerationParams } from "../../generate/params.js";
import type { Model } from "../../model.js";
import { addModelOptions, loadModelForCli } from "../options.js";
import { addGenerationOptions, generationParamsFromCli } from "./generate.js";

/** Settings by their transformers / server names; the library's camelCase names work too. */
const settingNames: Record<string, keyof GenerationParams> = {
  max_new_tokens: "maxNewTokens",
  min_new_tokens: "minNewTokens",
  do_sample: "doSample",
  temperature: "temperature",
  top_k: "topK",
  top_p: "topP",
  typical_p: "typicalP",
  repetition_penalty: "repetitionPenalty",
  no_repeat_ngram_size: "noRepeatNgramSize",
  stop: "stop",
  seed: "seed",
};
const snakeName = Object.fromEntries(Object.entries(settingNames).map(([snake, camel]) => [camel, snake])) as Record<keyof GenerationParams, string>;

export interface ChatOptions {
  model: Model;
  input: NodeJS.ReadableStream;
  output: NodeJS.WritableStream;
  /** Starting settings (validated). */
  params?: Partial<GenerationParams>;
  /** Handle SIGINT: stop the current generation; at the prompt, a second Ctrl-C exits. */
  handleSignals?: boolean;
}

const helpText = `Type a prompt and press Enter; the continuation streams as it is generated.
Ctrl-C stops a generation. Commands:
  /set NAME VALUE   change a setting: ${Object.keys(settingNames).join(", ")}
                    (VALUE is JSON or plain text, e.g. /set temperature 0.7, /set stop ["\\n"], /set seed none)
  /kwargs JSON      change several, e.g. /kwargs {"do_sample": true, "top_k": 50, "max_new_tokens": 40}
  /greedy           argmax decoding (do_sample false)
  /sample           sample (do_sample true)
  /show             print the settings
  /reset            back to the starting settings
  /help             this text
  /quit             leave (or Ctrl-D)
`;

function formatSettings(params: GenerationParams): string {
  const entries = Object.entries(params).map(([k, v]) => `${snakeName[k as keyof GenerationParams] ?? k}=${JSON.stringify(v ?? null)}`);
  return entries.join(" ");
}

function parseValue(text: string): unknown {
  const trimmed = text.trim();
  if (trimmed === "none" || trimmed === "null") return undefined;
  try {
    return JSON.parse(trimmed);
  } catch {
    return trimmed; // a bare word, e.g. a stop string
  }
}

/** Applies `changes` (snake_case or camelCase keys) to `params`; throws a BlossomError naming the setting. */
function applySettings(params: GenerationParams, changes: Record<string, unknown>): GenerationParams {
  const next: Record<string, unknown> = { ...params };
  for (const [name, value] of Object.entries(changes)) {
    // Own properties only: "constructor" or "__proto__" are not settings.
    const key = Object.hasOwn(settingNames, name)
      ? settingNames[name]
      : Object.values(settingNames).includes(name as keyof GenerationParams)
        ? (name as keyof GenerationParams)
        : undefined;
    if (!key) throw new BlossomError("parameter", `${name}: not a setting (expected one of: ${Object.keys(settingNames).join(", ")})`);
    next[key] = key === "stop" && typeof value === "string" ? [value] : value;
  }
  try {
    return resolveGenerationParams(next);
  } catch (err) {
    if (err instanceof BlossomError) {
      // Say it with the names the user typed.
      const [camel, ...rest] = err.message.split(":");
      throw new BlossomError("parameter", `${Object.hasOwn(snakeName, camel!) ? snakeName[camel as keyof GenerationParams] : camel}:${rest.join(":")}`);
    }
    throw err;
  }
}

/** Runs the interactive loop until /quit or the end of input. */
export async function runChat(options: ChatOptions): Promise<void> {
  const { model, input, output } = options;
  const initial = resolveGenerationParams(options.params ?? {});
  let params = initial;
  const write = (text: string) => output.write(text);
  const isTTY = (input as NodeJS.ReadStream).isTTY === true;
  const rl: Interface = createInterface({ input, output, terminal: isTTY, prompt: "> " });

  let generation: AbortController | undefined;
  let lastInterrupt = 0;
  let done: () => void = () => undefined;
  const finished = new Promise<void>((resolve) => (done = resolve));
  let closed = false;

  const interrupt = () => {
    if (generation) {
      generation.abort();
      return;
    }
    const now = Date.now();
    if (now - lastInterrupt < 2000) {
      write("\n");
      closed = true;
      rl.close();
      return;
    }
    lastInterrupt = now;
    write("\n(Ctrl-C again or /quit to leave)\n");
    rl.prompt();
  };
  rl.on("SIGINT", interrupt);
  if (options.handleSignals) process.on("SIGINT", interrupt);

  const generate = async (prompt: string) => {
    generation = new AbortController();
    const started = performance.now();
    let firstAt = 0;
    let tokens = 0;
    let finish = "";
    try {
      for await (const event of model.stream(prompt, { ...params, signal: generation.signal })) {
        if (event.token) {
          tokens++;
          if (tokens === 1) firstAt = performance.now();
        }
        write(event.text);
        if (event.finishReason) finish = event.finishReason;
      }
      const seconds = (performance.now() - (firstAt || started)) / 1000;
      const rate = tokens > 1 && seconds > 0 ? `, ${((tokens - 1) / seconds).toFixed(1)} tok/s` : "";
      write(finish === "cancelled" ? `\n[stopped after ${tokens} tokens]\n` : `\n[${tokens} tokens${rate}, ${finish.replace("_", " ")}]\n`);
    } catch (err) {
      write(`\n[error: ${(err as Error).message}]\n`);
    } finally {
      generation = undefined;
    }
  };

  const command = (line: string): boolean => {
    const [name, ...rest] = line.slice(1).split(/\s+/);
    const argument = line.slice(1 + (name?.length ?? 0)).trim();
    try {
      switch (name) {
        case "quit":
        case "exit":
          return false;
        case "help":
          write(helpText);
          break;
        case "show":
          write(`${formatSettings(params)}\n`);
          break;
        case "reset":
          params = initial;
          write(`${formatSettings(params)}\n`);
          break;
        case "greedy":
          params = applySettings(params, { do_sample: false });
          write("greedy decoding\n");
          break;
        case "sample":
          params = applySettings(params, { do_sample: true });
          write(`sampling (temperature ${params.temperature}, top_k ${params.topK}, top_p ${params.topP})\n`);
          break;
        case "set": {
          const setting = rest[0];
          if (!setting || rest.length < 2) throw new BlossomError("parameter", "usage: /set NAME VALUE (see /help)");
          params = applySettings(params, { [setting]: parseValue(argument.slice(setting.length)) });
          write(`${setting} = ${JSON.stringify(params[settingNames[setting] ?? (setting as keyof GenerationParams)] ?? null)}\n`);
          break;
        }
        case "kwargs": {
          let changes: unknown;
          try {
            changes = JSON.parse(argument);
          } catch (err) {
            throw new BlossomError("parameter", `kwargs: not valid JSON (${(err as Error).message})`);
          }
          if (typeof changes !== "object" || changes === null || Array.isArray(changes)) throw new BlossomError("parameter", "kwargs: expected a JSON object");
          params = applySettings(params, changes as Record<string, unknown>);
          write(`${formatSettings(params)}\n`);
          break;
        }
        default:
          write(`unknown command /${name}; /help lists them\n`);
      }
    } catch (err) {
      write(`error: ${(err as Error).message}\n`);
    }
    return true;
  };

  // Lines are handled one at a time, in order, even when piped in faster than they are answered.
  const queue: string[] = [];
  let busy = false;
  let inputEnded = false;
  const pump = async () => {
    if (busy) return;
    busy = true;
    while (queue.length > 0 && !closed) {
      const line = queue.shift()!;
      const trimmed = line.trim();
      if (trimmed.startsWith("/")) {
        if (!command(trimmed)) {
          closed = true;
          break;
        }
      } else if (trimmed.length > 0) {
        await generate(line);
      }
      if (!closed && !inputEnded) rl.prompt();
    }
    busy = false;
    if (closed || inputEnded) {
      rl.close();
      done();
    }
  };
  rl.on("line", (line) => {
    queue.push(line);
    void pump();
  });
  rl.on("close", () => {
    inputEnded = true;
    if (!busy) done();
  });

  write(`Blossom chat on ${model.dir} (${model.info.dtype}). /help for commands, Ctrl-C stops a generation.\n${formatSettings(params)}\n`);
  rl.prompt();
  try {
    await finished;
  } finally {
    generation?.abort();
    if (options.handleSignals) process.off("SIGINT", interrupt);
  }
}

export function registerChatCommand(program: Command): void {
  const command = program.command("chat").description("interactive prompt: streamed continuations, settings changeable with /set, Ctrl-C stops a generation");
  addModelOptions(command);
  addGenerationOptions(command).action(async (o: Parameters<typeof generationParamsFromCli>[0]) => {
    const start = generationParamsFromCli(o);
    const model = await loadModelForCli(o);
    try {
      await runChat({ model, input: process.stdin, output: process.stdout, params: { ...defaultGenerationParams, ...start, stop: start.stop ?? [] }, handleSignals: true });
    } finally {
      // After /quit, an open stdin (a pipe the other end keeps open) would keep the process alive.
      process.stdin.destroy();
      await model.dispose();
    }
  });
}
