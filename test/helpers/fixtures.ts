/** Access to the golden fixtures in ../shared/fixtures (read in place, never copied into the repo). */
import { existsSync, readFileSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { SafetensorsFile } from "../../src/checkpoint/safetensors.js";
import { readTensorAsF32 } from "../../src/backend/reference.js";

// dist/test/helpers -> repository root is three levels up; fixtures live beside the repository.
const repoRoot = resolve(dirname(fileURLToPath(import.meta.url)), "../../..");
export const fixturesDir = process.env.BLOSSOM_FIXTURES ?? resolve(repoRoot, "../shared/fixtures");

export const fixtureNames = ["tiny-bloom-a", "tiny-bloom-b", "tiny-bloom-c", "trained-bloom-small"] as const;
export type FixtureName = (typeof fixtureNames)[number];

export function fixtureDir(name: FixtureName): string {
  const dir = join(fixturesDir, name);
  if (!existsSync(dir)) throw new Error(`fixture ${name} not found at ${dir} (set BLOSSOM_FIXTURES)`);
  return dir;
}

/** Logit tolerance from the fixtures' README. */
export function logitTolerance(name: FixtureName): number {
  return name === "trained-bloom-small" ? 2e-4 : 1e-4;
}

export interface GoldenPrompt {
  prompt_text: string | null;
  prompt_ids: number[];
  new_ids: number[];
  new_text: string;
  step_logits: string;
}

export interface Manifest {
  cases: {
    single: { input_ids: number[]; logits: string; argmax: number[] };
    padded_batch: { input_ids: number[][]; attention_mask: number[][]; sequences: number[][]; logits: string };
    mask_with_holes?: { input_ids: number[][]; attention_mask: number[][]; logits: string };
    kv_decode: { prompt_ids: number[]; step_ids: number[]; prompt_logits: string; step_logits: string };
    batch_kv_decode: {
      input_ids: number[][];
      attention_mask: number[][];
      sequences: number[][];
      step_ids: number[][];
      prompt_logits: string;
      step_logits: string;
    };
    greedy: { max_new_tokens: number; prompts: GoldenPrompt[] };
  };
  tokenizer_cases: { text: string; ids: number[]; decoded: string }[];
  alibi_slopes: number[];
  pad_token_id: number;
}

export class Golden {
  readonly manifest: Manifest;
  private readonly tensors: SafetensorsFile;
  constructor(readonly name: FixtureName) {
    const dir = fixtureDir(name);
    this.manifest = JSON.parse(readFileSync(join(dir, "golden/manifest.json"), "utf8")) as Manifest;
    this.tensors = SafetensorsFile.open(join(dir, "golden/tensors.safetensors"));
  }
  tensor(name: string): { data: Float32Array; shape: number[] } {
    const view = this.tensors.tensor(name);
    return { data: readTensorAsF32(view), shape: view.shape };
  }
  dispose(): void {
    this.tensors.dispose();
  }
}

/** Max |a - b| over the given ranges (each [offset, length] into both arrays, or all). */
export function maxAbsDiff(a: Float32Array, b: Float32Array, aOffset = 0, bOffset = 0, length = Math.min(a.length, b.length)): number {
  let m = 0;
  for (let i = 0; i < length; i++) {
    const d = Math.abs(a[aOffset + i]! - b[bOffset + i]!);
    if (!(d <= m)) m = Number.isNaN(d) ? Infinity : d;
  }
  return m;
}
