export {
  type GenerationParams,
  type GenerationParamsInput,
  defaultGenerationParams,
  resolveGenerationParams,
  maxStopStrings,
  maxStopStringLength,
} from "./params.js";
export { Rng, randomSeed } from "./rng.js";
export {
  TokenChooser,
  type ChosenToken,
  type TokenChooserOptions,
  applyRepetitionPenalty,
  banRepeatedNgrams,
  suppressTokens,
} from "./chooser.js";
export { type FinishReason, finishReasonAfter, IncrementalDecoder, StopStringMatcher } from "./stopping.js";
