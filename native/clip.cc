// CLIP towers and CLIPModel, ported from transformers 4.33 src/transformers/models/clip/modeling_clip.py.
#include "clip.h"
#include "util.h"

#include <stdexcept>
#include <string>

#include "attention.h"
#include "model.h"

namespace si {

namespace {

// transformers.activations: QuickGELUActivation is x * sigmoid(1.702 x) (the approximation the
// original CLIP was trained with); GELUActivation is the exact erf form.
at::Tensor activate(const at::Tensor& x, ClipActivation act) {
  switch (act) {
    case ClipActivation::QuickGelu: return x * at::sigmoid(1.702 * x);
    case ClipActivation::Gelu: return at::gelu(x);
  }
  throw std::logic_error("unhandled ClipActivation");
}

ClipEncoderConfig encoder_config_from_json(const JsonValue& cfg) {
  ClipEncoderConfig c;
  c.hidden_size = cfg_int(cfg, "hidden_size");
  c.intermediate_size = cfg_int(cfg, "intermediate_size");
  c.num_hidden_layers = cfg_int(cfg, "num_hidden_layers");
  c.num_attention_heads = cfg_int(cfg, "num_attention_heads");
  c.hidden_act = parse_clip_activation(cfg_string(cfg, "hidden_act"), "hidden_act");
  c.layer_norm_eps = cfg_double(cfg, "layer_norm_eps");
  if (c.hidden_size <= 0 || c.intermediate_size <= 0 || c.num_hidden_layers < 0 || c.num_attention_heads <= 0)
    throw std::invalid_argument("CLIP config: hidden_size, intermediate_size and num_attention_heads must be positive and num_hidden_layers >= 0");
  if (c.hidden_size % c.num_attention_heads != 0)
    throw std::invalid_argument("CLIP config: hidden_size " + std::to_string(c.hidden_size) + " is not divisible by num_attention_heads " +
                                std::to_string(c.num_attention_heads));
  return c;
}

}  // namespace

ClipActivation parse_clip_activation(const std::string& value, const std::string& key) {
  if (value == "quick_gelu") return ClipActivation::QuickGelu;
  if (value == "gelu") return ClipActivation::Gelu;
  throw std::invalid_argument("config key \"" + key + "\" is \"" + value + "\", expected \"quick_gelu\" or \"gelu\"");
}

ClipTextConfig ClipTextConfig::from_json(const JsonValue& cfg) {
  ClipTextConfig c;
  c.encoder = encoder_config_from_json(cfg);
  c.vocab_size = cfg_int(cfg, "vocab_size");
  c.max_position_embeddings = cfg_int(cfg, "max_position_embeddings");
  c.eos_token_id = cfg_int(cfg, "eos_token_id");
  if (c.vocab_size <= 0 || c.max_position_embeddings <= 0)
    throw std::invalid_argument("CLIP text config: vocab_size and max_position_embeddings must be positive");
  return c;
}

ClipVisionConfig ClipVisionConfig::from_json(const JsonValue& cfg) {
  ClipVisionConfig c;
  c.encoder = encoder_config_from_json(cfg);
  c.num_channels = cfg_int(cfg, "num_channels");
  c.image_size = cfg_int(cfg, "image_size");
  c.patch_size = cfg_int(cfg, "patch_size");
  c.projection_dim = cfg_int(cfg, "projection_dim");
  if (c.num_channels <= 0 || c.patch_size <= 0 || c.image_size < c.patch_size || c.projection_dim <= 0)
    throw std::invalid_argument("CLIP vision config: num_channels, patch_size and projection_dim must be positive and image_size " +
                                std::to_string(c.image_size) + " at least patch_size " + std::to_string(c.patch_size));
  return c;
}

at::Tensor clip_l2_normalize(const at::Tensor& x) {
  // CLIPModel.forward: `embeds / embeds.norm(p=2, dim=-1, keepdim=True)` (no epsilon)
  return x / x.norm(2, {-1}, /*keepdim=*/true);
}

// ---------------------------------------------------------------- encoder

ClipAttentionImpl::ClipAttentionImpl(int64_t hidden, int64_t heads, const at::TensorOptions& opts) : heads(heads) {
  k_proj = register_module("k_proj", Linear(hidden, hidden, true, opts));
  v_proj = register_module("v_proj", Linear(hidden, hidden, true, opts));
  q_proj = register_module("q_proj", Linear(hidden, hidden, true, opts));
  out_proj = register_module("out_proj", Linear(hidden, hidden, true, opts));
}

at::Tensor ClipAttentionImpl::forward(const at::Tensor& x, bool causal) {
  // x: [B, N, C]. CLIPAttention scales q by head_dim^-0.5 before q·kᵀ; multihead_attention scales
  // the scores instead (the same product up to rounding).
  at::Tensor h = multihead_attention(q_proj(x), k_proj(x), v_proj(x), heads, causal);  // [B, N, C]
  return out_proj(h);
}

ClipMlpImpl::ClipMlpImpl(int64_t hidden, int64_t intermediate, ClipActivation act, const at::TensorOptions& opts) : act(act) {
  fc1 = register_module("fc1", Linear(hidden, intermediate, true, opts));
  fc2 = register_module("fc2", Linear(intermediate, hidden, true, opts));
}

at::Tensor ClipMlpImpl::forward(const at::Tensor& x) {
  // x: [B, N, C] -> [B, N, I] -> [B, N, C]
  return fc2(activate(fc1(x), act));
}

ClipEncoderLayerImpl::ClipEncoderLayerImpl(const ClipEncoderConfig& cfg, const at::TensorOptions& opts) {
  self_attn = register_module("self_attn", ClipAttention(cfg.hidden_size, cfg.num_attention_heads, opts));
  layer_norm1 = register_module("layer_norm1", LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, opts));
  mlp = register_module("mlp", ClipMlp(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, opts));
  layer_norm2 = register_module("layer_norm2", LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, opts));
}

