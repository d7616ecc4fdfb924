/**
 * The HTTP server: fastify, routes for three APIs (the original BLOOM server, text-generation-
 * inference, OpenAI completions), operations endpoints and the web UI, over one model whose engine
 * batches every client's sequences together (continuous batching, in src/engine/scheduler.ts).
 *
 * It listens before the model is loaded, so /health can say 503 while loading. Bad input never
 * reaches the engine: every request is validated first and answered 4xx with the field named.
 * An internal error is answered 500 with an id that is also in the log; the server keeps serving.
 */
import type { Socket } from "node:net";
import Fastify, { type FastifyError, type FastifyInstance, type FastifyReply, type FastifyRequest } from "fastify";
import { parameterError } from "../errors.js";
import { loadModel, type Model } from "../model.js";
import { familyOf, type ServerContext } from "./context.js";
import { errorBody, HttpError, newErrorId, statusFor } from "./http-error.js";
import type { RequestLimits } from "./limits.js";
import { ServerMetrics } from "./metrics.js";
import { defaultModelId, resolveServerOptions, type ResolvedServerOptions, type ServerOptions } from "./options.js";
import { registerOpenAiRoutes } from "./routes/openai.js";
import { registerOpsRoutes } from "./routes/ops.js";
import { registerOriginalRoutes } from "./routes/original.js";
import { registerTgiRoutes } from "./routes/tgi.js";
import { fromLibraryError, GenerationService } from "./service.js";

export interface BlossomServer {
  readonly app: FastifyInstance;
  /** e.g. http://127.0.0.1:5000 */
  readonly url: string;
  readonly port: number;
  readonly options: ResolvedServerOptions;
  readonly service: GenerationService;
  readonly metrics: ServerMetrics;
  /** Resolves once the model is loaded (rejects if loading failed). */
  readonly ready: Promise<Model>;
  /**
   * Graceful shutdown: stop admitting, let in-flight requests finish for up to `timeoutMs`
   * (default: the shutdownTimeoutMs option), cancel what is left, close the listener, and dispose
   * the model if the server loaded it.
   */
  shutdown(timeoutMs?: number): Promise<{ cancelled: number }>;
  /** shutdown(0): cancels everything in flight at once. */
  close(): Promise<void>;
}

