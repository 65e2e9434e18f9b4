/**
 * Reading and validating model configs (diffusers / transformers config.json) before anything
 * crosses into C++. The native side receives a RESOLVED config: every key present, defaults
 * filled in as the reference library's constructor would, and every value we do not implement
 * refused here with the file, the key and the value.
 *
 * Defaults: diffusers 0.25.1 (`UNet2DConditionModel.__init__`, `AutoencoderKL.__init__`),
 * transformers 4.33 (`CLIPTextConfig`, `CLIPVisionConfig`, `CLIPConfig`, `ViTConfig`).
 */
import * as fs from 'node:fs';
import { SingleInsertError } from './errors';

export type ModelKind = 'unet' | 'vae' | 'clip_text' | 'clip_vision' | 'clip' | 'vit' | 'lpips';
export type Config = Record<string, unknown>;

interface KeySpec {
  default: unknown;
  /** returns true when the value is supported */
  ok: (v: unknown) => boolean;
  expected: string;
}

const isInt = (v: unknown): v is number => typeof v === 'number' && Number.isInteger(v);
const posInt = (v: unknown) => isInt(v) && v > 0;
const nonNegInt = (v: unknown) => isInt(v) && v >= 0;
const posNum = (v: unknown) => typeof v === 'number' && Number.isFinite(v) && v > 0;
const num = (v: unknown) => typeof v === 'number' && Number.isFinite(v);
const bool = (v: unknown) => typeof v === 'boolean';
const is = (...allowed: unknown[]) => (v: unknown) => allowed.some((a) => a === v);
const nullOr = (f: (v: unknown) => boolean) => (v: unknown) => v === null || f(v);
const intList = (v: unknown) => Array.isArray(v) && v.length > 0 && v.every(posInt);
const strListOf = (allowed: string[]) => (v: unknown) => Array.isArray(v) && v.length > 0 && v.every((x) => allowed.includes(x as string));
const req = (ok: (v: unknown) => boolean, expected: string, def: unknown): KeySpec => ({ default: def, ok, expected });

const DOWN_BLOCKS = ['CrossAttnDownBlock2D', 'DownBlock2D'];
const UP_BLOCKS = ['CrossAttnUpBlock2D', 'UpBlock2D'];

// diffusers 0.25.1 UNet2DConditionModel.__init__; values other than SD v1.x's are refused.
const UNET: Record<string, KeySpec> = {
  sample_size: req(nullOr(posInt), 'a positive integer', null),
  in_channels: req(posInt, 'a positive integer', 4),
  out_channels: req(posInt, 'a positive integer', 4),
  center_input_sample: req(is(false), 'false', false),
  flip_sin_to_cos: req(bool, 'a boolean', true),
  freq_shift: req(num, 'a number', 0),
  down_block_types: req(strListOf(DOWN_BLOCKS), `a list of ${DOWN_BLOCKS.join(' / ')}`, ['CrossAttnDownBlock2D', 'CrossAttnDownBlock2D', 'CrossAttnDownBlock2D', 'DownBlock2D']),
  mid_block_type: req(is('UNetMidBlock2DCrossAttn'), '"UNetMidBlock2DCrossAttn"', 'UNetMidBlock2DCrossAttn'),
  up_block_types: req(strListOf(UP_BLOCKS), `a list of ${UP_BLOCKS.join(' / ')}`, ['UpBlock2D', 'CrossAttnUpBlock2D', 'CrossAttnUpBlock2D', 'CrossAttnUpBlock2D']),
  only_cross_attention: req(is(false), 'false', false),
  block_out_channels: req(intList, 'a list of positive integers', [320, 640, 1280, 1280]),
  layers_per_block: req(posInt, 'a positive integer', 2),
  downsample_padding: req(is(1), '1', 1),
  mid_block_scale_factor: req(is(1), '1', 1),
  dropout: req(is(0), '0', 0),
  act_fn: req(is('silu'), '"silu"', 'silu'),
  norm_num_groups: req(posInt, 'a positive integer', 32),
  norm_eps: req(posNum, 'a positive number', 1e-5),
  cross_attention_dim: req(posInt, 'a positive integer', 1280),
  transformer_layers_per_block: req(is(1), '1', 1),
  encoder_hid_dim: req(is(null), 'null', null),
  encoder_hid_dim_type: req(is(null), 'null', null),
  attention_head_dim: req((v) => posInt(v) || intList(v), 'a positive integer or a list of them', 8),
  // diffusers 0.25.1 itself refuses a set value ("not possible ... because of a naming issue")
  num_attention_heads: req(is(null), 'null (attention_head_dim holds the number of heads)', null),
  dual_cross_attention: req(is(false), 'false', false),
  use_linear_projection: req(bool, 'a boolean', false),
  class_embed_type: req(is(null), 'null', null),
  addition_embed_type: req(is(null), 'null', null),
  addition_time_embed_dim: req(is(null), 'null', null),
  num_class_embeds: req(is(null), 'null', null),
  // only changes fp16 numerics (softmax upcast); null in configs converted from single files
  upcast_attention: req(is(false, null), 'false', false),
  resnet_time_scale_shift: req(is('default'), '"default"', 'default'),
  resnet_skip_time_act: req(is(false), 'false', false),
  resnet_out_scale_factor: req(is(1), '1', 1),
  time_embedding_type: req(is('positional'), '"positional"', 'positional'),
  time_embedding_dim: req(is(null), 'null', null),
  time_embedding_act_fn: req(is(null), 'null', null),
  timestep_post_act: req(is(null), 'null', null),
  time_cond_proj_dim: req(is(null), 'null', null),
  conv_in_kernel: req(is(3), '3', 3),
  conv_out_kernel: req(is(3), '3', 3),
  projection_class_embeddings_input_dim: req(is(null), 'null', null),
  attention_type: req(is('default'), '"default"', 'default'),
  class_embeddings_concat: req(is(false), 'false', false),
  mid_block_only_cross_attention: req(is(null, false), 'null', null),
  cross_attention_norm: req(is(null), 'null', null),
  addition_embed_type_num_heads: req(() => true, 'any', 64),
};

