/**
 * Which files inference needs from a repo: the config, the tokenizer files and the safetensors
 * weights, never the other weight formats a repo often carries beside them (bigscience/bloom holds
 * its weights twice, as `.bin` and `.safetensors`).
 */
import { readFile } from "node:fs/promises";
import { BlossomError } from "../errors.js";
import { checkRelativeFilename } from "./ref.js";

export const CONFIG_FILE = "config.json";
export const TOKENIZER_FILE = "tokenizer.json";
/** Used when present; a repo without them still loads. */
export const OPTIONAL_FILES = ["tokenizer_config.json", "special_tokens_map.json", "generation_config.json"] as const;
export const SINGLE_WEIGHTS_FILE = "model.safetensors";
export const WEIGHTS_INDEX_FILE = "model.safetensors.index.json";

const OTHER_WEIGHT_FORMATS = /\.(bin|pt|pth|ckpt|h5|msgpack|onnx|gguf|ggml|tflite|ot)$/;

export interface FilePlan {
  /** Files to fetch before the weights: config, tokenizer, optional extras that exist. */
  baseFiles: string[];
  /** Known-absent files (tokenizer.json and optional ones): recorded as `.no_exist` markers. */
  absentFiles: string[];
  weights: { kind: "single"; file: string } | { kind: "sharded"; index: string };
}

/** Chooses the files from a repo's listing (the API's `siblings`). `where` names the repo@revision. */
export function planFiles(siblings: readonly string[], where: string): FilePlan {
  const present = new Set(siblings);
  if (!present.has(CONFIG_FILE)) {
    throw new BlossomError("hub", `${where}: the repo has no ${CONFIG_FILE}, so it is not a transformers model repo`);
  }
  const wanted = [TOKENIZER_FILE, ...OPTIONAL_FILES];
  const baseFiles = [CONFIG_FILE, ...wanted.filter((name) => present.has(name))];
  const absentFiles = wanted.filter((name) => !present.has(name));
  // transformers tries the single file before the index; so do we.
  if (present.has(SINGLE_WEIGHTS_FILE)) return { baseFiles, absentFiles, weights: { kind: "single", file: SINGLE_WEIGHTS_FILE } };
  if (present.has(WEIGHTS_INDEX_FILE)) return { baseFiles, absentFiles, weights: { kind: "sharded", index: WEIGHTS_INDEX_FILE } };

  const otherSafetensors = siblings.filter((name) => name.endsWith(".safetensors"));
  const otherFormats = siblings.filter((name) => OTHER_WEIGHT_FORMATS.test(name));
  const found =
    otherSafetensors.length > 0
      ? `it has ${otherSafetensors.slice(0, 4).join(", ")} but neither of those names`
      : otherFormats.length > 0
        ? `it only has other formats (${otherFormats.slice(0, 4).join(", ")}${otherFormats.length > 4 ? ", …" : ""}), which Blossom does not read`
        : "it has no weight files at all";
  throw new BlossomError(
    "hub",
    `${where}: no safetensors weights (${SINGLE_WEIGHTS_FILE} or ${WEIGHTS_INDEX_FILE}); ${found}. ` +
      "Convert the checkpoint to safetensors, or pick a revision that has them " +
      "(the Hub's conversion bot often opens one as a pull request: use @refs/pr/<n>).",
  );
}

/** The shard files a `model.safetensors.index.json` names, in a stable order. */
export function shardsFromIndex(text: string, indexFile: string): string[] {
  let index: unknown;
  try {
    index = JSON.parse(text);
  } catch (err) {
    throw new BlossomError("hub", `${indexFile}: not valid JSON (${(err as Error).message})`);
  }
  const weightMap = (index as { weight_map?: unknown } | null)?.weight_map;
  if (weightMap === null || typeof weightMap !== "object" || Array.isArray(weightMap)) {
    throw new BlossomError("hub", `${indexFile}: expected an object "weight_map" {tensor name: shard file}`);
  }
  const shards = new Set<string>();
  for (const [tensor, file] of Object.entries(weightMap as Record<string, unknown>)) {
    if (typeof file !== "string") throw new BlossomError("hub", `${indexFile}: weight_map["${tensor}"] must be a file name`);
    checkRelativeFilename(file, `${indexFile} weight_map["${tensor}"]`);
    shards.add(file);
  }
  if (shards.size === 0) throw new BlossomError("hub", `${indexFile}: weight_map is empty`);
  return [...shards].sort();
}

export interface SnapshotCheck {
  /** Files inference cannot do without, not in the snapshot. */
  missingRequired: string[];
  /** Optional files neither present nor known to be absent (worth asking the Hub about). */
  unknownOptional: string[];
}

/**
 * Whether a cached snapshot folder holds everything inference needs. `isPresent` and `isKnownAbsent`
 * look at the snapshot and its `.no_exist` markers.
 */
export async function checkSnapshotFiles(
  snapshotDir: string,
  isPresent: (filename: string) => Promise<boolean>,
  isKnownAbsent: (filename: string) => Promise<boolean>,
): Promise<SnapshotCheck> {
  const missingRequired: string[] = [];
  const unknownOptional: string[] = [];
  if (!(await isPresent(CONFIG_FILE))) missingRequired.push(CONFIG_FILE);
  if (!(await isPresent(TOKENIZER_FILE)) && !(await isKnownAbsent(TOKENIZER_FILE))) missingRequired.push(TOKENIZER_FILE);
  for (const name of OPTIONAL_FILES) {
    if (!(await isPresent(name)) && !(await isKnownAbsent(name))) unknownOptional.push(name);
  }
  if (!(await isPresent(SINGLE_WEIGHTS_FILE))) {
    if (await isPresent(WEIGHTS_INDEX_FILE)) {
      const indexPath = `${snapshotDir}/${WEIGHTS_INDEX_FILE}`;
      for (const shard of shardsFromIndex(await readFile(indexPath, "utf8"), indexPath)) {
        if (!(await isPresent(shard))) missingRequired.push(shard);
      }
    } else {
      missingRequired.push(`${SINGLE_WEIGHTS_FILE} or ${WEIGHTS_INDEX_FILE}`);
    }
  }
  return { missingRequired, unknownOptional };
}
