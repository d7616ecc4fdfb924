/**
 * The minimal safetensors writer `blossom quantize` needs (kept behind `SafetensorsWriter` so a shared
 * writer can replace it). The header is written first, from the declared tensors; data is then
 * written at each tensor's position in any order, so a tensor and its scales can be produced
 * together even though they sit apart in the file. Tensors are laid out by decreasing element size
 * (as the safetensors library does), so every tensor starts aligned to its element size without
 * holes in the data section.
 */
import { closeSync, openSync, writeSync } from "node:fs";
import { native, type NativeRegion } from "../backend/native.js";
import { safetensorsDtypes, type SafetensorsDtype } from "../checkpoint/safetensors.js";
import { BlossomError } from "../errors.js";

export interface TensorEntry {
  name: string;
  dtype: SafetensorsDtype;
  shape: number[];
}

export function tensorBytes(t: TensorEntry): number {
  return t.shape.reduce((a, b) => a * b, 1) * safetensorsDtypes[t.dtype].bytes;
}

/** Entries by decreasing element size, stable within a size: every offset stays aligned. */
export function alignedOrder<T extends TensorEntry>(entries: T[]): T[] {
  return entries
    .map((e, i) => [e, i] as const)
    .sort((a, b) => safetensorsDtypes[b[0].dtype].bytes - safetensorsDtypes[a[0].dtype].bytes || a[1] - b[1])
    .map(([e]) => e);
}

export class SafetensorsWriter {
  readonly file: string;
  readonly dataBytes: number;
  private readonly fd: number;
  private readonly dataStart: number;
  private readonly layout = new Map<string, { begin: number; end: number; written: number }>();
  private closed = false;

  /** Creates `file` with the header for `entries` (in this order) and `metadata`. */
  constructor(file: string, entries: TensorEntry[], metadata: Record<string, string> = { format: "pt" }) {
    this.file = file;
    const header: Record<string, unknown> = { __metadata__: metadata };
    let offset = 0;
    for (const e of entries) {
      if (this.layout.has(e.name)) throw new BlossomError("internal", `safetensors writer: tensor "${e.name}" declared twice`);
      const size = tensorBytes(e);
      header[e.name] = { dtype: e.dtype, shape: e.shape, data_offsets: [offset, offset + size] };
      this.layout.set(e.name, { begin: offset, end: offset + size, written: 0 });
      offset += size;
    }
    this.dataBytes = offset;
    let text = JSON.stringify(header);
    // The data section starts 8-byte aligned.
    text += " ".repeat((8 - ((8 + Buffer.byteLength(text)) % 8)) % 8);
    const headerBytes = Buffer.from(text, "utf8");
    const length = Buffer.alloc(8);
    length.writeBigUInt64LE(BigInt(headerBytes.length));
    this.dataStart = 8 + headerBytes.length;
    this.fd = openSync(file, "w");
    writeSync(this.fd, length, 0, 8, 0);
    writeSync(this.fd, headerBytes, 0, headerBytes.length, 8);
  }

  /** Writes `data` into tensor `name` starting `offset` bytes into it. */
  write(name: string, data: Uint8Array, offset = 0): void {
    const t = this.layout.get(name);
    if (!t) throw new BlossomError("internal", `safetensors writer: tensor "${name}" was not declared`);
    if (offset + data.length > t.end - t.begin) throw new BlossomError("internal", `safetensors writer: data for "${name}" runs past its ${t.end - t.begin} bytes`);
    let done = 0;
    while (done < data.length) done += writeSync(this.fd, data, done, data.length - done, this.dataStart + t.begin + offset + done);
    t.written += data.length;
  }

  /** Writes `byteLength` bytes of a native region (a mapping or an allocation) into tensor `name`. */
  writeRegion(name: string, region: NativeRegion, byteOffset: number, byteLength: number): void {
    const chunk = 64 * 2 ** 20;
    for (let done = 0; done < byteLength; done += chunk) {
      const n = Math.min(chunk, byteLength - done);
      this.write(name, new Uint8Array(native().view(region, byteOffset + done, n)), done);
    }
  }

  /** Closes the file; every declared tensor must have been written in full. */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    closeSync(this.fd);
    for (const [name, t] of this.layout) {
      if (t.written !== t.end - t.begin) throw new BlossomError("internal", `safetensors writer: ${this.file}: tensor "${name}" got ${t.written} of ${t.end - t.begin} bytes`);
    }
  }

  /** Closes the file without checking (after a failure). */
  abort(): void {
    if (this.closed) return;
    this.closed = true;
    closeSync(this.fd);
  }
}
