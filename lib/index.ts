/**
 * singleinsert-native: SingleInsert (Wu et al., 2023) for Stable Diffusion v1.5 on libtorch.
 * Every long-running call returns a promise and runs on a native worker thread.
 */
export { AbortError, SingleInsertError } from './errors';
export type { BuildInfo, CudaDeviceInfo, DType, MemoryStats, NativeTensor, Tensor, TypedArray } from './native';
export { buildInfo, memoryStats, resetPeakMemory, version } from './info';
export { readSafetensors, readSafetensorsHeader, writeSafetensors } from './safetensors';
export type { SafetensorsContents, SafetensorsHeader } from './safetensors';
export { ClipTokenizer, bundledTokenizerDir } from './tokenizer';
export { CLASS_TEMPLATE, TRAIN_TEMPLATE, fill } from './prompts';
export { describeModel, loadComponent, loadPipeline, Model, Pipeline } from './models';
export type { DTypeOption, LoadOptions, PipelineLoadOptions } from './models';
export { readConfig, resolveConfig } from './config';
export type { Config, ModelKind } from './config';
export { hubCacheDir, resolveModelPath } from './model-files';
export { ddpmAddNoise, resolveSchedulerConfig, schedulerInfo, schedulerTrajectory, SCHEDULER_NAMES } from './schedulers';
export type { SchedulerName } from './schedulers';
export { applyLora, clearLora, collectLora, createLora, saveLora, setLora } from './lora';
export { clipPreprocess, loadTrainingInputs, preprocessBatch, readPreprocessorConfig, resolvePreprocessorConfig, vitPreprocess } from './image';
export type { ImageInput, ImageProcessorConfig, ImageTensor } from './image';
export { formatParameters, generate, toPng } from './generate';
export type { ConceptUse, EmbeddingUse, GenerateOptions, GenerateResult, LoraFileUse } from './generate';
export { CONCEPT_FORMAT, CONCEPT_VERSION, loadConcept, modelIdentity, safetensorsHeaderSha256, withPipelineLock } from './concepts';
export type { Concept, ConceptManifest, LoadConceptOptions, ModelIdentity } from './concepts';
export { loadEmbedding } from './embeddings';
export type { LoadedEmbedding } from './embeddings';
export { expandPreset, matchEdit, readPresets, PRESET_NAMES, PRESETS_FILE } from './presets';
export type { EditPreset, PresetName, PresetPrompt, Presets, ViewPreset } from './presets';
export { contactSheet, sheetLayout } from './contact-sheet';
export type { ContactSheetOptions, SheetLayout } from './contact-sheet';
export { readPngText } from './png';
export { train, Trainer, validateTrainOptions, STAGE1_DEFAULTS, STAGE2_DEFAULTS } from './train';
export type { TrainOptions, TrainProgress, TrainResult, ConceptJson, TrainLosses, TrainerPrecision, StepResult } from './train';
export { loadRandomModel, loadRandomPipeline, SD15_CONFIGS, TINY_CONFIGS } from './random-model';
export type { RandomLoadOptions } from './random-model';
export { ensureTinyModel } from './tiny-model';
export { convertCheckpoints } from './convert/convert';
export type { ConvertOptions, ConvertReport } from './convert/convert';
export { evaluate } from './eval/eval';
export type { EvalImageSpec, EvalModels, EvalResult, EvalSpec } from './eval/eval';
export { ClipScorer, DinoScorer, loadLpips, LpipsScorer } from './eval/scorers';
export { attentionMask, composite, cosine, DEFINITIONS as METRIC_DEFINITIONS, editSucceeded, METRICS, scoringPrompt } from './eval/metrics';
export type { MetricName } from './eval/metrics';
