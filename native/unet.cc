// Port of diffusers 0.25.1 UNet2DConditionModel (SD v1.x block set). File and function names in
// the comments are diffusers' (src/diffusers/models/...).
#include "unet.h"

#include <ATen/core/grad_mode.h>
#include <torch/csrc/autograd/grad_mode.h>

#include <cmath>
#include <memory>
#include <stdexcept>

#include "attention.h"
#include "checkpoint.h"

namespace si {

// ---------------------------------------------------------------- config

namespace {

// transformer_2d.py Transformer2DModel: GroupNorm(..., eps=1e-6) regardless of the UNet's norm_eps.
constexpr double kTransformerNormEps = 1e-6;
// attention.py BasicTransformerBlock: LayerNorm eps (norm_eps default 1e-5).
constexpr double kTransformerBlockLayerNormEps = 1e-5;
// attention.py FeedForward: inner dimension = dim * mult, mult = 4.
constexpr int64_t kFeedForwardMult = 4;
// embeddings.py get_timestep_embedding: max_period.
constexpr double kTimestepMaxPeriod = 10000;

std::string quote_list(const std::vector<int64_t>& v) {
  std::string s = "[";
  for (size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + std::to_string(v[i]);
  return s + "]";
}

// Keys that diffusers accepts as an int or as a list with one entry per down block.
std::vector<int64_t> int_or_list(const JsonValue& cfg, const std::string& key, size_t blocks) {
  const JsonValue& v = cfg_get(cfg, key);
  if (v.kind == JsonValue::Number) return std::vector<int64_t>(blocks, cfg_int(cfg, key));
  std::vector<int64_t> list = cfg_int_list(cfg, key);
  if (list.size() != blocks)
    throw std::invalid_argument("config key \"" + key + "\" is " + quote_list(list) + ": expected one entry per down block (" +
                                std::to_string(blocks) + ")");
  return list;
}

// Keys that the SD v1.x config.json files leave out take diffusers 0.25.1's own default
// (UNet2DConditionModel.__init__), so a plain diffusers config.json builds as diffusers builds it.
bool optional_bool(const JsonValue& cfg, const std::string& key, bool def) { return cfg_has(cfg, key) ? cfg_bool(cfg, key) : def; }
std::string optional_string(const JsonValue& cfg, const std::string& key, const std::string& def) {
  return cfg_has(cfg, key) ? cfg_string(cfg, key) : def;
}

// Features outside the SD v1.x block set: refused when set, rather than silently ignored.
void refuse_set(const JsonValue& cfg, const std::string& key) {
  if (cfg_has(cfg, key)) throw std::invalid_argument("config key \"" + key + "\" is set; this UNet port supports only null (SD v1.x)");
}
void refuse_true(const JsonValue& cfg, const std::string& key) {
  if (!cfg_has(cfg, key)) return;
  const JsonValue& v = cfg_get(cfg, key);
  // only_cross_attention may also be a per-block list of booleans
  std::vector<JsonValue> items = v.kind == JsonValue::Array ? v.items : std::vector<JsonValue>{v};
  for (const auto& item : items) {
    if (item.kind != JsonValue::Bool) throw std::invalid_argument("config key \"" + key + "\" is a " + item.kind_name() + ", expected a boolean");
    if (item.boolean) throw std::invalid_argument("config key \"" + key + "\" is true; this UNet port supports only false (SD v1.x)");
  }
}
void require_string(const JsonValue& cfg, const std::string& key, const std::string& supported) {
  std::string v = optional_string(cfg, key, supported);
  if (v != supported)
    throw std::invalid_argument("config key \"" + key + "\" is \"" + v + "\"; this UNet port supports only \"" + supported + "\"");
}

}  // namespace

Activation parse_activation(const std::string& name) {
  if (name == "silu" || name == "swish") return Activation::SiLU;
  if (name == "mish") return Activation::Mish;
  if (name == "gelu") return Activation::GELU;
  if (name == "relu") return Activation::ReLU;
  throw std::invalid_argument("config key \"act_fn\" is \"" + name + "\": expected one of silu, swish, mish, gelu, relu");
}

at::Tensor apply_activation(Activation act, const at::Tensor& x) {
  switch (act) {
    case Activation::SiLU: return at::silu(x);
    case Activation::Mish: return at::mish(x);
    case Activation::GELU: return at::gelu(x);
    case Activation::ReLU: return at::relu(x);
  }
  return x;
}

UNetConfig UNetConfig::from_json(const JsonValue& cfg) {
  UNetConfig c;
  c.in_channels = cfg_int(cfg, "in_channels");
  c.out_channels = cfg_int(cfg, "out_channels");
  c.center_input_sample = cfg_bool(cfg, "center_input_sample");
  c.flip_sin_to_cos = cfg_bool(cfg, "flip_sin_to_cos");
  c.freq_shift = cfg_double(cfg, "freq_shift");
  c.block_out_channels = cfg_int_list(cfg, "block_out_channels");
  c.down_block_types = cfg_string_list(cfg, "down_block_types");
  c.up_block_types = cfg_string_list(cfg, "up_block_types");
  const size_t n = c.block_out_channels.size();
  if (n == 0) throw std::invalid_argument("config key \"block_out_channels\" is empty");
  if (c.down_block_types.size() != n || c.up_block_types.size() != n)
    throw std::invalid_argument("config keys \"down_block_types\" (" + std::to_string(c.down_block_types.size()) + " entries) and \"up_block_types\" (" +
                                std::to_string(c.up_block_types.size()) + ") must each have one entry per \"block_out_channels\" entry (" +
                                std::to_string(n) + ")");
  for (const auto& t : c.down_block_types)
    if (t != "CrossAttnDownBlock2D" && t != "DownBlock2D")
      throw std::invalid_argument("config key \"down_block_types\" holds \"" + t + "\": expected CrossAttnDownBlock2D or DownBlock2D");
  for (const auto& t : c.up_block_types)
    if (t != "CrossAttnUpBlock2D" && t != "UpBlock2D")
      throw std::invalid_argument("config key \"up_block_types\" holds \"" + t + "\": expected CrossAttnUpBlock2D or UpBlock2D");
  c.layers_per_block = int_or_list(cfg, "layers_per_block", n);
  c.cross_attention_dim = int_or_list(cfg, "cross_attention_dim", n);
  // diffusers' naming issue (huggingface/diffusers#2011): `attention_head_dim` holds the number of
  // heads. 0.25.1 raises when `num_attention_heads` is set and otherwise uses attention_head_dim.
  if (cfg_has(cfg, "num_attention_heads"))
    throw std::invalid_argument("config key \"num_attention_heads\" is set; diffusers 0.25.1 refuses it too: give the number of heads as \"attention_head_dim\"");
  c.num_attention_heads = int_or_list(cfg, "attention_head_dim", n);
  c.transformer_layers_per_block = cfg_has(cfg, "transformer_layers_per_block") ? int_or_list(cfg, "transformer_layers_per_block", n)
                                                                                  : std::vector<int64_t>(n, 1);
  c.downsample_padding = cfg_int(cfg, "downsample_padding");
  c.mid_block_scale_factor = cfg_double(cfg, "mid_block_scale_factor");
  c.act_fn = parse_activation(cfg_string(cfg, "act_fn"));
  c.norm_num_groups = cfg_int(cfg, "norm_num_groups");
  c.norm_eps = cfg_double(cfg, "norm_eps");
  c.use_linear_projection = optional_bool(cfg, "use_linear_projection", false);
  c.conv_in_kernel = cfg_has(cfg, "conv_in_kernel") ? cfg_int(cfg, "conv_in_kernel") : 3;
  c.conv_out_kernel = cfg_has(cfg, "conv_out_kernel") ? cfg_int(cfg, "conv_out_kernel") : 3;

  for (int64_t ch : c.block_out_channels)
    if (c.norm_num_groups <= 0 || ch % c.norm_num_groups != 0)
      throw std::invalid_argument("config key \"block_out_channels\" is " + quote_list(c.block_out_channels) +
                                  ": every entry must be a multiple of norm_num_groups (" + std::to_string(c.norm_num_groups) + ")");
  for (size_t i = 0; i < n; ++i)
    if (c.num_attention_heads[i] <= 0 || c.num_attention_heads[i] > c.block_out_channels[i])
      throw std::invalid_argument("config key \"attention_head_dim\" is " + quote_list(c.num_attention_heads) +
                                  ": block " + std::to_string(i) + " has " + std::to_string(c.block_out_channels[i]) + " channels");
  for (int64_t k : {c.conv_in_kernel, c.conv_out_kernel})
    if (k <= 0 || k % 2 == 0) throw std::invalid_argument("config keys \"conv_in_kernel\"/\"conv_out_kernel\" must be odd, got " + std::to_string(k));

  // Everything else UNet2DConditionModel can do is outside SD v1.x: refuse it by name.
  require_string(cfg, "mid_block_type", "UNetMidBlock2DCrossAttn");
  require_string(cfg, "resnet_time_scale_shift", "default");
  require_string(cfg, "time_embedding_type", "positional");
  require_string(cfg, "attention_type", "default");
  for (const char* key : {"only_cross_attention", "dual_cross_attention", "upcast_attention", "resnet_skip_time_act",
                          "class_embeddings_concat", "mid_block_only_cross_attention"})
    refuse_true(cfg, key);
  for (const char* key : {"class_embed_type", "addition_embed_type", "num_class_embeds", "encoder_hid_dim", "encoder_hid_dim_type",
                          "time_embedding_dim", "time_embedding_act_fn", "timestep_post_act", "time_cond_proj_dim",
                          "projection_class_embeddings_input_dim", "cross_attention_norm", "reverse_transformer_layers_per_block"})
    refuse_set(cfg, key);
  if (cfg_has(cfg, "resnet_out_scale_factor") && cfg_double(cfg, "resnet_out_scale_factor") != 1.0)
    throw std::invalid_argument("config key \"resnet_out_scale_factor\" is " + cfg_get(cfg, "resnet_out_scale_factor").text +
                                "; this UNet port supports only 1.0 (SD v1.x)");
  return c;
}

// ---------------------------------------------------------------- time embedding

at::Tensor timestep_embedding(const at::Tensor& timesteps, int64_t dim, bool flip_sin_to_cos, double downscale_freq_shift) {
  TORCH_CHECK(timesteps.dim() == 1, "timestep_embedding: timesteps must be 1-D, got ", timesteps.sizes());
  // Same operation order as get_timestep_embedding, in float32 whatever the model dtype.
  const int64_t half = dim / 2;
  at::Tensor exponent = at::arange(0, half, timesteps.options().dtype(at::kFloat)) * (-std::log(kTimestepMaxPeriod));
  exponent = exponent / (static_cast<double>(half) - downscale_freq_shift);
  at::Tensor emb = timesteps.unsqueeze(1).to(at::kFloat) * at::exp(exponent).unsqueeze(0);  // [B, half]
  emb = flip_sin_to_cos ? at::cat({at::cos(emb), at::sin(emb)}, -1) : at::cat({at::sin(emb), at::cos(emb)}, -1);
  if (dim % 2 == 1) emb = at::constant_pad_nd(emb, {0, 1, 0, 0}, 0);
  return emb;  // [B, dim]
}

TimestepEmbeddingImpl::TimestepEmbeddingImpl(int64_t in_channels, int64_t time_embed_dim, Activation act, const at::TensorOptions& opts)
    : act(act) {
  linear_1 = register_module("linear_1", Linear(in_channels, time_embed_dim, true, opts));
  linear_2 = register_module("linear_2", Linear(time_embed_dim, time_embed_dim, true, opts));
}

at::Tensor TimestepEmbeddingImpl::forward(const at::Tensor& sample) {
  return linear_2(apply_activation(act, linear_1(sample)));
}

// ---------------------------------------------------------------- resnet

ResnetBlock2DImpl::ResnetBlock2DImpl(int64_t in_channels, int64_t out_channels, int64_t temb_channels, int64_t groups, double eps,
                                     Activation act, double output_scale_factor, const at::TensorOptions& opts)
    : act(act), output_scale_factor(output_scale_factor) {
  norm1 = register_module("norm1", GroupNorm(groups, in_channels, eps, opts));
  conv1 = register_module("conv1", Conv2d(in_channels, out_channels, 3, 1, 1, true, opts));
  time_emb_proj = register_module("time_emb_proj", Linear(temb_channels, out_channels, true, opts));
  norm2 = register_module("norm2", GroupNorm(groups, out_channels, eps, opts));
  conv2 = register_module("conv2", Conv2d(out_channels, out_channels, 3, 1, 1, true, opts));
  if (in_channels != out_channels) conv_shortcut = register_module("conv_shortcut", Conv2d(in_channels, out_channels, 1, 1, 0, true, opts));
}

at::Tensor ResnetBlock2DImpl::forward(const at::Tensor& x, const at::Tensor& temb) {
  // x: [B, in, H, W], temb: [B, T]
  at::Tensor h = conv1(apply_activation(act, norm1(x)));                         // [B, out, H, W]
  h = h + time_emb_proj(apply_activation(act, temb)).unsqueeze(-1).unsqueeze(-1);  // + [B, out, 1, 1]
  h = conv2(apply_activation(act, norm2(h)));                                    // dropout: identity in eval
  at::Tensor shortcut = conv_shortcut ? conv_shortcut(x) : x;
  at::Tensor out = shortcut + h;
  // diffusers divides by output_scale_factor always; dividing by 1.0 is exact, so it is skipped.
  return output_scale_factor == 1.0 ? out : out / output_scale_factor;
}

// ---------------------------------------------------------------- attention

AttentionImpl::AttentionImpl(int64_t query_dim, int64_t context_dim, int64_t heads, int64_t dim_head, const at::TensorOptions& opts)
    : heads(heads) {
  const int64_t inner = heads * dim_head;
  to_q = register_module("to_q", Linear(query_dim, inner, false, opts));
  to_k = register_module("to_k", Linear(context_dim, inner, false, opts));
  to_v = register_module("to_v", Linear(context_dim, inner, false, opts));
  to_out_0 = Linear(inner, query_dim, true, opts);
  to_out->push_back(to_out_0);
  to_out->push_back(Weightless());  // to_out.1: Dropout
  register_module("to_out", to_out);
}

at::Tensor AttentionImpl::forward(const at::Tensor& x, const at::Tensor& context) {
  const at::Tensor& kv = context.defined() ? context : x;
  // [B, N, H*D] each; scale D^-0.5 inside multihead_attention (Attention.scale = dim_head**-0.5)
  at::Tensor q = to_q(x), k = to_k(kv);
  // cross-attention maps for evaluation masks: a no-op unless an AttentionRecorder is active (attention.h)
  if (context.defined()) record_cross_attention(q, k, heads);
  at::Tensor out = multihead_attention(q, k, to_v(kv), heads, /*causal=*/false);
  return to_out_0(out);  // [B, N, query_dim]
}

FeedForwardImpl::FeedForwardImpl(int64_t dim, int64_t inner_dim, const at::TensorOptions& opts) {
  // net.0 is GEGLU, whose only weight is `proj`
  auto geglu = std::make_shared<torch::nn::Module>();
  geglu_proj = geglu->register_module("proj", Linear(dim, inner_dim * 2, true, opts));
  out = Linear(inner_dim, dim, true, opts);
  net->push_back(geglu);
  net->push_back(Weightless());  // net.1: Dropout
  net->push_back(out);
  register_module("net", net);
}

at::Tensor FeedForwardImpl::forward(const at::Tensor& x) {
  // GEGLU: hidden, gate = proj(x).chunk(2, -1); hidden * gelu(gate) with the exact (erf) gelu
  auto parts = geglu_proj(x).chunk(2, -1);  // 2 x [B, N, inner]
  return out(parts[0] * at::gelu(parts[1]));
}

BasicTransformerBlockImpl::BasicTransformerBlockImpl(int64_t dim, int64_t heads, int64_t dim_head, int64_t cross_attention_dim,
                                                     const at::TensorOptions& opts) {
  norm1 = register_module("norm1", LayerNorm(dim, kTransformerBlockLayerNormEps, opts));
  attn1 = register_module("attn1", Attention(dim, dim, heads, dim_head, opts));
  norm2 = register_module("norm2", LayerNorm(dim, kTransformerBlockLayerNormEps, opts));
  attn2 = register_module("attn2", Attention(dim, cross_attention_dim, heads, dim_head, opts));
  norm3 = register_module("norm3", LayerNorm(dim, kTransformerBlockLayerNormEps, opts));
  ff = register_module("ff", FeedForward(dim, dim * kFeedForwardMult, opts));
}

at::Tensor BasicTransformerBlockImpl::forward(const at::Tensor& x, const at::Tensor& context) {
  // x: [B, N, dim]
  at::Tensor h = attn1(norm1(x)) + x;      // 1. self-attention
  h = attn2(norm2(h), context) + h;        // 2. cross-attention on the text states
  return ff(norm3(h)) + h;                 // 3. feed-forward
}

Transformer2DModelImpl::Transformer2DModelImpl(int64_t heads, int64_t dim_head, int64_t in_channels, int64_t num_layers,
                                               int64_t cross_attention_dim, int64_t norm_num_groups, bool use_linear_projection,
                                               const at::TensorOptions& opts)
    : use_linear_projection(use_linear_projection), inner_dim(heads * dim_head) {
  norm = register_module("norm", GroupNorm(norm_num_groups, in_channels, kTransformerNormEps, opts));
  if (use_linear_projection) proj_in_linear = register_module("proj_in", Linear(in_channels, inner_dim, true, opts));
  else proj_in_conv = register_module("proj_in", Conv2d(in_channels, inner_dim, 1, 1, 0, true, opts));
  for (int64_t i = 0; i < num_layers; ++i) {
    blocks.push_back(BasicTransformerBlock(inner_dim, heads, dim_head, cross_attention_dim, opts));
    transformer_blocks->push_back(blocks.back());
  }
  register_module("transformer_blocks", transformer_blocks);
  if (use_linear_projection) proj_out_linear = register_module("proj_out", Linear(inner_dim, in_channels, true, opts));
  else proj_out_conv = register_module("proj_out", Conv2d(inner_dim, in_channels, 1, 1, 0, true, opts));
}

at::Tensor Transformer2DModelImpl::forward(const at::Tensor& x, const at::Tensor& context) {
  // x: [B, C, H, W]
  const int64_t B = x.size(0), H = x.size(2), W = x.size(3);
  // 1. input: norm, project, flatten to tokens [B, H*W, inner]
  at::Tensor h = norm(x);
  if (use_linear_projection) {
    h = proj_in_linear(h.permute({0, 2, 3, 1}).reshape({B, H * W, x.size(1)}));
  } else {
    h = proj_in_conv(h);
    h = h.permute({0, 2, 3, 1}).reshape({B, H * W, inner_dim});
  }
  // 2. blocks
  for (auto& block : blocks) h = block(h, context);
  // 3. output: back to [B, C, H, W], plus the residual
  if (use_linear_projection) {
    h = proj_out_linear(h).reshape({B, H, W, x.size(1)}).permute({0, 3, 1, 2}).contiguous();
  } else {
    h = proj_out_conv(h.reshape({B, H, W, inner_dim}).permute({0, 3, 1, 2}).contiguous());
  }
  return h + x;
}

// ---------------------------------------------------------------- resampling

Downsample2DImpl::Downsample2DImpl(int64_t channels, int64_t padding, const at::TensorOptions& opts) : padding(padding) {
  conv = register_module("conv", Conv2d(channels, channels, 3, 2, padding, true, opts));
}

at::Tensor Downsample2DImpl::forward(const at::Tensor& x) {
  // padding 0: diffusers pads right and bottom by one so that the stride-2 conv covers the edge
  return conv(padding == 0 ? at::constant_pad_nd(x, {0, 1, 0, 1}, 0) : x);
}

Upsample2DImpl::Upsample2DImpl(int64_t channels, const at::TensorOptions& opts) {
  conv = register_module("conv", Conv2d(channels, channels, 3, 1, 1, true, opts));
}

at::Tensor Upsample2DImpl::forward(const at::Tensor& x, at::IntArrayRef size) {
  // diffusers: F.interpolate(scale_factor=2.0, mode="nearest"), or size=output_size when the latent
  // is not a multiple of the UNet's total downscale. Both pick source pixel floor(dst * in / out),
  // so resizing to the skip's size always gives the same result as diffusers.
  at::Tensor h = at::upsample_nearest2d(x, size, c10::nullopt, c10::nullopt);
  return conv(h);
}

// ---------------------------------------------------------------- blocks

DownBlockImpl::DownBlockImpl(bool with_attention, int64_t in_channels, int64_t out_channels, int64_t temb_channels, int64_t num_layers,
                             int64_t transformer_layers, int64_t heads, int64_t cross_attention_dim, bool add_downsample,
                             const UNetConfig& cfg, const at::TensorOptions& opts) {
  for (int64_t i = 0; i < num_layers; ++i) {
    res.push_back(ResnetBlock2D(i == 0 ? in_channels : out_channels, out_channels, temb_channels, cfg.norm_num_groups, cfg.norm_eps,
                                cfg.act_fn, 1.0, opts));
    resnets->push_back(res.back());
    if (with_attention) {
      attns.push_back(Transformer2DModel(heads, out_channels / heads, out_channels, transformer_layers, cross_attention_dim,
                                         cfg.norm_num_groups, cfg.use_linear_projection, opts));
      attentions->push_back(attns.back());
    }
  }
  // diffusers registers attentions before resnets; the order is that of the state dict
  if (with_attention) register_module("attentions", attentions);
  register_module("resnets", resnets);
  if (add_downsample) {
    down = Downsample2D(out_channels, cfg.downsample_padding, opts);
    downsamplers->push_back(down);
    register_module("downsamplers", downsamplers);
  }
}

at::Tensor DownBlockImpl::forward(const at::Tensor& x, const at::Tensor& temb, const at::Tensor& context, std::vector<at::Tensor>& skips) {
  at::Tensor h = x;  // [B, in, H, W]
  for (size_t i = 0; i < res.size(); ++i) {
    h = res[i](h, temb);  // [B, out, H, W]
    if (!attns.empty()) h = attns[i](h, context);
    skips.push_back(h);
  }
  if (down) {
    h = down(h);  // [B, out, ceil(H/2), ceil(W/2)]
    skips.push_back(h);
  }
  return h;
}

UNetMidBlock2DCrossAttnImpl::UNetMidBlock2DCrossAttnImpl(int64_t channels, int64_t temb_channels, int64_t transformer_layers, int64_t heads,
                                                         int64_t cross_attention_dim, const UNetConfig& cfg, const at::TensorOptions& opts) {
  // num_layers = 1: resnets.0, attentions.0, resnets.1
  for (int64_t i = 0; i < 2; ++i) {
    res.push_back(ResnetBlock2D(channels, channels, temb_channels, cfg.norm_num_groups, cfg.norm_eps, cfg.act_fn, cfg.mid_block_scale_factor, opts));
    resnets->push_back(res.back());
  }
  attns.push_back(Transformer2DModel(heads, channels / heads, channels, transformer_layers, cross_attention_dim, cfg.norm_num_groups,
                                     cfg.use_linear_projection, opts));
  attentions->push_back(attns.back());
  register_module("attentions", attentions);
  register_module("resnets", resnets);
}

at::Tensor UNetMidBlock2DCrossAttnImpl::forward(const at::Tensor& x, const at::Tensor& temb, const at::Tensor& context) {
  at::Tensor h = res[0](x, temb);  // [B, C, H, W]
  for (size_t i = 0; i < attns.size(); ++i) h = res[i + 1](attns[i](h, context), temb);
  return h;
}

UpBlockImpl::UpBlockImpl(bool with_attention, int64_t in_channels, int64_t prev_output_channels, int64_t out_channels, int64_t temb_channels,
                         int64_t num_layers, int64_t transformer_layers, int64_t heads, int64_t cross_attention_dim, bool add_upsample,
                         const UNetConfig& cfg, const at::TensorOptions& opts) {
  for (int64_t i = 0; i < num_layers; ++i) {
    // the skip of the last resnet comes from the previous down block's level (in_channels)
    const int64_t skip_channels = i == num_layers - 1 ? in_channels : out_channels;
    const int64_t resnet_in = i == 0 ? prev_output_channels : out_channels;
    res.push_back(ResnetBlock2D(resnet_in + skip_channels, out_channels, temb_channels, cfg.norm_num_groups, cfg.norm_eps, cfg.act_fn, 1.0, opts));
    resnets->push_back(res.back());
    if (with_attention) {
      attns.push_back(Transformer2DModel(heads, out_channels / heads, out_channels, transformer_layers, cross_attention_dim,
                                         cfg.norm_num_groups, cfg.use_linear_projection, opts));
      attentions->push_back(attns.back());
    }
  }
  if (with_attention) register_module("attentions", attentions);
  register_module("resnets", resnets);
  if (add_upsample) {
    up = Upsample2D(out_channels, opts);
    upsamplers->push_back(up);
    register_module("upsamplers", upsamplers);
  }
}

at::Tensor UpBlockImpl::forward(const at::Tensor& x, const at::Tensor& temb, const at::Tensor& context, std::vector<at::Tensor> skips,
                                at::IntArrayRef upsample_size) {
  at::Tensor h = x;  // [B, prev, H, W]
  for (size_t i = 0; i < res.size(); ++i) {
    at::Tensor skip = std::move(skips.back());
    skips.pop_back();
    h = res[i](at::cat({h, skip}, 1), temb);  // [B, out, H, W]
    if (!attns.empty()) h = attns[i](h, context);
  }
  if (up) h = up(h, upsample_size);  // [B, out, upsample_size]
  return h;
}

// ---------------------------------------------------------------- UNet

UNet2DConditionModelImpl::UNet2DConditionModelImpl(const UNetConfig& c, const at::TensorOptions& opts) : cfg(c) {
  const auto& ch = cfg.block_out_channels;
  const size_t n = ch.size();
  const int64_t time_embed_dim = ch[0] * 4;  // time_embedding_type "positional": timestep_input_dim = ch[0]

  conv_in = register_module("conv_in", Conv2d(cfg.in_channels, ch[0], cfg.conv_in_kernel, 1, (cfg.conv_in_kernel - 1) / 2, true, opts));
  time_embedding = register_module("time_embedding", TimestepEmbedding(ch[0], time_embed_dim, cfg.act_fn, opts));

  int64_t output_channel = ch[0];
  for (size_t i = 0; i < n; ++i) {
    const int64_t input_channel = output_channel;
    output_channel = ch[i];
    downs.push_back(DownBlock(cfg.down_block_types[i] == "CrossAttnDownBlock2D", input_channel, output_channel, time_embed_dim,
                              cfg.layers_per_block[i], cfg.transformer_layers_per_block[i], cfg.num_attention_heads[i],
                              cfg.cross_attention_dim[i], /*add_downsample=*/i + 1 < n, cfg, opts));
    down_blocks->push_back(downs.back());
  }
  register_module("down_blocks", down_blocks);

  // diffusers creates up_blocks before mid_block, so the state dict lists them first
  output_channel = ch[n - 1];
  for (size_t i = 0; i < n; ++i) {
    const size_t r = n - 1 - i;  // the mirrored down block
    const int64_t prev_output_channel = output_channel;
    output_channel = ch[r];
    const int64_t input_channel = ch[r == 0 ? 0 : r - 1];  // reversed[min(i + 1, n - 1)]
    ups.push_back(UpBlock(cfg.up_block_types[i] == "CrossAttnUpBlock2D", input_channel, prev_output_channel, output_channel, time_embed_dim,
                          cfg.layers_per_block[r] + 1, cfg.transformer_layers_per_block[r], cfg.num_attention_heads[r],
                          cfg.cross_attention_dim[r], /*add_upsample=*/i + 1 < n, cfg, opts));
    up_blocks->push_back(ups.back());
  }
  register_module("up_blocks", up_blocks);

  mid_block = register_module("mid_block", UNetMidBlock2DCrossAttn(ch[n - 1], time_embed_dim, cfg.transformer_layers_per_block[n - 1],
                                                                   cfg.num_attention_heads[n - 1], cfg.cross_attention_dim[n - 1], cfg, opts));
  conv_norm_out = register_module("conv_norm_out", GroupNorm(cfg.norm_num_groups, ch[0], cfg.norm_eps, opts));
  conv_out = register_module("conv_out", Conv2d(ch[0], cfg.out_channels, cfg.conv_out_kernel, 1, (cfg.conv_out_kernel - 1) / 2, true, opts));
}

at::Tensor UNet2DConditionModelImpl::forward(const at::Tensor& sample, const at::Tensor& timestep, const at::Tensor& encoder_hidden_states) {
  return forward(sample, timestep, encoder_hidden_states, nullptr);
}

at::Tensor UNet2DConditionModelImpl::forward(const at::Tensor& sample_in, const at::Tensor& timestep, const at::Tensor& encoder_hidden_states,
                                             TensorMap* debug) {
  if (sample_in.dim() != 4 || sample_in.size(1) != cfg.in_channels)
    throw std::invalid_argument("unet: sample must be [B, " + std::to_string(cfg.in_channels) + ", h, w], got " + c10::str(sample_in.sizes()));
  const int64_t B = sample_in.size(0);
  if (encoder_hidden_states.dim() != 3 || encoder_hidden_states.size(0) != B)
    throw std::invalid_argument("unet: encoder_hidden_states must be [" + std::to_string(B) + ", tokens, " +
                                std::to_string(cfg.cross_attention_dim[0]) + "] for a sample of batch " + std::to_string(B) + ", got " +
                                c10::str(encoder_hidden_states.sizes()));
  for (size_t i = 0; i < cfg.cross_attention_dim.size(); ++i)
    // used by the cross-attention down blocks (and their mirrored up blocks) and, for the last entry, the mid block
    if (cfg.cross_attention_dim[i] != encoder_hidden_states.size(2) &&
        (cfg.down_block_types[i] == "CrossAttnDownBlock2D" || cfg.up_block_types[cfg.up_block_types.size() - 1 - i] == "CrossAttnUpBlock2D" ||
         i + 1 == cfg.cross_attention_dim.size()))
      throw std::invalid_argument("unet: encoder_hidden_states has " + std::to_string(encoder_hidden_states.size(2)) +
                                  " features but cross_attention_dim of block " + std::to_string(i) + " is " +
                                  std::to_string(cfg.cross_attention_dim[i]));
  if (timestep.dim() > 1 || (timestep.numel() != 1 && timestep.numel() != B))
    throw std::invalid_argument("unet: timestep must be [] or [" + std::to_string(B) + "], got " + c10::str(timestep.sizes()));
  auto record = [&](const char* name, const at::Tensor& t) {
    if (debug) (*debug)[name] = t;
  };

  // 0. center input if necessary; channels-last memory order when asked (same values)
  at::Tensor sample = cfg.center_input_sample ? sample_in * 2 - 1.0 : sample_in;
  if (channels_last) sample = sample.contiguous(at::MemoryFormat::ChannelsLast);
  // blocks run through checkpoint_block only when a backward will follow
  const bool checkpointed = gradient_checkpointing && at::GradMode::is_enabled();

  // 1. time: broadcast to the batch, sinusoidal projection (float32), MLP in the model dtype
  at::Tensor timesteps = timestep.reshape({-1}).to(sample.device()).expand({B});
  at::Tensor t_emb = timestep_embedding(timesteps, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift);  // [B, ch0]
  record("time_proj", t_emb);
  at::Tensor emb = time_embedding(t_emb.to(sample.scalar_type()));  // [B, 4*ch0]
  record("time_embedding", emb);

  // 2. pre-process
  sample = conv_in(sample);  // [B, ch0, h, w]
  record("conv_in", sample);

  // 3. down: every resnet/attention output and downsampler output is a skip for the up path
  std::vector<at::Tensor> skips{sample};
  for (size_t i = 0; i < downs.size(); ++i) {
    if (checkpointed) {
      // the block's outputs are its skips; the last one is its hidden state
      std::shared_ptr<DownBlockImpl> block = downs[i].ptr();
      std::vector<at::Tensor> out = checkpoint_block(*block, [block](const std::vector<at::Tensor>& in) {
        std::vector<at::Tensor> block_skips;
        block->forward(in[0], in[1], in[2], block_skips);
        return block_skips;
      }, {sample, emb, encoder_hidden_states});
      skips.insert(skips.end(), out.begin(), out.end());
      sample = out.back();
    } else {
      sample = downs[i](sample, emb, encoder_hidden_states, skips);
    }
    if (debug) (*debug)["down_blocks." + std::to_string(i)] = sample;
  }

  // 4. mid
  if (checkpointed) {
    std::shared_ptr<UNetMidBlock2DCrossAttnImpl> block = mid_block.ptr();
    sample = checkpoint_block(*block, [block](const std::vector<at::Tensor>& in) { return std::vector<at::Tensor>{block->forward(in[0], in[1], in[2])}; },
                              {sample, emb, encoder_hidden_states})[0];
  } else {
    sample = mid_block(sample, emb, encoder_hidden_states);
  }
  record("mid_block", sample);

  // 5. up: each block takes as many skips as it has resnets, and upsamples to the spatial size of
  // the next skip (diffusers' forward_upsample_size, which also handles latents of odd size)
  for (size_t i = 0; i < ups.size(); ++i) {
    const size_t take = ups[i]->res.size();
    std::vector<at::Tensor> block_skips(skips.end() - static_cast<std::ptrdiff_t>(take), skips.end());
    skips.resize(skips.size() - take);
    std::vector<int64_t> upsample_size;
    if (!skips.empty()) upsample_size = {skips.back().size(2), skips.back().size(3)};
    if (checkpointed) {
      // inputs: hidden state, temb, context, then this block's skips
      std::shared_ptr<UpBlockImpl> block = ups[i].ptr();
      std::vector<at::Tensor> in{sample, emb, encoder_hidden_states};
      in.insert(in.end(), block_skips.begin(), block_skips.end());
      sample = checkpoint_block(*block, [block, upsample_size](const std::vector<at::Tensor>& x) {
        return std::vector<at::Tensor>{block->forward(x[0], x[1], x[2], std::vector<at::Tensor>(x.begin() + 3, x.end()), upsample_size)};
      }, in)[0];
    } else {
      sample = ups[i](sample, emb, encoder_hidden_states, std::move(block_skips), upsample_size);
    }
    if (debug) (*debug)["up_blocks." + std::to_string(i)] = sample;
  }

  // 6. post-process
  sample = conv_norm_out(sample);
  record("conv_norm_out", sample);
  sample = apply_activation(cfg.act_fn, sample);
  record("conv_act", sample);
  return conv_out(sample);  // [B, out_channels, h, w]
}

void UNet2DConditionModelImpl::set_channels_last(bool on) {
  torch::NoGradGuard no_grad;
  const at::MemoryFormat format = on ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  // set_data keeps each parameter's TensorImpl, so the layers' weight members see the new layout
  for (auto& p : parameters(/*recurse=*/true))
    if (p.dim() == 4) p.set_data(p.contiguous(format));
  channels_last = on;
}

// ---------------------------------------------------------------- NativeModel

namespace {

class UNetModel : public NativeModel {
 public:
  UNetModel(const UNetConfig& cfg, const at::TensorOptions& opts) : unet_(cfg, opts) {}
  torch::nn::Module& module() override { return *unet_; }

  TensorMap run(const std::string& method, const TensorMap& inputs) override {
    if (method != "forward" && method != "forward_debug")
      throw std::invalid_argument("unet has no method \"" + method + "\" (expected forward or forward_debug)");
    const at::Tensor& sample = input(inputs, "sample");
    const at::Tensor& timestep = input(inputs, "timestep");
    const at::Tensor& context = input(inputs, "encoder_hidden_states");
    TensorMap out;
    out["sample"] = unet_->forward(sample, timestep, context, method == "forward_debug" ? &out : nullptr);
    return out;
  }

 private:
  UNet2DConditionModel unet_;
};

}  // namespace

std::shared_ptr<NativeModel> make_unet(const JsonValue& config, const at::TensorOptions& opts) {
  return std::make_shared<UNetModel>(UNetConfig::from_json(config), opts);
}

}  // namespace si
