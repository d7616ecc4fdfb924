/**
 * Safetensors reading: the header is parsed and checked here; the data is memory-mapped by the
 * addon and addressed in place (no copy).
 *
 * Format (https://github.com/huggingface/safetensors): 8-byte little-endian header length N,
 * N bytes of JSON {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}},
 * then the data section; offsets are relative to its start.
 */
import { closeSync, fstatSync, openSync, readSync, statSync } from "node:fs";
import { BlossomError, checkpointError } from "../errors.js";
import { native, type NativeRegion, type StorageDType } from "../backend/native.js";

/** Safetensors dtype names Blossom reads, with their storage dtype and element size. */
export const safetensorsDtypes = {
  F32: { dtype: "f32", bytes: 4 },
  F16: { dtype: "f16", bytes: 2 },
  BF16: { dtype: "bf16", bytes: 2 },
  I8: { dtype: "i8", bytes: 1 },
} as const satisfies Record<string, { dtype: StorageDType; bytes: number }>;
export type SafetensorsDtype = keyof typeof safetensorsDtypes;

/** A tensor inside a mapped file: where it is and what it holds. */
export interface TensorView {
  name: string; // the name as stored in the file
  file: string;
  dtype: StorageDType;
  shape: number[];
  region: NativeRegion;
  byteOffset: number; // from the start of the file (mapping)
  byteLength: number;
}

export interface SafetensorsHeader {
  headerLength: number;
  dataStart: number;
  fileSize: number;
  metadata: Record<string, string>;
  tensors: Map<string, { dtype: SafetensorsDtype; shape: number[]; begin: number; end: number }>;
  /**
   * The first data bytes that belong to no tensor, if any: a hole, trailing data, or a name listed
   * twice (JSON keeps the last). The safetensors library refuses such files; the loader does too,
   * after its checks of names and shapes, which say more when a tensor is missing.
   */
  uncovered: [number, number] | undefined;
}

/** Refuses a file whose data section is not exactly covered by its tensors (see SafetensorsHeader.uncovered). */
export function checkCoverage(file: string, header: SafetensorsHeader): void {
  if (!header.uncovered) return;
  const [a, b] = header.uncovered;
  const size = header.fileSize - header.dataStart;
  throw checkpointError(file, `data section: bytes ${a}-${b} belong to no tensor (a hole, trailing data, or a tensor name listed twice); the tensors must cover the ${size} bytes exactly`);
}

/** The safetensors library refuses headers above 100 MB; so do we. */
const maxHeaderBytes = 100_000_000;

