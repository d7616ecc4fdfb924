/**
 * Operations: GET /health (503 until the model is loaded, and while shutting down), GET /info
 * (model, dtype, strategy, limits, version; text-generation-inference's field names plus
 * Blossom's), GET /metrics (Prometheus), and the web UI at / (plain files, no build step).
 */
import { existsSync, readFileSync } from "node:fs";
import { fileURLToPath } from "node:url";
import type { FastifyInstance } from "fastify";
import { packageVersion } from "../../version.js";
import type { ServerContext } from "../context.js";
import { HttpError } from "../http-error.js";

/** The web UI's files: src/server/webui, beside the sources (dist/ holds only compiled code). */
function webuiDir(): string {
  const candidates = [new URL("../../../../src/server/webui/", import.meta.url), new URL("../webui/", import.meta.url)];
  for (const c of candidates) {
    const dir = fileURLToPath(c);
    if (existsSync(`${dir}index.html`)) return dir;
  }
  throw new Error(`web UI files not found (looked in ${candidates.map((c) => fileURLToPath(c)).join(", ")})`);
}

const webuiFiles: Record<string, string> = {
  "index.html": "text/html; charset=utf-8",
  "app.js": "text/javascript; charset=utf-8",
  "style.css": "text/css; charset=utf-8",
};

export function registerOpsRoutes(app: FastifyInstance, context: ServerContext): void {
  const config = { family: "tgi" as const };
  const { service, options } = context;

  app.get("/health", { config }, async (_req, reply) => {
    if (service.state !== "ready") {
      const error = service.state === "loading" ? "the model is loading" : service.state === "failed" ? `the model failed to load: ${service.loadError?.message}` : "the server is shutting down";
      return reply.code(503).send({ error, error_type: "healthcheck", state: service.state });
    }
    // Answered on the main thread: a step computing for seconds (a long prompt's chunk on a CPU)
    // must not fail a liveness probe; a worker that died does.
    if (!service.readyModel().alive) {
      return reply.code(503).send({ error: "the engine worker has stopped (see the server's log); restart the server", error_type: "healthcheck", state: service.state });
    }
    return { status: "ok", state: service.state };
  });

  app.get("/info", { config }, async () => {
    const model = service.model;
    const info = model?.info;
    const limits = model ? context.limits(model) : undefined;
    const dtype = info ? (info.dtype === "auto" ? info.storedDtypes.join("+") : info.dtype) : null;
    return {
      model_id: context.modelId,
      model_sha: null,
      model_dtype: dtype,
      model_device_type: "cpu",
      model_pipeline_tag: "text-generation",
      max_concurrent_requests: options.maxConcurrentRequests,
      max_best_of: 1,
      max_stop_sequences: options.maxStopSequences,
      max_input_length: options.maxInputLength,
      max_input_tokens: options.maxInputLength,
      max_total_tokens: limits?.maxTotalTokens ?? null,
      max_batch_total_tokens: limits?.maxBatchTotalTokens ?? options.maxBatchTotalTokens ?? null,
      max_batch_size: options.maxBatchSize,
      max_client_batch_size: options.maxBatchSize,
      validation_workers: 1,
      version: packageVersion(),
      sha: null,
      docker_label: null,
      router: "blossom",
      state: service.state,
      strategy: service.model?.strategyChoice?.strategy ?? options.strategy,
      strategy_reason: service.model?.strategyChoice?.reason ?? null,
      allowed_max_new_tokens: options.allowedMaxNewTokens,
      model_type: info?.modelType ?? null,
      num_layers: info?.numLayers ?? null,
      hidden_size: info?.hiddenSize ?? null,
      num_heads: info?.numHeads ?? null,
      vocab_size: info?.vocabSize ?? null,
      weight_bytes: info?.weightBytes ?? null,
      kv_cache_tokens: info?.kvCacheTokens ?? null,
      kv_dtype: info?.kvDtype ?? null,
      threads: info?.threads ?? null,
      kernels: info?.kernels ?? null,
      load_seconds: info?.loadSeconds ?? null,
    };
  });

  app.get("/metrics", { config }, async (_req, reply) => {
    await context.sampleEngine();
    return reply.type("text/plain; version=0.0.4; charset=utf-8").send(context.metrics.registry.render());
  });

  const dir = webuiDir();
  const files = new Map(Object.entries(webuiFiles).map(([name, type]) => [name, { type, body: readFileSync(`${dir}${name}`) }]));
  const sendFile = (name: string) => {
    const file = files.get(name);
    if (!file) throw new HttpError("not_found", `no such file: /ui/${name}`);
    return file;
  };
  app.get("/", async (_req, reply) => {
    const file = sendFile("index.html");
    return reply.type(file.type).header("cache-control", "no-cache").send(file.body);
  });
  app.get<{ Params: { file: string } }>("/ui/:file", async (req, reply) => {
    const file = sendFile(req.params.file);
    return reply.type(file.type).header("cache-control", "no-cache").send(file.body);
  });
}
