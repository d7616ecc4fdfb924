/**
 * int8 as a weight-store policy: decides how each checkpoint matrix becomes a device matrix when
 * an int8 scheme is requested or the checkpoint is pre-quantized (`blossom quantize`).
 *
 *   quantize at load   bf16/fp16/fp32 checkpoint + dtype int8 | int8-mixed: every matrix (block
 *                      linears, embedding / LM head) is quantized by the backend, then its source
 *                      pages are dropped from the mapping so they stop counting as resident.
 *   pre-quantized      config.json has quantization_config (quant_method "blossom-int8"): int8
 *                      weights and their fp16 scales are used in place from the mapping.
 */
import type { Backend, DeviceMatrix } from "../backend/backend.js";
import type { Checkpoint } from "../checkpoint/checkpoint.js";
import type { TensorView } from "../checkpoint/safetensors.js";
import { BlossomError, checkpointError, parameterError } from "../errors.js";
import { defaultThreshold, groupsPerRow, isQuantScheme, quantMethod, quantSpec, scaleTensorName, type QuantScheme, type QuantSpec } from "./scheme.js";

export type MatrixRole = "embedding" | "lm_head" | "linear";
export type MakeMatrix = (view: TensorView, role: MatrixRole) => DeviceMatrix;

export interface Int8Options {
  /** The requested in-memory format ("auto" keeps a pre-quantized checkpoint's scheme). */
  dtype: string;
  groupSize?: number | undefined;
  threshold?: number | undefined;
}

/** The scheme a checkpoint was quantized with, validated; undefined for an ordinary checkpoint. */
export function checkpointQuantSpec(checkpoint: Checkpoint, threshold?: number): QuantSpec | undefined {
  const q = checkpoint.config.quantization;
  if (!q) return undefined;
  const file = `${checkpoint.dir}/config.json`;
  if (q.quantMethod !== quantMethod) {
    throw checkpointError(file, `quantization_config.quant_method is ${JSON.stringify(q.quantMethod)}; Blossom reads checkpoints written by \`blossom quantize\` ("${quantMethod}")`);
  }
  if (!isQuantScheme(q.scheme)) throw checkpointError(file, `quantization_config.scheme: expected "int8" or "int8-mixed", got ${JSON.stringify(q.scheme)}`);
  const storedThreshold = q.raw.threshold;
  if (storedThreshold !== undefined && (typeof storedThreshold !== "number" || Number.isNaN(storedThreshold) || storedThreshold < 0)) {
    throw checkpointError(file, `quantization_config.threshold: expected a number >= 0, got ${JSON.stringify(storedThreshold)}`);
  }
  const t = threshold ?? (typeof storedThreshold === "number" ? storedThreshold : defaultThreshold);
  if (q.scheme === "int8-mixed") return { ...quantSpec("int8-mixed", { threshold: t }) };
  if (q.groupSize % 32 !== 0) {
    throw checkpointError(file, `quantization_config.group_size: expected a multiple of 32 (as \`blossom quantize\` writes), got ${q.groupSize}`);
  }
  return { scheme: "int8", groupSize: q.groupSize, threshold: t, activationMode: "grouped" };
}

/** The safetensors metadata key under which `blossom quantize` records an int8 checkpoint's group size. */
export const groupSizeMetadataKey = "blossom_int8_group_size";

/** Checks a pre-quantized checkpoint's int8 tensors against their scales and the config's group size. */
export function validateQuantizedTensors(checkpoint: Checkpoint, spec: QuantSpec): void {
  for (const [name, view] of checkpoint.tensors) {
    if (name.endsWith("_scale")) {
      const weight = checkpoint.tensors.get(name.slice(0, -"_scale".length));
      if (!weight) throw checkpointError(view.file, `scale tensor "${name}" has no weight "${name.slice(0, -"_scale".length)}" beside it`);
      continue;
    }
    if (view.dtype !== "i8") continue;
    if (view.shape.length !== 2) throw checkpointError(view.file, `int8 tensor "${name}" must be 2-D (only matrices are quantized), got shape [${view.shape.join(", ")}]`);
    const [out, inFeatures] = view.shape as [number, number];
    const scalesName = scaleTensorName(name);
    const scales = checkpoint.tensors.get(scalesName);
    const expected = [out, groupsPerRow(inFeatures, spec.groupSize)];
    const groupText = spec.scheme === "int8-mixed" ? "int8-mixed (one scale per row)" : `group_size ${spec.groupSize}`;
    if (!scales) throw checkpointError(view.file, `int8 tensor "${name}" has no scales: missing tensor "${scalesName}" (F16, shape [${expected.join(", ")}])`);
    if (scales.dtype !== "f16") throw checkpointError(scales.file, `tensor "${scalesName}" must be F16, got ${scales.dtype}`);
    if (scales.shape.length !== 2 || scales.shape[0] !== expected[0] || scales.shape[1] !== expected[1]) {
      throw checkpointError(
        scales.file,
        `tensor "${scalesName}" has shape [${scales.shape.join(", ")}] but config.json's quantization_config (${groupText}) implies [${expected.join(", ")}] for "${name}" [${out}, ${inFeatures}]`,
      );
    }
    if (scales.byteOffset % 2 !== 0) throw checkpointError(scales.file, `tensor "${scalesName}" starts at an odd byte offset; fp16 scales must be 2-byte aligned`);
  }
  // `blossom quantize` also records the group size in each weight file: the two must agree (scale
  // shapes alone cannot tell 352 from 384 for rows of 1024).
  if (spec.scheme !== "int8") return;
  for (const f of checkpoint.files) {
    const written = f.header.metadata[groupSizeMetadataKey];
    if (written !== undefined && written !== String(spec.groupSize)) {
      throw checkpointError(`${checkpoint.dir}/config.json`, `quantization_config.group_size is ${spec.groupSize}, but ${f.file} was quantized with group size ${written}`);
    }
  }
}