at::Tensor ClipEncoderLayerImpl::forward(const at::Tensor& x, bool causal) {
  // x: [B, N, C]
  // 1. self-attention, pre-LN, residual
  at::Tensor h = x + self_attn->forward(layer_norm1(x), causal);
  // 2. feed-forward, pre-LN, residual
  return h + mlp(layer_norm2(h));
}

ClipEncoderImpl::ClipEncoderImpl(const ClipEncoderConfig& cfg, const at::TensorOptions& opts) {
  layers = register_module("layers", torch::nn::ModuleList());
  for (int64_t i = 0; i < cfg.num_hidden_layers; ++i) layers->push_back(ClipEncoderLayer(cfg, opts));
}

at::Tensor ClipEncoderImpl::forward(const at::Tensor& x, bool causal, std::vector<at::Tensor>* hidden_states) {
  // x: [B, N, C]
  at::Tensor h = x;
  for (const auto& layer : *layers) {
    if (hidden_states) hidden_states->push_back(h);
    h = layer->as<ClipEncoderLayerImpl>()->forward(h, causal);
  }
  if (hidden_states) hidden_states->push_back(h);
  return h;
}

// ---------------------------------------------------------------- text tower

ClipTextEmbeddingsImpl::ClipTextEmbeddingsImpl(const ClipTextConfig& cfg, const at::TensorOptions& opts) {
  token_embedding = register_module("token_embedding", Embedding(cfg.vocab_size, cfg.encoder.hidden_size, opts));
  position_embedding = register_module("position_embedding", Embedding(cfg.max_position_embeddings, cfg.encoder.hidden_size, opts));
}

