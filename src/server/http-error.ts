/**
 * Errors a route answers with, and how each API family spells them:
 *   tgi      text-generation-inference: {error, error_type} (422 validation, 429 overloaded)
 *   openai   OpenAI: {error: {message, type, param, code}}
 *   original the original BLOOM server (transformers-bloom-inference): {error, message, query_id}
 */
import { randomBytes } from "node:crypto";

export type ApiFamily = "tgi" | "openai" | "original";

export type ErrorKind =
  | "malformed" // the body is not JSON, or not the media type expected
  | "validation" // well-formed but wrong: unknown field, wrong type, out of range, too long
  | "not_found"
  | "method_not_allowed" // the route exists under other methods
  | "overloaded" // over the concurrency limit
  | "unavailable" // loading or shutting down
  | "generation" // the engine failed this request (it keeps serving others)
  | "client_closed" // the client went away before the answer; nobody reads it, but metrics count it
  | "internal";

export class HttpError extends Error {
  constructor(
    readonly kind: ErrorKind,
    message: string,
    /** The request field at fault (dotted path), when there is one. */
    readonly param?: string,
    /** Overrides the status the kind implies (e.g. 413, 415). */
    readonly statusOverride?: number,
  ) {
    super(message);
    this.name = "HttpError";
  }
}

export function validationError(param: string, message: string): HttpError {
  return new HttpError("validation", `${param}: ${message}`, param);
}

/** The client disconnected; its sequences were cancelled (status 499, as nginx logs it). */
export function clientClosed(): HttpError {
  return new HttpError("client_closed", "the client closed the connection; its generation was cancelled");
}

export function statusFor(kind: ErrorKind, family: ApiFamily): number {
  switch (kind) {
    case "malformed":
      return 400;
    case "validation":
      // TGI answers 422 for well-formed requests it refuses; OpenAI and the original server 400.
      return family === "tgi" ? 422 : 400;
    case "not_found":
      return 404;
    case "method_not_allowed":
      return 405;
    case "overloaded":
      return 429;
    case "unavailable":
      return 503;
    case "generation":
      return family === "tgi" ? 424 : 500;
    case "internal":
      return 500;
    case "client_closed":
      return 499;
  }
}

/** A short id to find an internal error in the log. */
export function newErrorId(): string {
  return randomBytes(6).toString("hex");
}

const tgiErrorType: Record<ErrorKind, string> = {
  malformed: "validation",
  validation: "validation",
  not_found: "not_found",
  method_not_allowed: "method_not_allowed",
  overloaded: "overloaded",
  unavailable: "unavailable",
  generation: "generation",
  internal: "internal",
  client_closed: "cancelled",
};

const openaiErrorType: Record<ErrorKind, string> = {
  malformed: "invalid_request_error",
  validation: "invalid_request_error",
  not_found: "not_found_error",
  method_not_allowed: "invalid_request_error",
  overloaded: "rate_limit_error",
  unavailable: "server_error",
  generation: "server_error",
  internal: "server_error",
  client_closed: "cancelled",
};

const originalErrorName: Record<ErrorKind, string> = {
  malformed: "BadRequest",
  validation: "ValidationError",
  not_found: "NotFound",
  method_not_allowed: "MethodNotAllowed",
  overloaded: "Overloaded",
  unavailable: "ServiceUnavailable",
  generation: "GenerationError",
  internal: "InternalServerError",
  client_closed: "ClientClosedRequest",
};

export interface ErrorBodyContext {
  errorId?: string;
  queryId?: number;
}

export function errorBody(err: HttpError, family: ApiFamily, context: ErrorBodyContext = {}): unknown {
  const { errorId, queryId } = context;
  switch (family) {
    case "tgi":
      return { error: err.message, error_type: tgiErrorType[err.kind], ...(errorId ? { error_id: errorId } : {}) };
    case "openai":
      return {
        error: {
          message: err.message,
          type: openaiErrorType[err.kind],
          param: err.param ?? null,
          code: err.kind === "overloaded" ? "overloaded" : err.kind === "internal" ? errorId ?? null : null,
        },
      };
    case "original":
      return {
        error: originalErrorName[err.kind],
        message: err.message,
        ...(queryId !== undefined ? { query_id: queryId } : {}),
        ...(errorId ? { error_id: errorId } : {}),
      };
  }
}
