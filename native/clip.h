// CLIP text and vision towers, ported from transformers 4.33
// (src/transformers/models/clip/modeling_clip.py):
//   CLIPTextModel                  -> kind "clip_text"   (the SD v1.5 text encoder)
//   CLIPVisionModelWithProjection  -> kind "clip_vision" (the SingleInsert image encoder trunk)
//   CLIPModel                      -> kind "clip"        (CLIP-T / CLIP-I metrics)
// Module and parameter names are the transformers state-dict keys (`text_model.encoder.layers.0.
// self_attn.q_proj.weight`, `vision_model.pre_layrnorm.weight` (sic), `logit_scale`, ...).
#pragma once

#include <ATen/ATen.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/pimpl.h>

#include <string>
#include <vector>

#include "json.h"
#include "layers.h"

namespace si {

// ---------------------------------------------------------------- configs

// transformers' ACT2FN entries that CLIP checkpoints use.
enum class ClipActivation { QuickGelu, Gelu };
// "quick_gelu" | "gelu"; throws std::invalid_argument naming `key` for anything else.
ClipActivation parse_clip_activation(const std::string& value, const std::string& key);

// The encoder shape shared by both towers.
struct ClipEncoderConfig {
  int64_t hidden_size = 0, intermediate_size = 0, num_hidden_layers = 0, num_attention_heads = 0;
  ClipActivation hidden_act = ClipActivation::QuickGelu;
  double layer_norm_eps = 1e-5;
};

// CLIPTextConfig (configuration_clip.py): the keys read are listed in from_json.
struct ClipTextConfig {
  ClipEncoderConfig encoder;
  int64_t vocab_size = 0, max_position_embeddings = 0;
  // 2 = the legacy value of SD v1.5 / openai configs: pool at argmax(input_ids) (see CLIPTextTransformer).
  int64_t eos_token_id = 0;
  static ClipTextConfig from_json(const JsonValue& cfg);
};

// CLIPVisionConfig (configuration_clip.py).
struct ClipVisionConfig {
  ClipEncoderConfig encoder;
  int64_t num_channels = 3, image_size = 0, patch_size = 0;
  int64_t projection_dim = 0;  // used by CLIPVisionModelWithProjection only (CLIPModel uses the top-level value)
  static ClipVisionConfig from_json(const JsonValue& cfg);
};

// ---------------------------------------------------------------- encoder

// CLIPAttention: multi-head self-attention with biased q/k/v/out projections; the causal mask is
// used by the text tower only.
class ClipAttentionImpl : public torch::nn::Module {
 public:
  ClipAttentionImpl(int64_t hidden, int64_t heads, const at::TensorOptions& opts);
  // x: [B, N, C] -> [B, N, C]
  at::Tensor forward(const at::Tensor& x, bool causal);

  int64_t heads;
  Linear q_proj{nullptr}, k_proj{nullptr}, v_proj{nullptr}, out_proj{nullptr};
};
TORCH_MODULE(ClipAttention);

// CLIPMLP: fc1 -> activation -> fc2.
class ClipMlpImpl : public torch::nn::Module {
 public:
  ClipMlpImpl(int64_t hidden, int64_t intermediate, ClipActivation act, const at::TensorOptions& opts);
  // x: [B, N, C] -> [B, N, C]
  at::Tensor forward(const at::Tensor& x);

  ClipActivation act;
  Linear fc1{nullptr}, fc2{nullptr};
};
TORCH_MODULE(ClipMlp);

// CLIPEncoderLayer: pre-LN block, x + attn(ln1(x)), then x + mlp(ln2(x)).
class ClipEncoderLayerImpl : public torch::nn::Module {
 public:
  ClipEncoderLayerImpl(const ClipEncoderConfig& cfg, const at::TensorOptions& opts);
  // x: [B, N, C] -> [B, N, C]
  at::Tensor forward(const at::Tensor& x, bool causal);