export async function startServer(serverOptions: ServerOptions): Promise<BlossomServer> {
  const options = resolveServerOptions(serverOptions);
  const modelId = serverOptions.modelId ?? defaultModelId(serverOptions.model);
  const logger = serverOptions.logger ?? false;
  let service!: GenerationService;
  const sockets = new Set<Socket>(); // the open client connections
  const metrics = new ServerMetrics(() => service.sequencesInFlight, () => sockets.size);
  const app = Fastify({
    logger: logger === false ? false : { level: logger === true ? "info" : logger },
    // Request bodies hold prompts; 4 MiB is far above --max-input-length tokens of text.
    bodyLimit: 4 * 1024 * 1024,
    // A request (headers and body) must arrive within a minute: a client that trickles its body, or
    // never ends a chunked one, is answered 408 instead of holding its connection forever. (Responses
    // are not limited: a long generation takes what it takes.)
    requestTimeout: 60_000,
    // "/generate" (TGI) and "/generate/" (the original server) are different APIs.
    routerOptions: { ignoreTrailingSlash: false },
    // A URL the router cannot decode ("/health%") is answered in the API's own error shape, not fastify's.
    frameworkErrors: (err, request, reply) => {
      // Answered before the onRequest hooks run: counted and timed here, under route "unmatched".
      const started = performance.now();
      reply.raw.once("close", () => {
        metrics.requests.inc({ route: "unmatched", method: request.method, status: reply.raw.writableFinished ? String(reply.raw.statusCode) : "499" });
        metrics.requestDuration.observe((performance.now() - started) / 1000, { route: "unmatched" });
      });
      void (reply as FastifyReply).code(400).send(errorBody(new HttpError("malformed", `url: ${err.message}`), familyOf(request as FastifyRequest)));
    },
  });

  const batchTotalTokens = (model: Model) => Math.min(model.info.kvCacheTokens, options.maxBatchTotalTokens ?? Infinity);
  service = new GenerationService(metrics, options.maxConcurrentRequests);

  const context: ServerContext = {
    service,
    metrics,
    options,
    modelId,
    limits(model: Model): RequestLimits {
      const batchTotal = batchTotalTokens(model);
      // One sequence lives in one engine: with replicas, in one replica's cache (and batch budget).
      const perEngine = Math.min(model.kvCacheTokensPerEngine, options.maxBatchTotalTokens ?? Infinity);
      return {
        maxInputLength: options.maxInputLength,
        allowedMaxNewTokens: options.allowedMaxNewTokens,
        maxTotalTokens: Math.min(perEngine, options.maxInputLength + options.allowedMaxNewTokens),
        maxBatchTotalTokens: batchTotal,
        maxStopSequences: options.maxStopSequences,
        maxBatchSize: options.maxBatchSize,
      };
    },
    async sampleEngine() {
      const model = service.model;
      if (!model || service.state === "closed") return;
      try {
        // What the engine last pushed, without waiting for a step in progress (seconds, for a long
        // prompt's chunk); asked for only before its first report.
        const stats = model.latestStats() ?? (await model.stats());
        metrics.queueSize.set(stats.waiting);
        metrics.batchSize.set(stats.running);
        metrics.kvBlocksFree.set(stats.kvBlocksFree);
        metrics.kvBlocksTotal.set(stats.kvBlocksTotal);
      } catch {
        // The engine is gone (shutting down); keep the last figures.
      }
    },
  };

  app.decorateRequest("queryId", undefined);
  installJsonParser(app);
  installRequestMetrics(app, metrics);
  // With logging off, internal errors still go to stderr: an error id nobody can look up is useless.
  const logsErrors = logger !== false && logger !== "fatal";
  app.setErrorHandler((error: FastifyError | HttpError | Error, request, reply) => sendError(error, request, reply, logsErrors));
  // Every route's method and path pattern, to tell "wrong method" (405) from "no such path" (404).
  const routes: { method: string; pattern: RegExp }[] = [];
  app.addHook("onRoute", (route) => {
    // ":name" is one segment, "*" the rest; everything else literal (the router matches the decoded path).
    const source = route.url.split(/(:[A-Za-z0-9_]+|\*)/).map((part) => (part === "*" ? ".*" : part.startsWith(":") ? "[^/]+" : part.replace(/[.*+?^${}()|[\]\\]/g, "\\$&"))).join("");
    for (const method of [route.method].flat()) routes.push({ method, pattern: new RegExp(`^${source}$`) });
  });
  app.setNotFoundHandler((request, reply) => {
    const path = request.url.split("?")[0]!;
    let decoded = path;
    try {
      decoded = decodeURIComponent(path);
    } catch {
      // Left as sent: it matches no route either way.
    }
    // A route that exists under other methods answers 405 with Allow, as HTTP asks (GET /generate).
    const allowed = [...new Set(routes.filter((r) => r.method !== request.method && r.pattern.test(decoded)).map((r) => r.method))];
    if (allowed.length > 0) {
      const err = new HttpError("method_not_allowed", `${request.method} ${path}: method not allowed; use ${allowed.join(" or ")}`);
      return reply.code(405).header("allow", allowed.join(", ")).send(errorBody(err, familyOf(request)));
    }
    const err = new HttpError("not_found", `no route ${request.method} ${path}; see GET /info and the README for the API`);
    return reply.code(404).send(errorBody(err, familyOf(request)));
  });

  registerOriginalRoutes(app, context);
  registerTgiRoutes(app, context);
  registerOpenAiRoutes(app, context);
  registerOpsRoutes(app, context);

  app.server.on("connection", (socket: Socket) => {
    sockets.add(socket);
    socket.once("close", () => sockets.delete(socket));
  });
  // Beyond --max-connections Node closes a new connection as it accepts it ('drop').
  app.server.maxConnections = options.maxConnections;
  app.server.on("drop", () => metrics.connectionsDropped.inc());

  try {
    await app.listen({ host: options.host, port: options.port });
  } catch (err) {
    await app.close().catch(() => undefined);
    throw listenError(err, options.host, options.port);
  }
  const address = app.server.address();
  const port = typeof address === "object" && address ? address.port : options.port;
  const host = options.host.includes(":") ? `[${options.host}]` : options.host;

  const ownsModel = typeof serverOptions.model === "string";
  const ready: Promise<Model> = (async () => {
    try {
      const model =
        typeof serverOptions.model === "string"
          ? await loadModel(serverOptions.model, {
              ...serverOptions.modelOptions,
              strategy: options.strategy,
              ...(serverOptions.dtype !== undefined ? { dtype: serverOptions.dtype } : {}),
              ...(serverOptions.threads !== undefined ? { threads: serverOptions.threads } : {}),
              ...(serverOptions.kvCacheTokens !== undefined ? { kvCacheTokens: serverOptions.kvCacheTokens } : {}),
              maxBatchSize: options.maxBatchSize,
              ...(options.maxBatchTotalTokens !== undefined ? { maxBatchTotalTokens: options.maxBatchTotalTokens } : {}),
              // The server's own option, else modelOptions' (startServer callers), else the server's default.
              maxBatchPrefillTokens: serverOptions.maxBatchPrefillTokens ?? serverOptions.modelOptions?.maxBatchPrefillTokens ?? options.maxBatchPrefillTokens,
            })
          : await serverOptions.model;
      service.model = model;
      if (service.state === "loading") service.state = "ready";
      else if (ownsModel) await model.dispose(); // shut down while loading
      return model;
    } catch (err) {
      service.state = "failed";
      service.loadError = err as Error;
      app.log.error({ err }, "the model failed to load");
      throw err;
    }
  })();
  // A failed load is reported through /health and `ready`; it must not crash the process unobserved.
  ready.catch(() => undefined);

  let shuttingDown: Promise<{ cancelled: number }> | undefined;
  const shutdown = (timeoutMs = options.shutdownTimeoutMs) => {
    shuttingDown ??= (async () => {
      const result = await service.drain(timeoutMs);
      service.state = "closed";
      // Node closes the connections that are idle when close() is called; one that becomes idle
      // later would hold close() open until its keep-alive timeout (72 s). Generation is over by
      // now, so keep closing idle ones, and after 2 s close whatever is left.
      // A connection that never sent a request (a client's or browser's spare one) is not "idle"
      // to Node either: close those at once.
      for (const socket of sockets) if (socket.bytesRead === 0) socket.destroy();
      const sweep = setInterval(() => app.server.closeIdleConnections(), 100);
      const force = setTimeout(() => app.server.closeAllConnections(), 2000);
      try {
        await app.close();
      } finally {
        clearInterval(sweep);
        clearTimeout(force);
      }
      if (ownsModel && service.model) await service.model.dispose();
      return result;
    })();
    return shuttingDown;
  };

  return {
    app,
    url: `http://${host}:${port}`,
    port,
    options,
    service,
    metrics,
    ready,
    shutdown,
    close: async () => {
      await shutdown(0);
    },
  };
}

