// ViTModel (no pooler), ported from transformers 4.33 src/transformers/models/vit/modeling_vit.py.
#include "vit.h"
#include "util.h"

#include <stdexcept>
#include <string>

#include "attention.h"
#include "model.h"

namespace si {

namespace {

}  // namespace

VitConfig VitConfig::from_json(const JsonValue& cfg) {
  VitConfig c;
  c.hidden_size = cfg_int(cfg, "hidden_size");
  c.num_hidden_layers = cfg_int(cfg, "num_hidden_layers");
  c.num_attention_heads = cfg_int(cfg, "num_attention_heads");
  c.intermediate_size = cfg_int(cfg, "intermediate_size");
  c.image_size = cfg_int(cfg, "image_size");
  c.patch_size = cfg_int(cfg, "patch_size");
  c.num_channels = cfg_int(cfg, "num_channels");
  c.layer_norm_eps = cfg_double(cfg, "layer_norm_eps");
  c.qkv_bias = cfg_bool(cfg, "qkv_bias");
  const std::string act = cfg_string(cfg, "hidden_act");
  if (act != "gelu") throw std::invalid_argument("config key \"hidden_act\" is \"" + act + "\", expected \"gelu\" (the exact GELU of DINO ViTs)");
  if (c.hidden_size <= 0 || c.intermediate_size <= 0 || c.num_hidden_layers < 0 || c.num_attention_heads <= 0 || c.num_channels <= 0 ||
      c.patch_size <= 0 || c.image_size < c.patch_size)
    throw std::invalid_argument("ViT config: sizes must be positive and image_size " + std::to_string(c.image_size) + " at least patch_size " +
                                std::to_string(c.patch_size));
  if (c.hidden_size % c.num_attention_heads != 0)
    throw std::invalid_argument("ViT config: hidden_size " + std::to_string(c.hidden_size) + " is not divisible by num_attention_heads " +
                                std::to_string(c.num_attention_heads));
  return c;
}

// ---------------------------------------------------------------- embeddings

VitPatchEmbeddingsImpl::VitPatchEmbeddingsImpl(const VitConfig& cfg, const at::TensorOptions& opts)
    : num_channels(cfg.num_channels), image_size(cfg.image_size) {
  projection = register_module("projection", Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, cfg.patch_size, 0, /*bias=*/true, opts));
}

at::Tensor VitPatchEmbeddingsImpl::forward(const at::Tensor& pixel_values) {
  // pixel_values: [B, 3, S, S]
  if (pixel_values.dim() != 4 || pixel_values.size(1) != num_channels)
    throw std::invalid_argument("ViT: pixel_values must be [B, " + std::to_string(num_channels) + ", H, W], got " + shape_str(pixel_values.sizes()));
  // ViTPatchEmbeddings.forward without interpolate_pos_encoding: the size must be the configured one
  // (position-embedding interpolation is not supported).
  if (pixel_values.size(2) != image_size || pixel_values.size(3) != image_size)
    throw std::invalid_argument("ViT: input image size (" + std::to_string(pixel_values.size(2)) + "*" + std::to_string(pixel_values.size(3)) +
                                ") doesn't match model (" + std::to_string(image_size) + "*" + std::to_string(image_size) +
                                "); position-embedding interpolation is not supported");
  // conv k = s = p: [B, C, g, g] -> [B, g*g, C]
  return projection(pixel_values).flatten(2).transpose(1, 2);
}

VitEmbeddingsImpl::VitEmbeddingsImpl(const VitConfig& cfg, const at::TensorOptions& opts) {
  const int64_t grid = cfg.image_size / cfg.patch_size;
  cls_token = register_parameter("cls_token", at::empty({1, 1, cfg.hidden_size}, opts));
  position_embeddings = register_parameter("position_embeddings", at::empty({1, grid * grid + 1, cfg.hidden_size}, opts));
  patch_embeddings = register_module("patch_embeddings", VitPatchEmbeddings(cfg, opts));
}

at::Tensor VitEmbeddingsImpl::forward(const at::Tensor& pixel_values) {
  // pixel_values: [B, 3, S, S]
  // 1. patches: [B, g*g, C]
  at::Tensor patches = patch_embeddings(pixel_values);
  const int64_t B = patches.size(0);
  // 2. prepend CLS: [B, 1 + g*g, C]
  at::Tensor h = at::cat({cls_token.expand({B, 1, cls_token.size(2)}), patches}, 1);
  // 3. absolute positions (dropout is identity at inference)
  return h + position_embeddings;
}

// ---------------------------------------------------------------- encoder

VitSelfAttentionImpl::VitSelfAttentionImpl(const VitConfig& cfg, const at::TensorOptions& opts) : heads(cfg.num_attention_heads) {
  query = register_module("query", Linear(cfg.hidden_size, cfg.hidden_size, cfg.qkv_bias, opts));
  key = register_module("key", Linear(cfg.hidden_size, cfg.hidden_size, cfg.qkv_bias, opts));
  value = register_module("value", Linear(cfg.hidden_size, cfg.hidden_size, cfg.qkv_bias, opts));
}