  ClipAttention self_attn{nullptr};
  LayerNorm layer_norm1{nullptr};
  ClipMlp mlp{nullptr};
  LayerNorm layer_norm2{nullptr};
};
TORCH_MODULE(ClipEncoderLayer);

// CLIPEncoder: `layers.N`.
class ClipEncoderImpl : public torch::nn::Module {
 public:
  ClipEncoderImpl(const ClipEncoderConfig& cfg, const at::TensorOptions& opts);
  // x: [B, N, C] -> [B, N, C]. When `hidden_states` is given it receives transformers'
  // output_hidden_states: the input of every layer, then the last layer's output (L+1 tensors).
  at::Tensor forward(const at::Tensor& x, bool causal, std::vector<at::Tensor>* hidden_states = nullptr);

  torch::nn::ModuleList layers{nullptr};
};
TORCH_MODULE(ClipEncoder);

// ---------------------------------------------------------------- text tower

// CLIPTextEmbeddings: token + absolute position embeddings, with an optional replacement of the
// token-embedding output (textual inversion: the `*` token's embedding is the trained vector).
class ClipTextEmbeddingsImpl : public torch::nn::Module {
 public:
  ClipTextEmbeddingsImpl(const ClipTextConfig& cfg, const at::TensorOptions& opts);
  // input_ids: [B, L] int64; replace_index: [P, 2] int64 rows (batch, position) or undefined;
  // replace_values: [P, C] (or [C], used at every position) -> [B, L, C]
  at::Tensor forward(const at::Tensor& input_ids, const at::Tensor& replace_index = {}, const at::Tensor& replace_values = {});

  Embedding token_embedding{nullptr}, position_embedding{nullptr};
};
TORCH_MODULE(ClipTextEmbeddings);

struct ClipTextOutput {
  at::Tensor last_hidden_state;       // [B, L, C], after final_layer_norm (what SD conditions on)
  at::Tensor pooler_output;           // [B, C], last_hidden_state at the EOS position
  at::Tensor pooled_index;            // [B] int64, that position
  std::vector<at::Tensor> hidden_states;  // L+1 x [B, L, C] when asked for: .0 embeddings, last = before final LN
};

// CLIPTextTransformer (registered as `text_model`).
class ClipTextTransformerImpl : public torch::nn::Module {
 public:
  ClipTextTransformerImpl(const ClipTextConfig& cfg, const at::TensorOptions& opts);
  // input_ids: [B, L] int64 (L <= max_position_embeddings); replacement as in ClipTextEmbeddings.
  ClipTextOutput forward(const at::Tensor& input_ids, const at::Tensor& replace_index = {}, const at::Tensor& replace_values = {},
                         bool output_hidden_states = false);

  ClipTextConfig cfg;
  ClipTextEmbeddings embeddings{nullptr};
  ClipEncoder encoder{nullptr};
  LayerNorm final_layer_norm{nullptr};
};
TORCH_MODULE(ClipTextTransformer);

// CLIPTextModel: the root of the SD text encoder checkpoint (`text_model.*`).
class ClipTextModelImpl : public torch::nn::Module {
 public:
  ClipTextModelImpl(const ClipTextConfig& cfg, const at::TensorOptions& opts);
  ClipTextOutput forward(const at::Tensor& input_ids, const at::Tensor& replace_index = {}, const at::Tensor& replace_values = {},
                         bool output_hidden_states = false) {
    return text_model->forward(input_ids, replace_index, replace_values, output_hidden_states);
  }

  ClipTextTransformer text_model{nullptr};
};
TORCH_MODULE(ClipTextModel);

// ---------------------------------------------------------------- vision tower

// CLIPVisionEmbeddings: CLS + non-overlapping patches (conv, no bias) + absolute positions.
class ClipVisionEmbeddingsImpl : public torch::nn::Module {
 public:
  ClipVisionEmbeddingsImpl(const ClipVisionConfig& cfg, const at::TensorOptions& opts);
  // pixel_values: [B, 3, S, S] -> [B, 1 + (S/p)^2, C]
  at::Tensor forward(const at::Tensor& pixel_values);

