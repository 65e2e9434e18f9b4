/**
 * The one place where checkpoint key names are translated. Every loader builds a weight map
 * (model key <- file, source key) here; the native loader then checks it strictly.
 *
 *  - diffusers / transformers folders: identity, minus buffers that are not weights
 *    (`position_ids`), plus the legacy VAE attention names (`query/key/value/proj_attn`).
 *  - original single-file checkpoints (CompVis layout, `v1-5-pruned-emaonly.safetensors`, A1111 and
 *    ComfyUI models): the inverse of diffusers 0.25.1
 *    scripts/convert_diffusers_to_original_stable_diffusion.py (`unet_conversion_map*`,
 *    `vae_conversion_map*`, the `cond_stage_model.transformer.` prefix), generalised to any number
 *    of levels and layers per block so that the tiny fixture model maps too.
 */
import type { Config } from './config';

/** [model key, index into the file list, key in that file, allow a same-size reshape] */
export type WeightMapEntry = [string, number, string, boolean];
export type WeightMap = WeightMapEntry[];

/** Keys in real files that are buffers, not weights: never loaded, never reported. */
export function isIgnoredKey(key: string): boolean {
  return key === 'text_model.embeddings.position_ids' || key === 'vision_model.embeddings.position_ids' || key === 'embeddings.position_ids';
}

// Older diffusers saved the VAE mid-block attention as query/key/value/proj_attn.
const LEGACY_VAE_ATTENTION: Array<[RegExp, string]> = [
  [/^(.*\.attentions\.\d+\.)query\.(weight|bias)$/, '$1to_q.$2'],
  [/^(.*\.attentions\.\d+\.)key\.(weight|bias)$/, '$1to_k.$2'],
  [/^(.*\.attentions\.\d+\.)value\.(weight|bias)$/, '$1to_v.$2'],
  [/^(.*\.attentions\.\d+\.)proj_attn\.(weight|bias)$/, '$1to_out.0.$2'],
];

/** Identity map over the keys of one or more files (sharded checkpoints), legacy names renamed. */
export function folderWeightMap(kind: string, fileKeys: string[][]): WeightMap {
  const map: WeightMap = [];
  fileKeys.forEach((keys, file) => {
    for (const key of keys) {
      if (isIgnoredKey(key)) continue;
      let target = key;
      if (kind === 'vae') {
        for (const [re, to] of LEGACY_VAE_ATTENTION) if (re.test(key)) target = key.replace(re, to);
      }
      map.push([target, file, key, false]);
    }
  });
  return map;
}

// ------------------------------------------------------------------ original single-file layout

export const SINGLE_FILE_PREFIX = {
  unet: 'model.diffusion_model.',
  vae: 'first_stage_model.',
  text_encoder: 'cond_stage_model.transformer.',
} as const;

/** Non-weight keys of real single-file checkpoints (LatentDiffusion buffers, EMA copies). */
export function isIgnoredSingleFileKey(key: string): boolean {
  if (key.startsWith('model_ema.')) return true;
  if (key === 'cond_stage_model.transformer.text_model.embeddings.position_ids') return true;
  return /^(betas|alphas_cumprod|alphas_cumprod_prev|sqrt_alphas_cumprod|sqrt_one_minus_alphas_cumprod|log_one_minus_alphas_cumprod|sqrt_recip_alphas_cumprod|sqrt_recipm1_alphas_cumprod|posterior_variance|posterior_log_variance_clipped|posterior_mean_coef1|posterior_mean_coef2|logvar)$/.test(key);
}

const RESNET_TO_ORIGINAL: Record<string, string> = {
  norm1: 'in_layers.0',
  conv1: 'in_layers.2',
  norm2: 'out_layers.0',
  conv2: 'out_layers.3',
  time_emb_proj: 'emb_layers.1',
  conv_shortcut: 'skip_connection',
};

function resnetRest(rest: string): string {
  const dot = rest.indexOf('.');
  const head = rest.slice(0, dot);
  return (RESNET_TO_ORIGINAL[head] ?? head) + rest.slice(dot);
}

