/**
 * JSON text the way Hugging Face's Python code writes it (`json.dumps(..., indent=2)`), so files we
 * produce read like downloaded ones: keys in the order given (a Map keeps insertion order even for
 * integer-like keys, which a JavaScript object would move first) and Python's float spelling
 * (`0.0`, `1e-05`) for values wrapped in {@link PythonFloat}.
 */

/** A number Python would print as a float (`0.0`, `1e-05`), where JavaScript prints `0`, `0.00001`. */
export class PythonFloat {
  constructor(readonly value: number) {}
}

/** Python's `repr(float)`: shortest round-trip digits, exponent form below 1e-4 or from 1e16. */
export function pythonFloatRepr(x: number): string {
  if (Number.isNaN(x)) return "NaN";
  if (!Number.isFinite(x)) return x > 0 ? "Infinity" : "-Infinity";
  if (x === 0) return Object.is(x, -0) ? "-0.0" : "0.0";
  const [mantissa, exponentText] = x.toExponential().split("e");
  const exponent = Number(exponentText);
  if (exponent < -4 || exponent >= 16) {
    const sign = exponent < 0 ? "-" : "+";
    return `${mantissa}e${sign}${String(Math.abs(exponent)).padStart(2, "0")}`;
  }
  const plain = x.toString(); // JavaScript prints this range without an exponent too
  return Number.isInteger(x) ? `${plain}.0` : plain;
}

/** Like `JSON.stringify(value, null, indent)`, plus Map (ordered object) and {@link PythonFloat}. */
export function stringifyJson(value: unknown, indent = 2): string {
  let text = "";
  for (const piece of jsonPieces(value, indent)) text += piece;
  return text;
}

/**
 * The text of {@link stringifyJson} in pieces, so a large document (a 250k-token vocabulary) can be
 * written to a file without first building every intermediate string.
 */
export function* jsonPieces(value: unknown, indent = 2, currentIndent = ""): Generator<string> {
  const inner = currentIndent + " ".repeat(indent);
  if (value instanceof PythonFloat) {
    yield pythonFloatRepr(value.value);
  } else if (value instanceof Map || (value !== null && typeof value === "object" && !Array.isArray(value))) {
    const entries: Iterable<[unknown, unknown]> = value instanceof Map ? value.entries() : Object.entries(value).filter(([, item]) => item !== undefined);
    let first = true;
    for (const [key, item] of entries) {
      yield `${first ? "{\n" : ",\n"}${inner}${JSON.stringify(String(key))}: `;
      yield* jsonPieces(item, indent, inner);
      first = false;
    }
    yield first ? "{}" : `\n${currentIndent}}`;
  } else if (Array.isArray(value)) {
    let first = true;
    for (const item of value) {
      yield `${first ? "[\n" : ",\n"}${inner}`;
      yield* jsonPieces(item, indent, inner);
      first = false;
    }
    yield first ? "[]" : `\n${currentIndent}]`;
  } else {
    yield JSON.stringify(value);
  }
}

/** A Map with the entries of `record` sorted by key (Python's `sort_keys=True`, code point order). */
export function sortedMap<T>(record: Record<string, T> | Map<string, T>): Map<string, T> {
  const entries = record instanceof Map ? [...record.entries()] : Object.entries(record);
  entries.sort((a, b) => compareCodePoints(a[0], b[0]));
  return new Map(entries);
}

/** Orders strings by Unicode code point (as Python and Rust do), not by UTF-16 code unit. */
export function compareCodePoints(a: string, b: string): number {
  if (a === b) return 0;
  const length = Math.min(a.length, b.length);
  for (let i = 0; i < length; i++) {
    const x = a.codePointAt(i)!;
    const y = b.codePointAt(i)!;
    if (x !== y) return x - y;
    if (x > 0xffff) i++;
  }
  return a.length - b.length;
}