/** Strict UTF-8: a body with invalid bytes is refused rather than read with U+FFFD in their place. */
const utf8 = new TextDecoder("utf-8", { fatal: true });

/** JSON bodies parsed here so a syntax error says where it is, in the route's own error shape. */
function installJsonParser(app: FastifyInstance): void {
  app.removeContentTypeParser("application/json");
  // Only JSON is accepted: text/plain (fastify's other default) gets the 415 that names the media type.
  app.removeContentTypeParser("text/plain");
  app.addContentTypeParser("application/json", { parseAs: "buffer" }, (req, body, done) => {
    // A compressed body would be read as if it were the JSON itself.
    const encoding = (req.headers["content-encoding"] ?? "identity").trim().toLowerCase();
    if (encoding !== "identity") {
      done(new HttpError("malformed", `body: Content-Encoding ${encoding} is not supported; send the JSON uncompressed`, undefined, 415), undefined);
      return;
    }
    const charset = /;\s*charset\s*=\s*"?([^";\s]+)/i.exec(req.headers["content-type"] ?? "")?.[1]?.toLowerCase();
    if (charset !== undefined && charset !== "utf-8" && charset !== "utf8") {
      done(new HttpError("malformed", `body: charset ${charset} is not supported; send JSON in UTF-8`, undefined, 415), undefined);
      return;
    }
    let text: string;
    try {
      text = utf8.decode(body as Buffer);
    } catch {
      done(new HttpError("malformed", "body: not valid UTF-8 (JSON must be sent in UTF-8)"), undefined);
      return;
    }
    if (text.trim().length === 0) {
      done(new HttpError("malformed", "body: empty; expected a JSON object"), undefined);
      return;
    }
    try {
      done(null, JSON.parse(text));
    } catch (err) {
      done(new HttpError("malformed", `body: not valid JSON (${(err as Error).message})`), undefined);
    }
  });
}

