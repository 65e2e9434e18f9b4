// ViTModel without pooler (the DINO ViT-S/16 of facebook/dino-vits16, kind "vit"), ported from
// transformers 4.33 src/transformers/models/vit/modeling_vit.py. Names are the checkpoint keys:
// `embeddings.cls_token`, `encoder.layer.N.attention.attention.query`, `layernorm`, ...
#pragma once

#include <ATen/ATen.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/pimpl.h>

#include <vector>

#include "json.h"
#include "layers.h"

namespace si {

// ViTConfig (configuration_vit.py): the keys read are listed in from_json.
struct VitConfig {
  int64_t hidden_size = 0, num_hidden_layers = 0, num_attention_heads = 0, intermediate_size = 0;
  int64_t image_size = 0, patch_size = 0, num_channels = 3;
  double layer_norm_eps = 1e-12;
  bool qkv_bias = true;
  static VitConfig from_json(const JsonValue& cfg);
};

// ViTPatchEmbeddings: non-overlapping patches by a conv with k = s = patch_size (with bias).
class VitPatchEmbeddingsImpl : public torch::nn::Module {
 public:
  VitPatchEmbeddingsImpl(const VitConfig& cfg, const at::TensorOptions& opts);
  // pixel_values: [B, 3, S, S] -> [B, (S/p)^2, C]
  at::Tensor forward(const at::Tensor& pixel_values);

  int64_t num_channels, image_size;
  Conv2d projection{nullptr};
};
TORCH_MODULE(VitPatchEmbeddings);

// ViTEmbeddings: CLS token + patches + learned absolute positions (no mask token).
class VitEmbeddingsImpl : public torch::nn::Module {
 public:
  VitEmbeddingsImpl(const VitConfig& cfg, const at::TensorOptions& opts);
  // pixel_values: [B, 3, S, S] -> [B, 1 + (S/p)^2, C]
  at::Tensor forward(const at::Tensor& pixel_values);

  at::Tensor cls_token;            // [1, 1, C]
  at::Tensor position_embeddings;  // [1, 1 + (S/p)^2, C]
  VitPatchEmbeddings patch_embeddings{nullptr};
};
TORCH_MODULE(VitEmbeddings);

// ViTSelfAttention: `query`, `key`, `value` projections (bias when qkv_bias).
class VitSelfAttentionImpl : public torch::nn::Module {
 public:
  VitSelfAttentionImpl(const VitConfig& cfg, const at::TensorOptions& opts);
  // x: [B, N, C] -> [B, N, C] (heads merged, before the output projection)
  at::Tensor forward(const at::Tensor& x);

  int64_t heads;
  Linear query{nullptr}, key{nullptr}, value{nullptr};
};
TORCH_MODULE(VitSelfAttention);

// ViTSelfOutput: `dense` (its residual is added by ViTLayer).
class VitSelfOutputImpl : public torch::nn::Module {
 public:
  VitSelfOutputImpl(const VitConfig& cfg, const at::TensorOptions& opts);
  at::Tensor forward(const at::Tensor& x) { return dense(x); }  // x: [B, N, C]

  Linear dense{nullptr};
};
TORCH_MODULE(VitSelfOutput);

// ViTAttention: `attention` (self-attention) + `output` (projection).
class VitAttentionImpl : public torch::nn::Module {
 public:
  VitAttentionImpl(const VitConfig& cfg, const at::TensorOptions& opts);
  at::Tensor forward(const at::Tensor& x) { return output(attention(x)); }  // x: [B, N, C]

  VitSelfAttention attention{nullptr};
  VitSelfOutput output{nullptr};
};
TORCH_MODULE(VitAttention);

// ViTIntermediate: `dense` to intermediate_size, then exact (erf) GELU.
class VitIntermediateImpl : public torch::nn::Module {
 public:
  VitIntermediateImpl(const VitConfig& cfg, const at::TensorOptions& opts);
  at::Tensor forward(const at::Tensor& x) { return at::gelu(dense(x)); }  // [B, N, C] -> [B, N, I]

  Linear dense{nullptr};
};
TORCH_MODULE(VitIntermediate);

// ViTOutput: `dense` back to hidden_size, plus the residual.
class VitOutputImpl : public torch::nn::Module {
 public:
  VitOutputImpl(const VitConfig& cfg, const at::TensorOptions& opts);
  // x: [B, N, I], residual: [B, N, C] -> [B, N, C]
  at::Tensor forward(const at::Tensor& x, const at::Tensor& residual) { return dense(x) + residual; }

  Linear dense{nullptr};
};
TORCH_MODULE(VitOutput);

// ViTLayer: pre-LN block, x + attention(layernorm_before(x)), then + mlp(layernorm_after(.)).
class VitLayerImpl : public torch::nn::Module {
 public:
  VitLayerImpl(const VitConfig& cfg, const at::TensorOptions& opts);
  // x: [B, N, C] -> [B, N, C]
  at::Tensor forward(const at::Tensor& x);

  VitAttention attention{nullptr};
  VitIntermediate intermediate{nullptr};
  VitOutput output{nullptr};
  LayerNorm layernorm_before{nullptr}, layernorm_after{nullptr};
};
TORCH_MODULE(VitLayer);

// ViTEncoder: `layer.N`.
class VitEncoderImpl : public torch::nn::Module {
 public:
  VitEncoderImpl(const VitConfig& cfg, const at::TensorOptions& opts);
  // x: [B, N, C] -> [B, N, C]. When `hidden_states` is given it receives transformers'
  // output_hidden_states: the input of every layer, then the last layer's output (L+1 tensors).
  at::Tensor forward(const at::Tensor& x, std::vector<at::Tensor>* hidden_states = nullptr);

  torch::nn::ModuleList layer{nullptr};
};
TORCH_MODULE(VitEncoder);

struct VitModelOutput {
  at::Tensor last_hidden_state;           // [B, N, C], after the final layernorm
  std::vector<at::Tensor> hidden_states;  // L+1 x [B, N, C] when asked for: .0 embeddings, last = before layernorm
};

// ViTModel(add_pooling_layer=False): the checkpoint root.
class VitModelImpl : public torch::nn::Module {
 public:
  VitModelImpl(const VitConfig& cfg, const at::TensorOptions& opts);
  // pixel_values: [B, num_channels, image_size, image_size]
  VitModelOutput forward(const at::Tensor& pixel_values, bool output_hidden_states = false);

  VitEmbeddings embeddings{nullptr};
  VitEncoder encoder{nullptr};
  LayerNorm layernorm{nullptr};
};
TORCH_MODULE(VitModel);

}  // namespace si