// diffusers 0.25.1 AutoencoderKL.__init__
const VAE: Record<string, KeySpec> = {
  in_channels: req(posInt, 'a positive integer', 3),
  out_channels: req(posInt, 'a positive integer', 3),
  down_block_types: req(strListOf(['DownEncoderBlock2D']), 'a list of "DownEncoderBlock2D"', ['DownEncoderBlock2D']),
  up_block_types: req(strListOf(['UpDecoderBlock2D']), 'a list of "UpDecoderBlock2D"', ['UpDecoderBlock2D']),
  block_out_channels: req(intList, 'a list of positive integers', [64]),
  layers_per_block: req(posInt, 'a positive integer', 1),
  act_fn: req(is('silu'), '"silu"', 'silu'),
  latent_channels: req(posInt, 'a positive integer', 4),
  norm_num_groups: req(posInt, 'a positive integer', 32),
  sample_size: req(posInt, 'a positive integer', 32),
  scaling_factor: req(posNum, 'a positive number', 0.18215),
  force_upcast: req(bool, 'a boolean', true),
  latents_mean: req(is(null), 'null', null),
  latents_std: req(is(null), 'null', null),
  // later diffusers versions; only their defaults are implemented
  use_quant_conv: req(is(true), 'true', true),
  use_post_quant_conv: req(is(true), 'true', true),
  mid_block_add_attention: req(is(true), 'true', true),
  shift_factor: req(is(null, 0), 'null', null),
};

// transformers 4.33 CLIPTextConfig
const CLIP_TEXT: Record<string, KeySpec> = {
  vocab_size: req(posInt, 'a positive integer', 49408),
  hidden_size: req(posInt, 'a positive integer', 512),
  intermediate_size: req(posInt, 'a positive integer', 2048),
  projection_dim: req(posInt, 'a positive integer', 512),
  num_hidden_layers: req(posInt, 'a positive integer', 12),
  num_attention_heads: req(posInt, 'a positive integer', 8),
  max_position_embeddings: req(posInt, 'a positive integer', 77),
  hidden_act: req(is('quick_gelu', 'gelu'), '"quick_gelu" or "gelu"', 'quick_gelu'),
  layer_norm_eps: req(posNum, 'a positive number', 1e-5),
  pad_token_id: req(nonNegInt, 'a non-negative integer', 1),
  bos_token_id: req(nonNegInt, 'a non-negative integer', 49406),
  eos_token_id: req(nonNegInt, 'a non-negative integer', 49407),
};

// transformers 4.33 CLIPVisionConfig
const CLIP_VISION: Record<string, KeySpec> = {
  hidden_size: req(posInt, 'a positive integer', 768),
  intermediate_size: req(posInt, 'a positive integer', 3072),
  projection_dim: req(posInt, 'a positive integer', 512),
  num_hidden_layers: req(posInt, 'a positive integer', 12),
  num_attention_heads: req(posInt, 'a positive integer', 12),
  num_channels: req(posInt, 'a positive integer', 3),
  image_size: req(posInt, 'a positive integer', 224),
  patch_size: req(posInt, 'a positive integer', 32),
  hidden_act: req(is('quick_gelu', 'gelu'), '"quick_gelu" or "gelu"', 'quick_gelu'),
  layer_norm_eps: req(posNum, 'a positive number', 1e-5),
};

