/**
 * Blossom's two int8 schemes, as weight-store policies (DESIGN.md: "Offload and int8 are store
 * policies, not changes to models/").
 *
 *   int8        group-wise int8 weights: every matrix (the block linears and the tied embedding / LM
 *               head) stored as int8 with one fp16 scale per group of `groupSize` inputs of a row.
 *               Activations are quantized on the fly per token and per group to 16 bits, so the
 *               kernels multiply int8 by int16 (vpmaddwd / AVX-VNNI vpdpwssd) at close to fp32
 *               activation precision; see native/src/quant.cc and bench/int8.ts for why that beats
 *               dequantizing in registers, and why 8-bit activations were not enough.
 *   int8-mixed  LLM.int8() (Dettmers et al., 2022; bitsandbytes' Linear8bitLt in inference mode):
 *               vector-wise int8 weights (one scale per output row) and activations (one scale per
 *               token); input features where any token reaches |x| >= threshold are outliers, computed
 *               in fp32 against the dequantized weight columns, as bitsandbytes does when it holds
 *               only int8 weights (state.subB = CB[:, idx] * SCB / 127).
 */
import { parameterError } from "../errors.js";

export const quantSchemes = ["int8", "int8-mixed"] as const;
export type QuantScheme = (typeof quantSchemes)[number];

/**
 * Chosen by measurement (`npm run bench:int8 -- kernels | model | quality`). With 16-bit
 * activations the integer kernels are compute-bound from batch 8 up (and at batch 1 when the
 * machine's bandwidth is high), and every group costs one int32 -> fp32 convert and one FMA per row
 * and output. On the bloom-560m shapes, interleaved in one run of the kernel bench at batch
 * 1 / 8 / 32 / 128: group 128 took 1.00 / 1.01 / 0.97 / 1.01x bf16's time, group 256 0.73 / 0.88 /
 * 0.84 / 0.87x (at model level 256 runs 0.48-0.56 / 0.90-0.92 / 0.82 / 0.83-0.93x). 256 keeps
 * every quality target: the fixtures' next-token cosine to fp32 >= 0.9992 (128: >= 0.9991), the
 * trained model's perplexity -0.03 % (128: -0.08 %), KL to fp32 6.7e-5 per token (128: 6.2e-5),
 * greedy text agreeing on >= 10 tokens for 8 of its 9 prompts (128: 9 of 9); and it stores fewer
 * scales (1.008 bytes per weight, 0.504 of bf16). BLOOM's widths (1024 ... 14336) are all multiples
 * of 256.
 */
export const defaultGroupSize = 256;
/** LLM.int8()'s default outlier threshold (bitsandbytes' llm_int8_threshold). */
export const defaultThreshold = 6.0;

/** The quant_method written to (and required in) a quantized checkpoint's config.json. */
export const quantMethod = "blossom-int8";

/** What the native kernel does with the activations (native/src/quant.h ActivationMode). */
export type ActivationModeName = "exact" | "grouped" | "mixed";

export interface QuantSpec {
  scheme: QuantScheme;
  /** Inputs per weight scale; Infinity = one scale per row (int8-mixed). */
  groupSize: number;
  /** int8-mixed: outlier threshold on |activation|; <= 0 disables the decomposition. */
  threshold: number;
  activationMode: ActivationModeName;
}

export function isQuantScheme(dtype: string): dtype is QuantScheme {
  return (quantSchemes as readonly string[]).includes(dtype);
}

/** Resolves and validates the options of a scheme. */
export function quantSpec(scheme: QuantScheme, options: { groupSize?: number | undefined; threshold?: number | undefined } = {}): QuantSpec {
  const threshold = options.threshold ?? defaultThreshold;
  if (typeof threshold !== "number" || Number.isNaN(threshold) || threshold < 0) {
    throw parameterError("int8Threshold", `expected a number >= 0 (0 or Infinity turn the decomposition off), got ${typeof threshold === "number" ? String(threshold) : JSON.stringify(threshold)}`);
  }
  if (scheme === "int8-mixed") {
    if (options.groupSize !== undefined) {
      throw parameterError("int8GroupSize", "int8-mixed quantizes weights per row (LLM.int8's vector-wise scheme); a group size applies to int8 only");
    }
    return { scheme, groupSize: Infinity, threshold, activationMode: "mixed" };
  }
  const groupSize = options.groupSize ?? defaultGroupSize;
  if (!Number.isInteger(groupSize) || groupSize < 32 || groupSize % 32 !== 0) {
    throw parameterError("int8GroupSize", `expected a positive multiple of 32 (the int8 kernels work 32 inputs at a time), got ${groupSize}`);
  }
  return { scheme, groupSize, threshold, activationMode: "grouped" };
}

/** The group size a matrix with `inFeatures` inputs actually uses (a group never spans rows). */
export function effectiveGroupSize(spec: Pick<QuantSpec, "groupSize">, inFeatures: number): number {
  return Math.min(spec.groupSize, inFeatures);
}

/** Number of scales per row. */
export function groupsPerRow(inFeatures: number, groupSize: number): number {
  return Math.ceil(inFeatures / Math.min(groupSize, inFeatures));
}

/** Bytes an int8 matrix occupies: the int8 values plus fp16 scales. */
export function quantizedMatrixBytes(outFeatures: number, inFeatures: number, groupSize: number): number {
  return outFeatures * inFeatures + outFeatures * groupsPerRow(inFeatures, groupSize) * 2;
}

/** Name of the scale tensor stored beside an int8 weight in a quantized checkpoint. */
export function scaleTensorName(weightName: string): string {
  return `${weightName}_scale`;
}