/** Tensors the int8 store owns (scales), which the model's name mapping should not call unexpected. */
export function isInt8ExtraTensor(canonicalName: string): boolean {
  return canonicalName.endsWith("_scale");
}

function requireInt8Backend(backend: Backend): NonNullable<Backend["quantizedMatrix"]> {
  if (!backend.quantizedMatrix) throw new BlossomError("parameter", `dtype: the ${backend.name} backend has no int8 kernels`);
  return backend.quantizedMatrix.bind(backend);
}

/**
 * The matrix factory for an int8 store, or undefined when neither the request nor the checkpoint
 * involves int8 (the caller then uses its ordinary factory). Throws on conflicting requests.
 */
/** A pre-quantized checkpoint is used as quantized: dtype "auto" or its own scheme. `verb`: "load", "plan". */
export function checkDtypeForQuantized(dir: string, scheme: QuantScheme, dtype: string, verb: string): void {
  if (dtype !== "auto" && dtype !== scheme) throw parameterError("dtype", `${dir} is quantized (${scheme}); ${verb} it with dtype "auto" or "${scheme}", not ${JSON.stringify(dtype)}`);
}

export function int8MatrixFactory(
  checkpoint: Checkpoint,
  backend: Backend,
  options: Int8Options,
): { makeMatrix: MakeMatrix; scheme: QuantScheme; quantizesAtLoad: boolean } | undefined {
  const stored = checkpointQuantSpec(checkpoint, options.threshold);
  // The threshold is int8-mixed's alone, whether the checkpoint or the request says int8-mixed.
  const scheme = stored?.scheme ?? (isQuantScheme(options.dtype) ? options.dtype : undefined);
  if (options.threshold !== undefined && scheme !== "int8-mixed") {
    throw parameterError("int8Threshold", `applies to int8-mixed only (${stored ? `${checkpoint.dir} is quantized as ${stored.scheme}` : `dtype is ${JSON.stringify(options.dtype)}`})`);
  }
  if (stored) {
    checkDtypeForQuantized(checkpoint.dir, stored.scheme, options.dtype, "load");
    if (options.groupSize !== undefined && options.groupSize !== stored.groupSize) {
      throw parameterError(
        "int8GroupSize",
        stored.scheme === "int8-mixed"
          ? `${checkpoint.dir} is quantized as int8-mixed (one scale per row), which takes no group size`
          : `${checkpoint.dir} was quantized with group size ${stored.groupSize}; it cannot be loaded with ${options.groupSize}`,
      );
    }
    validateQuantizedTensors(checkpoint, stored);
    const quantized = requireInt8Backend(backend);
    const makeMatrix: MakeMatrix = (view) => {
      if (view.dtype !== "i8") return backend.matrix(view, view.dtype); // a matrix `blossom quantize` left as it was
      return quantized(view, stored, checkpoint.tensors.get(scaleTensorName(view.name))!);
    };
    return { makeMatrix, scheme: stored.scheme, quantizesAtLoad: false };
  }
  for (const view of checkpoint.tensors.values()) {
    if (view.dtype === "i8") throw checkpointError(view.file, `tensor "${view.name}" is int8 but config.json has no quantization_config (\`blossom quantize\` records the scheme there)`);
  }
  if (!isQuantScheme(options.dtype)) {
    if (options.groupSize !== undefined) throw parameterError("int8GroupSize", `applies to dtype int8 only (dtype is ${JSON.stringify(options.dtype)})`);
    return undefined;
  }
  const spec = quantSpec(options.dtype, options);
  const quantized = requireInt8Backend(backend);
  // Each source matrix is read once to quantize; its pages are dropped so only the int8 copy stays resident.
  const makeMatrix: MakeMatrix = (view) => quantized(view, { ...spec, releaseSource: true });
  return { makeMatrix, scheme: spec.scheme, quantizesAtLoad: true };
}
