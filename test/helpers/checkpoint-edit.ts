/** Builds broken copies of fixture checkpoints in temporary folders, for error-path tests. */
import { copyFileSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

/** Copies a checkpoint folder (top level files only) into a fresh temporary folder. */
export function copyCheckpoint(dir: string): { dir: string; cleanup(): void } {
  const out = mkdtempSync(join(tmpdir(), "blossom-ckpt-"));
  for (const f of readdirSync(dir, { withFileTypes: true })) if (f.isFile()) copyFileSync(join(dir, f.name), join(out, f.name));
  return { dir: out, cleanup: () => rmSync(out, { recursive: true, force: true }) };
}

export type HeaderJson = Record<string, { dtype: string; shape: number[]; data_offsets: [number, number] } | Record<string, string>>;

/** Splits a safetensors file into its header JSON and data section. */
export function readParts(file: string): { header: HeaderJson; data: Buffer } {
  const buf = readFileSync(file);
  const n = Number(buf.readBigUInt64LE(0));
  return { header: JSON.parse(buf.subarray(8, 8 + n).toString("utf8")) as HeaderJson, data: buf.subarray(8 + n) };
}

/** Writes a safetensors file from a header JSON (or raw header text) and a data section. */
export function writeParts(file: string, header: HeaderJson | string, data: Buffer): void {
  let text = typeof header === "string" ? header : JSON.stringify(header);
  while ((8 + Buffer.byteLength(text)) % 8 !== 0) text += " ";
  const len = Buffer.alloc(8);
  len.writeBigUInt64LE(BigInt(Buffer.byteLength(text)));
  writeFileSync(file, Buffer.concat([len, Buffer.from(text, "utf8"), data]));
}

/** Rewrites a safetensors file's header with `edit`, keeping the data. */
export function editHeader(file: string, edit: (header: HeaderJson) => void): void {
  const { header, data } = readParts(file);
  edit(header);
  writeParts(file, header, data);
}

export function editJson(file: string, edit: (json: Record<string, unknown>) => void): void {
  const json = JSON.parse(readFileSync(file, "utf8")) as Record<string, unknown>;
  edit(json);
  writeFileSync(file, JSON.stringify(json, null, 2));
}