  int64_t num_channels, image_size, patch_size;
  at::Tensor class_embedding;  // [C]
  Conv2d patch_embedding{nullptr};
  Embedding position_embedding{nullptr};
};
TORCH_MODULE(ClipVisionEmbeddings);

struct ClipVisionOutput {
  at::Tensor last_hidden_state;       // [B, N, C], NOT post-normalised
  at::Tensor pooler_output;           // [B, C] = post_layernorm(CLS)
  std::vector<at::Tensor> hidden_states;  // L+1 x [B, N, C] when asked for: .0 = after pre_layrnorm
};

// CLIPVisionTransformer (registered as `vision_model`).
class ClipVisionTransformerImpl : public torch::nn::Module {
 public:
  ClipVisionTransformerImpl(const ClipVisionConfig& cfg, const at::TensorOptions& opts);
  // pixel_values: [B, num_channels, image_size, image_size]
  ClipVisionOutput forward(const at::Tensor& pixel_values, bool output_hidden_states = false);

  ClipVisionEmbeddings embeddings{nullptr};
  LayerNorm pre_layrnorm{nullptr};  // sic: the transformers attribute name, hence the checkpoint key
  ClipEncoder encoder{nullptr};
  LayerNorm post_layernorm{nullptr};
};
TORCH_MODULE(ClipVisionTransformer);

struct ClipVisionProjectionOutput {
  at::Tensor image_embeds;  // [B, projection_dim], visual_projection(pooler_output), NOT L2-normalised
  ClipVisionOutput vision;
};

// CLIPVisionModelWithProjection: `vision_model.*` + `visual_projection.weight` (no bias).
class ClipVisionModelWithProjectionImpl : public torch::nn::Module {
 public:
  ClipVisionModelWithProjectionImpl(const ClipVisionConfig& cfg, const at::TensorOptions& opts);
  ClipVisionProjectionOutput forward(const at::Tensor& pixel_values, bool output_hidden_states = false);

  ClipVisionTransformer vision_model{nullptr};
  Linear visual_projection{nullptr};
};
TORCH_MODULE(ClipVisionModelWithProjection);

// ---------------------------------------------------------------- CLIPModel

struct ClipEmbeds {
  at::Tensor embeds;               // [N, projection_dim], L2-normalised
  at::Tensor embeds_unnormalized;  // [N, projection_dim], the projection
};

// CLIPModel: both towers, their bias-free projections and the learned temperature `logit_scale`
// (a 0-dim parameter read from the weights; the config's logit_scale_init_value is only its initialiser).
class ClipModelImpl : public torch::nn::Module {
 public:
  ClipModelImpl(const ClipTextConfig& text_cfg, const ClipVisionConfig& vision_cfg, int64_t projection_dim, const at::TensorOptions& opts);
  // input_ids: [T, L] int64 -> text_projection(pooler_output), normalised and not
  ClipEmbeds encode_text(const at::Tensor& input_ids, const at::Tensor& replace_index = {}, const at::Tensor& replace_values = {});
  // pixel_values: [I, 3, S, S] -> visual_projection(post_layernorm(CLS)), normalised and not
  ClipEmbeds encode_image(const at::Tensor& pixel_values);

  ClipTextTransformer text_model{nullptr};
  ClipVisionTransformer vision_model{nullptr};
  Linear visual_projection{nullptr}, text_projection{nullptr};
  at::Tensor logit_scale;  // []
};
TORCH_MODULE(ClipModel);

// x / ||x||_2 over the last dim, as CLIPModel.forward normalises its embeddings.
at::Tensor clip_l2_normalize(const at::Tensor& x);

}  // namespace si
