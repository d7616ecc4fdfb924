/** The machine a benchmark ran on: CPU, cores, memory, and its measured limits. */
import { cpus, totalmem } from "node:os";
import { native } from "../backend/native.js";
import { availableMemory } from "../engine/memory.js";
import { packageVersion } from "../version.js";

export interface MachineDescription {
  cpuModel: string;
  logicalCores: number;
  physicalCores: number;
  simd: string[];
  memoryTotalBytes: number;
  memoryAvailableBytes: number;
  /** Best multi-threaded streaming read (GB/s = 1e9 bytes/s) over a buffer far larger than the caches. */
  readBandwidthGBs: number | undefined;
  /** Best multi-threaded FMA throughput (GFLOP/s), all threads. */
  fmaPeakGflops: number | undefined;
  threads: number;
  kernels: string;
  node: string;
  blossom: string;
  platform: string;
}

/** Read bandwidth and FMA peak on `threads` threads (a few seconds). */
export function probeLimits(threads: number): Pick<MachineDescription, "readBandwidthGBs" | "fmaPeakGflops"> {
  const n = native();
  return { readBandwidthGBs: n.probeReadBandwidth(1 << 30, threads, 5), fmaPeakGflops: n.probeFmaPeak(threads, 5) };
}

/** Describes the machine; its limits are left undefined (probeLimits measures them). */
export function describeMachine(options: { threads?: number }): MachineDescription {
  const n = native();
  const info = n.cpuInfo();
  const threads = options.threads ?? info.physicalCores;
  const simd = (["avx2", "fma", "f16c", "avxVnni", "avx512f"] as const).filter((f) => info[f]);
  return {
    cpuModel: info.model || cpus()[0]?.model || "unknown",
    logicalCores: info.logicalCores,
    physicalCores: info.physicalCores,
    simd,
    memoryTotalBytes: totalmem(),
    memoryAvailableBytes: availableMemory(),
    readBandwidthGBs: undefined,
    fmaPeakGflops: undefined,
    threads,
    kernels: n.getKernelVariant(),
    node: process.version,
    blossom: packageVersion(),
    platform: `${process.platform}-${process.arch}`,
  };
}
