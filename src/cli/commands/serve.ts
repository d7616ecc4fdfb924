/**
 * `blossom serve`: the HTTP server (src/server/) on one model: the original BLOOM server's
 * endpoints, text-generation-inference's and OpenAI's APIs, health, metrics and a web UI at /.
 * SIGTERM (or Ctrl-C) shuts down gracefully: stop admitting, let in-flight requests finish for up
 * to --shutdown-timeout seconds, cancel the rest, exit 0.
 */
import { Option, type Command } from "commander";
import { loadModel, mpiRank } from "../../model.js";
import { checkStrategy, serverDefaults } from "../../server/options.js";
import { startServer } from "../../server/server.js";
import { cliErrorMessage } from "../errors.js";
import { addModelOptions, modelOptionsFromCli, parseInteger, parseNumber, type ModelCliOptions } from "../options.js";

interface ServeCliOptions extends ModelCliOptions {
  host: string;
  port: number;
  modelId?: string;
  maxBatchSize: number;
  maxInputLength: number;
  allowedMaxNewTokens: number;
  maxConcurrentRequests: number;
  maxBatchTotalTokens?: number;
  maxBatchPrefillTokens: number;
  maxStopSequences: number;
  kvCacheTokens?: number;
  maxConnections: number;
  shutdownTimeout: number;
  logLevel: "fatal" | "error" | "warn" | "info" | "debug" | "trace" | "silent";
}

