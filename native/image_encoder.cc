// SingleInsert image encoder (see image_encoder.h).
#include "image_encoder.h"
#include "util.h"

#include <torch/csrc/autograd/grad_mode.h>

#include <cmath>
#include <set>
#include <sstream>
#include <stdexcept>
#include <vector>

#include "model.h"
#include "safetensors.h"

namespace si {

namespace {

// transformers' CLIPConfig defaults: initializer_range 0.02, initializer_factor 1.0
constexpr double kInitializerRange = 0.02;
constexpr double kInitializerFactor = 1.0;

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

}  // namespace

SingleInsertEncoderImpl::SingleInsertEncoderImpl(const ClipVisionConfig& cfg, int64_t head_out, const at::TensorOptions& opts)
    : ClipVisionModelWithProjectionImpl(cfg, opts), config(cfg) {
  if (head_out <= 0) throw std::invalid_argument("SingleInsert encoder: head_out must be positive, got " + std::to_string(head_out));
  head = register_module("head", Linear(cfg.projection_dim, head_out, /*bias=*/true, opts));
}

at::Tensor SingleInsertEncoderImpl::embed(const at::Tensor& pixel_values) {
  // pixel_values: [B, 3, S, S]
  // 1. CLIP vision tower + visual_projection: [B, projection_dim]
  at::Tensor image_embeds = forward(pixel_values).image_embeds;
  // 2. head into the text encoder's token-embedding space: [B, head_out]
  return head(image_embeds);
}

SingleInsertEncoder make_singleinsert_encoder(const JsonValue& config, const at::TensorOptions& opts) {
  return SingleInsertEncoder(ClipVisionConfig::from_json(config), cfg_int(config, "head_out"), opts);
}

void init_singleinsert_encoder(SingleInsertEncoderImpl& encoder, at::Generator generator) {
  const double hidden = static_cast<double>(encoder.config.encoder.hidden_size);
  const double layers = static_cast<double>(std::max<int64_t>(encoder.config.encoder.num_hidden_layers, 1));
  const double f = kInitializerFactor;
  // CLIPAttention / CLIPMLP in _init_weights
  const double in_proj_std = std::pow(hidden, -0.5) * std::pow(2 * layers, -0.5) * f;
  const double out_proj_std = std::pow(hidden, -0.5) * f;
  const double fc_std = std::pow(2 * hidden, -0.5) * f;

  torch::NoGradGuard no_grad;
  const auto cpu = at::TensorOptions().dtype(at::kFloat);
  for (auto& item : encoder.named_parameters(/*recurse=*/true)) {
    const std::string& key = item.key();
    at::Tensor& p = item.value();
    at::Tensor value;
    auto normal = [&](double std) { return at::empty(p.sizes(), cpu).normal_(0.0, std, generator); };
    if (ends_with(key, "embeddings.class_embedding")) value = normal(std::pow(hidden, -0.5) * f);
    else if (ends_with(key, "patch_embedding.weight") || ends_with(key, "position_embedding.weight")) value = normal(kInitializerRange * f);
    else if (ends_with(key, "self_attn.q_proj.weight") || ends_with(key, "self_attn.k_proj.weight") || ends_with(key, "self_attn.v_proj.weight"))
      value = normal(in_proj_std);
    else if (ends_with(key, "self_attn.out_proj.weight")) value = normal(out_proj_std);
    else if (ends_with(key, "mlp.fc1.weight")) value = normal(fc_std);
    else if (ends_with(key, "mlp.fc2.weight")) value = normal(in_proj_std);
    else if (key == "visual_projection.weight") value = normal(std::pow(hidden, -0.5) * f);
    else if (key == "head.weight") value = normal(kInitializerRange);
    else if (ends_with(key, ".bias")) value = at::zeros(p.sizes(), cpu);  // Linear biases and LayerNorm biases
    else if (ends_with(key, "layer_norm1.weight") || ends_with(key, "layer_norm2.weight") || ends_with(key, "pre_layrnorm.weight") ||
             ends_with(key, "post_layernorm.weight"))
      value = at::ones(p.sizes(), cpu);
    else
      throw std::logic_error("init_singleinsert_encoder: no initialiser for parameter " + key);
    p.copy_(value);
  }
}

bool load_singleinsert_encoder(SingleInsertEncoderImpl& encoder, const std::string& path) {
  auto file = SafetensorsFile::open(path);
  std::vector<std::string> missing, misshaped, unexpected;
  std::set<std::string> known;
  bool has_head = file->contains("head.weight") || file->contains("head.bias");
  for (const auto& item : encoder.named_parameters(true)) {
    const std::string& key = item.key();
    known.insert(key);
    const bool is_head = key.compare(0, 5, "head.") == 0;
    if (!file->contains(key)) {
      if (!is_head || has_head) missing.push_back(key);
      continue;
    }
    const TensorInfo& info = file->info(key);
    if (at::IntArrayRef(info.shape) != item.value().sizes())
      misshaped.push_back(key + ": expected " + shape_str(item.value().sizes()) + " but the file has " + shape_str(info.shape));
  }
  // A CLIPModel file (openai/clip-vit-base-patch32 ships one) also holds the text tower: not ours to load.
  auto other_tower = [](const std::string& k) {
    return k.compare(0, 11, "text_model.") == 0 || k == "text_projection.weight" || k == "logit_scale";
  };
  for (const auto& t : file->tensors())
    if (!known.count(t.name) && t.name != "vision_model.embeddings.position_ids" && !other_tower(t.name)) unexpected.push_back(t.name);
  if (!missing.empty() || !misshaped.empty() || !unexpected.empty()) {
    std::ostringstream o;
    o << path << " does not fit the SingleInsert image encoder (a CLIPVisionModelWithProjection with this config, plus an optional head)";
    auto list = [&](const char* title, const std::vector<std::string>& items) {
      if (items.empty()) return;
      o << "\n  " << items.size() << " " << title << ":";
      for (size_t i = 0; i < items.size() && i < 20; ++i) o << "\n    " << items[i];
      if (items.size() > 20) o << "\n    ... and " << items.size() - 20 << " more";
    };
    list("missing keys", missing);
    list("keys with the wrong shape", misshaped);
    list("unexpected keys", unexpected);
    throw std::invalid_argument(o.str());
  }
  torch::NoGradGuard no_grad;
  for (auto& item : encoder.named_parameters(true)) {
    if (!file->contains(item.key())) continue;  // a head the file does not have
    item.value().copy_(file->load(item.key()));
  }
  return has_head;
}

}  // namespace si
