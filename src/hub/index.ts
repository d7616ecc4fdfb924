/** Model references → local folders, through the Hugging Face Hub and its cache. */
export { resolveModel, type ResolveOptions, type ResolvedModel } from "./resolve.js";
export { downloadSnapshot, type SnapshotDownloadOptions, type SnapshotDownloadResult } from "./snapshot.js";
export { scanCache, scanRepo, removeFromCache, repoFolderName, type CachedRepo, type CachedRevision, type RemovalResult } from "./cache.js";
export { parseModelRef, isCommitHash, type ModelRef } from "./ref.js";
export { hubCacheDir, hubEndpoint, hubOffline, hubToken } from "./settings.js";
export { HubConnectionError } from "./api.js";
