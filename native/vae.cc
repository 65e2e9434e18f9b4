// AutoencoderKL port (diffusers 0.25.1); see vae.h for the reference files.
#include "vae.h"

#include <stdexcept>

#include "attention.h"

namespace si {

namespace {

// DiagonalGaussianDistribution clamps logvar to this range before taking exp (vae.py).
constexpr double kLogvarMin = -30.0;
constexpr double kLogvarMax = 20.0;

std::string join(const std::vector<int64_t>& v) {
  std::string s = "[";
  for (size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + std::to_string(v[i]);
  return s + "]";
}

void check_block_types(const std::vector<std::string>& types, const std::string& key, const std::string& expected, size_t count) {
  if (types.size() != count)
    throw std::invalid_argument("config key \"" + key + "\" has " + std::to_string(types.size()) + " entries but block_out_channels has " +
                                std::to_string(count));
  for (const auto& t : types)
    if (t != expected) throw std::invalid_argument("config key \"" + key + "\": unsupported block type \"" + t + "\" (only " + expected + ")");
}

void check_image(const at::Tensor& x, const std::string& name, int64_t channels) {
  if (x.dim() != 4 || x.size(1) != channels)
    throw std::invalid_argument("input \"" + name + "\" must have shape [B, " + std::to_string(channels) + ", H, W] but has " +
                                join(x.sizes().vec()));
}

}  // namespace

AutoencoderKLConfig vae_config_from_json(const JsonValue& config) {
  AutoencoderKLConfig c;
  c.in_channels = cfg_int(config, "in_channels");
  c.out_channels = cfg_int(config, "out_channels");
  c.block_out_channels = cfg_int_list(config, "block_out_channels");
  c.layers_per_block = cfg_int(config, "layers_per_block");
  c.latent_channels = cfg_int(config, "latent_channels");
  c.norm_num_groups = cfg_int(config, "norm_num_groups");
  c.scaling_factor = cfg_double(config, "scaling_factor");

  if (c.block_out_channels.empty()) throw std::invalid_argument("config key \"block_out_channels\" is empty");
  check_block_types(cfg_string_list(config, "down_block_types"), "down_block_types", "DownEncoderBlock2D", c.block_out_channels.size());
  check_block_types(cfg_string_list(config, "up_block_types"), "up_block_types", "UpDecoderBlock2D", c.block_out_channels.size());
  const std::string act = cfg_string(config, "act_fn");
  if (act != "silu") throw std::invalid_argument("config key \"act_fn\" is \"" + act + "\"; only \"silu\" is supported");
  if (c.in_channels < 1 || c.out_channels < 1 || c.latent_channels < 1 || c.layers_per_block < 1 || c.norm_num_groups < 1)
    throw std::invalid_argument("config keys in_channels, out_channels, latent_channels, layers_per_block and norm_num_groups must be positive");
  for (int64_t ch : c.block_out_channels)
    if (ch < 1 || ch % c.norm_num_groups != 0)
      throw std::invalid_argument("config key \"block_out_channels\" is " + join(c.block_out_channels) + ": every entry must be a positive multiple of norm_num_groups " +
                                  std::to_string(c.norm_num_groups));
  // Keys of later diffusers versions (0.26+: SDXL/SD3-style VAEs). They are not SD v1.5's and not
  // implemented; refuse any non-default value rather than silently run a different model.
  if (cfg_has(config, "use_quant_conv") && !cfg_bool(config, "use_quant_conv"))
    throw std::invalid_argument("config key \"use_quant_conv\" false is not supported");
  if (cfg_has(config, "use_post_quant_conv") && !cfg_bool(config, "use_post_quant_conv"))
    throw std::invalid_argument("config key \"use_post_quant_conv\" false is not supported");
  if (cfg_has(config, "mid_block_add_attention") && !cfg_bool(config, "mid_block_add_attention"))
    throw std::invalid_argument("config key \"mid_block_add_attention\" false is not supported");
  if (cfg_has(config, "shift_factor") && cfg_double(config, "shift_factor") != 0.0)
    throw std::invalid_argument("config key \"shift_factor\" is " + cfg_get(config, "shift_factor").text + "; only 0 / null is supported");
  return c;
}

namespace vae {

// ---------------------------------------------------------------- ResnetBlock2D

ResnetBlock2DImpl::ResnetBlock2DImpl(int64_t in_channels, int64_t out_channels, int64_t groups, const at::TensorOptions& opts) {
  norm1 = register_module("norm1", GroupNorm(groups, in_channels, kNormEps, opts));
  conv1 = register_module("conv1", Conv2d(in_channels, out_channels, 3, 1, 1, true, opts));
  norm2 = register_module("norm2", GroupNorm(groups, out_channels, kNormEps, opts));
  conv2 = register_module("conv2", Conv2d(out_channels, out_channels, 3, 1, 1, true, opts));
  // use_in_shortcut = in_channels != out_channels; use_conv_shortcut False -> a 1x1 conv
  if (in_channels != out_channels) conv_shortcut = register_module("conv_shortcut", Conv2d(in_channels, out_channels, 1, 1, 0, true, opts));
}

at::Tensor ResnetBlock2DImpl::forward(const at::Tensor& x) {
  // x: [B, in, H, W]
  // 1. norm -> SiLU -> conv (no time embedding in the VAE: temb is None)
  at::Tensor h = conv1(at::silu(norm1(x)));  // [B, out, H, W]
  // 2. norm -> SiLU -> (dropout 0) -> conv
  h = conv2(at::silu(norm2(h)));  // [B, out, H, W]
  // 3. residual (output_scale_factor 1)
  at::Tensor shortcut = conv_shortcut ? conv_shortcut(x) : x;  // [B, out, H, W]
  return shortcut + h;
}

// ---------------------------------------------------------------- Attention

AttentionImpl::AttentionImpl(int64_t channels, int64_t groups, const at::TensorOptions& opts) {
  group_norm = register_module("group_norm", GroupNorm(groups, channels, kNormEps, opts));
  to_q = register_module("to_q", Linear(channels, channels, true, opts));
  to_k = register_module("to_k", Linear(channels, channels, true, opts));
  to_v = register_module("to_v", Linear(channels, channels, true, opts));
  to_out_proj = Linear(channels, channels, true, opts);
  to_out->push_back(to_out_proj);
  to_out->push_back(Weightless());  // Dropout(0.0)
  register_module("to_out", to_out);
}

at::Tensor AttentionImpl::forward(const at::Tensor& x) {
  // x: [B, C, H, W]
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  // 1. pre-process: group norm, then channels last as a token sequence. diffusers normalises the
  //    [B, C, H*W] view; GroupNorm over [B, C, H, W] is the same computation.
  at::Tensor h = group_norm(x).reshape({B, C, H * W}).transpose(1, 2);  // [B, HW, C]
  // 2. single-head attention over the H*W positions (heads = C / attention_head_dim = 1, scale C^-0.5).
  //    AttnProcessor upcasts the softmax (upcast_softmax=True); AttnProcessor2_0, which diffusers uses
  //    with torch 2, does not, and neither does multihead_attention. Identical in float32.
  at::Tensor a = multihead_attention(to_q(h), to_k(h), to_v(h), /*heads=*/1, /*causal=*/false);  // [B, HW, C]
  // 3. output projection (to_out.1 is Dropout, identity at inference), back to [B, C, H, W]
  a = to_out_proj(a).transpose(1, 2).reshape({B, C, H, W});
  // 4. residual_connection=True, rescale_output_factor 1
  return a + x;
}

// ---------------------------------------------------------------- Downsample2D / Upsample2D

Downsample2DImpl::Downsample2DImpl(int64_t channels, const at::TensorOptions& opts) {
  conv = register_module("conv", Conv2d(channels, channels, 3, /*stride=*/2, /*padding=*/0, true, opts));
}

at::Tensor Downsample2DImpl::forward(const at::Tensor& x) {
  // x: [B, C, H, W]
  // 1. Downsample2D with padding=0 pads (left 0, right 1, top 0, bottom 1) with zeros
  at::Tensor h = at::constant_pad_nd(x, {0, 1, 0, 1}, 0);  // [B, C, H+1, W+1]
  // 2. 3x3 stride-2 conv without padding
  return conv(h);  // [B, C, floor(H/2), floor(W/2)]
}

Upsample2DImpl::Upsample2DImpl(int64_t channels, const at::TensorOptions& opts) {
  conv = register_module("conv", Conv2d(channels, channels, 3, 1, 1, true, opts));
}

at::Tensor Upsample2DImpl::forward(const at::Tensor& x) {
  // x: [B, C, H, W]
  // 1. nearest x2 (F.interpolate(scale_factor=2.0, mode="nearest")). diffusers runs it in float32 for
  //    bfloat16 inputs because upsample_nearest2d lacks a bfloat16 kernel before torch 2.1.
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  at::Tensor h = bf16 ? x.to(at::kFloat) : x;
  const std::vector<int64_t> size{x.size(2) * 2, x.size(3) * 2};
  h = at::upsample_nearest2d(h, at::IntArrayRef(size));  // [B, C, 2H, 2W]
  if (bf16) h = h.to(at::kBFloat16);
  // 2. 3x3 conv
  return conv(h);
}

// ---------------------------------------------------------------- blocks

DownEncoderBlock2DImpl::DownEncoderBlock2DImpl(int64_t in_channels, int64_t out_channels, int64_t num_layers, int64_t groups,
                                               bool add_downsample, const at::TensorOptions& opts) {
  for (int64_t i = 0; i < num_layers; ++i) {
    resnet_list.push_back(ResnetBlock2D(i == 0 ? in_channels : out_channels, out_channels, groups, opts));
    resnets->push_back(resnet_list.back());
  }
  register_module("resnets", resnets);
  if (add_downsample) {
    downsampler_list.push_back(Downsample2D(out_channels, opts));
    downsamplers->push_back(downsampler_list.back());
    register_module("downsamplers", downsamplers);
  }
}

at::Tensor DownEncoderBlock2DImpl::forward(const at::Tensor& x) {
  // x: [B, in, H, W]
  at::Tensor h = x;
  for (auto& resnet : resnet_list) h = resnet(h);  // [B, out, H, W]
  for (auto& down : downsampler_list) h = down(h);  // [B, out, H/2, W/2]
  return h;
}

UpDecoderBlock2DImpl::UpDecoderBlock2DImpl(int64_t in_channels, int64_t out_channels, int64_t num_layers, int64_t groups, bool add_upsample,
                                           const at::TensorOptions& opts) {
  for (int64_t i = 0; i < num_layers; ++i) {
    resnet_list.push_back(ResnetBlock2D(i == 0 ? in_channels : out_channels, out_channels, groups, opts));
    resnets->push_back(resnet_list.back());
  }
  register_module("resnets", resnets);
  if (add_upsample) {
    upsampler_list.push_back(Upsample2D(out_channels, opts));
    upsamplers->push_back(upsampler_list.back());
    register_module("upsamplers", upsamplers);
  }
}

at::Tensor UpDecoderBlock2DImpl::forward(const at::Tensor& x) {
  // x: [B, in, H, W]
  at::Tensor h = x;
  for (auto& resnet : resnet_list) h = resnet(h);  // [B, out, H, W]
  for (auto& up : upsampler_list) h = up(h);        // [B, out, 2H, 2W]
  return h;
}

UNetMidBlock2DImpl::UNetMidBlock2DImpl(int64_t channels, int64_t groups, const at::TensorOptions& opts) {
  // attention_head_dim = channels in Encoder/Decoder, so a single head
  for (int i = 0; i < 2; ++i) {
    resnet_list.push_back(ResnetBlock2D(channels, channels, groups, opts));
    resnets->push_back(resnet_list.back());
  }
  attention = Attention(channels, groups, opts);
  attentions->push_back(attention);
  register_module("resnets", resnets);
  register_module("attentions", attentions);
}

at::Tensor UNetMidBlock2DImpl::forward(const at::Tensor& x) {
  // x: [B, C, H, W]
  at::Tensor h = resnet_list[0](x);
  h = attention(h);
  return resnet_list[1](h);  // [B, C, H, W]
}

// ---------------------------------------------------------------- Encoder / Decoder

EncoderImpl::EncoderImpl(const AutoencoderKLConfig& cfg, const at::TensorOptions& opts) {
  const auto& boc = cfg.block_out_channels;
  const int64_t groups = cfg.norm_num_groups;
  conv_in = register_module("conv_in", Conv2d(cfg.in_channels, boc[0], 3, 1, 1, true, opts));
  int64_t output_channel = boc[0];
  for (size_t i = 0; i < boc.size(); ++i) {
    const int64_t input_channel = output_channel;
    output_channel = boc[i];
    const bool is_final_block = i == boc.size() - 1;
    down_block_list.push_back(DownEncoderBlock2D(input_channel, output_channel, cfg.layers_per_block, groups, !is_final_block, opts));
    down_blocks->push_back(down_block_list.back());
  }
  register_module("down_blocks", down_blocks);
  mid_block = register_module("mid_block", UNetMidBlock2D(boc.back(), groups, opts));
  conv_norm_out = register_module("conv_norm_out", GroupNorm(groups, boc.back(), kNormEps, opts));
  // double_z: mean and logvar channels
  conv_out = register_module("conv_out", Conv2d(boc.back(), 2 * cfg.latent_channels, 3, 1, 1, true, opts));
}

at::Tensor EncoderImpl::forward(const at::Tensor& x) {
  // x: [B, in_channels, H, W]
  // 1. pre-process
  at::Tensor h = conv_in(x);  // [B, boc[0], H, W]
  // 2. down: every block but the last halves H and W
  for (auto& block : down_block_list) h = block(h);  // [B, boc[-1], H/f, W/f]
  // 3. mid
  h = mid_block(h);
  // 4. post-process
  h = at::silu(conv_norm_out(h));
  return conv_out(h);  // [B, 2*latent, H/f, W/f]
}

DecoderImpl::DecoderImpl(const AutoencoderKLConfig& cfg, const at::TensorOptions& opts) {
  const std::vector<int64_t> reversed(cfg.block_out_channels.rbegin(), cfg.block_out_channels.rend());
  const int64_t groups = cfg.norm_num_groups;
  conv_in = register_module("conv_in", Conv2d(cfg.latent_channels, reversed[0], 3, 1, 1, true, opts));
  mid_block = register_module("mid_block", UNetMidBlock2D(reversed[0], groups, opts));
  int64_t output_channel = reversed[0];
  for (size_t i = 0; i < reversed.size(); ++i) {
    const int64_t prev_output_channel = output_channel;
    output_channel = reversed[i];
    const bool is_final_block = i == reversed.size() - 1;
    // the decoder has one resnet more per block than the encoder
    up_block_list.push_back(UpDecoderBlock2D(prev_output_channel, output_channel, cfg.layers_per_block + 1, groups, !is_final_block, opts));
    up_blocks->push_back(up_block_list.back());
  }
  register_module("up_blocks", up_blocks);
  conv_norm_out = register_module("conv_norm_out", GroupNorm(groups, cfg.block_out_channels[0], kNormEps, opts));
  conv_out = register_module("conv_out", Conv2d(cfg.block_out_channels[0], cfg.out_channels, 3, 1, 1, true, opts));
}

at::Tensor DecoderImpl::forward(const at::Tensor& z) {
  // z: [B, latent, h, w]
  // 1. pre-process
  at::Tensor h = conv_in(z);  // [B, boc[-1], h, w]
  // 2. mid (diffusers casts to the up blocks' dtype afterwards; one dtype here, so a no-op)
  h = mid_block(h);
  // 3. up: every block but the last doubles h and w
  for (auto& block : up_block_list) h = block(h);  // [B, boc[0], h*f, w*f]
  // 4. post-process
  h = at::silu(conv_norm_out(h));
  return conv_out(h);  // [B, out_channels, h*f, w*f]
}

}  // namespace vae

// ---------------------------------------------------------------- AutoencoderKL

LatentDist diagonal_gaussian(const at::Tensor& moments) {
  // moments: [B, 2*latent, h, w] -> chunk(2, dim=1)
  auto parts = moments.chunk(2, 1);
  LatentDist d;
  d.mean = parts[0];                                      // [B, latent, h, w]
  d.logvar = at::clamp(parts[1], kLogvarMin, kLogvarMax);  // [B, latent, h, w]
  d.std = at::exp(0.5 * d.logvar);
  return d;
}

AutoencoderKLImpl::AutoencoderKLImpl(const AutoencoderKLConfig& cfg, const at::TensorOptions& opts)
    : config(cfg), scaling_factor(cfg.scaling_factor) {
  encoder = register_module("encoder", vae::Encoder(cfg, opts));
  decoder = register_module("decoder", vae::Decoder(cfg, opts));
  quant_conv = register_module("quant_conv", Conv2d(2 * cfg.latent_channels, 2 * cfg.latent_channels, 1, 1, 0, true, opts));
  post_quant_conv = register_module("post_quant_conv", Conv2d(cfg.latent_channels, cfg.latent_channels, 1, 1, 0, true, opts));
}

LatentDist AutoencoderKLImpl::encode(const at::Tensor& x) {
  // x: [B, in_channels, H, W] -> moments [B, 2*latent, h, w] -> distribution
  return diagonal_gaussian(quant_conv(encoder(x)));
}

at::Tensor AutoencoderKLImpl::decode(const at::Tensor& z) {
  // z: [B, latent, h, w] -> [B, out_channels, H, W]
  return decoder(post_quant_conv(z));
}

// ---------------------------------------------------------------- NativeModel

VaeModel::VaeModel(const AutoencoderKLConfig& cfg, const at::TensorOptions& opts) : vae(cfg, opts) {}

TensorMap VaeModel::run(const std::string& method, const TensorMap& inputs) {
  TensorMap out;
  if (method == "encode") {
    const at::Tensor& x = input(inputs, "sample");
    check_image(x, "sample", vae->config.in_channels);
    // the same steps as AutoencoderKL::encode, keeping the intermediates
    at::Tensor h = vae->encoder(x);           // [B, 2*latent, h, w]
    at::Tensor moments = vae->quant_conv(h);  // [B, 2*latent, h, w]
    LatentDist d = diagonal_gaussian(moments);
    out["encoder_out"] = h;
    out["moments"] = moments;
    out["latent_mean"] = d.mean;
    out["latent_logvar"] = d.logvar;
    out["latent_std"] = d.std;
    out["latent_mean_scaled"] = d.mean * vae->scaling_factor;
    return out;
  }
  if (method == "decode") {
    const at::Tensor& z = input(inputs, "latent");
    check_image(z, "latent", vae->config.latent_channels);
    // the same steps as AutoencoderKL::decode, keeping the intermediate
    at::Tensor p = vae->post_quant_conv(z);  // [B, latent, h, w]
    out["post_quant_conv_out"] = p;
    out["sample"] = vae->decoder(p);  // [B, out_channels, H, W]
    return out;
  }
  throw std::invalid_argument("vae has no method \"" + method + "\" (expected encode or decode)");
}

std::shared_ptr<NativeModel> make_vae(const JsonValue& config, const at::TensorOptions& opts) {
  return std::make_shared<VaeModel>(vae_config_from_json(config), opts);
}

}  // namespace si