at::Tensor ClipTextEmbeddingsImpl::forward(const at::Tensor& input_ids, const at::Tensor& replace_index, const at::Tensor& replace_values) {
  // input_ids: [B, L] int64
  const int64_t B = input_ids.size(0), L = input_ids.size(1), C = token_embedding->weight.size(1);
  // 1. token embeddings: [B, L, C]
  at::Tensor tokens = token_embedding(input_ids);
  // 2. replace the token-embedding output at the given (batch, position) pairs. Out-of-place
  //    index_put, so gradients reach replace_values; equal to swapping that token's embedding row
  //    (textual inversion), but without touching the frozen weight.
  if (replace_index.defined() != replace_values.defined())
    throw std::invalid_argument("CLIP text embeddings: replace_index and replace_values must be given together");
  if (replace_index.defined()) {
    if (replace_index.scalar_type() != at::kLong || replace_index.dim() != 2 || replace_index.size(1) != 2)
      throw std::invalid_argument("CLIP text embeddings: replace_index must be int64 [P, 2] rows (batch, position), got " +
                                  std::string(c10::toString(replace_index.scalar_type())) + " " + shape_str(replace_index.sizes()));
    const int64_t P = replace_index.size(0);
    at::Tensor values = replace_values;
    if (values.dim() == 1) values = values.unsqueeze(0).expand({P, values.size(0)});
    if (values.dim() != 2 || values.size(0) != P || values.size(1) != C)
      throw std::invalid_argument("CLIP text embeddings: replace_values must be [" + std::to_string(P) + ", " + std::to_string(C) + "] or [" +
                                  std::to_string(C) + "], got " + shape_str(replace_values.sizes()));
    if (P > 0) {
      at::Tensor b = replace_index.select(1, 0), p = replace_index.select(1, 1);
      // index_put with an out-of-range index is a device-side assert on CUDA: check here instead.
      const int64_t bmin = b.min().item<int64_t>(), bmax = b.max().item<int64_t>();
      const int64_t pmin = p.min().item<int64_t>(), pmax = p.max().item<int64_t>();
      if (bmin < 0 || bmax >= B || pmin < 0 || pmax >= L)
        throw std::invalid_argument("CLIP text embeddings: replace_index holds (batch, position) outside [0, " + std::to_string(B) + ") x [0, " +
                                    std::to_string(L) + ")");
      tokens = tokens.index_put({b, p}, values.to(tokens.scalar_type()));
    }
  }
  // 3. absolute positions 0..L-1 (CLIPTextEmbeddings.position_ids[:, :L]): [1, L, C]
  at::Tensor positions = position_embedding(at::arange(L, input_ids.options().dtype(at::kLong))).unsqueeze(0);
  return tokens + positions;
}

ClipTextTransformerImpl::ClipTextTransformerImpl(const ClipTextConfig& cfg, const at::TensorOptions& opts) : cfg(cfg) {
  embeddings = register_module("embeddings", ClipTextEmbeddings(cfg, opts));
  encoder = register_module("encoder", ClipEncoder(cfg.encoder, opts));
  final_layer_norm = register_module("final_layer_norm", LayerNorm(cfg.encoder.hidden_size, cfg.encoder.layer_norm_eps, opts));
}

ClipTextOutput ClipTextTransformerImpl::forward(const at::Tensor& input_ids, const at::Tensor& replace_index, const at::Tensor& replace_values,
                                                bool output_hidden_states) {
  // input_ids: [B, L] int64
  if (input_ids.dim() != 2 || input_ids.scalar_type() != at::kLong)
    throw std::invalid_argument("CLIP text model: input_ids must be int64 [B, L], got " + std::string(c10::toString(input_ids.scalar_type())) + " " +
                                shape_str(input_ids.sizes()));
  if (input_ids.size(1) > cfg.max_position_embeddings)
    throw std::invalid_argument("CLIP text model: input_ids has " + std::to_string(input_ids.size(1)) + " tokens, more than max_position_embeddings " +
                                std::to_string(cfg.max_position_embeddings));
  ClipTextOutput out;
  // 1. embeddings: [B, L, C]
  at::Tensor h = embeddings->forward(input_ids, replace_index, replace_values);
  // 2. encoder with the causal mask only: no padding mask, as SD v1.5 calls it (pads are attended to causally)
  h = encoder->forward(h, /*causal=*/true, output_hidden_states ? &out.hidden_states : nullptr);
  // 3. final LayerNorm: [B, L, C]
  out.last_hidden_state = final_layer_norm(h);
  // 4. pooling (CLIPTextTransformer.forward, 4.33): with the legacy eos_token_id 2 the EOS is taken
  //    to be the largest id, argmax(input_ids) (the FIRST 49407); otherwise the first position equal
  //    to eos_token_id (argmax of the match mask, 0 when absent, as in transformers).
  if (cfg.eos_token_id == 2)
    out.pooled_index = input_ids.argmax(-1);
  else
    out.pooled_index = input_ids.eq(cfg.eos_token_id).to(at::kInt).argmax(-1);
  at::Tensor rows = at::arange(input_ids.size(0), input_ids.options().dtype(at::kLong));
  out.pooler_output = out.last_hidden_state.index({rows, out.pooled_index});  // [B, C]
  return out;
}

ClipTextModelImpl::ClipTextModelImpl(const ClipTextConfig& cfg, const at::TensorOptions& opts) {
  text_model = register_module("text_model", ClipTextTransformer(cfg, opts));
}

// ---------------------------------------------------------------- vision tower