at::Tensor VitSelfAttentionImpl::forward(const at::Tensor& x) {
  // x: [B, N, C]; softmax(q kᵀ / sqrt(head_dim)) v per head, no mask
  return multihead_attention(query(x), key(x), value(x), heads, /*causal=*/false);
}

VitSelfOutputImpl::VitSelfOutputImpl(const VitConfig& cfg, const at::TensorOptions& opts) {
  dense = register_module("dense", Linear(cfg.hidden_size, cfg.hidden_size, true, opts));
}

VitAttentionImpl::VitAttentionImpl(const VitConfig& cfg, const at::TensorOptions& opts) {
  attention = register_module("attention", VitSelfAttention(cfg, opts));
  output = register_module("output", VitSelfOutput(cfg, opts));
}

VitIntermediateImpl::VitIntermediateImpl(const VitConfig& cfg, const at::TensorOptions& opts) {
  dense = register_module("dense", Linear(cfg.hidden_size, cfg.intermediate_size, true, opts));
}

VitOutputImpl::VitOutputImpl(const VitConfig& cfg, const at::TensorOptions& opts) {
  dense = register_module("dense", Linear(cfg.intermediate_size, cfg.hidden_size, true, opts));
}

VitLayerImpl::VitLayerImpl(const VitConfig& cfg, const at::TensorOptions& opts) {
  attention = register_module("attention", VitAttention(cfg, opts));
  intermediate = register_module("intermediate", VitIntermediate(cfg, opts));
  output = register_module("output", VitOutput(cfg, opts));
  layernorm_before = register_module("layernorm_before", LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, opts));
  layernorm_after = register_module("layernorm_after", LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, opts));
}

at::Tensor VitLayerImpl::forward(const at::Tensor& x) {
  // x: [B, N, C]
  // 1. self-attention, pre-LN, residual
  at::Tensor h = attention(layernorm_before(x)) + x;
  // 2. MLP, pre-LN; ViTOutput adds the residual
  return output->forward(intermediate(layernorm_after(h)), h);
}

VitEncoderImpl::VitEncoderImpl(const VitConfig& cfg, const at::TensorOptions& opts) {
  layer = register_module("layer", torch::nn::ModuleList());
  for (int64_t i = 0; i < cfg.num_hidden_layers; ++i) layer->push_back(VitLayer(cfg, opts));
}

at::Tensor VitEncoderImpl::forward(const at::Tensor& x, std::vector<at::Tensor>* hidden_states) {
  // x: [B, N, C]
  at::Tensor h = x;
  for (const auto& l : *layer) {
    if (hidden_states) hidden_states->push_back(h);
    h = l->as<VitLayerImpl>()->forward(h);
  }
  if (hidden_states) hidden_states->push_back(h);
  return h;
}

// ---------------------------------------------------------------- model

VitModelImpl::VitModelImpl(const VitConfig& cfg, const at::TensorOptions& opts) {
  embeddings = register_module("embeddings", VitEmbeddings(cfg, opts));
  encoder = register_module("encoder", VitEncoder(cfg, opts));
  layernorm = register_module("layernorm", LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, opts));
}

VitModelOutput VitModelImpl::forward(const at::Tensor& pixel_values, bool output_hidden_states) {
  // pixel_values: [B, 3, S, S]
  VitModelOutput out;
  // 1. embeddings: [B, N, C]
  at::Tensor h = embeddings(pixel_values);
  // 2. encoder: [B, N, C]
  h = encoder->forward(h, output_hidden_states ? &out.hidden_states : nullptr);
  // 3. final layernorm (no pooler: add_pooling_layer=False)
  out.last_hidden_state = layernorm(h);
  return out;
}

namespace {

class VitNative : public NativeModel {
 public:
  VitNative(const VitConfig& cfg, const at::TensorOptions& opts) : model_(cfg, opts) {}
  torch::nn::Module& module() override { return *model_; }
  // "forward": pixel_values [B, 3, S, S] -> last_hidden_state [B, N, C], cls [B, C], hidden_states.0..L
  TensorMap run(const std::string& method, const TensorMap& inputs) override {
    if (method != "forward") throw std::invalid_argument("vit: unknown method \"" + method + "\" (expected forward)");
    VitModelOutput r = model_->forward(input(inputs, "pixel_values"), /*output_hidden_states=*/true);
    TensorMap out{{"last_hidden_state", r.last_hidden_state}, {"cls", r.last_hidden_state.select(1, 0)}};
    for (size_t i = 0; i < r.hidden_states.size(); ++i) out["hidden_states." + std::to_string(i)] = r.hidden_states[i];
    return out;
  }

 private:
  VitModel model_;
};

}  // namespace

std::shared_ptr<NativeModel> make_vit(const JsonValue& config, const at::TensorOptions& opts) {
  return std::make_shared<VitNative>(VitConfig::from_json(config), opts);
}

}  // namespace si