/** diffusers UNet key -> original key (without the `model.diffusion_model.` prefix). */
export function unetOriginalKey(key: string, cfg: Config): string {
  const n = cfg.layers_per_block as number;
  const upTypes = cfg.up_block_types as string[];
  const fixed: Record<string, string> = {
    'time_embedding.linear_1': 'time_embed.0',
    'time_embedding.linear_2': 'time_embed.2',
    conv_in: 'input_blocks.0.0',
    conv_norm_out: 'out.0',
    conv_out: 'out.2',
  };
  for (const [from, to] of Object.entries(fixed)) if (key.startsWith(from + '.')) return to + key.slice(from.length);
  let m: RegExpMatchArray | null;
  if ((m = key.match(/^down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)$/))) return `input_blocks.${(n + 1) * +m[1] + +m[2] + 1}.0.${resnetRest(m[3])}`;
  if ((m = key.match(/^down_blocks\.(\d+)\.attentions\.(\d+)\.(.*)$/))) return `input_blocks.${(n + 1) * +m[1] + +m[2] + 1}.1.${m[3]}`;
  if ((m = key.match(/^down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)$/))) return `input_blocks.${(n + 1) * (+m[1] + 1)}.0.op.${m[2]}`;
  if ((m = key.match(/^mid_block\.attentions\.0\.(.*)$/))) return `middle_block.1.${m[1]}`;
  if ((m = key.match(/^mid_block\.resnets\.(\d+)\.(.*)$/))) return `middle_block.${2 * +m[1]}.${resnetRest(m[2])}`;
  if ((m = key.match(/^up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)$/))) return `output_blocks.${(n + 1) * +m[1] + +m[2]}.0.${resnetRest(m[3])}`;
  if ((m = key.match(/^up_blocks\.(\d+)\.attentions\.(\d+)\.(.*)$/))) return `output_blocks.${(n + 1) * +m[1] + +m[2]}.1.${m[3]}`;
  if ((m = key.match(/^up_blocks\.(\d+)\.upsamplers\.0\.(.*)$/))) {
    // the upsampler follows the last resnet, and its attention when the block has one
    const slot = upTypes[+m[1]] === 'CrossAttnUpBlock2D' ? 2 : 1;
    return `output_blocks.${(n + 1) * +m[1] + n}.${slot}.${m[2]}`;
  }
  return key;
}

const VAE_RESNET: Record<string, string> = { conv_shortcut: 'nin_shortcut' };
const VAE_ATTENTION: Record<string, string> = { group_norm: 'norm', to_q: 'q', to_k: 'k', to_v: 'v', 'to_out.0': 'proj_out' };

/** diffusers VAE key -> [original key (without `first_stage_model.`), reshape allowed]. */
export function vaeOriginalKey(key: string, cfg: Config): [string, boolean] {
  const levels = (cfg.block_out_channels as number[]).length;
  const res = (rest: string) => {
    const dot = rest.indexOf('.');
    const head = rest.slice(0, dot);
    return (VAE_RESNET[head] ?? head) + rest.slice(dot);
  };
  let m: RegExpMatchArray | null;
  if ((m = key.match(/^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)$/))) return [`encoder.down.${m[1]}.block.${m[2]}.${res(m[3])}`, false];
  if ((m = key.match(/^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.(.*)$/))) return [`encoder.down.${m[1]}.downsample.${m[2]}`, false];
  // decoder.up is numbered from the lowest resolution in diffusers and from the highest originally
  if ((m = key.match(/^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)$/))) return [`decoder.up.${levels - 1 - +m[1]}.block.${m[2]}.${res(m[3])}`, false];
  if ((m = key.match(/^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.*)$/))) return [`decoder.up.${levels - 1 - +m[1]}.upsample.${m[2]}`, false];
  if ((m = key.match(/^(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.*)$/))) return [`${m[1]}.mid.block_${+m[2] + 1}.${res(m[3])}`, false];
  if ((m = key.match(/^(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(.*)$/))) {
    // 1x1 convs [C,C,1,1] in the original layout vs Linear [C,C]; some files also store biases as [C,1,1]
    return [`${m[1]}.mid.attn_1.${VAE_ATTENTION[m[2]]}.${m[3]}`, m[2] !== 'group_norm'];
  }
  if ((m = key.match(/^(encoder|decoder)\.conv_norm_out\.(.*)$/))) return [`${m[1]}.norm_out.${m[2]}`, false];
  return [key, false];
}