ClipVisionEmbeddingsImpl::ClipVisionEmbeddingsImpl(const ClipVisionConfig& cfg, const at::TensorOptions& opts)
    : num_channels(cfg.num_channels), image_size(cfg.image_size), patch_size(cfg.patch_size) {
  const int64_t C = cfg.encoder.hidden_size, grid = cfg.image_size / cfg.patch_size;
  class_embedding = register_parameter("class_embedding", at::empty({C}, opts));
  patch_embedding = register_module("patch_embedding", Conv2d(cfg.num_channels, C, cfg.patch_size, cfg.patch_size, 0, /*bias=*/false, opts));
  position_embedding = register_module("position_embedding", Embedding(grid * grid + 1, C, opts));
}

at::Tensor ClipVisionEmbeddingsImpl::forward(const at::Tensor& pixel_values) {
  // pixel_values: [B, 3, S, S]
  if (pixel_values.dim() != 4 || pixel_values.size(1) != num_channels)
    throw std::invalid_argument("CLIP vision model: pixel_values must be [B, " + std::to_string(num_channels) + ", H, W], got " +
                                shape_str(pixel_values.sizes()));
  // transformers 4.33 has no position interpolation: the patch grid must be the configured one.
  const int64_t grid = image_size / patch_size;
  if (pixel_values.size(2) / patch_size != grid || pixel_values.size(3) / patch_size != grid)
    throw std::invalid_argument("CLIP vision model: input image size " + std::to_string(pixel_values.size(2)) + "x" + std::to_string(pixel_values.size(3)) +
                                " does not match the model's image_size " + std::to_string(image_size) + "x" + std::to_string(image_size));
  const int64_t B = pixel_values.size(0), C = class_embedding.size(0);
  // 1. patches: conv k = s = patch_size -> [B, C, g, g] -> [B, g*g, C]
  at::Tensor patches = patch_embedding(pixel_values.to(patch_embedding->weight.scalar_type())).flatten(2).transpose(1, 2);
  // 2. prepend CLS: [B, 1 + g*g, C]
  at::Tensor cls = class_embedding.view({1, 1, C}).expand({B, 1, C});
  at::Tensor h = at::cat({cls, patches}, 1);
  // 3. absolute positions: [1, 1 + g*g, C]
  return h + position_embedding->weight.unsqueeze(0);
}

ClipVisionTransformerImpl::ClipVisionTransformerImpl(const ClipVisionConfig& cfg, const at::TensorOptions& opts) {
  embeddings = register_module("embeddings", ClipVisionEmbeddings(cfg, opts));
  pre_layrnorm = register_module("pre_layrnorm", LayerNorm(cfg.encoder.hidden_size, cfg.encoder.layer_norm_eps, opts));
  encoder = register_module("encoder", ClipEncoder(cfg.encoder, opts));
  post_layernorm = register_module("post_layernorm", LayerNorm(cfg.encoder.hidden_size, cfg.encoder.layer_norm_eps, opts));
}

ClipVisionOutput ClipVisionTransformerImpl::forward(const at::Tensor& pixel_values, bool output_hidden_states) {
  // pixel_values: [B, 3, S, S]
  ClipVisionOutput out;
  // 1. embeddings, then pre_layrnorm (CLIP's ln_pre): [B, N, C]
  at::Tensor h = pre_layrnorm(embeddings(pixel_values));
  // 2. encoder without a mask: [B, N, C]
  out.last_hidden_state = encoder->forward(h, /*causal=*/false, output_hidden_states ? &out.hidden_states : nullptr);
  // 3. pooled = post_layernorm(CLS): [B, C]
  out.pooler_output = post_layernorm(out.last_hidden_state.select(1, 0));
  return out;
}

ClipVisionModelWithProjectionImpl::ClipVisionModelWithProjectionImpl(const ClipVisionConfig& cfg, const at::TensorOptions& opts) {
  vision_model = register_module("vision_model", ClipVisionTransformer(cfg, opts));
  visual_projection = register_module("visual_projection", Linear(cfg.encoder.hidden_size, cfg.projection_dim, /*bias=*/false, opts));
}

ClipVisionProjectionOutput ClipVisionModelWithProjectionImpl::forward(const at::Tensor& pixel_values, bool output_hidden_states) {
  // pixel_values: [B, 3, S, S]
  ClipVisionProjectionOutput out;
  // 1. vision tower
  out.vision = vision_model->forward(pixel_values, output_hidden_states);
  // 2. projection of the pooled CLS: [B, projection_dim], not normalised (CLIPVisionModelWithProjection.forward)
  out.image_embeds = visual_projection(out.vision.pooler_output);
  return out;
}

