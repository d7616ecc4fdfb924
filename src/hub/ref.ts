/**
 * Parsing and validating Hub references: `org/name[@revision]`, `name[@revision]`, revisions and
 * file names that come back from the Hub. The rules follow huggingface_hub's `validate_repo_id`, so a
 * reference Python accepts is accepted here and vice versa.
 */
import { BlossomError } from "../errors.js";

export const DEFAULT_REVISION = "main";

export interface ModelRef {
  repoId: string;
  /** As the user wrote it; undefined when the ref named none. */
  revision: string | undefined;
}

const COMMIT_HASH = /^[0-9a-f]{40}$/;
// huggingface_hub: `^(\b[\w\-.]+\b/)?\b[\w\-.]+\b$` — each part starts and ends with a word character.
const REPO_ID_PART = /^[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?$/;
const REPO_ID_MAX_LENGTH = 96;

export function isCommitHash(revision: string): boolean {
  return COMMIT_HASH.test(revision);
}

/** Why `repoId` is not a valid Hub model id, or undefined when it is. */
export function repoIdProblem(repoId: string): string | undefined {
  const parts = repoId.split("/");
  if (parts.length > 2) return "a repo id has at most one '/' (org/name)";
  if (!parts.every((part) => REPO_ID_PART.test(part))) {
    return "each part may use only letters, digits, '-', '_' and '.', and must start and end with a letter or digit";
  }
  if (repoId.includes("--") || repoId.includes("..")) return "'--' and '..' are not allowed";
  if (repoId.endsWith(".git")) return "a repo id cannot end with '.git'";
  if (repoId.length > REPO_ID_MAX_LENGTH) return `a repo id has at most ${REPO_ID_MAX_LENGTH} characters`;
  return undefined;
}

/** Why `revision` is unusable (it becomes a path under refs/), or undefined when it is fine. */
export function revisionProblem(revision: string): string | undefined {
  if (revision.length === 0) return "the revision is empty";
  if (revision.startsWith("/") || revision.endsWith("/")) return "a revision cannot start or end with '/'";
  if (/[\\\u0000-\u001f]/.test(revision)) return "a revision cannot contain '\\' or control characters";
  if (revision.split("/").some((part) => part === "" || part === "." || part === "..")) {
    return "a revision cannot contain empty, '.' or '..' path segments";
  }
  return undefined;
}

/**
 * Splits `org/name[@revision]` (or `name[@revision]`). Throws a BlossomError naming `ref` when it is
 * not a valid reference, so a mistyped folder name reads as such rather than as a Hub failure.
 */
export function parseModelRef(ref: string): ModelRef {
  const at = ref.indexOf("@");
  const repoId = at < 0 ? ref : ref.slice(0, at);
  const revision = at < 0 ? undefined : ref.slice(at + 1);
  const looksLikePath = /^(\.{1,2}\/|\/|~)/.test(ref) || ref.includes("\\") || ref.startsWith(".");
  if (looksLikePath) {
    throw new BlossomError("hub", `model '${ref}': no such folder (and it is not a Hub id of the form org/name[@revision])`);
  }
  const idProblem = repoIdProblem(repoId);
  if (idProblem !== undefined) {
    throw new BlossomError(
      "hub",
      `model '${ref}': not an existing folder, nor a valid Hub id of the form org/name[@revision]: ${idProblem}`,
    );
  }
  if (revision !== undefined) {
    const problem = revisionProblem(revision);
    if (problem !== undefined) throw new BlossomError("hub", `model '${ref}': invalid revision '${revision}': ${problem}`);
  }
  return { repoId, revision };
}

/**
 * A file name from the Hub (a sibling or a shard named by an index) is joined onto the cache folder:
 * refuse anything that could escape it.
 */
export function checkRelativeFilename(filename: string, source: string): void {
  const bad =
    filename.length === 0 ||
    filename.startsWith("/") ||
    /^[A-Za-z]:/.test(filename) ||
    /[\\\0]/.test(filename) ||
    filename.split("/").some((part) => part === "" || part === "." || part === "..");
  if (bad) throw new BlossomError("hub", `${source}: unsafe file name '${filename}' (must be a plain relative path)`);
}
