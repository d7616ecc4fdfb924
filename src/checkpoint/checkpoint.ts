/**
 * A checkpoint folder in Hugging Face layout: config.json plus model.safetensors, or
 * model.safetensors.index.json and the shards it lists. Every file is memory-mapped; tensors are
 * views into the mappings. Which tensors a model needs is the model's business (src/models/).
 */
import { existsSync, readdirSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { checkpointError } from "../errors.js";
import { readBloomConfig, type BloomConfig } from "./config.js";
import { SafetensorsFile, type TensorView } from "./safetensors.js";

export const singleFileName = "model.safetensors";
export const indexFileName = "model.safetensors.index.json";

export interface Checkpoint {
  dir: string;
  config: BloomConfig;
  /** Tensors by the name stored in the files. */
  tensors: Map<string, TensorView>;
  files: SafetensorsFile[];
  /** Bytes of tensor data across all files. */
  totalBytes: number;
  dispose(): void;
}

/** Which safetensors files make up the checkpoint, and (if sharded) which tensor lives where. */
function listWeightFiles(dir: string): { files: string[]; weightMap: Map<string, string> | undefined } {
  // One file beside an index: the file, as transformers' from_pretrained and the Hub download choose.
  if (existsSync(join(dir, singleFileName))) return { files: [singleFileName], weightMap: undefined };
  const indexPath = join(dir, indexFileName);
  if (existsSync(indexPath)) {
    let json: unknown;
    try {
      json = JSON.parse(readFileSync(indexPath, "utf8"));
    } catch (err) {
      throw checkpointError(indexPath, `invalid JSON (${(err as Error).message})`);
    }
    const weightMap = (json as { weight_map?: unknown } | null)?.weight_map;
    if (typeof weightMap !== "object" || weightMap === null || Array.isArray(weightMap)) {
      throw checkpointError(indexPath, `expected an object "weight_map" mapping tensor names to shard files`);
    }
    const map = new Map<string, string>();
    for (const [name, shard] of Object.entries(weightMap)) {
      if (typeof shard !== "string" || shard.includes("/") || shard.includes("\\") || shard === ".." || shard === "." || shard === "") {
        throw checkpointError(indexPath, `weight_map["${name}"] must be a file name in the checkpoint folder, got ${JSON.stringify(shard)}`);
      }
      map.set(name, shard);
    }
    const files = [...new Set(map.values())].sort();
    for (const f of files) {
      if (!existsSync(join(dir, f))) {
        const example = [...map.entries()].find(([, s]) => s === f)![0];
        throw checkpointError(indexPath, `shard "${f}" (holding tensor "${example}" and others) is missing from ${dir}`);
      }
    }
    return { files, weightMap: map };
  }
  const present = existsSync(dir) ? readdirSync(dir) : [];
  const other = present.filter((f) => /\.(bin|pt|pth|h5|msgpack|ckpt)$/.test(f));
  const hint = other.length
    ? ` Found ${other.join(", ")}: Blossom reads safetensors only (convert with transformers' save_pretrained(..., safe_serialization=True)).`
    : "";
  throw checkpointError(dir, `no ${singleFileName} or ${indexFileName} in the checkpoint folder.${hint}`);
}

/** Opens a checkpoint folder: validates config.json and every safetensors header, maps the files. */
export function openCheckpoint(dir: string): Checkpoint {
  if (!existsSync(dir)) throw checkpointError(dir, "no such folder");
  const config = readBloomConfig(dir);
  const { files: names, weightMap } = listWeightFiles(dir);
  const files: SafetensorsFile[] = [];
  const dispose = () => files.forEach((f) => f.dispose());
  try {
    const tensors = new Map<string, TensorView>();
    let totalBytes = 0;
    for (const name of names) {
      const file = SafetensorsFile.open(join(dir, name));
      files.push(file);
      for (const tensorName of file.names()) {
        const view = file.tensor(tensorName);
        const previous = tensors.get(tensorName);
        if (previous) throw checkpointError(file.file, `tensor "${tensorName}" also appears in ${previous.file}`);
        if (weightMap && weightMap.get(tensorName) !== name) {
          const listed = weightMap.get(tensorName);
          throw checkpointError(
            file.file,
            listed === undefined
              ? `tensor "${tensorName}" is not listed in ${indexFileName}`
              : `tensor "${tensorName}" is listed in ${indexFileName} under "${listed}", not this shard`,
          );
        }
        tensors.set(tensorName, view);
        totalBytes += view.byteLength;
      }
    }
    if (weightMap) {
      for (const [tensorName, shard] of weightMap) {
        if (!tensors.has(tensorName)) {
          throw checkpointError(join(dir, shard), `tensor "${tensorName}" is listed in ${indexFileName} but missing from this shard`);
        }
      }
    }
    return { dir, config, tensors, files, totalBytes, dispose };
  } catch (err) {
    dispose();
    throw err;
  }
}
