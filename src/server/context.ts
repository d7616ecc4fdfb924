/** What every route module is given. */
import type { FastifyRequest } from "fastify";
import type { Model } from "../model.js";
import type { ApiFamily } from "./http-error.js";
import type { RequestLimits } from "./limits.js";
import type { ServerMetrics } from "./metrics.js";
import type { ResolvedServerOptions } from "./options.js";
import type { GenerationService } from "./service.js";

export interface ServerContext {
  readonly service: GenerationService;
  readonly metrics: ServerMetrics;
  readonly options: ResolvedServerOptions;
  readonly modelId: string;
  /** Limits that depend on the loaded model (its KV-cache size). */
  limits(model: Model): RequestLimits;
  /** Refreshes the engine gauges (queue, batch, KV blocks) from the engine's stats. */
  sampleEngine(): Promise<void>;
}

declare module "fastify" {
  interface FastifyContextConfig {
    /** Which API's error shapes a route answers with. */
    family?: ApiFamily;
  }
  interface FastifyRequest {
    /** The original server's query id for this request (its errors carry it). */
    queryId: number | undefined;
  }
}

export function familyOf(request: FastifyRequest): ApiFamily {
  const configured = request.routeOptions?.config?.family;
  if (configured) return configured;
  const path = request.url.split("?")[0] ?? "";
  if (path.startsWith("/v1/")) return "openai";
  if (["/generate/", "/tokenize/", "/forward/", "/query_id/"].includes(path)) return "original";
  return "tgi";
}