/**
 * Weight map for one component of a single-file checkpoint. `modelKeys` are the component's
 * diffusers keys (from the native describeModel). Keys of the file under the component's prefix
 * that no model key claims are added under their own name, so the strict loader reports them as
 * unexpected.
 */
export function singleFileWeightMap(component: keyof typeof SINGLE_FILE_PREFIX, modelKeys: string[], fileKeys: string[], cfg: Config): WeightMap {
  const prefix = SINGLE_FILE_PREFIX[component];
  const present = new Set(fileKeys);
  const claimed = new Set<string>();
  const map: WeightMap = [];
  for (const key of modelKeys) {
    let original: string;
    let reshape = false;
    if (component === 'unet') original = unetOriginalKey(key, cfg);
    else if (component === 'vae') [original, reshape] = vaeOriginalKey(key, cfg);
    else original = key;
    const full = prefix + original;
    if (present.has(full)) {
      map.push([key, 0, full, reshape]);
      claimed.add(full);
    }
  }
  for (const key of fileKeys) {
    if (key.startsWith(prefix) && !claimed.has(key) && !isIgnoredSingleFileKey(key)) map.push([key, 0, key, false]);
  }
  return map;
}

/** Keys of a single-file checkpoint that belong to no component and are not known buffers. */
export function unknownSingleFileKeys(fileKeys: string[]): string[] {
  const prefixes = Object.values(SINGLE_FILE_PREFIX);
  return fileKeys.filter((k) => !prefixes.some((p) => k.startsWith(p)) && !isIgnoredSingleFileKey(k));
}

/**
 * diffusers configs from an original (CompVis v1-inference.yaml style) config, as diffusers
 * 0.25.1 `create_unet_diffusers_config` / `create_vae_diffusers_config` derive them.
 */
export function configsFromOriginalYaml(yaml: any, source: string): { unet: Config; vae: Config; scheduler: Config } {
  const params = yaml?.model?.params;
  const u = params?.unet_config?.params;
  const v = params?.first_stage_config?.params?.ddconfig;
  if (!u || !v) throw new Error(`${source}: expected model.params.unet_config.params and model.params.first_stage_config.params.ddconfig`);
  const blockOut = (u.channel_mult as number[]).map((m) => m * u.model_channels);
  const attnRes: number[] = u.attention_resolutions ?? [];
  const down: string[] = [];
  let resolution = 1;
  for (let i = 0; i < blockOut.length; i++) {
    down.push(attnRes.includes(resolution) ? 'CrossAttnDownBlock2D' : 'DownBlock2D');
    if (i !== blockOut.length - 1) resolution *= 2;
  }
  const up = down.map((t) => (t === 'CrossAttnDownBlock2D' ? 'CrossAttnUpBlock2D' : 'UpBlock2D')).reverse();
  const headDim = u.num_head_channels && u.num_head_channels > 0 ? blockOut.map((c) => c / u.num_head_channels) : u.num_heads;
  const unet: Config = {
    sample_size: params.image_size ?? 64,
    in_channels: u.in_channels,
    out_channels: u.out_channels,
    down_block_types: down,
    up_block_types: up,
    block_out_channels: blockOut,
    layers_per_block: u.num_res_blocks,
    cross_attention_dim: u.context_dim,
    attention_head_dim: headDim,
    use_linear_projection: u.use_linear_in_transformer ?? false,
  };
  const vae: Config = {
    sample_size: v.resolution,
    in_channels: v.in_channels,
    out_channels: v.out_ch,
    down_block_types: (v.ch_mult as number[]).map(() => 'DownEncoderBlock2D'),
    up_block_types: (v.ch_mult as number[]).map(() => 'UpDecoderBlock2D'),
    block_out_channels: (v.ch_mult as number[]).map((m) => m * v.ch),
    latent_channels: v.z_channels,
    layers_per_block: v.num_res_blocks,
    scaling_factor: params.scale_factor ?? 0.18215,
  };
  const scheduler: Config = {
    _class_name: 'PNDMScheduler',
    beta_start: params.linear_start ?? 0.00085,
    beta_end: params.linear_end ?? 0.012,
    beta_schedule: 'scaled_linear',
    num_train_timesteps: params.timesteps ?? 1000,
    clip_sample: false,
    set_alpha_to_one: false,
    skip_prk_steps: true,
    steps_offset: 1,
    trained_betas: null,
  };
  return { unet, vae, scheduler };
}
