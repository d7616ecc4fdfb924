/**
 * File writes shaped for 2 MiB page-cache folios.
 *
 * Decoding reads every weight once per token, so how the kernel maps a checkpoint matters: a file
 * held in the page cache in 2 MiB folios is mapped with one page-table entry per 2 MiB (no TLB
 * misses, no page walks while streaming), one held in 4 KiB pages with 512. Linux (ext4 since
 * 6.16, xfs, btrfs) allocates a written range's folios by the size and alignment of the write that
 * fills them, so a checkpoint written in 64 KiB pieces stays in 4 KiB..64 KiB folios until it is
 * evicted, and decodes up to a quarter slower than the same file read back from disk. Blossom's
 * writers (create-random, quantize, the Hub download) therefore write through this class: writes
 * are gathered and issued so that every aligned 2 MiB range of the file is filled by one write.
 */
import type { FileHandle } from "node:fs/promises";

export const HUGE_PAGE_BYTES = 2 * 1024 * 1024;

export class HugePageWriter {
  private readonly buffer = Buffer.allocUnsafe(2 * HUGE_PAGE_BYTES);
  private start: number; // file position of buffer[0]
  private length = 0;

  constructor(
    private readonly handle: FileHandle,
    position = 0,
  ) {
    this.start = position;
  }

  /** The file position right after the last byte written (or staged). */
  get position(): number {
    return this.start + this.length;
  }

  /** Writes `data` at `position` (default: right after the previous write). */
  async write(data: Uint8Array, position = this.position): Promise<void> {
    if (position !== this.position) {
      await this.flush();
      this.start = position;
    }
    let offset = 0;
    while (offset < data.byteLength) {
      // Stage up to the second 2 MiB boundary after `start`: the write then covers at least one
      // whole aligned 2 MiB range, and the next one starts on a boundary.
      const capacity = Math.ceil((this.start + HUGE_PAGE_BYTES) / HUGE_PAGE_BYTES) * HUGE_PAGE_BYTES - this.start;
      const n = Math.min(capacity - this.length, data.byteLength - offset);
      this.buffer.set(data.subarray(offset, offset + n), this.length);
      this.length += n;
      offset += n;
      if (this.length === capacity) await this.flush();
    }
  }

  /** Writes out what is staged. Call before closing the handle. */
  async flush(): Promise<void> {
    let done = 0;
    while (done < this.length) {
      const { bytesWritten } = await this.handle.write(this.buffer, done, this.length - done, this.start + done);
      done += bytesWritten;
    }
    this.start += this.length;
    this.length = 0;
  }
}
