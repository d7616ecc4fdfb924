/** Blossom's library entry point. */
export { loadModel, Model, Session } from "./model.js";
export type { LoadModelOptions, GenerateResult, StreamEvent, PerplexityResult, ForwardResult, ModelDType } from "./model.js";
export { BlossomError } from "./errors.js";
export { resolveModel } from "./hub/resolve.js";
export type { ErrorCode } from "./errors.js";
export { BloomTokenizer } from "./tokenizer/tokenizer.js";
export type { BloomConfig } from "./checkpoint/config.js";
export type { GenerationParams, GenerationParamsInput } from "./generate/params.js";
export type { FinishReason } from "./generate/stopping.js";
export type { EngineInfo, EngineStats } from "./engine/protocol.js";
export type { MappedWeightsReport } from "./backend/backend.js";
export { startServer } from "./server/server.js";
export type { BlossomServer } from "./server/server.js";
export type { ServerOptions } from "./server/options.js";