function installRequestMetrics(app: FastifyInstance, metrics: ServerMetrics): void {
  app.addHook("onRequest", async (request, reply) => {
    const started = performance.now();
    // 'close' fires for every response, hijacked streams included, and for clients that went away.
    reply.raw.once("close", () => {
      const route = request.routeOptions?.url ?? "unmatched";
      const status = reply.raw.writableFinished ? reply.raw.statusCode : 499;
      metrics.requests.inc({ route, method: request.method, status: String(status) });
      metrics.requestDuration.observe((performance.now() - started) / 1000, { route });
    });
  });
}

function sendError(error: FastifyError | HttpError | Error, request: FastifyRequest, reply: FastifyReply, logsErrors: boolean): FastifyReply | void {
  const family = familyOf(request);
  let httpError = fromLibraryError(error);
  let errorId: string | undefined;
  if (!httpError) {
    const status = (error as FastifyError).statusCode;
    if (status !== undefined && status >= 400 && status < 500) {
      const message =
        status === 415
          ? `unsupported media type ${JSON.stringify(request.headers["content-type"] ?? "")}; send application/json`
          : status === 413
            ? `body: larger than the ${Math.round(request.routeOptions.bodyLimit / 1024 / 1024)} MiB limit`
            : `body: ${error.message}`;
      httpError = new HttpError("malformed", message, undefined, status);
    } else {
      errorId = newErrorId();
      request.log.error({ err: error, errorId }, "internal error");
      if (!logsErrors) process.stderr.write(`blossom serve: internal error ${errorId}: ${error.stack ?? error.message}\n`);
      httpError = new HttpError("internal", `internal error ${errorId}: the server logged it and keeps serving`);
    }
  }
  if (reply.sent || reply.raw.headersSent) {
    // A hijacked stream's errors are sent as events by its route; nothing more can be said here.
    if (!reply.raw.writableEnded) reply.raw.end();
    return;
  }
  const status = httpError.statusOverride ?? statusFor(httpError.kind, family);
  return reply.code(status).send(errorBody(httpError, family, { ...(errorId ? { errorId } : {}), ...(request.queryId !== undefined ? { queryId: request.queryId } : {}) }));
}

/** Why the server could not listen, named by the option to change. */
function listenError(err: unknown, host: string, port: number): unknown {
  const code = (err as NodeJS.ErrnoException)?.code;
  if (code === "EADDRINUSE") return parameterError("port", `${port} is already in use on ${host}`);
  if (code === "EACCES") return parameterError("port", `${port}: permission denied on ${host} (ports below 1024 need privileges)`);
  if (code === "EADDRNOTAVAIL" || code === "ENOTFOUND" || code === "EAI_AGAIN") return parameterError("host", `cannot listen on ${JSON.stringify(host)}: ${code === "EADDRNOTAVAIL" ? "not an address of this machine" : "the name does not resolve"}`);
  return err;
}