// ---------------------------------------------------------------- CLIPModel

ClipModelImpl::ClipModelImpl(const ClipTextConfig& text_cfg, const ClipVisionConfig& vision_cfg, int64_t projection_dim, const at::TensorOptions& opts) {
  text_model = register_module("text_model", ClipTextTransformer(text_cfg, opts));
  vision_model = register_module("vision_model", ClipVisionTransformer(vision_cfg, opts));
  visual_projection = register_module("visual_projection", Linear(vision_cfg.encoder.hidden_size, projection_dim, /*bias=*/false, opts));
  text_projection = register_module("text_projection", Linear(text_cfg.encoder.hidden_size, projection_dim, /*bias=*/false, opts));
  logit_scale = register_parameter("logit_scale", at::empty({}, opts));
}

ClipEmbeds ClipModelImpl::encode_text(const at::Tensor& input_ids, const at::Tensor& replace_index, const at::Tensor& replace_values) {
  // input_ids: [T, L] -> [T, P] (CLIPModel.get_text_features, then the normalisation of CLIPModel.forward)
  ClipEmbeds out;
  out.embeds_unnormalized = text_projection(text_model->forward(input_ids, replace_index, replace_values).pooler_output);
  out.embeds = clip_l2_normalize(out.embeds_unnormalized);
  return out;
}

ClipEmbeds ClipModelImpl::encode_image(const at::Tensor& pixel_values) {
  // pixel_values: [I, 3, S, S] -> [I, P] (CLIPModel.get_image_features, then the normalisation)
  ClipEmbeds out;
  out.embeds_unnormalized = visual_projection(vision_model->forward(pixel_values).pooler_output);
  out.embeds = clip_l2_normalize(out.embeds_unnormalized);
  return out;
}

// ---------------------------------------------------------------- NativeModel wrappers

namespace {

void put_hidden_states(TensorMap& out, const std::string& prefix, const std::vector<at::Tensor>& hs) {
  for (size_t i = 0; i < hs.size(); ++i) out[prefix + std::to_string(i)] = hs[i];
}

// Optional text replacement inputs for run(): both or neither.
void replacement_inputs(const TensorMap& inputs, at::Tensor& index, at::Tensor& values) {
  const bool has_index = inputs.count("replace_index") > 0, has_values = inputs.count("replace_values") > 0;
  if (has_index != has_values) throw std::invalid_argument("inputs replace_index and replace_values must be given together");
  if (has_index) {
    index = inputs.at("replace_index");
    values = inputs.at("replace_values");
  }
}

class ClipTextNative : public NativeModel {
 public:
  ClipTextNative(const ClipTextConfig& cfg, const at::TensorOptions& opts) : model_(cfg, opts) {}
  torch::nn::Module& module() override { return *model_; }
  // "forward": input_ids [B, L] int64 (+ replace_index [P, 2], replace_values [P, C])
  //   -> last_hidden_state, pooler_output, hidden_states.0..L
  TensorMap run(const std::string& method, const TensorMap& inputs) override {
    if (method != "forward") throw std::invalid_argument("clip_text: unknown method \"" + method + "\" (expected forward)");
    at::Tensor index, values;
    replacement_inputs(inputs, index, values);
    ClipTextOutput r = model_->forward(input(inputs, "input_ids"), index, values, /*output_hidden_states=*/true);
    TensorMap out{{"last_hidden_state", r.last_hidden_state}, {"pooler_output", r.pooler_output}};
    put_hidden_states(out, "hidden_states.", r.hidden_states);
    return out;
  }

 private:
  ClipTextModel model_;
};

class ClipVisionNative : public NativeModel {
 public:
  ClipVisionNative(const ClipVisionConfig& cfg, const at::TensorOptions& opts) : model_(cfg, opts) {}
  torch::nn::Module& module() override { return *model_; }
  // "forward": pixel_values [B, 3, S, S] -> image_embeds, last_hidden_state, pooler_output, hidden_states.0..L
  TensorMap run(const std::string& method, const TensorMap& inputs) override {
    if (method != "forward") throw std::invalid_argument("clip_vision: unknown method \"" + method + "\" (expected forward)");
    ClipVisionProjectionOutput r = model_->forward(input(inputs, "pixel_values"), /*output_hidden_states=*/true);
    TensorMap out{{"image_embeds", r.image_embeds}, {"last_hidden_state", r.vision.last_hidden_state}, {"pooler_output", r.vision.pooler_output}};
    put_hidden_states(out, "hidden_states.", r.vision.hidden_states);
    return out;
  }