export function registerServeCommand(program: Command): void {
  const command = program.command("serve").description("serve a model over HTTP (original BLOOM server API, text-generation-inference API, OpenAI completions, web UI)");
  addModelOptions(command);
  command
    .option("--host <host>", "address to listen on", serverDefaults.host)
    .option("--port <port>", "port to listen on (0: any free port)", parseInteger("--port", 0, 65535), serverDefaults.port)
    .option("--model-id <name>", "the model name clients see (default: the checkpoint folder's name)")
    .option("--max-batch-size <n>", "most sequences decoded together; also the most prompts per request", parseInteger("--max-batch-size", 1), serverDefaults.maxBatchSize)
    .option("--max-input-length <n>", "most prompt tokens per sequence", parseInteger("--max-input-length", 1), serverDefaults.maxInputLength)
    .option("--allowed-max-new-tokens <n>", "most new tokens a request may ask for", parseInteger("--allowed-max-new-tokens", 1), serverDefaults.allowedMaxNewTokens)
    .option("--max-concurrent-requests <n>", "sequences accepted at once (queued or running); beyond, 429", parseInteger("--max-concurrent-requests", 1), serverDefaults.maxConcurrentRequests)
    .option("--max-batch-total-tokens <n>", "cap on prompt + max_new_tokens over the running batch (default: the KV cache)", parseInteger("--max-batch-total-tokens", 1))
    .option(
      "--max-batch-prefill-tokens <n>",
      "most prompt tokens one step feeds; longer prompts go in over several steps while running sequences keep decoding",
      parseInteger("--max-batch-prefill-tokens", 1),
      serverDefaults.maxBatchPrefillTokens,
    )
    .option("--max-stop-sequences <n>", "most stop sequences per request", parseInteger("--max-stop-sequences", 1), serverDefaults.maxStopSequences)
    .option("--max-connections <n>", "most client connections open at once; a connection beyond it is closed as it is accepted", parseInteger("--max-connections", 1), serverDefaults.maxConnections)
    .option("--kv-cache-tokens <n>", "KV-cache capacity in tokens, per replica (default: a quarter of free memory, shared by the replicas or ranks)", parseInteger("--kv-cache-tokens", 1))
    .option("--shutdown-timeout <seconds>", "on SIGTERM, how long in-flight requests may run before they are cancelled", parseNumber("--shutdown-timeout", 0), serverDefaults.shutdownTimeoutMs / 1000)
    .addOption(new Option("--log-level <level>", "request and error logging").choices(["fatal", "error", "warn", "info", "debug", "trace", "silent"]).default("info"))
    .action(async (o: ServeCliOptions) => {
      checkStrategy(o.strategy);
      if (o.strategy === "tensor" && mpiRank() !== 0) {
        // A tensor-parallel follower: no HTTP server, only its slice of every step (loadModel exits when rank 0 stops).
        // A SIGTERM / Ctrl-C that reaches every rank (a supervisor signalling the process group) must
        // not end a follower while rank 0 drains its requests: it ends when rank 0 says so. (Open MPI's
        // mpirun, signalled itself, kills every rank shortly after anyway: stop rank 0 instead.)
        for (const signal of ["SIGTERM", "SIGINT"] as const) process.on(signal, () => undefined);
        // Every rank's KV cache has rank 0's number of blocks (block ids are shared): the same option.
        await loadModel(o.model, { ...modelOptionsFromCli(o), ...(o.kvCacheTokens !== undefined ? { kvCacheTokens: o.kvCacheTokens } : {}) });
        return;
      }
      const server = await startServer({
        modelOptions: modelOptionsFromCli(o),
        model: o.model,
        host: o.host,
        port: o.port,
        strategy: o.strategy,
        dtype: o.dtype,
        ...(o.threads !== undefined ? { threads: o.threads } : {}),
        ...(o.modelId !== undefined ? { modelId: o.modelId } : {}),
        maxBatchSize: o.maxBatchSize,
        maxInputLength: o.maxInputLength,
        allowedMaxNewTokens: o.allowedMaxNewTokens,
        maxConcurrentRequests: o.maxConcurrentRequests,
        ...(o.maxBatchTotalTokens !== undefined ? { maxBatchTotalTokens: o.maxBatchTotalTokens } : {}),
        maxBatchPrefillTokens: o.maxBatchPrefillTokens,
        maxStopSequences: o.maxStopSequences,
        maxConnections: o.maxConnections,
        ...(o.kvCacheTokens !== undefined ? { kvCacheTokens: o.kvCacheTokens } : {}),
        shutdownTimeoutMs: o.shutdownTimeout * 1000,
        logger: o.logLevel === "silent" ? false : o.logLevel,
      });
      process.stderr.write(`blossom serve: listening on ${server.url} (web UI at ${server.url}/), loading ${o.model}\n`);

      let signals = 0;
      const onSignal = (signal: NodeJS.Signals) => {
        signals++;
        if (signals > 1) {
          process.stderr.write(`blossom serve: ${signal} again, exiting now\n`);
          process.exit(1);
        }
        process.stderr.write(`blossom serve: ${signal}: no new requests; waiting up to ${o.shutdownTimeout} s for ${server.service.sequencesInFlight} in-flight sequence(s)\n`);
        server.shutdown().then(
          ({ cancelled }) => {
            process.stderr.write(`blossom serve: stopped${cancelled ? ` (${cancelled} sequence(s) cancelled at the deadline)` : ""}\n`);
            process.exitCode = 0;
          },
          (err: unknown) => {
            process.stderr.write(`blossom serve: shutdown failed: ${(err as Error).stack ?? String(err)}\n`);
            process.exitCode = 1;
          },
        );
      };
      process.on("SIGTERM", onSignal);
      process.on("SIGINT", onSignal);

      try {
        const model = await server.ready;
        if (o.strategy === "tensor" && (model.info.tensorParallel?.size ?? 1) === 1) {
          process.stderr.write("blossom serve: --strategy tensor on 1 rank: launch it with mpirun -np N to split every layer over N processes\n");
        }
        process.stderr.write(`blossom serve: ready: ${server.url} serves ${model.dir} (${model.info.dtype}, ${model.info.threads} threads, loaded in ${model.info.loadSeconds.toFixed(2)} s)\n`);
      } catch (err) {
        process.stderr.write(`blossom serve: the model failed to load: ${cliErrorMessage(err)}\n`);
        await server.close();
        process.exitCode = 1;
      }
    });
}