// transformers 4.33 ViTConfig (DINO ViT-S/16 is one)
const VIT: Record<string, KeySpec> = {
  hidden_size: req(posInt, 'a positive integer', 768),
  num_hidden_layers: req(posInt, 'a positive integer', 12),
  num_attention_heads: req(posInt, 'a positive integer', 12),
  intermediate_size: req(posInt, 'a positive integer', 3072),
  hidden_act: req(is('gelu'), '"gelu"', 'gelu'),
  layer_norm_eps: req(posNum, 'a positive number', 1e-12),
  image_size: req(posInt, 'a positive integer', 224),
  patch_size: req(posInt, 'a positive integer', 16),
  num_channels: req(posInt, 'a positive integer', 3),
  qkv_bias: req(bool, 'a boolean', true),
  encoder_stride: req(() => true, 'any', 16),
};

// LPIPS v0.1 with the AlexNet trunk (native/lpips.h). LPIPS ships no config file: loadLpips (lib/eval/scorers.ts)
// reads the five conv widths off the weight file's `features.N.weight` shapes, so a width-reduced
// trunk loads like the real one. The default is torchvision's AlexNet.
const LPIPS: Record<string, KeySpec> = {
  channels: req((v) => intList(v) && (v as number[]).length === 5, 'a list of 5 positive integers (the AlexNet conv widths)', [64, 192, 384, 256, 256]),
};

function resolveWith(spec: Record<string, KeySpec>, raw: Config, source: string, prefix = ''): Config {
  const out: Config = {};
  for (const [key, s] of Object.entries(spec)) {
    const present = Object.prototype.hasOwnProperty.call(raw, key);
    const value = present ? raw[key] : s.default;
    if (!s.ok(value)) {
      throw new SingleInsertError(
        `${source}: config key "${prefix}${key}" is ${JSON.stringify(value)}, expected ${s.expected} (this value is not supported)`,
      );
    }
    out[key] = value;
  }
  return out;
}

function checkUnet(c: Config, source: string): void {
  const levels = (c.block_out_channels as number[]).length;
  const fail = (msg: string) => {
    throw new SingleInsertError(`${source}: ${msg}`);
  };
  if ((c.down_block_types as string[]).length !== levels) fail(`down_block_types has ${(c.down_block_types as string[]).length} entries but block_out_channels has ${levels}`);
  if ((c.up_block_types as string[]).length !== levels) fail(`up_block_types has ${(c.up_block_types as string[]).length} entries but block_out_channels has ${levels}`);
  for (const key of ['attention_head_dim', 'num_attention_heads']) {
    const v = c[key];
    if (Array.isArray(v) && v.length !== levels) fail(`config key "${key}" has ${v.length} entries but there are ${levels} blocks`);
  }
  for (const ch of c.block_out_channels as number[]) {
    if (ch % (c.norm_num_groups as number) !== 0) fail(`block_out_channels ${ch} is not divisible by norm_num_groups ${c.norm_num_groups}`);
  }
}

/** Validates a raw config object for `kind`; `source` names the file in errors. */
export function resolveConfig(kind: ModelKind, raw: Config, source: string): Config {
  if (raw === null || typeof raw !== 'object' || Array.isArray(raw)) throw new SingleInsertError(`${source}: expected a JSON object`);
  switch (kind) {
    case 'unet': {
      const c = resolveWith(UNET, raw, source);
      checkUnet(c, source);
      return c;
    }
    case 'vae': {
      const c = resolveWith(VAE, raw, source);
      const n = (c.block_out_channels as number[]).length;
      if ((c.down_block_types as string[]).length !== n || (c.up_block_types as string[]).length !== n) {
        throw new SingleInsertError(`${source}: down_block_types, up_block_types and block_out_channels must have the same length`);
      }
      return c;
    }
    case 'clip_text':
      return resolveWith(CLIP_TEXT, raw, source);
    case 'clip_vision':
      return resolveWith(CLIP_VISION, raw, source);
    case 'vit':
      return resolveWith(VIT, raw, source);
    case 'lpips':
      return resolveWith(LPIPS, raw, source);
    case 'clip': {
      const text = (raw.text_config ?? {}) as Config;
      const vision = (raw.vision_config ?? {}) as Config;
      const projection = raw.projection_dim ?? 512;
      if (!posInt(projection)) throw new SingleInsertError(`${source}: config key "projection_dim" is ${JSON.stringify(projection)}, expected a positive integer`);
      return {
        projection_dim: projection,
        logit_scale_init_value: raw.logit_scale_init_value ?? 2.6592,
        text_config: resolveWith(CLIP_TEXT, { ...text, projection_dim: projection }, source, 'text_config.'),
        vision_config: resolveWith(CLIP_VISION, { ...vision, projection_dim: projection }, source, 'vision_config.'),
      };
    }
  }
}

/** Reads and resolves a config.json file. */
export function readConfig(kind: ModelKind, file: string): Config {
  let raw: unknown;
  try {
    raw = JSON.parse(fs.readFileSync(file, 'utf8'));
  } catch (e) {
    const reason = (e as NodeJS.ErrnoException).code === 'ENOENT' ? 'file not found' : (e as Error).message;
    throw new SingleInsertError(`Cannot read the ${kind} config ${file}: ${reason}`);
  }
  return resolveConfig(kind, raw as Config, file);
}
