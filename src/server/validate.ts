/**
 * Request bodies are checked against zod schemas; the first problem becomes a validation error
 * whose message starts with the field's dotted path and says what was expected and what came,
 * e.g. "parameters.temperature: must be > 0 (got -1)" or "parameters.foo: unknown field".
 */
import type { z } from "zod";
import { HttpError } from "./http-error.js";

export function parseBody<S extends z.ZodType>(schema: S, body: unknown): z.output<S> {
  const result = schema.safeParse(body);
  if (result.success) return result.data;
  // An unknown field usually means a misspelt one, which also explains a "required" error beside it.
  const issues = result.error.issues;
  throw issueToError(issues.find((i) => i.code === "unrecognized_keys") ?? issues[0]!, body, schema);
}

function pathString(path: readonly PropertyKey[]): string {
  let out = "";
  for (const p of path) {
    if (typeof p === "number") out += `[${p}]`;
    else out += out ? `.${String(p)}` : String(p);
  }
  return out;
}

function valueAt(root: unknown, path: readonly PropertyKey[]): unknown {
  let v = root;
  for (const p of path) {
    if (v === null || typeof v !== "object") return undefined;
    v = (v as Record<PropertyKey, unknown>)[p];
  }
  return v;
}

export function describeValue(value: unknown): string {
  if (value === undefined) return "nothing";
  if (value === null) return "null";
  if (typeof value === "number" || typeof value === "boolean") return String(value);
  if (typeof value === "string") return JSON.stringify(value.length > 40 ? `${value.slice(0, 40)}...` : value);
  if (Array.isArray(value)) return `an array of ${value.length}`;
  return typeof value === "object" ? "an object" : typeof value;
}

const typeNames: Record<string, string> = {
  number: "a number",
  int: "an integer",
  string: "a string",
  boolean: "a boolean",
  array: "an array",
  object: "an object",
  record: "an object",
  null: "null",
};

interface SchemaDef {
  type?: string;
  format?: string;
  shape?: Record<string, unknown>;
  element?: unknown;
  innerType?: unknown;
  in?: unknown;
}

/** The definition of the schema at `path`, through optional/nullable/default wrappers (best effort over zod's internals). */
function schemaAt(schema: z.ZodType, path: readonly PropertyKey[]): SchemaDef | undefined {
  let s: unknown = schema;
  const unwrap = (): SchemaDef | undefined => {
    for (;;) {
      const def = (s as { _zod?: { def?: SchemaDef } })._zod?.def;
      if (def && (def.type === "optional" || def.type === "nullable" || def.type === "default")) s = def.innerType;
      else if (def && def.type === "pipe") s = def.in;
      else return def;
    }
  };
  for (const p of path) {
    const def = unwrap();
    if (def?.type === "object" && typeof p === "string") s = def.shape?.[p];
    else if (def?.type === "array") s = def.element;
    else return undefined;
  }
  return unwrap();
}

/** Field names the object schema at `path` knows, for "unknown field" messages. */
function knownKeys(schema: z.ZodType, path: readonly PropertyKey[]): string[] {
  const def = schemaAt(schema, path);
  return def?.type === "object" ? Object.keys(def.shape ?? {}) : [];
}

function issueToError(issue: z.core.$ZodIssue, body: unknown, schema: z.ZodType): HttpError {
  if (issue.code === "unrecognized_keys") {
    const field = pathString([...issue.path, issue.keys[0]!]);
    const known = knownKeys(schema, issue.path);
    return new HttpError("validation", `${field}: unknown field${known.length ? ` (expected one of: ${known.join(", ")})` : ""}`, field);
  }
  const field = pathString(issue.path) || "body";
  const value = valueAt(body, issue.path);
  const got = `(got ${describeValue(value)})`;
  let expectation: string;
  // A message the schema set itself (zod's own start with these words) says it best.
  const custom = !/^(Invalid|Too (big|small)|Unrecognized)/.test(issue.message);
  if (custom) expectation = issue.message;
  else switch (issue.code) {
    case "invalid_type": {
      const expected = issue.expected === "number" && schemaAt(schema, issue.path)?.format?.endsWith("int") ? "int" : issue.expected;
      expectation = value === undefined ? "is required" : `must be ${typeNames[expected] ?? expected}`;
      break;
    }
    case "too_big": {
      const origin = issue.origin;
      const bound = `${issue.inclusive ? "<=" : "<"} ${issue.maximum}`;
      if (origin === "array" || origin === "set") expectation = `must have at most ${issue.maximum} items`;
      else if (origin === "string") expectation = `must be at most ${issue.maximum} characters`;
      // zod's integers stop at 2^53 - 1: past it the number is no longer an exact integer at all.
      else if (Number(issue.maximum) === Number.MAX_SAFE_INTEGER) expectation = "must be a safe integer (at most 2^53 - 1)";
      else expectation = `must be ${bound}`;
      break;
    }
    case "too_small": {
      const origin = issue.origin;
      const bound = `${issue.inclusive ? ">=" : ">"} ${issue.minimum}`;
      if (origin === "array" || origin === "set") expectation = Number(issue.minimum) === 1 ? "must not be empty" : `must have at least ${issue.minimum} items`;
      else if (origin === "string") expectation = Number(issue.minimum) === 1 ? "must not be empty" : `must be at least ${issue.minimum} characters`;
      else expectation = `must be ${bound}`;
      break;
    }
    case "invalid_value":
      expectation = `must be one of ${issue.values.map((v) => JSON.stringify(v)).join(", ")}`;
      break;
    default:
      expectation = issue.message;
  }
  return new HttpError("validation", `${field}: ${expectation} ${value === undefined && issue.code === "invalid_type" ? "" : got}`.trimEnd(), field);
}