 private:
  ClipVisionModelWithProjection model_;
};

class ClipNative : public NativeModel {
 public:
  ClipNative(const ClipTextConfig& t, const ClipVisionConfig& v, int64_t projection_dim, const at::TensorOptions& opts) : model_(t, v, projection_dim, opts) {}
  torch::nn::Module& module() override { return *model_; }
  // "forward": input_ids [T, L] + pixel_values [I, 3, S, S] -> the CLIPModel outputs and intermediates
  // "encode_text": input_ids -> text_embeds, text_embeds_unnormalized
  // "encode_image": pixel_values -> image_embeds, image_embeds_unnormalized
  TensorMap run(const std::string& method, const TensorMap& inputs) override {
    if (method == "encode_text") {
      ClipEmbeds t = model_->encode_text(input(inputs, "input_ids"));
      return {{"text_embeds", t.embeds}, {"text_embeds_unnormalized", t.embeds_unnormalized}};
    }
    if (method == "encode_image") {
      ClipEmbeds i = model_->encode_image(input(inputs, "pixel_values"));
      return {{"image_embeds", i.embeds}, {"image_embeds_unnormalized", i.embeds_unnormalized}};
    }
    if (method != "forward") throw std::invalid_argument("clip: unknown method \"" + method + "\" (expected forward, encode_text or encode_image)");
    // CLIPModel.forward with output_hidden_states=True
    // 1. towers
    ClipTextOutput text = model_->text_model->forward(input(inputs, "input_ids"), {}, {}, /*output_hidden_states=*/true);
    ClipVisionOutput vision = model_->vision_model->forward(input(inputs, "pixel_values"), /*output_hidden_states=*/true);
    // 2. projections and L2 normalisation: [T, P], [I, P]
    at::Tensor text_unnorm = model_->text_projection(text.pooler_output);
    at::Tensor image_unnorm = model_->visual_projection(vision.pooler_output);
    at::Tensor text_embeds = clip_l2_normalize(text_unnorm), image_embeds = clip_l2_normalize(image_unnorm);
    // 3. logits = cosine * exp(logit_scale), no clamp: [T, I] and its transpose
    at::Tensor scale = model_->logit_scale.exp();
    at::Tensor logits_per_text = at::matmul(text_embeds, image_embeds.t()) * scale;
    TensorMap out{{"image_embeds", image_embeds},
                  {"text_embeds", text_embeds},
                  {"logits_per_text", logits_per_text},
                  {"logits_per_image", logits_per_text.t()},
                  {"cosine", at::matmul(image_embeds, text_embeds.t())},
                  {"image_embeds_unnormalized", image_unnorm},
                  {"text_embeds_unnormalized", text_unnorm},
                  {"text_pooler_output", text.pooler_output},
                  {"text_pooled_index", text.pooled_index},
                  {"text_last_hidden_state", text.last_hidden_state},
                  {"vision_pooler_output", vision.pooler_output},
                  {"vision_last_hidden_state", vision.last_hidden_state},
                  {"logit_scale", model_->logit_scale},
                  {"logit_scale_exp", scale}};
    put_hidden_states(out, "text_hidden_states.", text.hidden_states);
    put_hidden_states(out, "vision_hidden_states.", vision.hidden_states);
    return out;
  }

 private:
  ClipModel model_;
};

}  // namespace

std::shared_ptr<NativeModel> make_clip_text(const JsonValue& config, const at::TensorOptions& opts) {
  return std::make_shared<ClipTextNative>(ClipTextConfig::from_json(config), opts);
}

std::shared_ptr<NativeModel> make_clip_vision(const JsonValue& config, const at::TensorOptions& opts) {
  return std::make_shared<ClipVisionNative>(ClipVisionConfig::from_json(config), opts);
}

std::shared_ptr<NativeModel> make_clip(const JsonValue& config, const at::TensorOptions& opts) {
  const int64_t projection_dim = cfg_int(config, "projection_dim");
  if (projection_dim <= 0) throw std::invalid_argument("config key \"projection_dim\" must be positive, got " + std::to_string(projection_dim));
  return std::make_shared<ClipNative>(ClipTextConfig::from_json(cfg_get(config, "text_config")),
                                      ClipVisionConfig::from_json(cfg_get(config, "vision_config")), projection_dim, opts);
}

}  // namespace si