/** Reads and validates the header of a safetensors file without mapping it. */
export function readSafetensorsHeader(file: string): SafetensorsHeader {
  let fd: number;
  try {
    // Checked before opening: opening a FIFO would wait for a writer.
    if (!statSync(file).isFile()) throw checkpointError(file, "is not a regular file (a folder or a pipe?); expected a safetensors file");
    fd = openSync(file, "r");
  } catch (err) {
    if (err instanceof BlossomError) throw err;
    throw checkpointError(file, `cannot open (${(err as NodeJS.ErrnoException).code ?? String(err)})`);
  }
  try {
    const fileSize = fstatSync(fd).size;
    if (fileSize < 8) throw checkpointError(file, `file is ${fileSize} bytes; a safetensors file starts with an 8-byte header length`);
    const lenBuf = Buffer.alloc(8);
    readSync(fd, lenBuf, 0, 8, 0);
    const headerLength = Number(lenBuf.readBigUInt64LE(0));
    if (headerLength > fileSize - 8) {
      throw checkpointError(file, `header length ${headerLength} runs past the end of the file (${fileSize} bytes)`);
    }
    if (headerLength > maxHeaderBytes) throw checkpointError(file, `header length ${headerLength} exceeds the ${maxHeaderBytes}-byte limit`);
    const headerBuf = Buffer.alloc(headerLength);
    readSync(fd, headerBuf, 0, headerLength, 8);
    let json: unknown;
    try {
      json = JSON.parse(new TextDecoder("utf-8", { fatal: true }).decode(headerBuf));
    } catch (err) {
      throw checkpointError(file, `header is not valid JSON in UTF-8 (${(err as Error).message})`);
    }
    if (typeof json !== "object" || json === null || Array.isArray(json)) {
      throw checkpointError(file, "header must be a JSON object of tensors");
    }
    const dataStart = 8 + headerLength;
    const dataSize = fileSize - dataStart;
    const tensors: SafetensorsHeader["tensors"] = new Map();
    let metadata: Record<string, string> = {};
    for (const [name, entry] of Object.entries(json as Record<string, unknown>)) {
      if (name === "__metadata__") {
        if (typeof entry !== "object" || entry === null || Array.isArray(entry) || Object.values(entry).some((v) => typeof v !== "string")) {
          throw checkpointError(file, `"__metadata__" must map strings to strings`);
        }
        metadata = entry as Record<string, string>;
        continue;
      }
      const where = `tensor "${name}"`;
      if (typeof entry !== "object" || entry === null) throw checkpointError(file, `${where}: entry must be an object`);
      const { dtype, shape, data_offsets: offsets } = entry as Record<string, unknown>;
      if (typeof dtype !== "string" || !(dtype in safetensorsDtypes)) {
        throw checkpointError(file, `${where}: dtype ${JSON.stringify(dtype)} is not supported (expected one of ${Object.keys(safetensorsDtypes).join(", ")})`);
      }
      if (!Array.isArray(shape) || shape.some((d) => !Number.isSafeInteger(d) || d < 0)) {
        throw checkpointError(file, `${where}: shape must be a list of non-negative integers, got ${JSON.stringify(shape)}`);
      }
      if (
        !Array.isArray(offsets) ||
        offsets.length !== 2 ||
        offsets.some((o) => !Number.isSafeInteger(o) || o < 0) ||
        (offsets[0] as number) > (offsets[1] as number)
      ) {
        throw checkpointError(file, `${where}: data_offsets must be [begin, end] with 0 <= begin <= end, got ${JSON.stringify(offsets)}`);
      }
      const [begin, end] = offsets as [number, number];
      if (end > dataSize) {
        throw checkpointError(file, `${where}: data_offsets [${begin}, ${end}] run past the data section (${dataSize} bytes)`);
      }
      const numel = (shape as number[]).reduce((a, b) => a * b, 1);
      const expected = numel * safetensorsDtypes[dtype as SafetensorsDtype].bytes;
      if (end - begin !== expected) {
        throw checkpointError(file, `${where}: data_offsets span ${end - begin} bytes but ${dtype} ${JSON.stringify(shape)} needs ${expected}`);
      }
      tensors.set(name, { dtype: dtype as SafetensorsDtype, shape: shape as number[], begin, end });
    }
    // Overlapping tensors would alias each other's bytes: refuse them.
    const byBegin = [...tensors.entries()].filter(([, t]) => t.end > t.begin).sort((a, b) => a[1].begin - b[1].begin);
    for (let i = 1; i < byBegin.length; i++) {
      const [prevName, prev] = byBegin[i - 1]!;
      const [name, cur] = byBegin[i]!;
      if (cur.begin < prev.end) {
        throw checkpointError(file, `tensor "${name}" (bytes ${cur.begin}-${cur.end}) overlaps tensor "${prevName}" (bytes ${prev.begin}-${prev.end})`);
      }
    }
    // The tensors must cover the data section exactly, as the safetensors library requires: bytes that
    // belong to no tensor mean a hole, trailing data, or a name listed twice (JSON keeps the last).
    let covered = 0;
    for (const [, t] of byBegin) {
      if (t.begin !== covered) break;
      covered = t.end;
    }
    const uncovered: [number, number] | undefined =
      covered === dataSize ? undefined : [covered, byBegin.find(([, t]) => t.begin > covered)?.[1].begin ?? dataSize];
    return { headerLength, dataStart, fileSize, metadata, tensors, uncovered };
  } finally {
    closeSync(fd);
  }
}

/** A mapped safetensors file. `dispose()` unmaps it. */
export class SafetensorsFile {
  readonly file: string;
  readonly header: SafetensorsHeader;
  readonly region: NativeRegion;
  private disposed = false;

  private constructor(file: string, header: SafetensorsHeader, region: NativeRegion) {
    this.file = file;
    this.header = header;
    this.region = region;
  }

  static open(file: string): SafetensorsFile {
    const header = readSafetensorsHeader(file);
    let region: NativeRegion;
    try {
      region = native().mapFile(file);
    } catch (err) {
      const message = (err as Error).message;
      throw checkpointError(file, message.startsWith(`${file}: `) ? message.slice(file.length + 2) : message);
    }
    return new SafetensorsFile(file, header, region);
  }

  names(): string[] {
    return [...this.header.tensors.keys()];
  }

  tensor(name: string): TensorView {
    const t = this.header.tensors.get(name);
    if (!t) throw checkpointError(this.file, `no tensor named "${name}"`);
    return {
      name,
      file: this.file,
      dtype: safetensorsDtypes[t.dtype].dtype,
      shape: t.shape,
      region: this.region,
      byteOffset: this.header.dataStart + t.begin,
      byteLength: t.end - t.begin,
    };
  }

  dispose(): void {
    if (this.disposed) return;
    this.disposed = true;
    native().release(this.region);
  }
}
